"""Backpressure and client quotas: how a broker slows producers and consumers down instead of failing them or
growing without limit.

- In-flight produce bytes (max_inflight_produce_bytes): the bytes of the produce requests a broker is handling
  (from admission until answered, an acks=all wait for the followers included). A request that would go past
  the bound waits, in arrival order, for room; one that finds none within produce_backpressure_wait_ms is
  answered REQUEST_TIMED_OUT (retriable: nothing of it was written). A request that had to wait is answered
  with a throttle time as long as its wait, so the client slows down while the broker is short of room.
- Byte-rate quotas per client id (the `client-id` gRPC metadata the clients send): a token bucket per client and
  direction (produce, fetch), refilled at the quota's rate and holding at most QUOTA_BURST_S of it. Each answered
  request is charged its bytes; a bucket in debt answers with the time that pays the debt back
  (throttle_time_ms, as Kafka's quotas do) and the client waits that long before its next request to the
  broker (Kafka's KIP-219). A client that does not wait is held by the broker instead: its next request waits
  out the debt before it is read or written.
- Disk floor (min_free_disk_bytes): a produce is refused with a clear STORAGE_ERROR while the data directory's
  disk has less free space than this, before a write could fail half-way with ENOSPC.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import shutil
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping
from dataclasses import dataclass, replace
from pathlib import Path

from logbroker.server import errors
from logbroker.server.config import BrokerConfig

PRODUCE = "produce"
FETCH = "fetch"
QUOTA_BURST_S = 1.0  # a client may send this many seconds' worth of its quota at once, after a quiet spell
# The longest throttle answered or held: a single large request from a client with a small quota runs up a
# debt of minutes; it is paid back over several requests rather than by one wait past every client timeout.
MAX_THROTTLE_S = 10.0
MAX_TRACKED_CLIENTS = 10_000  # past this many buckets, the full (idle) ones are forgotten
DISK_CHECK_INTERVAL_S = 1.0  # free space is asked of the file system at most this often
CLIENT_ID_METADATA_KEY = "client-id"


@dataclass(frozen=True)
class ClientQuota:
    """Byte rates a client may produce and fetch at, per broker; 0 means unlimited."""

    produce_bytes_per_s: int = 0
    fetch_bytes_per_s: int = 0

    def rate_bytes_per_s(self, direction: str) -> int:
        return self.produce_bytes_per_s if direction == PRODUCE else self.fetch_bytes_per_s


def quotas_from(config: BrokerConfig) -> ClientQuotas:
    default = ClientQuota(config.quota_produce_bytes_per_s, config.quota_fetch_bytes_per_s)
    # A client's entry names one rate or both; one it leaves out is the default's.
    per_client = {client_id: replace(default, **rates) for client_id, rates in config.client_quotas.items()}
    return ClientQuotas(default, per_client)


class ByteRateBucket:
    """A token bucket of bytes: full at rate * QUOTA_BURST_S, refilled at rate per second; charges may drive it
    into debt, and the debt divided by the rate is how long the client must pause."""

    __slots__ = ("rate_bytes_per_s", "capacity_bytes", "tokens", "updated_s")

    def __init__(self, rate_bytes_per_s: int, now_s: float) -> None:
        self.rate_bytes_per_s = rate_bytes_per_s
        self.capacity_bytes = rate_bytes_per_s * QUOTA_BURST_S
        self.tokens = self.capacity_bytes
        self.updated_s = now_s

    def _refill(self, now_s: float) -> None:
        elapsed_s = max(0.0, now_s - self.updated_s)
        self.tokens = min(self.capacity_bytes, self.tokens + elapsed_s * self.rate_bytes_per_s)
        self.updated_s = now_s

    def debt_s(self, now_s: float) -> float:
        """How long until the bucket is out of debt (0 when it is not in debt)."""
        self._refill(now_s)
        return max(0.0, -self.tokens) / self.rate_bytes_per_s

    def charge(self, nbytes: int, now_s: float) -> float:
        """Take nbytes; return the debt that leaves, in seconds of the rate."""
        self._refill(now_s)
        self.tokens -= nbytes
        return max(0.0, -self.tokens) / self.rate_bytes_per_s

    def is_full(self, now_s: float) -> bool:
        self._refill(now_s)
        return self.tokens >= self.capacity_bytes


class ClientQuotas:
    """The quota of every client id (a per-client setting, else the default) and each one's buckets."""

    def __init__(self, default: ClientQuota, per_client: Mapping[str, ClientQuota],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.default = default
        self.per_client = dict(per_client)
        self.clock = clock
        self._buckets: dict[tuple[str, str], ByteRateBucket] = {}

    def quota_of(self, client_id: str) -> ClientQuota:
        return self.per_client.get(client_id, self.default)

    def _bucket(self, client_id: str, direction: str) -> ByteRateBucket | None:
        rate = self.quota_of(client_id).rate_bytes_per_s(direction)
        if rate <= 0:
            return None
        key = (client_id, direction)
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED_CLIENTS:
                self._forget_idle()
            bucket = self._buckets[key] = ByteRateBucket(rate, self.clock())
        return bucket

    def _forget_idle(self) -> None:
        now_s = self.clock()
        for key in [key for key, bucket in self._buckets.items() if bucket.is_full(now_s)]:
            del self._buckets[key]

    def debt_s(self, client_id: str, direction: str) -> float:
        """How long the client must still pause before it is back under its rate (0: not throttled)."""
        bucket = self._bucket(client_id, direction)
        return 0.0 if bucket is None else min(bucket.debt_s(self.clock()), MAX_THROTTLE_S)

    def charge(self, client_id: str, direction: str, nbytes: int) -> float:
        """Count an answered request's bytes; return the throttle time it earns the client, in seconds."""
        bucket = self._bucket(client_id, direction)
        return 0.0 if bucket is None else min(bucket.charge(nbytes, self.clock()), MAX_THROTTLE_S)


class InflightBudget:
    """Bytes of produce requests being handled, bounded: a request that does not fit waits, first come first
    served, until enough earlier ones are answered. A request alone larger than the bound goes when nothing
    else is in flight (max_request_bytes caps it anyway)."""

    def __init__(self, limit_bytes: int) -> None:
        self.limit_bytes = limit_bytes
        self.used_bytes = 0
        self._waiters: deque[tuple[int, asyncio.Future[None]]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _fits(self, size: int) -> bool:
        return self.used_bytes == 0 or self.used_bytes + size <= self.limit_bytes

    async def acquire(self, size: int, wait_s: float) -> float:
        """Take room for size bytes, waiting up to wait_s; return the seconds waited. TimeoutError if none came."""
        if not self._waiters and self._fits(size):
            self.used_bytes += size
            return 0.0
        started_s = time.monotonic()
        entry = (size, asyncio.get_running_loop().create_future())
        self._waiters.append(entry)
        try:
            await asyncio.wait_for(asyncio.shield(entry[1]), wait_s)
        except (TimeoutError, asyncio.CancelledError):
            if entry[1].done():  # admitted just as the wait ended: give the room back
                self.release(size)
            else:
                self._waiters.remove(entry)
                entry[1].cancel()
                self._admit_waiting()  # those behind it may fit now
            raise
        return time.monotonic() - started_s

    def release(self, size: int) -> None:
        self.used_bytes -= size
        self._admit_waiting()

    def _admit_waiting(self) -> None:
        while self._waiters and self._fits(self._waiters[0][0]):
            size, future = self._waiters.popleft()
            self.used_bytes += size
            future.set_result(None)


class DiskGuard:
    """Refuses produce requests while the data directory's disk is below a free-space floor (0: never)."""

    def __init__(self, data_dir: Path, min_free_bytes: int,
                 free_bytes: Callable[[Path], int] = lambda path: shutil.disk_usage(path).free) -> None:
        self.data_dir = data_dir
        self.min_free_bytes = min_free_bytes
        self._free_bytes = free_bytes
        self._checked_s = -math.inf
        self._last_free_bytes = 0

    def check(self, topic: str, partition: int) -> None:
        if self.min_free_bytes <= 0:
            return
        now_s = time.monotonic()
        if now_s - self._checked_s >= DISK_CHECK_INTERVAL_S:
            self._last_free_bytes = self._free_bytes(self.data_dir)
            self._checked_s = now_s
        if self._last_free_bytes < self.min_free_bytes:
            raise errors.StorageFailure(
                f"{topic}-{partition}: refused, the disk holding {self.data_dir} has {mib(self._last_free_bytes)} "
                f"free, below the broker's floor min_free_disk_bytes={mib(self.min_free_bytes)}; nothing was "
                "written. Free space on that disk, lower the topics' retention.bytes / retention.ms, or move "
                "partitions to other brokers")


def mib(nbytes: float) -> str:
    return f"{nbytes / (1 << 20):.1f} MiB"


@dataclass
class ProduceTicket:
    """One admitted produce request: the throttle time its answer carries, in seconds."""

    throttle_s: float

    @property
    def throttle_ms(self) -> int:
        return throttle_ms(self.throttle_s)


def throttle_ms(seconds: float) -> int:
    return math.ceil(seconds * 1000) if seconds > 0 else 0


class Backpressure:
    """The broker's admission of produce and fetch requests: quotas first, then the in-flight bound."""

    def __init__(self, quotas: ClientQuotas, inflight_limit_bytes: int, produce_wait_s: float,
                 node_id: int) -> None:
        self.quotas = quotas
        self.inflight = InflightBudget(inflight_limit_bytes)
        self.produce_wait_s = produce_wait_s
        self.node_id = node_id

    async def hold_while_in_debt(self, client_id: str, direction: str) -> None:
        """A client that did not wait out its last throttle time waits it out here, before its request runs."""
        debt_s = self.quotas.debt_s(client_id, direction)
        if debt_s > 0:
            await asyncio.sleep(debt_s)

    @contextlib.asynccontextmanager
    async def produce(self, client_id: str, size: int, timeout_s: float) -> AsyncIterator[ProduceTicket]:
        """Admit a produce request of size bytes (raise RequestTimedOut when no room comes in time); on exit,
        charge the client's quota and set the throttle time of the answer."""
        await self.hold_while_in_debt(client_id, PRODUCE)
        wait_s = min(self.produce_wait_s, timeout_s)
        try:
            waited_s = await self.inflight.acquire(size, wait_s)
        except TimeoutError:
            raise InflightFull(self._full_message(size, wait_s), wait_s) from None
        ticket = ProduceTicket(waited_s)
        try:
            yield ticket
        finally:
            self.inflight.release(size)
        ticket.throttle_s = min(MAX_THROTTLE_S, max(waited_s, self.quotas.charge(client_id, PRODUCE, size)))

    def _full_message(self, size: int, wait_s: float) -> str:
        return (f"broker {self.node_id} holds {mib(self.inflight.used_bytes)} of produce requests in flight "
                f"(max_inflight_produce_bytes={mib(self.inflight.limit_bytes)}) and found no room for this "
                f"{mib(size)} request within {wait_s:g}s; nothing of it was written. The producer retries after "
                "the throttle time; if this persists the brokers cannot keep up (slow disks or followers): add "
                "brokers or partitions, or raise max_inflight_produce_bytes")

    def fetched(self, client_id: str, nbytes: int) -> int:
        """Charge an answered fetch; the throttle time of its answer in ms."""
        return throttle_ms(self.quotas.charge(client_id, FETCH, nbytes))


class InflightFull(errors.RequestTimedOut):
    """No room for a produce request within the wait: retriable, and the answer asks the client to pause."""

    def __init__(self, message: str, throttle_s: float) -> None:
        super().__init__(message)
        self.throttle_s = throttle_s


def client_id_of(metadata: object) -> str:
    """The `client-id` a client sent as gRPC metadata ("" when none: the default quota applies)."""
    for key, value in metadata or ():  # type: ignore[attr-defined]
        if key == CLIENT_ID_METADATA_KEY:
            return str(value)[:255]
    return ""
