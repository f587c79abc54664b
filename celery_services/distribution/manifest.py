"""Manifests: what one app instance exposes, as written to the Redis registry (wire protocol v1).

A :class:`Manifest` describes one running instance of an app (its ``key``), the services it exposes and
when it last proved to be alive (``heartbeat``). It travels as JSON; :func:`decode_manifest` is the one
place where untrusted registry entries are turned back into models, and refuses foreign payloads.

:class:`ManifestLimits` caps what one entry may cost its readers: its size is checked before anything
parses it, then its counts of services, and of methods and events per service. A manifest over a limit
raises :class:`ManifestLimitError`, which names the setting that sets the limit.

One piece, past 300 lines: the manifest model, its decoding with the limits that guard it, and the views and
key layout built from it are the registry's wire format, read together.
"""

from __future__ import annotations

import json
import os
import re
import socket
import time
import uuid
from dataclasses import dataclass, fields
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StringConstraints, ValidationError, model_validator

from .protocol import PROTOCOL_VERSION  # entries of another version are ignored

__all__ = [
    "INSTANCE_PATTERN",
    "KEY_PATTERN",
    "PATH_PATTERN",
    "PROTOCOL_VERSION",
    "InstanceInfo",
    "KeyInfo",
    "Manifest",
    "ManifestLimitError",
    "ManifestLimits",
    "RegistryLayout",
    "ServiceManifest",
    "View",
    "decode_manifest",
    "same_view",
    "summarize",
]

KEY_PATTERN = r"^[A-Za-z0-9_-]+$"
"""An app key: also a queue name and the first part of task names and event routing keys."""

PATH_PATTERN = r"^[A-Za-z0-9_-]+(/[A-Za-z0-9_-]+)*$"
"""A service path: segments of :data:`KEY_PATTERN` characters joined by ``/`` (no leading/trailing slash)."""

INSTANCE_PATTERN = r"^[A-Za-z0-9_.:@-]+$"
"""An instance id (e.g. ``uuid4().hex`` or ``host-pid``); no whitespace nor glob characters."""

Key = Annotated[str, StringConstraints(pattern=KEY_PATTERN)]
ServicePath = Annotated[str, StringConstraints(pattern=PATH_PATTERN)]
Instance = Annotated[str, StringConstraints(pattern=INSTANCE_PATTERN)]


class ServiceManifest(BaseModel):
    """One exposed service.

    Attributes:
        path: where the service is mounted on its app (``"articles"``, ``"api/v1/users"``).
        methods: the distributed methods (``"get"``, ``"find"``, custom ones).
        events: the distributed events (``"created"``, custom ones).
        options: JSON-safe service options carried to consumers.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    path: ServicePath
    methods: list[str]
    events: list[str]
    options: dict[str, Any] = Field(default_factory=dict)


class Manifest(BaseModel):
    """What one app instance exposes; immutable (derive new ones with ``model_copy(update=...)``).

    Attributes:
        key: the app key shared by the replicas of an app.
        instance: unique id of this running instance.
        host: host name of the instance.
        pid: process id of the instance.
        started_at: ``time.time()`` when the instance started.
        protocol: wire protocol version (:data:`PROTOCOL_VERSION`).
        heartbeat: ``time.time()`` of the last heartbeat (stamped by the registry on every write).
        services: the exposed services, at most one per path.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    key: Key
    instance: Instance
    host: str
    pid: int
    started_at: float
    protocol: int = PROTOCOL_VERSION
    heartbeat: float
    services: list[ServiceManifest]

    @model_validator(mode="after")
    def _unique_paths(self) -> Manifest:
        paths = [service.path for service in self.services]
        if len(set(paths)) != len(paths):
            raise ValueError(f"duplicate service paths in manifest of {self.key!r}: {sorted(paths)}")
        return self

    @classmethod
    def local(cls, key: str, services: list[ServiceManifest], *, instance: str | None = None) -> Manifest:
        """Build the manifest of the current process (host, pid, now; a random instance id by default).

        Args:
            key: the app key.
            services: the exposed services.
            instance: the instance id; ``uuid4().hex`` when omitted.

        Returns:
            A new manifest with ``started_at`` and ``heartbeat`` set to now.
        """
        now = time.time()
        return cls(
            key=key,
            instance=instance or uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=os.getpid(),
            started_at=now,
            heartbeat=now,
            services=services,
        )

    def service(self, path: str) -> ServiceManifest | None:
        """Return the exposed service mounted at ``path``, or ``None``."""
        for service in self.services:
            if service.path == path:
                return service
        return None

    def same_content(self, other: Manifest) -> bool:
        """Whether both manifests are equal apart from their heartbeat timestamp."""
        return self.model_copy(update={"heartbeat": 0.0}) == other.model_copy(update={"heartbeat": 0.0})


class ManifestLimitError(ValueError):
    """A manifest over one of the :class:`ManifestLimits`.

    Attributes:
        setting: the field of :class:`ManifestLimits` (and setting of the distribution) that was exceeded,
            e.g. ``"max_manifest_bytes"``.
        found: the size or count found.
        limit: the limit.
        manifest: the parsed manifest when a count was exceeded (its key and instance verified), ``None``
            when its size was, since it was then never parsed.
    """

    def __init__(
        self, setting: str, found: int, limit: int, what: str, manifest: Manifest | None = None
    ) -> None:
        super().__init__(f"{what}: {found}, over {setting} = {limit}")
        self.setting = setting
        self.found = found
        self.limit = limit
        self.manifest = manifest


@dataclass(frozen=True)
class ManifestLimits:
    """Caps on one manifest, each field named after the distribution setting that sets it.

    Checked on every manifest read from the registry (an entry over a limit is skipped) and on the one an
    instance publishes (refused). The defaults are those of the settings.
    """

    max_manifest_bytes: int = 262_144
    """Largest serialized manifest, in bytes (UTF-8)."""
    max_manifest_services: int = 500
    """Most services one manifest may list."""
    max_service_methods: int = 200
    """Most methods one service may list."""
    max_service_events: int = 200
    """Most events one service may list."""

    @classmethod
    def of(cls, settings: Any) -> ManifestLimits:
        """The limits a :class:`~.settings.DistributionSettings` (or any object with the same fields) sets."""
        return cls(**{field.name: getattr(settings, field.name) for field in fields(cls)})

    def check_size(self, raw: bytes | str) -> None:
        """Refuse a serialized manifest over :attr:`max_manifest_bytes`, before anything parses it.

        Raises:
            ManifestLimitError: it is too large.
        """
        size = len(raw) if isinstance(raw, bytes) else len(raw.encode("utf-8", "surrogatepass"))
        if size > self.max_manifest_bytes:
            raise ManifestLimitError("max_manifest_bytes", size, self.max_manifest_bytes, "manifest bytes")

    def check_counts(self, manifest: Manifest) -> None:
        """Refuse a manifest listing too many services, or a service listing too many methods or events.

        Raises:
            ManifestLimitError: a count is over its limit (the manifest rides along).
        """
        counts = [("max_manifest_services", len(manifest.services), "services")]
        for service in manifest.services:
            counts.append(
                ("max_service_methods", len(service.methods), f"methods of service '{service.path}'")
            )
            counts.append(("max_service_events", len(service.events), f"events of service '{service.path}'"))
        for setting, found, what in counts:
            limit = getattr(self, setting)
            if found > limit:
                raise ManifestLimitError(setting, found, limit, what, manifest)


def decode_manifest(
    raw: bytes | str,
    *,
    key: str | None = None,
    instance: str | None = None,
    limits: ManifestLimits | None = None,
) -> Manifest:
    """Parse one registry entry, refusing anything that is not a v1 manifest of the expected instance.

    Args:
        raw: the JSON stored in the registry.
        key: the app key its registry key names, checked against the payload when given.
        instance: the instance its registry key names, checked against the payload when given.
        limits: when given, the size of ``raw`` is checked before it is parsed, the counts after.

    Returns:
        The manifest.

    Raises:
        ManifestLimitError: ``raw`` is over one of the ``limits`` (a :class:`ValueError` too).
        ValueError: with a short reason when the payload is not valid JSON, fails validation, speaks
            another protocol version or describes another instance than its registry key says.
    """
    if limits is not None:
        limits.check_size(raw)  # before any parsing: the cost of a huge entry ends here
    try:
        manifest = Manifest.model_validate_json(raw)
    except ValidationError as exc:
        protocol = _protocol_of(raw)
        if protocol is not None and protocol != PROTOCOL_VERSION:
            raise ValueError(f"protocol {protocol!r}, expected {PROTOCOL_VERSION}") from None
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "payload"
        raise ValueError(
            f"invalid manifest ({exc.error_count()} error(s)): {where}: {first['msg']}"
        ) from None
    if manifest.protocol != PROTOCOL_VERSION:
        raise ValueError(f"protocol {manifest.protocol!r}, expected {PROTOCOL_VERSION}")
    if (key is not None and manifest.key != key) or (instance is not None and manifest.instance != instance):
        raise ValueError(
            f"payload describes {manifest.key}:{manifest.instance}, stored under {key}:{instance}"
        )
    if limits is not None:
        limits.check_counts(manifest)
    return manifest


def _protocol_of(raw: bytes | str) -> object:
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    return data.get("protocol") if isinstance(data, dict) else None


View = dict[str, dict[str, Manifest]]
"""Live manifests: app key → instance id → manifest."""


def same_view(a: View, b: View) -> bool:
    """Whether two views hold the same instances with the same content (heartbeats aside)."""
    return a.keys() == b.keys() and all(
        a[key].keys() == b[key].keys() and all(a[key][i].same_content(b[key][i]) for i in a[key]) for key in a
    )


@dataclass(frozen=True)
class InstanceInfo:
    """One live instance, for tables: its manifest facts and how old its last heartbeat is (seconds)."""

    instance: str
    host: str
    pid: int
    started_at: float
    heartbeat_age: float
    services: tuple[ServiceManifest, ...]


@dataclass(frozen=True)
class KeyInfo:
    """One live app key and its instances, sorted by instance id."""

    key: str
    instances: tuple[InstanceInfo, ...]


def summarize(view: View, now: float | None = None) -> list[KeyInfo]:
    """Turn a view into sorted rows with heartbeat ages measured at ``now`` (default: ``time.time()``)."""
    now = time.time() if now is None else now
    return [
        KeyInfo(
            key,
            tuple(
                InstanceInfo(
                    m.instance, m.host, m.pid, m.started_at, max(0.0, now - m.heartbeat), tuple(m.services)
                )
                for _, m in sorted(instances.items())
            ),
        )
        for key, instances in sorted(view.items())
    ]


@dataclass(frozen=True)
class RegistryLayout:
    """Names of the registry's Redis keys and channels under a ``prefix``, and its announcements."""

    prefix: str = "celery_services"

    @property
    def channel(self) -> str:
        """The announcement channel, ``{prefix}:registry``."""
        return f"{self.prefix}:registry"

    @property
    def scan_pattern(self) -> str:
        """SCAN ``MATCH`` pattern of every manifest key (glob characters of the prefix escaped)."""
        return re.sub(r"([*?\[\]\\])", r"\\\1", f"{self.prefix}:manifest:") + "*"

    def name(self, key: str, instance: str) -> str:
        """The Redis key of one instance's manifest, ``{prefix}:manifest:{key}:{instance}``."""
        return f"{self.prefix}:manifest:{key}:{instance}"

    def binding_epoch(self, exchange: str) -> str:
        """The Redis key of the event ``exchange``'s binding epoch, ``{prefix}:event-bindings:{exchange}``
        (:mod:`.event_epoch`)."""
        return f"{self.prefix}:event-bindings:{exchange}"

    def split(self, name: str) -> tuple[str, str] | None:
        """``(key, instance)`` named by a manifest key, or ``None`` for any other key."""
        head = f"{self.prefix}:manifest:"
        key, _, instance = name[len(head) :].partition(":") if name.startswith(head) else ("", "", "")
        return (key, instance) if key and instance else None

    @staticmethod
    def announcement(op: str, key: str, instance: str) -> str:
        """JSON of an announcement: ``op`` is ``"up"``, ``"changed"`` or ``"down"``."""
        return json.dumps({"op": op, "key": key, "instance": instance})

    @staticmethod
    def parse_announcement(data: str) -> tuple[str, str, str] | None:
        """``(op, key, instance)`` of an announcement, or ``None`` when it is malformed."""
        try:
            announced = json.loads(data)
            found = (announced["op"], announced["key"], announced["instance"])
        except (ValueError, TypeError, KeyError):
            return None
        valid = found[0] in ("up", "changed", "down") and all(
            isinstance(part, str) and part for part in found
        )
        return found if valid else None
