"""The ``celery-services`` command line: run workers, look at the registry, call, follow, check, monitor.

Every command reads the settings as the apps do (``CELERY_SERVICES_*`` variables, ``config/default.toml``),
with ``--broker`` and ``--config`` on top. Commands that print a table print JSON instead with ``--json``.

Exit codes: 0 success; 1 unexpected failure; 2 bad usage; 4 a service error of the 4xx family (``NotFound``,
``BadRequest``, ``Timeout``...); 5 one of the 5xx family (``Unavailable``, ``GeneralError``...) or a broker
or registry that cannot be reached.
"""

from __future__ import annotations

import contextlib
import importlib
import json
import os
import signal
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pydantic
import redis
import typer
from kombu.exceptions import OperationalError
from rich.console import Console
from rich.table import Table

from . import logs
from .app import App
from .distribution import Distribution, distribute, finalize, make_celery
from .errors import NotFound, ServiceError, Unavailable
from .events import EventBus, EventEnvelope
from .manifest import KeyInfo, Manifest
from .registry import Registry
from .service import SIGNATURES
from .settings import DistributionSettings

__all__ = [
    "EXIT_CLIENT_ERROR",
    "EXIT_SERVER_ERROR",
    "Options",
    "app",
    "collisions",
    "exit_code",
    "load_target",
    "main",
    "registry_rows",
    "registry_table",
]

#: Exit code of a service error of the 4xx family (``NotFound``, ``BadRequest``, ``Timeout``...).
EXIT_CLIENT_ERROR = 4
#: Exit code of a 5xx service error, or of a broker or registry that cannot be reached.
EXIT_SERVER_ERROR = 5

#: Options passed through to ``celery worker`` / ``celery flower`` untouched.
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}

app = typer.Typer(
    name="celery-services",
    help="Run, inspect and call the services of celery-services apps.",
    epilog=(
        "Settings: CELERY_SERVICES_* variables and config/default.toml, under --broker and --config. "
        "Exit codes: 0 ok, 1 unexpected failure, 2 bad usage, 4 service error 4xx (NotFound, Timeout...), "
        "5 service error 5xx (Unavailable...) or broker/registry unreachable."
    ),
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)

JsonOption = Annotated[bool, typer.Option("--json", help="Print JSON instead of a table.")]


@dataclass
class Options:
    """The global options, shared by every command through ``ctx.obj``.

    Attributes:
        config: The base TOML file (default: ``$CELERY_SERVICES_CONFIG``, else ``config/default.toml``).
        broker: The broker URL overriding the settings'.
        log_level: The level of the process's log lines.
    """

    config: Path | None
    broker: str | None
    log_level: str

    def settings(self, **overrides: Any) -> DistributionSettings:
        """The settings of files and environment, with ``--broker`` and ``overrides`` on top.

        Raises:
            typer.BadParameter: The configuration is invalid or a named file is missing.
        """
        if self.broker:
            overrides["broker_url"] = self.broker
        try:
            return DistributionSettings.load(self.config, **overrides)
        except (FileNotFoundError, ValueError, pydantic.ValidationError) as exc:
            raise typer.BadParameter(str(exc), param_hint="settings") from None


def exit_code(error: ServiceError) -> int:
    """The process exit code of a service error: 4 for its 4xx family, 5 for the others.

    Args:
        error: The error a call raised.

    Returns:
        :data:`EXIT_CLIENT_ERROR` or :data:`EXIT_SERVER_ERROR`.
    """
    return EXIT_CLIENT_ERROR if 400 <= error.code < 500 else EXIT_SERVER_ERROR


@app.callback()
def _global(
    ctx: typer.Context,
    log_level: Annotated[
        str, typer.Option("--log-level", help="DEBUG, INFO, WARNING, ERROR (also the worker's -l).")
    ] = "WARNING",
    broker: Annotated[
        str | None, typer.Option("--broker", help="Broker URL (default: the settings' broker_url).")
    ] = None,
    config: Annotated[
        Path | None,
        typer.Option(
            "--config", help="Base TOML file (default: $CELERY_SERVICES_CONFIG, config/default.toml)."
        ),
    ] = None,
) -> None:
    try:
        logs.configure(log_level)
    except ValueError as exc:
        raise typer.BadParameter(str(exc), param_hint="--log-level") from None
    ctx.obj = Options(config, broker, log_level)


@contextlib.contextmanager
def _failures(as_json: bool = False) -> Iterator[None]:
    """Turn service errors and unreachable brokers into a message and the matching exit code."""
    err = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        yield
    except ServiceError as exc:
        if as_json:
            typer.echo(json.dumps(exc.to_dict(), default=str))
        err.print(f"[bold red]{exc.name}[/] ({exc.code}): {exc.message}", markup=True)
        if exc.data is not None:
            err.print(f"data: {json.dumps(exc.data, default=str)}", markup=False)
        raise typer.Exit(exit_code(exc)) from None
    except (redis.RedisError, OperationalError, ConnectionError) as exc:
        err.print(f"[bold red]Unreachable[/]: {exc}")
        raise typer.Exit(EXIT_SERVER_ERROR) from None


@contextlib.contextmanager
def _consumer(options: Options, **overrides: Any) -> Iterator[Distribution]:
    """A throwaway consumer app (key ``cli-<random>``, exposing nothing), finalized on the way out."""
    settings = options.settings(key=f"cli-{uuid.uuid4().hex[:8]}", services=[], **overrides)
    api = App()
    distribution = distribute(api, settings)
    try:
        yield distribution
    finally:
        finalize(api)


# -- running apps ---------------------------------------------------------------------------------------


def load_target(target: str) -> Distribution:
    """The distribution of ``module:attr``: a distributed services ``App`` or the Celery app of one.

    The current directory is importable, as with ``celery -A``. ``module`` alone looks for ``app``.

    Raises:
        typer.BadParameter: The module cannot be imported or the attribute is neither.
    """
    module_name, _, attr = target.partition(":")
    if not module_name:
        raise typer.BadParameter(f"{target!r} is not MODULE:ATTR", param_hint="MODULE:ATTR")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise typer.BadParameter(f"cannot import {module_name!r}: {exc}", param_hint="MODULE:ATTR") from None
    obj = getattr(module, attr or "app", None)
    distribution = (
        obj.distribution if isinstance(obj, App) else getattr(obj, "celery_services_distribution", None)
    )
    if not isinstance(distribution, Distribution):
        raise typer.BadParameter(
            f"{target} is neither a distributed App nor the Celery app of one (see distribute())",
            param_hint="MODULE:ATTR",
        )
    return distribution


def _given(args: list[str], *names: str) -> bool:
    return any(
        arg == name or arg.startswith(name + ("=" if name.startswith("--") else ""))
        for arg in args
        for name in names
    )


@app.command(context_settings=PASS_THROUGH)
def worker(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(metavar="MODULE:ATTR", help="The services App or its Celery app.")],
) -> None:
    """Run a Celery worker for the app's key: celery worker -Q KEY -E, plus the options given after it.

    Example: celery-services worker workers.articles:app -P solo -c 1
    """
    options: Options = ctx.obj
    with _failures():
        distribution = load_target(target)
    argv = ["worker", "-E"]
    if not _given(ctx.args, "-Q", "--queues"):
        argv += ["-Q", distribution.key]
    if not _given(ctx.args, "-l", "--loglevel"):
        argv += ["--loglevel", options.log_level]
    from celery import signals

    # The worker replaces sys.stderr with a proxy that logs: the lines must go to the real stream.
    logs.configure(options.log_level, stream=sys.stderr)
    # Celery configures the worker's logging: keep its lines, add the call fields to them.
    signals.after_setup_logger.connect(_decorate_handlers, weak=False)
    signals.after_setup_task_logger.connect(_decorate_handlers, weak=False)
    code = distribution.celery.worker_main([*argv, *ctx.args])
    raise typer.Exit(int(code or 0))


def _decorate_handlers(logger: Any = None, **_: Any) -> None:
    if logger is not None:
        logs.decorate(logger.handlers)


@app.command()
def serve(
    target: Annotated[str, typer.Argument(metavar="MODULE:ATTR", help="The services App or its Celery app.")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
) -> None:
    """Serve an app's services over HTTP (REST and the healthcheck), with celery_services.http."""
    with _failures():
        api = load_target(target).app
    http = importlib.import_module("celery_services.http")  # optional dependencies: pip install .[http]
    # uvicorn shuts down on SIGTERM, then raises it again: exit through Python so the app is finalized
    # (manifest withdrawn, event queue deleted) rather than killed.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        http.serve(api, host=host, port=port)
    finally:
        finalize(api)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


@contextlib.contextmanager
def _sigterm_exits() -> Iterator[None]:
    """Meanwhile, SIGTERM exits through Python: ``finally`` blocks withdraw and delete what is ours."""
    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous if previous is not None else signal.SIG_DFL)


@app.command(context_settings=PASS_THROUGH)
def flower(ctx: typer.Context) -> None:
    """Run Flower (celery flower) on the configured broker; the options after it go to Flower.

    Flower's REST API answers 401 unless basic auth is set (--basic-auth=user:password, or the
    FLOWER_BASIC_AUTH variable) or FLOWER_UNAUTHENTICATED_API=true is in the environment.
    Example: celery-services flower --port=5555 --basic-auth=admin:secret
    """
    options: Options = ctx.obj
    celery = make_celery(options.settings())
    code = celery.start(["flower", *ctx.args])
    raise typer.Exit(int(code or 0))


@app.command()
def demo() -> None:
    """Run the guided demo: two provider replicas, a gateway, calls, events, a replica killed, health.

    Without CELERY_SERVICES_BROKER_URL an embedded Redis is started (and stopped) for it.
    """
    from .demo import run

    raise typer.Exit(run())


# -- looking at the registry -------------------------------------------------------------------------------


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


def registry_table(rows: list[KeyInfo], title: str | None = None) -> Table:
    """A table of the registry: one line per (key, path), the instances and heartbeat ages per key."""
    table = Table(title=title, title_justify="left")
    for column in ("key", "instances", "heartbeat age", "path", "methods", "events"):
        table.add_column(column, overflow="fold")
    for row in rows:
        ages = [inst.heartbeat_age for inst in row.instances]
        low, high = f"{min(ages):.1f}", f"{max(ages):.1f}"
        age = f"{low} s" if low == high else f"{low}-{high} s"
        merged: dict[str, tuple[dict[str, None], dict[str, None]]] = {}
        for inst in row.instances:
            for service in inst.services:
                methods, events = merged.setdefault(service.path, ({}, {}))
                methods.update(dict.fromkeys(service.methods))
                events.update(dict.fromkeys(service.events))
        lines = sorted(merged.items()) or [("-", ({}, {}))]
        for index, (path, (methods, events)) in enumerate(lines):
            head = (row.key, str(len(row.instances)), age) if index == 0 else ("", "", "")
            table.add_row(*head, path, ", ".join(methods), ", ".join(events))
    return table


@app.command()
def services(ctx: typer.Context, as_json: JsonOption = False) -> None:
    """List the live apps of the registry: instances, heartbeat ages, services, and path collisions."""
    settings = ctx.obj.settings()
    with _failures(), Registry(settings.resolved_registry_url(), prefix=settings.registry_prefix) as registry:
        rows = registry.list()
    if as_json:
        typer.echo(json.dumps({"keys": registry_rows(rows), "collisions": collisions(rows)}, indent=2))
        return
    out = Console(highlight=False)
    if not rows:
        out.print(
            f"No live app in the registry '{settings.registry_prefix}' of {settings.resolved_registry_url()}"
        )
        return
    out.print(registry_table(rows))
    for path, keys in collisions(rows).items():
        out.print(f"[yellow]collision[/]: '{path}' is offered by {', '.join(keys)}")


# -- calling -------------------------------------------------------------------------------------------------


def _json_arg(value: str | None, name: str) -> Any:
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError as exc:
        raise typer.BadParameter(f"not JSON: {exc}", param_hint=name) from None


def _id_arg(value: str | None) -> Any:
    """An id as JSON when it parses (``1`` is the number 1, ``'"1"'`` the string), else the string."""
    if value is None:
        return None
    try:
        return json.loads(value)
    except ValueError:
        return value


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
        args = [values[name] for name in SIGNATURES.get(method, ("data",))]
        result = getattr(proxy, method)(*args, params)
    typer.echo(json.dumps(result, indent=2, default=str))


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


@app.command()
def ping(
    ctx: typer.Context,
    nodes: Annotated[
        list[str] | None, typer.Argument(help="Worker node names (default: celery@<this host>).")
    ] = None,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the answers.")] = 3.0,
) -> None:
    """Ping Celery workers by node name: 0 when every one answers (a container's health check)."""
    wanted = list(nodes or [f"celery@{socket.gethostname()}"])
    celery = make_celery(ctx.obj.settings())
    try:
        with _failures():
            replies = celery.control.ping(destination=wanted, timeout=timeout)
    finally:
        celery.close()
    answered = {node for reply in replies for node in reply}
    missing = [node for node in wanted if node not in answered]
    for node in wanted:
        typer.echo(f"{node}: {'pong' if node in answered else 'no answer'}")
    if missing:
        raise typer.Exit(EXIT_SERVER_ERROR)


# -- following events -------------------------------------------------------------------------------------


def _routing_keys(
    settings: DistributionSettings, key: str | None, path: str | None, event: str | None
) -> list[tuple[str, str, str]]:
    """(key, path, event) to bind: exactly the one given, else what the registry's live services publish."""
    if key and path and event:
        return [(key, path.strip("/"), event)]
    with Registry(settings.resolved_registry_url(), prefix=settings.registry_prefix) as registry:
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
    registry = Registry(
        settings.resolved_registry_url(),
        prefix=settings.registry_prefix,
        heartbeat_interval=settings.heartbeat_interval,
        ttl=settings.resolved_registry_ttl(),
    )
    key = f"cli-{uuid.uuid4().hex[:8]}"
    try:
        bus = EventBus(
            settings.resolved_broker_url(),
            exchange=settings.events_exchange,
            consumer_key=key,
            delivery="broadcast",
            on_event=on_event,
            queue_prefix=settings.events_queue_prefix(),
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
                try:
                    bus.bind(*binding)
                except ValueError as exc:
                    raise typer.BadParameter(str(exc), param_hint="KEY --path --event") from None
            bus.start()
            err.print(f"following {len(wanted)} routing key(s): " + ", ".join(".".join(b) for b in wanted))
            sys.stderr.flush()
            done.wait(timeout)
    except KeyboardInterrupt:
        pass
    if count is not None and received < count:
        err.print(f"{received} of {count} events within {timeout} s")
        raise typer.Exit(EXIT_CLIENT_ERROR)


def main() -> None:
    """Entry point of the ``celery-services`` script."""
    app(prog_name="celery-services")


if __name__ == "__main__":
    main()
