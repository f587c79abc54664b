"""The settings model of a distribution: which services travel, how, and where the broker and registry live.

:class:`DistributionSettings` is the Python counterpart of the ``distribution`` object of a
feathers-distributed configuration: its fields, their validation, the values resolved from them and the
service filters. Where the values come from (keyword arguments, ``CELERY_SERVICES_*`` environment variables,
``config/{CELERY_SERVICES_ENV}.toml`` and the ``[distribution]`` table of ``config/default.toml``) is
:mod:`.config`; :meth:`DistributionSettings.load` reads them all. Filters and hooks that are functions can
only be given in code.

One piece, past 300 lines: a pydantic model is its fields and their validators, each field documented where it
is declared.
"""

from __future__ import annotations

import keyword
import os
import re
from collections.abc import Callable
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Annotated, Any, Literal, Self
from urllib.parse import parse_qsl, urlencode, urlsplit

from pydantic import Field, PositiveFloat, PositiveInt, SecretStr, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

from ..core.service import SIGNATURES, STANDARD_EVENTS, STANDARD_METHODS, shadowed
from . import config
from .config import CONFIG_ENV_VAR as CONFIG_ENV_VAR
from .config import ENV_NAME_VAR as ENV_NAME_VAR
from .config import ENV_PREFIX as ENV_PREFIX
from .config import TABLE as TABLE
from .protocol import is_secret_header, mask_url

__all__ = ["DistributionSettings", "LocalServiceInfo"]


@dataclass(frozen=True)
class LocalServiceInfo:
    """A local service as a :attr:`DistributionSettings.services` predicate sees it (feathers-distributed's
    descriptor): ``lambda s: s.path.startswith("api/")``.

    Attributes:
        path: where the service is mounted on the app (no outer slashes).
        service: the service object itself.
    """

    path: str
    service: Any


#: Which local services are exposed: a predicate on the service, or path globs.
ServiceFilter = Callable[[Any], bool] | list[str]
#: Which remote services become proxies: a predicate on the manifest entry, or key / ``key/path`` globs.
RemoteFilter = Callable[[Any], bool] | list[str]

#: Broker, result backend and registry used when nothing is configured.
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"

#: Request headers that travel by default: none of them carries a credential.
DEFAULT_FORWARDED_HEADERS = (
    "accept",
    "accept-language",
    "content-type",
    "user-agent",
    "x-request-id",
    "traceparent",
    "tracestate",
)

_NAME = re.compile(r"[A-Za-z0-9_-]+")
_BROKER_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel", "amqp", "amqps", "pyamqp")
_RESULT_BACKEND_SCHEMES = ("redis", "rediss", "redis+socket", "sentinel")
_REGISTRY_SCHEMES = ("redis", "rediss", "unix", "sentinel")
_HOOK_TYPES = ("before", "after", "error")


def _scheme(url: str) -> str:
    return url.partition("://")[0].lower() if "://" in url else ""


def _schemes(schemes: tuple[str, ...]) -> str:
    return ", ".join(f"{scheme}://" for scheme in schemes)


def _check_url(setting: str, url: str, schemes: tuple[str, ...]) -> None:
    """Refuse a URL a client would misread or quietly replace by its default (the message names ``setting``).

    Each ``;``-separated part (kombu's failover and Sentinel lists) is checked: scheme, host, port, and for
    Redis the database number.
    """
    for part in url.split(";"):
        shown = mask_url(part)
        scheme = _scheme(part)
        if scheme not in schemes:
            raise ValueError(f"{setting} {shown!r}: scheme must be one of {_schemes(schemes)}")
        if scheme in ("redis+socket", "unix"):
            if not urlsplit(part).path:
                raise ValueError(f"{setting} {shown!r}: a socket URL needs the socket's path")
            continue
        parts = urlsplit(part)
        try:
            port = parts.port
        except ValueError:
            raise ValueError(f"{setting} {shown!r}: the port is not a number from 0 to 65535") from None
        if not parts.hostname:
            raise ValueError(f"{setting} {shown!r}: no host")
        if port == 0:
            raise ValueError(f"{setting} {shown!r}: port 0")
        db = parts.path.strip("/")
        if scheme in ("redis", "rediss", "sentinel") and db and not (db.isdigit() and int(db) < 1 << 16):
            raise ValueError(f"{setting} {shown!r}: the database must be a number (/0, /1 ...), not {db!r}")


def _matches_any(name: str, globs: list[str]) -> bool:
    return any(fnmatchcase(name, glob) for glob in globs)


def _socket_to_unix(url: str) -> str:
    """Celery's ``redis+socket:///path?virtual_host=N`` → redis-py's ``unix:///path?db=N``."""
    parts = urlsplit(url)
    query = [("db" if name == "virtual_host" else name, value) for name, value in parse_qsl(parts.query)]
    encoded = urlencode(query)
    return f"unix://{parts.netloc}{parts.path}" + (f"?{encoded}" if encoded else "")


class DistributionSettings(BaseSettings):
    """Settings of the distribution of one app.

    Build them in code (``DistributionSettings(key="my-app", services=lambda s: ...)``: keyword arguments
    and ``CELERY_SERVICES_*`` environment variables), or with :meth:`load`, which also reads configuration
    files. Every value is validated when the settings are built; an invalid one raises
    :class:`pydantic.ValidationError` naming the field. Unknown fields are rejected, so typos fail loudly.
    """

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        extra="forbid",
        validate_default=True,
        use_attribute_docstrings=True,
        # An error quotes what it refuses in its own words (URLs masked): never a secret or a password.
        hide_input_in_errors=True,
    )

    key: str = "app"
    """Name shared by every instance of the app: its queue, partition and task-name prefix
    (``[A-Za-z0-9_-]+``)."""

    services: ServiceFilter = Field(default_factory=lambda: ["*"])
    """Local services exposed to other apps: ``(LocalServiceInfo) -> bool`` in code (``.path``, ``.service``),
    or a list of path globs (``["articles*"]``); ``[]`` exposes nothing."""

    remote_services: RemoteFilter = Field(default_factory=lambda: ["*"])
    """Remote services that become local proxies: ``(manifest_info) -> bool`` in code, or a list of globs,
    each matched against the key alone when it has no ``/`` (``"my-app"``), else against ``"{key}/{path}"``
    (``"my-app/articles*"``, ``"*/articles"``); ``[]`` consumes nothing."""

    remote_service_path: Callable[[Any], str] | None = None
    """Code only: ``(manifest_info) -> str`` giving the local path of a proxy (default: the remote path)."""

    remote_service_options: list[str] | Callable[[Any], list[str]] = Field(default_factory=list)
    """Options of an exposed service carried in its manifest (the names, or ``(service) -> names``)."""

    distributed_methods: list[str] = Field(default_factory=lambda: list(STANDARD_METHODS))
    """Methods exposed and proxied, custom ones included (``publish_article``)."""

    distributed_events: list[str] = Field(default_factory=lambda: list(STANDARD_EVENTS.values()))
    """Events published and re-emitted by proxies, custom ones included (``article_published``)."""

    publish_events: bool = True
    """Publish the distributed events of exposed services (``False``: calls only)."""

    authentication: bool = False
    """``False`` (gateway pattern): remote calls run as internal calls on the provider, no ``provider``,
    ``user`` nor ``authentication`` travels. ``True``: they travel and the provider's hooks judge them."""

    hooks: dict[str, Any] | None = None
    """Code only: hooks applied to every proxy, ``{"before": {"all": [fn], "get": [fn]}, "after": {...},
    "error": {...}}``; a single function stands for a list of one."""

    timeout: PositiveFloat = 20.0
    """Seconds a remote call may take before it fails with ``Timeout``; the call expires with it."""

    lease_timeout: PositiveFloat | None = None
    """Seconds a call in flight on a replica that stopped renewing its lease (killed, paused, cut off)
    waits before another replica of the key is given it (``None``: a quarter of :attr:`timeout`, at least
    1 s). On RabbitMQ, the fast path's connections beat every third of it (AMQP heartbeats, whole seconds),
    and RabbitMQ gives back the call of a connection that stopped beating; Celery's own consumer there
    keeps Celery's ``broker_heartbeat``. A replica paused for longer than this may run the call a second
    time (``params["redelivered"]`` says so); its caller still gets one reply."""

    fast_path: bool = True
    """A worker whose pool runs calls in its own process (``-P threads``, ``solo``, ``gevent``, ``eventlet``)
    serves its key's queue outside Celery's consumer loop, as many calls at once as the pool has slots
    (``-c``; one with ``solo``): blocking pops straight on Redis, or its own consumers on RabbitMQ (about 3x
    quicker per call; calls stay Celery tasks that Flower shows and plain workers can serve). A prefork
    pool, and ``False``, keep Celery's own consumer, with its task signals and time limits."""

    heartbeat_interval: PositiveFloat = 5.0
    """Seconds between two refreshes of this instance's manifest in the registry."""

    registry_ttl: PositiveFloat | None = None
    """Seconds a manifest lives without heartbeat (``None``: 2.5 heartbeat intervals, so that a dead
    instance is forgotten within three intervals)."""

    rescan_interval: PositiveFloat | None = None
    """Seconds between two full rescans of the registry, the backstop of its pub/sub announcements
    (``None``: the distribution's default)."""

    broker_url: str | None = None
    """Celery broker (``redis://``, ``amqp://`` ...); ``None``: Celery's own ``CELERY_BROKER_URL`` variable
    when set, else ``redis://127.0.0.1:6379/0``."""

    result_backend: str | None = None
    """Celery result backend, Redis only; ``None``: the broker when it is Redis, else the default Redis."""

    registry_url: str | None = None
    """Redis holding the manifests (``redis://``, ``rediss://``, ``unix://``); ``None``: the result
    backend's."""

    sentinel_master: str | None = None
    """The name of the Redis master that ``sentinel://`` URLs lead to (broker, result backend, registry:
    Celery's ``master_name`` transport option); required when one of them is a ``sentinel://`` URL."""

    tls_ca_file: str | None = None
    """CA bundle that verifies the Redis servers of ``rediss://`` URLs (default: the system's)."""

    tls_cert_file: str | None = None
    """Client certificate presented to Redis over TLS, when the server asks for one."""

    tls_key_file: str | None = None
    """Private key of :attr:`tls_cert_file`."""

    event_delivery: Literal["broadcast", "group"] = "broadcast"
    """``broadcast``: every instance of a consumer re-emits every event (auto-deleted queue per instance);
    ``group``: each event is handled once per consumer app (durable queue per key, kept while it is down)."""

    max_payload_bytes: PositiveInt = 1_048_576
    """Largest serialized call or event accepted; larger ones fail with ``BadRequest``."""

    extra_params: list[str] = Field(default_factory=list)
    """Params that travel with a call besides ``query``, ``provider``, ``user``, ``authentication`` and
    ``headers``."""

    forwarded_headers: list[str] = Field(default_factory=lambda: list(DEFAULT_FORWARDED_HEADERS))
    """Request headers (``params["headers"]``) that travel with a call, by name (compared in lower case).
    Credential headers (``authorization``, ``cookie``, ``x-api-key`` …: see
    :func:`~.protocol.is_secret_header`) travel only with :attr:`authentication` on, and only when listed
    here; with it on, ``authorization`` is added, the one header authentication needs."""

    signing_keys: dict[str, list[SecretStr]] = Field(default_factory=dict)
    """Message signing (HMAC-SHA256) of calls and replies: app key → secrets, ``"*"`` for every key without
    its own entry (a plain list stands for ``{"*": [...]}``; in the environment, a value that is not JSON is
    such a list, split at commas: a secret holding a comma is given in JSON). A caller signs with the first
    secret of its own key, a provider checks with every secret of the caller's key. Key rotation: add the new
    secret second everywhere, then make it first everywhere, then drop the old one (a new secret put first
    at once signs calls and replies that apps not yet given it refuse). Empty: no signing; a provider with
    signing on refuses unsigned, forged and replayed calls (``NotAuthenticated``)."""

    allow_callers: dict[str, list[str]] | None = None
    """Which caller keys may call which ``path.method`` of this app's services, as globs:
    ``{"gateway": ["articles.*"], "reports": ["articles.find"]}`` (``"*"`` as a caller key matches any).
    ``None``: every caller. A refused call gets ``Forbidden``. The caller key is proven with
    :attr:`signing_keys`; without signing it is what the caller says (advisory)."""

    pins: dict[str, str] = Field(default_factory=dict)
    """Local path → the app key whose service is mounted there, whatever else claims the path."""

    max_manifest_bytes: PositiveInt = 262_144
    """Largest manifest accepted from the registry (and published); larger ones are skipped and logged."""

    max_manifest_services: PositiveInt = 500
    """Most services a manifest may list; a manifest with more is skipped and logged."""

    max_service_methods: PositiveInt = 200
    """Most methods one service of a manifest may list; a manifest with more is skipped and logged."""

    max_service_events: PositiveInt = 200
    """Most events one service of a manifest may list; a manifest with more is skipped and logged."""

    event_context: list[str] = Field(default_factory=list)
    """Extra context fields allowed in published events besides ``method``, ``id`` and ``params.query`` /
    ``params.provider``."""

    debug: bool = False
    """Log every call, event and registry change."""

    log_format: Literal["text", "json"] = "text"
    """Lines of a worker's log (``celery-services worker`` and a plain ``celery worker`` of the app):
    ``text`` (Celery's format, the call fields appended), or ``json``: one JSON object per line with the
    call fields (``key``, ``path``, ``method``, ``call_id``) and, with tracing on, ``trace_id`` and
    ``span_id``."""

    metrics: bool = False
    """Count calls, events and live instances with ``prometheus_client`` (the ``metrics`` extra) in this
    process: the gateway serves them on ``/metrics``; see :attr:`metrics_port` for a worker."""

    metrics_port: Annotated[int, Field(ge=0, le=65535)] | None = None
    """A worker of the app serves its metrics on this port (``prometheus_client``'s HTTP server, started
    once per worker process); implies :attr:`metrics`. ``None``: no server."""

    metrics_host: str = "127.0.0.1"
    """The interface :attr:`metrics_port` listens on (``0.0.0.0`` for a scraper in another container)."""

    registry_prefix: Annotated[str, Field(pattern=r"^\S+$")] = "celery_services"
    """Prefix of the registry keys and channel (``{prefix}:manifest:{key}:{instance}``)."""

    events_exchange: Annotated[str, Field(pattern=r"^\S+$")] = "celery_services.events"
    """Kombu topic exchange the events travel through."""

    # -- validation ---------------------------------------------------------------------------------------

    @model_validator(mode="before")
    @classmethod
    def _celery_broker_variable(cls, data: Any) -> Any:
        # Below every source of ours (arguments, CELERY_SERVICES_*, files), above the built-in default.
        celery_broker = os.environ.get("CELERY_BROKER_URL")
        if celery_broker and isinstance(data, dict) and not data.get("broker_url"):
            data = {**data, "broker_url": celery_broker}
        return data

    @field_validator("key")
    @classmethod
    def _check_key(cls, value: str) -> str:
        if not _NAME.fullmatch(value):
            raise ValueError(f"key {value!r} must match [A-Za-z0-9_-]+ (it names a queue and tasks)")
        return value

    @field_validator("services", "remote_services", mode="before")
    @classmethod
    def _one_glob_is_a_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("services", "remote_services")
    @classmethod
    def _check_globs(cls, value: ServiceFilter) -> ServiceFilter:
        if isinstance(value, list) and any(not glob for glob in value):
            raise ValueError("globs must not be empty strings")
        return value

    @field_validator("distributed_methods")
    @classmethod
    def _check_methods(cls, value: list[str]) -> list[str]:
        for method in value:
            spelled = method.replace("-", "_")
            if not spelled.isidentifier() or not method[:1].isalpha() or keyword.iskeyword(spelled):
                raise ValueError(f"method {method!r}: a letter, then letters, digits, '_' and '-'")
            if method not in SIGNATURES and shadowed(method):  # app.use would refuse the proxy
                raise ValueError(f"method {method!r}: taken by the service wrapper's own attributes")
        return value

    @field_validator("distributed_events")
    @classmethod
    def _check_events(cls, value: list[str]) -> list[str]:
        for event in value:
            if not _NAME.fullmatch(event):
                raise ValueError(f"event {event!r} must match [A-Za-z0-9_-]+ (it is part of a routing key)")
        return value

    @field_validator("extra_params", "event_context")
    @classmethod
    def _check_names(cls, value: list[str]) -> list[str]:
        if any(not name for name in value):
            raise ValueError("names must not be empty strings")
        return value

    @field_validator("forwarded_headers")
    @classmethod
    def _lower_headers(cls, value: list[str]) -> list[str]:
        if any(not name for name in value):
            raise ValueError("header names must not be empty strings")
        return [name.lower() for name in value]

    @field_validator("signing_keys", mode="before")
    @classmethod
    def _one_list_is_every_key(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = [value]
        return {"*": value} if isinstance(value, list | tuple) else value

    @field_validator("signing_keys")
    @classmethod
    def _check_signing_keys(cls, value: dict[str, list[SecretStr]]) -> dict[str, list[SecretStr]]:
        for key, secrets in value.items():
            if key != "*" and not _NAME.fullmatch(key):
                raise ValueError(f"signing_keys: {key!r} is not an app key nor '*'")
            if not secrets:
                raise ValueError(f"signing_keys[{key!r}] needs at least one secret")
            if any(len(secret.get_secret_value()) < 16 for secret in secrets):
                raise ValueError(f"signing_keys[{key!r}]: secrets must be at least 16 characters")
        return value

    @field_validator("allow_callers", "pins")
    @classmethod
    def _check_key_names(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        for name in value or {}:
            if name != "*" and not _NAME.fullmatch(name.replace("/", "_")):
                raise ValueError(f"{name!r} is not an app key or path")
        return value

    @field_validator("hooks")
    @classmethod
    def _check_hooks(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        if value is None:
            return None
        normalized: dict[str, Any] = {}
        for hook_type, by_method in value.items():
            if hook_type not in _HOOK_TYPES:
                raise ValueError(f"hook type {hook_type!r} is not one of {', '.join(_HOOK_TYPES)}")
            if not isinstance(by_method, dict):
                raise ValueError(f"hooks[{hook_type!r}] must map 'all' or method names to hooks")
            normalized[hook_type] = {}
            for method, hooks in by_method.items():
                listed = [hooks] if callable(hooks) else hooks
                if not isinstance(listed, list | tuple) or not all(callable(hook) for hook in listed):
                    raise ValueError(f"hooks[{hook_type!r}][{method!r}] must be a function or a list of them")
                normalized[hook_type][method] = list(listed)
        return normalized

    @field_validator("broker_url")
    @classmethod
    def _check_broker(cls, value: str | None) -> str | None:
        if value is not None:
            _check_url("broker_url", value, _BROKER_SCHEMES)
        return value

    @field_validator("result_backend")
    @classmethod
    def _check_result_backend(cls, value: str | None) -> str | None:
        if value is not None and _scheme(value) not in _RESULT_BACKEND_SCHEMES:
            schemes = _schemes(_RESULT_BACKEND_SCHEMES)
            raise ValueError(
                f"result_backend {mask_url(value)!r} must be a Redis URL ({schemes}): "
                "the registry and the callers read results from Redis"
            )
        if value is not None:
            _check_url("result_backend", value, _RESULT_BACKEND_SCHEMES)
        return value

    @field_validator("registry_url")
    @classmethod
    def _check_registry(cls, value: str | None) -> str | None:
        if value is not None and _scheme(value) not in _REGISTRY_SCHEMES:
            raise ValueError(
                f"registry_url {mask_url(value)!r} must be a Redis URL ({_schemes(_REGISTRY_SCHEMES)}): "
                "manifests live in Redis"
            )
        if value is not None:
            _check_url("registry_url", value, _REGISTRY_SCHEMES)
        return value

    @model_validator(mode="after")
    def _check_credential_headers(self) -> Self:
        secret = [name for name in self.forwarded_headers if is_secret_header(name)]
        if secret and not self.authentication:
            raise ValueError(
                f"forwarded_headers lists credential headers ({', '.join(secret)}): they travel only with "
                "authentication = true"
            )
        return self

    @model_validator(mode="after")
    def _check_sentinel_master(self) -> Self:
        # Checked here, not at the first connection: kombu would only fail in the worker's consumer.
        for setting, url in (
            ("broker_url", self.resolved_broker_url()),
            ("result_backend", self.resolved_result_backend()),
            ("registry_url", self.resolved_registry_url()),
        ):
            if _scheme(url) == "sentinel" and not self.sentinel_master:
                raise ValueError(f"{setting} is a sentinel:// URL: set sentinel_master (the master's name)")
        return self

    @model_validator(mode="after")
    def _check_ttl(self) -> Self:
        if self.registry_ttl is not None and self.registry_ttl <= self.heartbeat_interval:
            raise ValueError(
                f"registry_ttl ({self.registry_ttl}) must exceed "
                f"heartbeat_interval ({self.heartbeat_interval})"
            )
        return self

    # -- resolved values ----------------------------------------------------------------------------------

    def resolved_broker_url(self) -> str:
        """The broker to use: :attr:`broker_url`, else the default local Redis.

        Returns:
            A Celery broker URL.
        """
        return self.broker_url or DEFAULT_REDIS_URL

    def resolved_result_backend(self) -> str:
        """The result backend: :attr:`result_backend`, else the broker when it is Redis, else the default.

        Returns:
            A Celery Redis result backend URL.
        """
        if self.result_backend:
            return self.result_backend
        if self.broker_url and _scheme(self.broker_url) in _RESULT_BACKEND_SCHEMES:
            return self.broker_url
        return DEFAULT_REDIS_URL

    def resolved_registry_url(self) -> str:
        """The Redis holding the manifests: :attr:`registry_url`, else the result backend's Redis.

        Returns:
            A URL for ``redis.Redis.from_url`` (a Celery ``redis+socket://`` URL is rewritten as ``unix://``).
        """
        if self.registry_url:
            return self.registry_url
        backend = self.resolved_result_backend()
        return _socket_to_unix(backend) if _scheme(backend) == "redis+socket" else backend

    def events_queue_prefix(self) -> str:
        """Prefix of the event queues of this registry's consumers: a sweep only judges instances it sees.

        Returns:
            ``{registry_prefix}.events``.
        """
        return f"{self.registry_prefix}.events"

    def resolved_lease_timeout(self) -> float:
        """Seconds without lease renewal after which a call in flight is redelivered.

        Returns:
            :attr:`lease_timeout`, else a quarter of :attr:`timeout` (at least 1 s).
        """
        return self.lease_timeout if self.lease_timeout is not None else max(1.0, self.timeout / 4)

    def resolved_forwarded_headers(self) -> frozenset[str]:
        """The request headers that travel with a call (see :attr:`forwarded_headers`).

        Returns:
            Lower-case header names; ``authorization`` among them when :attr:`authentication` is on.
        """
        names = frozenset(self.forwarded_headers)
        return names | {"authorization"} if self.authentication else names

    def signing_secrets(self, key: str) -> list[bytes]:
        """The secrets that sign and check the messages of app ``key`` (first one signs).

        Args:
            key: An app key.

        Returns:
            Its own secrets, else those of ``"*"``, else ``[]`` (no signing).
        """
        secrets = self.signing_keys.get(key) or self.signing_keys.get("*") or []
        return [secret.get_secret_value().encode() for secret in secrets]

    def resolved_registry_ttl(self) -> float:
        """Seconds a manifest lives without heartbeat: :attr:`registry_ttl`, else 2.5 heartbeat intervals.

        Returns:
            The TTL in seconds.
        """
        return self.registry_ttl if self.registry_ttl is not None else 2.5 * self.heartbeat_interval

    # -- filters ------------------------------------------------------------------------------------------

    def exposes(self, service: Any, path: str) -> bool:
        """Whether a local service is exposed to other apps.

        Args:
            service: The service object.
            path: Its path on the app, matched against :attr:`services` globs (outer slashes ignored).

        Returns:
            True when the service must be exposed (a :attr:`services` predicate receives a
            :class:`LocalServiceInfo` of both).
        """
        if callable(self.services):
            return bool(self.services(LocalServiceInfo(path.strip("/"), service)))
        return _matches_any(path.strip("/"), self.services)

    def consumes(self, key: str, path: str, manifest_info: Any) -> bool:
        """Whether a remote service becomes a local proxy.

        Args:
            key: Key of the app providing the service.
            path: Path of the service on that app.
            manifest_info: Its manifest entry, given to a :attr:`remote_services` predicate.

        Returns:
            True when the service must be proxied. Never true for this app's own key.
        """
        if key == self.key:
            return False
        if callable(self.remote_services):
            return bool(self.remote_services(manifest_info))
        full = f"{key}/{path.strip('/')}"
        return any(fnmatchcase(full if "/" in glob else key, glob) for glob in self.remote_services)

    def local_path(self, info: Any, default: str) -> str:
        """Path under which a proxy is mounted locally.

        Args:
            info: The manifest entry of the remote service, given to :attr:`remote_service_path`.
            default: The path to use without alias (usually the remote path).

        Returns:
            The local path.

        Raises:
            ValueError: The alias function did not return a non-empty string.
        """
        if self.remote_service_path is None:
            return default
        path = self.remote_service_path(info)
        if not isinstance(path, str) or not path.strip("/"):
            raise ValueError(f"remote_service_path returned {path!r}, not a non-empty path")
        return path

    def service_options(self, service: Any) -> list[str]:
        """Names of the service options carried in the manifest of an exposed service.

        Args:
            service: The exposed service, given to a :attr:`remote_service_options` function.

        Returns:
            The option names.
        """
        if callable(self.remote_service_options):
            return list(self.remote_service_options(service))
        return list(self.remote_service_options)

    # -- loading ------------------------------------------------------------------------------------------

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Keyword arguments, then environment variables, then the files chosen by :meth:`load`.

        Files come last, the environment-specific one before the base one. Built directly (not by
        :meth:`load`), the settings read no file.
        """
        config.check_environment(list(settings_cls.model_fields))
        return (init_settings, config.CommaListEnvSource(settings_cls), *config.file_sources(settings_cls))

    @classmethod
    def config_files(cls, path: str | os.PathLike[str] | None = None) -> list[Path]:
        """The configuration files :meth:`load` reads, lowest priority first (:func:`.config.config_files`).

        Args:
            path: The base file; default: ``$CELERY_SERVICES_CONFIG``, else ``config/default.toml`` in the
                current directory when it exists.

        Returns:
            The base file (when there is one), then ``{its directory}/{$CELERY_SERVICES_ENV}.toml`` when that
            variable names an environment.

        Raises:
            FileNotFoundError: A file named explicitly (argument or environment variable) does not exist.
            ValueError: ``CELERY_SERVICES_ENV`` is not a plain name.
        """
        return config.config_files(path)

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, **overrides: Any) -> Self:
        """Build the settings from files, environment and keyword arguments.

        Priority, highest first: ``overrides``; ``CELERY_SERVICES_*`` environment variables (lists and
        tables as JSON, ``CELERY_SERVICES_DISTRIBUTED_METHODS='["find"]'``); the ``[distribution]`` table
        of ``config/{CELERY_SERVICES_ENV}.toml``; that of the base file (see :meth:`config_files`).

        Args:
            path: The base TOML file; see :meth:`config_files` for the default.
            **overrides: Settings given in code (functions included).

        Returns:
            The validated settings.

        Raises:
            FileNotFoundError: A file named explicitly does not exist.
            pydantic.ValidationError: A value is invalid or a field unknown; the error names the field.
        """
        with config.reading(tuple(cls.config_files(path))):
            return cls(**overrides)
