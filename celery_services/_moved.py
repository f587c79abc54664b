"""Module paths from before the layers (``celery_services.remote`` …) keep working for one release.

Importing one gives the module at its new place (the same object) and a :class:`DeprecationWarning` naming
it. One table instead of a stub file per old module.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.machinery
import importlib.util
import sys
import warnings
from types import ModuleType

__all__ = ["MOVED", "install"]

#: Old module path → new one.
MOVED = {
    **{f"celery_services.{name}": f"celery_services.core.{name}" for name in (
        "app", "service", "hooks", "emitter", "errors", "memory",
    )},
    **{f"celery_services.{name}": f"celery_services.distribution.{name}" for name in (
        "settings", "protocol", "lease", "manifest", "registry", "discovery", "events", "bootsteps",
        "redis_transport", "logs",
    )},
    "celery_services.remote": "celery_services.distribution.caller",
    "celery_services.tasks": "celery_services.distribution.provider",
    "celery_services.query": "celery_services.http.query",
    "celery_services.sse": "celery_services.http.sse",
    "celery_services.demo": "celery_services.cli.demo",
    "celery_services.embedded": "celery_services.testing.brokers",
}  # fmt: skip


class _MovedFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    def find_spec(
        self, fullname: str, path: object = None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname not in MOVED:
            return None
        return importlib.util.spec_from_loader(fullname, self)

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType:
        new = MOVED[spec.name]
        warnings.warn(
            f"{spec.name} moved to {new}; import it from there (the old path goes in the next release)",
            DeprecationWarning,
            stacklevel=2,
        )
        return importlib.import_module(new)

    def exec_module(self, module: ModuleType) -> None:
        return None  # the module at its new place is already executed


def install() -> None:
    """Let the old module paths be imported (idempotent)."""
    if not any(isinstance(finder, _MovedFinder) for finder in sys.meta_path):
        sys.meta_path.append(_MovedFinder())
