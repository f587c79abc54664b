"""Message signing: apps trust only calls and replies made by holders of a shared secret.

Without signing, anything that can write to the broker can call any exposed method under any caller key,
and anything that can write to the reply store can answer a call (feathers-distributed, nameko and
Moleculer trust the same way). With ``signing_keys`` set, each call carries ``cs_signature``: an
HMAC-SHA256 over its task name, call id, caller key, deadline and arguments, made with the first secret of
the caller's key; each reply is prefixed with an HMAC over the call id and the reply body, made with the
first secret of the provider's key. Every secret of a key is accepted (rotation: add the new one second
everywhere, then make it first, then drop the old one: first at once, it signed what apps without it yet
refuse).

A provider with signing on refuses, before any hook runs: an unsigned call, a forged one (any signed part
changed, or a secret it does not know), and a replayed one: a call id already started here is refused
unless the broker or the lease keeper marked the delivery as a redelivery. A replay past the call's
deadline is refused by the deadline, which is signed. What is not covered: a copy of a call still in
flight, sent again within its deadline with the redelivery header set, runs as a redelivery would
(``params["redelivered"]``); payloads are signed, not encrypted.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

import redis

from ..core.errors import BadGateway, NotAuthenticated
from .protocol import HEADER_CALLER, HEADER_SIGNATURE, dumps

__all__ = ["Signer", "unsigned_body"]

log = logging.getLogger("celery_services.signing")

_VERSION = "v1"
_REPLY_PREFIX = b"cs-signed:v1:"


def _canonical(value: Any) -> bytes:
    # The provider sees the arguments after a JSON round trip (tuples as lists, keys as strings): sign
    # that form, in a byte order both sides agree on.
    return json.dumps(json.loads(dumps(value)), sort_keys=True, separators=(",", ":")).encode()


def _mac(secret: bytes, *parts: bytes) -> str:
    return hmac.new(secret, b"\x1f".join(parts), hashlib.sha256).hexdigest()


class Signer:
    """Signs and checks the calls and replies of one app.

    Args:
        key: this app's key (its calls are signed as this caller, its replies as this provider).
        secrets: app key → secrets, as :meth:`.DistributionSettings.signing_secrets` gives them.
        store: the Redis where started call ids are remembered (replay protection).
        prefix: the registry prefix those ids are kept under.
    """

    def __init__(
        self, key: str, secrets: Callable[[str], Sequence[bytes]], store: redis.Redis, prefix: str
    ) -> None:
        self.key = key
        self._secrets = secrets
        self._store = store
        self._prefix = prefix

    # -- calls ------------------------------------------------------------------------------------------

    def _call_parts(self, name: str, call_id: str, caller: str, deadline: float, kwargs: Any) -> list[bytes]:
        return [
            _VERSION.encode(),
            name.encode(),
            call_id.encode(),
            caller.encode(),
            repr(deadline).encode(),
            _canonical(kwargs),
        ]

    def sign_call(self, name: str, call_id: str, deadline: float, kwargs: dict[str, Any]) -> str | None:
        """The ``cs_signature`` header of a call this app sends (``None`` when its key has no secret)."""
        secrets = self._secrets(self.key)
        if not secrets:
            return None
        return f"{_VERSION}:{_mac(secrets[0], *self._call_parts(name, call_id, self.key, deadline, kwargs))}"

    def check_call(self, request: Any, deadline: float | None) -> None:
        """Refuse a call that is unsigned or forged, before anything of it runs.

        Raises:
            NotAuthenticated: the call is refused (the reason is logged, not told to the sender).
        """
        caller = str(getattr(request, HEADER_CALLER, None) or "")
        signature = getattr(request, HEADER_SIGNATURE, None)
        secrets = self._secrets(caller)
        if not isinstance(signature, str) or not signature:
            self._refuse(request, caller, "unsigned call")
        if deadline is None:
            self._refuse(request, caller, "no deadline")
        if not secrets:
            self._refuse(request, caller, "no secret for the caller's key")
        parts = self._call_parts(str(request.task), str(request.id), caller, deadline, request.kwargs or {})
        expected = [f"{_VERSION}:{_mac(secret, *parts)}" for secret in secrets]
        if request.args or not any(hmac.compare_digest(signature, mac) for mac in expected):
            self._refuse(request, caller, "bad signature")

    def first_start(self, call_id: str, deadline: float | None) -> bool:
        """Remember that ``call_id`` starts here until its deadline; whether it is the first time.

        A Redis error counts as a first start (logged): replay protection must not stop the calls.
        """
        ttl_ms = max(int(((deadline or time.time()) - time.time() + 1.0) * 1000), 1)
        try:
            return bool(self._store.set(f"{self._prefix}:started:{call_id}", 1, nx=True, px=ttl_ms))
        except redis.RedisError:
            log.warning("replay check of call %s skipped: the store is unreachable", call_id, exc_info=True)
            return True

    @staticmethod
    def _refuse(request: Any, caller: str, reason: str) -> NoReturn:
        # The reason goes to the provider's log only (with the call id, whatever the log format).
        log.warning("call %s of %s from %r refused: %s", request.id, request.task, caller or "?", reason)
        raise NotAuthenticated("Call refused: not signed by a trusted app", {"call_id": str(request.id)})

    # -- replies ----------------------------------------------------------------------------------------

    def sign_reply(self, call_id: str, body: str) -> str:
        """The reply as pushed: ``body`` prefixed with its signature when this app's key has a secret."""
        secrets = self._secrets(self.key)
        if not secrets:
            return body
        return f"{_REPLY_PREFIX.decode()}{_mac(secrets[0], call_id.encode(), body.encode())}:{body}"

    def open_reply(self, provider: str, call_id: str, raw: bytes) -> bytes:
        """The body of a reply from ``provider``, once its signature is checked.

        Raises:
            BadGateway: signing is on for ``provider`` and the reply is unsigned or forged.
        """
        secrets = self._secrets(provider)
        if not secrets:
            return raw
        if raw.startswith(_REPLY_PREFIX):
            mac, _, body = raw[len(_REPLY_PREFIX) :].partition(b":")
            if any(
                hmac.compare_digest(mac.decode("latin-1"), _mac(s, call_id.encode(), body)) for s in secrets
            ):
                return body
        log.warning("reply to call %s refused: not signed by %s", call_id, provider)
        raise BadGateway("Reply refused: not signed by the provider", {"call_id": call_id})


def unsigned_body(raw: bytes) -> bytes:
    """The body of a reply, its signature (if any) dropped unchecked: for a caller that does not sign,
    so that it still reads a signing provider's answer (``NotAuthenticated``, typically)."""
    if raw.startswith(_REPLY_PREFIX):
        return raw[len(_REPLY_PREFIX) :].partition(b":")[2]
    return raw
