"""Commands that read the registry and ask the providers: ``services`` and ``health``."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console
from rich.table import Table

from ..core.errors import NotFound, Unavailable
from ..distribution.manifest import KeyInfo
from ..distribution.protocol import mask_url
from ..distribution.registry import Registry
from .app import JsonOption, Options, _consumer, _failures, app

__all__ = ["collisions", "registry_rows", "registry_table"]


def registry_rows(rows: list[KeyInfo]) -> list[dict[str, Any]]:
    """The registry's keys as JSON-safe dicts: instances with heartbeat ages, and services."""
    return [
        {
            "key": row.key,
            "instances": [
                {
                    "instance": inst.instance,
                    "host": inst.host,
                    "pid": inst.pid,
                    "heartbeat_age": round(inst.heartbeat_age, 3),
                    "services": [service.model_dump() for service in inst.services],
                }
                for inst in row.instances
            ],
        }
        for row in rows
    ]


def collisions(rows: list[KeyInfo]) -> dict[str, list[str]]:
    """Paths offered by several keys: path → the keys offering it, sorted."""
    offered: dict[str, set[str]] = {}
    for row in rows:
        for inst in row.instances:
            for service in inst.services:
                offered.setdefault(service.path, set()).add(row.key)
    return {path: sorted(keys) for path, keys in sorted(offered.items()) if len(keys) > 1}


def registry_table(rows: list[KeyInfo], title: str | None = None, width: int | None = None) -> Table:
    """A table of the registry: one line per (key, path); per key, its instances (host and pid) and their
    heartbeat ages, fitted to ``width`` (the terminal's) without ever cutting a word (``publish_article``)."""
    cells: list[tuple[str, str, str, str, str, str]] = []
    for row in rows:
        ages = [inst.heartbeat_age for inst in row.instances]
        low, high = f"{min(ages):.1f}", f"{max(ages):.1f}"
        age = f"{low} s" if low == high else f"{low}-{high} s"
        hosts = " ".join(f"{inst.host}:{inst.pid}" for inst in row.instances)
        merged: dict[str, tuple[dict[str, None], dict[str, None]]] = {}
        for inst in row.instances:
            for service in inst.services:
                methods, events = merged.setdefault(service.path, ({}, {}))
                methods.update(dict.fromkeys(service.methods))
                events.update(dict.fromkeys(service.events))
        lines = sorted(merged.items()) or [("-", ({}, {}))]
        for index, (path, (methods, events)) in enumerate(lines):
            head = (row.key, hosts, age) if index == 0 else ("", "", "")
            cells.append((*head, path, ", ".join(methods), ", ".join(events)))
    names = ("key", "instances (host:pid)", "heartbeat age", "path", "methods", "events")
    texts = [[line[column] for line in cells] + [name] for column, name in enumerate(names)]
    widths = _fitted_widths(texts, width)
    table = Table(title=title, title_justify="left")
    for name, column_width in zip(names, widths, strict=True):
        table.add_column(name, width=column_width, overflow="fold")
    for line in cells:
        table.add_row(*line)
    return table


def _fitted_widths(texts: list[list[str]], width: int | None) -> list[int]:
    """Column widths within ``width``, each at least its longest word (rich's own shrinking cuts words).

    Each column starts at its longest word; what is left of ``width`` goes to the columns whose text is
    still wrapped, the least wrapped first. The table may be wider than ``width``: never a word cut.
    """
    lowest = [max(len(word) for text in column for word in text.split() or [""]) for column in texts]
    natural = [max(len(text) for text in column) for column in texts]
    widths = list(lowest)
    spare = (width or sum(natural) + 3 * len(texts) + 1) - (sum(widths) + 3 * len(texts) + 1)
    for index in sorted(range(len(texts)), key=lambda i: natural[i] - lowest[i]):
        grant = min(max(spare, 0), natural[index] - widths[index])
        widths[index] += grant
        spare -= grant
    return widths


@app.command()
def services(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List the live apps of the registry: instances, heartbeat ages, services, and path collisions."""
    settings = ctx.obj.settings()
    with _failures(), Registry.from_settings(settings) as registry:
        rows = registry.list()
    if as_json:
        typer.echo(json.dumps({"keys": registry_rows(rows), "collisions": collisions(rows)}, indent=2))
        return
    out = Console(highlight=False)
    if not rows:
        out.print(
            f"No live app in the registry '{settings.registry_prefix}' of "
            f"{mask_url(settings.resolved_registry_url())}"
        )
        return
    table = registry_table(rows, width=out.width)
    # Wider than the terminal rather than a word cut or a column dropped: the terminal wraps the lines.
    out.width = max(
        out.width, sum(column.width or 0 for column in table.columns) + 3 * len(table.columns) + 1
    )
    out.print(table)
    for path, keys in collisions(rows).items():
        out.print(f"[yellow]collision[/]: '{path}' is offered by {', '.join(keys)}")


@app.command()
def health(
    ctx: typer.Context,
    key: Annotated[str | None, typer.Argument(help="An app key (default: every app).")] = None,
    as_json: JsonOption = False,
) -> None:
    """Ask the providers whether their services are up: 0 when all are, 4 unknown key, 5 one is down."""
    options: Options = ctx.obj
    # Proxies mounted at "key/path": services of different apps at the same path never collide here.
    with (
        _failures(),
        _consumer(
            options,
            remote_services=[key] if key else ["*"],
            remote_service_path=lambda info: f"{info.key}/{info.path}",
        ) as distribution,
    ):
        try:
            answer = distribution.healthcheck(key)
            if not answer:
                raise NotFound("No remote services in the registry")
        except Unavailable as exc:
            answer = exc.data if isinstance(exc.data, dict) else {}
            _print_health(answer, key, as_json)
            raise
    _print_health(answer, key, as_json)


def _print_health(answer: dict[str, bool], key: str | None, as_json: bool) -> None:
    shown = {local.split("/", 1)[1] if key else local: up for local, up in sorted(answer.items())}
    if as_json:
        typer.echo(json.dumps(shown))
        return
    table = Table("service", "up")
    for path, up in shown.items():
        table.add_row(path, "[green]yes[/]" if up else "[red]no[/]")
    Console().print(table)
