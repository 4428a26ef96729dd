"""The share-group checker: what the workers saw, what the producer was told and what the dead-letter
topic holds must agree with a queue's promises.

Inputs:
- the events of every worker (tests/support/share_worker.py writes them; ``load_events`` reads the files),
- the produced records: (partition, offset) -> value for every record the producer saw acknowledged,
- the dead letters: the group's dead-letter topic as read back (``read_dead_letters``),
- the rules: group, topic, lock duration and delivery limit.

Times: lock deadlines are the leader's wall clock; sent_ms / received_ms are the worker's, on the same
host. The broker acquires a record at deadline - lock duration, which must lie between the sending of the
fetch and its answer (it is clamped there). An acknowledgement took effect somewhere between its request's
sending and its answer.

``check`` returns the violations, each "kind: detail" (empty when all holds):

  overlap            a record acquired while another acquisition still held its lock (the lock had not
                     expired, and its holder had not released or acknowledged it before it was sent)
  redelivered        a record acquired after an accept or reject of it was confirmed
  ack-not-held       an ack confirmed for a record the member never acquired
  ack-after-expiry   an ack confirmed though it was sent after the member's lock deadline
  over-limit         a delivery count above the limit (in an acquisition or a dead letter's header)
  count-order        a record's delivery counts not strictly increasing from one acquisition to the next
  no-data            an acquired record missing from the answer's batches
  wrong-value        an acquired or dead-lettered record whose value is not the one produced at its offset
  lost               a produced record never accepted nor dead-lettered (a rejected one never dead-lettered)
  dlq-duplicate      a source record in the dead-letter topic more than once
  dlq-headers        a dead letter without its lb.dlq.* headers, or with unreadable ones
  dlq-accepted       a record dead-lettered though an accept of it was confirmed
  dlq-no-cause       a dead letter below the delivery limit that nobody rejected
  dlq-stale-count    a dead letter whose delivery count is below one the workers saw
  protocol           an answer that does not match its request (ack results missing)

An ack whose outcome is unknown (its request failed, the retry was refused) settles a record for "lost"
(it was processed, and the first attempt may have been applied) but proves nothing else; ``summarize``
counts them.
"""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from logbroker_client import records as rec
from logbroker_client.proto import logbroker_pb2 as pb

from tests.support.share_worker import VALUE_CHARS, Brokers

DLQ_HEADERS = ("lb.dlq.topic", "lb.dlq.partition", "lb.dlq.offset", "lb.dlq.delivery.count", "lb.dlq.group",
               "lb.dlq.reason")
SETTLING = {"accepted", "released", "rejected"}
MAX_VIOLATIONS_SHOWN = 20
READ_TIMEOUT_S = 60.0

Key = tuple[int, int]  # (partition, offset)


@dataclass(frozen=True)
class ShareRules:
    group: str
    topic: str
    lock_ms: int
    delivery_limit: int


@dataclass(frozen=True)
class Acquisition:
    member: str
    partition: int
    offset: int
    delivery_count: int
    deadline_ms: int
    sent_ms: int
    received_ms: int
    value: str | None

    def acquired_ms(self, lock_ms: int) -> int:
        """When the broker acquired it: deadline - lock, kept within the fetch's round trip."""
        return min(max(self.deadline_ms - lock_ms, self.sent_ms), self.received_ms)


@dataclass(frozen=True)
class AckEvent:
    """One offset of an ack range: outcome is ok (confirmed), error (refused) or unknown."""

    member: str
    partition: int
    offset: int
    kind: str  # accepted, released, rejected, renewed
    outcome: str
    sent_ms: int
    received_ms: int


@dataclass(frozen=True)
class DeadLetter:
    dlq_partition: int
    dlq_offset: int
    headers: Mapping[str, str]
    value: str | None

    def source(self) -> tuple[str, int, int] | None:
        """(topic, partition, offset) named by its headers; None when they are missing or unreadable."""
        try:
            headers = self.headers
            return headers["lb.dlq.topic"], int(headers["lb.dlq.partition"]), int(headers["lb.dlq.offset"])
        except (KeyError, ValueError):
            return None

    def delivery_count(self) -> int | None:
        try:
            return int(self.headers["lb.dlq.delivery.count"])
        except (KeyError, ValueError):
            return None


@dataclass
class History:
    """The events of one group on one topic, indexed by record."""

    acquisitions: dict[Key, list[Acquisition]] = field(default_factory=lambda: defaultdict(list))
    acks: dict[Key, list[AckEvent]] = field(default_factory=lambda: defaultdict(list))
    protocol_errors: list[str] = field(default_factory=list)


# ------------------------------------------------------------------------------------ reading events


def load_events(paths: Iterable[Path]) -> list[dict[str, Any]]:
    """Every event of every file; a torn last line (a SIGKILLed writer) is skipped."""
    events = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            try:
                events.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return events


def build_history(events: Iterable[Mapping[str, Any]], rules: ShareRules) -> History:
    history = History()
    for event in events:
        if event.get("group") != rules.group or event.get("topic") != rules.topic:
            continue
        kind = event["event"]
        if kind == "acquired":
            _add_acquisition(history, event)
        elif kind in SETTLING or kind == "renewed":
            _add_acks(history, event, kind, "ok")
        elif kind in ("ack_error", "ack_unknown"):
            _add_acks(history, event, event["ack_type"], "error" if kind == "ack_error" else "unknown")
            if event.get("error") == "NO_RESULT":
                history.protocol_errors.append(f"protocol: member {event['member']} got no result for its ack of "
                                               f"{event['partition']}/{event['first_offset']}..{event['last_offset']}")
    for items in history.acquisitions.values():
        items.sort(key=lambda a: (a.deadline_ms, a.received_ms))
    return history


def _add_acquisition(history: History, event: Mapping[str, Any]) -> None:
    history.acquisitions[(event["partition"], event["offset"])].append(Acquisition(
        event["member"], event["partition"], event["offset"], event["delivery_count"], event["lock_deadline_ms"],
        event["sent_ms"], event["received_ms"], event.get("value")))


def _add_acks(history: History, event: Mapping[str, Any], kind: str, outcome: str) -> None:
    for offset in range(event["first_offset"], event["last_offset"] + 1):
        history.acks[(event["partition"], offset)].append(AckEvent(
            event["member"], event["partition"], offset, kind, outcome, event["sent_ms"], event["received_ms"]))


# ---------------------------------------------------------------------------------------- the rules


def check(events: Iterable[Mapping[str, Any]], produced: Mapping[Key, bytes], dead_letters: Sequence[DeadLetter],
          rules: ShareRules) -> list[str]:
    """Every violation of the share-group promises (see the module's doc)."""
    history = build_history(events, rules)
    return [*history.protocol_errors, *check_single_holder(history, rules), *check_finished_not_redelivered(history),
            *check_acks_held(history, rules), *check_delivery_counts(history, rules),
            *check_values(history, produced), *check_dead_letters(history, produced, dead_letters, rules),
            *check_not_lost(history, produced, dead_letters, rules)]


def lock_end_ms(acquisition: Acquisition, acks: Sequence[AckEvent], lock_ms: int) -> int:
    """The earliest moment the holder's claim on the record can have ended: its deadline (pushed by confirmed
    renewals), or the sending of an accept, release or reject that was not refused."""
    end = acquisition.deadline_ms
    for ack in acks:
        if ack.member != acquisition.member or ack.sent_ms < acquisition.received_ms or ack.outcome == "error":
            continue
        if ack.kind == "renewed":
            end = max(end, ack.sent_ms + lock_ms) if ack.outcome == "ok" else end
        else:
            end = min(end, ack.sent_ms)
    return end


def check_single_holder(history: History, rules: ShareRules) -> list[str]:
    violations = []
    for key, items in sorted(history.acquisitions.items()):
        acks = history.acks.get(key, [])
        for index, later in enumerate(items):
            at_ms = later.acquired_ms(rules.lock_ms)
            for earlier in items[:index]:
                end_ms = lock_end_ms(earlier, acks, rules.lock_ms)
                if at_ms < end_ms:
                    violations.append(f"overlap: {key[0]}/{key[1]} acquired by {later.member} at {at_ms} while "
                                      f"{earlier.member} held it until {end_ms} (deadline {earlier.deadline_ms})")
    return violations


def check_finished_not_redelivered(history: History) -> list[str]:
    violations = []
    for key, acks in sorted(history.acks.items()):
        finished = [a for a in acks if a.outcome == "ok" and a.kind in ("accepted", "rejected")]
        if not finished:
            continue
        done_ms = min(a.received_ms for a in finished)
        for item in history.acquisitions.get(key, []):
            if item.sent_ms > done_ms:  # its fetch left after the accept or reject was answered
                violations.append(f"redelivered: {key[0]}/{key[1]} acquired by {item.member} (fetch sent at "
                                  f"{item.sent_ms}, delivery {item.delivery_count}) after it was "
                                  f"{finished[0].kind} at {done_ms}")
    return violations


def check_acks_held(history: History, rules: ShareRules) -> list[str]:
    violations = []
    for key, acks in sorted(history.acks.items()):
        for ack in acks:
            if ack.outcome != "ok":
                continue
            held = [a for a in history.acquisitions.get(key, [])
                    if a.member == ack.member and a.received_ms <= ack.sent_ms]
            if not held:
                violations.append(f"ack-not-held: {key[0]}/{key[1]} {ack.kind} by {ack.member}, who never acquired it")
                continue
            deadline_ms = _latest_deadline_ms(held[-1], acks, ack, rules.lock_ms)
            if ack.sent_ms >= deadline_ms:
                violations.append(f"ack-after-expiry: {key[0]}/{key[1]} {ack.kind} by {ack.member} sent at "
                                  f"{ack.sent_ms}, after its lock deadline {deadline_ms}, was confirmed")
    return violations


def _latest_deadline_ms(acquisition: Acquisition, acks: Sequence[AckEvent], ack: AckEvent, lock_ms: int) -> int:
    """The latest the lock can have lasted for this ack: the deadline, or later by a confirmed renewal
    (which set it to its own moment plus the lock duration, at most its answer's time plus that)."""
    deadline_ms = acquisition.deadline_ms
    for other in acks:
        if (other.kind == "renewed" and other.outcome != "error" and other.member == ack.member
                and acquisition.received_ms <= other.sent_ms < ack.sent_ms):
            deadline_ms = max(deadline_ms, other.received_ms + lock_ms)
    return deadline_ms


def check_delivery_counts(history: History, rules: ShareRules) -> list[str]:
    violations = []
    for key, items in sorted(history.acquisitions.items()):
        for item in items:
            if not 1 <= item.delivery_count <= rules.delivery_limit:
                violations.append(f"over-limit: {key[0]}/{key[1]} delivered to {item.member} with delivery count "
                                  f"{item.delivery_count} (limit {rules.delivery_limit})")
        for earlier, later in zip(items, items[1:], strict=False):
            if later.delivery_count <= earlier.delivery_count:
                violations.append(f"count-order: {key[0]}/{key[1]} delivery count {later.delivery_count} "
                                  f"({later.member}) after {earlier.delivery_count} ({earlier.member})")
    return violations


def check_values(history: History, produced: Mapping[Key, bytes]) -> list[str]:
    violations = []
    for key, items in sorted(history.acquisitions.items()):
        for item in items:
            if item.value is None:
                violations.append(f"no-data: {key[0]}/{key[1]} acquired by {item.member} is not in the answer's "
                                  "batches")
            elif key in produced and item.value != _head(produced[key]):
                violations.append(f"wrong-value: {key[0]}/{key[1]} delivered as {item.value!r}, produced as "
                                  f"{_head(produced[key])!r}")
    return violations


def check_dead_letters(history: History, produced: Mapping[Key, bytes], dead_letters: Sequence[DeadLetter],
                       rules: ShareRules) -> list[str]:
    violations = []
    copies: Counter[Key] = Counter()
    for letter in dead_letters:
        source = letter.source()
        if source is None or any(name not in letter.headers for name in DLQ_HEADERS):
            violations.append(f"dlq-headers: dead letter at {letter.dlq_partition}/{letter.dlq_offset} has headers "
                              f"{dict(letter.headers)}")
            continue
        topic, partition, offset = source
        if topic != rules.topic or letter.headers["lb.dlq.group"] != rules.group:
            continue
        copies[(partition, offset)] += 1
        violations += _check_dead_letter(history, produced, letter, (partition, offset), rules)
    violations += [f"dlq-duplicate: {key[0]}/{key[1]} is in the dead-letter topic {count} times"
                   for key, count in sorted(copies.items()) if count > 1]
    return violations


def _check_dead_letter(history: History, produced: Mapping[Key, bytes], letter: DeadLetter, key: Key,
                       rules: ShareRules) -> list[str]:
    where = f"{key[0]}/{key[1]} (dead letter {letter.dlq_partition}/{letter.dlq_offset})"
    count = letter.delivery_count()
    acks = history.acks.get(key, [])
    seen = [a.delivery_count for a in history.acquisitions.get(key, [])]
    violations = []
    if count is None:
        return [f"dlq-headers: {where} has delivery count {letter.headers.get('lb.dlq.delivery.count')!r}"]
    if count > rules.delivery_limit:
        violations.append(f"over-limit: {where} dead-lettered with delivery count {count} "
                          f"(limit {rules.delivery_limit})")
    if seen and count < max(seen):
        violations.append(f"dlq-stale-count: {where} says {count} deliveries, the workers saw {max(seen)}")
    if any(a.kind == "accepted" and a.outcome == "ok" for a in acks):
        violations.append(f"dlq-accepted: {where} was dead-lettered after an accept was confirmed")
    if count < rules.delivery_limit and not any(a.kind == "rejected" and a.outcome != "error" for a in acks):
        violations.append(f"dlq-no-cause: {where} dead-lettered at delivery {count} of {rules.delivery_limit} "
                          f"without a reject (reason {letter.headers.get('lb.dlq.reason')!r})")
    if key in produced and letter.value != _head(produced[key]):
        violations.append(f"wrong-value: {where} holds {letter.value!r}, produced as {_head(produced[key])!r}")
    return violations


def check_not_lost(history: History, produced: Mapping[Key, bytes], dead_letters: Sequence[DeadLetter],
                   rules: ShareRules) -> list[str]:
    dead = _dead_lettered(dead_letters, rules)
    violations = []
    for key in sorted(produced):
        if key in dead:
            continue
        acks = history.acks.get(key, [])
        if any(a.kind == "accepted" and a.outcome in ("ok", "unknown") for a in acks):
            continue
        if any(a.kind == "rejected" and a.outcome == "ok" for a in acks):
            violations.append(f"lost: {key[0]}/{key[1]} was rejected but is not in the dead-letter topic")
        else:
            tries = len(history.acquisitions.get(key, []))
            violations.append(f"lost: {key[0]}/{key[1]} ({_head(produced[key])!r}) was never accepted nor "
                              f"dead-lettered ({tries} acquisitions)")
    return violations


def _dead_lettered(dead_letters: Sequence[DeadLetter], rules: ShareRules) -> set[Key]:
    out = set()
    for letter in dead_letters:
        source = letter.source()
        if source is not None and source[0] == rules.topic and letter.headers.get("lb.dlq.group") == rules.group:
            out.add((source[1], source[2]))
    return out


def _head(value: bytes) -> str:
    return value[:VALUE_CHARS].decode("latin-1")


# ------------------------------------------------------------------------------------------ reporting


@dataclass(frozen=True)
class Summary:
    acquisitions: int
    redeliveries: int  # acquisitions with a delivery count above 1
    records_accepted: int
    records_rejected: int
    acks_refused: int
    acks_unknown: int
    dead_letters: int
    by_member: Mapping[str, int]  # acquisitions per member


def summarize(events: Iterable[Mapping[str, Any]], dead_letters: Sequence[DeadLetter], rules: ShareRules) -> Summary:
    history = build_history(events, rules)
    items = [a for group in history.acquisitions.values() for a in group]
    acks = [a for group in history.acks.values() for a in group]
    return Summary(len(items), sum(1 for a in items if a.delivery_count > 1),
                   sum(1 for a in acks if a.kind == "accepted" and a.outcome == "ok"),
                   sum(1 for a in acks if a.kind == "rejected" and a.outcome == "ok"),
                   sum(1 for a in acks if a.outcome == "error"), sum(1 for a in acks if a.outcome == "unknown"),
                   len(_dead_lettered(dead_letters, rules)), dict(Counter(a.member for a in items)))


def describe_violations(violations: Sequence[str], limit: int = MAX_VIOLATIONS_SHOWN) -> str:
    kinds = Counter(v.split(":", 1)[0] for v in violations)
    shown = "\n  ".join(violations[:limit])
    more = f"\n  ... and {len(violations) - limit} more" if len(violations) > limit else ""
    return f"{len(violations)} violation(s) {dict(kinds)}:\n  {shown}{more}"


def assert_clean(events: Sequence[Mapping[str, Any]], produced: Mapping[Key, bytes],
                 dead_letters: Sequence[DeadLetter], rules: ShareRules, context: str = "") -> Summary:
    violations = check(events, produced, dead_letters, rules)
    assert not violations, f"{context}{describe_violations(violations)}"
    return summarize(events, dead_letters, rules)


def produced_by_offset(acked: Mapping[bytes, tuple[int, int]]) -> dict[Key, bytes]:
    """An AckLog's value -> (partition, offset) turned around."""
    return {place: value for value, place in acked.items()}


# ----------------------------------------------------------------------------------- the dead letters


def read_dead_letters(bootstrap: Sequence[str], dlq_topic: str, timeout_s: float = READ_TIMEOUT_S) -> list[DeadLetter]:
    """Every record of the dead-letter topic (none if it was never created), read with raw Fetch calls from
    each partition's leader up to its high watermark, following leader moves."""
    brokers = Brokers(bootstrap)
    deadline = time.monotonic() + timeout_s
    try:
        described = brokers.metadata(dlq_topic)
        if described is None:
            return []
        return [letter for part in described.partitions
                for letter in _read_partition(brokers, dlq_topic, part.partition, deadline)]
    finally:
        brokers.close()


def _read_partition(brokers: Brokers, topic: str, partition: int, deadline: float) -> list[DeadLetter]:
    letters: list[DeadLetter] = []
    position = 0
    while time.monotonic() < deadline:
        answer = _fetch(brokers, topic, partition, position)
        if answer is None:
            time.sleep(0.1)
            continue
        for header, records in rec.iter_batches(answer.records):
            letters += [_dead_letter(partition, r) for r in records if r.offset >= position]
            position = max(position, header.last_offset + 1)
        if position >= answer.high_watermark:
            return letters
    raise AssertionError(f"could not read {topic}-{partition} to its end in time (at offset {position})")


def _fetch(brokers: Brokers, topic: str, partition: int, position: int) -> pb.PartitionFetchResult | None:
    leader = brokers.leader(topic, partition)
    if leader is None:
        return None
    request = pb.FetchRequest(max_wait_ms=0, max_bytes=4 << 20, partitions=[
        pb.FetchPartition(topic=topic, partition=partition, fetch_offset=position, partition_max_bytes=4 << 20)])
    try:
        result = brokers.broker(leader).Fetch(request, timeout=5).results[0]
    except grpc.RpcError:
        brokers.forget_address(leader)
        return None
    if result.error_code:
        brokers.moved(topic, partition, result.leader.leader_address)
        return None
    return result


def _dead_letter(partition: int, record: rec.Record) -> DeadLetter:
    headers = {name: (value or b"").decode("utf-8", "replace") for name, value in record.headers}
    return DeadLetter(partition, record.offset, headers,
                      None if record.value is None else record.value[:VALUE_CHARS].decode("latin-1"))
