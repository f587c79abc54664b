import asyncio
from typing import Any

import pytest

from celery_services import App, HookContext, NotFound
from celery_services.core.errors import BadRequest, Forbidden


class Echo:
    def __init__(self) -> None:
        self.calls = 0

    def get(self, id: Any, params: dict[str, Any]) -> Any:
        self.calls += 1
        if id == "missing":
            raise NotFound("missing")
        return {"id": id, "params": params}

    def create(self, data: Any, params: dict[str, Any]) -> Any:
        self.calls += 1
        return data


def recorder(log: list[str], name: str) -> Any:
    def hook(ctx: HookContext) -> None:
        log.append(f"{name}:{ctx.type}:{ctx.method}")

    return hook


def test_documented_order() -> None:
    log: list[str] = []
    app = App()
    app.hooks(
        {
            "before": {"all": recorder(log, "app-all"), "get": recorder(log, "app-get")},
            "after": {"all": recorder(log, "app-all"), "get": recorder(log, "app-get")},
        }
    )
    svc = app.use("echo", Echo())
    svc.hooks(
        {
            "before": {"get": [recorder(log, "svc-get")], "all": [recorder(log, "svc-all")]},
            "after": {"get": [recorder(log, "svc-get")], "all": [recorder(log, "svc-all")]},
        }
    )
    svc.get(1)
    assert log == [
        "app-all:before:get",
        "app-get:before:get",
        "svc-all:before:get",
        "svc-get:before:get",
        "svc-all:after:get",
        "svc-get:after:get",
        "app-all:after:get",
        "app-get:after:get",
    ]
    log.clear()
    svc.create({})
    assert log == [
        "app-all:before:create",
        "svc-all:before:create",
        "svc-all:after:create",
        "app-all:after:create",
    ]


def test_context_fields_and_params_copy() -> None:
    seen: dict[str, Any] = {}
    app = App()

    def before(ctx: HookContext) -> None:
        seen.update(app=ctx.app, path=ctx.path, method=ctx.method, id=ctx.id, event=ctx.event)
        ctx.params["user"] = "alice"

    svc = app.use("echo", Echo())
    svc.hooks({"before": {"get": before}})
    caller_params = {"query": {"a": 1}}
    result = svc.get(5, caller_params)
    assert seen == {"app": app, "path": "echo", "method": "get", "id": 5, "event": None}
    assert result["params"] == {"query": {"a": 1}, "user": "alice"}
    assert caller_params == {"query": {"a": 1}}


def test_a_hook_that_restricts_the_query_leaves_the_callers_query_alone() -> None:
    # The usual ownership hook writes into params["query"]: the caller's dict, reused for another user's
    # call, must not carry the first user's restriction.
    app = App()

    def owned(ctx: HookContext) -> None:
        ctx.params["query"]["owner"] = ctx.params["user"]

    svc = app.use("echo", Echo())
    svc.hooks({"before": {"get": owned}})
    query = {"state": "open"}
    params = {"query": query, "user": 1}
    assert svc.get(1, params)["params"]["query"] == {"state": "open", "owner": 1}
    assert params == {"query": {"state": "open"}, "user": 1}
    assert query == {"state": "open"}
    params["user"] = 2
    assert svc.get(1, params)["params"]["query"] == {"state": "open", "owner": 2}
    awaited = asyncio.run(svc.acall("get", id=1, params=params))
    assert awaited["params"]["query"] == {"state": "open", "owner": 2}
    assert query == {"state": "open"}


def test_before_hook_setting_result_skips_method() -> None:
    app = App()
    raw = Echo()
    svc = app.use("echo", raw)
    svc.hooks({"before": {"get": lambda ctx: setattr(ctx, "result", {"cached": True})}})
    assert svc.get(1) == {"cached": True}
    assert raw.calls == 0
    svc.hooks({"before": {"create": lambda ctx: setattr(ctx, "result", None)}})
    assert svc.create({"x": 1}) is None
    assert raw.calls == 0


def test_after_hook_changes_result_and_hook_may_return_context() -> None:
    app = App()
    svc = app.use("echo", Echo())

    def after(ctx: HookContext) -> HookContext:
        ctx.result = {"wrapped": ctx.result["id"]}
        return ctx

    svc.hooks({"after": {"get": after}})
    assert svc.get(2) == {"wrapped": 2}


def test_error_hooks_see_and_replace_the_error() -> None:
    log: list[str] = []
    app = App()
    app.hooks({"error": {"all": lambda ctx: log.append(f"app:{type(ctx.error).__name__}")}})
    svc = app.use("echo", Echo())

    def replace(ctx: HookContext) -> None:
        log.append(f"svc:{type(ctx.error).__name__}")
        ctx.error = Forbidden("hidden")

    svc.hooks({"error": {"get": replace}})
    with pytest.raises(Forbidden, match="hidden"):
        svc.get("missing")
    assert log == ["svc:NotFound", "app:Forbidden"]


def test_error_in_before_hook_runs_error_hooks_and_recovery() -> None:
    app = App()
    svc = app.use("echo", Echo())

    def deny(ctx: HookContext) -> None:
        raise BadRequest("denied")

    def recover(ctx: HookContext) -> None:
        ctx.error = None
        ctx.result = {"recovered": True}

    svc.hooks({"before": {"get": deny}, "error": {"get": recover}})
    assert svc.get(1) == {"recovered": True}


def test_unknown_hook_type_is_refused() -> None:
    with pytest.raises(ValueError, match="unknown hook type"):
        App().hooks({"around": {"all": lambda ctx: None}})
    with pytest.raises(TypeError):
        App().hooks({"before": {"all": [42]}})  # type: ignore[list-item]
