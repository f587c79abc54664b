"""The query language of Feathers database adapters: conditions on items, and the filters of a query.

A query is ``params["query"]``::

    {"age": {"$gte": 18}, "$or": [{"name": "Alice"}, {"name": "Bob"}], "$sort": {"name": 1}, "$limit": 10}

Field conditions are equality, or an object of ``$in``, ``$nin``, ``$lt``, ``$lte``, ``$gt``, ``$gte`` and
``$ne``; ``$or`` and ``$and`` take non-empty lists of sub-queries; ``$limit``, ``$skip``, ``$sort`` and
``$select`` are top-level filters. Values are compared as given: turning query strings into numbers belongs to
the transport that parsed them. A missing field reads as ``None``. Any other ``$`` key is a
:class:`~.errors.BadRequest`.

On an array field, as in ``@feathersjs/memory`` (sift, Mongo's rule): a condition holds when it holds for the
array or for any element, the elements of nested arrays included (``{"tags": "x"}`` finds ``["x", "y"]``),
each operator of a field by any element; ``$ne`` and ``$nin`` hold when their opposite holds for none.

:func:`parse_query` validates a query into a :class:`Query` (the item predicate and the filters),
:func:`sort_key` orders items by one field, and :func:`check_paginate` validates the ``paginate`` option.
"""

from __future__ import annotations

import functools
import operator
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias, TypeGuard

from .errors import BadRequest

__all__ = ["Item", "Params", "Predicate", "Query", "check_paginate", "parse_query", "sort_key"]

Item: TypeAlias = dict[str, Any]
Params: TypeAlias = Mapping[str, Any]
Predicate: TypeAlias = Callable[[Item], bool]

_FILTERS = frozenset({"$limit", "$skip", "$sort", "$select"})
_LISTS = (list, tuple, set, frozenset)
#: The types of an array value: JSON's arrays arrive as lists, Python callers may store tuples. A set of
#: exact types: per scalar checked, ``isinstance`` with a tuple cost 40 ns (of 60), the set lookup 12.
_ARRAYS = frozenset({list, tuple})


def _is_in(value: Any, arg: Any) -> bool:
    return value in arg


#: Operators that hold when the value, or one element of an array value, passes the test.
_SOME: dict[str, Callable[[Any, Any], Any]] = {
    "$in": _is_in,
    "$lt": operator.lt,
    "$lte": operator.le,
    "$gt": operator.gt,
    "$gte": operator.ge,
}
#: Operators that hold when neither the value nor any element of an array value passes the test ($nin is
#: not $in, $ne not equal, across all of them).
_NONE: dict[str, Callable[[Any, Any], Any]] = {"$nin": _is_in, "$ne": operator.eq}


@dataclass(frozen=True)
class Query:
    """A validated ``params["query"]``: the item predicate and the filters."""

    match: Predicate
    sort: tuple[tuple[str, int], ...]
    skip: int
    limit: int | None
    select: tuple[str, ...] | None


def _anything(item: Item) -> bool:
    return True


#: The query of no condition and no filter: made once (a frozen dataclass costs a call 2 us to build).
_EVERYTHING = Query(match=_anything, sort=(), skip=0, limit=None, select=None)


def _all(checks: list[Predicate]) -> Predicate:
    # A query of one condition, or none (every get), is checked without a generator per item.
    if not checks:
        return _anything
    if len(checks) == 1:
        return checks[0]
    return lambda item: all(check(item) for check in checks)


def _any(checks: list[Predicate]) -> Predicate:
    return lambda item: any(check(item) for check in checks)


def _nested(values: Any) -> Iterator[Any]:
    """The values below an array as sift walks them: each element, a nested array's elements before it."""
    for value in values:
        if type(value) in _ARRAYS:
            yield from _nested(value)
        yield value


def _passes(test: Callable[[Any, Any], Any], value: Any, arg: Any) -> bool:
    try:
        return bool(test(value, arg))
    except TypeError:  # values of different types (or None) are not ordered: no match, as in sift
        return False


# A find runs a check per item, and most values are not arrays: each check tests the value itself inline
# first, and walks an array only when the value alone did not settle the answer.


def _equals(field: str, expected: Any) -> Predicate:
    def check(item: Item) -> bool:
        value = item.get(field)
        if value == expected:
            return True
        return type(value) in _ARRAYS and any(element == expected for element in _nested(value))

    return check


def _operator(field: str, name: str, arg: Any) -> Predicate:
    if name not in _SOME and name not in _NONE:
        raise BadRequest(f"Invalid query parameter {name}")
    if name in ("$in", "$nin"):
        if not isinstance(arg, _LISTS):
            raise BadRequest(f"{name} of '{field}' must be a list")
        arg = list(arg)
    if name in _NONE:
        found = _NONE[name]

        def check_none(item: Item) -> bool:
            value = item.get(field)
            if found(value, arg):  # equality and membership raise no TypeError
                return False
            return type(value) not in _ARRAYS or not any(found(v, arg) for v in _nested(value))

        return check_none
    test = _SOME[name]

    def check_some(item: Item) -> bool:
        value = item.get(field)
        try:
            if test(value, arg):
                return True
        except TypeError:  # values of different types (or None) are not ordered: no match, as in sift
            pass
        return type(value) in _ARRAYS and any(_passes(test, v, arg) for v in _nested(value))

    return check_some


def _compile(query: Mapping[str, Any]) -> Predicate:
    """Turn the conditions of a query (filters excluded) into a predicate, validating every operator."""
    checks: list[Predicate] = []
    for key, value in query.items():
        if key in ("$or", "$and"):
            # An empty one is refused as sift refuses it, not read as "nothing" or "everything".
            queries = value if isinstance(value, (list, tuple)) else ()
            if not queries or not all(isinstance(q, Mapping) for q in queries):
                raise BadRequest(f"{key} must be a non-empty list of queries")
            subs = [_compile(q) for q in queries]
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


def _parse_sort(value: Any) -> tuple[tuple[str, int], ...]:
    if value is None:
        return ()
    if not isinstance(value, Mapping):
        raise BadRequest("$sort must be an object of field: 1 | -1")
    orders = []
    for field, direction in value.items():
        # "1" / "-1" are accepted like Feathers' own '.find + $sort + string' case.
        if isinstance(direction, bool) or direction not in (1, -1, "1", "-1"):
            raise BadRequest(f"$sort direction of '{field}' must be 1 or -1")
        orders.append((str(field), int(direction)))
    return tuple(orders)


def _parse_select(value: Any) -> tuple[str, ...] | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)) or not all(isinstance(field, str) for field in value):
        raise BadRequest("$select must be a list of field names")
    return tuple(value)


def parse_query(params: Params | None) -> Query:
    """Validate ``params["query"]`` into its item predicate and its filters.

    Raises:
        BadRequest: ``params`` or the query is malformed (an unknown ``$`` key, a bad filter value ...).
    """
    if params is not None and not isinstance(params, Mapping):
        raise BadRequest("params must be an object")
    query = (params or {}).get("query") or {}
    if not isinstance(query, Mapping):
        raise BadRequest("params['query'] must be an object")
    if not query:  # most calls: a get or a find of everything
        return _EVERYTHING
    conditions = {key: value for key, value in query.items() if key not in _FILTERS}
    return Query(
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


def sort_key(field: str) -> Any:
    """A ``key=`` for sorting items by ``field`` (``None`` or missing first, unrelated types by type name)."""
    return functools.cmp_to_key(lambda a, b: _compare(a.get(field), b.get(field)))


def check_paginate(value: Any, error: type[Exception]) -> Mapping[str, Any] | None:
    """Validate a ``paginate`` option: ``None`` when it is falsy, else ``{"default": n, "max": m}``.

    Raises:
        error: ``value`` is not a mapping, or its ``default`` / ``max`` is not a non-negative integer.
    """
    if not value:
        return None
    if not isinstance(value, Mapping):
        raise error("paginate must be False or {'default': int, 'max': int}")
    for key in ("default", "max"):
        if value.get(key) is not None and not _is_count(value[key]):
            raise error(f"paginate {key} must be a non-negative integer")
    return value
