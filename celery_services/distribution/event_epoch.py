"""The binding epoch: what lets a RabbitMQ publisher skip the events nobody is bound for, and still send the
first one published after a listener's ``bind`` returns.

On Redis the publisher reads who is bound before each event (kombu's binding set) and sends nothing to
nobody. RabbitMQ routes at the broker and cannot be asked beforehand; it can only return, after the fact,
a message published *mandatory* that no queue took. So a RabbitMQ publisher sends each event mandatory,
and once RabbitMQ returned one, skips the later events of its routing key, as long as no listener bound
anything since (:class:`~.event_publisher.EventPublisher`).

"No listener bound anything since" is this epoch: a Redis key of the registry's namespace, read before a
skip, that every listener of the library sets anew once a binding is at the broker, before ``bind``
returns (:class:`~.event_consumer.EventConsumer`). A skip needs the epoch read before the skipped key's
returned event was sent to still be the current one:

- a listener that binds after that event was sent writes a new epoch, so the next read sees it and the
  event is sent;
- an epoch lost with Redis (a restart, its expiry) comes back as a new one, never an old value, so what
  was learned under the lost one is forgotten;
- a Redis that cannot answer skips nothing.

A provider reads the epoch in the round trip that pushes a call's reply (:class:`~.provider.Replies`, where
the registry's Redis is the result backend's): the call's events, published right after the reply, are
judged by that read (:func:`read_with_reply`), as on Redis kombu's binding set is read just before sending.
A listener whose ``bind`` returns between the two misses the event, as if it had been published a moment
earlier; a call made after ``bind`` returned is served, and its events judged, after it.

A consumer that binds the exchange outside the library writes no epoch: the publisher forgets each return
after :data:`RETURNED_FOR` seconds, so such a consumer hears a key's events at most that long after it
binds.
"""

from __future__ import annotations

import contextvars
import logging
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from .redis_clients import RedisOptions, redis_client

if TYPE_CHECKING:
    from .settings import DistributionSettings

__all__ = ["RETURNED_FOR", "BindingEpoch", "read_with_reply", "reply_scope"]

log = logging.getLogger("celery_services.events")  # the bus's one logger (see events.py)

#: Seconds a publisher skips a routing key's events after RabbitMQ returned one, unless the epoch moved.
RETURNED_FOR = 1.0
_TTL = 86_400  # an epoch nobody advanced for a day expires: the next read starts another

# The epoch the call being served read with its reply, for its events (None: not read, or no epoch yet).
_with_reply: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "celery_services_epoch_with_reply", default=None
)


@contextmanager
def reply_scope() -> Iterator[None]:
    """Within the block, a call is served: what :func:`read_with_reply` records stands for its events."""
    token = _with_reply.set(None)
    try:
        yield
    finally:
        _with_reply.reset(token)


def read_with_reply(value: Any) -> None:
    """Record the epoch read in the round trip of the served call's reply (Redis's answer to ``GET``)."""
    _with_reply.set(value.decode() if isinstance(value, bytes) else value)


class BindingEpoch:
    """The binding epoch of one event exchange, in the registry's Redis (see the module).

    Args:
        url: the registry's Redis (shared by every app of the namespace).
        key: the epoch's key (``{registry prefix}:event-bindings:{exchange}``).
        options: the Sentinel master's name and TLS files of ``url``.
    """

    def __init__(self, url: str, key: str, options: RedisOptions | None = None) -> None:
        # A publisher reads the epoch holding its publish lock: a Redis that does not answer at once is
        # given up on (no skip) rather than waited for or retried.
        self.client = redis_client(
            url, options, socket_timeout=0.25, socket_connect_timeout=0.25, retry=Retry(NoBackoff(), 0)
        )
        self.key = key

    @classmethod
    def of(cls, settings: DistributionSettings) -> BindingEpoch:
        """The epoch of ``settings``' event exchange, in their registry's Redis and namespace."""
        return cls(
            settings.resolved_registry_url(),
            f"{settings.registry_prefix}:event-bindings:{settings.events_exchange}",
            RedisOptions.of(settings),
        )

    def current(self) -> str | None:
        """The epoch now, started if missing; ``None`` when Redis cannot say (then nothing is skipped).

        Within a call being served, the one read with its reply, if any (:func:`read_with_reply`).
        """
        seen = _with_reply.get()
        if seen is not None:
            return seen
        try:
            value: Any = self.client.get(self.key)
            if value is None:
                self.client.set(self.key, uuid.uuid4().hex, nx=True, ex=_TTL)
                value = self.client.get(self.key)
        except (redis.RedisError, OSError) as exc:
            log.debug("binding epoch %s not read: %r", self.key, exc)
            return None
        return value.decode() if isinstance(value, bytes) else value

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
