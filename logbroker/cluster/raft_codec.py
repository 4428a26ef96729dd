"""Wire codec between logbroker.raft Messages and the RaftMessage protobuf of the broker-to-broker stream.

Enums travel as small fixed ints rather than their string values: the tables below are the wire contract,
so a renamed enum member cannot silently change what a peer on another version reads. Never renumber an
existing entry; only append.
"""

from __future__ import annotations

from logbroker_client import records as rec
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


MAX_TERM = (1 << 31) - 1  # a term is stored as a batch's partitionLeaderEpoch, an i32
# The highest term accepted from the wire: below MAX_TERM by room for a million more elections, so that one
# message at the very top (a forged or corrupt term that a group adopts) cannot leave the group unable to ever
# elect again, every next campaign needing a term no batch can hold. No real group gets near it.
MAX_WIRE_TERM = MAX_TERM - (1 << 20)
MAX_OFFSET = (1 << 62)  # far beyond any real log, and still safe to add to
MAX_ENTRIES_PER_MESSAGE = 100_000
_TERM_FIELDS = ("term", "prev_term", "reject_hint_term", "last_log_term")
_OFFSET_FIELDS = ("prev_last_offset", "commit_offset", "match_offset", "reject_hint_offset", "last_log_offset",
                  "log_start_offset")


class RaftCodecError(ValueError):
    """A RaftMessage from the wire cannot be turned into a Message (unknown enum int, malformed field)."""


def _where(raw: pb.RaftMessage) -> str:
    return f"Raft message in group {raw.group!r} from node {raw.from_node}"


def _fields_in_range(raw: pb.RaftMessage) -> bool:
    """Every term and offset field within what a correct peer sends: the per-message fast path, one expression
    (a loop of getattr over the field names was a tenth of a follower's event loop)."""
    return (0 <= raw.term <= MAX_WIRE_TERM and 0 <= raw.prev_term <= MAX_WIRE_TERM
            and 0 <= raw.reject_hint_term <= MAX_WIRE_TERM and 0 <= raw.last_log_term <= MAX_WIRE_TERM
            and -1 <= raw.prev_last_offset <= MAX_OFFSET and -1 <= raw.commit_offset <= MAX_OFFSET
            and -1 <= raw.match_offset <= MAX_OFFSET and -1 <= raw.reject_hint_offset <= MAX_OFFSET
            and -1 <= raw.last_log_offset <= MAX_OFFSET and -1 <= raw.log_start_offset <= MAX_OFFSET)


def _check_fields(raw: pb.RaftMessage, from_node: int | None, to_node: int | None) -> None:
    if from_node is not None and raw.from_node != from_node:
        raise RaftCodecError(f"{_where(raw)} arrived on the stream of node {from_node}")
    if to_node is not None and raw.to_node != to_node:
        raise RaftCodecError(f"{_where(raw)} is addressed to node {raw.to_node}, not this node {to_node}")
    if _fields_in_range(raw):
        return
    for name in _TERM_FIELDS:  # which one is not, for the error
        value = getattr(raw, name)
        if not 0 <= value <= MAX_WIRE_TERM:
            raise RaftCodecError(f"{_where(raw)}: {name} {value} is outside 0..{MAX_WIRE_TERM}")
    for name in _OFFSET_FIELDS:
        value = getattr(raw, name)
        if not -1 <= value <= MAX_OFFSET:
            raise RaftCodecError(f"{_where(raw)}: {name} {value} is outside -1..{MAX_OFFSET}")


def _decode_entries(raw: pb.RaftMessage) -> tuple[Entry, ...]:
    """The message's entries, each checked: contiguous from prev_last_offset + 1, terms within the message's, a DATA
    entry one whole record batch, a CONFIG entry a membership. Each payload is read once: protobuf copies a bytes
    field on every read (a megabyte batch read three times was three copies)."""
    raw_entries = raw.entries
    if len(raw_entries) > MAX_ENTRIES_PER_MESSAGE:
        raise RaftCodecError(f"{_where(raw)}: {len(raw_entries)} entries, more than {MAX_ENTRIES_PER_MESSAGE}")
    expected_base = raw.prev_last_offset + 1
    message_term = raw.term
    entries = []
    for e in raw_entries:
        base_offset, last_offset, term = e.base_offset, e.last_offset, e.term
        if base_offset != expected_base or not base_offset <= last_offset <= MAX_OFFSET:
            raise RaftCodecError(f"{_where(raw)}: entry {base_offset}..{last_offset} does not follow offset "
                                 f"{expected_base - 1}")
        if not 0 < term <= message_term:
            raise RaftCodecError(f"{_where(raw)}: entry at {base_offset} has term {term}, message term "
                                 f"{message_term}")
        kind = WIRE_TO_ENTRY_KIND.get(e.kind)
        if kind is None:
            raise RaftCodecError(f"unknown Raft entry kind {e.kind} at offset {base_offset}")
        payload = e.payload
        if kind is EntryKind.DATA:
            _check_batch(raw, payload, base_offset, last_offset)
        elif kind is EntryKind.CONFIG:
            _check_membership(raw, payload, base_offset)
        entries.append(Entry(base_offset, last_offset, term, kind, payload))
        expected_base = last_offset + 1
    return tuple(entries)


def _check_batch(raw: pb.RaftMessage, payload: bytes, base_offset: int, last_offset: int) -> None:
    """A DATA entry is one whole record batch covering exactly the entry's offsets (CRC checked in C)."""
    try:
        header = rec.validate_batch(payload)
    except rec.CorruptBatchError as exc:
        raise RaftCodecError(f"{_where(raw)}: entry at {base_offset} is not a valid record batch: {exc}") from None
    if header.size != len(payload) or header.last_offset_delta != last_offset - base_offset:
        raise RaftCodecError(f"{_where(raw)}: entry {base_offset}..{last_offset} holds a batch of "
                             f"{header.last_offset_delta + 1} offsets in {header.size} of {len(payload)} bytes")


def _check_membership(raw: pb.RaftMessage, payload: bytes, base_offset: int) -> None:
    """A CONFIG entry's payload is a membership with at least one voter (the core decodes it on append, where a
    failure would leave the entry written and the replica unable to open its log again)."""
    try:
        Membership.decode(payload)  # checks itself: at least one voter, none also a learner
    except (ValueError, KeyError, UnicodeDecodeError, RaftInternalError) as exc:
        raise RaftCodecError(f"{_where(raw)}: CONFIG entry at {base_offset} is not a membership: {exc}") from None


def encode_message(group: str, m: Message) -> pb.RaftMessage:
    """The protobuf form of ``m`` tagged with its Raft group."""
    out = pb.RaftMessage()
    encode_message_into(out, group, m)
    return out


def encode_message_into(out: pb.RaftMessage, group: str, m: Message) -> None:
    """Fill the empty ``out`` (say, envelope.messages.add()) with ``m``. Built in place because protobuf copies
    a message it is handed whole: appending an encoded message, or extending with encoded entries, copies
    every payload byte again (three copies of each batch per follower instead of one)."""
    out.group = group
    out.type = MESSAGE_TYPE_TO_WIRE[m.type]
    out.from_node = m.from_node
    out.to_node = m.to_node
    out.term = m.term
    out.prev_last_offset = m.prev_last_offset
    out.prev_term = m.prev_term
    out.commit_offset = m.commit_offset
    out.match_offset = m.match_offset
    out.reject = m.reject
    out.reject_hint_offset = m.reject_hint_offset
    out.reject_hint_term = m.reject_hint_term
    out.last_log_offset = m.last_log_offset
    out.last_log_term = m.last_log_term
    out.leadership_transfer = m.leadership_transfer
    out.log_start_offset = m.log_start_offset
    add_entry = out.entries.add
    for e in m.entries:
        add_entry(base_offset=e.base_offset, last_offset=e.last_offset, term=e.term,
                  kind=ENTRY_KIND_TO_WIRE[e.kind], payload=e.payload)
    if m.membership is not None:
        # The flag is needed because proto3 cannot tell an empty bytes field from an absent one.
        out.membership = m.membership.encode()
        out.has_membership = True


def decode_message(raw: pb.RaftMessage, from_node: int | None = None,
                   to_node: int | None = None) -> tuple[str, Message]:
    """The (group, Message) carried by ``raw``; raises RaftCodecError on anything a Message cannot hold.

    Every field is checked against what a correct peer can send (terms fit a batch's 32-bit epoch, offsets
    are not below -1, entries are contiguous whole batches), so a forged or damaged message is refused here
    instead of poisoning a partition. ``from_node`` / ``to_node``, when given, are the envelope's: a message
    must not claim another sender or receiver than the stream it came on."""
    message_type = WIRE_TO_MESSAGE_TYPE.get(raw.type)
    if message_type is None:
        raise RaftCodecError(f"unknown Raft message type {raw.type} (group {raw.group!r}, from {raw.from_node})")
    _check_fields(raw, from_node, to_node)
    try:
        message = Message(
            type=message_type,
            from_node=raw.from_node,
            to_node=raw.to_node,
            term=raw.term,
            prev_last_offset=raw.prev_last_offset,
            prev_term=raw.prev_term,
            entries=_decode_entries(raw) if raw.entries else (),
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


def _decode_membership(raw: pb.RaftMessage) -> Membership | None:
    if not raw.has_membership:
        return None
    return Membership.decode(raw.membership)
