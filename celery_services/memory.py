"""An in-memory CRUD service that speaks the query language of Feathers database adapters.

:class:`MemoryService` is the Python counterpart of ``@feathersjs/memory``: items are dicts kept in a dict
keyed by id, queried with ``params["query"]``::

    {"age": {"$gte": 18}, "$or": [{"name": "Alice"}, {"name": "Bob"}], "$sort": {"name": 1}, "$limit": 10}

Field conditions are equality, or an object of ``$in``, ``$nin``, ``$lt``, ``$lte``, ``$gt``, ``$gte`` and
``$ne``; ``$or`` and ``$and`` take lists of sub-queries; ``$limit``, ``$skip``, ``$sort`` and ``$select`` are
top-level filters. Values are compared as given: turning query strings into numbers belongs to the transport
that parsed them. A missing field reads as ``None``. Any other ``$`` key is a :class:`~.errors.BadRequest`.

Every item handed out is a deep copy, and every call holds one re-entrant lock, so worker threads may share
a service.
"""

from __future__ import annotations

import copy
import functools
import operator
import threading
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeGuard

from .errors import BadRequest, MethodNotAllowed, NotFound
from .service import Service

__all__ = ["MemoryService"]

Id: TypeAlias = int | str
Item: TypeAlias = dict[str, Any]
Params: TypeAlias = Mapping[str, Any]
Predicate: TypeAlias = Callable[[Item], bool]

_FILTERS = frozenset({"$limit", "$skip", "$sort", "$select"})
_LISTS = (list, tuple, set, frozenset)
_OPERATORS: dict[str, Callable[[Any, Any], Any]] = {
    "$in": lambda value, arg: value in arg,
    "$nin": lambda value, arg: value not in arg,
    "$lt": operator.lt,
    "$lte": operator.le,
    "$gt": operator.gt,
    "$gte": operator.ge,
    "$ne": operator.ne,
}


@dataclass(frozen=True)
class _Query:
    """A validated ``params["query"]``: the item predicate and the filters."""

    match: Predicate
    sort: list[tuple[str, int]]
    skip: int
    limit: int | None
    select: list[str] | None


def _all(checks: list[Predicate]) -> Predicate:
    return lambda item: all(check(item) for check in checks)


def _any(checks: list[Predicate]) -> Predicate:
    return lambda item: any(check(item) for check in checks)


def _equals(field: str, expected: Any) -> Predicate:
    return lambda item: bool(item.get(field) == expected)


def _operator(field: str, name: str, arg: Any) -> Predicate:
    if name not in _OPERATORS:
        raise BadRequest(f"Invalid query parameter {name}")
    if name in ("$in", "$nin"):
        if not isinstance(arg, _LISTS):
            raise BadRequest(f"{name} of '{field}' must be a list")
        arg = list(arg)
    compare = _OPERATORS[name]

    def check(item: Item) -> bool:
        try:
            return bool(compare(item.get(field), arg))
        except TypeError:  # values of different types (or None) are not ordered: no match, as in sift
            return False

    return check


def _compile(query: Mapping[str, Any]) -> Predicate:
    """Turn the conditions of a query (filters excluded) into a predicate, validating every operator."""
    checks: list[Predicate] = []
    for key, value in query.items():
        if key in ("$or", "$and"):
            if not isinstance(value, (list, tuple)) or not all(isinstance(q, Mapping) for q in value):
                raise BadRequest(f"{key} must be a list of queries")
            subs = [_compile(q) for q in value]
            checks.append(_any(subs) if key == "$or" else _all(subs))
        elif isinstance(key, str) and key.startswith("$"):
            raise BadRequest(f"Invalid query parameter {key}")
        elif isinstance(value, Mapping) and any(isinstance(k, str) and k.startswith("$") for k in value):
            checks.extend(_operator(key, str(name), arg) for name, arg in value.items())
        else:
            checks.append(_equals(key, value))
    return _all(checks)


def _is_count(value: Any) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _count(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if not _is_count(value):
        raise BadRequest(f"{name} must be a non-negative integer")
    return value


def _parse_sort(value: Any) -> list[tuple[str, int]]:
    if value is None:
        return []
    if not isinstance(value, Mapping):
        raise BadRequest("$sort must be an object of field: 1 | -1")
    orders = []
    for field, direction in value.items():
        # "1" / "-1" are accepted like Feathers' own '.find + $sort + string' case.
        if isinstance(direction, bool) or direction not in (1, -1, "1", "-1"):
            raise BadRequest(f"$sort direction of '{field}' must be 1 or -1")
        orders.append((str(field), int(direction)))
    return orders


def _parse_select(value: Any) -> list[str] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(field, str) for field in value):
        raise BadRequest("$select must be a list of field names")
    return list(value)


def _parse_query(params: Params | None) -> _Query:
    if params is not None and not isinstance(params, Mapping):
        raise BadRequest("params must be an object")
    query = (params or {}).get("query") or {}
    if not isinstance(query, Mapping):
        raise BadRequest("params['query'] must be an object")
    conditions = {key: value for key, value in query.items() if key not in _FILTERS}
    return _Query(
        match=_compile(conditions),
        sort=_parse_sort(query.get("$sort")),
        skip=_count("$skip", query.get("$skip")) or 0,
        limit=_count("$limit", query.get("$limit")),
        select=_parse_select(query.get("$select")),
    )


def _compare(a: Any, b: Any) -> int:
    """Order two field values: ``None`` (or missing) first, values of unrelated types by type name."""
    if a is None or b is None:
        return (a is not None) - (b is not None)
    try:
        return -1 if a < b else 1 if b < a else 0
    except TypeError:
        return (type(a).__name__ > type(b).__name__) - (type(a).__name__ < type(b).__name__)


def _sort_key(field: str) -> Any:
    return functools.cmp_to_key(lambda a, b: _compare(a.get(field), b.get(field)))


def _check_paginate(value: Any, error: type[Exception]) -> Mapping[str, Any] | None:
    if not value:
        return None
    if not isinstance(value, Mapping):
        raise error("paginate must be False or {'default': int, 'max': int}")
    for key in ("default", "max"):
        if value.get(key) is not None and not _is_count(value[key]):
            raise error(f"paginate {key} must be a non-negative integer")
    return value


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
        self.paginate = _check_paginate(paginate, ValueError)
        if not isinstance(multi, bool):
            multi = frozenset([multi] if isinstance(multi, str) else multi)
        self.multi: bool | Collection[str] = multi
        self._lock = threading.RLock()
        self._next_id = start_id
        self._store: dict[Id, Item] = {
            key: {**copy.deepcopy(dict(item)), id_field: key} for key, item in (store or {}).items()
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
        query = _parse_query(params)
        paginate = self._paginate_option(params)
        limit = query.limit
        if paginate is not None:
            limit = (paginate.get("default") or None) if limit is None else limit
            if paginate.get("max") is not None:
                limit = paginate["max"] if limit is None else min(limit, paginate["max"])
        with self._lock:
            matches = [item for item in self._store.values() if query.match(item)]
            for field, direction in reversed(query.sort):  # stable sorts, least significant key first
                matches.sort(key=_sort_key(field), reverse=direction < 0)
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
        query = _parse_query(params)
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
        query = _parse_query(params)
        items = [copy.deepcopy(dict(entry)) for entry in batch]
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
        query = _parse_query(params)
        item = {**copy.deepcopy(dict(data)), self.id_field: id}
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
        query = _parse_query(params)
        # Copied once: stored items are never mutated in place, so they may share these values.
        changes = {key: copy.deepcopy(value) for key, value in data.items() if key != self.id_field}
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
        query = _parse_query(params)
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
            return _check_paginate(params["paginate"], BadRequest)
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

    def _get_item(self, id: Id, query: _Query) -> Item:
        """The stored item with ``id`` if it matches ``query`` (called with the lock held)."""
        try:
            item = self._store.get(id)
        except TypeError:  # an unhashable id names no item
            item = None
        if item is None or not query.match(item):
            raise NotFound(f"No record found for id '{id}'")
        return item

    def _targets(self, id: Id | None, query: _Query) -> list[tuple[Id, Item]]:
        """The ``(key, item)`` pairs a patch or remove works on (called with the lock held)."""
        if id is None:
            return [(key, item) for key, item in self._store.items() if query.match(item)]
        return [(id, self._get_item(id, query))]

    def _select(self, item: Item, fields: list[str] | None) -> Item:
        """A deep copy of ``item``, cut to ``fields`` (plus the id field) when ``$select`` names some."""
        if fields is not None:
            item = {key: value for key, value in item.items() if key in fields or key == self.id_field}
        return copy.deepcopy(item)
