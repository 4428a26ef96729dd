"""Consumer groups over asyncio: the coordinator calls, and an AsyncConsumer's membership (its heartbeat
task, the hand-over carried out in poll(), commits). The decisions are group_member.py's, shared with the
synchronous Consumer; only the waiting differs."""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

import grpc

from logbroker_client.coordinator import ErrorReader, call_failed, checked_answer, gives_up, remaining_s
from logbroker_client.errors import BrokerUnavailableError, LogbrokerError, StaleMemberEpochError
from logbroker_client.fetch_state import FetchState
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
from logbroker_client.groups import (
    COORDINATOR_RETRY_BACKOFF_S,
    CoordinatorCache,
    answer_error,
    committed_offsets,
    coordinator_address,
    fetch_offsets_request,
    find_coordinator_request,
)
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.types import ConsumerRecord, OffsetAndMetadata, TopicPartition

if TYPE_CHECKING:
    from logbroker_client.aio import AsyncMetadata

log = logging.getLogger("logbroker_client.aio")

LEAVE_TIMEOUT_S = 2.0
HEARTBEAT_FAILURE_BACKOFF_S = 0.05
CommitOffsets = Mapping[TopicPartition, int | OffsetAndMetadata]


def monotonic_ms() -> float:
    return time.monotonic() * 1000


class AsyncCoordinators:
    """As coordinator.Coordinators, awaiting instead of blocking."""

    def __init__(self, metadata: AsyncMetadata) -> None:
        self._metadata = metadata
        self._cache = CoordinatorCache()

    async def address(self, group_id: str, deadline: float) -> str:
        cached = self._cache.get(group_id)
        if cached is not None:
            return cached
        while True:
            try:
                response = await self._metadata.call("FindCoordinator", find_coordinator_request(group_id),
                                                     service="groups", attempt_timeout_s=remaining_s(deadline))
                address = coordinator_address(response, group_id)
            except LogbrokerError as exc:
                if gives_up(exc, deadline):
                    raise
                await asyncio.sleep(COORDINATOR_RETRY_BACKOFF_S)
                continue
            self._cache.remember(group_id, address)
            return address

    def forget(self, group_id: str) -> None:
        self._cache.forget(group_id)

    async def call_once(self, group_id: str, method: str, request: Any, timeout_s: float,
                        errors: ErrorReader = answer_error) -> Any:
        deadline = time.monotonic() + timeout_s
        address = await self.address(group_id, deadline)
        try:
            response = await getattr(self._metadata.connection(address).groups, method)(
                request, timeout=remaining_s(deadline))
        except grpc.RpcError as exc:
            raise call_failed(self, self._metadata, group_id, address, exc) from None
        return checked_answer(self, group_id, response, errors)

    async def call(self, group_id: str, method: str, request: Any, errors: ErrorReader = answer_error,
                   timeout_s: float | None = None) -> Any:
        deadline = time.monotonic() + (self._metadata.request_timeout_s if timeout_s is None else timeout_s)
        while True:
            try:
                return await self.call_once(group_id, method, request, deadline - time.monotonic(), errors)
            except LogbrokerError as exc:
                if gives_up(exc, deadline):
                    raise
                await asyncio.sleep(COORDINATOR_RETRY_BACKOFF_S)


async def wait_event(event: asyncio.Event, timeout_s: float) -> None:
    """Until the event is set or the time is up, whichever comes first."""
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), timeout_s)


async def run_callback(callback: Callable[[set[TopicPartition]], Any] | None, tps: Partitions,
                       errors: list[BaseException]) -> None:
    """Callbacks may be plain functions or coroutines; one that raises does not stop the hand-over."""
    if callback is None:
        return
    try:
        result = callback(set(tps))
        if inspect.isawaitable(result):
            await result
    except Exception as exc:
        errors.append(exc)


class AsyncGroupSide:
    """An AsyncConsumer's group membership; every method runs on the consumer's event loop."""

    def __init__(self, member: GroupMember, fetch: FetchState, metadata: AsyncMetadata, enable_auto_commit: bool,
                 auto_commit_interval_ms: int, request_timeout_s: float) -> None:
        self.member = member
        self.fetch = fetch
        self.coordinators = AsyncCoordinators(metadata)
        self.auto_commit = AutoCommitTimer(enable_auto_commit, auto_commit_interval_ms, monotonic_ms())
        self.listener = RebalanceListener()
        self.wake_heartbeat = asyncio.Event()
        self.news = asyncio.Event()  # the member has something for poll() to do
        self.task: asyncio.Task[None] | None = None
        self.commits: asyncio.Lock | None = None
        self.heartbeat_timeout_s = min(request_timeout_s, max(1.0, member.session_timeout_ms / 3000))
        self.owned_checked_ms: float | None = None  # monotonic ms of still_owned's last check

    @property
    def group_id(self) -> str:
        return self.member.group_id

    def subscribe(self, subscription: Subscription, listener: RebalanceListener) -> None:
        self.listener = listener
        self.member.subscribe(subscription, monotonic_ms())
        if self.task is None:
            self.task = asyncio.get_running_loop().create_task(self._heartbeat_loop(),
                                                               name=f"logbroker-heartbeat-{self.group_id}")
        self.wake_heartbeat.set()

    # ------------------------------------------------------------------------------- heartbeats

    async def _heartbeat_loop(self) -> None:
        while True:
            try:
                await self._heartbeat_once()
            except Exception as exc:  # a bug must not silently end the membership: log it, back off, go on
                log.exception("group %s: heartbeat failed unexpectedly", self.group_id)
                self.member.on_heartbeat_error(BrokerUnavailableError(f"heartbeat failed: {exc!r}"), monotonic_ms())
                await asyncio.sleep(HEARTBEAT_FAILURE_BACKOFF_S)

    async def _heartbeat_once(self) -> None:
        self.wake_heartbeat.clear()
        now_ms = monotonic_ms()
        if self.member.poll_overdue(now_ms):
            log.warning("group %s: poll() was not called for over max_poll_interval_ms (%d ms); this member "
                        "leaves the group, and the next poll() rejoins it", self.group_id,
                        self.member.rebalance_timeout_ms)
            await self._send_leave(self.member.leave_for_poll_timeout())
            self.news.set()
            return
        self.member.check_session(now_ms)
        delay_ms = self.member.heartbeat_delay_ms(now_ms)
        if delay_ms == 0:
            await self._send_heartbeat(self.member.heartbeat_request(now_ms))
        else:
            await self._wait_for_wake(1.0 if delay_ms is None else delay_ms / 1000)
        if self.member.lost or self.member.reconciliation() or self.member.fatal is not None:
            self.news.set()

    async def _wait_for_wake(self, timeout_s: float) -> None:
        await wait_event(self.wake_heartbeat, timeout_s)

    async def _send_heartbeat(self, request: pb.GroupHeartbeatRequest) -> None:
        try:
            response = await self.coordinators.call_once(self.group_id, "Heartbeat", request,
                                                         self.heartbeat_timeout_s)
        except LogbrokerError as exc:  # a coordinator that moved or does not answer is looked up again
            log.info("group %s: heartbeat failed: %s", self.group_id, exc)
            self.member.on_heartbeat_error(exc, monotonic_ms())
        else:
            self.member.on_heartbeat_response(response, monotonic_ms())

    async def _send_leave(self, request: pb.GroupHeartbeatRequest | None) -> None:
        if request is None:
            return
        try:
            await self.coordinators.call_once(self.group_id, "Heartbeat", request, LEAVE_TIMEOUT_S)
        except LogbrokerError as exc:
            log.info("group %s: leaving failed (%s); the coordinator frees this member's partitions after its "
                     "session timeout", self.group_id, exc)

    # -------------------------------------------------------------------------------- poll side

    def still_owned(self, records: list[ConsumerRecord]) -> list[ConsumerRecord]:
        """As GroupSide.still_owned: less the records of partitions a session that lapsed meanwhile lost."""
        self.owned_checked_ms = monotonic_ms()
        return self.member.keep_owned(records, self.owned_checked_ms)

    async def on_poll(self) -> None:
        """Carry out the coordinator's decisions, auto-commit when due, raise a fatal group error."""
        self.news.clear()
        self.member.check_session(monotonic_ms())  # never hand out records of partitions given away meanwhile
        self.member.poll_called(monotonic_ms())
        if self.member.active:
            self.wake_heartbeat.set()
        for _ in range(8):
            plan = self.member.reconciliation()
            if not plan:
                break
            await self._reconcile(plan)
        if self.member.fatal is not None:
            raise self.member.fatal
        if self.auto_commit.due(monotonic_ms()):
            self.auto_commit.restart(monotonic_ms())
            await self._commit_quietly(self.owned_positions())

    async def wait_for_news(self, timeout_s: float) -> None:
        await wait_event(self.news, timeout_s)

    async def _reconcile(self, plan: Reconciliation) -> None:
        errors: list[BaseException] = []
        if plan.lost:
            self.fetch.remove(plan.lost)
            self.member.lost_handled(plan.lost)
            await run_callback(self.listener.lost_callback(), plan.lost, errors)
        if plan.revoke:
            await self._revoke(plan.revoke, errors)
        if plan.assign:
            await self._assign(plan.assign, errors)
        if errors:
            raise errors[0]

    async def _revoke(self, tps: Partitions, errors: list[BaseException]) -> None:
        if self.auto_commit.enabled:
            consumed = self.fetch.consumed()
            await self._commit_quietly({tp: consumed[tp] for tp in tps if tp in consumed})
        await run_callback(self.listener.on_revoked, tps, errors)
        self.fetch.remove(tps)
        self.member.revoked(tps)
        self.wake_heartbeat.set()

    async def _assign(self, tps: Partitions, errors: list[BaseException]) -> None:
        committed = await self.committed_positions(tps)
        accepted = self.member.accept(tps)  # a fencing may have come while the offsets were read
        if accepted:
            self.fetch.add(accepted)
            for tp in accepted:
                if tp in committed:
                    self.fetch.seek(tp, committed[tp])
            self.member.assigned(accepted)
            self.wake_heartbeat.set()
            await run_callback(self.listener.on_assigned, accepted, errors)

    async def committed_positions(self, tps: Iterable[TopicPartition]) -> dict[TopicPartition, int]:
        response = await self.coordinators.call(self.group_id, "FetchOffsets",
                                                fetch_offsets_request(self.group_id, tps))
        return {tp: found.offset for tp, found in committed_offsets(response).items()}

    # ----------------------------------------------------------------------------------- commits

    def owned_positions(self) -> dict[TopicPartition, int]:
        return self.member.owned_offsets(self.fetch.consumed())

    async def commit(self, offsets: CommitOffsets) -> None:
        if not offsets:
            return
        if self.commits is None:
            self.commits = asyncio.Lock()
        async with self.commits:  # in the order called, as the synchronous consumer's
            for attempt in range(2):
                request = self.member.commit_request(offsets)
                try:
                    await self.coordinators.call(self.group_id, "CommitOffsets", request)
                    return
                except StaleMemberEpochError:
                    # The heartbeat answer with the new epoch has not arrived yet: ask for it, then retry.
                    if attempt or not await self._await_epoch_change(request.member_epoch):
                        raise

    async def _await_epoch_change(self, stale_epoch: int) -> bool:
        self.wake_heartbeat.set()
        deadline = asyncio.get_running_loop().time() + STALE_EPOCH_WAIT_S
        while asyncio.get_running_loop().time() < deadline:
            if self.member.epoch != stale_epoch:
                return True
            await asyncio.sleep(STALE_EPOCH_POLL_S)
        return False

    async def _commit_quietly(self, offsets: CommitOffsets) -> None:
        try:
            await self.commit(offsets)
        except LogbrokerError as exc:
            log.warning("group %s: auto-commit of %d partition(s) failed: %s", self.group_id, len(offsets), exc)

    async def committed(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, OffsetAndMetadata | None]:
        response = await self.coordinators.call(self.group_id, "FetchOffsets",
                                                fetch_offsets_request(self.group_id, tps))
        found = committed_offsets(response)
        return {tp: (OffsetAndMetadata(found[tp].offset, found[tp].metadata) if tp in found else None)
                for tp in tps}

    # ----------------------------------------------------------------------------------- closing

    async def close(self) -> None:
        if self.task is not None:
            self.task.cancel()
            await asyncio.gather(self.task, return_exceptions=True)
        owned = self.member.owned
        if self.auto_commit.enabled:
            await self._commit_quietly(self.owned_positions())
        if self.member.subscribed and owned:
            errors: list[BaseException] = []
            await run_callback(self.listener.on_revoked, owned, errors)
            for error in errors:
                log.error("group %s: on_revoked raised while closing: %r", self.group_id, error)
        leave = self.member.leave_request() if self.member.state is not MemberState.LEFT else None
        await self._send_leave(leave)
