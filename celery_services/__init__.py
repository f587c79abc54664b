"""celery-services: make an application's services available over Celery, and use remote ones as local.

The public API, grouped by concept.
"""

from .app import App
from .distribution import Distribution, distribute, finalize
from .errors import (
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
from .hooks import HookContext
from .memory import MemoryService
from .remote import RemoteService
from .service import Service, ServiceWrapper
from .settings import DistributionSettings

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
