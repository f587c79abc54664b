"""The provider's reply push on a real Redis: first reply only, a waiting caller woken, nothing left over."""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator

import pytest
import redis

from celery_services.distribution.provider import Replies
from celery_services.distribution.redis_clients import HeldConnection
from celery_services.testing import wait_for

from .support import free_port


@pytest.fixture
def key(raw: redis.Redis) -> Iterator[str]:
    name = f"test-replies-{os.urandom(4).hex()}:reply:call"
    yield name
    leftovers = list(raw.scan_iter(f"{name}*"))
    if leftovers:
        raw.delete(*leftovers)


def test_the_first_reply_wakes_its_waiting_caller_and_a_second_is_not_pushed(
    raw: redis.Redis, key: str, redis_url: str
) -> None:
    replies = Replies(raw)
    popped: list[object] = []
    name = f"waiter-{os.urandom(3).hex()}"
    caller = redis.Redis.from_url(redis_url, client_name=name)
    waiter = threading.Thread(target=lambda: popped.append(caller.blpop([key], timeout=5)))
    waiter.start()
    # The caller blocked in its BLPOP first, as a caller does: the push must wake it.
    wait_for(lambda: any(c["name"] == name and c["cmd"] == "blpop" for c in raw.client_list()), timeout=5)
    big = "x" * 100_000
    assert replies.push(key, f'{{"result": "{big}"}}', time.time() + 5)
    waiter.join(timeout=6)
    assert popped == [(key.encode(), f'{{"result": "{big}"}}'.encode())]
    assert not replies.push(key, '{"result": "second"}', time.time() + 5)  # the first reply won
    assert raw.llen(key) == 0
    assert 4000 < raw.pttl(f"{key}:sent") <= 6000  # the marker expires a second after the deadline
    assert list(raw.scan_iter(f"{key}:pending:*")) == []  # the loser's own list is gone
    caller.close()


def test_a_reply_waits_for_its_caller_until_a_second_after_the_deadline(raw: redis.Redis, key: str) -> None:
    assert Replies(raw).push(key, '{"result": 1}', time.time() + 2)
    assert raw.lrange(key, 0, -1) == [b'{"result": 1}']
    assert 2000 < raw.pttl(key) <= 3000
    assert list(raw.scan_iter(f"{key}:pending:*")) == []


def test_nothing_is_pushed_for_a_caller_that_gave_up_or_a_passed_deadline(raw: redis.Redis, key: str) -> None:
    replies = Replies(raw)
    assert not replies.push(key, '{"result": 1}', time.time() - 0.1)
    raw.set(f"{key}:sent", "abandoned", px=5000)  # what an asyncio caller sets when it gives up
    assert not replies.push(key, '{"result": 1}', time.time() + 5)
    assert raw.exists(key) == 0
    assert list(raw.scan_iter(f"{key}:pending:*")) == []


def test_a_held_push_runs_meanwhile_once_in_every_case_and_keeps_its_connection_in_step(
    raw: redis.Redis, key: str
) -> None:
    # The RabbitMQ fast path acknowledges its call in ``meanwhile``: between writing the push and reading
    # Redis's answers. It must run whatever the push did, and answers must never be left unread for the
    # thread's next push to take as its own.
    replies = Replies(raw)
    held = HeldConnection(raw.connection_pool)
    ran: list[str] = []
    try:
        assert replies.push_on(held, key, '{"result": 1}', time.time() + 5, meanwhile=lambda: ran.append("a"))
        assert not replies.push_on(
            held, key, '{"result": 2}', time.time() - 1, meanwhile=lambda: ran.append("b")
        )

        def broken() -> None:
            ran.append("c")
            raise ConnectionError("the broker went away while acknowledging")

        with pytest.raises(ConnectionError):
            replies.push_on(held, f"{key}-2", '{"result": 3}', time.time() + 5, meanwhile=broken)
        # The failed acknowledgement's push was answered and read: this push reads its own answers.
        assert not replies.push_on(held, f"{key}-2", '{"result": 4}', time.time() + 5, meanwhile=lambda: None)
        assert raw.lrange(f"{key}-2", 0, -1) == [b'{"result": 3}']
        # A reply store that cannot be reached: nothing is pushed, the call is still acknowledged.
        unreachable = redis.ConnectionPool(host="127.0.0.1", port=free_port(), socket_connect_timeout=1)
        lost = HeldConnection(unreachable)
        assert not replies.push_on(
            lost, key, '{"result": 5}', time.time() + 5, meanwhile=lambda: ran.append("d")
        )
        assert ran == ["a", "b", "c", "d"]
    finally:
        held.release()
        raw.delete(f"{key}-2", f"{key}-2:sent")
