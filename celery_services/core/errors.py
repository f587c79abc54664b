"""One error tree for local and remote calls.

Every error keeps its whole state in ``args`` (``message``, ``data``, and the original ``name`` when it
differs from the class), so it survives ``pickle`` and Celery's JSON exception transport, which rebuilds
an exception as ``cls(*args)``. Remote errors are rebuilt by name through :data:`ERRORS`, an allow-list:
no module named in a message is ever imported.
"""

from __future__ import annotations

from typing import Any, ClassVar

__all__ = [
    "ERRORS",
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
    "error_from_exception",
]


class ServiceError(Exception):
    """Base of every error a service call raises, with an HTTP-like ``code``.

    Args:
        message: human readable text, kept end to end.
        data: JSON-safe details; a dict with an ``errors`` entry fills :attr:`errors`.
        name: the original error name, when this class stands in for an unknown one.
    """

    code: ClassVar[int] = 500
    class_name: ClassVar[str] = "general-error"

    def __init__(self, message: str = "", data: Any = None, name: str | None = None) -> None:
        if name is None:
            super().__init__(message, data)
        else:
            super().__init__(message, data, name)

    @property
    def message(self) -> str:
        """The error message."""
        return str(self.args[0]) if self.args else ""

    @property
    def data(self) -> Any:
        """JSON-safe details given with the error."""
        return self.args[1] if len(self.args) > 1 else None

    @property
    def name(self) -> str:
        """The error's name: its class name, or the original name of an error rebuilt as GeneralError."""
        if len(self.args) > 2 and self.args[2]:
            return str(self.args[2])
        return type(self).__name__

    @property
    def errors(self) -> Any:
        """Field errors (``data["errors"]``), as Feathers' validation errors carry them."""
        data = self.data
        if isinstance(data, dict) and "errors" in data:
            return data["errors"]
        return {}

    def __str__(self) -> str:
        return self.message

    def __repr__(self) -> str:
        return f"{self.name}({self.message!r}, code={self.code})"

    def to_dict(self) -> dict[str, Any]:
        """The JSON form, as a Feathers server writes it: ``name``, ``message``, ``code``, ``className``,
        then ``data`` and ``errors`` only when they hold something (Feathers' clients rebuild the error
        from this; a ``"data": null`` breaks them). ``errors`` is taken out of ``data``."""
        payload: dict[str, Any] = {
            "name": self.name,
            "message": self.message,
            "code": self.code,
            "className": self.class_name,
        }
        data = self.data
        if isinstance(data, dict) and "errors" in data:
            data = {k: v for k, v in data.items() if k != "errors"} or None
        if data is not None:
            payload["data"] = data
        if self.errors:
            payload["errors"] = self.errors
        return payload

    @staticmethod
    def from_dict(payload: dict[str, Any]) -> ServiceError:
        """Rebuild an error from :meth:`to_dict` output, through the allow-list only.

        An unknown name becomes :class:`GeneralError` that keeps the original name; ``errors`` goes back
        into ``data``.
        """
        name = str(payload.get("name") or "GeneralError")
        message = str(payload.get("message") or "")
        data = payload.get("data")
        errors = payload.get("errors")
        if errors and (data is None or isinstance(data, dict)):
            data = {**(data or {}), "errors": errors}
        cls = ERRORS.get(name)
        if cls is None:
            return GeneralError(message, data, name)
        return cls(message, data)


class BadRequest(ServiceError):
    """400: the call itself is malformed (bad envelope, bad arguments)."""

    code = 400
    class_name = "bad-request"


class NotAuthenticated(ServiceError):
    """401: no valid authentication."""

    code = 401
    class_name = "not-authenticated"


class PaymentError(ServiceError):
    """402."""

    code = 402
    class_name = "payment-error"


class Forbidden(ServiceError):
    """403: authenticated, but not allowed."""

    code = 403
    class_name = "forbidden"


class NotFound(ServiceError):
    """404: unknown id, path or key."""

    code = 404
    class_name = "not-found"


class MethodNotAllowed(ServiceError):
    """405: the service does not offer this method."""

    code = 405
    class_name = "method-not-allowed"


class NotAcceptable(ServiceError):
    """406."""

    code = 406
    class_name = "not-acceptable"


class Timeout(ServiceError):
    """408: no answer within the call's deadline."""

    code = 408
    class_name = "timeout"


class Conflict(ServiceError):
    """409."""

    code = 409
    class_name = "conflict"


class Gone(ServiceError):
    """410."""

    code = 410
    class_name = "gone"


class LengthRequired(ServiceError):
    """411."""

    code = 411
    class_name = "length-required"


class PayloadTooLarge(ServiceError):
    """413: the call's payload is over ``max_payload_bytes``."""

    code = 413
    class_name = "payload-too-large"


class Unprocessable(ServiceError):
    """422."""

    code = 422
    class_name = "unprocessable"


class TooManyRequests(ServiceError):
    """429."""

    code = 429
    class_name = "too-many-requests"


class GeneralError(ServiceError):
    """500: any other failure; also stands in for an error name outside the allow-list."""

    code = 500
    class_name = "general-error"


class NotImplemented(ServiceError):  # the Feathers name; shadows the builtin in this module only
    """501."""

    code = 501
    class_name = "not-implemented"


class BadGateway(ServiceError):
    """502."""

    code = 502
    class_name = "bad-gateway"


class Unavailable(ServiceError):
    """503: the broker, the provider or a dependency cannot be reached."""

    code = 503
    class_name = "unavailable"


#: The allow-list of error classes a remote error may be rebuilt as, by name.
ERRORS: dict[str, type[ServiceError]] = {
    cls.__name__: cls
    for cls in (
        ServiceError,
        BadRequest,
        NotAuthenticated,
        PaymentError,
        Forbidden,
        NotFound,
        MethodNotAllowed,
        NotAcceptable,
        Timeout,
        Conflict,
        Gone,
        LengthRequired,
        PayloadTooLarge,
        Unprocessable,
        TooManyRequests,
        GeneralError,
        NotImplemented,
        BadGateway,
        Unavailable,
    )
}


def error_from_exception(
    exc: BaseException, *, debug: bool = False, call_id: str | None = None
) -> ServiceError:
    """Turn any exception into a :class:`ServiceError` fit to cross the wire.

    A ``ServiceError`` passes unchanged. Anything else is a bug of the service, whose message may name
    internals (``list indices must be integers``, a host, a query): it becomes ``GeneralError("Internal
    error", {"call_id": ...})``, the id under which the provider logged the detail. With ``debug`` set, the
    message, type and traceback travel instead.
    """
    if isinstance(exc, ServiceError):
        return exc
    if not debug:
        return GeneralError("Internal error", {"call_id": call_id} if call_id else None)
    import traceback

    data = {
        "type": type(exc).__name__,
        "traceback": "".join(traceback.format_exception(exc)),
        **({"call_id": call_id} if call_id else {}),
    }
    return GeneralError(str(exc) or type(exc).__name__, data)
