"""The consumer group member state machine (group_member.py), driven by hand: no broker, no clock, no threads."""

from __future__ import annotations

import pytest
from logbroker_client.errors import (
    BrokerUnavailableError,
    InvalidGroupIdError,
    NotCoordinatorError,
    UnknownMemberIdError,
    UnreleasedInstanceIdError,
)
from logbroker_client.group_member import (
    FIRST_RETRY_BACKOFF_MS,
    AutoCommitTimer,
    GroupMember,
    MemberState,
    Subscription,
    partitions_from_pb,
    partitions_to_pb,
)
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.types import OffsetAndMetadata, TopicPartition

SESSION_MS = 3_000
REBALANCE_MS = 10_000
P0, P1, P2, P3 = (TopicPartition("orders", p) for p in range(4))


def member(instance_id: str | None = None) -> GroupMember:
    return GroupMember("billing", session_timeout_ms=SESSION_MS, rebalance_timeout_ms=REBALANCE_MS,
                       instance_id=instance_id, client_id="c-1", client_host="host-1", member_id="m-1")


def answer(epoch: int, assignment: set[TopicPartition] | None = None, interval_ms: int = 500,
           error: int = pb.ErrorCode.NONE) -> pb.GroupHeartbeatResponse:
    response = pb.GroupHeartbeatResponse(member_id="m-1", member_epoch=epoch, heartbeat_interval_ms=interval_ms,
                                         error_code=error, error_message="told so" if error else "")
    if assignment is not None:
        response.has_assignment = True
        response.assignment.extend(partitions_to_pb(assignment))
    return response


def joined(owned: set[TopicPartition], instance_id: str | None = None, now_ms: float = 0) -> GroupMember:
    """A member that joined, was given `owned`, took it, and whose next heartbeat is due at once."""
    m = member(instance_id)
    m.subscribe(Subscription(("orders",)), now_ms)
    m.heartbeat_request(now_ms)
    m.on_heartbeat_response(answer(5, owned), now_ms)
    plan = m.reconciliation()
    m.assigned(m.accept(plan.assign))
    return m


def reported(request: pb.GroupHeartbeatRequest) -> frozenset[TopicPartition]:
    return partitions_from_pb(request.owned_partitions)


def test_the_first_heartbeat_joins_with_epoch_0_and_says_everything_about_the_member() -> None:
    m = member(instance_id="pod-7")
    assert m.heartbeat_delay_ms(0) is None  # not subscribed: no heartbeats at all
    m.subscribe(Subscription(("orders", "payments"), "audit-.*"), now_ms=0)
    assert m.heartbeat_delay_ms(0) == 0
    request = m.heartbeat_request(0)
    assert (request.group_id, request.member_id, request.member_epoch) == ("billing", "m-1", 0)
    assert request.full_request and list(request.subscribed_topic_names) == ["orders", "payments"]
    assert request.subscribed_topic_regex == "audit-.*" and request.instance_id == "pod-7"
    assert (request.rebalance_timeout_ms, request.client_id, request.client_host) == (REBALANCE_MS, "c-1", "host-1")
    assert reported(request) == frozenset()


def test_an_assignment_is_taken_then_reported_at_once_and_later_heartbeats_are_lean() -> None:
    m = member()
    m.subscribe(Subscription(("orders",)), 0)
    m.heartbeat_request(0)
    m.on_heartbeat_response(answer(5, {P0, P1}, interval_ms=500), 10)
    assert m.state is MemberState.MEMBER and m.epoch == 5
    plan = m.reconciliation()
    assert (plan.lost, plan.revoke, plan.assign) == (frozenset(), frozenset(), {P0, P1})
    assert m.owned == frozenset()  # not before the application has taken them
    m.assigned(m.accept(plan.assign))
    assert m.heartbeat_delay_ms(20) == 0  # taken: tell the coordinator now
    request = m.heartbeat_request(20)
    assert request.member_epoch == 5 and reported(request) == {P0, P1}
    assert not request.full_request and not request.subscribed_topic_names
    m.on_heartbeat_response(answer(5), 30)  # no assignment: it is what the member reported
    assert not m.reconciliation()
    assert m.heartbeat_delay_ms(30) == pytest.approx(490)  # the interval runs from when it was sent


def test_revoked_partitions_stay_reported_until_released_and_new_ones_come_after() -> None:
    m = joined({P0, P1, P2})
    m.heartbeat_request(0)
    m.on_heartbeat_response(answer(6, {P0, P3}), 5)
    plan = m.reconciliation()
    assert (plan.revoke, plan.assign) == ({P1, P2}, {P3})
    assert reported(m.heartbeat_request(6)) == {P0, P1, P2}  # still owned until the application lets go
    m.revoked(plan.revoke)
    assert m.heartbeat_delay_ms(7) == 0
    assert reported(m.heartbeat_request(7)) == {P0}


def test_a_heartbeat_wanted_at_once_while_one_is_in_flight_goes_out_when_it_is_answered() -> None:
    m = joined({P0})
    m.heartbeat_request(0)
    m.heartbeat_now()  # e.g. a revocation finished meanwhile
    m.on_heartbeat_response(answer(5, interval_ms=5_000), 3)
    assert m.heartbeat_delay_ms(3) == 0


@pytest.mark.parametrize("code", [pb.ErrorCode.FENCED_MEMBER_EPOCH, pb.ErrorCode.UNKNOWN_MEMBER_ID])
def test_a_fenced_member_loses_everything_without_committing_and_rejoins_with_epoch_0(code: int) -> None:
    m = joined({P0, P1})
    m.heartbeat_request(100)
    m.on_heartbeat_response(answer(0, error=code), 110)
    plan = m.reconciliation()
    assert (plan.lost, plan.revoke, plan.assign) == ({P0, P1}, frozenset(), frozenset())
    assert m.owned == frozenset() and m.state is MemberState.JOINING
    with pytest.raises(UnknownMemberIdError, match="nothing was committed"):
        m.commit_request({P0: 10})
    request = m.heartbeat_request(110)
    assert request.member_epoch == 0 and request.full_request and reported(request) == frozenset()
    m.lost_handled(plan.lost)
    m.on_heartbeat_response(answer(9, {P1}), 120)  # the same id back in the group, with what it is given now
    assert m.reconciliation().assign == {P1}


def test_a_moving_coordinator_keeps_partitions_retries_with_backoff_and_resends_everything() -> None:
    m = joined({P0}, now_ms=0)
    m.heartbeat_request(0)
    m.on_heartbeat_response(answer(5, error=pb.ErrorCode.NOT_COORDINATOR), 10)
    assert m.owned == {P0} and not m.reconciliation()
    assert m.heartbeat_delay_ms(10) == FIRST_RETRY_BACKOFF_MS
    m.heartbeat_request(10 + FIRST_RETRY_BACKOFF_MS)
    m.on_heartbeat_error(BrokerUnavailableError("connection refused"), 120)
    assert m.heartbeat_delay_ms(120) == 2 * FIRST_RETRY_BACKOFF_MS  # backs off
    request = m.heartbeat_request(320)
    assert request.full_request and request.member_epoch == 5 and reported(request) == {P0}


def test_no_answer_for_the_session_timeout_loses_the_partitions_measured_from_the_last_answered_send() -> None:
    m = joined({P0, P1}, now_ms=0)
    m.heartbeat_request(1_000)
    m.on_heartbeat_response(answer(5, interval_ms=500), 1_900)  # sent at 1000, answered at 1900
    for now in (2_000, 2_500, 3_000, 3_500):
        m.heartbeat_request(now)
        m.on_heartbeat_error(NotCoordinatorError("moved"), now + 1)
    assert m.owned == {P0, P1}  # 3501 - 1000 < session
    m.check_session(1_000 + SESSION_MS - 1)
    assert m.owned == {P0, P1}
    m.check_session(1_000 + SESSION_MS)
    assert m.reconciliation().lost == {P0, P1} and m.state is MemberState.JOINING


@pytest.mark.parametrize("error", [UnreleasedInstanceIdError("held by another"), InvalidGroupIdError("too long")])
def test_a_fatal_answer_stops_heartbeats_and_is_kept_for_poll_to_raise(error: Exception) -> None:
    m = joined({P0})
    m.heartbeat_request(0)
    m.on_heartbeat_error(error, 5)  # type: ignore[arg-type]
    assert m.state is MemberState.FAILED and m.fatal is error
    assert m.heartbeat_delay_ms(5) is None
    assert m.reconciliation().lost == {P0}


def test_a_member_not_polled_within_max_poll_interval_leaves_and_rejoins_on_the_next_poll() -> None:
    m = joined({P0}, now_ms=0)
    assert not m.poll_overdue(REBALANCE_MS)
    assert m.poll_overdue(REBALANCE_MS + 1)
    leave = m.leave_for_poll_timeout()
    assert leave.member_epoch == -1 and m.reconciliation().lost == {P0}
    assert m.heartbeat_delay_ms(REBALANCE_MS + 2) is None  # out of the group until polled
    m.poll_called(REBALANCE_MS + 3)
    assert m.state is MemberState.JOINING and m.heartbeat_request(REBALANCE_MS + 3).member_epoch == 0


def test_leaving_sends_epoch_minus_1_or_minus_2_for_a_static_member_and_nothing_if_never_heard() -> None:
    assert member().leave_request() is None  # never subscribed
    dynamic = joined({P0})
    request = dynamic.leave_request()
    assert request is not None and request.member_epoch == -1 and dynamic.owned == frozenset()
    static = joined({P0}, instance_id="pod-7")
    request = static.leave_request()
    assert request is not None and (request.member_epoch, request.instance_id) == (-2, "pod-7")
    assert static.state is MemberState.LEFT and static.heartbeat_delay_ms(0) is None
    assert joined({P0}, instance_id="pod-8").leave_request(for_restart=False).member_epoch == -1  # type: ignore[union-attr]


def test_partitions_fenced_away_while_their_offsets_were_read_are_not_taken() -> None:
    m = member()
    m.subscribe(Subscription(("orders",)), 0)
    m.heartbeat_request(0)
    m.on_heartbeat_response(answer(5, {P0, P1}), 1)
    plan = m.reconciliation()
    m.on_heartbeat_error(UnknownMemberIdError("expired"), 2)  # the heartbeat thread, meanwhile
    assert m.accept(plan.assign) == frozenset()
    assert m.owned == frozenset()


def test_a_revocation_finished_after_a_fencing_is_not_reported_lost_again() -> None:
    m = joined({P0, P1})
    m.heartbeat_request(0)
    m.on_heartbeat_response(answer(6, {P0}), 1)
    revoke = m.reconciliation().revoke
    m.on_heartbeat_error(UnknownMemberIdError("expired"), 2)
    m.revoked(revoke)  # on_revoked already ran for P1
    assert m.reconciliation().lost == {P0}


def test_commits_carry_the_member_epoch_or_are_a_simple_groups() -> None:
    simple = member()
    request = simple.commit_request({P0: 7, P1: OffsetAndMetadata(9, "checkpoint")})
    assert (request.member_id, request.member_epoch) == ("", -1)
    assert [(o.partition, o.offset, o.metadata) for o in request.offsets] == [(0, 7, ""), (1, 9, "checkpoint")]
    m = joined({P0})
    request = m.commit_request({P0: 3})
    assert (request.member_id, request.member_epoch) == ("m-1", 5)
    assert m.owned_offsets({P0: 3, P1: 4}) == {P0: 3}  # only partitions it owns
    assert simple.owned_offsets({P0: 3, P1: 4}) == {P0: 3, P1: 4}


def test_auto_commit_timer_and_subscription_checks() -> None:
    timer = AutoCommitTimer(True, 5_000, now_ms=0)
    assert not timer.due(4_999) and timer.due(5_000)
    timer.restart(5_000)
    assert not timer.due(9_999)
    assert not AutoCommitTimer(False, 5_000, 0).due(10_000)
    with pytest.raises(ValueError, match="at least one topic"):
        Subscription()
    with pytest.raises(ValueError, match="at least 1"):
        AutoCommitTimer(True, 0, 0)


def test_every_error_code_the_broker_sends_has_its_own_error_class() -> None:
    from logbroker_client.errors import BrokerResponseError, RequestTimedOutError, error_for

    for name, code in pb.ErrorCode.items():
        if code == pb.ErrorCode.NONE:
            continue
        error = error_for(code, "")
        assert type(error) is not BrokerResponseError, f"{name} has no error class"
        assert str(error) == name or isinstance(error, RequestTimedOutError)  # the code's name without a message
