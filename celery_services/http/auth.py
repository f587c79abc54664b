"""Authentication of the gateway's clients: who is calling, as a user the services' hooks can judge.

An *authenticate* step turns a request into a user: any callable ``(request) -> user | None`` (sync or
async) given to ``asgi_app(app, authenticate=...)``, raising :class:`~.NotAuthenticated` to refuse. It runs
on every REST call and on ``/events`` (the healthcheck and the example page stay public); its user reaches
the services' hooks as ``params["user"]``, with ``params["provider"] == "rest"``, so a permission hook works
on a remote proxy exactly as on a local service (a proxy's hooks run in the gateway, before the call
travels).

:class:`JWTAuthentication` is the ready one, checking tokens with PyJWT: HS256 with a shared secret, or
RS256 / ES256 with a public key, from :class:`JWTSettings` (``CELERY_SERVICES_JWT_*``); tokens must carry
``exp``, and the user is their claims. The token comes from ``Authorization: Bearer <token>``; on
``/events`` also from an ``access_token`` query parameter, since the browser's ``EventSource`` cannot set
headers. Such a URL lands in access logs and proxies' logs: keep those private and the tokens short-lived.
(A cookie would stay out of URLs, but a browser sends it with other sites' requests too, which calls for
CSRF defences; a bearer token is only ever sent on purpose.) The query parameter is read only where the
gateway allows it: it marks its ``/events`` requests with :data:`TOKEN_IN_QUERY`, so
``GET /articles/events?access_token=...`` (a REST ``get``) is not let in by it.

A user carrying ``exp`` (a token's claims, as :class:`JWTAuthentication`'s users are) is authenticated until
then only (:func:`expired`): REST checks its token at each request, but a socket's login and an ``/events``
stream outlive the request that showed it, so at ``exp`` a socket's calls are refused, no more events go to
either, and the stream ends (its client reconnects with a fresh token), as Feathers' JWT strategy drops a
connection's authentication at ``exp``. The expiry is the user's own claim, read where it is used: nothing
else must be kept beside the user, and a custom step whose users carry ``exp`` gets the same. (``leeway``
lets a token in a little late; it does not lengthen a connection.)

Without an authenticate step the gateway is anonymous, as a development gateway on loopback may be;
:func:`warn_if_anonymous` says so at start when it listens on any other interface.
"""

from __future__ import annotations

import inspect
import ipaddress
import logging
import math
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import jwt
from pydantic import Field, SecretStr, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict
from starlette.requests import HTTPConnection

from ..core.errors import NotAuthenticated
from ..distribution.config import check_environment

__all__ = [
    "TOKEN_IN_QUERY",
    "Authenticate",
    "JWTAuthentication",
    "JWTSettings",
    "authenticate_request",
    "bearer_token",
    "expired",
    "expires_at",
    "warn_if_anonymous",
]

log = logging.getLogger("celery_services.http")

#: ``(request) -> user | None``, sync or async; raise :class:`NotAuthenticated` to refuse.
Authenticate = Callable[[HTTPConnection], Any | Awaitable[Any]]

#: The ASGI scope key the gateway sets on the requests that may carry their token as ``?access_token=``
#: (``/events``: ``EventSource`` cannot send headers).
TOKEN_IN_QUERY = "celery_services.token_in_query"

_ASYMMETRIC = ("RS256", "RS384", "RS512", "ES256", "ES384", "ES512", "PS256")


class JWTSettings(BaseSettings):
    """How the gateway checks JSON Web Tokens (environment: ``CELERY_SERVICES_JWT_SECRET`` …)."""

    model_config = SettingsConfigDict(
        env_prefix="CELERY_SERVICES_JWT_", extra="forbid", hide_input_in_errors=True
    )

    secret: SecretStr | None = None
    """Shared secret of HS256 tokens (at least 32 characters)."""

    public_key: str | None = None
    """PEM public key of RS256 / ES256 tokens (or :attr:`public_key_file`)."""

    public_key_file: str | None = None
    """File holding :attr:`public_key`."""

    algorithms: list[str] = Field(default_factory=lambda: ["HS256"])
    """Accepted algorithms; never ``none``."""

    audience: str | None = None
    """Required ``aud`` claim, when set."""

    issuer: str | None = None
    """Required ``iss`` claim, when set."""

    leeway: float = 0.0
    """Seconds of clock skew tolerated on ``exp`` / ``nbf``."""

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """pydantic-settings' sources, once a misspelt variable is refused: a typo of ``AUDIENCE`` or
        ``ISSUER`` would turn that check off without a word."""
        check_environment(list(settings_cls.model_fields), prefix="CELERY_SERVICES_JWT_")
        return init_settings, env_settings, dotenv_settings, file_secret_settings

    @model_validator(mode="after")
    def _check(self) -> JWTSettings:
        if any(alg.lower() == "none" for alg in self.algorithms) or not self.algorithms:
            raise ValueError("algorithms must name real algorithms (never 'none')")
        asymmetric = [alg for alg in self.algorithms if alg in _ASYMMETRIC]
        if asymmetric and not (self.public_key or self.public_key_file):
            raise ValueError(f"{', '.join(asymmetric)} tokens need public_key or public_key_file")
        if len(asymmetric) < len(self.algorithms):
            if self.secret is None:
                raise ValueError("HS* tokens need a secret (CELERY_SERVICES_JWT_SECRET)")
            if len(self.secret.get_secret_value()) < 32:
                raise ValueError("the JWT secret must be at least 32 characters")
        return self


def bearer_token(connection: HTTPConnection, *, query: bool = False) -> str | None:
    """The token of ``Authorization: Bearer <token>``, else (with ``query``) of ``?access_token=``.

    Args:
        connection: the request.
        query: also read ``?access_token=``; pass ``bool(connection.scope.get(TOKEN_IN_QUERY))`` to accept
            it only where the gateway allows it.
    """
    header = connection.headers.get("authorization", "")
    scheme, _, token = header.strip().partition(" ")
    if scheme.lower() in ("bearer", "jwt") and token.strip():
        return token.strip()
    if query:
        return connection.query_params.get("access_token") or None
    return None


class JWTAuthentication:
    """The JWT authenticate step: the request's token checked, its claims as the user.

    Args:
        settings: how tokens are checked (default: :class:`JWTSettings` from the environment).
        required: refuse requests without a token (``False``: they pass as anonymous, ``user = None``).
    """

    def __init__(self, settings: JWTSettings | None = None, *, required: bool = True) -> None:
        self.settings = settings or JWTSettings()
        self.required = required
        key: Any = None
        if self.settings.public_key_file:
            with open(self.settings.public_key_file, encoding="utf-8") as file:
                key = file.read()
        key = key or self.settings.public_key
        self._keys = {
            alg: (key if alg in _ASYMMETRIC else self.settings.secret.get_secret_value())  # type: ignore[union-attr]
            for alg in self.settings.algorithms
        }

    def verify(self, token: str) -> dict[str, Any]:
        """The claims of a valid token.

        Raises:
            NotAuthenticated: the token is malformed, forged, expired, or of another audience or issuer.
        """
        try:
            algorithm = jwt.get_unverified_header(token).get("alg")  # any JSON: a list is unhashable
            if not isinstance(algorithm, str) or algorithm not in self._keys:
                raise jwt.InvalidAlgorithmError("algorithm not accepted")
            claims: dict[str, Any] = jwt.decode(
                token,
                self._keys[algorithm],
                algorithms=[algorithm],
                audience=self.settings.audience,
                issuer=self.settings.issuer,
                leeway=self.settings.leeway,
                options={"require": ["exp"]},
            )
        except jwt.ExpiredSignatureError:
            raise NotAuthenticated("Token expired") from None
        except jwt.PyJWTError:
            raise NotAuthenticated("Invalid token") from None  # never why: that would help a forger
        return claims

    def __call__(self, connection: HTTPConnection) -> dict[str, Any] | None:
        token = bearer_token(connection, query=bool(connection.scope.get(TOKEN_IN_QUERY)))
        if token is None:
            if self.required:
                raise NotAuthenticated("Not authenticated: send Authorization: Bearer <token>")
            return None
        return self.verify(token)


async def authenticate_request(authenticate: Authenticate | None, connection: HTTPConnection) -> Any:
    """The user of ``connection`` by ``authenticate`` (``None`` without one: the gateway is anonymous)."""
    if authenticate is None:
        return None
    user = authenticate(connection)
    if inspect.isawaitable(user):
        user = await user
    return user


def expires_at(user: Any) -> float:
    """When the authentication of ``user`` ends (seconds since the epoch): the ``exp`` of a user that is a
    token's claims; ``math.inf`` when it has none (it lasts as long as its connection)."""
    exp = user.get("exp") if isinstance(user, Mapping) else None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else math.inf


def expired(user: Any) -> bool:
    """Whether the authentication of ``user`` has ended (see :func:`expires_at`)."""
    return time.time() >= expires_at(user)


def warn_if_anonymous(host: str, authenticate: Authenticate | None) -> bool:
    """Log a warning when a gateway without ``authenticate`` listens on ``host`` other than loopback.

    Returns:
        Whether it warned (a host name other than ``localhost`` counts as reachable from elsewhere).
    """
    if authenticate is not None or _loopback(host):
        return False
    log.warning(
        "the HTTP gateway listens on %r without authentication: every client is anonymous and hears every "
        "event (asgi_app(authenticate=JWTAuthentication()), or serve --auth jwt)",
        host,
    )
    return True


def _loopback(host: str) -> bool:
    if host.strip().lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip().strip("[]")).is_loopback
    except ValueError:
        return False
