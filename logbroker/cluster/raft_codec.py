"""Wire codec between logbroker.raft Messages and the RaftMessage protobuf of the broker-to-broker stream.

Enums travel as small fixed ints rather than their string values: the tables below are the wire contract,
so a renamed enum member cannot silently change what a peer on another version reads. Never renumber an
existing entry; only append.
"""

from __future__ import annotations

from logbroker_client.proto import logbroker_pb2 as pb

from logbroker.raft.errors import RaftInternalError
from logbroker.raft.membership import Membership
from logbroker.raft.types import Entry, EntryKind, Message, MessageType

MESSAGE_TYPE_TO_WIRE: dict[MessageType, int] = {
    MessageType.PRE_VOTE: 0,
    MessageType.PRE_VOTE_RESP: 1,
    MessageType.VOTE: 2,
    MessageType.VOTE_RESP: 3,
    MessageType.APPEND: 4,
    MessageType.APPEND_RESP: 5,
    MessageType.HEARTBEAT: 6,
    MessageType.HEARTBEAT_RESP: 7,
    MessageType.TIMEOUT_NOW: 8,
    MessageType.RESET_LOG: 9,
}
WIRE_TO_MESSAGE_TYPE: dict[int, MessageType] = {wire: t for t, wire in MESSAGE_TYPE_TO_WIRE.items()}

# Matches the comment on RaftEntry.kind in logbroker.proto.
ENTRY_KIND_TO_WIRE: dict[EntryKind, int] = {
    EntryKind.DATA: 0,
    EntryKind.NOOP: 1,
    EntryKind.CONFIG: 2,
}
WIRE_TO_ENTRY_KIND: dict[int, EntryKind] = {wire: k for k, wire in ENTRY_KIND_TO_WIRE.items()}


class RaftCodecError(ValueError):
    """A RaftMessage from the wire cannot be turned into a Message (unknown enum int, malformed field)."""


def encode_message(group: str, m: Message) -> pb.RaftMessage:
    """The protobuf form of ``m`` tagged with its Raft group."""
    out = pb.RaftMessage(
        group=group,
        type=MESSAGE_TYPE_TO_WIRE[m.type],
        from_node=m.from_node,
        to_node=m.to_node,
        term=m.term,
        prev_last_offset=m.prev_last_offset,
        prev_term=m.prev_term,
        commit_offset=m.commit_offset,
        match_offset=m.match_offset,
        reject=m.reject,
        reject_hint_offset=m.reject_hint_offset,
        reject_hint_term=m.reject_hint_term,
        last_log_offset=m.last_log_offset,
        last_log_term=m.last_log_term,
        leadership_transfer=m.leadership_transfer,
        log_start_offset=m.log_start_offset,
    )
    if m.entries:
        out.entries.extend(_encode_entry(e) for e in m.entries)
    if m.membership is not None:
        # The flag is needed because proto3 cannot tell an empty bytes field from an absent one.
        out.membership = m.membership.encode()
        out.has_membership = True
    return out


def _encode_entry(e: Entry) -> pb.RaftEntry:
    return pb.RaftEntry(
        base_offset=e.base_offset,
        last_offset=e.last_offset,
        term=e.term,
        kind=ENTRY_KIND_TO_WIRE[e.kind],
        payload=e.payload,
    )


def decode_message(raw: pb.RaftMessage) -> tuple[str, Message]:
    """The (group, Message) carried by ``raw``; raises RaftCodecError on anything a Message cannot hold."""
    message_type = WIRE_TO_MESSAGE_TYPE.get(raw.type)
    if message_type is None:
        raise RaftCodecError(f"unknown Raft message type {raw.type} (group {raw.group!r}, from {raw.from_node})")
    try:
        message = Message(
            type=message_type,
            from_node=raw.from_node,
            to_node=raw.to_node,
            term=raw.term,
            prev_last_offset=raw.prev_last_offset,
            prev_term=raw.prev_term,
            entries=tuple(_decode_entry(e) for e in raw.entries),
            commit_offset=raw.commit_offset,
            match_offset=raw.match_offset,
            reject=raw.reject,
            reject_hint_offset=raw.reject_hint_offset,
            reject_hint_term=raw.reject_hint_term,
            last_log_offset=raw.last_log_offset,
            last_log_term=raw.last_log_term,
            leadership_transfer=raw.leadership_transfer,
            log_start_offset=raw.log_start_offset,
            membership=_decode_membership(raw),
        )
    except RaftCodecError:
        raise
    # Entry and Membership validate themselves with RaftInternalError, which means "bug" inside the core;
    # from the wire the same failure means a malformed message, so it is reported as a codec error.
    except (RaftInternalError, ValueError, KeyError, UnicodeDecodeError) as e:
        raise RaftCodecError(f"malformed Raft message in group {raw.group!r} from {raw.from_node}: {e}") from e
    return raw.group, message


def _decode_entry(raw: pb.RaftEntry) -> Entry:
    kind = WIRE_TO_ENTRY_KIND.get(raw.kind)
    if kind is None:
        raise RaftCodecError(f"unknown Raft entry kind {raw.kind} at offset {raw.base_offset}")
    return Entry(
        base_offset=raw.base_offset,
        last_offset=raw.last_offset,
        term=raw.term,
        kind=kind,
        payload=raw.payload,
    )


def _decode_membership(raw: pb.RaftMessage) -> Membership | None:
    if not raw.has_membership:
        return None
    return Membership.decode(raw.membership)
