"""The consumer-group checker: Kafka's verifiable-consumer invariants over what the members wrote down.

Inputs:
- the events of every member (tests/support/group_member_process.py writes them, ``load_events`` reads
  the files): assigned / revoked / lost with their partitions and times, every record consumed (partition,
  offset, sequence number), every commit (offsets, when sent and answered, whether it succeeded);
- optionally the events of a ``GroupObserver`` (the group's committed offsets and owners as the coordinator
  describes them, now and then) and ``reset`` events (an explicit reset of committed offsets);
- optionally ``acked``: value -> (partition, offset) of every acknowledged record (``AckLog.snapshot()``);
- optionally ``log``: partition -> the data records the topic holds (``checker.read_log``). With it the rules
  that compare offsets know which offsets hold records: a position may pass offsets that hold none (a
  leader's no-op batch), and passing those is not skipping anything.

An owner is one run of a member process (member name and incarnation). It owns a partition from its
``assigned`` event to its next ``revoked`` or ``lost`` event naming the partition, or to its ``closed`` event;
an owner whose events end while it holds partitions (it was SIGKILLed) holds them until its last event.
A member process writes its events from one thread, in order, so "while it owns" is exact in file order;
times (the host's wall clock, microseconds) compare events of different processes.

``check`` returns the violations, each "kind: detail" (empty when every rule holds):

  not-owned         a member consumed a record of a partition it did not own (before its assigned, or after
                    its revoked or lost: records of a revoked partition must never come out of poll() after
                    on_revoked, and none of a lost one after on_lost)
  overlap           two owners of one partition at once: their ownership intervals overlap in time. An
                    interval ends at its revoked (or closed) event; one that ended in ``lost`` (fenced) or
                    with the process's death ends at the last sign of ownership the member gave: its last
                    poll that returned records of the partition (the instant the client confirmed its session
                    before handing them out, owned_at_us when the member reports it: a process paused after
                    that check hands them out later, which no client can prevent), or the sending of its last
                    successful commit of it (it may have been fenced long before it was told, while it was
                    stopped, and a fenced member that does nothing does no harm; one that still consumes does)
  commit-not-owned  a successful commit of a partition the member did not own at the time
  commit-ahead      a successful commit beyond what the member had polled of the partition in its current
                    ownership (beyond its start position when it had polled nothing): with the log, an offset
                    holding a record lies between what it polled and what it committed; without, the commit
                    is above the polled position. Also a committed offset the coordinator showed (observer) or
                    a member started from, with a record below it that no member had consumed by then
  backwards         a committed offset below one that was committed (or shown) before it, with no reset
                    in between ("before": the earlier one was answered before the later one was sent)
  skipped           within one ownership, a member's records do not follow each other in the log: it skipped
                    a record, or its first record is not the first at or after its start position (needs log)
  order             within one ownership, a record at or below one the member already had
  lost              an acknowledged record no member consumed (at-least-once)
  wrong-value       a consumed record whose sequence number is not the one acknowledged at its offset
  coordinator-overlap  the coordinator showed one partition owned by two members at once (observer)
  protocol          events that contradict themselves: a partition assigned twice, or revoked or lost when
                    not owned, or an event without the fields it needs

``GroupHistory`` (``replay(events, log)``) is what the rules are computed from, for scenarios that want
more: each owner's intervals, when each partition was taken, how often records were consumed again.
"""

from __future__ import annotations

import bisect
import contextlib
import json
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from logbroker_client import Admin
from logbroker_client.errors import LogbrokerError

from tests.support.checker import Stored, sequence_of

MAX_VIOLATIONS_SHOWN = 20
OBSERVER = "observer"
ENDS_AT_EVENT = ("revoked", "closed")  # intervals that end exactly at their event; lost and died end at evidence
NEVER = float("inf")

Event = dict[str, Any]


def now_us() -> int:
    return time.time_ns() // 1000


# -------------------------------------------------------------------------------------------- inputs


def load_events(paths: Iterable[Path]) -> list[Event]:
    """The events of every file, file after file, each file in its order; a torn last line is skipped."""
    events: list[Event] = []
    for path in paths:
        if not path.exists():
            continue
        for line in path.read_text(encoding="utf-8").splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                events.append(json.loads(line))
    return events


def data_offsets(log: Mapping[int, Sequence[Stored]]) -> dict[int, list[int]]:
    """partition -> the sorted offsets that hold a data record."""
    return {partition: sorted(record.offset for record in records) for partition, records in log.items()}


# ---------------------------------------------------------------------------------------------- model


@dataclass
class Interval:
    """One owner's hold on one partition."""

    owner: str
    partition: int
    start_us: int
    start_position: int | None
    end_us: int | None = None  # the event that ended it (None: the owner's events stop while it holds it)
    ended_by: str = "died"  # revoked, closed, lost, died
    last_evidence_us: int = 0  # the last poll that returned its records, or the last successful commit's sending
    last_polled: int | None = None  # the highest offset polled in this interval
    records: int = 0

    def effective_end_us(self) -> float:
        if self.ended_by in ENDS_AT_EVENT:
            assert self.end_us is not None
            return self.end_us
        return max(self.start_us, self.last_evidence_us)


@dataclass(frozen=True)
class Fact:
    """A committed offset that held at some moment between sent_us and received_us."""

    partition: int
    offset: int
    sent_us: int
    received_us: int
    source: str


@dataclass
class GroupHistory:
    t0_us: int = 0  # the first event's time: violations show times relative to it
    intervals: list[Interval] = field(default_factory=list)
    facts: list[Fact] = field(default_factory=list)  # successful commits and observed committed offsets
    resets: list[Fact] = field(default_factory=list)
    starts: list[Fact] = field(default_factory=list)  # start positions of ownerships, at their assigned event
    first_consumed_us: dict[tuple[int, int], int] = field(default_factory=dict)  # (partition, offset) -> time
    consumed_seq: dict[tuple[int, int], int] = field(default_factory=dict)
    observations: list[Event] = field(default_factory=list)
    counts: Counter[str] = field(default_factory=Counter)
    violations: list[str] = field(default_factory=list)

    def at(self, t_us: float) -> str:
        return "never" if t_us == NEVER else f"+{(t_us - self.t0_us) / 1e6:.3f}s"

    def owners(self) -> list[str]:
        return sorted({i.owner for i in self.intervals})

    def intervals_of(self, partition: int) -> list[Interval]:
        return sorted((i for i in self.intervals if i.partition == partition), key=lambda i: i.start_us)


def owner_of(event: Event) -> str:
    return f"{event.get('member', '?')}#{event.get('incarnation', '?')}"


def _has_record_in(offsets: Sequence[int] | None, low: int, high: int) -> int | None:
    """The first offset holding a record in [low, high), if any (offsets sorted)."""
    if offsets is None or low >= high:
        return None
    index = bisect.bisect_left(offsets, low)
    return offsets[index] if index < len(offsets) and offsets[index] < high else None


class _OwnerReplay:
    """One owner's events in order: its intervals, and the rules that need only its own history."""

    def __init__(self, owner: str, history: GroupHistory, offsets: Mapping[int, list[int]] | None) -> None:
        self.owner = owner
        self.history = history
        self.offsets = offsets
        self.open: dict[int, Interval] = {}
        self.last_us = 0
        self.closed_by: dict[int, Interval] = {}  # the last interval of each partition, for messages

    def violation(self, text: str) -> None:
        self.history.violations.append(text)

    def apply(self, event: Event) -> None:
        kind = event.get("event")
        t = int(event.get("t_us", 0))
        self.last_us = max(self.last_us, t)
        try:
            if kind == "assigned":
                self._assigned(event, t)
            elif kind in ("revoked", "lost"):
                for partition in event["partitions"]:
                    self._end(int(partition), t, kind)
            elif kind == "consumed":
                self._consumed(event, t)
            elif kind == "commit":
                self._commit(event, t)
            elif kind == "closed":
                for partition in list(self.open):
                    self._end(partition, t, "closed")
        except (KeyError, TypeError, ValueError) as exc:
            self.violation(f"protocol: {self.owner}: unreadable {kind} event ({exc!r}): {event}")

    def finish(self) -> None:
        """The owner's events end while it holds these: it died holding them."""
        for partition in list(self.open):
            interval = self.open.pop(partition)
            self.history.intervals.append(interval)

    def _assigned(self, event: Event, t: int) -> None:
        positions = {int(p): (None if o is None else int(o)) for p, o in event.get("positions", [])}
        for raw in event["partitions"]:
            partition = int(raw)
            if partition in self.open:
                self.violation(f"protocol: {self.owner} was assigned partition {partition} at "
                               f"{self.history.at(t)} while it already owned it")
                continue
            start = positions.get(partition)
            self.open[partition] = Interval(self.owner, partition, t, start, last_evidence_us=t)
            if start is not None:
                self.history.starts.append(Fact(partition, start, t, t, f"{self.owner} started from it"))

    def _end(self, partition: int, t: int, how: str) -> None:
        interval = self.open.pop(partition, None)
        if interval is None:
            if how != "closed":
                self.violation(f"protocol: {self.owner} was told partition {partition} was {how} at "
                               f"{self.history.at(t)} but did not own it")
            return
        interval.end_us, interval.ended_by = t, how
        self.history.intervals.append(interval)
        self.closed_by[partition] = interval

    def _not_owned_detail(self, partition: int) -> str:
        last = self.closed_by.get(partition)
        if last is None:
            return "it had never been assigned it"
        return f"it was {last.ended_by} at {self.history.at(last.end_us or 0)}"

    def _consumed(self, event: Event, t: int) -> None:
        history = self.history
        for raw_partition, raw_offset, raw_seq in event["records"]:
            partition, offset, seq = int(raw_partition), int(raw_offset), int(raw_seq)
            history.counts["records consumed"] += 1
            key = (partition, offset)
            if key in history.first_consumed_us:
                history.counts["records consumed again"] += 1
                history.first_consumed_us[key] = min(history.first_consumed_us[key], t)
            else:
                history.first_consumed_us[key] = t
                history.consumed_seq[key] = seq
            interval = self.open.get(partition)
            if interval is None:
                self.violation(f"not-owned: {self.owner} consumed {partition}/{offset} at {history.at(t)} without "
                               f"owning partition {partition} ({self._not_owned_detail(partition)})")
                continue
            self._follows(interval, offset, t)
            interval.last_polled = offset if interval.last_polled is None else max(interval.last_polled, offset)
            interval.last_evidence_us = max(interval.last_evidence_us, int(event.get("owned_at_us", t)))
            interval.records += 1

    def _follows(self, interval: Interval, offset: int, t: int) -> None:
        """The record comes right after the previous one of this ownership (or at its start position)."""
        offsets = None if self.offsets is None else self.offsets.get(interval.partition, [])
        where = f"{self.owner} on partition {interval.partition} at {self.history.at(t)}"
        previous = interval.last_polled
        if previous is not None:
            if offset <= previous:
                self.violation(f"order: {where}: offset {offset} after offset {previous} in one ownership")
                return
            missed = _has_record_in(offsets, previous + 1, offset)
            if missed is not None:
                self.violation(f"skipped: {where}: offset {offset} right after {previous}, past the record at {missed}")
            return
        start = interval.start_position
        if start is None:
            return
        if offset < start:
            self.violation(f"order: {where}: first offset {offset} is below its start position {start}")
            return
        missed = _has_record_in(offsets, start, offset)
        if missed is not None:
            self.violation(f"skipped: {where}: first offset {offset} though it started at {start} and the log "
                           f"holds a record at {missed}")

    def _commit(self, event: Event, t: int) -> None:
        ok = bool(event["ok"])
        self.history.counts["commits ok" if ok else "commits failed"] += 1
        if not ok:
            return
        sent = int(event.get("sent_us", t))
        for raw_partition, raw_offset in event["offsets"]:
            partition, offset = int(raw_partition), int(raw_offset)
            self.history.facts.append(Fact(partition, offset, sent, t, f"commit by {self.owner}"))
            interval = self.open.get(partition)
            if interval is None:
                self.violation(f"commit-not-owned: {self.owner} committed {offset} for partition {partition} at "
                               f"{self.history.at(t)} without owning it ({self._not_owned_detail(partition)})")
                continue
            interval.last_evidence_us = max(interval.last_evidence_us, sent)
            self._not_ahead(interval, offset, t)

    def _not_ahead(self, interval: Interval, offset: int, t: int) -> None:
        bounds = [b for b in (interval.start_position,
                              None if interval.last_polled is None else interval.last_polled + 1) if b is not None]
        if not bounds:
            return  # nothing polled and the start unknown: nothing to compare with
        polled = max(bounds)
        if offset <= polled:
            return
        if self.offsets is None:
            missed: int | None = polled
        else:
            missed = _has_record_in(self.offsets.get(interval.partition, []), polled, offset)
        if missed is not None:
            self.violation(f"commit-ahead: {self.owner} committed {offset} for partition {interval.partition} at "
                           f"{self.history.at(t)} but had polled it only up to {polled} (record at {missed} not "
                           "polled)")


def replay(events: Sequence[Event], log: Mapping[int, Sequence[Stored]] | None = None) -> GroupHistory:
    """Every owner's events in their order; observer and reset events as facts."""
    history = GroupHistory()
    times = [int(e["t_us"]) for e in events if isinstance(e.get("t_us"), int)]
    history.t0_us = min(times) if times else 0
    offsets = None if log is None else data_offsets(log)
    owners: dict[str, _OwnerReplay] = {}
    for event in events:
        kind = event.get("event")
        history.counts[f"{kind} events"] += 1
        if kind == "observed":
            history.observations.append(event)
            sent, received = int(event["sent_us"]), int(event["t_us"])
            for partition, offset in event.get("committed", []):
                history.facts.append(Fact(int(partition), int(offset), sent, received, "shown by the coordinator"))
            continue
        if kind == "reset":
            for partition, offset in event["offsets"]:
                history.resets.append(Fact(int(partition), int(offset), int(event["sent_us"]), int(event["t_us"]),
                                           "reset"))
            continue
        owner = owner_of(event)
        if owner not in owners:
            owners[owner] = _OwnerReplay(owner, history, offsets)
        owners[owner].apply(event)
    for replayed in owners.values():
        replayed.finish()
    return history


# ----------------------------------------------------------------------------------- the group-wide rules


def check_overlaps(history: GroupHistory) -> list[str]:
    violations = []
    for partition in sorted({i.partition for i in history.intervals}):
        intervals = history.intervals_of(partition)
        for index, first in enumerate(intervals):
            first_end = first.effective_end_us()
            for second in intervals[index + 1:]:
                if second.start_us >= first_end:
                    break  # sorted by start: every later one starts after this one ended too
                if second.owner == first.owner:
                    continue
                violations.append(
                    f"overlap: partition {partition}: {first.owner} held it from {history.at(first.start_us)} to "
                    f"{history.at(first_end)} ({first.ended_by}), and {second.owner} from "
                    f"{history.at(second.start_us)} to {history.at(second.effective_end_us())} ({second.ended_by})")
    return violations


def check_backwards(history: GroupHistory) -> list[str]:
    """Committed offsets never move back: a fact below one known to hold before it, unless a reset came between."""
    violations = []
    by_partition: dict[int, list[Fact]] = defaultdict(list)
    for fact in history.facts:
        by_partition[fact.partition].append(fact)
    resets_of: dict[int, list[Fact]] = defaultdict(list)
    for reset in history.resets:
        resets_of[reset.partition].append(reset)
    for partition, facts in sorted(by_partition.items()):
        # One stream in the order things are known to be done (answered): facts raise the mark, a reset sets it.
        # A fact sent before the last reset was answered may have been applied before that reset: it raises
        # nothing (it is still held to the mark before it).
        done = sorted([(f.received_us, 0, f) for f in facts] + [(r.received_us, 1, r) for r in resets_of[partition]],
                      key=lambda item: (item[0], item[1]))
        mark: Fact | None = None
        reset_done_us = -1
        cursor = 0
        for later in sorted(facts, key=lambda f: f.sent_us):
            while cursor < len(done) and done[cursor][0] < later.sent_us:
                _, is_reset, fact = done[cursor]
                cursor += 1
                if is_reset:
                    mark, reset_done_us = fact, fact.received_us
                elif fact.sent_us > reset_done_us and (mark is None or fact.offset > mark.offset):
                    mark = fact
            if mark is not None and later.offset < mark.offset:
                earlier = (f"the reset to {mark.offset}" if mark.source == "reset"
                           else f"{mark.offset} ({mark.source})")
                violations.append(
                    f"backwards: partition {partition}: committed offset {later.offset} ({later.source}, "
                    f"{history.at(later.sent_us)}..{history.at(later.received_us)}) is below {earlier}, "
                    f"answered at {history.at(mark.received_us)}")
    return violations


def check_group_ahead(history: GroupHistory, log: Mapping[int, Sequence[Stored]]) -> list[str]:
    """A committed offset the coordinator showed, or that a member started from, with a record below it that no
    member had consumed by then: the group would never process that record."""
    violations = []
    offsets = data_offsets(log)
    floors: dict[int, list[Fact]] = defaultdict(list)
    for reset in history.resets:
        floors[reset.partition].append(reset)
    prefix_latest: dict[int, list[float]] = {}
    for partition, held in offsets.items():
        latest: list[float] = []
        running = 0.0
        for offset in held:
            running = max(running, history.first_consumed_us.get((partition, offset), NEVER))
            latest.append(running)
        prefix_latest[partition] = latest
    queries = [f for f in history.facts if f.source == "shown by the coordinator"] + history.starts
    for fact in queries:
        held = offsets.get(fact.partition, [])
        below = bisect.bisect_left(held, fact.offset)
        if below == 0 or prefix_latest[fact.partition][below - 1] <= fact.received_us:
            continue
        floor = max((r.offset for r in floors[fact.partition] if r.sent_us < fact.received_us), default=0)
        for offset in held[bisect.bisect_left(held, floor):below]:
            consumed = history.first_consumed_us.get((fact.partition, offset), NEVER)
            if consumed > fact.received_us:
                when = "never consumed" if consumed == NEVER else f"first consumed at {history.at(consumed)}"
                violations.append(f"commit-ahead: partition {fact.partition}: committed offset {fact.offset} "
                                  f"({fact.source} at {history.at(fact.received_us)}) though the record at "
                                  f"{offset} below it was {when}")
                break
    return violations


def check_at_least_once(history: GroupHistory, acked: Mapping[bytes, tuple[int, int]],
                        seq_of: Callable[[bytes], int] = sequence_of) -> list[str]:
    violations = []
    for value, (partition, offset) in sorted(acked.items(), key=lambda item: item[1]):
        seq = seq_of(value)
        if (partition, offset) not in history.first_consumed_us:
            violations.append(f"lost: the record at {partition}/{offset} (sequence {seq}), acknowledged to the "
                              "producer, was consumed by no member")
            continue
        seen = history.consumed_seq[(partition, offset)]
        if seen != seq:
            violations.append(f"wrong-value: {partition}/{offset} was consumed with sequence {seen}; the producer "
                              f"was acknowledged sequence {seq} there")
    return violations


def check_observed_owners(history: GroupHistory) -> list[str]:
    violations = []
    for event in history.observations:
        holders: dict[int, list[str]] = defaultdict(list)
        for member_id, partitions in event.get("owners", []):
            for partition in partitions:
                holders[int(partition)].append(str(member_id))
        for partition, members in sorted(holders.items()):
            if len(members) > 1:
                violations.append(f"coordinator-overlap: at {history.at(int(event['t_us']))} the coordinator showed "
                                  f"partition {partition} owned by {', '.join(members)}")
    return violations


def check(events: Sequence[Event], acked: Mapping[bytes, tuple[int, int]] | None = None,
          log: Mapping[int, Sequence[Stored]] | None = None) -> list[str]:
    """Every violation of the rules in the module's docstring (empty when all hold)."""
    history = replay(events, log)
    violations = list(history.violations)
    violations += check_overlaps(history)
    violations += check_backwards(history)
    if log is not None:
        violations += check_group_ahead(history, log)
    if acked is not None:
        violations += check_at_least_once(history, acked)
    violations += check_observed_owners(history)
    return violations


def summarize(events: Sequence[Event], log: Mapping[int, Sequence[Stored]] | None = None) -> dict[str, Any]:
    history = replay(events, log)
    ended = Counter(i.ended_by for i in history.intervals)
    return {"owners": len(history.owners()), "ownerships": len(history.intervals), "ended": dict(ended),
            "records consumed": history.counts["records consumed"],
            "distinct records": len(history.first_consumed_us),
            "consumed again": history.counts["records consumed again"],
            "commits ok": history.counts["commits ok"], "commits failed": history.counts["commits failed"],
            "observations": len(history.observations)}


def describe_violations(violations: Sequence[str], limit: int = MAX_VIOLATIONS_SHOWN) -> str:
    kinds = Counter(v.split(":", 1)[0] for v in violations)
    shown = "\n  ".join(violations[:limit])
    more = f"\n  ... and {len(violations) - limit} more" if len(violations) > limit else ""
    return f"{len(violations)} violation(s) {dict(kinds)}:\n  {shown}{more}"


def assert_clean(events: Sequence[Event], acked: Mapping[bytes, tuple[int, int]] | None = None,
                 log: Mapping[int, Sequence[Stored]] | None = None, context: str = "") -> None:
    violations = check(events, acked, log)
    assert not violations, f"{context}{describe_violations(violations)}\nsummary: {summarize(events, log)}"


# --------------------------------------------------------------------------------------------- observer


class GroupObserver:
    """A thread that asks the coordinator for the group (Admin.describe_groups) every `interval_s` and writes
    what it shows as ``observed`` events: committed offsets and each member's partitions. Calls that fail
    (a coordinator moving, brokers down) are skipped."""

    def __init__(self, bootstrap: str, group: str, topic: str, path: Path, interval_s: float = 0.25) -> None:
        self.bootstrap = bootstrap
        self.group = group
        self.topic = topic
        self.path = path
        self.interval_s = interval_s
        self.shown = 0
        self.failed = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"observer-{group}", daemon=True)

    @property
    def started(self) -> bool:
        return self._thread.ident is not None

    def start(self) -> GroupObserver:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(30)

    def _run(self) -> None:
        admin: Admin | None = None
        with open(self.path, "a", encoding="utf-8") as out:
            while not self._stop.wait(self.interval_s):
                sent = now_us()
                try:
                    admin = admin or Admin(self.bootstrap, request_timeout_ms=3000)
                    described = admin.describe_groups([self.group])[0]
                except LogbrokerError:
                    self.failed += 1
                    if admin is not None:
                        admin.close()
                    admin = None  # start afresh: brokers may have moved or restarted
                    continue
                event = {"event": "observed", "member": OBSERVER, "sent_us": sent, "t_us": now_us(),
                         "committed": [[p.partition, p.committed] for p in described.partitions
                                       if p.topic == self.topic and p.committed is not None],
                         "owners": [[m.member_id, [tp.partition for tp in m.partitions if tp.topic == self.topic]]
                                    for m in described.members]}
                out.write(json.dumps(event, separators=(",", ":")) + "\n")
                out.flush()
                self.shown += 1
        if admin is not None:
            admin.close()


def reset_event(offsets: Mapping[int, int], sent_us: int, received_us: int) -> Event:
    """The event of an explicit reset of committed offsets (partition -> new offset), for the checker."""
    return {"event": "reset", "member": "reset", "sent_us": sent_us, "t_us": received_us,
            "offsets": [[p, o] for p, o in sorted(offsets.items())]}
