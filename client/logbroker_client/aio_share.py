"""AsyncShareConsumer: the ShareConsumer's API over asyncio (share.py says what a share group is).

The I/O methods are coroutines (subscribe, poll, flush_acks, commit, close); a record's ack(), release(),
reject() and renew() are not, as they only queue the acknowledgement. The bookkeeping is share_state.py's,
the same as the synchronous consumer's; only the waiting differs.

    async with AsyncShareConsumer("emails") as worker:
        await worker.subscribe(["emails"])
        async for job in worker:
            await send_email(job.value)
            job.ack()
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Sequence
from typing import Any

from logbroker_client.aio import AsyncMetadata
from logbroker_client.connection import DEFAULT_REQUEST_TIMEOUT_MS
from logbroker_client.errors import BrokerUnavailableError, LogbrokerError, RequestTimedOutError
from logbroker_client.groups import check_group_id
from logbroker_client.share import (
    DEFAULT_MAX_IN_FLIGHT,
    DEFAULT_SHARE_MAX_WAIT_MS,
    IDLE_WAIT_S,
    PARTITIONS_REFRESH_S,
    RETRY_BACKOFF_S,
    ShareSessionViews,
    check_max_wait_ms,
    default_share_client_id,
    missing_lane_error,
    subscription_lanes,
    wall_ms,
)
from logbroker_client.share_state import (
    AckFailure,
    SharePlan,
    ShareRecord,
    ShareSession,
    failures_error,
)
from logbroker_client.types import TopicPartition

__all__ = ["AsyncShareConsumer"]

log = logging.getLogger("logbroker_client.share")


class AsyncShareConsumer(ShareSessionViews):
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
        """As ShareConsumer: group_id names the share group, max_in_flight bounds the unfinished records."""
        self.group_id = check_group_id(group_id)
        self.member_id = uuid.uuid4().hex
        self.client_id = client_id or default_share_client_id()
        self._max_wait_ms = check_max_wait_ms(max_wait_ms)
        self._session = ShareSession(self.group_id, self.member_id, max_in_flight)
        self._metadata = AsyncMetadata(bootstrap, request_timeout_ms)
        self._timeout_s = request_timeout_ms / 1000
        self._backoff_until = 0.0
        self._partitions_checked = 0.0
        self._closed = False

    # ----------------------------------------------------------------------------- subscription

    async def subscribe(self, topics: Sequence[str] | str, *, priorities: int = 1) -> None:
        """As ShareConsumer.subscribe: every lane topic must exist."""
        self._check_open("subscribe()")
        lanes = subscription_lanes(topics, priorities)
        counts = {topic: await self._partition_count(topic, level) for topic, level in lanes}
        self._session.subscribe(lanes)
        for topic, count in counts.items():
            self._session.set_partition_count(topic, count)
        self._partitions_checked = time.monotonic()

    async def _partition_count(self, topic: str, level: int) -> int:
        try:
            return await self._metadata.partitions_for(topic)
        except LogbrokerError as exc:
            raise missing_lane_error(exc, topic, level) from None

    # ------------------------------------------------------------------------------------- poll

    async def poll(self, timeout: float = 1.0, max_records: int | None = None) -> list[ShareRecord]:
        """As ShareConsumer.poll: records locked to this consumer, or [] after timeout."""
        self._check_open("poll()")
        if not self._session.lanes:
            raise LogbrokerError("poll() before subscribe(): await subscribe(['topic']) first")
        deadline = time.monotonic() + timeout
        while True:
            self._session.expire_locks(wall_ms())
            self._take_finished()
            records = self._session.take(max_records)
            await self._send_fetches()
            if records:
                return records
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return []
            await self._wait_for_answer(min(remaining, IDLE_WAIT_S if not self._session.in_flight else remaining))

    def __aiter__(self) -> AsyncIterator[ShareRecord]:
        return self._records()

    async def _records(self) -> AsyncIterator[ShareRecord]:
        while not self._closed:
            for record in await self.poll():
                yield record

    # --------------------------------------------------------------------------------- requests

    async def _send_fetches(self) -> None:
        if time.monotonic() < self._backoff_until:
            return
        await self._refresh_partitions_if_due()
        leaders = await self._leaders([*self._session.fetchable(), *self._session.with_pending_acks()])
        for plan in self._session.plan_fetches(leaders, time.monotonic() * 1000):
            self._start(plan)

    async def _refresh_partitions_if_due(self) -> None:
        if time.monotonic() - self._partitions_checked < PARTITIONS_REFRESH_S:
            return
        self._partitions_checked = time.monotonic()
        try:
            response = await self._metadata.refresh(self.subscription())
        except LogbrokerError as exc:
            log.info("share group %s: metadata refresh failed: %s", self.group_id, exc)
            return
        for topic in response.topics:
            if not topic.error_code:
                self._session.set_partition_count(topic.name, len(topic.partitions))

    async def _leaders(self, tps: Sequence[TopicPartition]) -> dict[TopicPartition, str]:
        leaders: dict[TopicPartition, str] = {}
        for tp in dict.fromkeys(tps):
            try:
                leaders[tp] = await self._metadata.leader(tp.topic, tp.partition)
            except LogbrokerError as exc:
                if not exc.retriable:
                    raise
                self._back_off()
        return leaders

    def _start(self, plan: SharePlan) -> None:
        if plan.is_fetch:
            method = "ShareFetch"
            request: Any = plan.fetch_request(self.group_id, self.member_id, self._max_wait_ms, self.client_id)
        else:
            method, request = "ShareAcknowledge", plan.acknowledge_request(self.group_id, self.member_id)
        call = self._metadata.call(method, request, plan.address, service="share")
        plan.handle = asyncio.get_running_loop().create_task(call)

    async def _wait_for_answer(self, timeout_s: float) -> None:
        handles = [plan.handle for plan in self._session.in_flight]
        if not handles:
            await asyncio.sleep(max(0.0, timeout_s))
            return
        await asyncio.wait(handles, timeout=max(0.0, timeout_s), return_when=asyncio.FIRST_COMPLETED)
        self._take_finished()

    def _take_finished(self) -> None:
        for plan in [plan for plan in self._session.in_flight if plan.handle.done()]:
            self._finish(plan)

    def _finish(self, plan: SharePlan) -> None:
        try:
            response = plan.handle.result()
        except asyncio.CancelledError:
            self._session.failed(plan)
            return
        except LogbrokerError as error:
            self._on_request_failure(plan, error)
            return
        answer = self._session.absorb(plan, response.partitions, wall_ms())
        for topic in answer.find_leader:
            self._metadata.invalidate(topic)
            self._back_off()
        if answer.errors:
            raise answer.errors[0]

    def _on_request_failure(self, plan: SharePlan, error: LogbrokerError) -> None:
        self._session.failed(plan)
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

    async def flush_acks(self, timeout: float | None = None, *, raise_on_failure: bool = True) -> list[AckFailure]:
        """As ShareConsumer.flush_acks: send every pending acknowledgement now and wait for all answers."""
        deadline = time.monotonic() + (self._timeout_s if timeout is None else timeout)
        while True:
            self._take_finished()
            if time.monotonic() >= self._backoff_until:
                for plan in self._session.plan_acks(await self._leaders(self._session.with_pending_acks())):
                    self._start(plan)
            carrying = any(plan.acks for plan in self._session.in_flight)
            if not carrying and not self._session.has_pending_acks():
                break
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                waited = self._timeout_s if timeout is None else timeout
                self._session.unsendable(self._session.with_pending_acks(), RequestTimedOutError(
                    f"not delivered within {waited:g}s (no leader answered); the records come back to the queue "
                    "when their locks expire"))
                break
            await self._wait_for_answer(min(remaining, IDLE_WAIT_S if not carrying else remaining))
        failures = self._session.take_failures()
        if failures and raise_on_failure:
            raise failures_error(failures)
        return failures

    async def commit(self) -> None:
        await self.flush_acks(raise_on_failure=True)

    # ------------------------------------------------------------------------------- lifecycle

    async def close(self) -> None:
        """As ShareConsumer.close: held records go back to the queue at once, pending acknowledgements are sent."""
        if self._closed:
            return
        try:
            await self._wait_for_fetches(self._timeout_s + self._max_wait_ms / 1000)
            released = self._session.release_everything()
            if released:
                log.info("share group %s: close() releases %d record(s)", self.group_id, released)
            await self.flush_acks(raise_on_failure=False)
        finally:
            self._closed = True
            handles = [plan.handle for plan in self._session.in_flight]
            for handle in handles:
                handle.cancel()
            await asyncio.gather(*handles, return_exceptions=True)
            await self._metadata.close()

    async def _wait_for_fetches(self, timeout_s: float) -> None:
        deadline = time.monotonic() + timeout_s
        while self._session.in_flight and time.monotonic() < deadline:
            try:
                await self._wait_for_answer(deadline - time.monotonic())
            except LogbrokerError as exc:
                log.warning("share group %s: while closing: %s", self.group_id, exc)

    def _check_open(self, what: str) -> None:
        if self._closed:
            raise LogbrokerError(f"{what} on a closed AsyncShareConsumer")

    async def __aenter__(self) -> AsyncShareConsumer:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()
