"""The ``events`` command: a follower of service events, registered like any consumer while it runs."""

from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Annotated

import redis
import typer
from rich.console import Console

from ..distribution.celery_app import bus_connection, make_celery
from ..distribution.event_epoch import BindingEpoch
from ..distribution.events import EventBus, EventEnvelope, routing_key
from ..distribution.manifest import Manifest
from ..distribution.registry import Registry
from ..distribution.settings import DistributionSettings
from .app import EXIT_CLIENT_ERROR, _failures, _sigterm_exits, app

__all__ = []


def _routing_keys(
    settings: DistributionSettings, key: str | None, path: str | None, event: str | None
) -> list[tuple[str, str, str]]:
    """(key, path, event) to bind: exactly the one given, else what the registry's live services publish."""
    if key and path and event:
        return [(key, path.strip("/"), event)]
    with Registry.from_settings(settings) as registry:
        rows = registry.list()
    found: dict[tuple[str, str, str], None] = {}
    for row in rows:
        if key and row.key != key:
            continue
        for inst in row.instances:
            for service in inst.services:
                if path and service.path != path.strip("/"):
                    continue
                for name in service.events:
                    if not event or name == event:
                        found[(row.key, service.path, name)] = None
    return list(found)


@contextlib.contextmanager
def _follower(
    settings: DistributionSettings, on_event: Callable[[EventEnvelope], None]
) -> Iterator[EventBus]:
    """An event bus that is, for as long as it follows, a consumer instance of the registry like any other.

    Live consumers delete the broadcast queues of instances their registry does not list (every ``call``
    that leaves makes them look), so the follower publishes a manifest (no services) under the instance id
    that names its queue, in the registry's namespace, kept alive by the registry heartbeat. As
    ``Distribution`` does: the manifest is published before anything is bound, and withdrawn only after the
    queue is deleted, so that no sweep ever judges a queue of ours by a registry that does not list us.
    """
    registry = Registry.from_settings(settings)
    key = f"cli-{uuid.uuid4().hex[:8]}"
    try:
        bus = EventBus(
            settings.resolved_broker_url(),
            **bus_connection(make_celery(settings)),  # the Sentinel master and TLS, as an app's bus has
            exchange=settings.events_exchange,
            consumer_key=key,
            delivery="broadcast",
            on_event=on_event,
            queue_prefix=settings.events_queue_prefix(),
            epoch=BindingEpoch.of(settings),
        )
        manifest = Manifest.local(key, [], instance=bus.instance)
        registry.publish(manifest)
    except BaseException:
        registry.close()
        raise
    try:
        registry.start_heartbeat(lambda: manifest)
        yield bus
    finally:
        bus.close()
        with contextlib.suppress(redis.RedisError):  # unreachable: the manifest expires after its TTL
            registry.withdraw(manifest.key, manifest.instance)
        registry.close()


@app.command()
def events(
    ctx: typer.Context,
    key: Annotated[
        str | None, typer.Argument(help="An app key (default: every app of the registry).")
    ] = None,
    path: Annotated[str | None, typer.Option("--path", help="Only this service path.")] = None,
    event: Annotated[str | None, typer.Option("--event", help="Only this event.")] = None,
    count: Annotated[int | None, typer.Option("--count", min=1, help="Stop after N events.")] = None,
    timeout: Annotated[float | None, typer.Option("--timeout", help="Stop after S seconds.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="One JSON envelope per line.")] = False,
) -> None:
    """Follow service events live until interrupted (Ctrl-C), --count events or --timeout.

    Without KEY, --path and --event all given, the services and events of the apps live in the registry
    now are followed. Exit 4 when --count events did not arrive within --timeout.
    """
    settings: DistributionSettings = ctx.obj.settings()
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    with _failures():
        wanted = _routing_keys(settings, key, path, event)
    for binding in wanted:
        try:
            routing_key(*binding)
        except ValueError as exc:
            raise typer.BadParameter(str(exc), param_hint="KEY --path --event") from None
    if not wanted:
        err.print("No events to follow: no live service matches (give KEY --path --event to wait for one).")
        raise typer.Exit(EXIT_CLIENT_ERROR)
    received = 0
    done = threading.Event()
    lock = threading.Lock()

    def show(envelope: EventEnvelope) -> None:
        nonlocal received
        with lock:
            if done.is_set():
                return
            if as_json:
                typer.echo(envelope.model_dump_json())
            else:
                stamp = time.strftime("%H:%M:%S")
                data = json.dumps(envelope.data, default=str)
                typer.echo(f"{stamp} {envelope.key} {envelope.path} {envelope.event} {data}")
            sys.stdout.flush()
            received += 1
            if count is not None and received >= count:
                done.set()

    try:
        with _failures(), _sigterm_exits(), _follower(settings, show) as bus:
            for binding in wanted:
                bus.bind(*binding)
            bus.start()
            err.print(f"following {len(wanted)} routing key(s): " + ", ".join(".".join(b) for b in wanted))
            sys.stderr.flush()
            done.wait(timeout)
    except KeyboardInterrupt:
        pass
    if count is not None and received < count:
        err.print(f"{received} of {count} events within {timeout} s")
        raise typer.Exit(EXIT_CLIENT_ERROR)
