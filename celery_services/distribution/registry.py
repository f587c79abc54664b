"""The Redis registry: providers publish their manifests, consumers discover them (wire protocol v1).

One key per app instance, ``{prefix}:manifest:{key}:{instance}``, holds its :class:`Manifest` JSON with a TTL
of 2.5 heartbeats; a heartbeat thread rewrites it silently. The channel ``{prefix}:registry`` announces
``{"op": "up"|"changed"|"down", "key", "instance"}``; a watcher applies each announcement with one GET, learns
of deaths from one ``EXISTS`` over its known entries every quarter heartbeat (Redis only expires a key it
touches or samples) and from expiry notifications (``__keyevent@{db}__:expired``) where the server's operator
enabled them (the library never changes ``notify-keyspace-events``: server configuration is shared by every
app on it), and rescans periodically as a backstop for anything pub/sub lost (e.g. while reconnecting).

Every entry read (snapshot, rescan, announcement) is held to the registry's :class:`ManifestLimits` (the
settings ``max_manifest_bytes``, ``max_manifest_services``, ``max_service_methods``, ``max_service_events``):
its size is checked before it is parsed, then its counts of services, and of methods and events per service.
An entry over a limit stays in the view as its instance offering no service (it is still alive: its event
queues are not swept as a dead consumer's), so no consumer mounts a proxy or binds an event of it; a warning
naming the limit and its setting is logged once per entry and limit, not at every rescan.
:meth:`Registry.publish` refuses this instance's own manifest over a limit (:class:`ManifestLimitError`); a
heartbeat whose new content is refused keeps the last accepted manifest alive. The size check bounds the
parsing, not the transfer: an entry is still read whole from Redis.

One piece, past 300 lines: the publishing side and the watcher share the key layout, the connection and the
live view, and the watcher's loop (subscribe, snapshot, listen, probe, rescan) only reads right in one place.
"""

from __future__ import annotations

import builtins
import logging
import re
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, cast

import redis
from pydantic import ValidationError
from redis.backoff import NoBackoff
from redis.retry import Retry

from .manifest import (
    KeyInfo,
    Manifest,
    ManifestLimitError,
    ManifestLimits,
    RegistryLayout,
    View,
    decode_manifest,
    same_view,
    summarize,
)
from .redis_clients import RedisOptions, redis_client

if TYPE_CHECKING:
    from .settings import DistributionSettings

__all__ = ["OnChange", "Registry"]

log = logging.getLogger("celery_services.registry")

_POLL = 0.1  # longest a thread waits before noticing close()
_MAX_BACKOFF = 5.0

OnChange = Callable[[View], None]


class Registry:
    """Publish manifests to, and discover them from, a Redis registry. Thread-safe.

    Args:
        url: Redis URL (``redis://host:port/db``, ``rediss://``, ``unix://``, ``sentinel://``).
        prefix: namespace of the registry keys and channel.
        heartbeat_interval: seconds between heartbeats.
        ttl: seconds an entry lives without a heartbeat (2.5 intervals by default: one missed beat is
            tolerated, and with the watcher probing every quarter interval a dead instance is gone
            within 3 intervals of its death).
        rescan_interval: seconds between the watcher's full rescans; 3 heartbeat intervals by default.
        limits: caps on every manifest read and published (the settings' defaults when omitted).
        redis_options: the Sentinel master and TLS files its connections need (``sentinel://``, ``rediss://``).
    """

    def __init__(
        self,
        url: str,
        *,
        prefix: str = "celery_services",
        heartbeat_interval: float = 5.0,
        rescan_interval: float | None = None,
        ttl: float | None = None,
        limits: ManifestLimits | None = None,
        redis_options: RedisOptions | None = None,
    ) -> None:
        if heartbeat_interval <= 0 or (rescan_interval is not None and rescan_interval <= 0):
            raise ValueError("heartbeat_interval and rescan_interval must be positive")
        self.layout = RegistryLayout(prefix)
        self.limits = limits if limits is not None else ManifestLimits()
        self.heartbeat_interval = heartbeat_interval
        self.rescan_interval = rescan_interval if rescan_interval is not None else 3 * heartbeat_interval
        self.ttl_ms = max(1, round((ttl if ttl is not None else 2.5 * heartbeat_interval) * 1000))
        self.probe_interval = max(heartbeat_interval / 4, 0.05)
        timeouts = {"socket_timeout": max(5.0, heartbeat_interval), "socket_connect_timeout": 5.0}
        name = re.sub(r"\s", "_", f"{prefix}:registry")  # CLIENT LIST shows who is who
        self._client = redis_client(url, redis_options, client_name=name, **timeouts)
        # No silent reconnect of the subscriber: a lost connection must surface so we resubscribe + rescan.
        # Over Sentinel, a failover drops it as well (redis_clients.py): resubscribed on the new master.
        self._sub_client = redis_client(
            url, redis_options, client_name=f"{name}-watch", retry=Retry(NoBackoff(), 0), **timeouts
        )
        db = int(self._client.connection_pool.connection_kwargs.get("db", 0))
        self.expired_channel = f"__keyevent@{db}__:expired"
        self._closing = threading.Event()
        self._lock = threading.RLock()  # provider state
        self._suppliers: builtins.list[Callable[[], Manifest]] = []
        self._published: dict[tuple[str, str], Manifest] = {}
        self._withdrawn: set[tuple[str, str]] = set()
        #: Publishes so far: a heartbeat whose supplier ran before the last one holds older content.
        self._publishes = 0
        self._heartbeat_thread: threading.Thread | None = None
        self._view_lock = threading.Lock()  # consumer state
        self._view: View = {}
        # Instances kept in the view, though their entry is missing, until a time.monotonic(): see _deliver.
        self._kept: dict[tuple[str, str], float] = {}
        self._synced = threading.Event()
        self._watch_thread: threading.Thread | None = None
        # registry key → what was logged about it: the hash of a bad payload, or the limit it is over
        self._reported: dict[str, object] = {}

    @classmethod
    def from_settings(cls, settings: DistributionSettings) -> Registry:
        """The registry ``settings`` describe: URL, prefix, heartbeat, TTL, rescans and manifest limits."""
        return cls(
            settings.resolved_registry_url(),
            prefix=settings.registry_prefix,
            heartbeat_interval=settings.heartbeat_interval,
            rescan_interval=settings.rescan_interval,
            ttl=settings.resolved_registry_ttl(),
            limits=ManifestLimits.of(settings),
            redis_options=RedisOptions.of(settings),
        )

    # -- provider ------------------------------------------------------------------------------------------

    def publish(self, manifest: Manifest, *, changed: bool = False) -> Manifest:
        """Write a manifest (heartbeat stamped now, TTL 2.5 heartbeats) and announce it, in one round trip.

        Args:
            manifest: the instance's manifest.
            changed: announce ``"changed"`` instead of ``"up"``.

        Returns:
            The manifest as written, with its new heartbeat.

        Raises:
            ManifestLimitError: the manifest is over one of :attr:`limits` (a :class:`ValueError`); nothing
                is written, every reader would skip it.
        """
        stamped = manifest.model_copy(update={"heartbeat": time.time()})
        payload = stamped.model_dump_json()
        self.limits.check_size(payload)
        self.limits.check_counts(stamped)
        ident = (manifest.key, manifest.instance)
        with self._lock:
            pipe = self._client.pipeline(transaction=True)
            pipe.set(self.layout.name(*ident), payload, px=self.ttl_ms)
            pipe.publish(
                self.layout.channel, self.layout.announcement("changed" if changed else "up", *ident)
            )
            pipe.execute()
            self._published[ident] = stamped
            self._withdrawn.discard(ident)
            self._publishes += 1
        return stamped

    def start_heartbeat(self, supplier: Callable[[], Manifest]) -> None:
        """Keep the manifest ``supplier`` returns alive until :meth:`withdraw` or :meth:`close`.

        Right away, then every heartbeat interval, the entry is rewritten with a fresh heartbeat and TTL
        (one ``SET XX``, no announcement). A vanished entry (expired, flushed, Redis restarted) is published
        again as ``"up"``; content that differs from the last published is announced ``"changed"``, unless it
        is over the :attr:`limits`: then the last accepted content is kept alive and the refusal is logged.
        Several suppliers share one daemon thread, which calls them.
        """
        with self._lock:
            self._suppliers.append(supplier)
            if self._heartbeat_thread is None:
                self._heartbeat_thread = threading.Thread(
                    target=self._heartbeat_loop, name="celery_services.registry.heartbeat", daemon=True
                )
                self._heartbeat_thread.start()

    def withdraw(self, key: str, instance: str) -> None:
        """Stop heartbeating an instance, delete its entry and announce ``"down"``.

        Raises:
            redis.RedisError: when Redis cannot be reached (the entry then expires after its TTL).
        """
        with self._lock:
            self._withdrawn.add((key, instance))
            self._published.pop((key, instance), None)
            pipe = self._client.pipeline(transaction=True)
            pipe.delete(self.layout.name(key, instance))
            pipe.publish(self.layout.channel, self.layout.announcement("down", key, instance))
            pipe.execute()

    def _heartbeat_loop(self) -> None:
        failing = False
        deadline = time.monotonic()
        while not self._closing.wait(max(0.0, deadline - time.monotonic())):
            deadline = max(deadline + self.heartbeat_interval, time.monotonic())
            with self._lock:
                suppliers = builtins.list(self._suppliers)
            errors: builtins.list[Exception] = []
            for supplier in suppliers:
                try:
                    # The supplier runs outside the lock (it may take the app's own locks, under which the
                    # app publishes): what it gives is stale if a publish came meanwhile.
                    with self._lock:
                        publishes = self._publishes
                    self._beat(supplier(), publishes)
                except Exception as exc:
                    errors.append(exc)
            if errors and not failing:
                log.warning(
                    "registry heartbeat failed (%r), retrying every %ss", errors[0], self.heartbeat_interval
                )
            elif failing and not errors:
                log.info("registry heartbeat recovered")
            failing = bool(errors)

    def _beat(self, manifest: Manifest, publishes: int) -> None:
        ident = (manifest.key, manifest.instance)
        with self._lock:
            if ident in self._withdrawn or self._closing.is_set():
                return
            last = self._published.get(ident)
            if last is not None and publishes != self._publishes:
                manifest = last  # published since the supplier ran: newer than what it gave
            refused: ManifestLimitError | None = None
            if last is None or not last.same_content(manifest):
                try:
                    self.publish(manifest, changed=last is not None)
                    return
                except ManifestLimitError as exc:
                    if last is None:
                        raise
                    # Readers would skip the new content: keep the last accepted one alive meanwhile.
                    refused, manifest = exc, last
            stamped = manifest.model_copy(update={"heartbeat": time.time()})
            if self._client.set(self.layout.name(*ident), stamped.model_dump_json(), px=self.ttl_ms, xx=True):
                self._published[ident] = stamped
            else:
                log.info("registry entry of %s:%s vanished, publishing it again", *ident)
                self.publish(manifest)
            if refused is not None:
                raise refused  # the heartbeat loop logs it once, until a beat succeeds again

    # -- consumer ------------------------------------------------------------------------------------------

    def snapshot(self) -> View:
        """Read every live manifest: a SCAN walk, then its MGETs in one pipelined round trip.

        Entries that are not valid v1 manifests of the instance their key names are logged and skipped;
        an entry over the :attr:`limits` is logged and read as its instance offering no service.
        """
        names = builtins.list(
            dict.fromkeys(self._client.scan_iter(match=self.layout.scan_pattern, count=1000))
        )
        pipe = self._client.pipeline(transaction=False)
        for start in range(0, len(names), 1000):
            pipe.mget(names[start : start + 1000])
        values = [value for chunk in pipe.execute() for value in chunk] if names else []
        view: View = {}
        for name, raw in zip(names, values, strict=True):
            manifest = self._decode(name, raw)
            if manifest is not None:
                view.setdefault(manifest.key, {})[manifest.instance] = manifest
        return view

    def list(self) -> builtins.list[KeyInfo]:
        """Live keys → instances → services, with heartbeat ages, sorted (a fresh :meth:`snapshot`)."""
        return summarize(self.snapshot())

    def watch(self, on_change: OnChange) -> None:
        """Start the watcher thread (one per registry), which keeps a live view and reports its changes.

        ``on_change`` is called from the watcher thread with a fresh copy of the whole view: once when the
        first snapshot is taken (even if empty), then only when the view changes (heartbeat timestamps alone
        are no change). Exceptions it raises are logged. Connection errors are logged and retried with
        backoff, then the watcher resubscribes and rescans.

        Raises:
            RuntimeError: when this registry already watches or is closed.
        """
        with self._view_lock:
            if self._watch_thread is not None or self._closing.is_set():
                raise RuntimeError("this registry already watches (or is closed)")
            self._watch_thread = threading.Thread(
                target=self._watch_loop, args=(on_change,), name="celery_services.registry.watch", daemon=True
            )
            self._watch_thread.start()

    def wait_synced(self, timeout: float | None = None) -> bool:
        """Wait until the watcher delivered its first view; return whether it did within ``timeout``."""
        return self._synced.wait(timeout)

    def inherit(self, parent: Registry) -> None:
        """Hold the view ``parent`` held, until this registry's watcher delivers its own: a forked child's
        registry (:meth:`.Distribution.follow_registry_after_fork`), whose view is otherwise unknown until
        its first snapshot, and its calls to an absent key sent to time out. Read without ``parent``'s lock,
        which a thread that did not survive the fork may hold: nothing else runs in the child yet."""
        if parent._synced.is_set():
            with self._view_lock:
                self._view = {key: dict(instances) for key, instances in parent._view.items()}
            self._synced.set()

    def has_key(self, key: str) -> bool | None:
        """Whether the watcher's view holds a live instance of ``key``; ``None`` before its first view."""
        if not self._synced.is_set():
            return None
        with self._view_lock:
            return bool(self._view.get(key))

    @property
    def view(self) -> View:
        """A copy of the watcher's current view (empty before its first snapshot)."""
        with self._view_lock:
            return {key: dict(instances) for key, instances in self._view.items()}

    def close(self) -> None:
        """Stop the heartbeat and watcher threads (within ~0.1 s) and close connections. Idempotent.

        Entries are not withdrawn: call :meth:`withdraw` first, or they expire after their TTL.
        """
        self._closing.set()
        for thread in (self._heartbeat_thread, self._watch_thread):
            if thread is not None and thread is not threading.current_thread():
                thread.join(timeout=10.0)
        self._client.close()
        self._sub_client.close()

    def __enter__(self) -> Registry:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _watch_loop(self, on_change: OnChange) -> None:
        backoff = _POLL
        while not self._closing.is_set():
            pubsub = cast(Callable[[], Any], self._sub_client.pubsub)()
            try:
                self._subscribe(pubsub)
                self._deliver(self.snapshot(), on_change, resync=self._synced.is_set())
                backoff = _POLL
                self._listen(pubsub, on_change)
            except Exception as exc:
                if self._closing.is_set():
                    break
                quiet = isinstance(exc, redis.ConnectionError | redis.TimeoutError)
                log.warning("registry watcher: %r; retrying in %.1fs", exc, backoff, exc_info=not quiet)
                self._closing.wait(backoff)
                backoff = min(backoff * 2, _MAX_BACKOFF)
            finally:
                try:
                    pubsub.close()
                except Exception:  # pragma: no cover - best effort on a broken connection
                    log.debug("closing the registry subscription failed", exc_info=True)

    def _subscribe(self, pubsub: Any) -> None:
        """Subscribe and wait for both confirmations, so that nothing announced after the snapshot is lost."""
        pubsub.subscribe(self.layout.channel, self.expired_channel)
        confirmed = 0
        deadline = time.monotonic() + 5.0
        while confirmed < 2:
            if self._closing.is_set() or time.monotonic() > deadline:
                raise redis.TimeoutError("no confirmation of the registry subscription")
            message = pubsub.get_message(timeout=_POLL)
            confirmed += message is not None and message["type"] == "subscribe"

    def _listen(self, pubsub: Any, on_change: OnChange) -> None:
        next_rescan = next_probe = time.monotonic()
        next_rescan += self.rescan_interval
        while not self._closing.is_set():
            now = time.monotonic()
            if now >= next_rescan:
                self._deliver(self.snapshot(), on_change)
                next_rescan, next_probe = now + self.rescan_interval, now + self.probe_interval
            elif now >= next_probe:
                self._probe(on_change)
                next_probe = now + self.probe_interval
            message = pubsub.get_message(timeout=min(_POLL, max(0.0, min(next_rescan, next_probe) - now)))
            if message is not None and message["type"] == "message":
                self._on_message(_text(message["channel"]), _text(message["data"]), on_change)

    def _probe(self, on_change: OnChange) -> None:
        """One EXISTS over the known entries, every heartbeat: Redis expires a key lazily when it is touched,
        while its active expiry cycle may take minutes to find it among many volatile keys (task results)."""
        with self._view_lock:
            idents = [(key, instance) for key, instances in self._view.items() for instance in instances]
        names = [self.layout.name(*ident) for ident in idents]
        if not names or self._client.exists(*names) == len(names):
            return
        pipe = self._client.pipeline(transaction=False)
        for name in names:
            pipe.exists(name)
        for ident, found in zip(idents, pipe.execute(), strict=True):
            if not found:
                self._update(*ident, None, on_change)  # unless kept after a resync

    def _on_message(self, channel: str, data: str, on_change: OnChange) -> None:
        if channel == self.expired_channel:
            ident = self.layout.split(data)
            if ident is not None:
                self._update(*ident, None, on_change)
            return
        announced = self.layout.parse_announcement(data)
        if announced is None:
            log.warning("ignoring malformed registry announcement %.200r", data)
            return
        op, key, instance = announced
        if op == "down":
            self._update(key, instance, None, on_change, withdrawn=True)
            return
        name = self.layout.name(key, instance)
        try:
            raw: bytes | str | None = self._client.get(name)
        except redis.ResponseError as exc:  # e.g. WRONGTYPE: a foreign key under our prefix
            raw = str(exc)
        self._update(key, instance, self._decode(name, raw), on_change)

    def _update(
        self, key: str, instance: str, manifest: Manifest | None, on_change: OnChange, withdrawn: bool = False
    ) -> None:
        """Apply one instance's news: its manifest, or ``None`` when its entry is missing (or ``withdrawn``,
        announced down: an instance kept after a resync leaves at once then)."""
        with self._view_lock:
            current = self._view.get(key, {}).get(instance)
            kept_until = self._kept.pop((key, instance), None)
            if manifest is None:
                if kept_until is not None and kept_until > time.monotonic() and not withdrawn:
                    self._kept[(key, instance)] = kept_until
                    return
                if current is None:
                    return
                del self._view[key][instance]
                if not self._view[key]:
                    del self._view[key]
            else:
                self._view.setdefault(key, {})[instance] = manifest
                if current is not None and current.same_content(manifest):
                    return
            view = {k: dict(instances) for k, instances in self._view.items()}
        self._notify(on_change, view)

    def _deliver(self, fresh: View, on_change: OnChange, resync: bool = False) -> None:
        """Make the snapshot ``fresh`` the view, and report it if it changed.

        ``resync``: the snapshot follows a lost connection. Redis may have come back empty (restarted
        without persistence, failed over to a replica that lagged), and each provider only writes its entry
        again at its next heartbeat: one missing now is kept in the view for a TTL, the time an instance
        that stops heartbeating keeps its entry, and leaves it then unless it came back. Dropped at once,
        a provider that serves was refused to its callers (``Unavailable``) until its next heartbeat.
        """
        now = time.monotonic()
        with self._view_lock:
            if resync:
                until = now + self.ttl_ms / 1000
                for key, instances in self._view.items():
                    for instance in instances:
                        if instance not in fresh.get(key, {}):
                            self._kept.setdefault((key, instance), until)
            for (key, instance), until in builtins.list(self._kept.items()):
                kept = self._view.get(key, {}).get(instance)
                if instance in fresh.get(key, {}) or until <= now or kept is None:
                    del self._kept[(key, instance)]
                else:
                    fresh.setdefault(key, {})[instance] = kept
            same = self._synced.is_set() and same_view(self._view, fresh)
            self._view = fresh
            view = {key: dict(instances) for key, instances in fresh.items()}
        if not same:
            self._notify(on_change, view)
        self._synced.set()

    @staticmethod
    def _notify(on_change: OnChange, view: View) -> None:
        try:
            on_change(view)
        except Exception:
            log.exception("registry on_change callback failed")

    def _decode(self, name: str | bytes, raw: bytes | str | None) -> Manifest | None:
        if raw is None:
            return None
        name = _text(name)
        ident = self.layout.split(name)
        try:
            if ident is None:
                raise ValueError("malformed registry key")
            manifest = decode_manifest(raw, key=ident[0], instance=ident[1], limits=self.limits)
        except ManifestLimitError as exc:
            # Keyed by the limit, not the payload: every heartbeat rewrites the payload, not the excess.
            if self._report(name, exc.setting):
                log.warning(
                    "skipping the services of registry entry %s: %s (raise the setting %s to accept it)",
                    name,
                    exc,
                    exc.setting,
                )
            return _offering_nothing(exc, *ident) if ident is not None else None
        except ValueError as exc:
            if self._report(name, hash(raw)):  # log each bad payload once, not at every rescan
                log.warning("skipping registry entry %s: %s", name, exc)
            return None
        if self._reported:
            self._reported.pop(name, None)  # good again: a relapse is logged anew
        return manifest

    def _report(self, name: str, what: object) -> bool:
        """Whether ``what`` is news about the entry ``name`` (and remember it)."""
        if self._reported.get(name) == what:
            return False
        if len(self._reported) > 10_000:
            self._reported.clear()
        self._reported[name] = what
        return True


def _offering_nothing(exc: ManifestLimitError, key: str, instance: str) -> Manifest | None:
    """The instance of an entry over a limit, offering no service; ``None`` if its name cannot be one."""
    if exc.manifest is not None:
        return exc.manifest.model_copy(update={"services": []})
    try:  # never parsed: only its registry key is known; constant facts, so no rescan sees a change
        return Manifest(
            key=key, instance=instance, host="", pid=0, started_at=0.0, heartbeat=time.time(), services=[]
        )
    except ValidationError:
        return None


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)
