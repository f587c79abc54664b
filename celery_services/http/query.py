"""Query strings → the query language of Feathers database adapters (what ``params["query"]`` holds).

The bracket syntax is the one Feathers' REST transport reads (through ``qs``)::

    title=x&$limit=5                   {"title": "x", "$limit": 5}
    title[$in][]=a&title[$in][]=b      {"title": {"$in": ["a", "b"]}}
    $or[0][title]=a&$or[1][id]=2       {"$or": [{"title": "a"}, {"id": "2"}]}
    n[$gt]=3&$sort[n]=-1               {"n": {"$gt": 3}, "$sort": {"n": -1}}
    $select[]=id&$select[]=title       {"$select": ["id", "title"]}

Structure:

- ``a[b][c]=v`` nests objects; ``a[]=v`` appends to an array (``[]`` only as the last bracket);
  ``a[0]=v`` sets an array index: indexes order the array and gaps are closed, as in ``qs``
  (``a[3]=x&a[1]=y`` → ``["y", "x"]``). Objects inside arrays need indexes: ``$or[0][title]=a``.
- A repeated key collects its values in a list (``a=1&a=2`` → ``["1", "2"]``), as ``qs`` does.
- Malformed input is a :class:`~celery_services.core.errors.BadRequest` instead of a guess: unbalanced or
  trailing brackets, an empty name, a key used both as a value and as an object or array, an object key
  mixed with array indexes, the same array index twice, more than :data:`MAX_DEPTH` brackets, an index
  over :data:`MAX_INDEX`, more than :data:`MAX_PARAMS` parameters, invalid UTF-8 in percent escapes.

Types (``qs`` yields strings only; Feathers' adapters convert what they know the type of):

- ``$limit`` and ``$skip`` become non-negative ints, ``$sort[field]`` becomes ``1`` or ``-1``, and
  ``$select`` always becomes a list of names; anything else for them is a ``BadRequest``.
- Operator values (``$gt``, ``$gte``, ``$lt``, ``$lte``, ``$ne``, ``$in``, ``$nin``, and any other ``$``
  operator of a field) are *literals*: ``true``, ``false``, ``null``, integers (``-?(0|[1-9][0-9]*)``, at
  most 18 digits) and decimals (``-?(0|[1-9][0-9]*)\\.[0-9]+``) are converted, every other string is kept.
  A single ``$in`` / ``$nin`` value becomes a one-element list.
- Plain equality values (``title=x``, ``$or[0][id]=2``) stay strings, as Feathers' REST leaves them:
  ``"2024"`` may be a title. ``coerce="all"`` converts them like operator values too (handy for services
  without a schema, such as :class:`~celery_services.MemoryService` with integer ids: ``?id=2``), and
  ``coerce="none"`` converts nothing but the ``$limit`` / ``$skip`` / ``$sort`` / ``$select`` filters.
  Leading zeros (``007``), ``+1``, ``1e3``, ``NaN`` and ``Infinity`` always stay strings.

:func:`parse_id` applies the integer rule to the id of ``/articles/<id>``.

One piece, past 300 lines: one parser, whose limits and coercion rules are read together.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any, Literal, TypeAlias
from urllib.parse import parse_qsl

from ..core.errors import BadRequest

__all__ = ["MAX_DEPTH", "MAX_INDEX", "MAX_PARAMS", "Coerce", "literal", "parse_id", "parse_query"]

#: How values outside the ``$limit`` / ``$skip`` / ``$sort`` / ``$select`` filters are converted.
Coerce: TypeAlias = Literal["operators", "all", "none"]

#: Most brackets after a name (``a[b][c]`` has 2).
MAX_DEPTH = 8
#: Largest array index accepted (``a[100]``).
MAX_INDEX = 100
#: Most ``name=value`` pairs in one query string.
MAX_PARAMS = 1000

_INT = re.compile(r"-?(?:0|[1-9][0-9]{0,17})")
_DECIMAL = re.compile(r"-?(?:0|[1-9][0-9]{0,17})\.[0-9]{1,17}")
_INDEX = re.compile(r"0|[1-9][0-9]*")
_KEY = re.compile(r"([^\[\]]+)((?:\[[^\[\]]*\])*)")
_BRACKET = re.compile(r"\[([^\[\]]*)\]")
_LITERALS: dict[str, Any] = {"true": True, "false": False, "null": None}
_FILTERS = frozenset({"$limit", "$skip", "$sort", "$select"})
_LOGICAL = frozenset({"$or", "$and"})
_LIST_OPERATORS = frozenset({"$in", "$nin"})


def literal(text: str) -> Any:
    """``text`` as a literal when it is one (``true``, ``false``, ``null``, a number), else unchanged."""
    if text in _LITERALS:
        return _LITERALS[text]
    if _INT.fullmatch(text):
        return int(text)
    if _DECIMAL.fullmatch(text):
        return float(text)
    return text


def parse_id(text: str) -> int | str:
    """The id of ``/path/<id>``: an integer string (no leading zero, at most 18 digits) becomes an int."""
    return int(text) if _INT.fullmatch(text) else text


class _Array:
    """An array under construction: index → value (``[]`` appends after the largest index)."""

    __slots__ = ("items",)

    def __init__(self) -> None:
        self.items: dict[int, Any] = {}


class _Object(dict[str, Any]):
    """An object under construction."""


_Node: TypeAlias = "dict[str, Any] | _Array"


def _segments(name: str) -> list[str]:
    """``title[$in][]`` → ``["title", "$in", ""]``."""
    match = _KEY.fullmatch(name)
    if match is None:
        raise BadRequest(f"Malformed query parameter name '{name}'", {"parameter": name})
    head, brackets = match.groups()
    segments = [head, *_BRACKET.findall(brackets)]
    if len(segments) - 1 > MAX_DEPTH:
        raise BadRequest(f"Query parameter '{name}' nests deeper than {MAX_DEPTH}", {"parameter": name})
    if "" in segments[1:-1]:
        raise BadRequest(
            f"Query parameter '{name}': '[]' appends a value and must come last (index objects: a[0][b])",
            {"parameter": name},
        )
    return segments


def _index(name: str, segment: str) -> int | None:
    """The array index a bracket segment names (``None`` for ``[]``), or -1 for an object key."""
    if segment == "":
        return None
    if _INDEX.fullmatch(segment):
        index = int(segment)
        if index > MAX_INDEX:
            raise BadRequest(f"Query parameter '{name}': array index over {MAX_INDEX}", {"parameter": name})
        return index
    return -1


def _conflict(name: str) -> BadRequest:
    return BadRequest(
        f"Query parameter '{name}' mixes a value, an object and an array at the same place",
        {"parameter": name},
    )


def _child(
    node: _Node, name: str, segment: str, make: type[dict[str, Any]] | type[_Array], *, head: bool
) -> Any:
    """The container at ``segment`` of ``node``, created as ``make`` when missing."""
    index = -1 if head else _index(name, segment)
    if isinstance(node, _Array):
        if index is None or index < 0:
            raise _conflict(name)
        existing = node.items.get(index)
        if existing is None:
            existing = node.items[index] = make()
        if not isinstance(existing, make):
            raise _conflict(name)
        return existing
    if index is not None and index >= 0:
        raise _conflict(name)
    existing = node.get(segment)
    if existing is None:
        existing = node[segment] = make()
    if not isinstance(existing, make):
        raise _conflict(name)
    return existing


def _set(node: _Node, name: str, segment: str, value: str, *, head: bool) -> None:
    """Store the leaf ``value`` at ``segment`` of ``node`` (a repeated object key collects a list)."""
    index = -1 if head else _index(name, segment)
    if isinstance(node, _Array):
        if index is not None and index < 0:
            raise _conflict(name)
        if index is None:
            index = max(node.items, default=-1) + 1
        elif index in node.items:
            raise BadRequest(f"Query parameter '{name}' is given twice", {"parameter": name})
        node.items[index] = value
        return
    if index is not None and index >= 0:
        raise _conflict(name)
    if segment not in node:
        node[segment] = value
        return
    existing = node[segment]
    if isinstance(existing, str):
        node[segment] = [existing, value]
    elif isinstance(existing, list):
        existing.append(value)
    else:
        raise _conflict(name)


def _build(pairs: Iterable[tuple[str, str]]) -> dict[str, Any]:
    root: dict[str, Any] = {}
    for name, value in pairs:
        segments = _segments(name)
        node: _Node = root
        for position, segment in enumerate(segments[:-1]):
            following = segments[position + 1]
            make: type[dict[str, Any]] | type[_Array] = _Object if _index(name, following) == -1 else _Array
            node = _child(node, name, segment, make, head=position == 0)
        _set(node, name, segments[-1], value, head=len(segments) == 1)
    finished: dict[str, Any] = _finish(root)
    return finished


def _finish(node: Any) -> Any:
    """Turn the build tree into plain dicts and lists (array gaps closed, in index order)."""
    if isinstance(node, _Array):
        return [_finish(node.items[index]) for index in sorted(node.items)]
    if isinstance(node, dict):
        return {key: _finish(value) for key, value in node.items()}
    return node


def _count(name: str, value: Any) -> int:
    if isinstance(value, str) and _INDEX.fullmatch(value) and len(value) <= 18:
        return int(value)
    raise BadRequest(f"{name} must be a non-negative integer", {"parameter": name, "value": value})


def _sort(value: Any) -> dict[str, int]:
    if not isinstance(value, dict):
        raise BadRequest("$sort must be given as $sort[field]=1 or $sort[field]=-1", {"parameter": "$sort"})
    orders: dict[str, int] = {}
    for field, direction in value.items():
        if direction not in ("1", "-1"):
            raise BadRequest(
                f"$sort direction of '{field}' must be 1 or -1", {"parameter": f"$sort[{field}]"}
            )
        orders[field] = int(direction)
    return orders


def _select(value: Any) -> list[str]:
    names = [value] if isinstance(value, str) else value
    if not isinstance(names, list) or not all(isinstance(name, str) for name in names):
        raise BadRequest("$select must be a list of field names ($select[]=a&$select[]=b)")
    return list(names)


def _literals(value: Any) -> Any:
    """Convert every string inside ``value`` with :func:`literal`."""
    if isinstance(value, str):
        return literal(value)
    if isinstance(value, list):
        return [_literals(item) for item in value]
    if isinstance(value, dict):
        return {key: _literals(item) for key, item in value.items()}
    return value


def _condition(value: Any, coerce: Coerce) -> Any:
    """A field's condition: an object of ``$`` operators, or a value compared for equality."""
    if isinstance(value, dict) and any(key.startswith("$") for key in value):
        operators: dict[str, Any] = {}
        for operator, argument in value.items():
            if coerce != "none":
                argument = _literals(argument)
            if operator in _LIST_OPERATORS and not isinstance(argument, list):
                argument = [argument]
            operators[operator] = argument
        return operators
    return _literals(value) if coerce == "all" else value


def _conditions(query: dict[str, Any], coerce: Coerce) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in query.items():
        if key in _LOGICAL:
            if not isinstance(value, list) or not all(isinstance(sub, dict) for sub in value):
                raise BadRequest(
                    f"{key} must be a list of queries: {key}[0][field]=value", {"parameter": key}
                )
            out[key] = [_conditions(sub, coerce) for sub in value]
        elif key in _FILTERS:
            raise BadRequest(f"{key} is only allowed at the top level of the query", {"parameter": key})
        else:
            out[key] = _condition(value, coerce)
    return out


def parse_query(text: str | bytes, *, coerce: Coerce = "operators") -> dict[str, Any]:
    """Parse a URL query string into a query of the Feathers adapter language.

    Args:
        text: the query string, without the ``?`` (``request.url.query``); bytes are read as UTF-8.
        coerce: which values besides the filters become literals: ``"operators"`` (the values of ``$``
            operators), ``"all"`` (also plain equality values) or ``"none"``. See the module docstring.

    Returns:
        The query, e.g. ``{"title": {"$in": ["a", "b"]}, "$limit": 5}``.

    Raises:
        BadRequest: the query string is malformed, or ``$limit`` / ``$skip`` / ``$sort`` / ``$select``
            are not what they must be.
    """
    try:
        raw = text.decode("utf-8") if isinstance(text, bytes) else text
        pairs = parse_qsl(raw, keep_blank_values=True, errors="strict", max_num_fields=MAX_PARAMS)
    except UnicodeDecodeError:
        raise BadRequest("The query string is not valid UTF-8") from None
    except ValueError:
        raise BadRequest(f"The query string has more than {MAX_PARAMS} parameters") from None
    tree = _build(pairs)
    query: dict[str, Any] = {}
    for key in ("$limit", "$skip"):
        if key in tree:
            query[key] = _count(key, tree.pop(key))
    if "$sort" in tree:
        query["$sort"] = _sort(tree.pop("$sort"))
    if "$select" in tree:
        query["$select"] = _select(tree.pop("$select"))
    return {**_conditions(tree, coerce), **query}
