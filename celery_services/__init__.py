"""celery-services: make an application's services available over Celery, and use remote ones as local.

The public API, grouped by concept.
"""

from .app import App
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
from .service import Service, ServiceWrapper

__all__ = [
    # app and services
    "App",
    "HookContext",
    "Service",
    "ServiceWrapper",
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
