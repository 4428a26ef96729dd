"""Consumer: read partitions it was assigned by hand or, in a consumer group, by the group's coordinator.

poll() returns records from a local buffer; when the buffer runs dry it takes the response of the
fetch already in flight and at once sends the next one, so the broker's read and the transfer overlap
with the caller decoding and processing records.

With a group_id, subscribe() makes the consumer a group member: a background thread heartbeats to the
coordinator, and poll() carries out what the coordinator decides (revoke, then assign), commits what it
has handed out (enable_auto_commit) and starts new partitions at their committed offsets. The positions,
fetch state and member state machine live in fetch_state.py and group_member.py, shared with aio.py;
this module does only the I/O.
"""

from __future__ import annotations

import concurrent.futures
import itertools
import logging
import os
import socket
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import Any

import grpc

from logbroker_client.connection import DEFAULT_REQUEST_TIMEOUT_MS, Connection, translate_rpc_error
from logbroker_client.coordinator import Coordinators
from logbroker_client.data_wire import Method
from logbroker_client.errors import (
    BrokerUnavailableError,
    LogbrokerError,
    StaleMemberEpochError,
    error_for,
)
from logbroker_client.fetch_state import (
    EARLIEST,
    LATEST,
    RESETS,
    FetchOutcome,
    FetchState,
    PendingFetch,
    decode_batch,
    reset_policy,
)
from logbroker_client.group_member import (
    STALE_EPOCH_POLL_S,
    STALE_EPOCH_WAIT_S,
    AutoCommitTimer,
    GroupMember,
    MemberState,
    Partitions,
    RebalanceListener,
    Reconciliation,
    Subscription,
)
from logbroker_client.groups import check_group_id, committed_offsets, fetch_offsets_request
from logbroker_client.metadata import ClusterMetadata
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.throttle import BrokerPauses, client_id_metadata
from logbroker_client.types import ConsumerRecord, OffsetAndMetadata, OffsetAndTimestamp, TopicPartition

__all__ = ["Consumer", "EARLIEST", "LATEST", "RESETS", "decode_batch", "list_offsets"]

log = logging.getLogger("logbroker_client.consumer")

DEFAULT_FETCH_MAX_WAIT_MS = 500
DEFAULT_FETCH_MAX_BYTES = 50 << 20
DEFAULT_MAX_PARTITION_FETCH_BYTES = 1 << 20  # Kafka's default; larger answers measured slower
DEFAULT_MAX_POLL_RECORDS = 100_000
DEFAULT_AUTO_COMMIT_INTERVAL_MS = 5_000
DEFAULT_SESSION_TIMEOUT_MS = 45_000  # the broker's default; pass a broker's lower setting here too
DEFAULT_MAX_POLL_INTERVAL_MS = 300_000
RETRY_BACKOFF_S = 0.05
GROUP_WAIT_SLICE_S = 0.05  # a member polling looks at the coordinator's decisions at least this often
LEAVE_TIMEOUT_S = 2.0
_client_numbers = itertools.count(1)

CommitOffsets = Mapping[TopicPartition, int | OffsetAndMetadata]


def monotonic_ms() -> float:
    return time.monotonic() * 1000


def default_client_id() -> str:
    return f"consumer-{os.getpid()}-{next(_client_numbers)}"


def list_offsets(metadata: ClusterMetadata, queries: Mapping[TopicPartition, int],
                 timeout_s: float) -> dict[TopicPartition, tuple[int, int]]:
    """ListOffsets at each partition's leader, retrying while leadership moves (up to timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return _list_offsets_once(metadata, queries, timeout_s)
        except LogbrokerError as exc:
            if not exc.retriable or time.monotonic() > deadline:
                raise
            for tp in queries:  # a partition none of whose replicas answers will not come back by waiting
                metadata.raise_if_offline(tp.topic, tp.partition)
            for tp in queries:
                metadata.invalidate(tp.topic)
            time.sleep(RETRY_BACKOFF_S)


def _list_offsets_once(metadata: ClusterMetadata, queries: Mapping[TopicPartition, int],
                       timeout_s: float) -> dict[TopicPartition, tuple[int, int]]:
    by_leader: dict[str, list[pb.ListOffsetsPartition]] = {}
    for tp, ts in queries.items():
        conn = metadata.leader_connection(tp.topic, tp.partition)
        by_leader.setdefault(conn.address, []).append(
            pb.ListOffsetsPartition(topic=tp.topic, partition=tp.partition, timestamp_ms=ts))
    out: dict[TopicPartition, tuple[int, int]] = {}
    for address, parts in by_leader.items():
        conn = metadata.connection(address)
        try:
            response = conn.broker.ListOffsets(pb.ListOffsetsRequest(partitions=parts), timeout=timeout_s)
        except grpc.RpcError as exc:
            error = translate_rpc_error(exc, address)
            if isinstance(error, BrokerUnavailableError):
                metadata.mark_unreachable(address)
            raise error from None
        for result in response.results:
            if result.error_code:
                raise error_for(result.error_code, result.error_message, result.topic, result.partition)
            out[TopicPartition(result.topic, result.partition)] = (result.offset, result.timestamp_ms)
    return out


class Consumer:
    def __init__(
        self,
        bootstrap: str | Sequence[str] | None = None,
        *,
        group_id: str | None = None,
        auto_offset_reset: str = "latest",
        enable_auto_commit: bool = True,
        auto_commit_interval_ms: int = DEFAULT_AUTO_COMMIT_INTERVAL_MS,
        group_instance_id: str | None = None,
        session_timeout_ms: int = DEFAULT_SESSION_TIMEOUT_MS,
        max_poll_interval_ms: int = DEFAULT_MAX_POLL_INTERVAL_MS,
        client_id: str | None = None,
        fetch_min_bytes: int = 1,
        fetch_max_wait_ms: int = DEFAULT_FETCH_MAX_WAIT_MS,
        fetch_max_bytes: int = DEFAULT_FETCH_MAX_BYTES,
        max_partition_fetch_bytes: int = DEFAULT_MAX_PARTITION_FETCH_BYTES,
        max_poll_records: int = DEFAULT_MAX_POLL_RECORDS,
        request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS,
        check_crcs: bool = True,
    ) -> None:
        self._fetch = FetchState(reset_policy(auto_offset_reset), check_crcs)
        self._fetch_finished = threading.Event()  # set by every fetch that finishes (see _first_finished_fetch)
        self._min_bytes = fetch_min_bytes
        self._max_wait_ms = fetch_max_wait_ms
        self._max_bytes = fetch_max_bytes
        self._partition_max_bytes = max_partition_fetch_bytes
        self._max_poll_records = max_poll_records
        self._timeout_s = request_timeout_ms / 1000
        self._metadata = ClusterMetadata(bootstrap, request_timeout_ms)
        self.client_id = client_id or default_client_id()  # sent with every fetch: the brokers' quotas use it
        self._metadata.call_metadata = client_id_metadata(self.client_id)
        self._pauses = BrokerPauses()  # brokers that answered a fetch with a throttle time
        self._closed = False
        self._group = _GroupSide.create(self, group_id, group_instance_id, self.client_id, session_timeout_ms,
                                        max_poll_interval_ms, enable_auto_commit, auto_commit_interval_ms)

    # ------------------------------------------------------------------------------ assignment

    def assign(self, partitions: Iterable[TopicPartition]) -> None:
        """Read these partitions (by hand, outside any group membership). With a group_id, each new one starts
        at the group's committed offset, and commit() commits for the group as a "simple" group."""
        if self._group is not None and self._group.member.subscribed:
            raise LogbrokerError("this consumer has subscribed to a group's topics: the coordinator assigns its "
                                 "partitions, so assign() cannot be mixed in; use a second Consumer")
        tps = [TopicPartition(*tp) for tp in partitions]
        for tp in tps:
            count = self._metadata.partitions_for(tp.topic)
            if not 0 <= tp.partition < count:
                raise error_for(pb.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION,
                                f"topic {tp.topic!r} has partitions 0..{count - 1}; "
                                f"partition {tp.partition} does not exist", tp.topic, tp.partition)
        added = self._fetch.assign(tps)
        if self._group is not None and added:
            self._group.start_from_committed(added)

    def assignment(self) -> set[TopicPartition]:
        return set(self._fetch.assigned)

    @property
    def ownership_checked_at_ms(self) -> float | None:
        """When (time.monotonic(), in ms) the last poll() that returned group records confirmed, right before
        handing them out, that this member's session still held their partitions; None outside a group or
        before such a poll. A process paused after that instant (SIGSTOP, a long GC, a swapped-out VM) hands
        the records to the application later, possibly after the coordinator gave the partitions to another
        member: no client can close that window, so work that must not overlap another member's checks this
        instant, or relies on commits being refused once fenced."""
        return self._group.owned_checked_ms if self._group is not None else None

    def subscribe(self, topics: Sequence[str] | str | None = None, *, pattern: str | None = None,
                  on_assigned: Callable[[set[TopicPartition]], Any] | None = None,
                  on_revoked: Callable[[set[TopicPartition]], Any] | None = None,
                  on_lost: Callable[[set[TopicPartition]], Any] | None = None) -> None:
        """Join the group (group_id) for these topics, or every topic whose whole name matches pattern. The
        coordinator shares the partitions out among the members; poll() returns records of this member's.
        on_revoked runs before a partition is given up (after auto-commit), on_assigned after one is taken,
        on_lost when partitions were taken away without a chance to commit (default: on_revoked)."""
        group = self._require_group("subscribe()")
        if self._fetch.assigned and not group.member.subscribed:
            raise LogbrokerError("this consumer has partitions assigned by hand; call assign([]) before subscribe()")
        names = (topics,) if isinstance(topics, str) else tuple(topics or ())
        group.subscribe(Subscription(names, pattern or ""), RebalanceListener(on_assigned, on_revoked, on_lost))

    def _require_group(self, what: str) -> _GroupSide:
        if self._group is None:
            raise LogbrokerError(f"{what} needs a consumer group: create the Consumer with group_id='...'")
        return self._group

    def _require_assigned(self, tp: TopicPartition) -> TopicPartition:
        return self._fetch.require_assigned(tp)

    # ---------------------------------------------------------------------------------- seeking

    def seek(self, partition: TopicPartition, offset: int) -> None:
        tp = self._require_assigned(partition)
        if offset < 0:
            raise ValueError(f"offset must be >= 0, got {offset}")
        self._fetch.seek(tp, offset)

    def seek_to_beginning(self, *partitions: TopicPartition) -> None:
        tps = [self._require_assigned(tp) for tp in partitions] or list(self._fetch.assigned)
        for tp, offset in self._list_offsets({tp: EARLIEST for tp in tps}).items():
            self._fetch.seek(tp, offset[0])

    def seek_to_end(self, *partitions: TopicPartition) -> None:
        tps = [self._require_assigned(tp) for tp in partitions] or list(self._fetch.assigned)
        for tp, offset in self._list_offsets({tp: LATEST for tp in tps}).items():
            self._fetch.seek(tp, offset[0])

    def position(self, partition: TopicPartition) -> int:
        tp = self._require_assigned(partition)
        if tp not in self._fetch.positions:
            self._reset_positions([tp])
        return self._fetch.positions[tp]

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
        return list_offsets(self._metadata, queries, self._timeout_s)

    def _reset_positions(self, tps: Sequence[TopicPartition]) -> None:
        timestamp = self._fetch.reset_timestamp(tps)
        for tp, (offset, _) in self._list_offsets({tp: timestamp for tp in tps}).items():
            self._fetch.seek(tp, offset)

    # ------------------------------------------------------------------------------ pause/resume

    def pause(self, *partitions: TopicPartition) -> None:
        self._fetch.paused.update(self._require_assigned(tp) for tp in partitions)

    def resume(self, *partitions: TopicPartition) -> None:
        self._fetch.paused.difference_update(TopicPartition(*tp) for tp in partitions)

    def paused(self) -> set[TopicPartition]:
        return set(self._fetch.paused)

    # ------------------------------------------------------------------------------------ poll

    def poll(self, timeout: float = 1.0, max_records: int | None = None) -> list[ConsumerRecord]:
        """Records from the assigned (or owned), unpaused partitions; an empty list when none came within
        timeout. In a group it also carries out the coordinator's decisions and auto-commits."""
        if self._closed:
            raise LogbrokerError("poll() on a closed consumer")
        limit = max_records or self._max_poll_records
        deadline = time.monotonic() + timeout
        while True:
            if self._group is not None:
                self._group.on_poll()
            records = self._fetch.take(limit)
            if records and self._group is not None:
                records = self._group.still_owned(records)
            if records:
                self._prefetch()
                return records
            remaining = deadline - time.monotonic()
            if not self._fetch.fetchable():
                if self._group is None or remaining <= 0:
                    return []
                self._group.wait_for_news(min(remaining, GROUP_WAIT_SLICE_S))
                continue
            missing = self._fetch.missing_positions()
            if missing:
                self._reset_positions(missing)
            self._prefetch()
            if remaining <= 0:
                return []
            if self._group is None:
                if not self._complete_one_fetch(remaining):
                    return []
            elif not self._complete_one_fetch(min(remaining, GROUP_WAIT_SLICE_S)) and not self._fetch.in_flight:
                self._group.wait_for_news(min(remaining, GROUP_WAIT_SLICE_S))

    def _prefetch(self) -> None:
        """Send a fetch for every partition that has none in flight and nothing buffered."""
        by_leader: dict[str, dict[TopicPartition, int]] = {}
        for tp, offset in self._fetch.to_fetch():
            conn = self._metadata.leader_connection(tp.topic, tp.partition)
            by_leader.setdefault(conn.address, {})[tp] = offset
        for address, offsets in by_leader.items():
            if not self._pauses.paused(address):  # one that asked for a pause is asked again once it is over
                self._send_fetch(self._metadata.connection(address), offsets)

    def _send_fetch(self, conn: Connection, offsets: dict[TopicPartition, int]) -> None:
        request = pb.FetchRequest(
            max_wait_ms=self._max_wait_ms, min_bytes=self._min_bytes, max_bytes=self._max_bytes,
            partitions=[pb.FetchPartition(topic=tp.topic, partition=tp.partition, fetch_offset=offset,
                                          partition_max_bytes=self._partition_max_bytes)
                        for tp, offset in offsets.items()],
        )
        fetch = self._fetch.begin_fetch(conn.address, offsets)
        timeout_s = self._timeout_s + self._max_wait_ms / 1000
        channel = self._metadata.data_channel(conn.address)
        if channel is not None:
            fetch.handle = channel.future(Method.FETCH, request, pb.FetchResponse, timeout_s)
        else:
            fetch.handle = conn.broker.Fetch.future(request, timeout=timeout_s,
                                                    metadata=self._metadata.call_metadata)
        fetch.handle.add_done_callback(lambda _: self._fetch_finished.set())

    def _complete_one_fetch(self, timeout: float) -> bool:
        """Wait for the first fetch in flight to finish and buffer its records; False if none finished in time.
        The first to finish, not the oldest: a long poll of caught-up partitions at one broker must not hold up
        another broker's answer full of records (fetches in flight name disjoint partitions)."""
        if not self._fetch.in_flight:
            wait_s = min(self._pauses.wait_s(), timeout)  # fetches held back by a throttle time
            if wait_s > 0:
                time.sleep(wait_s)
            return wait_s > 0
        fetch = self._first_finished_fetch(timeout)
        if fetch is None:
            return False
        try:
            response = fetch.handle.result(timeout=0)
        except grpc.FutureTimeoutError:
            return False
        except grpc.RpcError as exc:
            self._fetch.end_fetch(fetch)
            self._on_fetch_failure(fetch, translate_rpc_error(exc, fetch.address), timeout)
            return True  # handled: poll() goes round again while its timeout lasts
        except LogbrokerError as error:  # from the data port
            self._fetch.end_fetch(fetch)
            self._on_fetch_failure(fetch, error, timeout)
            return True
        self._fetch.end_fetch(fetch)
        self._pauses.note(fetch.address, response.throttle_time_ms)
        for result in response.results:
            if self._fetch.absorb(fetch, result) is FetchOutcome.FIND_LEADER:
                self._metadata.invalidate(result.topic)
        return True

    def _first_finished_fetch(self, timeout: float) -> PendingFetch | None:
        deadline = time.monotonic() + timeout
        while True:
            self._fetch_finished.clear()  # before looking: a fetch finishing from now on sets it again
            for fetch in self._fetch.in_flight:
                if fetch.handle.done():
                    return fetch
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self._fetch_finished.wait(remaining):
                return None

    def _on_fetch_failure(self, fetch: PendingFetch, error: LogbrokerError, timeout: float) -> None:
        if not error.retriable:
            raise error from None
        # The leader went away: find the new one on the next poll round.
        self._metadata.mark_unreachable(fetch.address)
        for tp in fetch.offsets:
            self._metadata.invalidate(tp.topic)
        time.sleep(min(RETRY_BACKOFF_S, timeout))

    # ---------------------------------------------------------------------------------- commits

    def commit(self, offsets: CommitOffsets | None = None) -> None:
        """Commit for the group: the given offsets (each the next offset to consume, optionally with metadata
        as an OffsetAndMetadata), or by default the position of every partition this consumer holds, i.e.
        what poll() has handed out. Raises the coordinator's refusal (CommitFailedError and its kinds)."""
        group = self._require_group("commit()")
        group.commit(self._consumed() if offsets is None else offsets)

    def commit_async(self, offsets: CommitOffsets | None = None,
                     callback: Callable[[CommitOffsets, BaseException | None], Any] | None = None,
                     ) -> concurrent.futures.Future[None]:
        """As commit(), on a background thread, in the order called; the future holds the outcome."""
        group = self._require_group("commit_async()")
        chosen = dict(self._consumed() if offsets is None else offsets)
        return group.commit_in_background(chosen, callback)

    def committed(self, partitions: Iterable[TopicPartition]) -> dict[TopicPartition, OffsetAndMetadata | None]:
        """The group's committed offset of each partition (None where nothing is committed)."""
        return self._require_group("committed()").committed([TopicPartition(*tp) for tp in partitions])

    def _consumed(self) -> dict[TopicPartition, int]:
        assert self._group is not None
        return self._group.owned_positions(self._fetch.consumed())

    # --------------------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Commit (with auto-commit on) and leave the group at once, so the partitions move on now."""
        if self._closed:
            return
        try:
            if self._group is not None:
                self._group.close()
        finally:
            self._closed = True
            for fetch in self._fetch.in_flight:
                fetch.handle.cancel()
            self._fetch.in_flight.clear()
            self._metadata.close()

    def __enter__(self) -> Consumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __iter__(self) -> Any:
        while not self._closed:
            yield from self.poll()


class _GroupSide:
    """A consumer's group membership: the heartbeat thread, reconciliation in poll(), commits."""

    def __init__(self, consumer: Consumer, member: GroupMember, enable_auto_commit: bool,
                 auto_commit_interval_ms: int) -> None:
        self.consumer = consumer
        self.member = member
        self.coordinators = Coordinators(consumer._metadata)
        self.auto_commit = AutoCommitTimer(enable_auto_commit, auto_commit_interval_ms, monotonic_ms())
        self.listener = RebalanceListener()
        self.lock = threading.Lock()  # guards the member: the heartbeat thread and poll() both use it
        self.wake_heartbeat = threading.Event()
        self.news = threading.Event()  # the member has something for poll() to do
        self.stopping = False
        self.thread: threading.Thread | None = None
        self.committer: concurrent.futures.ThreadPoolExecutor | None = None
        self.owned_checked_ms: float | None = None  # monotonic ms of still_owned's last check
        session_s = member.session_timeout_ms / 1000
        self.heartbeat_timeout_s = min(consumer._timeout_s, max(1.0, session_s / 3))

    @classmethod
    def create(cls, consumer: Consumer, group_id: str | None, instance_id: str | None, client_id: str | None,
               session_timeout_ms: int, max_poll_interval_ms: int, enable_auto_commit: bool,
               auto_commit_interval_ms: int) -> _GroupSide | None:
        if group_id is None:
            if instance_id is not None:
                raise ValueError("group_instance_id needs a group_id")
            return None
        member = GroupMember(check_group_id(group_id), session_timeout_ms=session_timeout_ms,
                             rebalance_timeout_ms=max_poll_interval_ms, instance_id=instance_id,
                             client_id=client_id or default_client_id(), client_host=socket.gethostname())
        return cls(consumer, member, enable_auto_commit, auto_commit_interval_ms)

    @property
    def group_id(self) -> str:
        return self.member.group_id

    # -------------------------------------------------------------------------- subscription

    def subscribe(self, subscription: Subscription, listener: RebalanceListener) -> None:
        self.listener = listener
        with self.lock:
            self.member.subscribe(subscription, monotonic_ms())
        if self.thread is None:
            self.thread = threading.Thread(target=self._heartbeat_loop, daemon=True,
                                           name=f"logbroker-heartbeat-{self.group_id}")
            self.thread.start()
        self.wake_heartbeat.set()

    # ------------------------------------------------------------------------ heartbeat thread

    def _heartbeat_loop(self) -> None:
        while not self.stopping:
            try:
                self._heartbeat_once()
            except Exception as exc:  # a bug must not silently end the membership: log it, back off, go on
                log.exception("group %s: heartbeat failed unexpectedly", self.group_id)
                with self.lock:
                    self.member.on_heartbeat_error(BrokerUnavailableError(f"heartbeat failed: {exc!r}"),
                                                   monotonic_ms())
                time.sleep(RETRY_BACKOFF_S)

    def _heartbeat_once(self) -> None:
        self.wake_heartbeat.clear()
        request, leave, delay_ms = self._next_heartbeat()
        if leave is not None:
            log.warning("group %s: poll() was not called for over max_poll_interval_ms (%d ms); this member "
                        "leaves the group, and the next poll() rejoins it", self.group_id,
                        self.member.rebalance_timeout_ms)
            self._send_leave(leave)
            self.news.set()
        elif request is not None:
            self._send_heartbeat(request)
        else:
            self.wake_heartbeat.wait(1.0 if delay_ms is None else delay_ms / 1000)

    def _next_heartbeat(self) -> tuple[pb.GroupHeartbeatRequest | None, pb.GroupHeartbeatRequest | None,
                                       float | None]:
        """(heartbeat to send now, leave to send now, ms until the next heartbeat is due)."""
        with self.lock:
            now_ms = monotonic_ms()
            if self.member.poll_overdue(now_ms):
                return None, self.member.leave_for_poll_timeout(), None
            self.member.check_session(now_ms)
            if self.member.lost:
                self.news.set()
            delay_ms = self.member.heartbeat_delay_ms(now_ms)
            if delay_ms == 0:
                return self.member.heartbeat_request(now_ms), None, None
            return None, None, delay_ms

    def _send_heartbeat(self, request: pb.GroupHeartbeatRequest) -> None:
        try:
            response = self.coordinators.call_once(self.group_id, "Heartbeat", request, self.heartbeat_timeout_s)
        except LogbrokerError as exc:  # a coordinator that moved or does not answer is looked up again
            log.info("group %s: heartbeat failed: %s", self.group_id, exc)
            with self.lock:
                self.member.on_heartbeat_error(exc, monotonic_ms())
        else:
            with self.lock:
                self.member.on_heartbeat_response(response, monotonic_ms())
        with self.lock:
            if self.member.reconciliation() or self.member.fatal is not None:
                self.news.set()

    def _send_leave(self, request: pb.GroupHeartbeatRequest | None) -> None:
        if request is None:
            return
        try:
            self.coordinators.call_once(self.group_id, "Heartbeat", request, LEAVE_TIMEOUT_S)
        except LogbrokerError as exc:  # the session timeout frees the partitions instead
            log.info("group %s: leaving failed (%s); the coordinator frees this member's partitions after its "
                     "session timeout", self.group_id, exc)

    # --------------------------------------------------------------------------------- poll side

    def still_owned(self, records: list[ConsumerRecord]) -> list[ConsumerRecord]:
        """The records about to be handed out, less those of partitions a session that lapsed meanwhile lost (the
        process may have been paused between on_poll's check and now)."""
        with self.lock:
            self.owned_checked_ms = monotonic_ms()
            return self.member.keep_owned(records, self.owned_checked_ms)

    def on_poll(self) -> None:
        """Carry out the coordinator's decisions, auto-commit when due, raise a fatal group error."""
        self.news.clear()
        with self.lock:
            # The heartbeat thread may be stuck (in a call, a backoff, or the whole process was paused): the
            # poll checks the session too, so it never hands out records of partitions already given away.
            self.member.check_session(monotonic_ms())
            self.member.poll_called(monotonic_ms())
            if self.member.active:
                self.wake_heartbeat.set()  # a rejoin after a poll timeout goes out at once
        for _ in range(8):  # each round may bring news from the heartbeat thread; more waits for the next poll
            with self.lock:
                plan = self.member.reconciliation()
            if not plan:
                break
            self._reconcile(plan)
        with self.lock:
            fatal = self.member.fatal
        if fatal is not None:
            raise fatal
        if self.auto_commit.due(monotonic_ms()):
            self.auto_commit.restart(monotonic_ms())
            self._commit_quietly(self.owned_positions(self.consumer._fetch.consumed()))

    def wait_for_news(self, timeout_s: float) -> None:
        self.news.wait(timeout_s)

    def _reconcile(self, plan: Reconciliation) -> None:
        errors: list[BaseException] = []
        if plan.lost:
            self.consumer._fetch.remove(plan.lost)
            with self.lock:
                self.member.lost_handled(plan.lost)
            self._run_callback(self.listener.lost_callback(), plan.lost, errors)
        if plan.revoke:
            self._revoke(plan.revoke, errors)
        if plan.assign:
            self._assign(plan.assign, errors)
        if errors:
            raise errors[0]

    def _revoke(self, tps: Partitions, errors: list[BaseException]) -> None:
        if self.auto_commit.enabled:
            consumed = self.consumer._fetch.consumed()
            self._commit_quietly({tp: consumed[tp] for tp in tps if tp in consumed})
        self._run_callback(self.listener.on_revoked, tps, errors)
        self.consumer._fetch.remove(tps)
        with self.lock:
            self.member.revoked(tps)
        self.wake_heartbeat.set()

    def _assign(self, tps: Partitions, errors: list[BaseException]) -> None:
        committed = self._committed_positions(tps)
        with self.lock:
            accepted = self.member.accept(tps)
            if accepted:
                self._take(accepted, committed)
                self.member.assigned(accepted)
        self.wake_heartbeat.set()
        if accepted:
            self._run_callback(self.listener.on_assigned, accepted, errors)

    def _take(self, tps: Iterable[TopicPartition], committed: Mapping[TopicPartition, int]) -> None:
        self.consumer._fetch.add(tps)
        for tp in tps:
            if tp in committed:
                self.consumer._fetch.seek(tp, committed[tp])

    def start_from_committed(self, tps: Sequence[TopicPartition]) -> None:
        """assign() with a group_id: new partitions start at the group's committed offsets."""
        for tp, offset in self._committed_positions(tps).items():
            self.consumer._fetch.seek(tp, offset)

    def _committed_positions(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        response = self.coordinators.call(self.group_id, "FetchOffsets", fetch_offsets_request(self.group_id, tps))
        return {tp: found.offset for tp, found in committed_offsets(response).items()}

    def _run_callback(self, callback: Callable[[set[TopicPartition]], Any] | None, tps: Partitions,
                      errors: list[BaseException]) -> None:
        """A callback that raises does not stop the hand-over: its error comes out of poll() afterwards."""
        if callback is None:
            return
        try:
            callback(set(tps))
        except Exception as exc:
            errors.append(exc)

    # ------------------------------------------------------------------------------------ commits

    def owned_positions(self, positions: Mapping[TopicPartition, int]) -> dict[TopicPartition, int]:
        with self.lock:
            return self.member.owned_offsets(positions)

    def commit(self, offsets: CommitOffsets) -> None:
        if not offsets:
            return
        for attempt in range(2):
            with self.lock:
                request = self.member.commit_request(offsets)
            try:
                self.coordinators.call(self.group_id, "CommitOffsets", request)
                return
            except StaleMemberEpochError:
                # The coordinator moved the epoch and the heartbeat answer saying so has not arrived yet: ask
                # for it now, and commit once more with the new epoch (if the partitions are still ours).
                if attempt or not self._await_epoch_change(request.member_epoch):
                    raise

    def _await_epoch_change(self, stale_epoch: int) -> bool:
        self.wake_heartbeat.set()
        deadline = time.monotonic() + STALE_EPOCH_WAIT_S
        while time.monotonic() < deadline:
            with self.lock:
                if self.member.epoch != stale_epoch:
                    return True
            time.sleep(STALE_EPOCH_POLL_S)
        return False

    def _commit_quietly(self, offsets: CommitOffsets) -> None:
        """Auto-commit: a refusal is logged (the records will be consumed again by whoever owns them next)."""
        try:
            self.commit(offsets)
        except LogbrokerError as exc:
            log.warning("group %s: auto-commit of %d partition(s) failed: %s", self.group_id, len(offsets), exc)

    def commit_in_background(self, offsets: CommitOffsets,
                             callback: Callable[[CommitOffsets, BaseException | None], Any] | None,
                             ) -> concurrent.futures.Future[None]:
        if self.committer is None:
            self.committer = concurrent.futures.ThreadPoolExecutor(1, f"logbroker-commit-{self.group_id}")
        future = self.committer.submit(self.commit, offsets)
        if callback is not None:
            future.add_done_callback(lambda done: callback(offsets, done.exception()))
        return future

    def committed(self, tps: list[TopicPartition]) -> dict[TopicPartition, OffsetAndMetadata | None]:
        response = self.coordinators.call(self.group_id, "FetchOffsets", fetch_offsets_request(self.group_id, tps))
        found = committed_offsets(response)
        return {tp: (OffsetAndMetadata(found[tp].offset, found[tp].metadata) if tp in found else None)
                for tp in tps}

    # ------------------------------------------------------------------------------------ closing

    def close(self) -> None:
        if self.committer is not None:
            self.committer.shutdown(wait=True)
        self._stop_heartbeats()
        with self.lock:
            owned = self.member.owned if self.member.subscribed else frozenset(self.consumer._fetch.assigned)
        if self.auto_commit.enabled:
            self._commit_quietly(self.owned_positions(self.consumer._fetch.consumed()))
        if self.member.subscribed and owned:
            errors: list[BaseException] = []
            self._run_callback(self.listener.on_revoked, owned, errors)
            for error in errors:
                log.error("group %s: on_revoked raised while closing: %r", self.group_id, error)
        with self.lock:
            leave = self.member.leave_request() if self.member.state is not MemberState.LEFT else None
        self._send_leave(leave)

    def _stop_heartbeats(self) -> None:
        self.stopping = True
        self.wake_heartbeat.set()
        if self.thread is not None:
            self.thread.join(self.heartbeat_timeout_s + LEAVE_TIMEOUT_S)
