"""The Raft wire codec is lossless for every Message, and rejects what a Message cannot hold."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from logbroker_client import records as rec
from logbroker_client.proto import logbroker_pb2 as pb

from logbroker.cluster.raft_codec import (
    ENTRY_KIND_TO_WIRE,
    MAX_TERM,
    MAX_WIRE_TERM,
    MESSAGE_TYPE_TO_WIRE,
    RaftCodecError,
    decode_message,
    encode_message,
)
from logbroker.raft.membership import Membership
from logbroker.raft.types import Entry, EntryKind, Message, MessageType

INT32 = st.integers(min_value=-(2**31), max_value=2**31 - 1)
NODE_IDS = st.integers(min_value=0, max_value=2**31 - 1)
OFFSETS = st.integers(min_value=-1, max_value=2**60)
TERMS = st.integers(min_value=0, max_value=MAX_WIRE_TERM)


def data_batch(count: int) -> bytes:
    builder = rec.BatchBuilder()
    for i in range(count):
        builder.append(1_700_000_000_000 + i, None, b"v%d" % i)
    return builder.build()


@st.composite
def entries_after(draw: st.DrawFn, prev_last_offset: int, term: int) -> tuple[Entry, ...]:
    """Contiguous entries following prev_last_offset, of terms up to the message's: what a leader sends."""
    out = []
    base = prev_last_offset + 1
    for _ in range(draw(st.integers(min_value=0, max_value=4)) if term > 0 else 0):
        kind = draw(st.sampled_from(EntryKind))
        count = draw(st.integers(min_value=1, max_value=5 if kind is EntryKind.DATA else 10_000))
        payload = data_batch(count) if kind is EntryKind.DATA else \
            draw(memberships()).encode() if kind is EntryKind.CONFIG else draw(st.binary(max_size=64))
        out.append(Entry(base, base + count - 1, draw(st.integers(min_value=1, max_value=term)), kind, payload))
        base += count
    return tuple(out)


@st.composite
def memberships(draw: st.DrawFn) -> Membership:
    voters = draw(st.frozensets(NODE_IDS, min_size=1, max_size=5))
    learners = draw(st.frozensets(NODE_IDS, max_size=3)) - voters
    return Membership(voters, learners)


@st.composite
def messages(draw: st.DrawFn) -> Message:
    term = draw(TERMS)
    prev_last_offset = draw(OFFSETS)
    return Message(
        type=draw(st.sampled_from(MessageType)),
        from_node=draw(NODE_IDS),
        to_node=draw(NODE_IDS),
        term=term,
        prev_last_offset=prev_last_offset,
        prev_term=draw(TERMS),
        entries=draw(entries_after(prev_last_offset, term)),
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
    payload = data_batch(3) if kind is EntryKind.DATA else \
        Membership.of([1, 2, 3]).encode() if kind is EntryKind.CONFIG else b"\x00\xffbatch"
    entry = Entry(base_offset=7, last_offset=9, term=3, kind=kind, payload=payload)
    message = Message(type=message_type, from_node=1, to_node=2, term=3, prev_last_offset=6, entries=(entry,))
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


def _membership_flag_without_membership(raw: pb.RaftMessage) -> None:
    raw.has_membership = True


def _garbled_membership(raw: pb.RaftMessage) -> None:
    raw.has_membership = True
    raw.membership = b"v=x;l="


@pytest.mark.parametrize(
    "mutate",
    [_membership_flag_without_membership, _garbled_membership],
)
def test_malformed_fields_raise_codec_errors(mutate: Callable[[pb.RaftMessage], None]) -> None:
    raw = encode_message("g", Message(type=MessageType.APPEND, from_node=1, to_node=2, term=1))
    mutate(raw)
    with pytest.raises(RaftCodecError, match="malformed Raft message"):
        decode_message(raw)


# ----------------------------------------------------------------------------- hostile peers


def _append(**fields: object) -> pb.RaftMessage:
    return encode_message("t-0@id", Message(type=MessageType.APPEND, from_node=1, to_node=2, term=5,
                                             prev_last_offset=9, **fields))  # type: ignore[arg-type]


@pytest.mark.parametrize("field", ["term", "prev_term", "reject_hint_term", "last_log_term"])
def test_a_term_beyond_a_32_bit_epoch_is_refused(field: str) -> None:
    raw = _append()
    setattr(raw, field, 2**31 + 7)  # once killed a partition: epochs are stored in 32 bits
    with pytest.raises(RaftCodecError, match=f"{field} {2**31 + 7} is outside"):
        decode_message(raw)


@pytest.mark.parametrize("field", ["prev_last_offset", "commit_offset", "match_offset", "log_start_offset"])
def test_an_offset_below_minus_one_is_refused(field: str) -> None:
    raw = _append()
    setattr(raw, field, -5)
    with pytest.raises(RaftCodecError, match=f"{field} -5 is outside"):
        decode_message(raw)


def test_a_message_claiming_another_sender_than_its_stream_is_refused() -> None:
    with pytest.raises(RaftCodecError, match="arrived on the stream of node 3"):
        decode_message(_append(), from_node=3, to_node=2)
    with pytest.raises(RaftCodecError, match="addressed to node 2, not this node 4"):
        decode_message(_append(), from_node=1, to_node=4)
    assert decode_message(_append(), from_node=1, to_node=2)[1].from_node == 1


def _entry_gap(raw: pb.RaftMessage) -> None:
    raw.entries.add(base_offset=12, last_offset=12, term=1, kind=1)


def _entry_covering_no_offsets(raw: pb.RaftMessage) -> None:
    raw.entries.add(base_offset=10, last_offset=9, term=1, kind=1)


def _entry_without_term(raw: pb.RaftMessage) -> None:
    raw.entries.add(base_offset=10, last_offset=10, term=0, kind=1)


def _entry_from_a_future_term(raw: pb.RaftMessage) -> None:
    raw.entries.add(base_offset=10, last_offset=10, term=6, kind=1)


def _data_entry_that_is_no_batch(raw: pb.RaftMessage) -> None:
    raw.entries.add(base_offset=10, last_offset=10, term=5, kind=0, payload=b"not a batch")


def _data_entry_whose_batch_covers_other_offsets(raw: pb.RaftMessage) -> None:
    raw.entries.add(base_offset=10, last_offset=10, term=5, kind=0, payload=data_batch(3))


def _data_entry_with_a_damaged_batch(raw: pb.RaftMessage) -> None:
    batch = bytearray(data_batch(1))
    batch[-1] ^= 0xFF
    raw.entries.add(base_offset=10, last_offset=10, term=5, kind=0, payload=bytes(batch))


@pytest.mark.parametrize("mutate", [
    _entry_gap, _entry_covering_no_offsets, _entry_without_term, _entry_from_a_future_term,
    _data_entry_that_is_no_batch, _data_entry_whose_batch_covers_other_offsets, _data_entry_with_a_damaged_batch,
])
def test_entries_a_leader_cannot_have_sent_are_refused(mutate: Callable[[pb.RaftMessage], None]) -> None:
    raw = _append()
    mutate(raw)
    with pytest.raises(RaftCodecError):
        decode_message(raw)


@pytest.mark.parametrize("payload", [b"not a membership", b"v=;l=", b"v=1,2;l=2", b"\xff\xfe", b""])
def test_a_config_entry_that_is_no_membership_is_refused(payload: bytes) -> None:
    entry = Entry(base_offset=7, last_offset=7, term=3, kind=EntryKind.CONFIG, payload=payload)
    message = Message(type=MessageType.APPEND, from_node=1, to_node=2, term=3, prev_last_offset=6, entries=(entry,))
    with pytest.raises(RaftCodecError, match="CONFIG entry at 7 is not a membership"):
        decode_message(encode_message("t-0", message))


@pytest.mark.parametrize("term", [MAX_WIRE_TERM + 1, MAX_TERM])
def test_a_term_without_room_for_more_elections_is_refused(term: int) -> None:
    message = Message(type=MessageType.HEARTBEAT_RESP, from_node=1, to_node=2, term=term)
    with pytest.raises(RaftCodecError, match=f"term {term} is outside"):
        decode_message(encode_message("t-0", message))
    assert decode_message(encode_message("t-0", Message(MessageType.HEARTBEAT_RESP, 1, 2, MAX_WIRE_TERM)))
