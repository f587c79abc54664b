"""The ``call`` command: one remote call from the command line."""

from __future__ import annotations

import json
import math
from typing import Annotated, Any

import typer

from ..core.service import SIGNATURES
from .app import _consumer, _failures, app

__all__ = []


def _json_arg(value: str | None, name: str) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint=name) from None


def _id_arg(value: str | None) -> Any:
    """An id as JSON when it parses (``1`` is the number 1, ``'"1"'`` the string), else the string: ``NaN``
    and ``Infinity`` too, which Python's JSON reads as numbers JSON has no form of."""
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except ValueError:
        return value
    return value if isinstance(parsed, float) and not math.isfinite(parsed) else parsed


@app.command()
def call(
    ctx: typer.Context,
    key: Annotated[str, typer.Argument(help="The provider app's key.")],
    path: Annotated[str, typer.Argument(help="The service path.")],
    method: Annotated[str, typer.Argument(help="find, get, create, update, patch, remove or a custom one.")],
    id: Annotated[str | None, typer.Argument(help="The id (JSON when it parses: 1 is a number).")] = None,
    data: Annotated[str | None, typer.Option("--data", help="The data, as JSON.")] = None,
    query: Annotated[str | None, typer.Option("--query", help="params.query, as JSON.")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Seconds before Timeout.")] = None,
    wait: Annotated[
        bool,
        typer.Option(
            "--wait", help="Send even when no instance of KEY is live, and wait for one until the timeout."
        ),
    ] = False,
    as_json: Annotated[bool, typer.Option("--json", help="Also print an error as JSON.")] = False,
) -> None:
    """Call a remote method and print its result as JSON; an error prints its name, code and message."""
    takes = SIGNATURES.get(method, ("data",))
    for name, given, hint in (("id", id, "ID"), ("data", data, "--data")):
        if given is not None and name not in takes:  # dropped, it changed the call (`find 1`: everything)
            raise typer.BadParameter(f"{method} takes no {name}", param_hint=hint)
    values = {"id": _id_arg(id), "data": _json_arg(data, "--data")}
    params: dict[str, Any] = {}
    if query is not None:
        params["query"] = _json_arg(query, "--query")
    if timeout is not None:
        params["timeout"] = timeout
    if wait:
        params["wait"] = True
    with _failures(as_json), _consumer(ctx.obj, remote_services=[]) as distribution:
        proxy = distribution.remote_service(key, path, [method])
        args = [values[name] for name in takes]
        result = getattr(proxy, method)(*args, params)
    typer.echo(json.dumps(result, indent=2, default=str))
