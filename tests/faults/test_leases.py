"""Leases of calls in flight on a Redis broker (the Celery consumer's path: ``lease.py``) across hosts whose
clocks differ: a lease is judged by one clock, the broker's, never by each replica's own."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator

import pytest
import redis

from celery_services.distribution.lease import LeaseKeeper
from celery_services.testing import wait_for

LEASE = 1.0
#: The holder's clock runs this far behind: three leases, so that its renewals, judged by the other
#: replica's clock, look lapsed however the scans fall.
SKEW = 3 * LEASE

#: A replica holding call ``t1`` on a host whose clock is SKEW seconds behind, until its stdin closes.
HOLDER = """
import sys, time, types
from celery_services.distribution import lease

real = time.time
lease.time = types.SimpleNamespace(time=lambda: real() - float(sys.argv[4]), monotonic=time.monotonic)
options = {"global_keyprefix": f"{sys.argv[3]}:"}
keeper = lease.LeaseKeeper(
    sys.argv[1], sys.argv[2], float(sys.argv[5]), prefix=sys.argv[3], transport_options=options
)
keeper.start()
keeper.hold("t1")
print("holding", flush=True)
sys.stdin.read()
keeper.stop()
"""


@pytest.fixture
def names(redis_url: str) -> Iterator[tuple[str, str]]:
    key, prefix = f"lease-{os.urandom(3).hex()}", f"cs-lease-{os.urandom(4).hex()}"
    yield key, prefix
    store = redis.Redis.from_url(redis_url)
    store.delete(*(f"{prefix}:{name}" for name in ("unacked", "unacked_index", key, f"leases:{key}")))
    store.close()


@pytest.mark.timeout(60)
def test_a_call_held_by_a_replica_whose_clock_is_behind_is_not_run_again(
    redis_url: str, names: tuple[str, str]
) -> None:
    # Each replica wrote its leases by its own clock and judged the others' by its own: a holder whose
    # clock ran more than a lease behind renewed in vain, and its running call was given back to the queue,
    # to run a second time (found by a review; lease_timeout is a quarter of the call timeout, 5 s by
    # default, well within the skew of hosts that lost their time sync).
    key, prefix = names
    store = redis.Redis.from_url(redis_url)
    message = {"body": "e30=", "headers": {"id": "c1"}, "properties": {"delivery_tag": "t1"}}
    # Kombu's keys under a prefix of the test's own (its global_keyprefix): Celery's are left alone.
    unacked, queue, leases = f"{prefix}:unacked", f"{prefix}:{key}", f"{prefix}:leases:{key}"
    store.hset(unacked, "t1", json.dumps([message, "", key]))
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, redis_url, key, prefix, str(SKEW), str(LEASE)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    other = LeaseKeeper(
        redis_url, key, LEASE, prefix=prefix, transport_options={"global_keyprefix": f"{prefix}:"}
    )
    scans = 0
    scan = other._restore_lapsed

    def counted(*args: object) -> None:
        nonlocal scans
        scan(*args)  # type: ignore[arg-type]
        scans += 1

    other._restore_lapsed = counted  # type: ignore[method-assign]
    try:
        assert holder.stdout is not None and holder.stdout.readline() == b"holding\n"
        wait_for(lambda: store.zscore(leases, "t1") is not None, 10, what="the holder's lease")
        # The lease set goes with the key's last replica (an hour on, as Celery's own unacked messages): a key
        # retired for good left it for ever.
        assert 0 < store.ttl(leases) <= 3600
        other.start()
        # Six scans: two seconds, twice the lease, of a holder renewing every third of it.
        wait_for(lambda: scans >= 6, 15, what="the other replica's scans")
        assert (other.restored, store.llen(queue)) == (0, 0), "a call its holder still runs was run again"
        assert store.hexists(unacked, "t1")
        # The holder dies: its call comes back, by the same clock.
        holder.kill()
        holder.wait(10)
        wait_for(lambda: other.restored == 1, 10, what="the dead holder's call given back")
        assert store.llen(queue) == 1
    finally:
        other.stop()
        if holder.poll() is None:
            holder.kill()
            holder.wait(10)
        store.close()
