"""The Raft wire codec is lossless for every Message, and rejects what a Message cannot hold."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from logbroker_client.proto import logbroker_pb2 as pb

from logbroker.cluster.raft_codec import (
    ENTRY_KIND_TO_WIRE,
    MESSAGE_TYPE_TO_WIRE,
    RaftCodecError,
    decode_message,
    encode_message,
)
from logbroker.raft.membership import Membership
from logbroker.raft.types import Entry, EntryKind, Message, MessageType

INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
NODE_IDS = st.integers(min_value=0, max_value=2**31 - 1)
OFFSETS = st.integers(min_value=-1, max_value=2**62)
TERMS = st.integers(min_value=0, max_value=2**62)


@st.composite
def entries(draw: st.DrawFn) -> Entry:
    base = draw(st.integers(min_value=0, max_value=2**62))
    count = draw(st.integers(min_value=1, max_value=10_000))
    return Entry(
        base_offset=base,
        last_offset=base + count - 1,
        term=draw(st.integers(min_value=1, max_value=2**62)),
        kind=draw(st.sampled_from(EntryKind)),
        payload=draw(st.binary(max_size=64)),
    )


@st.composite
def memberships(draw: st.DrawFn) -> Membership:
    voters = draw(st.frozensets(NODE_IDS, min_size=1, max_size=5))
    learners = draw(st.frozensets(NODE_IDS, max_size=3)) - voters
    return Membership(voters, learners)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    return Message(
        type=draw(st.sampled_from(MessageType)),
        from_node=draw(NODE_IDS),
        to_node=draw(NODE_IDS),
        term=draw(TERMS),
        prev_last_offset=draw(OFFSETS),
        prev_term=draw(TERMS),
        entries=tuple(draw(st.lists(entries(), max_size=4))),
        commit_offset=draw(OFFSETS),
        match_offset=draw(OFFSETS),
        reject=draw(st.booleans()),
        reject_hint_offset=draw(OFFSETS),
        reject_hint_term=draw(TERMS),
        last_log_offset=draw(OFFSETS),
        last_log_term=draw(TERMS),
        leadership_transfer=draw(st.booleans()),
        log_start_offset=draw(OFFSETS),
        membership=draw(st.none() | memberships()),
    )


@settings(max_examples=300, deadline=None)
@given(group=st.text(max_size=40), message=messages())
def test_round_trip_through_the_wire(group: str, message: Message) -> None:
    wire = encode_message(group, message).SerializeToString()
    assert decode_message(pb.RaftMessage.FromString(wire)) == (group, message)


@pytest.mark.parametrize("message_type", list(MessageType))
@pytest.mark.parametrize("kind", list(EntryKind))
def test_every_type_and_kind_round_trips(message_type: MessageType, kind: EntryKind) -> None:
    entry = Entry(base_offset=7, last_offset=9, term=3, kind=kind, payload=b"\x00\xffbatch")
    message = Message(type=message_type, from_node=1, to_node=2, term=3, entries=(entry,))
    assert decode_message(encode_message("t-0", message)) == ("t-0", message)


def test_membership_absent_and_present_are_distinguished() -> None:
    bare = Message(type=MessageType.RESET_LOG, from_node=1, to_node=2, term=4)
    with_membership = Message(
        type=MessageType.RESET_LOG, from_node=1, to_node=2, term=4, membership=Membership.of([1, 2], [3])
    )
    assert decode_message(encode_message("g", bare))[1].membership is None
    assert decode_message(encode_message("g", with_membership))[1].membership == Membership.of([1, 2], [3])


def test_wire_ints_are_small_and_distinct() -> None:
    assert sorted(MESSAGE_TYPE_TO_WIRE.values()) == list(range(len(MessageType)))
    assert sorted(ENTRY_KIND_TO_WIRE.values()) == list(range(len(EntryKind)))


@given(wire_type=INT32.filter(lambda t: t not in MESSAGE_TYPE_TO_WIRE.values()))
def test_unknown_message_type_is_rejected(wire_type: int) -> None:
    with pytest.raises(RaftCodecError, match="unknown Raft message type"):
        decode_message(pb.RaftMessage(group="g", type=wire_type, from_node=1, to_node=2, term=1))


def test_unknown_entry_kind_is_rejected() -> None:
    raw = encode_message("g", Message(type=MessageType.APPEND, from_node=1, to_node=2, term=1))
    raw.entries.add(base_offset=0, last_offset=0, term=1, kind=99)
    with pytest.raises(RaftCodecError, match="unknown Raft entry kind 99"):
        decode_message(raw)


def _entry_covering_no_offsets(raw: pb.RaftMessage) -> None:
    raw.entries.add(base_offset=5, last_offset=4, term=1, kind=0)


def _entry_without_term(raw: pb.RaftMessage) -> None:
    raw.entries.add(base_offset=0, last_offset=0, term=0, kind=0)


def _membership_flag_without_membership(raw: pb.RaftMessage) -> None:
    raw.has_membership = True


def _garbled_membership(raw: pb.RaftMessage) -> None:
    raw.has_membership = True
    raw.membership = b"v=x;l="


@pytest.mark.parametrize(
    "mutate",
    [_entry_covering_no_offsets, _entry_without_term, _membership_flag_without_membership, _garbled_membership],
)
def test_malformed_fields_raise_codec_errors(mutate: Callable[[pb.RaftMessage], None]) -> None:
    raw = encode_message("g", Message(type=MessageType.APPEND, from_node=1, to_node=2, term=1))
    mutate(raw)
    with pytest.raises(RaftCodecError, match="malformed Raft message"):
        decode_message(raw)
