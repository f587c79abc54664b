"""A provider worker of an app module, in its own process, discoverable before a test uses it."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from ..distribution.registry import Registry
from .config import KitConfig
from .workers import WorkerProcess, wait_for

__all__ = ["ProviderWorker"]


class ProviderWorker(WorkerProcess):
    """``celery-services worker MODULE:ATTR`` in a subprocess, on a :class:`KitConfig`'s broker and registry.

    :meth:`start` returns once the worker serves its queue and its manifest is in the registry, so a
    consumer's ``distribution.wait_for(path)`` finds it at once. The key is the one the module's settings
    give (``key`` sets ``CELERY_SERVICES_KEY``, for modules that load their settings from the environment);
    :attr:`key` holds the one the worker registered.

    Args:
        target: the app module, as ``celery-services worker`` takes it (``workers.articles:app``).
        config: the broker and registry prefix.
        key: the app key to ask for (default: a unique one derived from the module's name).
        env: more environment variables for the worker.
        pool: the worker pool (``solo`` starts and stops quickest).
        concurrency: pool size.
        pythonpath: directories put first on the worker's ``PYTHONPATH`` (where ``target`` is importable).
        ready_timeout: seconds to wait for the worker to serve and register.
        settings: more settings, by name (see :meth:`KitConfig.env`).
    """

    def __init__(
        self,
        target: str,
        config: KitConfig,
        *,
        key: str | None = None,
        env: Mapping[str, str] | None = None,
        pool: str = "solo",
        concurrency: int = 1,
        pythonpath: Sequence[str] = (),
        ready_timeout: float = 30.0,
        **settings: Any,
    ) -> None:
        self.target = target
        self.config = config
        module = target.partition(":")[0].rsplit(".", 1)[-1].replace("_", "-")
        wanted = key or f"{module}-{os.urandom(4).hex()}"
        paths = [*pythonpath, *filter(None, [os.environ.get("PYTHONPATH")])]
        worker_env = {**config.env(wanted, **settings), **(env or {})}
        if paths:
            worker_env["PYTHONPATH"] = os.pathsep.join(paths)
        super().__init__(target, wanted, env=worker_env, pool=pool, concurrency=concurrency,
                         ready_timeout=ready_timeout)  # fmt: skip
        self.command = [
            sys.executable, "-m", "celery_services.cli", "worker", target,
            "-P", pool, "-c", str(concurrency), "-n", self.name,
            "--without-gossip", "--without-mingle", "-l", "info",
        ]  # fmt: skip

    def start(self) -> ProviderWorker:
        """Start the worker; return once it serves its queue and its manifest is in the registry.

        Raises:
            RuntimeError: the worker exited (its log is in the message).
            TimeoutError: it did not register within ``ready_timeout`` seconds.
        """
        super().start()
        registry = Registry(self.config.redis_url, prefix=self.config.registry_prefix)
        try:

            def registered() -> str:
                if self.process is not None and self.process.poll() is not None:
                    raise RuntimeError(f"worker exited with {self.process.returncode}:\n{self.log()}")
                for key, instances in registry.snapshot().items():
                    if any(manifest.pid == self.pid for manifest in instances.values()):
                        return key
                return ""

            self.key = wait_for(
                registered, self.ready_timeout, interval=0.02, what=f"worker {self.name} registered"
            )
        except BaseException:
            self.kill()
            raise
        finally:
            registry.close()
        return self
