"""Commands that run a process: ``worker``, ``serve``, ``flower``, ``demo``, and ``ping`` of workers."""

from __future__ import annotations

import importlib
import signal
import socket
import sys
from typing import Annotated, Any

import typer

from ..distribution import finalize, logs, make_celery, observability
from .app import EXIT_SERVER_ERROR, Options, _exit_on_sigterm, _failures, app, load_target

__all__ = []


#: Options passed through to ``celery worker`` / ``celery flower`` untouched.
PASS_THROUGH = {"allow_extra_args": True, "ignore_unknown_options": True}
#: Calls a worker started without -P runs at once (its threads pool).
DEFAULT_THREADS = 8

LogFormatOption = Annotated[
    str | None,
    typer.Option(
        "--log-format",
        help="'text' or 'json' (one JSON object per line, with the call fields); default: the settings' "
        "log_format.",
    ),
]


def _log_format(given: str | None, settings_format: str) -> logs.LogFormat:
    chosen = given or settings_format
    if chosen not in ("text", "json"):
        raise typer.BadParameter(f"{chosen!r} is not 'text' nor 'json'", param_hint="--log-format")
    return "json" if chosen == "json" else "text"


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
    log_format: LogFormatOption = None,
    metrics_port: Annotated[
        int | None,
        typer.Option(
            "--metrics-port",
            help="Serve Prometheus metrics on this port (default: the settings' metrics_port; needs the "
            "metrics extra).",
        ),
    ] = None,
) -> None:
    """Run a Celery worker for the app's key: celery worker -Q KEY -E, plus the options given after it.

    Without -P, a threads pool of 8 (-c to change it): calls then run on the fast path. A prefork pool
    (-P prefork) runs them in child processes, fed by Celery's consumer.

    Example: celery-services worker workers.articles:app -P solo -c 1
    """
    options: Options = ctx.obj
    with _failures():
        distribution = load_target(target)
    settings = distribution.settings
    line_format = _log_format(log_format, settings.log_format)
    # JSON lines only: Celery's start-up banner (stdout) is not a log line.
    argv = ["--quiet", "worker", "-E"] if line_format == "json" else ["worker", "-E"]
    if not _given(ctx.args, "-Q", "--queues"):
        argv += ["-Q", distribution.key]
    if not _given(ctx.args, "-l", "--loglevel"):
        argv += ["--loglevel", options.log_level]
    if not _given(ctx.args, "-P", "--pool"):
        # Calls mostly wait (databases, other services): threads serve many at once, on the fast path.
        argv += ["--pool", "threads"]
        if not _given(ctx.args, "-c", "--concurrency"):
            argv += ["--concurrency", str(DEFAULT_THREADS)]
    from celery import signals

    if metrics_port is not None:
        observability.enable_metrics()
        observability.serve_metrics(metrics_port, settings.metrics_host)
    # The worker replaces sys.stderr with a proxy that logs: the lines must go to the real stream.
    logs.configure(options.log_level, stream=sys.stderr, format=line_format)
    _worker_log_format[0] = line_format
    # Celery configures the worker's logging: keep its lines, add the call fields to them.
    signals.after_setup_logger.connect(_decorate_handlers, weak=False)
    signals.after_setup_task_logger.connect(_decorate_handlers, weak=False)
    code = distribution.celery.worker_main([*argv, *ctx.args])
    raise typer.Exit(int(code or 0))


#: The format the worker command chose, for Celery's logging signals.
_worker_log_format: list[logs.LogFormat] = ["text"]


def _decorate_handlers(logger: Any = None, **_: Any) -> None:
    if logger is not None:
        logs.decorate(logger.handlers, _worker_log_format[0])


@app.command()
def serve(
    ctx: typer.Context,
    target: Annotated[str, typer.Argument(metavar="MODULE:ATTR", help="The services App or its Celery app.")],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="TCP port.")] = 8000,
    auth: Annotated[
        str,
        typer.Option(
            help="How clients authenticate: 'jwt' (Authorization: Bearer, keys from CELERY_SERVICES_JWT_*) "
            "or 'none' (anonymous)."
        ),
    ] = "none",
    log_format: LogFormatOption = None,
) -> None:
    """Serve an app's services over HTTP (REST, /events and the healthcheck), with celery_services.http."""
    if auth not in ("jwt", "none"):
        raise typer.BadParameter(f"{auth!r} is not 'jwt' nor 'none'", param_hint="--auth")
    http = importlib.import_module("celery_services.http")  # optional dependencies: pip install .[http]
    authenticate = None
    if auth == "jwt":
        from ..http.auth import JWTAuthentication

        try:
            authenticate = JWTAuthentication()
        except (ValueError, OSError) as exc:
            raise typer.BadParameter(str(exc), param_hint="CELERY_SERVICES_JWT_*") from None
    with _failures():
        distribution = load_target(target)
    api = distribution.app
    line_format = _log_format(log_format, distribution.settings.log_format)
    if line_format == "json":
        options: Options = ctx.obj
        logs.configure(options.log_level, format="json")
        _json_uvicorn_logs()
    # uvicorn shuts down on SIGTERM, then raises it again: exit through Python so the app is finalized
    # (manifest withdrawn, event queue deleted) rather than killed.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    try:
        http.serve(api, host=host, port=port, authenticate=authenticate)
    finally:
        finalize(api)


def _json_uvicorn_logs() -> None:
    # uvicorn configures its loggers from this dict when it starts (its own handlers, not the root's): the
    # gateway process's lines are then JSON too. Changed in place: it is uvicorn.Config's default argument.
    import uvicorn.config

    formatter = {"()": "celery_services.distribution.logs.JsonFormatter"}
    for name in ("default", "access"):
        uvicorn.config.LOGGING_CONFIG["formatters"][name] = formatter


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
def demo(
    serve: Annotated[
        bool, typer.Option("--serve", help="Keep the gateway and its live page up at the end, until Ctrl-C.")
    ] = False,
) -> None:
    """Run the guided demo: two provider replicas, a gateway, calls, events, a replica killed, health.

    Without CELERY_SERVICES_BROKER_URL an embedded Redis is started (and stopped) for it.
    """
    from .demo import run

    raise typer.Exit(run(serve=serve))


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
        with _failures(), celery.connection_for_write() as connection:
            # Reached once within the timeout, or not at all: the ping's own publish would retry the
            # connection at kombu's pace (6 s for a --timeout of 1, a health check's whole budget).
            connection.connect_timeout = timeout
            connection.ensure_connection(max_retries=1, timeout=timeout)
            replies = celery.control.ping(destination=wanted, timeout=timeout, connection=connection)
    finally:
        celery.close()
    answered = {node for reply in replies for node in reply}
    missing = [node for node in wanted if node not in answered]
    for node in wanted:
        typer.echo(f"{node}: {'pong' if node in answered else 'no answer'}")
    if missing:
        raise typer.Exit(EXIT_SERVER_ERROR)
