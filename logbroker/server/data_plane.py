"""Produce, read and list offsets on the partitions this broker leads, for every front-end alike.

A produce is validated batch by batch, checked against the producer-state table, proposed to the
partition's Raft group and awaited as its acks ask; a read returns whole stored batches up to the high
watermark, and a fetch long-polls over reads (fetch_long_poll: min_bytes, max_wait, the fetch quota) with
the request's byte budget shared by its partitions (read_within_budget). The front-ends (gRPC service.py,
the Kafka listener) translate requests into these calls and exceptions into their own error codes.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Generic, TypeVar

from logbroker_client import records as rec

from logbroker.cluster.producer_state import BatchIdentity, Outcome, SequenceVerdict
from logbroker.cluster.replica import NotLeaderNow, Replica, ReplicaFailedError, now_ms
from logbroker.raft.errors import NotLeaderError, ProposalDroppedError
from logbroker.server import errors
from logbroker.server.quotas import FETCH
from logbroker.storage.errors import OffsetOutOfRangeError, StorageError

if TYPE_CHECKING:
    from logbroker.server.broker import Broker

EARLIEST_TIMESTAMP = -2
LATEST_TIMESTAMP = -1
# Per Produce, Fetch or ListOffsets, on any port: each partition costs a result in the answer, data or not.
MAX_REQUEST_PARTITIONS = 10_000


@dataclass
class ProduceResult:
    base_offset: int
    log_append_time_ms: int
    log_start_offset: int
    batch_base_offsets: list[int]


@dataclass
class FetchResult:
    records: bytes
    high_watermark: int
    log_start_offset: int


Answer = TypeVar("Answer")


@dataclass
class FetchPass(Generic[Answer]):
    """One pass of a fetch over its partitions, in the front-end's own response shape."""

    answer: Answer
    total: int  # the bytes that count toward min_bytes and the fetch quota
    failed: bool  # a partition was answered with an error: answer at once
    delivered: list[tuple[str, int, bytes]] = field(default_factory=list)  # (topic, partition, bytes) sent


class DataPlane:
    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self._data_arrived = asyncio.Event()

    # --------------------------------------------------------------------------------- produce

    async def produce(self, topic: str, index: int, records: bytes, acks: int, timeout_s: float) -> ProduceResult:
        if topic.startswith("__"):
            raise errors.InvalidTopic(f"topic {topic!r} is internal: only the broker writes to it")
        replica = self.broker.replicas.leader_replica(topic, index)
        self.broker.disk_guard.check(topic, index)
        payloads = self._validated(replica, records)
        del records  # the batches are copied out: an acks=all wait must not keep the request's bytes too
        base_offsets, last_offset = self._propose_new_batches(replica, payloads)
        self.broker.metrics.record_produced(topic, index, payloads)
        if acks != 0:
            waiter = replica.wait_committed(last_offset) if acks == -1 else replica.wait_durable(last_offset)
            await self._await_write(replica, waiter, acks, timeout_s)
        return ProduceResult(base_offsets[0], now_ms(), replica.log.log_start_offset, base_offsets)

    async def produce_internal(self, topic: str, index: int, batch: bytes) -> None:
        """Write a batch the broker itself makes (a dead letter) here, as leader, and wait for its commit."""
        replica = self.broker.replicas.leader_replica(topic, index)
        payloads = self._validated(replica, batch)
        _, last_offset = self._propose_new_batches(replica, payloads)
        self.broker.metrics.record_produced(topic, index, payloads)
        await self._await_write(replica, replica.wait_committed(last_offset), -1, 30.0)

    @staticmethod
    def _propose_new_batches(replica: Replica, payloads: list[tuple[bytes, int]]) -> tuple[list[int], int]:
        """Propose the batches not stored yet; return every batch's base offset and the last offset to await.

        Every batch is checked against the producer-state table first (producer_state.py), and nothing is
        proposed if one is refused. A batch an idempotent producer retries after a lost answer is answered
        with its first copy's offset."""
        identities = [BatchIdentity(*rec.producer_fields(payload)) for payload, _ in payloads]
        verdicts = replica.producers.check_request(identities)
        for identity, verdict in zip(identities, verdicts, strict=True):
            _refuse_if_refused(replica.name, identity, verdict)
        fresh = [payload for payload, verdict in zip(payloads, verdicts, strict=True) if verdict.duplicate_of is None]
        try:
            entries = iter(replica.propose(fresh)) if fresh else iter(())
        except (NotLeaderError, ProposalDroppedError):
            raise errors.NotLeader(f"{replica.name}: leadership is moving; retry", leader_id=-1) from None
        base_offsets = []
        last_offset = -1
        for verdict in verdicts:
            stored = verdict.duplicate_of
            if stored is None:
                entry = next(entries)
                base_offsets.append(entry.base_offset)
                last_offset = max(last_offset, entry.last_offset)
            else:
                base_offsets.append(stored.base_offset)
                last_offset = max(last_offset, stored.last_offset)
        return base_offsets, last_offset

    @staticmethod
    async def _await_write(replica: Replica, waiter: asyncio.Future[None], acks: int, timeout_s: float) -> None:
        try:
            await asyncio.wait_for(waiter, timeout_s)
        except TimeoutError:
            if acks == -1:
                raise errors.NotEnoughReplicas(
                    f"{replica.name}: not committed by a majority of {sorted(replica.node.membership.voters)} "
                    f"within {timeout_s:.1f}s; the write may still commit later") from None
            raise errors.RequestTimedOut(f"{replica.name}: write not durable within {timeout_s:.1f}s") from None
        except NotLeaderNow as exc:
            raise errors.NotLeader(str(exc), leader_id=exc.leader_id or -1) from None
        except ReplicaFailedError as exc:
            if len(replica.node.membership.voters) > 1:  # nothing unwritten was sent: a retry elsewhere is safe
                raise errors.NotLeader(f"{exc}; leadership moves to another replica, retry", leader_id=-1) from None
            raise errors.StorageFailure(f"{replica.name}: write failed: {exc.cause}") from None
        except (StorageError, OSError) as exc:
            raise errors.StorageFailure(f"{replica.name}: write failed: {exc}") from None
        except RuntimeError as exc:
            raise errors.StorageFailure(str(exc)) from None

    def _validated(self, replica: Replica, records: bytes) -> list[tuple[bytes, int]]:
        """Check every batch: header and CRC, then its records agree with the header (validate_records walks
        them: the broker's only per-record work). Nothing is proposed if any batch fails."""
        if not records:
            raise errors.CorruptBatch(f"{replica.name}: the request carries no record batch")
        limit = replica.log.config.max_message_bytes
        payloads = []
        pos = 0
        end = len(records)
        view = memoryview(records)
        while pos < end:
            header = _validated_batch(replica.name, records, pos, end, limit)
            payloads.append((bytes(view[pos:pos + header.size]) if pos or header.size != end else records,
                             header.records_count))
            pos += header.size
        return payloads

    # ----------------------------------------------------------------------------------- fetch

    def wake_fetchers(self) -> None:
        self._data_arrived.set()
        self._data_arrived = asyncio.Event()

    def read(self, topic: str, index: int, offset: int, max_bytes: int) -> FetchResult:
        replica = self.broker.replicas.leader_replica(topic, index)
        hw = replica.high_watermark
        start = replica.log.log_start_offset
        end = replica.log.log_end_offset
        # Past the high watermark but within the log: a new leader whose high watermark has not caught up
        # yet (it does once its first entry commits). Kafka answers such a fetch with nothing rather than an
        # error, which would send a consumer back to its reset policy and re-read the partition.
        if offset > max(hw, end) or offset < start:
            raise errors.OffsetOutOfRange(
                f"{replica.name}: offset {offset} is out of range; valid offsets are {start}..{hw} "
                "(log start..high watermark); seek to an offset in that range")
        try:
            data = b"" if offset >= hw else replica.log.read(offset, max_bytes, max_offset=hw)
        except OffsetOutOfRangeError as exc:
            raise errors.OffsetOutOfRange(str(exc)) from None
        return FetchResult(data, hw, start)

    def read_within_budget(self, topic: str, index: int, offset: int, limit: int, budget: int,
                           total: int) -> FetchResult:
        """Read one partition of a fetch whose earlier partitions already returned total bytes.

        Once some bytes are in, the request's budget caps the rest; the first batch always comes whole,
        however large (Kafka's rule, so a consumer never gets stuck behind a big batch). Records that would
        take the answer past the budget are left for the next fetch."""
        fetched = self.read(topic, index, offset, max(1, min(limit, budget - total)) if total else limit)
        if total and total + len(fetched.records) > budget:
            fetched.records = b""
        return fetched

    async def fetch_long_poll(self, client_id: str, max_wait_ms: int, min_bytes: int,
                              read_pass: Callable[[], Awaitable[FetchPass[Answer]]]) -> tuple[Answer, int]:
        """Read until min_bytes are in, a partition fails or max_wait_ms (capped by the broker) passes; wake
        for new data in between. Returns the last pass's answer and the throttle time (ms) the client's fetch
        quota asks of it; the fetch metrics count what is answered."""
        broker = self.broker
        max_wait_ms = min(max(max_wait_ms, 0), broker.config.max_fetch_wait_ms)
        deadline = time.monotonic() + max_wait_ms / 1000
        await broker.backpressure.hold_while_in_debt(client_id, FETCH)  # one that ignored its throttle time
        while True:
            done = await read_pass()
            remaining = deadline - time.monotonic()
            if done.total >= min_bytes or remaining <= 0 or done.failed:
                for topic, partition, data in done.delivered:
                    broker.metrics.record_fetched(topic, partition, data)
                return done.answer, broker.backpressure.fetched(client_id, done.total)
            await self.wait_for_data(remaining)

    async def wait_for_data(self, timeout_s: float) -> None:
        """Sleep until any partition's high watermark or leadership moves, or the timeout passes."""
        event = self._data_arrived
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)

    # ---------------------------------------------------------------------------- list offsets

    def list_offset(self, topic: str, index: int, timestamp_ms: int) -> tuple[int, int]:
        """(offset, timestamp) for earliest (-2), latest (-1) or the first record at or after a time."""
        replica = self.broker.replicas.leader_replica(topic, index)
        if timestamp_ms == EARLIEST_TIMESTAMP:
            return replica.log.log_start_offset, -1
        if timestamp_ms == LATEST_TIMESTAMP:
            return replica.high_watermark, -1
        if timestamp_ms < 0:
            raise errors.InvalidRequest(f"timestamp {timestamp_ms} is neither -1 (latest), -2 (earliest) nor >= 0")
        batch_offset = replica.log.offset_for_timestamp(timestamp_ms)
        if batch_offset is None or batch_offset >= replica.high_watermark:
            return -1, -1
        return _first_record_at_or_after(replica, batch_offset, timestamp_ms)


def _first_record_at_or_after(replica: Replica, batch_offset: int, timestamp_ms: int) -> tuple[int, int]:
    # The time index finds the first batch whose maxTimestamp reaches the target; decoding the batches
    # from there (off the hot path) finds the exact record, as Kafka does.
    offset = batch_offset
    while offset < replica.high_watermark:
        data = replica.log.read(offset, 64 * 1024, max_offset=replica.high_watermark)
        if not data:
            break
        for pos, header in rec.iter_batch_headers(data):
            offset = header.base_offset + header.last_offset_delta + 1
            if header.is_control or header.max_timestamp < timestamp_ms:
                continue
            for record in rec.decode_records(data, pos, header):
                if record.offset >= batch_offset and record.timestamp >= timestamp_ms:
                    return record.offset, record.timestamp
    return -1, -1


def _validated_batch(name: str, records: bytes, pos: int, end: int, limit: int) -> rec.BatchHeader:
    """One batch of a produce request, checked whole (header, CRC, size, codec, records), or the error."""
    try:
        header = rec.validate_batch(records, pos, end)
    except rec.CorruptBatchError as exc:
        raise errors.CorruptBatch(
            f"{name}: batch at byte {pos} of the request rejected: {exc}; nothing was written") from None
    if header.size > limit:
        raise errors.RecordTooLarge(
            f"{name}: batch of {header.size} bytes exceeds max.message.bytes={limit}; "
            "send smaller batches or raise the topic's max.message.bytes")
    if header.attributes & rec.CONTROL_FLAG:
        raise errors.CorruptBatch(f"{name}: clients may not write control batches")
    codec = header.attributes & rec.COMPRESSION_MASK
    if codec not in rec.SUPPORTED_CODECS:
        raise errors.CorruptBatch(f"{name}: compression codec {codec} is not supported; use none "
                                  "(0), gzip (1), snappy (2), lz4 (3) or zstd (4)")
    try:  # a batch whose records contradict its header would break every consumer of the partition
        rec.validate_records(records, pos, header)
    except rec.CorruptBatchError as exc:
        raise errors.CorruptBatch(
            f"{name}: batch at byte {pos} of the request rejected: {exc}; nothing was written") from None
    return header


def _refuse_if_refused(partition: str, batch: BatchIdentity, verdict: SequenceVerdict) -> None:
    """Raise the error a refused batch is answered with (nothing of the request is written)."""
    outcome = verdict.outcome
    if outcome is Outcome.FENCED_EPOCH:
        raise errors.InvalidProducerEpoch(
            f"{partition}: producer {batch.producer_id} sent epoch {batch.epoch}, but epoch {verdict.known_epoch} "
            "already wrote here: a newer instance of this producer took over; nothing was written. Close this "
            "producer")
    if outcome is Outcome.OUT_OF_ORDER:
        raise errors.OutOfOrderSequence(
            f"{partition}: producer {batch.producer_id} epoch {batch.epoch} sent sequence {batch.base_sequence}, "
            f"expected {verdict.expected_sequence}: an earlier batch is missing; nothing was written. The "
            "producer resends in order once the earlier batch is stored")
    if outcome is Outcome.STORED_LONG_AGO:
        raise errors.DuplicateSequence(
            f"{partition}: producer {batch.producer_id} retried sequence {batch.base_sequence}, stored too long "
            f"ago to find its offset; it is not written again {errors.ALREADY_STORED_MARKER}")


def request_partitions_problem(api: str, partitions: Sequence[tuple[str, int]]) -> str:
    """Why a request naming these (topic, partition)s is refused as a whole ("" if it is fine), on every
    front-end: more than MAX_REQUEST_PARTITIONS (each costs a coroutine or a result; a few megabytes of empty
    entries would hold the event loop for seconds), or one named twice (read or written again for nothing)."""
    if len(partitions) > MAX_REQUEST_PARTITIONS:
        return (f"a {api} may name at most {MAX_REQUEST_PARTITIONS} partitions, this one names "
                f"{len(partitions)}; split it into several requests")
    seen: set[tuple[str, int]] = set()
    for key in partitions:
        if key in seen:
            return f"partition {key[0]}-{key[1]} is named more than once in one {api}; name it once"
        seen.add(key)
    return ""
