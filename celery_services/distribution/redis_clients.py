"""A redis-py client for a configured URL: one Redis, one Redis over TLS, or the master a Sentinel names.

Every redis-py client the library makes (reply store, registry and its subscriber, lease keeper) is built by
:func:`redis_client` from a URL and the connection settings (:class:`RedisOptions`):

- ``redis://`` / ``unix://``: ``redis.Redis.from_url``;
- ``rediss://``: the same over TLS, the server verified (``ssl_cert_reqs="required"``) against
  ``tls_ca_file`` (else the system's CAs), presenting ``tls_cert_file`` / ``tls_key_file`` when set;
- ``sentinel://h1:p1;sentinel://h2:p2/db``, as Celery and kombu spell it: the master the Sentinels name
  ``sentinel_master``, through ``redis.sentinel.Sentinel(...).master_for``.

Socket timeouts are always the caller's, never the client library's defaults, and the Sentinel nodes are
asked with the same timeouts. A connection opened for a call (within :func:`connecting_by` its deadline)
connects and shakes hands (TLS, ``HELLO``/``AUTH``/``SELECT``) within what is left of that deadline when it
is less than those timeouts: a thread's first call to a Redis that accepts connections but answers nothing
ends at its deadline, not the read timeout later. :func:`async_redis_client` builds the ``redis.asyncio``
client of the same URL and options.

One piece, past 300 lines: every Redis client the library makes, blocking or asyncio, is built here, so a
URL's scheme, TLS files, Sentinel master and timeouts are read in one place.

A forced failover (``SENTINEL FAILOVER``) leaves the old master up, and writable, until Sentinel reconfigures
it as a replica: about ten seconds (measured on Redis 7) during which redis-py's Sentinel pools keep using
the connections they hold to it, while every new connection goes to the new master; two processes could
then talk to two masters. So every pool of one master asks a Sentinel who the master is, at most every
:data:`MASTER_CHECK_INTERVAL` seconds when a connection is taken from it; when the answer changes, every
pool of that master in this process drops all its connections, idle or in use (a registry subscription
then resubscribes, a reply wait retries once, on the new master). A connection told ``UNBLOCKED`` or
``READONLY`` (its server became a replica) fails as a :class:`redis.ConnectionError`, as a lost connection
does, so callers handle both the same way.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import os
import threading
import time
import weakref
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, cast
from urllib.parse import unquote, urlsplit

import hiredis
import redis
import redis.asyncio
import redis.asyncio.sentinel
from redis.connection import AbstractConnection
from redis.sentinel import Sentinel, SentinelConnectionPool, SentinelManagedConnection

if TYPE_CHECKING:
    from .settings import DistributionSettings

__all__ = [
    "MASTER_CHECK_INTERVAL",
    "HeldConnection",
    "RedisOptions",
    "async_redis_client",
    "connecting_by",
    "is_redis",
    "is_sentinel",
    "is_tls",
    "pack_commands",
    "redis_client",
    "send_by",
    "send_by_async",
    "sentinel_nodes",
]

log = logging.getLogger("celery_services.redis")

_Sentinel: Any = Sentinel  # redis-py leaves its constructor unannotated
_AsyncSentinel: Any = redis.asyncio.sentinel.Sentinel

#: Seconds between two checks, by one process, of which server a Sentinel names master.
MASTER_CHECK_INTERVAL = 0.5

_connect_deadline: contextvars.ContextVar[float | None] = contextvars.ContextVar(
    "celery_services_connect_deadline", default=None
)


def pack_commands(commands: Iterable[tuple[Any, ...]]) -> list[bytes]:
    """``commands`` in the Redis protocol, for ``send_packed_command`` (one write: a list of one chunk), each
    packed by hiredis's C packer.

    The packer redis-py itself uses, without the layers it adds around it for each command (splitting a
    command name that holds a space, converting buffers, chunking large values): through them, packing a
    reply's four commands cost the fast path 18 us, about a quarter of a small call's work in the worker,
    against 2.5 us here. The library's commands are plain names and str, bytes, int or float arguments.
    """
    return [b"".join([hiredis.pack_command(command) for command in commands])]


def send_by(connection: Any, packed: list[bytes], deadline: float) -> None:
    """``connection.send_packed_command(packed)``, its write ending by ``deadline`` (epoch) when that comes
    before the connection's socket timeout: a call larger than the socket buffers, written to a Redis that
    stopped reading, took that timeout (5 s) whatever its deadline.

    Raises:
        redis.TimeoutError: not written by then (redis-py closes the connection: part of it may be sent).
    """
    left = deadline - time.time()
    sock = connection._sock
    if sock is None or left >= (connection.socket_timeout or float("inf")):
        connection.send_packed_command(packed)
        return
    sock.settimeout(max(left, 0.001))
    try:
        connection.send_packed_command(packed)
    finally:
        if connection._sock is sock:
            sock.settimeout(connection.socket_timeout)


async def send_by_async(connection: Any, packed: list[bytes], deadline: float) -> None:
    """:func:`send_by` on a ``redis.asyncio`` connection (whose write waits its socket timeout for room).

    Raises:
        TimeoutError: not written by then (the connection is closed).
    """
    left = deadline - time.time()
    if left >= (connection.socket_timeout or float("inf")):
        await connection.send_packed_command(packed)
        return
    async with asyncio.timeout(max(left, 0.001)):
        await connection.send_packed_command(packed)


class connecting_by:
    """Within the block, connections of this module's clients opened in this thread or task connect and shake
    hands by ``deadline`` (epoch), sooner than their configured timeouts when less is left.

    A class rather than ``contextlib.contextmanager``: it is entered around every call's reply wait.
    """

    __slots__ = ("_deadline", "_token")

    def __init__(self, deadline: float) -> None:
        self._deadline = deadline

    def __enter__(self) -> None:
        self._token = _connect_deadline.set(self._deadline)

    def __exit__(self, *exc: object) -> None:
        _connect_deadline.reset(self._token)


class _ByDeadline(AbstractConnection):
    """A connection whose connect and handshake end by the deadline of :func:`connecting_by`, if sooner.

    redis-py reads its connect timeout when it connects and its read timeout for the handshake (and TLS's),
    both from the connection: they are cut to what is left for that time only. The pool's connection then
    keeps its configured timeouts for every later command.
    """

    def _connect(self) -> Any:
        connect = cast(Any, super())._connect  # redis-py leaves it unannotated
        deadline = _connect_deadline.get()
        if deadline is None:
            return connect()
        left = deadline - time.time()
        if left <= 0:
            raise TimeoutError("no time left to connect before the call's deadline")
        configured = self.socket_timeout, self.socket_connect_timeout
        self.socket_timeout = min(configured[0] or left, left)
        self.socket_connect_timeout = min(configured[1] or left, left)
        try:
            return connect()
        finally:
            self.socket_timeout, self.socket_connect_timeout = configured

    def connect_check_health(self, check_health: bool = True, retry_socket_connect: bool = True) -> None:
        connected = self._sock is not None
        try:
            cast(Any, super()).connect_check_health(check_health, retry_socket_connect)
        finally:
            if not connected and self._sock is not None and _connect_deadline.get() is not None:
                self._sock.settimeout(self.socket_timeout)  # the handshake's is over


class _AsyncByDeadline(redis.asyncio.connection.AbstractConnection):
    """:class:`_ByDeadline` for ``redis.asyncio``, whose connections read their timeouts when they use them:
    cut for the connect and handshake, then restored."""

    async def connect_check_health(
        self, check_health: bool = True, retry_socket_connect: bool = True
    ) -> None:
        connect = cast(Any, super()).connect_check_health  # redis-py leaves it unannotated
        deadline = _connect_deadline.get()
        if deadline is None or self.is_connected:
            return await connect(check_health, retry_socket_connect)  # type: ignore[no-any-return]
        left = deadline - time.time()
        if left <= 0:
            raise redis.TimeoutError("no time left to connect before the call's deadline")
        configured = self.socket_timeout, self.socket_connect_timeout
        self.socket_timeout = min(configured[0] or left, left)
        self.socket_connect_timeout = min(configured[1] or left, left)
        try:
            await connect(check_health, retry_socket_connect)
        finally:
            self.socket_timeout, self.socket_connect_timeout = configured


class _AsyncConnection(_AsyncByDeadline, redis.asyncio.Connection):
    pass


class _AsyncTLSConnection(_AsyncByDeadline, redis.asyncio.SSLConnection):
    pass


class _AsyncUnixConnection(_AsyncByDeadline, redis.asyncio.UnixDomainSocketConnection):
    pass


class _AsyncMasterConnection(_AsyncByDeadline, redis.asyncio.sentinel.SentinelManagedConnection):
    pass


class _Connection(_ByDeadline, redis.Connection):
    pass


class _TLSConnection(_ByDeadline, redis.SSLConnection):
    pass


class _UnixConnection(_ByDeadline, redis.UnixDomainSocketConnection):
    pass


class HeldConnection:
    """One connection of ``pool``, held by one thread between its commands, which it writes and reads on it
    directly: taking it from the pool and giving it back around every command cost more than a fast call's
    own work (a lock, redis-py's connection metrics and command layers).

    A connection that failed is dropped: disconnected and given back, so the next one is the pool's again
    (where a Sentinel pool checks who the master is now).
    """

    def __init__(self, pool: Any) -> None:
        self.pool = pool
        self._connection: Any = None

    def get(self) -> Any:
        """The held connection (taken from the pool the first time, or after :meth:`drop`)."""
        if self._connection is None:
            self._connection = self.pool.get_connection()
        return self._connection

    def drop(self) -> None:
        """Disconnect the held connection, whose state is unknown after an error, and give it back."""
        if self._connection is not None:
            connection, self._connection = self._connection, None
            connection.disconnect()
            self.pool.release(connection)

    def release(self) -> None:
        """Give the held connection back to the pool, as it is."""
        if self._connection is not None:
            connection, self._connection = self._connection, None
            self.pool.release(connection)


@dataclass(frozen=True)
class RedisOptions:
    """What a client needs besides the URL: the Sentinel master's name and the TLS files.

    Attributes:
        sentinel_master: the master that ``sentinel://`` URLs lead to.
        tls_ca_file: CA bundle verifying ``rediss://`` servers (``None``: the system's).
        tls_cert_file: client certificate, for servers that ask for one.
        tls_key_file: its private key.
    """

    sentinel_master: str | None = None
    tls_ca_file: str | None = None
    tls_cert_file: str | None = None
    tls_key_file: str | None = None

    @classmethod
    def of(cls, settings: DistributionSettings) -> RedisOptions:
        """The options of ``settings``: ``sentinel_master`` and the ``tls_*`` files."""
        return cls(
            sentinel_master=settings.sentinel_master,
            tls_ca_file=settings.tls_ca_file,
            tls_cert_file=settings.tls_cert_file,
            tls_key_file=settings.tls_key_file,
        )

    def ssl_options(self) -> dict[str, Any]:
        """redis-py's TLS keywords, also the dict of Celery's ``broker_use_ssl`` / ``redis_backend_use_ssl``.

        The server's certificate is always verified (``ssl_cert_reqs="required"``).
        """
        options: dict[str, Any] = {"ssl_cert_reqs": "required"}
        for name, value in (
            ("ssl_ca_certs", self.tls_ca_file),
            ("ssl_certfile", self.tls_cert_file),
            ("ssl_keyfile", self.tls_key_file),
        ):
            if value:
                options[name] = value
        return options


def is_redis(url: str) -> bool:
    """Whether a broker or backend URL names a Redis (plain, TLS, socket or through Sentinel)."""
    return url.lower().startswith(("redis://", "rediss://", "unix://", "sentinel://"))


def is_tls(url: str) -> bool:
    """Whether ``url`` is a ``rediss://`` URL (Redis over TLS)."""
    return url.lower().startswith("rediss://")


def is_sentinel(url: str) -> bool:
    """Whether ``url`` is a ``sentinel://`` URL (a list of them, ``;``-separated)."""
    return url.lower().startswith("sentinel://")


def sentinel_nodes(url: str) -> tuple[list[tuple[str, int]], int, str | None, str | None]:
    """The Sentinel nodes, database, username and password of ``sentinel://h:p[/db];sentinel://h2:p2[/db]``.

    As kombu and Celery read them: the nodes from every part (port 26379 when omitted), the database and the
    credentials (those of the master, not of the Sentinels) from the first part that has them.
    """
    nodes: list[tuple[str, int]] = []
    db, username, password = 0, None, None
    found_db = False
    for part in url.split(";"):
        parts = urlsplit(part.strip())
        nodes.append((parts.hostname or "127.0.0.1", parts.port or 26379))
        path = parts.path.strip("/")
        if path and not found_db:
            db, found_db = int(path), True
        if parts.password and password is None:
            username = unquote(parts.username) if parts.username else None
            password = unquote(parts.password)
    return nodes, db, username, password


def redis_client(
    url: str,
    options: RedisOptions | None = None,
    *,
    socket_timeout: float,
    socket_connect_timeout: float,
    **kwargs: Any,
) -> redis.Redis:
    """A redis-py client of ``url`` (``redis://``, ``rediss://``, ``unix://`` or ``sentinel://``).

    Args:
        url: the server, or the Sentinels of its master.
        options: the Sentinel master's name and the TLS files (:meth:`RedisOptions.of` the settings).
        socket_timeout: read timeout of every command (a blocking read sets its own per call).
        socket_connect_timeout: connect timeout, also for the Sentinel nodes.
        **kwargs: more keywords for the client (``client_name``, ``retry`` …).

    Raises:
        ValueError: a ``sentinel://`` URL without ``options.sentinel_master``.
    """
    options = options or RedisOptions()
    timeouts = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_connect_timeout}
    if is_sentinel(url):
        return _master_client(url, options, timeouts, kwargs)
    if is_tls(url):
        kwargs = {**options.ssl_options(), "connection_class": _TLSConnection, **kwargs}
    elif url.lower().startswith("unix://"):
        kwargs = {"connection_class": _UnixConnection, **kwargs}
    else:
        kwargs = {"connection_class": _Connection, **kwargs}
    return redis.Redis.from_url(url, **timeouts, **kwargs)


def async_redis_client(
    url: str,
    options: RedisOptions | None = None,
    *,
    socket_timeout: float,
    socket_connect_timeout: float,
    **kwargs: Any,
) -> redis.asyncio.Redis:
    """:func:`redis_client` for asyncio: a ``redis.asyncio`` client of the same URL, options and timeouts.

    Its connections belong to the event loop that opens them: keep one client per loop (:mod:`.aio`).
    Through Sentinel, its pool asks the Sentinels for the master on each new connection; a connection
    whose server became a replica fails as a lost one (``UNBLOCKED`` / ``READONLY``: see its callers), and
    the next connection goes to the new master.

    Raises:
        ValueError: a ``sentinel://`` URL without ``options.sentinel_master``.
    """
    options = options or RedisOptions()
    timeouts = {"socket_timeout": socket_timeout, "socket_connect_timeout": socket_connect_timeout}
    if is_sentinel(url):
        if not options.sentinel_master:
            raise ValueError("a sentinel:// URL needs the setting sentinel_master (the name of the master)")
        nodes, db, username, password = sentinel_nodes(url)
        credentials = {"username": username, "password": password} if password is not None else {}
        sentinel = _AsyncSentinel(nodes, sentinel_kwargs=dict(timeouts), **timeouts)
        client: redis.asyncio.Redis = sentinel.master_for(
            options.sentinel_master, db=db, connection_class=_AsyncMasterConnection, **credentials, **kwargs
        )
        return client
    if is_tls(url):
        kwargs = {**options.ssl_options(), "connection_class": _AsyncTLSConnection, **kwargs}
    elif url.lower().startswith("unix://"):
        kwargs = {"connection_class": _AsyncUnixConnection, **kwargs}
    else:
        kwargs = {"connection_class": _AsyncConnection, **kwargs}
    return redis.asyncio.Redis.from_url(
        url, socket_timeout=socket_timeout, socket_connect_timeout=socket_connect_timeout, **kwargs
    )


def _master_client(
    url: str, options: RedisOptions, timeouts: dict[str, float], kwargs: dict[str, Any]
) -> redis.Redis:
    if not options.sentinel_master:
        raise ValueError("a sentinel:// URL needs the setting sentinel_master (the name of the master)")
    nodes, db, username, password = sentinel_nodes(url)
    credentials = {"username": username, "password": password} if password is not None else {}
    # The Sentinels are asked with the same timeouts (and no credentials: those are the master's).
    sentinel = _Sentinel(nodes, sentinel_kwargs=dict(timeouts), **timeouts)
    watch = _watch(tuple(nodes), options.sentinel_master)
    master_for: Any = sentinel.master_for  # redis-py leaves it unannotated
    client: redis.Redis = master_for(
        options.sentinel_master,
        connection_pool_class=_FollowingPool,
        connection_class=_MasterConnection,
        watch=watch,
        db=db,
        **credentials,
        **kwargs,
    )
    return client


class _MasterConnection(_ByDeadline, SentinelManagedConnection):
    """A connection to the master: told that its server became a replica, it fails as a lost connection."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)
        except redis.ResponseError as exc:
            # UNBLOCKED: a blocking command (BLPOP) cut short when the server turned replica.
            if not str(exc).startswith("UNBLOCKED"):
                raise
            disconnect: Any = self.disconnect  # redis-py leaves it unannotated
            disconnect()
            raise redis.ConnectionError("The master became a replica while the command waited") from None


class _MasterWatch:
    """Which address the Sentinels named last for one master, and this process's pools of it."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.pools: weakref.WeakSet[_FollowingPool] = weakref.WeakSet()
        self._reset()

    def _reset(self) -> None:
        self._address: tuple[str, int] | None = None
        self._next = 0.0
        self._pid = os.getpid()
        self._lock = threading.Lock()

    def check(self, pool: _FollowingPool) -> None:
        """Ask a Sentinel (through ``pool``'s) who the master is, unless asked less than an interval ago;
        on a new answer, drop every connection of every pool of this master."""
        if self._pid != os.getpid():  # a forked child: nothing of the parent's state holds
            self._reset()
        now = time.monotonic()
        if now < self._next or not self._lock.acquire(blocking=False):
            return
        try:
            self._next = now + MASTER_CHECK_INTERVAL
            try:
                address = pool.sentinel_manager.discover_master(self.name)
            except (redis.ConnectionError, redis.TimeoutError):
                return  # connecting will say so, with the reason
            previous, self._address = self._address, address
            pools = list(self.pools)
        finally:
            self._lock.release()
        if previous is not None and address != previous:
            log.warning("Sentinel master %r moved: dropping the connections to the old one", self.name)
            for each in pools:
                each.disconnect(inuse_connections=True)


_watches: dict[tuple[tuple[tuple[str, int], ...], str], _MasterWatch] = {}
_watches_lock = threading.Lock()


def _watch(nodes: tuple[tuple[str, int], ...], name: str) -> _MasterWatch:
    with _watches_lock:
        return _watches.setdefault((nodes, name), _MasterWatch(name))


class _FollowingPool(SentinelConnectionPool):
    """A Sentinel pool checking who the master is when a connection is taken (see :class:`_MasterWatch`)."""

    def __init__(self, service_name: str, sentinel_manager: Sentinel, **kwargs: Any) -> None:
        self.watch: _MasterWatch = kwargs.pop("watch")
        init: Any = super().__init__  # redis-py leaves it unannotated
        init(service_name, sentinel_manager, **kwargs)
        self.watch.pools.add(self)

    def disconnect(self, inuse_connections: bool = True) -> None:
        """Disconnect the pool's connections (those in use too, unless told otherwise)."""
        disconnect: Any = super().disconnect
        disconnect(inuse_connections)

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        self.watch.check(self)
        return super().get_connection(*args, **kwargs)

    def close(self) -> None:
        """Close the connections to the master and to the Sentinels."""
        super().close()
        self.sentinel_manager.close()
