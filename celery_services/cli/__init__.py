"""The ``celery-services`` command, one module per command group.

- :mod:`.app`: the typer app, global options, exit codes and what the commands share;
- :mod:`.processes`: ``worker``, ``serve``, ``flower``, ``demo``, ``ping``;
- :mod:`.registry`: ``services``, ``health``;
- :mod:`.calls`: ``call``;
- :mod:`.events`: ``events``;
- :mod:`.demo`: the demo's steps.
"""

from . import calls, events, processes, registry  # noqa: F401  (each registers its commands on the app)
from .app import EXIT_CLIENT_ERROR, EXIT_SERVER_ERROR, Options, app, exit_code, load_target, main
from .registry import collisions, registry_rows, registry_table

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
