"""The service layer, as Feathers has it: apps, services, hooks, events, errors, an in-memory service.

Nothing here knows of Celery, Redis or the network: the distribution (:mod:`celery_services.distribution`)
sits on top and plugs in through the app's mount checks.
"""

from .app import App, normalize_path
from .errors import ServiceError
from .hooks import HookContext
from .memory import MemoryService
from .service import Service, ServiceWrapper

__all__ = [
    "App",
    "HookContext",
    "MemoryService",
    "Service",
    "ServiceError",
    "ServiceWrapper",
    "normalize_path",
]
