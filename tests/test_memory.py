"""MemoryService: the scenarios of Feathers' shared adapter suite (``@feathersjs/adapter-tests``), ported.

The methods tests start from one stored person (Doug, 32); the query syntax tests from three (Bob 25, Doug 32,
Alice 19), as the Feathers suite does.
"""

from __future__ import annotations

import copy
import datetime as dt
import sys
import threading
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from celery_services.core.errors import BadRequest, MethodNotAllowed, NotFound
from celery_services.core.memory import MemoryService
from celery_services.core.service import Service

UNKNOWN_ID = "568225fbfe21222432e836ff"


@pytest.fixture
def service() -> MemoryService:
    return MemoryService()


@pytest.fixture
def doug(service: MemoryService) -> dict[str, Any]:
    return service.create({"name": "Doug", "age": 32})


@pytest.fixture
def people(service: MemoryService) -> dict[str, dict[str, Any]]:
    created = [
        service.create({"name": name, "age": age}) for name, age in (("Bob", 25), ("Doug", 32), ("Alice", 19))
    ]
    return {person["name"]: person for person in created}


def names(items: Any) -> list[str]:
    return [item["name"] for item in items]


def stored(service: MemoryService) -> list[dict[str, Any]]:
    result = service.find({"paginate": False})
    assert isinstance(result, list)
    return result


# --------------------------------------------------------------------------------------------------- basics


def test_is_a_service_and_mounts() -> None:
    service = MemoryService()
    assert isinstance(service, Service)
    app = object()
    service.setup(app, "people")
    assert service.app is app
    assert service.path == "people"


def test_method_signatures_use_feathers_argument_names(service: MemoryService, doug: dict[str, Any]) -> None:
    assert service.get(id=doug["id"], params=None)["name"] == "Doug"
    assert service.patch(id=doug["id"], data={"age": 1}, params={})["age"] == 1
    assert service.update(id=doug["id"], data={"name": "D"}, params={})["name"] == "D"
    assert service.create(data={"name": "E"}, params=None)["name"] == "E"
    assert service.remove(id=doug["id"], params={})["name"] == "D"
    assert service.find(params=None) == [{"id": 1, "name": "E"}]


# ------------------------------------------------------------------------------------------------------ get


def test_get(service: MemoryService, doug: dict[str, Any]) -> None:
    assert service.get(doug["id"]) == {"id": doug["id"], "name": "Doug", "age": 32}


def test_get_select(service: MemoryService, doug: dict[str, Any]) -> None:
    assert service.get(doug["id"], {"query": {"$select": ["name"]}}) == {"id": doug["id"], "name": "Doug"}


def test_get_id_query(service: MemoryService, doug: dict[str, Any]) -> None:
    with pytest.raises(NotFound):
        service.get(doug["id"], {"query": {"name": "Tester"}})
    assert service.get(doug["id"], {"query": {"name": "Doug"}})["age"] == 32


def test_get_not_found(service: MemoryService, doug: dict[str, Any]) -> None:
    with pytest.raises(NotFound) as caught:
        service.get(UNKNOWN_ID)
    assert caught.value.message == f"No record found for id '{UNKNOWN_ID}'"
    assert caught.value.code == 404


def test_get_id_query_id(service: MemoryService, doug: dict[str, Any]) -> None:
    alice = service.create({"name": "Alice", "age": 12})
    with pytest.raises(NotFound):
        service.get(doug["id"], {"query": {"id": alice["id"]}})


def test_get_does_not_coerce_the_id(service: MemoryService, doug: dict[str, Any]) -> None:
    with pytest.raises(NotFound, match="No record found for id '0'"):
        service.get(str(doug["id"]))
    with pytest.raises(NotFound):
        service.get([doug["id"]])


# ----------------------------------------------------------------------------------------------------- find


def test_find(service: MemoryService, doug: dict[str, Any]) -> None:
    assert service.find() == [doug]


def test_find_empty(service: MemoryService) -> None:
    assert service.find() == []
    assert service.find({"query": {}}) == []


# --------------------------------------------------------------------------------------------------- remove


def test_remove(service: MemoryService, doug: dict[str, Any]) -> None:
    assert service.remove(doug["id"]) == doug
    assert stored(service) == []
    with pytest.raises(NotFound):
        service.get(doug["id"])


def test_remove_select(service: MemoryService, doug: dict[str, Any]) -> None:
    assert service.remove(doug["id"], {"query": {"$select": ["name"]}}) == {"id": doug["id"], "name": "Doug"}
    assert stored(service) == []


def test_remove_id_query(service: MemoryService, doug: dict[str, Any]) -> None:
    with pytest.raises(NotFound):
        service.remove(doug["id"], {"query": {"name": "Tester"}})
    assert stored(service) == [doug]


def test_remove_not_found(service: MemoryService, doug: dict[str, Any]) -> None:
    with pytest.raises(NotFound, match=UNKNOWN_ID):
        service.remove(UNKNOWN_ID)
    assert stored(service) == [doug]


def test_remove_multi(service: MemoryService, doug: dict[str, Any]) -> None:
    with pytest.raises(MethodNotAllowed, match="Can not remove multiple entries"):
        service.remove(None)
    assert stored(service) == [doug]

    service.multi = frozenset({"remove"})
    service.create({"name": "Dave", "age": 29, "created": True})
    service.create({"name": "David", "age": 3, "created": True})
    removed = service.remove(None, {"query": {"created": True}})

    assert sorted(names(removed)) == ["Dave", "David"]
    assert stored(service) == [doug]


def test_remove_multi_without_query_removes_all(service: MemoryService, doug: dict[str, Any]) -> None:
    service.multi = True
    service.create({"name": "Dave"})
    assert names(service.remove(None)) == ["Doug", "Dave"]
    assert stored(service) == []


def test_remove_id_query_id(service: MemoryService, doug: dict[str, Any]) -> None:
    alice = service.create({"name": "Alice", "age": 12})
    with pytest.raises(NotFound):
        service.remove(doug["id"], {"query": {"id": alice["id"]}})
    assert len(stored(service)) == 2


# --------------------------------------------------------------------------------------------------- update


def test_update(service: MemoryService, doug: dict[str, Any]) -> None:
    data = {"id": doug["id"], "name": "Dougler"}
    original = copy.deepcopy(data)

    result = service.update(doug["id"], data)

    assert data == original, "the input is not modified"
    assert result == {"id": doug["id"], "name": "Dougler"}, "the whole item is replaced: no age"
    assert service.get(doug["id"]) == result


def test_update_keeps_the_id(service: MemoryService, doug: dict[str, Any]) -> None:
    result = service.update(doug["id"], {"id": 99, "name": "Dougler"})
    assert result["id"] == doug["id"]
    assert stored(service) == [result]


def test_update_select(service: MemoryService, doug: dict[str, Any]) -> None:
    result = service.update(doug["id"], {"name": "Dougler", "age": 10}, {"query": {"$select": ["name"]}})
    assert result == {"id": doug["id"], "name": "Dougler"}
    assert service.get(doug["id"])["age"] == 10


def test_update_id_query(service: MemoryService, doug: dict[str, Any]) -> None:
    with pytest.raises(NotFound):
        service.update(doug["id"], {"name": "Dougler"}, {"query": {"name": "Tester"}})
    assert service.get(doug["id"]) == doug


def test_update_not_found(service: MemoryService, doug: dict[str, Any]) -> None:
    with pytest.raises(NotFound, match=UNKNOWN_ID):
        service.update(UNKNOWN_ID, {"name": "NotFound"})
    assert stored(service) == [doug]


def test_update_query_not_found(service: MemoryService) -> None:
    dave = service.create({"name": "Dave"})
    with pytest.raises(NotFound):
        service.update(dave["id"], {"name": "UpdatedDave"}, {"query": {"name": "NotDave"}})
    assert stored(service) == [dave]


def test_update_id_query_id(service: MemoryService, doug: dict[str, Any]) -> None:
    alice = service.create({"name": "Alice", "age": 12})
    with pytest.raises(NotFound):
        service.update(doug["id"], {"name": "Dougler", "age": 33}, {"query": {"id": alice["id"]}})
    assert service.get(doug["id"]) == doug


def test_update_multiple_is_a_bad_request(service: MemoryService, doug: dict[str, Any]) -> None:
    service.multi = True
    with pytest.raises(BadRequest, match="Did you mean 'patch'"):
        service.update(None, {"name": "Everyone"})
    assert stored(service) == [doug]


# ---------------------------------------------------------------------------------------------------- patch


def test_patch(service: MemoryService, doug: dict[str, Any]) -> None:
    data = {"id": doug["id"], "name": "PatchDoug"}
    original = copy.deepcopy(data)

    result = service.patch(doug["id"], data)

    assert data == original, "the input is not modified"
    assert result == {"id": doug["id"], "name": "PatchDoug", "age": 32}, "the item is merged"
    assert service.get(doug["id"]) == result


def test_patch_never_changes_the_id(service: MemoryService, doug: dict[str, Any]) -> None:
    assert service.patch(doug["id"], {"id": 99, "age": 33}) == {"id": doug["id"], "name": "Doug", "age": 33}
    with pytest.raises(NotFound):
        service.get(99)


def test_patch_select(service: MemoryService, doug: dict[str, Any]) -> None:
    result = service.patch(doug["id"], {"name": "PatchDoug"}, {"query": {"$select": ["name"]}})
    assert result == {"id": doug["id"], "name": "PatchDoug"}
    assert service.get(doug["id"])["age"] == 32


def test_patch_id_query(service: MemoryService, doug: dict[str, Any]) -> None:
    with pytest.raises(NotFound):
        service.patch(doug["id"], {"name": "id patched doug"}, {"query": {"name": "Tester"}})
    assert service.get(doug["id"]) == doug


def test_patch_multiple(service: MemoryService, doug: dict[str, Any]) -> None:
    with pytest.raises(MethodNotAllowed, match="Can not patch multiple entries"):
        service.patch(None, {})
    service.create({"name": "Dave", "age": 29, "created": True})
    service.create({"name": "David", "age": 3, "created": True})

    service.multi = frozenset({"patch"})
    result = service.patch(None, {"age": 2}, {"query": {"created": True}})

    assert [(p["name"], p["age"]) for p in result] == [("Dave", 2), ("David", 2)]
    assert service.get(doug["id"])["age"] == 32, "items outside the query are untouched"


@pytest.mark.parametrize(
    ("query", "ages"),
    [({"age": {"$lt": 10}}, (8, 4)), ({"age": 10}, (10, 10))],
    ids=["query same", "query changed"],
)
def test_patch_multi_query(query: dict[str, Any], ages: tuple[int, int]) -> None:
    service = MemoryService(multi=True)
    service.create({"name": "Doug", "age": 32})
    for name, age in zip(("Dave", "David"), ages, strict=True):
        service.create({"name": name, "age": age, "created": True})

    result = service.patch(None, {"age": 2}, {"query": query})

    assert [(p["name"], p["age"]) for p in result] == [("Dave", 2), ("David", 2)]
    assert [p["age"] for p in stored(service)] == [32, 2, 2]


def test_patch_multi_select(service: MemoryService, doug: dict[str, Any]) -> None:
    service.multi = True
    assert service.patch(None, {"age": 1}, {"query": {"$select": ["age"]}}) == [{"id": doug["id"], "age": 1}]


def test_patch_not_found(service: MemoryService, doug: dict[str, Any]) -> None:
    with pytest.raises(NotFound, match=UNKNOWN_ID):
        service.patch(UNKNOWN_ID, {"name": "PatchDoug"})
    assert stored(service) == [doug]


def test_patch_query_not_found(service: MemoryService) -> None:
    dave = service.create({"name": "Dave"})
    with pytest.raises(NotFound):
        service.patch(dave["id"], {"name": "PatchedDave"}, {"query": {"name": "NotDave"}})
    assert stored(service) == [dave]


def test_patch_id_query_id(service: MemoryService, doug: dict[str, Any]) -> None:
    alice = service.create({"name": "Alice", "age": 12})
    with pytest.raises(NotFound):
        service.patch(doug["id"], {"age": 33}, {"query": {"id": alice["id"]}})
    assert service.get(doug["id"]) == doug


# --------------------------------------------------------------------------------------------------- create


def test_create(service: MemoryService) -> None:
    data = {"name": "Bill", "age": 40, "tags": ["a"]}
    original = copy.deepcopy(data)

    result = service.create(data)

    assert data == original, "the input is not modified"
    assert result == {"name": "Bill", "age": 40, "tags": ["a"], "id": 0}
    assert stored(service) == [result]


def test_create_select(service: MemoryService) -> None:
    result = service.create({"name": "William", "age": 23}, {"query": {"$select": ["name"]}})
    assert result == {"id": 0, "name": "William"}
    assert service.get(0)["age"] == 23


def test_create_multi(service: MemoryService) -> None:
    with pytest.raises(MethodNotAllowed, match="Can not create multiple entries"):
        service.create([], {})
    assert stored(service) == []

    service.multi = frozenset({"create", "patch"})
    result = service.create([{"name": "Gerald", "age": 18}, {"name": "Herald", "age": 18}])

    assert result == [{"name": "Gerald", "age": 18, "id": 0}, {"name": "Herald", "age": 18, "id": 1}]
    assert stored(service) == result
    assert service.create([]) == []


def test_create_with_its_own_id(service: MemoryService) -> None:
    assert service.create({"id": "doug", "name": "Doug"}) == {"id": "doug", "name": "Doug"}
    assert service.get("doug")["name"] == "Doug"


def test_create_with_none_id_generates_one(service: MemoryService) -> None:
    assert service.create({"id": None, "name": "Doug"})["id"] == 0


def test_create_with_a_stored_id_replaces_the_item(service: MemoryService, doug: dict[str, Any]) -> None:
    service.create({"id": doug["id"], "name": "Other"})
    assert stored(service) == [{"id": doug["id"], "name": "Other"}]


def test_auto_ids_skip_ids_already_taken(service: MemoryService) -> None:
    service.create({"id": 1, "name": "One"})
    created = [service.create({"name": name}) for name in ("A", "B", "C")]
    assert [item["id"] for item in created] == [0, 2, 3]


@pytest.mark.parametrize("data", ["text", 5, None, [1, 2]])
def test_create_rejects_non_objects(data: Any) -> None:
    service = MemoryService(multi=True)
    with pytest.raises(BadRequest):
        service.create(data)
    assert stored(service) == []


def test_create_multi_is_all_or_nothing(service: MemoryService) -> None:
    service.multi = True
    with pytest.raises(BadRequest):
        service.create([{"name": "Fine"}, {"id": ["unhashable"]}])
    assert stored(service) == []


@pytest.mark.parametrize(
    "call",
    [
        lambda s: s.update(0, "text"),
        lambda s: s.patch(0, ["name", "x"]),
    ],
    ids=["update", "patch"],
)
def test_update_and_patch_reject_non_objects(service: MemoryService, doug: dict[str, Any], call: Any) -> None:
    with pytest.raises(BadRequest):
        call(service)
    assert stored(service) == [doug]


# ---------------------------------------------------------------------------------------------------- multi


@pytest.mark.parametrize(
    ("method", "call"),
    [
        ("create", lambda s: s.create([{"name": "X"}])),
        ("patch", lambda s: s.patch(None, {"x": 1})),
        ("remove", lambda s: s.remove(None)),
    ],
)
@pytest.mark.parametrize("multi", [False, True, ["create"], ["patch"], ["remove"], ("patch", "remove")])
def test_multi_option(method: str, call: Callable[[MemoryService], Any], multi: Any) -> None:
    service = MemoryService(multi=multi, store={7: {"name": "Seven"}})
    allowed = multi is True or (not isinstance(multi, bool) and method in multi)
    if allowed:
        assert isinstance(call(service), list)
    else:
        with pytest.raises(MethodNotAllowed, match=f"Can not {method} multiple entries"):
            call(service)
        assert stored(service) == [{"name": "Seven", "id": 7}]


def test_multi_as_one_method_name() -> None:
    service = MemoryService(multi="patch", store={1: {"name": "One"}})
    assert service.patch(None, {"age": 1}) == [{"name": "One", "id": 1, "age": 1}]
    with pytest.raises(MethodNotAllowed, match="Can not remove multiple entries"):
        service.remove(None)


# ---------------------------------------------------------------------------------------------- query syntax


def test_find_equal(service: MemoryService, people: dict[str, Any]) -> None:
    assert service.find({"query": {"name": "Alice"}}) == [people["Alice"]]


def test_find_equal_multiple(service: MemoryService, people: dict[str, Any]) -> None:
    assert service.find({"query": {"name": "Alice", "age": 20}}) == []
    assert names(service.find({"query": {"name": "Alice", "age": 19}})) == ["Alice"]


@pytest.mark.parametrize(
    ("query", "expected"),
    [
        pytest.param({"name": {"$in": ["Alice", "Bob"]}}, ["Alice", "Bob"], id="$in"),
        pytest.param({"name": {"$in": ("Alice",)}}, ["Alice"], id="$in tuple"),
        pytest.param({"name": {"$in": []}}, [], id="$in empty"),
        pytest.param({"name": {"$nin": ["Alice", "Bob"]}}, ["Doug"], id="$nin"),
        pytest.param({"age": {"$lt": 30}}, ["Alice", "Bob"], id="$lt"),
        pytest.param({"age": {"$lt": 25}}, ["Alice"], id="$lt excludes equal"),
        pytest.param({"age": {"$lte": 25}}, ["Alice", "Bob"], id="$lte"),
        pytest.param({"age": {"$gt": 30}}, ["Doug"], id="$gt"),
        pytest.param({"age": {"$gt": 25}}, ["Doug"], id="$gt excludes equal"),
        pytest.param({"age": {"$gte": 25}}, ["Bob", "Doug"], id="$gte"),
        pytest.param({"age": {"$ne": 25}}, ["Alice", "Doug"], id="$ne"),
        pytest.param({"age": {"$gt": 18, "$lt": 30}}, ["Alice", "Bob"], id="$gt + $lt + $sort"),
        pytest.param({"$or": [{"name": "Alice"}, {"name": "Bob"}]}, ["Alice", "Bob"], id="$or"),
        pytest.param(
            {"$or": [{"name": "Doug"}, {"age": {"$gte": 18, "$lt": 25}}]}, ["Alice", "Doug"], id="$or nested"
        ),
        pytest.param({"$and": [{"age": {"$gt": 18}}, {"age": {"$lt": 30}}]}, ["Alice", "Bob"], id="$and"),
        pytest.param({"$and": [{"name": "Bob"}, {"age": 19}]}, [], id="$and none"),
        pytest.param(
            {"age": {"$lt": 30}, "$or": [{"name": "Doug"}, {"name": "Bob"}]}, ["Bob"], id="field + $or"
        ),
        pytest.param(
            {"$or": [{"$and": [{"age": {"$gt": 20}}, {"age": {"$lt": 30}}]}, {"name": "Alice"}]},
            ["Alice", "Bob"],
            id="$and inside $or",
        ),
        pytest.param({"age": "25"}, [], id="no string coercion"),
        pytest.param({"age": {"$lt": "30"}}, [], id="no coercion in comparisons"),
        pytest.param({"nickname": None}, ["Alice", "Bob", "Doug"], id="missing field equals None"),
        pytest.param({"nickname": {"$gt": 1}}, [], id="missing field never compares"),
    ],
)
def test_find_operators(
    service: MemoryService, people: dict[str, Any], query: dict[str, Any], expected: list[str]
) -> None:
    assert names(service.find({"query": {**query, "$sort": {"name": 1}}})) == expected


#: Items with array fields (nested, empty, of objects, mixed), for the cases below.
ARRAY_ITEMS: list[dict[str, Any]] = [
    {"name": "a", "tags": ["x", "y"], "nums": [1, 5]},
    {"name": "b", "tags": ["z"], "nums": [10]},
    {"name": "c"},
    {"name": "d", "tags": [], "nums": []},
    {"name": "e", "tags": [["x"]], "nums": [[1]]},
    {"name": "f", "tags": "x", "nums": 3},
    {"name": "g", "tags": [None]},
    {"name": "h", "nums": [1, "a"]},
    {"name": "i", "tags": [{"k": 1}], "nums": ["1"]},
    {"name": "j", "tags": [["x", "y"]]},
    {"name": "k", "tags": ["y"], "nums": [1, 10]},
]


# What @feathersjs/memory 5.0.50 (sift 17) finds for each query among ARRAY_ITEMS: a condition on an array
# field holds for the array or any element, nested arrays included; $ne and $nin, for none of them; each
# operator of a field may hold by another element.
@pytest.mark.parametrize(
    ("query", "expected"),
    [
        ({"tags": "x"}, "aefj"),
        ({"tags": ["x", "y"]}, "aj"),
        ({"tags": ["y", "x"]}, ""),
        ({"tags": ["x"]}, "e"),
        ({"tags": []}, "d"),
        ({"tags": None}, "cgh"),
        ({"tags": {"k": 1}}, "i"),
        ({"tags": {"$in": ["x"]}}, "aefj"),
        ({"tags": {"$in": [["x", "y"]]}}, "aj"),
        ({"tags": {"$in": [None]}}, "cgh"),
        ({"tags": {"$nin": ["x"]}}, "bcdghik"),
        ({"tags": {"$nin": [["x", "y"]]}}, "bcdefghik"),
        ({"tags": {"$nin": []}}, "abcdefghijk"),
        ({"tags": {"$nin": [None]}}, "abdefijk"),
        ({"tags": {"$ne": "x"}}, "bcdghik"),
        ({"tags": {"$ne": ["x", "y"]}}, "bcdefghik"),
        ({"tags": {"$ne": None}}, "abdefijk"),
        ({"tags": {"$ne": []}}, "abcefghijk"),
        ({"nums": {"$gt": 4}}, "abk"),
        ({"nums": {"$lt": 2}}, "aehk"),
        ({"nums": {"$gte": 10}}, "bk"),
        ({"nums": {"$lte": 1}}, "aehk"),
        ({"nums": {"$gt": 4, "$lt": 6}}, "ak"),
        ({"nums": 1}, "aehk"),
        ({"nums": {"$in": [1, 3]}}, "aefhk"),
        ({"nums": {"$nin": [1, 3]}}, "bcdgij"),
        ({"tags": {"$gt": "w"}}, "abefjk"),
        ({"tags": {"$in": ["x"], "$nin": ["y"]}}, "ef"),
        ({"tags": {"$ne": "y", "$in": ["x", "z"]}}, "bef"),
        ({"$or": [{"tags": "x"}, {"tags": "z"}]}, "abefj"),
        ({"$and": [{"tags": "x"}, {"tags": "y"}]}, "aj"),
    ],
    ids=repr,
)
def test_find_on_array_fields_as_feathers(query: dict[str, Any], expected: str) -> None:
    service = MemoryService(store={n: item for n, item in enumerate(ARRAY_ITEMS)})
    assert "".join(names(service.find({"query": {**query, "$sort": {"name": 1}}}))) == expected


def test_a_tuple_value_is_an_array_too() -> None:
    service = MemoryService(store={0: {"name": "t", "tags": ("x", ("y",))}, 1: {"name": "u", "tags": "z"}})
    assert names(service.find({"query": {"tags": "y"}})) == ["t"]
    assert names(service.find({"query": {"tags": {"$nin": ["x"]}}})) == ["u"]


def test_find_sort(service: MemoryService, people: dict[str, Any]) -> None:
    assert names(service.find({"query": {"$sort": {"name": 1}}})) == ["Alice", "Bob", "Doug"]
    assert names(service.find({"query": {"$sort": {"name": -1}}})) == ["Doug", "Bob", "Alice"]
    assert names(service.find({"query": {"$sort": {"age": 1}}})) == ["Alice", "Bob", "Doug"]


@pytest.mark.parametrize(
    ("direction", "expected"), [("1", ["Alice", "Bob", "Doug"]), ("-1", ["Doug", "Bob", "Alice"])]
)
def test_find_sort_string(
    service: MemoryService, people: dict[str, Any], direction: str, expected: list[str]
) -> None:
    assert names(service.find({"query": {"$sort": {"name": direction}}})) == expected


def test_find_sort_multiple(service: MemoryService, people: dict[str, Any]) -> None:
    service.create({"name": "Eve", "age": 25})
    service.create({"name": "Ann", "age": 25})
    by_age_then_name = service.find({"query": {"$sort": {"age": 1, "name": -1}}})
    assert names(by_age_then_name) == ["Alice", "Eve", "Bob", "Ann", "Doug"]
    by_age_desc_then_name = service.find({"query": {"$sort": {"age": -1, "name": 1}}})
    assert names(by_age_desc_then_name) == ["Doug", "Ann", "Bob", "Eve", "Alice"]


def test_find_sort_missing_and_mixed_values(service: MemoryService, people: dict[str, Any]) -> None:
    service.create({"name": "Nobody"})
    service.create({"name": "Text", "age": "old"})
    assert names(service.find({"query": {"$sort": {"age": 1}}}))[:4] == ["Nobody", "Alice", "Bob", "Doug"]
    assert names(service.find({"query": {"$sort": {"age": -1}}}))[-4:] == ["Doug", "Bob", "Alice", "Nobody"]


def test_find_limit(service: MemoryService, people: dict[str, Any]) -> None:
    assert len(service.find({"query": {"$limit": 2}})) == 2
    assert names(service.find({"query": {"$limit": 2, "$sort": {"name": -1}}})) == ["Doug", "Bob"]


def test_find_limit_0(service: MemoryService, people: dict[str, Any]) -> None:
    assert service.find({"query": {"$limit": 0}}) == []


def test_find_skip(service: MemoryService, people: dict[str, Any]) -> None:
    assert names(service.find({"query": {"$sort": {"name": 1}, "$skip": 1}})) == ["Bob", "Doug"]
    assert names(service.find({"query": {"$sort": {"name": 1}, "$skip": 1, "$limit": 1}})) == ["Bob"]
    assert service.find({"query": {"$skip": 5}}) == []


def test_find_select(service: MemoryService, people: dict[str, Any]) -> None:
    alice = people["Alice"]
    assert service.find({"query": {"name": "Alice", "$select": ["name"]}}) == [
        {"id": alice["id"], "name": "Alice"}
    ]
    assert service.find({"query": {"name": "Alice", "$select": []}}) == [{"id": alice["id"]}]
    assert service.find({"query": {"name": "Alice", "$select": ["age", "nope"]}}) == [
        {"id": alice["id"], "age": 19}
    ]


@pytest.mark.parametrize(
    "query",
    [
        pytest.param({"$foo": 1}, id="unknown top-level operator"),
        pytest.param({"age": {"$foo": 1}}, id="unknown field operator"),
        pytest.param({"age": {"$gt": 1, "plain": 2}}, id="operator object with a plain key"),
        pytest.param({"$or": [{"$limit": 1}]}, id="filter inside $or"),
        pytest.param({"$or": {"name": "Bob"}}, id="$or not a list"),
        pytest.param({"$or": []}, id="$or empty"),  # Feathers (sift): "must be a nonempty array"
        pytest.param({"$and": []}, id="$and empty"),
        pytest.param({"$or": [{"name": "Bob"}, {"$and": []}]}, id="$and empty inside $or"),
        pytest.param({"$and": ["name"]}, id="$and of non-queries"),
        pytest.param({"age": {"$in": 25}}, id="$in not a list"),
        pytest.param({"age": {"$nin": "Bob"}}, id="$nin a string"),
        pytest.param({"$limit": -1}, id="$limit negative"),
        pytest.param({"$limit": "2"}, id="$limit string"),
        pytest.param({"$limit": True}, id="$limit bool"),
        pytest.param({"$skip": 1.5}, id="$skip float"),
        pytest.param({"$sort": {"name": 2}}, id="$sort direction"),
        pytest.param({"$sort": ["name"]}, id="$sort not an object"),
        pytest.param({"$select": "name"}, id="$select a string"),
        pytest.param({"$select": [1]}, id="$select of non-strings"),
    ],
)
def test_bad_queries(service: MemoryService, people: dict[str, Any], query: dict[str, Any]) -> None:
    with pytest.raises(BadRequest):
        service.find({"query": query})


@pytest.mark.parametrize("params", [["query"], "query=1"])
def test_params_must_be_an_object(service: MemoryService, doug: dict[str, Any], params: Any) -> None:
    with pytest.raises(BadRequest, match="params must be an object"):
        service.find(params)
    with pytest.raises(BadRequest):
        service.patch(doug["id"], {"age": 1}, params)
    assert stored(service) == [doug]


def test_unknown_operator_is_named(service: MemoryService) -> None:
    with pytest.raises(BadRequest, match=r"Invalid query parameter \$regex") as caught:
        service.find({"query": {"name": {"$regex": "^A"}}})
    assert caught.value.code == 400


@pytest.mark.parametrize(
    "call",
    [
        lambda s, p: s.get(0, p),
        lambda s, p: s.create({"name": "X"}, p),
        lambda s, p: s.update(0, {"name": "X"}, p),
        lambda s, p: s.patch(0, {"name": "X"}, p),
        lambda s, p: s.remove(0, p),
        lambda s, p: s.patch(None, {"name": "X"}, p),
        lambda s, p: s.remove(None, p),
    ],
    ids=["get", "create", "update", "patch", "remove", "patch multi", "remove multi"],
)
def test_every_method_rejects_bad_queries_without_changes(
    service: MemoryService, doug: dict[str, Any], call: Callable[..., Any]
) -> None:
    service.multi = True
    for params in ({"query": {"$nope": 1}}, {"query": "name=Doug"}, {"query": {"$select": "name"}}):
        with pytest.raises(BadRequest):
            call(service, params)
    assert stored(service) == [doug]


# -------------------------------------------------------------------------------------------------- paginate


@pytest.fixture
def paged(service: MemoryService, people: dict[str, Any]) -> MemoryService:
    service.paginate = {"default": 1, "max": 2}
    return service


def test_find_paginate(paged: MemoryService) -> None:
    page = paged.find({"query": {"$sort": {"name": -1}}})
    assert isinstance(page, dict)
    assert (page["total"], page["limit"], page["skip"], names(page["data"])) == (3, 1, 0, ["Doug"])


def test_find_paginate_query(paged: MemoryService) -> None:
    page = paged.find({"query": {"$sort": {"name": -1}, "name": "Doug"}})
    assert isinstance(page, dict)
    assert (page["total"], page["limit"], page["skip"], names(page["data"])) == (1, 1, 0, ["Doug"])


def test_find_paginate_total_counts_all_matches(paged: MemoryService) -> None:
    page = paged.find({"query": {"age": {"$lt": 30}, "$skip": 1}})
    assert isinstance(page, dict)
    assert (page["total"], page["limit"], page["skip"], len(page["data"])) == (2, 1, 1, 1)


def test_find_paginate_limit_skip(paged: MemoryService) -> None:
    page = paged.find({"query": {"$skip": 1, "$limit": 4, "$sort": {"name": -1}}})
    assert isinstance(page, dict)
    assert (page["total"], page["limit"], page["skip"], names(page["data"])) == (3, 2, 1, ["Bob", "Alice"])


def test_find_paginate_limit_0(paged: MemoryService) -> None:
    page = paged.find({"query": {"$limit": 0}})
    assert isinstance(page, dict)
    assert (page["total"], page["limit"], page["data"]) == (3, 0, [])


def test_find_paginate_params(paged: MemoryService) -> None:
    page = paged.find({"paginate": {"default": 3}})
    assert isinstance(page, dict)
    assert (page["limit"], page["skip"], len(page["data"])) == (3, 0, 3)

    results = paged.find({"paginate": False})
    assert isinstance(results, list)
    assert len(results) == 3
    assert len(paged.find({"paginate": False, "query": {"$limit": 5}})) == 3, "no max without paging"


def test_find_paginate_only_for_find(paged: MemoryService, people: dict[str, Any]) -> None:
    paged.multi = True
    assert len(paged.patch(None, {"seen": True})) == 3
    assert len(paged.remove(None)) == 3


def test_paginate_from_the_constructor() -> None:
    service = MemoryService(paginate={"default": 10, "max": 50}, multi=True)
    service.create([{"n": n} for n in range(60)])
    page = service.find()
    assert isinstance(page, dict)
    assert (page["total"], page["limit"], page["skip"], len(page["data"])) == (60, 10, 0, 10)
    page = service.find({"query": {"$limit": 100, "$skip": 5, "$sort": {"n": 1}}})
    assert isinstance(page, dict)
    assert (page["limit"], len(page["data"]), page["data"][0]["n"]) == (50, 50, 5)


def test_paginate_max_without_default_caps_a_list() -> None:
    service = MemoryService(paginate={"max": 2}, store={n: {"n": n} for n in range(5)})
    assert len(service.find()) == 2
    assert len(service.find({"query": {"$limit": 1}})) == 1


def test_no_paginate_returns_a_list(service: MemoryService, people: dict[str, Any]) -> None:
    result = service.find()
    assert isinstance(result, list)
    assert len(result) == 3


@pytest.mark.parametrize("paginate", [True, "yes", {"default": -1}, {"max": "2"}, {"default": True}])
def test_bad_paginate_params(service: MemoryService, paginate: Any) -> None:
    with pytest.raises(BadRequest):
        service.find({"paginate": paginate})


def test_bad_paginate_option() -> None:
    with pytest.raises(ValueError, match="paginate"):
        MemoryService(paginate={"default": -5})


# ----------------------------------------------------------------------------------------- id field and ids


def test_custom_id_field() -> None:
    service = MemoryService(id_field="_id", multi=True)
    doug = service.create({"name": "Doug", "age": 32})
    assert doug == {"name": "Doug", "age": 32, "_id": 0}
    assert "id" not in doug
    assert service.get(0, {"query": {"$select": ["name"]}}) == {"_id": 0, "name": "Doug"}
    assert service.update(0, {"name": "D"}) == {"name": "D", "_id": 0}
    assert service.patch(0, {"_id": 5, "age": 1}) == {"name": "D", "_id": 0, "age": 1}
    assert service.find({"query": {"_id": 0, "$select": []}}) == [{"_id": 0}]
    assert service.remove(None, {"query": {"$select": ["age"]}}) == [{"_id": 0, "age": 1}]


def test_custom_id_field_create_with_id() -> None:
    service = MemoryService(id_field="uuid")
    service.create({"uuid": "abc", "name": "A"})
    assert service.get("abc") == {"uuid": "abc", "name": "A"}


@pytest.mark.parametrize("start_id", [0, 1, 100, -3])
def test_start_id(start_id: int) -> None:
    service = MemoryService(start_id=start_id)
    ids = [service.create({"n": n})["id"] for n in range(3)]
    assert ids == [start_id, start_id + 1, start_id + 2]


def test_initial_store() -> None:
    initial = {
        1: {"name": "One", "tags": ["a"]},
        2: {"id": 2, "name": "Two"},
        "x": {"id": "wrong", "name": "X"},
    }
    original = copy.deepcopy(initial)
    service = MemoryService(store=initial)

    assert service.get(1) == {"name": "One", "tags": ["a"], "id": 1}
    assert service.get("x")["id"] == "x", "the key wins over a stale id field"
    assert service.create({"name": "New"})["id"] == 0
    assert service.create({"name": "Newer"})["id"] == 3, "auto ids skip the stored ones"

    service.patch(1, {"name": "Patched"})
    initial[2]["name"] = "Changed"
    assert initial[1] == original[1], "the given store is not mutated"
    assert service.get(2)["name"] == "Two", "the service does not share the given store"


# ------------------------------------------------------------------------------------------------- copies


def test_returned_items_are_copies(service: MemoryService) -> None:
    service.multi = True
    created = service.create({"name": "Doug", "tags": ["a"], "address": {"city": "Paris"}})
    returns = [
        created,
        service.get(0),
        service.find()[0],
        service.patch(0, {"age": 1}),
        service.patch(None, {"age": 2})[0],
        service.update(0, {"name": "Doug", "tags": ["a"], "address": {"city": "Paris"}, "age": 2}),
    ]
    for item in returns:
        item["name"] = "Mutated"
        item["tags"].append("b")
        item["address"]["city"] = "Rome"
    assert service.get(0) == {"name": "Doug", "tags": ["a"], "address": {"city": "Paris"}, "age": 2, "id": 0}


def test_values_of_any_type_are_copied(service: MemoryService) -> None:
    # Dicts and lists are copied by the service itself, anything else by copy.deepcopy.
    when = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    created = service.create({"when": when, "pair": ([1], 2), "set": {3}, "nested": [{"deep": [[4]]}]})
    created["pair"][0].append(9)
    created["set"].add(9)
    created["nested"][0]["deep"][0].append(9)
    got = service.get(0)
    assert got == {"when": when, "pair": ([1], 2), "set": {3}, "nested": [{"deep": [[4]]}], "id": 0}
    got["pair"][0].append(8)
    assert service.get(0)["pair"] == ([1], 2)


def test_input_data_is_copied(service: MemoryService) -> None:
    service.multi = True
    data = {"name": "Doug", "tags": ["a"]}
    many = [{"name": "Many", "tags": ["m"]}]
    changes = {"extra": {"deep": [1]}}
    service.create(data)
    service.create(many)
    service.patch(0, changes)
    replacement = {"name": "Dougler", "tags": ["r"]}
    service.update(1, replacement)

    data["tags"].append("b")
    many[0]["tags"].append("n")
    changes["extra"]["deep"].append(2)
    replacement["tags"].append("s")

    assert service.get(0) == {"name": "Doug", "tags": ["a"], "id": 0, "extra": {"deep": [1]}}
    assert service.get(1) == {"name": "Dougler", "tags": ["r"], "id": 1}


def test_multi_patch_values_are_not_shared_between_returned_items(service: MemoryService) -> None:
    service.multi = True
    service.create([{"n": 1}, {"n": 2}])
    first, second = service.patch(None, {"tags": ["x"]})
    first["tags"].append("y")
    assert second["tags"] == ["x"]
    assert [item["tags"] for item in stored(service)] == [["x"], ["x"]]


def test_removed_item_is_a_copy(service: MemoryService, doug: dict[str, Any]) -> None:
    service.create({"name": "Other"})
    removed = service.remove(doug["id"])
    removed["name"] = "Mutated"
    assert names(stored(service)) == ["Other"]


# ---------------------------------------------------------------------------------------------- concurrency


@pytest.fixture
def fast_switching() -> Iterator[None]:
    """Make the interpreter switch threads very often, so unguarded read-modify-write races show up."""
    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(previous)


def run_threads(count: int, work: Callable[[int], None]) -> None:
    barrier = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(index: int) -> None:
        try:
            barrier.wait()
            work(index)
        except BaseException as error:  # report in the test thread
            errors.append(error)

    threads = [threading.Thread(target=run, args=(index,)) for index in range(count)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []


@pytest.mark.usefixtures("fast_switching")
def test_concurrent_creates_get_distinct_ids() -> None:
    service = MemoryService(start_id=1)
    created: list[list[Any]] = [[] for _ in range(8)]

    def work(index: int) -> None:
        for n in range(200):
            created[index].append(service.create({"thread": index, "n": n})["id"])

    run_threads(8, work)

    ids = [item_id for ids in created for item_id in ids]
    assert len(ids) == 1600
    assert set(ids) == set(range(1, 1601))
    assert len(stored(service)) == 1600
    for index in range(8):
        assert len(service.find({"query": {"thread": index}})) == 200


@pytest.mark.usefixtures("fast_switching")
def test_concurrent_patches_lose_no_field() -> None:
    service = MemoryService(store={1: {"name": "counter"}})

    def work(index: int) -> None:
        for n in range(200):
            service.patch(1, {f"t{index}": n})

    run_threads(8, work)

    assert service.get(1) == {"name": "counter", "id": 1, **{f"t{index}": 199 for index in range(8)}}


@pytest.mark.usefixtures("fast_switching")
def test_concurrent_multi_patches_are_atomic() -> None:
    service = MemoryService(multi=True, store={n: {"value": 0} for n in range(50)})
    snapshots: list[set[Any]] = []

    def work(index: int) -> None:
        for n in range(1, 41):
            if index % 2:
                service.patch(None, {"value": index * 1000 + n})
            else:
                snapshots.append({item["value"] for item in stored(service)})
        if index == 0:
            service.remove(None, {"query": {"id": {"$lt": 25}}})

    run_threads(8, work)

    assert len(snapshots) == 160
    assert [values for values in snapshots if len(values) != 1] == [], "a find saw a half-applied multi patch"
    assert sorted(item["id"] for item in stored(service)) == list(range(25, 50))
