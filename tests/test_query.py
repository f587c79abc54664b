"""The query-string parser: bracket syntax, arrays, operators, conversions, and malformed input."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import pytest

from celery_services import BadRequest, MemoryService
from celery_services.http.query import MAX_DEPTH, MAX_INDEX, MAX_PARAMS, literal, parse_id, parse_query


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("", {}),
        ("title=x", {"title": "x"}),
        ("title=x&$limit=5", {"title": "x", "$limit": 5}),
        ("title=hello+world%21", {"title": "hello world!"}),
        ("title=", {"title": ""}),
        ("flag", {"flag": ""}),
        ("a=1&&b=2", {"a": "1", "b": "2"}),
        ("caf%C3%A9=th%C3%A9", {"café": "thé"}),
        ("0=x", {"0": "x"}),  # a numeric name is a field name, not an index
        # arrays
        ("title[$in][]=a&title[$in][]=b", {"title": {"$in": ["a", "b"]}}),
        ("tags[]=a", {"tags": ["a"]}),
        ("tags[1]=b&tags[0]=a", {"tags": ["a", "b"]}),
        ("tags[3]=x&tags[1]=y", {"tags": ["y", "x"]}),  # ordered by index, gaps closed (qs)
        ("tags[0]=a&tags[]=b", {"tags": ["a", "b"]}),
        ("%24select%5B%5D=id", {"$select": ["id"]}),  # percent-encoded brackets
        # objects and nesting
        ("address[city]=Paris&address[zip]=75001", {"address": {"city": "Paris", "zip": "75001"}}),
        ("a[b][c]=1&a[b][d]=2", {"a": {"b": {"c": "1", "d": "2"}}}),
        ("$or[0][title]=a&$or[1][id]=2", {"$or": [{"title": "a"}, {"id": "2"}]}),
        (
            "$and[0][n][$gt]=1&$and[1][$or][0][t]=x&$and[1][$or][1][t]=y",
            {"$and": [{"n": {"$gt": 1}}, {"$or": [{"t": "x"}, {"t": "y"}]}]},
        ),
        ("n[$gt]=3&n[$lte]=10", {"n": {"$gt": 3, "$lte": 10}}),
        # repeated keys collect their values, as qs does
        ("a=1&a=2&a=3", {"a": ["1", "2", "3"]}),
        ("a[b]=1&a[b]=2", {"a": {"b": ["1", "2"]}}),
        # filters
        ("$limit=0&$skip=20", {"$limit": 0, "$skip": 20}),
        ("$sort[title]=1&$sort[id]=-1", {"$sort": {"title": 1, "id": -1}}),
        ("$select[]=id&$select[]=title", {"$select": ["id", "title"]}),
        ("$select=id", {"$select": ["id"]}),
        ("$select=id&$select=title", {"$select": ["id", "title"]}),
        ("$select[0]=id", {"$select": ["id"]}),
    ],
)
def test_structure(text: str, expected: dict[str, Any]) -> None:
    assert parse_query(text) == expected


def test_bytes_are_read_as_utf8() -> None:
    assert parse_query(b"t=%C3%A9") == {"t": "é"}
    assert parse_query(b"t=x&$limit=2") == {"t": "x", "$limit": 2}


def test_filter_order_kept_and_filters_last() -> None:
    assert list(parse_query("$limit=1&b=2&a=1")) == ["b", "a", "$limit"]
    assert list(parse_query("$sort[b]=1&$sort[a]=-1")["$sort"]) == ["b", "a"]


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("3", 3),
        ("-3", -3),
        ("0", 0),
        ("1.5", 1.5),
        ("-0.25", -0.25),
        ("true", True),
        ("false", False),
        ("null", None),
        ("007", "007"),  # leading zeros: a code, not a number
        ("+1", "+1"),
        ("1e3", "1e3"),
        ("1.", "1."),
        (".5", ".5"),
        ("NaN", "NaN"),
        ("Infinity", "Infinity"),
        ("True", "True"),
        ("", ""),
        ("12345678901234567890", "12345678901234567890"),  # over 18 digits stays a string
        ("123456789012345678", 123456789012345678),
        ("x", "x"),
    ],
)
def test_operator_values_are_literals(text: str, value: Any) -> None:
    assert literal(text) == value and type(literal(text)) is type(value)
    assert parse_query(f"n[$gt]={quote(text)}")["n"]["$gt"] == value


def test_every_operator_converts_its_values_and_lists_wrap_single_values() -> None:
    query = parse_query(
        "a[$lt]=1&a[$lte]=2&a[$gte]=0&b[$ne]=null&c[$in][]=1&c[$in][]=two&d[$nin]=true&e[$in]=x"
    )
    assert query == {
        "a": {"$lt": 1, "$lte": 2, "$gte": 0},
        "b": {"$ne": None},
        "c": {"$in": [1, "two"]},
        "d": {"$nin": [True]},
        "e": {"$in": ["x"]},
    }


def test_equality_values_stay_strings_by_default() -> None:
    query = parse_query("id=2&title=2024&ok=true&none=null&$or[0][id]=2&address[zip]=75001")
    assert query == {
        "id": "2",
        "title": "2024",
        "ok": "true",
        "none": "null",
        "$or": [{"id": "2"}],
        "address": {"zip": "75001"},
    }


def test_coerce_all_converts_equality_values_too() -> None:
    query = parse_query("id=2&ok=true&zip=007&tags[]=1&$or[0][id]=3&n[$gt]=1", coerce="all")
    assert query == {"id": 2, "ok": True, "zip": "007", "tags": [1], "$or": [{"id": 3}], "n": {"$gt": 1}}


def test_coerce_none_converts_only_the_filters() -> None:
    query = parse_query("id=2&n[$gt]=1&n[$in]=1&$limit=2&$sort[n]=-1", coerce="none")
    assert query == {"id": "2", "n": {"$gt": "1", "$in": ["1"]}, "$limit": 2, "$sort": {"n": -1}}


def test_parse_id() -> None:
    assert parse_id("1") == 1
    assert parse_id("-4") == -4
    assert parse_id("0") == 0
    assert parse_id("007") == "007"
    assert parse_id("1.5") == "1.5"
    assert parse_id("abc") == "abc"
    assert parse_id("true") == "true"  # only integers become ints
    assert parse_id("9" * 19) == "9" * 19


def test_parsed_queries_work_on_memory_service() -> None:
    service = MemoryService(store={i: {"n": i, "title": f"t{i % 2}"} for i in range(10)})
    query = parse_query("n[$gte]=2&n[$lt]=8&title[$in][]=t0&$sort[n]=-1&$limit=2&$skip=1&$select[]=n")
    assert service.find({"query": query}) == [{"id": 4, "n": 4}, {"id": 2, "n": 2}]
    either = parse_query("$or[0][n]=1&$or[1][n]=3", coerce="all")
    assert [item["n"] for item in service.find({"query": either})] == [1, 3]


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("a[b=1", "Malformed"),
        ("a]=1", "Malformed"),
        ("a[b]c=1", "Malformed"),
        ("[a]=1", "Malformed"),
        ("=1", "Malformed"),
        ("a[[b]]=1", "Malformed"),
        ("a[][b]=1", "must come last"),
        ("a=1&a[b]=2", "mixes"),
        ("a[b]=2&a=1", "mixes"),
        ("a[]=1&a=2", "mixes"),
        ("a[b]=1&a[]=2", "mixes"),
        ("a[0]=1&a[b]=2", "mixes"),
        ("a[b]=1&a[0]=2", "mixes"),
        ("a[0]=1&a[0]=2", "twice"),
        ("a[0][b]=1&a[0]=2", "twice"),
        (f"a[{MAX_INDEX + 1}]=1", "index"),
        ("a" + "[b]" * (MAX_DEPTH + 1) + "=1", "deeper"),
        ("t=%FF", "UTF-8"),
        ("&".join(f"k{i}=1" for i in range(MAX_PARAMS + 1)), "parameters"),
        ("$limit=x", "$limit"),
        ("$limit=-1", "$limit"),
        ("$limit=1.5", "$limit"),
        ("$limit=1&$limit=2", "$limit"),
        ("$limit[a]=1", "$limit"),
        ("$skip=", "$skip"),
        ("$skip=" + "9" * 19, "$skip"),
        ("$sort=title", "$sort"),
        ("$sort[title]=up", "$sort"),
        ("$sort[title]=2", "$sort"),
        ("$sort[title][x]=1", "$sort"),
        ("$select[a]=b", "$select"),
        ("$or=a", "$or"),
        ("$or[title]=a", "$or"),
        ("$and[0]=a", "$and"),
        ("$or[0][$limit]=1", "top level"),
    ],
)
def test_malformed_input_is_bad_request(text: str, fragment: str) -> None:
    with pytest.raises(BadRequest) as error:
        parse_query(text)
    assert fragment in error.value.message
    assert error.value.code == 400


def test_limits_are_inclusive() -> None:
    assert parse_query(f"a[{MAX_INDEX}]=1") == {"a": ["1"]}
    assert parse_query("a" + "[b]" * MAX_DEPTH + "=1")
    assert len(parse_query("&".join(f"k{i}=1" for i in range(MAX_PARAMS)))) == MAX_PARAMS
