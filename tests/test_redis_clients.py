"""The library's Redis clients: a connection opened for a call is bounded by the call's deadline only while
it connects (the stalled-Redis case is in ``faults/test_calls_faults.py``)."""

from __future__ import annotations

import asyncio
import time

import pytest
import redis

from celery_services.distribution.redis_clients import (
    async_redis_client,
    connecting_by,
    pack_commands,
    redis_client,
)

pytestmark = pytest.mark.timeout(30)


def test_a_connection_opened_for_a_call_keeps_its_configured_timeouts_afterwards(redis_url: str) -> None:
    client = redis_client(redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)
    try:
        connection = client.connection_pool.get_connection()
        connection.disconnect()
        with connecting_by(time.time() + 0.5):
            connection.connect()
        # The handshake had half a second; every later command has the client's read timeout.
        assert connection._sock.gettimeout() == 5.0
        assert (connection.socket_timeout, connection.socket_connect_timeout) == (5.0, 2.0)
        connection.send_command("PING")
        assert connection.read_response(timeout=0.1) in (b"PONG", "PONG")
        assert connection._sock.gettimeout() == 5.0
        client.connection_pool.release(connection)
    finally:
        client.close()


def test_no_connection_is_opened_for_a_call_whose_deadline_has_passed(redis_url: str) -> None:
    client = redis_client(redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)
    try:
        with connecting_by(time.time() - 0.001), pytest.raises(redis.TimeoutError):
            client.ping()
        assert client.ping()  # outside a call, the same pool connects as configured
    finally:
        client.close()


def test_an_asyncio_connection_opened_for_a_call_keeps_its_configured_timeouts(redis_url: str) -> None:
    async def scenario() -> None:
        client = async_redis_client(redis_url, socket_timeout=5.0, socket_connect_timeout=2.0)
        try:
            connection = client.connection_pool.make_connection()
            with connecting_by(time.time() + 0.5):
                await connection.connect()
            assert (connection.socket_timeout, connection.socket_connect_timeout) == (5.0, 2.0)
            await connection.disconnect()
            with connecting_by(time.time() - 0.001), pytest.raises(redis.TimeoutError):
                await connection.connect()
            assert await client.ping()
        finally:
            await client.aclose()

    asyncio.run(scenario())


def test_commands_are_packed_as_redis_py_packs_them_and_sent_in_one_write(redis_url: str) -> None:
    client = redis_client(redis_url, socket_timeout=2.0, socket_connect_timeout=2.0)
    connection = client.connection_pool.get_connection()
    try:
        key = f"cs-pack-{time.time_ns()}"
        commands = [("LPUSH", key, b"\x00\xff bytes", "text é"), ("PEXPIRE", key, 5000), ("BLPOP", key, 0.25)]
        packed = pack_commands(commands)
        assert packed == [b"".join(connection.pack_commands(commands))]
        connection.send_packed_command(packed)
        assert [connection.read_response() for _ in commands] == [2, 1, [key.encode(), "text é".encode()]]
    finally:
        client.connection_pool.release(connection)
        client.delete(key)
        client.close()
