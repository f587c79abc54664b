"""The ``celery-services`` command line: the typer app, its global options and what the commands share.

Every command reads the settings as the apps do (``CELERY_SERVICES_*`` variables, ``config/default.toml``),
with ``--broker`` and ``--config`` on top. Commands that print a table print JSON instead with ``--json``.

Exit codes: 0 success; 1 unexpected failure; 2 bad usage; 4 a service error of the 4xx family (``NotFound``,
``BadRequest``, ``Timeout``...); 5 one of the 5xx family (``Unavailable``, ``GeneralError``...) or a broker
or registry that cannot be reached.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import json
import os
import signal
import sys
import threading
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

import pydantic
import redis
import typer
from kombu.exceptions import OperationalError
from rich.console import Console

from ..core.app import App
from ..core.errors import ServiceError
from ..distribution import Distribution, distribute, finalize, logs
from ..distribution.settings import DistributionSettings

__all__ = ["EXIT_CLIENT_ERROR", "EXIT_SERVER_ERROR", "Options", "app", "exit_code", "load_target", "main"]


#: Exit code of a service error of the 4xx family (``NotFound``, ``BadRequest``, ``Timeout``...).
EXIT_CLIENT_ERROR = 4


#: Exit code of a 5xx service error, or of a broker or registry that cannot be reached.
EXIT_SERVER_ERROR = 5


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
    # The modules that `worker` and `serve` import load their settings when imported: the variables carry
    # --broker and --config to them as to every other command.
    given = {"CELERY_SERVICES_BROKER_URL": broker, "CELERY_SERVICES_CONFIG": config and str(config.resolve())}
    for name, value in given.items():
        if value:
            ctx.call_on_close(functools.partial(_restore, name, os.environ.get(name)))
            os.environ[name] = value
    if broker or config:
        ctx.obj.settings()  # a bad URL or file fails here, before any command runs


def _restore(name: str, value: str | None) -> None:
    # The CLI may run inside another program (tests, a notebook): leave its environment as it was.
    if value is None:
        os.environ.pop(name, None)
    else:
        os.environ[name] = value


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


def main() -> None:
    """Entry point of the ``celery-services`` script."""
    app(prog_name="celery-services")


if __name__ == "__main__":
    main()
