"""The binding epoch: what lets a RabbitMQ publisher skip the events nobody is bound for, and still send
those published after a listener's ``bind`` returns.

On Redis the publisher reads who is bound before each event (kombu's binding set) and sends nothing to
nobody. RabbitMQ routes at the broker and cannot be asked beforehand; it can only return, after the fact,
a message published *mandatory* that no queue took. So a RabbitMQ publisher sends a served call's events
mandatory, and once RabbitMQ returned one, skips the later events of its routing key as long as no
listener bound anything since (:class:`~.event_publisher.EventPublisher`).

"No listener bound anything since" is this epoch: a Redis key of the registry's namespace that every
listener of the library sets to a new random token once a binding is at the broker, before ``bind``
returns (:class:`~.event_consumer.EventConsumer`). A provider reads it in the round trip that pushes the
reply of a call that has events to publish (:class:`~.provider.Replies`: one ``GET`` more, where the
registry's Redis is the result backend's, the default), and judges the events the call publishes right
after its reply by that read (:func:`read_with_reply`). A return counts under the epoch its event was
sent with, a skip needs the same epoch read again:

- a listener that binds after the returned event was sent writes a new epoch: the next call reads it, and
  its event is sent;
- an epoch lost with Redis (a restart, its expiry) comes back as a new token, never an old one: what was
  learned under the lost one is forgotten;
- a Redis that cannot answer skips nothing, nor does an event published outside a served call (no read).

As on Redis, where kombu's binding set is read just before sending, a listener whose ``bind`` returns
between the read and the publish misses the event, as if it had been published a moment earlier; a call
made after ``bind`` returned is served, and its events judged, after it.

A consumer that binds the exchange outside the library writes no epoch: the publisher forgets each return
after :data:`RETURNED_FOR` seconds, so such a consumer hears a key's events at most that long after it
binds.
"""

from __future__ import annotations

import contextvars
import logging
import uuid
from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .manifest import RegistryLayout
from .redis_clients import RedisOptions, redis_client

if TYPE_CHECKING:
    from .settings import DistributionSettings

__all__ = ["RETURNED_FOR", "BindingEpoch", "epoch_wanted", "read_with_reply", "reply_scope"]

log = logging.getLogger("celery_services.events")  # the bus's one logger (see events.py)

#: Seconds a publisher skips a routing key's events after RabbitMQ returned one, unless the epoch moved.
RETURNED_FOR = 1.0
_TTL = 86_400  # an epoch nobody advanced for a day expires: the next read starts another

# The epoch the call being served read with its reply: (key, value; None if the key was missing); _WANTED
# while its reply is still to push and it has events to publish after it; None outside (or no events).
_with_reply: contextvars.ContextVar[tuple[str, str | None] | None] = contextvars.ContextVar(
    "celery_services_epoch_with_reply", default=None
)
_WANTED: tuple[str, str | None] = ("", None)  # no epoch's key is empty


class reply_scope:
    """Within the block, a call is served: what :func:`read_with_reply` records stands for its events.

    Args:
        events: whether the call has events to publish after its reply (else its reply reads no epoch).

    A class rather than ``contextlib.contextmanager``: it is entered around every call served.
    """

    __slots__ = ("_events", "_token")

    def __init__(self, events: bool = True) -> None:
        self._events = events

    def __enter__(self) -> None:
        self._token = _with_reply.set(_WANTED if self._events else None)

    def __exit__(self, *exc: object) -> None:
        _with_reply.reset(self._token)


def epoch_wanted() -> bool:
    """Whether the call being served has events to publish after its reply: its reply should read the
    epoch (:func:`read_with_reply`)."""
    return _with_reply.get() is _WANTED


def read_with_reply(key: str, value: Any) -> None:
    """Record the epoch ``key`` as read in the round trip of the served call's reply (Redis's answer to
    ``GET``: ``None`` if the key is missing)."""
    _with_reply.set((key, value.decode() if isinstance(value, bytes) else value))


class BindingEpoch:
    """The binding epoch of one event exchange, in the registry's Redis (see the module).

    Args:
        url: the registry's Redis (shared by every app of the namespace).
        key: the epoch's key (:meth:`.RegistryLayout.binding_epoch`).
        options: the Sentinel master's name and TLS files of ``url``.
    """

    def __init__(self, url: str, key: str, options: RedisOptions | None = None) -> None:
        # A publisher starts a lost epoch holding its publish lock: a Redis that does not answer at once
        # is given up on (no skip) rather than waited for or retried.
        self.client = redis_client(
            url, options, socket_timeout=0.25, socket_connect_timeout=0.25, retry=Retry(NoBackoff(), 0)
        )
        self.key = key

    @classmethod
    def of(cls, settings: DistributionSettings) -> BindingEpoch:
        """The epoch of ``settings``' event exchange, in their registry's Redis and namespace."""
        return cls(
            settings.resolved_registry_url(),
            RegistryLayout(settings.registry_prefix).binding_epoch(settings.events_exchange),
            RedisOptions.of(settings),
        )

    def current(self) -> str | None:
        """The epoch read with the reply of the call being served; ``None`` outside a served call, or when
        Redis cannot say (then nothing is skipped).

        If that read found no epoch (never started, or lost with Redis), one is started here: one round
        trip, once per loss.
        """
        seen = _with_reply.get()
        if seen is None or seen[0] != self.key:
            return None
        if seen[1] is not None:
            return seen[1]
        try:
            self.client.set(self.key, uuid.uuid4().hex, nx=True, ex=_TTL)
            value: Any = self.client.get(self.key)
        except (redis.RedisError, OSError) as exc:
            log.debug("binding epoch %s not started: %r", self.key, exc)
            return None
        epoch = value.decode() if isinstance(value, bytes) else value
        _with_reply.set((self.key, epoch))
        return epoch

    def advance(self) -> None:
        """Start a new epoch: called once a binding is at the broker.

        Never raises: a listener whose epoch could not be written hears the key's events once publishers
        forget RabbitMQ's last return of it (:data:`RETURNED_FOR`), as a consumer outside the library does.
        """
        try:
            self.client.set(self.key, uuid.uuid4().hex, ex=_TTL)
        except (redis.RedisError, OSError) as exc:
            log.warning(
                "binding epoch %s not advanced: %r; events of the new binding may be skipped for %.0f s",
                self.key,
                exc,
                RETURNED_FOR,
            )

    def close(self) -> None:
        """Close the client's connections."""
        self.client.close()
