from typing import Any

import pytest

from celery_services import App, MethodNotAllowed, NotFound, Service
from celery_services.core.errors import BadRequest, Conflict
from celery_services.core.service import method_attribute


class Articles(Service):
    def __init__(self) -> None:
        self.items: dict[int, dict[str, Any]] = {}

    def get(self, id: Any, params: dict[str, Any]) -> dict[str, Any]:
        if id not in self.items:
            raise NotFound(f"No record found for id '{id}'")
        return self.items[id]

    def create(self, data: Any, params: dict[str, Any]) -> Any:
        if isinstance(data, list):
            return [self.create(item, params) for item in data]
        item = {"id": len(self.items) + 1, **data}
        self.items[item["id"]] = item
        return item

    def remove(self, id: Any, params: dict[str, Any]) -> Any:
        return self.items.pop(id)

    def publish_article(self, data: Any, params: dict[str, Any]) -> Any:
        self.emit("article_published", {"id": data["id"]})
        return {"published": data["id"], "params": params}


def test_use_service_unuse_and_app_events() -> None:
    app = App()
    seen: list[tuple[str, str]] = []
    app.on("service", lambda svc: seen.append(("service", svc.path)))
    app.on("service-removed", lambda svc: seen.append(("removed", svc.path)))
    raw = Articles()
    wrapper = app.use("/articles/", raw)
    assert wrapper.path == "articles"
    assert app.service("articles") is wrapper
    assert app.service("/articles") is wrapper
    assert dict(app.services) == {"articles": wrapper}
    with pytest.raises(TypeError):
        app.services["x"] = wrapper  # type: ignore[index]
    assert app.unuse("articles") is raw
    assert seen == [("service", "articles"), ("removed", "articles")]
    with pytest.raises(NotFound, match="articles"):
        app.service("articles")
    with pytest.raises(NotFound):
        app.unuse("articles")


@pytest.mark.parametrize("path", ["", "a//b", "a b", "é", "a/../b", "a.b"])
def test_invalid_paths_are_refused(path: str) -> None:
    with pytest.raises(ValueError, match="invalid service path"):
        App().use(path, Articles())


def test_nested_path_and_conflict() -> None:
    app = App()
    app.use("api/v1/articles", Articles())
    assert app.service("api/v1/articles").path == "api/v1/articles"
    with pytest.raises(Conflict):
        app.use("api/v1/articles", Articles())


def test_setup_is_called_and_once_off() -> None:
    app = App()
    raw = Articles()
    calls: list[str] = []

    def listener(svc: Any) -> None:
        calls.append(svc.path)

    app.once("service", listener)
    app.use("a", raw)
    app.use("b", Articles())
    assert calls == ["a"]
    assert raw.app is app and raw.path == "a"
    app.on("service", listener)
    app.off("service", listener)
    app.use("c", Articles())
    assert calls == ["a"]
    assert app.emit("custom", 1) is False

    class Owner:
        def __init__(self) -> None:
            self.seen: list[str] = []

        def listener(self, svc: Any) -> None:
            self.seen.append(svc.path)

    owner = Owner()
    app.on("service", owner.listener)
    app.off("service", owner.listener)  # another bound-method object, equal to the first
    app.use("d", Articles())
    assert owner.seen == []


def test_missing_method_is_method_not_allowed_never_attribute_error() -> None:
    app = App()
    svc = app.use("articles", Articles())
    with pytest.raises(MethodNotAllowed):
        svc.find()
    with pytest.raises(MethodNotAllowed):
        svc.update(1, {})
    with pytest.raises(MethodNotAllowed):
        svc.nothing_here({})
    with pytest.raises(MethodNotAllowed):
        svc.call("publish_article", data={"id": 1})  # not listed at use()
    assert svc.methods == ("get", "create", "remove")


def test_custom_methods_and_events_must_be_declared_correctly() -> None:
    app = App()
    with pytest.raises(ValueError, match="no method 'archive'"):
        app.use("a", Articles(), methods=["archive"])
    with pytest.raises(ValueError, match="invalid method name"):
        app.use("b", Articles(), methods=["publish.article"])
    with pytest.raises(ValueError, match="invalid event name"):
        app.use("c", Articles(), events=["article published"])
    # The seed's names: publish-article is served by publish_article.
    assert app.use("d", Articles(), methods=["publish-article"], events=["article-published"]).methods[
        -1
    ] == ("publish-article")


@pytest.mark.parametrize(
    "name", ["publish", "hooks", "on", "emit", "call", "off", "watch", "is-async", "custom_methods", "setup"]
)
def test_custom_method_named_like_a_wrapper_attribute_is_refused(name: str) -> None:
    # wrapper.publish(data) would run ServiceWrapper.publish (data became the publish filter) while
    # call("publish") ran the service's: Feathers refuses such names at use() too.
    app = App()
    service = Articles()
    setattr(service, method_attribute(name), lambda data, params: {"ran": data})
    with pytest.raises(ValueError, match=f"'{name}' on service 'articles' is not allowed as a custom method"):
        app.use("articles", service, methods=["get", name])
    assert "articles" not in app.services


def test_every_public_field_of_a_wrapper_is_a_name_no_custom_method_takes() -> None:
    # The fields are listed by hand beside the wrapper's methods (settings check names without a wrapper):
    # one added to the wrapper and not to that list would let a method be hidden by it.
    from celery_services.core.service import shadowed

    wrapper = App().use("articles", Articles())
    fields = [name for name in vars(wrapper) if not name.startswith("_")]
    assert fields and all(shadowed(name) for name in fields), fields


def test_custom_method_and_custom_event() -> None:
    app = App()
    svc = app.use("articles", Articles(), methods=["publish_article"], events=["article_published"])
    got: list[Any] = []
    svc.on("article_published", lambda data, ctx: got.append(data))
    result = svc.publish_article({"id": 3}, {"provider": "rest"})
    assert result["published"] == 3
    assert result["params"] == {"provider": "rest"}
    assert got == [{"id": 3}]
    assert svc.methods == ("get", "create", "remove", "publish_article")
    assert svc.events == ("created", "removed", "article_published")


def test_events_after_success_one_per_item() -> None:
    app = App()
    svc = app.use("articles", Articles())
    created: list[Any] = []
    removed: list[Any] = []
    svc.on("created", lambda data, ctx: created.append((data["title"], ctx.method)))
    svc.on("removed", lambda data, ctx: removed.append(data["id"]))
    svc.create({"title": "one"})
    svc.create([{"title": "two"}, {"title": "three"}])
    svc.remove(1)
    assert created == [("one", "create"), ("two", "create"), ("three", "create")]
    assert removed == [1]
    with pytest.raises(NotFound):
        svc.get(99)


def test_no_event_on_failure_and_none_event_suppresses() -> None:
    app = App()
    svc = app.use("articles", Articles())
    created: list[Any] = []
    svc.on("created", lambda data, ctx: created.append(data))

    def fail(ctx: Any) -> None:
        raise BadRequest("no")

    svc.hooks({"before": {"create": [fail]}})
    with pytest.raises(BadRequest):
        svc.create({"title": "x"})
    assert created == []

    app2 = App()
    svc2 = app2.use("articles", Articles())
    svc2.on("created", lambda data, ctx: created.append(data))
    svc2.hooks({"after": {"create": lambda ctx: setattr(ctx, "event", None)}})
    svc2.create({"title": "x"})
    assert created == []
