"""celery-services: make an application's services available over Celery, and use remote ones as local.

The package has four layers, each importing only those below it (``tests/test_layers.py`` checks it):
:mod:`.core` (apps, services, hooks, errors), :mod:`.distribution` (calls, registry, events over Celery),
:mod:`.http` (the gateway) and :mod:`.testing` (the test kit), and :mod:`.cli` on top. The public API,
grouped by concept, is re-exported here.
"""

from . import _moved
from .core.app import App
from .core.errors import (
    BadGateway,
    BadRequest,
    Conflict,
    Forbidden,
    GeneralError,
    Gone,
    LengthRequired,
    MethodNotAllowed,
    NotAcceptable,
    NotAuthenticated,
    NotFound,
    NotImplemented,
    PayloadTooLarge,
    PaymentError,
    ServiceError,
    Timeout,
    TooManyRequests,
    Unavailable,
    Unprocessable,
)
from .core.hooks import HookContext
from .core.memory import MemoryService
from .core.service import Service, ServiceWrapper
from .distribution import Distribution, distribute, finalize
from .distribution.caller import RemoteService
from .distribution.settings import DistributionSettings

_moved.install()

__all__ = [
    # app and services
    "App",
    "HookContext",
    "Service",
    "ServiceWrapper",
    "MemoryService",
    # distribution
    "Distribution",
    "DistributionSettings",
    "RemoteService",
    "distribute",
    "finalize",
    # errors
    "BadGateway",
    "BadRequest",
    "Conflict",
    "Forbidden",
    "GeneralError",
    "Gone",
    "LengthRequired",
    "MethodNotAllowed",
    "NotAcceptable",
    "NotAuthenticated",
    "NotFound",
    "NotImplemented",
    "PayloadTooLarge",
    "PaymentError",
    "ServiceError",
    "Timeout",
    "TooManyRequests",
    "Unavailable",
    "Unprocessable",
]
