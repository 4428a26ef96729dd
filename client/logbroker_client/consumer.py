"""Consumer: read assigned partitions from any offset, timestamp, the beginning or the end.

poll() returns records from a local buffer; when the buffer runs dry it takes the response of the
fetch already in flight and at once sends the next one, so the broker's read and the transfer overlap
with the caller decoding and processing records.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, NamedTuple

import grpc

from logbroker_client import records as rec
from logbroker_client.connection import DEFAULT_REQUEST_TIMEOUT_MS, Connection, translate_rpc_error
from logbroker_client.errors import (
    BrokerUnavailableError,
    CorruptBatchError,
    LogbrokerError,
    NotLeaderError,
    OffsetOutOfRangeError,
    error_for,
)
from logbroker_client.metadata import ClusterMetadata
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.types import ConsumerRecord, OffsetAndTimestamp, TopicPartition

EARLIEST = -2
LATEST = -1
DEFAULT_FETCH_MAX_WAIT_MS = 500
DEFAULT_FETCH_MAX_BYTES = 50 << 20
DEFAULT_MAX_PARTITION_FETCH_BYTES = 1 << 20  # Kafka's default; larger answers measured slower
DEFAULT_MAX_POLL_RECORDS = 100_000
RESETS = {"earliest": EARLIEST, "latest": LATEST, "none": None}
RETRY_BACKOFF_S = 0.05


def decode_batch(tp: TopicPartition, data: bytes, pos: int, header: rec.BatchHeader, start: int,
                 out: list[ConsumerRecord], check_crc: bool) -> None:
    """Append the records of the fetched batch at pos from offset start on to out.

    A batch that cannot be read (damaged bytes, or records that contradict its header, as an older broker
    stored them) appends nothing and raises CorruptBatchError naming it and the seek that skips it."""
    try:
        if check_crc:
            _check_crc(data, pos, header)
        rec.decode_records(data, pos, header, tp.topic, tp.partition, start, out)
    except rec.CorruptBatchError as exc:
        last = header.base_offset + header.last_offset_delta
        raise CorruptBatchError(
            f"{tp.topic}-{tp.partition}: the batch at offset {header.base_offset} (offsets {header.base_offset}.."
            f"{last}) cannot be read: {exc}; skip it with seek(TopicPartition({tp.topic!r}, {tp.partition}), "
            f"{last + 1})", tp.topic, tp.partition) from None


def _check_crc(data: bytes, pos: int, header: rec.BatchHeader) -> None:
    """As Kafka's check.crcs: bytes damaged on a broker's disk or on the way are refused, never decoded."""
    end = pos + header.batch_length + rec.LOG_OVERHEAD
    if rec.crc32c(memoryview(data)[pos + rec.CRC_START:end]) != header.crc:
        raise rec.CorruptBatchError("it fails its CRC check, so the broker's copy is damaged (after a leader "
                                    "change another replica may serve an intact one)")


class _Chunk(NamedTuple):
    """Fetched records of one partition, and the offset after the last batch they came in."""

    tp: TopicPartition
    records: list[ConsumerRecord]
    next_offset: int


class _Fetch:
    """A Fetch request in flight, with the positions it was sent for."""

    __slots__ = ("call", "address", "offsets", "generations")

    def __init__(self, call: Any, address: str, offsets: dict[TopicPartition, int],
                 generations: dict[TopicPartition, int]) -> None:
        self.call = call
        self.address = address
        self.offsets = offsets
        self.generations = generations


class Consumer:
    def __init__(
        self,
        bootstrap: str | Sequence[str] | None = None,
        *,
        auto_offset_reset: str = "latest",
        fetch_min_bytes: int = 1,
        fetch_max_wait_ms: int = DEFAULT_FETCH_MAX_WAIT_MS,
        fetch_max_bytes: int = DEFAULT_FETCH_MAX_BYTES,
        max_partition_fetch_bytes: int = DEFAULT_MAX_PARTITION_FETCH_BYTES,
        max_poll_records: int = DEFAULT_MAX_POLL_RECORDS,
        request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS,
        check_crcs: bool = True,
    ) -> None:
        if auto_offset_reset not in RESETS:
            raise ValueError(f"auto_offset_reset must be one of {sorted(RESETS)}, got {auto_offset_reset!r}")
        self._reset = RESETS[auto_offset_reset]
        self._check_crcs = check_crcs
        self._min_bytes = fetch_min_bytes
        self._max_wait_ms = fetch_max_wait_ms
        self._max_bytes = fetch_max_bytes
        self._partition_max_bytes = max_partition_fetch_bytes
        self._max_poll_records = max_poll_records
        self._timeout_s = request_timeout_ms / 1000
        self._metadata = ClusterMetadata(bootstrap, request_timeout_ms)
        self._assigned: list[TopicPartition] = []
        self._positions: dict[TopicPartition, int] = {}   # next offset poll() returns
        self._fetch_offsets: dict[TopicPartition, int] = {}  # next offset to fetch
        self._generations: dict[TopicPartition, int] = {}  # bumped by seek: stale fetches are dropped
        self._paused: set[TopicPartition] = set()
        self._buffer: deque[_Chunk] = deque()
        self._in_flight: list[_Fetch] = []
        self._closed = False

    # ------------------------------------------------------------------------------ assignment

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        partitions = [TopicPartition(*tp) for tp in partitions]
        for tp in partitions:
            count = self._metadata.partitions_for(tp.topic)
            if not 0 <= tp.partition < count:
                raise error_for(pb.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                                f"topic {tp.topic!r} has partitions 0..{count - 1}; "
                                f"partition {tp.partition} does not exist", tp.topic, tp.partition)
        self._assigned = list(dict.fromkeys(partitions))
        keep = set(self._assigned)
        for table in (self._positions, self._fetch_offsets):
            for tp in list(table):
                if tp not in keep:
                    del table[tp]
        self._paused &= keep
        self._drop_buffered(lambda tp: tp not in keep)

    def assignment(self) -> set[TopicPartition]:
        return set(self._assigned)

    def _require_assigned(self, tp: TopicPartition) -> TopicPartition:
        tp = TopicPartition(*tp)
        if tp not in self._assigned:
            raise LogbrokerError(f"{tp.topic}-{tp.partition} is not assigned to this consumer; assign() it first")
        return tp

    # ---------------------------------------------------------------------------------- seeking

    def seek(self, partition: TopicPartition, offset: int) -> None:
        tp = self._require_assigned(partition)
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        self._set_position(tp, offset)

    def _set_position(self, tp: TopicPartition, offset: int) -> None:
        self._positions[tp] = offset
        self._fetch_offsets[tp] = offset
        self._generations[tp] = self._generations.get(tp, 0) + 1
        self._drop_buffered(lambda other: other == tp)

    def _drop_buffered(self, drop: Any) -> None:
        self._buffer = deque(chunk for chunk in self._buffer if not drop(chunk.tp))

    def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        tps = [self._require_assigned(tp) for tp in partitions] or list(self._assigned)
        for tp, offset in self._list_offsets({tp: EARLIEST for tp in tps}).items():
            self._set_position(tp, offset[0])

    def seek_to_end(self, *partitions: TopicPartition) -> None:
        tps = [self._require_assigned(tp) for tp in partitions] or list(self._assigned)
        for tp, offset in self._list_offsets({tp: LATEST for tp in tps}).items():
            self._set_position(tp, offset[0])

    def position(self, partition: TopicPartition) -> int:
        tp = self._require_assigned(partition)
        if tp not in self._positions:
            self._reset_positions([tp])
        return self._positions[tp]

    def beginning_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        found = self._list_offsets({TopicPartition(*tp): EARLIEST for tp in partitions})
        return {tp: offset for tp, (offset, _) in found.items()}

    def end_offsets(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        found = self._list_offsets({TopicPartition(*tp): LATEST for tp in partitions})
        return {tp: offset for tp, (offset, _) in found.items()}

    def offsets_for_times(
        self, timestamps: Mapping[TopicPartition, int]
    ) -> dict[TopicPartition, OffsetAndTimestamp | None]:
        """For each partition, the first record at or after the timestamp (ms), or None if none is."""
        for ts in timestamps.values():
            if ts < 0:
                raise ValueError(f"timestamps must be >= 0 ms since the epoch, got {ts}")
        found = self._list_offsets({TopicPartition(*tp): ts for tp, ts in timestamps.items()})
        return {tp: (OffsetAndTimestamp(o, t) if o >= 0 else None) for tp, (o, t) in found.items()}

    def _list_offsets(self, queries: Mapping[TopicPartition, int]) -> dict[TopicPartition, tuple[int, int]]:
        """ListOffsets at each partition's leader, retrying while leadership moves (up to the request timeout)."""
        deadline = time.monotonic() + self._timeout_s
        while True:
            try:
                return self._list_offsets_once(queries)
            except LogbrokerError as exc:
                if not exc.retriable or time.monotonic() > deadline:
                    raise
                for tp in queries:  # a partition none of whose replicas answers will not come back by waiting
                    self._metadata.raise_if_offline(tp.topic, tp.partition)
                for tp in queries:
                    self._metadata.invalidate(tp.topic)
                time.sleep(RETRY_BACKOFF_S)

    def _list_offsets_once(self, queries: Mapping[TopicPartition, int]) -> dict[TopicPartition, tuple[int, int]]:
        by_leader: dict[str, list[pb.ListOffsetsPartition]] = {}
        for tp, ts in queries.items():
            conn = self._metadata.leader_connection(tp.topic, tp.partition)
            by_leader.setdefault(conn.address, []).append(
                pb.ListOffsetsPartition(topic=tp.topic, partition=tp.partition, timestamp_ms=ts))
        out: dict[TopicPartition, tuple[int, int]] = {}
        for address, parts in by_leader.items():
            conn = self._metadata.connection(address)
            try:
                response = conn.broker.ListOffsets(pb.ListOffsetsRequest(partitions=parts), timeout=self._timeout_s)
            except grpc.RpcError as exc:
                error = translate_rpc_error(exc, address)
                if isinstance(error, BrokerUnavailableError):
                    self._metadata.mark_unreachable(address)
                raise error from None
            for result in response.results:
                if result.error_code:
                    raise error_for(result.error_code, result.error_message, result.topic, result.partition)
                out[TopicPartition(result.topic, result.partition)] = (result.offset, result.timestamp_ms)
        return out

    def _reset_positions(self, tps: Sequence[TopicPartition]) -> None:
        if self._reset is None:
            names = ", ".join(f"{tp.topic}-{tp.partition}" for tp in tps)
            raise OffsetOutOfRangeError(
                f"no position for {names} and auto_offset_reset='none'; seek() first")
        for tp, (offset, _) in self._list_offsets({tp: self._reset for tp in tps}).items():
            self._set_position(tp, offset)

    # ------------------------------------------------------------------------------ pause/resume

    def pause(self, *partitions: TopicPartition) -> None:
        self._paused.update(self._require_assigned(tp) for tp in partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self._paused.difference_update(TopicPartition(*tp) for tp in partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self._paused)

    # ------------------------------------------------------------------------------------ poll

    def poll(self, timeout: float = 1.0, max_records: int | None = None) -> list[ConsumerRecord]:
        """Records from the assigned, unpaused partitions; an empty list when none came within timeout."""
        if self._closed:
            raise LogbrokerError("poll() on a closed consumer")
        limit = max_records or self._max_poll_records
        deadline = time.monotonic() + timeout
        while True:
            records = self._take_buffered(limit)
            if records:
                self._prefetch()
                return records
            if not self._fetchable():
                return []
            self._prefetch()
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._complete_one_fetch(remaining):
                return []

    def _fetchable(self) -> list[TopicPartition]:
        missing = [tp for tp in self._assigned if tp not in self._positions]
        if missing:
            self._reset_positions(missing)
        return [tp for tp in self._assigned if tp not in self._paused]

    def _take_buffered(self, limit: int) -> list[ConsumerRecord]:
        out: list[ConsumerRecord] = []
        held: list[_Chunk] = []  # chunks of paused partitions, and a partly taken one
        positions = self._positions
        while self._buffer and len(out) < limit:
            chunk = self._buffer.popleft()
            if chunk.tp in self._paused:
                held.append(chunk)
                continue
            room = limit - len(out)
            records = chunk.records
            if len(records) > room:
                held.append(_Chunk(chunk.tp, records[room:], chunk.next_offset))
                out.extend(records[:room])
                positions[chunk.tp] = records[room - 1].offset + 1
            else:
                out.extend(records)
                # Past any control batches that followed the last record, too.
                positions[chunk.tp] = chunk.next_offset
        self._buffer.extendleft(reversed(held))
        return out

    def _prefetch(self) -> None:
        """Send a fetch for every partition that has none in flight and nothing buffered."""
        busy = {tp for fetch in self._in_flight for tp in fetch.offsets}
        buffered = {chunk.tp for chunk in self._buffer}
        by_leader: dict[str, dict[TopicPartition, int]] = {}
        for tp in self._assigned:
            if tp in busy or tp in buffered or tp in self._paused or tp not in self._fetch_offsets:
                continue
            conn = self._metadata.leader_connection(tp.topic, tp.partition)
            by_leader.setdefault(conn.address, {})[tp] = self._fetch_offsets[tp]
        for address, offsets in by_leader.items():
            self._send_fetch(self._metadata.connection(address), offsets)

    def _send_fetch(self, conn: Connection, offsets: dict[TopicPartition, int]) -> None:
        request = pb.FetchRequest(
            max_wait_ms=self._max_wait_ms, min_bytes=self._min_bytes, max_bytes=self._max_bytes,
            partitions=[pb.FetchPartition(topic=tp.topic, partition=tp.partition, fetch_offset=offset,
                                          partition_max_bytes=self._partition_max_bytes)
                        for tp, offset in offsets.items()],
        )
        call = conn.broker.Fetch.future(request, timeout=self._timeout_s + self._max_wait_ms / 1000)
        generations = {tp: self._generations.get(tp, 0) for tp in offsets}
        self._in_flight.append(_Fetch(call, conn.address, offsets, generations))

    def _complete_one_fetch(self, timeout: float) -> bool:
        """Wait for the oldest fetch in flight and buffer its records; False if it did not finish in time."""
        if not self._in_flight:
            return False
        fetch = self._in_flight[0]
        try:
            response = fetch.call.result(timeout=timeout)
        except grpc.FutureTimeoutError:
            return False
        except grpc.RpcError as exc:
            self._in_flight.pop(0)
            error = translate_rpc_error(exc, fetch.address)
            if not error.retriable:
                raise error from None
            # The leader went away: find the new one on the next poll round.
            self._metadata.mark_unreachable(fetch.address)
            for tp in fetch.offsets:
                self._metadata.invalidate(tp.topic)
            time.sleep(min(RETRY_BACKOFF_S, timeout))
            return True  # handled: poll() goes round again while its timeout lasts
        self._in_flight.pop(0)
        for result in response.results:
            self._absorb(fetch, result)
        return True

    def _absorb(self, fetch: _Fetch, result: pb.PartitionFetchResult) -> None:
        tp = TopicPartition(result.topic, result.partition)
        if fetch.generations.get(tp) != self._generations.get(tp, 0) or tp not in self._fetch_offsets:
            return  # a seek or reassignment happened after this fetch was sent
        if result.error_code:
            self._on_fetch_error(tp, result)
            return
        data = result.records
        if not data:
            return
        start = fetch.offsets[tp]
        records: list[ConsumerRecord] = []
        next_offset = start
        try:
            for pos, header in rec.iter_batch_headers(data):
                if header.base_offset + header.last_offset_delta < start:
                    continue
                if not header.attributes & rec.CONTROL_FLAG:
                    decode_batch(tp, data, pos, header, start, records, self._check_crcs)
                next_offset = header.base_offset + header.last_offset_delta + 1
        except CorruptBatchError:
            if not records:  # the caller's position is at the broken batch: the error names the seek past it
                raise
            # Hand out the records before it first; the next fetch starts at the broken batch and raises then.
        self._fetch_offsets[tp] = next_offset
        if records:
            self._buffer.append(_Chunk(tp, records, next_offset))
        elif self._positions.get(tp, next_offset) < next_offset and not any(c.tp == tp for c in self._buffer):
            self._positions[tp] = next_offset  # only control batches: step over them

    def _on_fetch_error(self, tp: TopicPartition, result: pb.PartitionFetchResult) -> None:
        error = error_for(result.error_code, result.error_message, tp.topic, tp.partition)
        if isinstance(error, OffsetOutOfRangeError) and self._reset is not None:
            self._reset_positions([tp])
            return
        if isinstance(error, NotLeaderError) or error.retriable:
            self._metadata.invalidate(tp.topic)
            return
        raise error

    # --------------------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        for fetch in self._in_flight:
            fetch.call.cancel()
        self._in_flight.clear()
        self._metadata.close()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Any:
        while not self._closed:
            yield from self.poll()
