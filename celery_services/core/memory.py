"""An in-memory CRUD service that speaks the query language of Feathers database adapters.

:class:`MemoryService` is the Python counterpart of ``@feathersjs/memory``: items are dicts kept in a dict
keyed by id, queried with ``params["query"]`` in the language of :mod:`.matching` (conditions, ``$or`` /
``$and``, and the ``$limit``, ``$skip``, ``$sort`` and ``$select`` filters)::

    {"age": {"$gte": 18}, "$or": [{"name": "Alice"}, {"name": "Bob"}], "$sort": {"name": 1}, "$limit": 10}

Every item handed out is a deep copy, and every call holds one re-entrant lock, so worker threads may share
a service.
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Collection, Mapping
from typing import Any, TypeAlias

from .errors import BadRequest, MethodNotAllowed, NotFound
from .matching import Item, Params, Query, check_paginate, parse_query, sort_key
from .service import Service

__all__ = ["MemoryService"]

Id: TypeAlias = int | str

_ATOMS = frozenset({str, int, float, bool, type(None)})


def _clone(value: Any) -> Any:
    """A deep copy of ``value``: its dicts and lists (the shape of JSON, most items) copied here, anything
    else by :func:`copy.deepcopy`, whose memo and dispatch took three times as long for a small item (3 us
    against 1), a third of its ``get``.

    Unlike ``deepcopy``, a dict or list met twice in ``value`` is copied twice, and one that holds itself
    is not supported (an item is data, not a graph of shared objects).
    """
    kind = type(value)
    if kind in _ATOMS:
        return value
    if kind is dict:
        return {key: _clone(item) for key, item in value.items()}
    if kind is list:
        return [_clone(item) for item in value]
    return copy.deepcopy(value)


class MemoryService(Service):
    """An in-memory CRUD service with Feathers' adapter query syntax.

    Args:
        id_field: the name of the id field of every item.
        start_id: the first auto-generated id; ids then count up, skipping ids already stored.
        paginate: ``{"default": n, "max": m}`` makes :meth:`find` return a page (``total``, ``limit``,
            ``skip``, ``data``) of ``default`` items unless ``$limit`` asks otherwise, at most ``max``.
            ``params["paginate"]`` overrides it per call (``False`` disables it).
        multi: which methods may work on many items: ``create`` with a list, ``patch``/``remove`` with
            ``id=None``. ``True`` for all, ``False`` for none, or a collection of method names.
        store: initial items, id -> item (copied; each item's id field is set to its key).
    """

    def __init__(
        self,
        *,
        id_field: str = "id",
        start_id: int = 0,
        paginate: Mapping[str, int] | None = None,
        multi: bool | Collection[str] = False,
        store: Mapping[Id, Mapping[str, Any]] | None = None,
    ) -> None:
        self.id_field = id_field
        self.paginate = check_paginate(paginate, ValueError)
        if not isinstance(multi, bool):
            multi = frozenset([multi] if isinstance(multi, str) else multi)
        self.multi: bool | Collection[str] = multi
        self._lock = threading.RLock()
        self._next_id = start_id
        self._store: dict[Id, Item] = {
            key: {**_clone(dict(item)), id_field: key} for key, item in (store or {}).items()
        }

    def find(self, params: Params | None = None) -> list[Item] | dict[str, Any]:
        """Find the items that match ``params["query"]``.

        Args:
            params: call parameters; ``query`` holds conditions and filters, ``paginate`` overrides paging.

        Returns:
            A list of items, or a page ``{"total", "limit", "skip", "data"}`` when paging with a default.

        Raises:
            BadRequest: the query or the paging options are malformed.
        """
        query = parse_query(params)
        paginate = self._paginate_option(params)
        limit = query.limit
        if paginate is not None:
            limit = (paginate.get("default") or None) if limit is None else limit
            if paginate.get("max") is not None:
                limit = paginate["max"] if limit is None else min(limit, paginate["max"])
        with self._lock:
            matches = [item for item in self._store.values() if query.match(item)]
            for field, direction in reversed(query.sort):  # stable sorts, least significant key first
                matches.sort(key=sort_key(field), reverse=direction < 0)
            end = None if limit is None else query.skip + limit
            data = [self._select(item, query.select) for item in matches[query.skip : end]]
        if paginate is not None and paginate.get("default"):
            return {"total": len(matches), "limit": limit, "skip": query.skip, "data": data}
        return data

    def get(self, id: Id, params: Params | None = None) -> Item:
        """Get the item with ``id``, provided it also matches ``params["query"]``.

        Raises:
            NotFound: no item has this id, or it does not match the query.
            BadRequest: the query is malformed.
        """
        query = parse_query(params)
        with self._lock:
            return self._select(self._get_item(id, query), query.select)

    def create(
        self, data: Mapping[str, Any] | list[Mapping[str, Any]], params: Params | None = None
    ) -> Item | list[Item]:
        """Store a new item (or, with ``multi``, a list of items); a missing or ``None`` id is generated.

        An item whose id is already stored replaces it, as in Feathers' memory adapter.

        Returns:
            The created item, or the list of created items when ``data`` is a list.

        Raises:
            MethodNotAllowed: ``data`` is a list and ``create`` is not a multi method.
            BadRequest: ``data`` is not an object (or list of objects), or the query is malformed.
        """
        if isinstance(data, list):
            if not self._allows_multi("create"):
                raise MethodNotAllowed("Can not create multiple entries")
            batch = data
        else:
            batch = [data]
        if not all(isinstance(entry, Mapping) for entry in batch):
            raise BadRequest("Data must be an object or a list of objects")
        query = parse_query(params)
        items = [_clone(dict(entry)) for entry in batch]
        for item in items:
            self._check_id(item.get(self.id_field))
        with self._lock:
            for item in items:
                if item.get(self.id_field) is None:
                    item[self.id_field] = self._new_id()
                self._store[item[self.id_field]] = item
            created = [self._select(item, query.select) for item in items]
        return created if isinstance(data, list) else created[0]

    def update(self, id: Id, data: Mapping[str, Any], params: Params | None = None) -> Item:
        """Replace the whole item with ``data``, keeping its id.

        Raises:
            NotFound: no item has this id, or it does not match ``params["query"]``.
            BadRequest: ``id`` is ``None``, ``data`` is not an object, or the query is malformed.
        """
        if id is None:
            raise BadRequest("You can not replace multiple instances. Did you mean 'patch'?")
        if not isinstance(data, Mapping):
            raise BadRequest("Data must be an object")
        query = parse_query(params)
        item = {**_clone(dict(data)), self.id_field: id}
        with self._lock:
            self._get_item(id, query)
            self._store[id] = item
            return self._select(item, query.select)

    def patch(
        self, id: Id | None, data: Mapping[str, Any], params: Params | None = None
    ) -> Item | list[Item]:
        """Merge ``data`` into the item with ``id`` or, with ``id=None``, into every item matching the query.

        The id field of ``data`` is ignored: a patch never changes an id.

        Returns:
            The patched item, or the list of patched items when ``id`` is ``None``.

        Raises:
            NotFound: no item has this id, or it does not match ``params["query"]``.
            MethodNotAllowed: ``id`` is ``None`` and ``patch`` is not a multi method.
            BadRequest: ``data`` is not an object, or the query is malformed.
        """
        if id is None and not self._allows_multi("patch"):
            raise MethodNotAllowed("Can not patch multiple entries")
        if not isinstance(data, Mapping):
            raise BadRequest("Data must be an object")
        query = parse_query(params)
        # Copied once: stored items are never mutated in place, so they may share these values.
        changes = {key: _clone(value) for key, value in data.items() if key != self.id_field}
        with self._lock:
            patched = []
            for key, item in self._targets(id, query):
                self._store[key] = {**item, **changes}
                patched.append(self._select(self._store[key], query.select))
        return patched if id is None else patched[0]

    def remove(self, id: Id | None, params: Params | None = None) -> Item | list[Item]:
        """Remove the item with ``id`` or, with ``id=None``, every item matching the query.

        Returns:
            The removed item, or the list of removed items when ``id`` is ``None``.

        Raises:
            NotFound: no item has this id, or it does not match ``params["query"]``.
            MethodNotAllowed: ``id`` is ``None`` and ``remove`` is not a multi method.
            BadRequest: the query is malformed.
        """
        if id is None and not self._allows_multi("remove"):
            raise MethodNotAllowed("Can not remove multiple entries")
        query = parse_query(params)
        with self._lock:
            removed = []
            for key, item in self._targets(id, query):
                del self._store[key]
                removed.append(self._select(item, query.select))
        return removed if id is None else removed[0]

    def _allows_multi(self, method: str) -> bool:
        return self.multi is True or (not isinstance(self.multi, bool) and method in self.multi)

    def _paginate_option(self, params: Params | None) -> Mapping[str, Any] | None:
        if params is not None and "paginate" in params:
            return check_paginate(params["paginate"], BadRequest)
        return self.paginate

    @staticmethod
    def _check_id(value: Any) -> None:
        try:
            hash(value)
        except TypeError:
            raise BadRequest(f"An id must be hashable, not {type(value).__name__}") from None

    def _new_id(self) -> int:
        """The next free auto-increment id (called with the lock held)."""
        while self._next_id in self._store:
            self._next_id += 1
        self._next_id += 1
        return self._next_id - 1

    def _get_item(self, id: Id, query: Query) -> Item:
        """The stored item with ``id`` if it matches ``query`` (called with the lock held)."""
        try:
            item = self._store.get(id)
        except TypeError:  # an unhashable id names no item
            item = None
        if item is None or not query.match(item):
            raise NotFound(f"No record found for id '{id}'")
        return item

    def _targets(self, id: Id | None, query: Query) -> list[tuple[Id, Item]]:
        """The ``(key, item)`` pairs a patch or remove works on (called with the lock held)."""
        if id is None:
            return [(key, item) for key, item in self._store.items() if query.match(item)]
        return [(id, self._get_item(id, query))]

    def _select(self, item: Item, fields: tuple[str, ...] | None) -> Item:
        """A deep copy of ``item``, cut to ``fields`` (plus the id field) when ``$select`` names some."""
        if fields is not None:
            item = {key: value for key, value in item.items() if key in fields or key == self.id_field}
        copied: Item = _clone(item)
        return copied
