"""ShareConsumer: workers sharing a queue (a share group), each record handed to one worker at a time.

Any number of ShareConsumers with the same group_id take records from the same partitions (more workers than
partitions is the normal case): each partition's leader locks a record for the member it hands it to, and the
member finishes it with ack(), release() or reject() (renew() extends the lock of a long job). A record whose
lock expires (a crashed or stuck worker) goes to another member. Rejected records, and records delivered
share.delivery.count.limit times, land in the group's dead-letter topic (`<topic>.dlq` by default).

poll() sends one ShareFetch per leader of the subscribed partitions, concurrently, each carrying the
acknowledgements made since the last request to that leader; the records come back locked to this member.
What the consumer holds, what it owes the broker and what it may still fetch is share_state.py's (shared with
aio_share.py); this module only does the I/O.

    with ShareConsumer("emails", bootstrap="127.0.0.1:9092") as worker:
        worker.subscribe(["emails"])
        for job in worker:
            send_email(job.value)
            job.ack()
"""

from __future__ import annotations

import logging
import os
import queue
import time
import uuid
from collections.abc import Iterator, Sequence

import grpc

from logbroker_client.connection import DEFAULT_REQUEST_TIMEOUT_MS, translate_rpc_error
from logbroker_client.errors import BrokerUnavailableError, LogbrokerError, RequestTimedOutError
from logbroker_client.groups import check_group_id
from logbroker_client.lanes import check_levels, lane_topics
from logbroker_client.metadata import ClusterMetadata
from logbroker_client.share_state import (
    AckFailure,
    SharePlan,
    ShareRecord,
    ShareSession,
    check_max_in_flight,
    failures_error,
)
from logbroker_client.types import TopicPartition

__all__ = ["ShareConsumer", "ShareRecord"]

log = logging.getLogger("logbroker_client.share")

DEFAULT_MAX_IN_FLIGHT = 500
DEFAULT_SHARE_MAX_WAIT_MS = 500
RETRY_BACKOFF_S = 0.1  # after a request failed or a leader moved
IDLE_WAIT_S = 0.05  # nothing to fetch (max_in_flight reached): look again this often
PARTITIONS_REFRESH_S = 30.0  # partitions added to a subscribed topic are fetched within this long
_client_numbers = iter(range(1, 1 << 62))


def wall_ms() -> int:
    return time.time_ns() // 1_000_000


def default_share_client_id() -> str:
    return f"share-consumer-{os.getpid()}-{next(_client_numbers)}"


def subscription_lanes(topics: Sequence[str] | str, priorities: int) -> list[tuple[str, int]]:
    """(topic, priority level) of every lane of every queue named."""
    names = [topics] if isinstance(topics, str) else list(topics)
    if not names or not all(isinstance(name, str) and name for name in names):
        raise ValueError(f"subscribe() takes one or more topic names, got {topics!r}")
    levels = check_levels(priorities)
    return [lane for name in dict.fromkeys(names) for lane in lane_topics(name, levels)]


def missing_lane_error(error: LogbrokerError, topic: str, level: int) -> LogbrokerError:
    """A missing priority lane says which topic to create."""
    if level == 0:
        return error
    queue_name = topic.rsplit(".p", 1)[0]
    return type(error)(f"{error}; it is priority lane {level} of queue {queue_name!r}: create it (`lb topic create "
                       f"{topic}`) or subscribe with fewer priorities")


def check_max_wait_ms(max_wait_ms: int) -> int:
    if isinstance(max_wait_ms, bool) or not isinstance(max_wait_ms, int) or max_wait_ms < 0:
        raise ValueError(f"max_wait_ms must be 0 or more milliseconds, got {max_wait_ms!r}")
    return max_wait_ms


class ShareSessionViews:
    """What the sync and async share consumers answer alike, from their session (share_state.py)."""

    _session: ShareSession

    def subscription(self) -> list[str]:
        """The topics fetched: every lane of every queue subscribed."""
        return self._session.subscribed_topics()

    @property
    def max_in_flight(self) -> int:
        """The most records this consumer holds unfinished; may be changed at any time (RabbitMQ's basic.qos)."""
        return self._session.max_in_flight

    @max_in_flight.setter
    def max_in_flight(self, records: int) -> None:
        self._session.max_in_flight = check_max_in_flight(records)

    @property
    def in_flight(self) -> int:
        """Records this consumer holds or has finished without the broker knowing yet (at most max_in_flight)."""
        return self._session.unfinished()


class ShareConsumer(ShareSessionViews):
    def __init__(
        self,
        group_id: str,
        bootstrap: str | Sequence[str] | None = None,
        *,
        max_in_flight: int = DEFAULT_MAX_IN_FLIGHT,
        max_wait_ms: int = DEFAULT_SHARE_MAX_WAIT_MS,
        client_id: str | None = None,
        request_timeout_ms: int = DEFAULT_REQUEST_TIMEOUT_MS,
    ) -> None:
        """group_id names the queue's share group; max_in_flight bounds the records this consumer holds unacknowledged
        (RabbitMQ's prefetch); max_wait_ms is how long a fetch waits at the broker for records to arrive."""
        self.group_id = check_group_id(group_id)
        self.member_id = uuid.uuid4().hex
        self.client_id = client_id or default_share_client_id()
        self._max_wait_ms = check_max_wait_ms(max_wait_ms)
        self._session = ShareSession(self.group_id, self.member_id, max_in_flight)
        self._metadata = ClusterMetadata(bootstrap, request_timeout_ms)
        self._timeout_s = request_timeout_ms / 1000
        self._finished: queue.SimpleQueue[SharePlan] = queue.SimpleQueue()
        self._backoff_until = 0.0
        self._partitions_checked = 0.0
        self._closed = False

    # ----------------------------------------------------------------------------- subscription

    def subscribe(self, topics: Sequence[str] | str, *, priorities: int = 1) -> None:
        """Take records from these topics. With priorities=N each topic is a queue of N priority lanes: the topic
        itself (level 0, the default) and `<topic>.p1` .. `<topic>.p<N-1>` (more urgent), fetched most urgent
        first while every lane keeps a share (see lanes.py). Every lane topic must exist."""
        self._check_open("subscribe()")
        lanes = subscription_lanes(topics, priorities)
        counts = {topic: self._partition_count(topic, level) for topic, level in lanes}
        self._session.subscribe(lanes)
        for topic, count in counts.items():
            self._session.set_partition_count(topic, count)
        self._partitions_checked = time.monotonic()

    def _partition_count(self, topic: str, level: int) -> int:
        try:
            return self._metadata.partitions_for(topic)
        except LogbrokerError as exc:
            raise missing_lane_error(exc, topic, level) from None

    # ------------------------------------------------------------------------------------- poll

    def poll(self, timeout: float = 1.0, max_records: int | None = None) -> list[ShareRecord]:
        """Records acquired for this consumer (at most max_records), or [] when none came within timeout. Each is
        locked to this consumer until its lock_deadline_ms: finish every one with ack(), release() or reject().
        No more records come while max_in_flight records are unfinished."""
        self._check_open("poll()")
        if not self._session.lanes:
            raise LogbrokerError("poll() before subscribe(): subscribe(['topic']) first")
        deadline = time.monotonic() + timeout
        while True:
            self._session.expire_locks(wall_ms())
            self._take_finished()
            records = self._session.take(max_records)
            self._send_fetches()
            if records:
                return records
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            self._wait_for_answer(min(remaining, IDLE_WAIT_S if not self._session.in_flight else remaining))

    def __iter__(self) -> Iterator[ShareRecord]:
        while not self._closed:
            yield from self.poll()

    # --------------------------------------------------------------------------------- requests

    def _send_fetches(self) -> None:
        if time.monotonic() < self._backoff_until:
            return
        self._refresh_partitions_if_due()
        leaders = self._leaders([*self._session.fetchable(), *self._session.with_pending_acks()])
        for plan in self._session.plan_fetches(leaders, time.monotonic() * 1000):
            self._start(plan)

    def _refresh_partitions_if_due(self) -> None:
        if time.monotonic() - self._partitions_checked < PARTITIONS_REFRESH_S:
            return
        self._partitions_checked = time.monotonic()
        try:
            response = self._metadata.refresh(self.subscription())
        except LogbrokerError as exc:
            log.info("share group %s: metadata refresh failed: %s", self.group_id, exc)
            return
        for topic in response.topics:
            if not topic.error_code:
                self._session.set_partition_count(topic.name, len(topic.partitions))

    def _leaders(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, str]:
        """Each partition's leader (any broker when none is known: its answer says NOT_LEADER, and we ask again)."""
        leaders: dict[TopicPartition, str] = {}
        for tp in dict.fromkeys(tps):
            try:
                leaders[tp] = self._metadata.leader_connection(tp.topic, tp.partition).address
            except LogbrokerError as exc:
                if not exc.retriable:
                    raise
                self._back_off()
        return leaders

    def _start(self, plan: SharePlan) -> None:
        share = self._metadata.connection(plan.address).share
        if plan.is_fetch:
            request = plan.fetch_request(self.group_id, self.member_id, self._max_wait_ms, self.client_id)
            plan.handle = share.ShareFetch.future(request, timeout=self._timeout_s + self._max_wait_ms / 1000)
        else:
            request = plan.acknowledge_request(self.group_id, self.member_id)
            plan.handle = share.ShareAcknowledge.future(request, timeout=self._timeout_s)
        plan.handle.add_done_callback(lambda _: self._finished.put(plan))

    def _wait_for_answer(self, timeout_s: float) -> None:
        """Until one request in flight is answered (and taken in), or timeout_s."""
        if self._take_finished():
            return
        if not self._session.in_flight:
            time.sleep(max(0.0, timeout_s))
            return
        try:
            first = self._finished.get(timeout=max(0.0, timeout_s))
        except queue.Empty:
            return
        self._take_finished(first)

    def _take_finished(self, first: SharePlan | None = None) -> int:
        """Take in every answered request, in the order the answers came; returns how many requests ended.

        The queue only wakes the caller and keeps that order. What counts is the session: a request in flight
        whose future is done has its answer. So a Ctrl-C (KeyboardInterrupt) that strikes after a request
        left the queue, or before its future was made, loses nothing: the request is still in flight here,
        and close() does not wait for an answer that was already in (or for a request never sent)."""
        arrived = [] if first is None else [first]
        while True:
            try:
                arrived.append(self._finished.get_nowait())
            except queue.Empty:
                break
        in_flight = self._session.in_flight
        never_sent = [plan for plan in in_flight if plan.handle is None]
        for plan in never_sent:  # interrupted between planning and sending (the caller's thread does both)
            self._session.failed(plan)
        answered = [*arrived, *(plan for plan in in_flight if plan.handle is not None and plan.handle.done())]
        taken = len(never_sent)
        for plan in dict.fromkeys(answered):
            if plan in self._session.in_flight:  # not taken in already
                taken += 1
                self._finish(plan)
        return taken

    def _finish(self, plan: SharePlan) -> None:
        try:
            response = plan.handle.result()
        except grpc.RpcError as exc:
            self._on_request_failure(plan, translate_rpc_error(exc, plan.address))
            return
        answer = self._session.absorb(plan, response.partitions, wall_ms())
        for topic in answer.find_leader:
            self._metadata.invalidate(topic)
            self._back_off()
        if answer.errors:
            raise answer.errors[0]

    def _on_request_failure(self, plan: SharePlan, error: LogbrokerError) -> None:
        self._session.failed(plan)  # its acknowledgements go with the next request
        if isinstance(error, BrokerUnavailableError):
            self._metadata.mark_unreachable(plan.address)
        if not error.retriable:
            raise error
        log.info("share group %s: request to %s failed: %s; retrying", self.group_id, plan.address, error)
        for tp in plan.partitions:
            self._metadata.invalidate(tp.topic)
        self._back_off()

    def _back_off(self) -> None:
        self._backoff_until = time.monotonic() + RETRY_BACKOFF_S

    # -------------------------------------------------------------------------- acknowledgements

    def flush_acks(self, timeout: float | None = None, *, raise_on_failure: bool = True) -> list[AckFailure]:
        """Send every pending acknowledgement now (ShareAcknowledge) and wait until each one made so far is
        answered, those travelling with fetches included. Returns the acknowledgements that failed since the
        last flush (empty: all applied); with raise_on_failure, raises AcknowledgementError listing them."""
        deadline = time.monotonic() + (self._timeout_s if timeout is None else timeout)
        while True:
            self._take_finished()
            if time.monotonic() >= self._backoff_until:
                for plan in self._session.plan_acks(self._leaders(self._session.with_pending_acks())):
                    self._start(plan)
            carrying = any(plan.acks for plan in self._session.in_flight)
            if not carrying and not self._session.has_pending_acks():
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                self._give_up_acks(timeout)
                break
            self._wait_for_answer(min(remaining, IDLE_WAIT_S if not carrying else remaining))
        failures = self._session.take_failures()
        if failures and raise_on_failure:
            raise failures_error(failures)
        return failures

    def _give_up_acks(self, timeout: float | None) -> None:
        waited = self._timeout_s if timeout is None else timeout
        error = RequestTimedOutError(f"not delivered within {waited:g}s (no leader answered); the records come back "
                                     "to the queue when their locks expire")
        self._session.unsendable(self._session.with_pending_acks(), error)

    def commit(self) -> None:
        """flush_acks(), raising AcknowledgementError when any acknowledgement failed."""
        self.flush_acks(raise_on_failure=True)

    # ------------------------------------------------------------------------------- lifecycle

    def close(self) -> None:
        """Give back every record still held (to other members at once), send the pending acknowledgements, and
        disconnect. Acknowledgement failures are logged: commit() before close() to have them raised."""
        if self._closed:
            return
        try:
            self._wait_for_fetches(self._timeout_s + self._max_wait_ms / 1000)
            released = self._session.release_everything()
            if released:
                log.info("share group %s: close() releases %d record(s)", self.group_id, released)
            self.flush_acks(raise_on_failure=False)
        finally:
            self._closed = True
            for plan in self._session.in_flight:
                if plan.handle is not None:
                    plan.handle.cancel()
            self._metadata.close()

    def _wait_for_fetches(self, timeout_s: float) -> None:
        """Fetches in flight may acquire records: take them in, so close() gives those back too."""
        deadline = time.monotonic() + timeout_s
        while self._session.in_flight and time.monotonic() < deadline:
            try:
                self._wait_for_answer(deadline - time.monotonic())
            except LogbrokerError as exc:
                log.warning("share group %s: while closing: %s", self.group_id, exc)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise LogbrokerError(f"{what} on a closed ShareConsumer")

    def __enter__(self) -> ShareConsumer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
