"""`lb`: the command-line client (topics, cluster, produce from stdin, consume to stdout, consumer groups; queues
(share groups) and dead letters are cli_share.py's).

Every failure the user can act on ends as one line on stderr, `lb: <message>`, and exit status 1;
argparse usage errors exit with 2. The messages are the client's and the broker's own, which are
written for operators, so the CLI passes them through rather than rewording them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import re
import signal
import string
import sys
import time
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, TextIO

from logbroker_client.errors import CommitFailedError, LogbrokerError, RecordTooLargeError
from logbroker_client.progress import Progress, human_bytes

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
TEMPLATE_FIELDS = ("topic", "partition", "offset", "timestamp", "time", "key", "value", "headers")
FIELD_LIST = " ".join("{" + name + "}" for name in TEMPLATE_FIELDS)
POLL_SLICE_S = 1.0  # poll in slices so the idle timeout and Ctrl-C are noticed promptly
GROUP_JOIN_WAIT_S = 30.0  # lb consume --group --timeout-ms: the longest wait for a first assignment
_log_handler: logging.Handler | None = None


class UsageError(Exception):
    """A combination of arguments argparse cannot express (reported like argparse's own errors)."""


# ------------------------------------------------------------------------------------ helpers


def print_table(headers: Sequence[str], rows: Sequence[Sequence[object]], out: TextIO) -> None:
    cells = [[str(c) for c in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in cells)) if cells else len(h) for i, h in enumerate(headers)]
    for row in [list(headers), *cells]:
        out.write("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip() + "\n")


def parse_config_pair(text: str) -> tuple[str, str]:
    key, sep, value = text.partition("=")
    if not sep or not key.strip():
        raise argparse.ArgumentTypeError(f"config {text!r} is not KEY=VALUE (for example retention.ms=86400000)")
    return key.strip(), value.strip()


def parse_timestamp(text: str) -> int:
    """Milliseconds since the epoch from ISO 8601 (naive means UTC) or from a plain integer of ms."""
    value = text.strip()
    if value.isdigit():
        return int(value)
    try:
        moment = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO 8601 time (like 2026-11-24T10:00:00Z) nor milliseconds since the epoch"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    ms = (moment - EPOCH) // timedelta(milliseconds=1)
    if ms < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is before 1970-01-01; no record can be that old")
    return ms


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def non_negative_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be 0 or more, got {value}")
    return value


def priority_level(text: str) -> int:
    from logbroker_client.lanes import MAX_PRIORITY_LEVELS

    value = non_negative_int(text)
    if value >= MAX_PRIORITY_LEVELS:
        raise argparse.ArgumentTypeError(f"priorities go from 0 to {MAX_PRIORITY_LEVELS - 1}, got {value}")
    return value


def one_line(exc: BaseException) -> str:
    return " ".join(str(exc).split()) or type(exc).__name__


def package_version() -> str:
    """The installed distribution's version (pyproject.toml's), so `lb --version` never drifts from it."""
    from importlib import metadata

    try:
        return metadata.version("logbroker")
    except metadata.PackageNotFoundError:
        return "unknown (not installed; `make install` installs it)"


# -------------------------------------------------------------------------------------- topics


def cmd_topic_create(args: argparse.Namespace) -> int:
    from logbroker_client.admin import Admin

    with Admin(args.bootstrap) as admin:
        # 0 leaves the choice to the broker's defaults (the wire's "unset").
        admin.create_topic(args.name, partitions=args.partitions or 0,
                           replication_factor=args.replication_factor or 0, configs=dict(args.config))
    details = []
    if args.partitions:
        details.append(f"{args.partitions} partition(s)")
    if args.replication_factor:
        details.append(f"replication factor {args.replication_factor}")
    print(f"created topic {args.name}" + (f" ({', '.join(details)})" if details else ""))
    return EXIT_OK


def cmd_topic_list(args: argparse.Namespace) -> int:
    from logbroker_client.admin import Admin

    with Admin(args.bootstrap) as admin:
        for name in admin.list_topics():
            print(name)
    return EXIT_OK


def cmd_topic_describe(args: argparse.Namespace) -> int:
    from logbroker_client.admin import Admin

    with Admin(args.bootstrap) as admin:
        states = admin.broker_states()
        topics = admin.describe_topics(args.names, broker_states=states)
        addresses = admin.broker_addresses()
        waiting = {(t.name, p.partition): replicas_waiting_to_catch_up(admin, t.name, p, states)
                   for t in topics for p in t.partitions if p.offline}
    out = sys.stdout
    for i, topic in enumerate(sorted(topics, key=lambda t: t.name)):
        if i:
            out.write("\n")
        out.write(f"topic {topic.name}: {len(topic.partitions)} partition(s), "
                  f"replication factor {topic.replication_factor}\n")
        rows = [partition_row(p) for p in topic.partitions]
        print_table(("PARTITION", "LEADER", "REPLICAS", "ISR", "LOG START", "HIGH WATERMARK", "SIZE"), rows, out)
        for p in topic.partitions:
            if p.offline:
                out.write(offline_note(p, states, addresses, waiting[(topic.name, p.partition)]) + "\n")
        if topic.configs:
            out.write("configs:\n")
            for key in sorted(topic.configs):
                out.write(f"  {key} = {topic.configs[key]}\n")
    return EXIT_OK


def partition_row(p: Any) -> tuple[object, ...]:
    """An offline partition's offsets are unknown (the broker that answered may hold no replica): "-"."""
    if p.offline:
        return (p.partition, "offline", ",".join(map(str, p.replicas)), "-", "-", "-", "-")
    return (p.partition, p.leader_id, ",".join(map(str, p.replicas)), ",".join(map(str, p.isr)),
            p.log_start_offset, p.high_watermark, human_bytes(p.size_bytes))


def replicas_waiting_to_catch_up(admin: Any, topic: str, p: Any, states: dict[int, str]) -> list[int]:
    """The answering replicas of an offline partition that lost their data and wait to catch up (no vote)."""
    answering = [node for node in p.replicas if states.get(node, "down") != "down"]
    return sorted(node for node, view in admin.replica_views(topic, p.partition, answering).items()
                  if view.catching_up)


def offline_note(p: Any, states: dict[int, str], addresses: dict[int, str], waiting: Sequence[int] = ()) -> str:
    """Why a partition has no leader, and what brings it back."""
    down = [node for node in p.replicas if states.get(node, "down") == "down"]
    named = ", ".join(f"broker {node} at {addresses.get(node, 'an unknown address')}" for node in down)
    if len(down) == len(p.replicas):
        return (f"partition {p.partition} is offline: every broker holding a replica of it is down ({named}); "
                "nothing can be written to it or read from it until one is back: start it again")
    majority = len(p.replicas) // 2 + 1
    up = len(p.replicas) - len(down)
    if up >= majority and up - len(waiting) < majority:
        lost = ", ".join(map(str, waiting))
        return (f"partition {p.partition} is offline: {up} of its {len(p.replicas)} replicas answer, but the ones "
                f"on broker(s) {lost} lost their data (a replaced disk or a deleted directory) and take no part "
                f"in elections until they have caught up from a leader, which leaves {up - len(waiting)} to vote "
                f"where a leader needs {majority}"
                + (f"; down: {named}: start them again, a replica that kept the data brings the partition back"
                   if down else "")
                + "; if no replica kept the data, its records are lost: delete the topic and create it again")
    if up >= majority:
        return (f"partition {p.partition} has no leader yet: {up} of its {len(p.replicas)} replicas answer, "
                "so one is being elected; describe again in a moment")
    return (f"partition {p.partition} is offline: only {up} of its {len(p.replicas)} replicas answer and a leader "
            f"needs {majority}; down: {named}: start them again")


def cmd_topic_delete(args: argparse.Namespace) -> int:
    from logbroker_client.admin import Admin

    with Admin(args.bootstrap) as admin:
        admin.delete_topic(args.name)
    print(f"deleted topic {args.name}")
    return EXIT_OK


def cmd_cluster_describe(args: argparse.Namespace) -> int:
    from logbroker_client.admin import Admin

    with Admin(args.bootstrap) as admin:
        metadata = admin.describe_cluster()
        states = admin.broker_states()
    if metadata.cluster_id:
        print(f"cluster {metadata.cluster_id}")
    rows = [(b.node_id, f"{b.host}:{b.port}", states.get(b.node_id, "down"),
             "*" if b.node_id == metadata.controller_id else "")
            for b in sorted(metadata.brokers, key=lambda b: b.node_id)]
    print_table(("NODE ID", "ADDRESS", "STATUS", "CONTROLLER"), rows, sys.stdout)
    down = [str(node) for node, state in sorted(states.items()) if state == "down"]
    if down:
        print(f"{len(down)} of {len(states)} broker(s) down ({', '.join(down)}): partitions they led move to other "
              "replicas; those with no replica left are offline (`lb topic describe` shows which)")
    silent = [str(node) for node, state in sorted(states.items()) if state == "no answer"]
    if silent:
        print(f"{len(silent)} broker(s) did not answer within 2 s ({', '.join(silent)}): paused, overloaded or "
              "unreachable from this machine; see their logs")
    return EXIT_OK


# ------------------------------------------------------------------------------------- produce


def stdin_lines() -> Iterator[bytes]:
    """Lines of stdin as bytes, without their line ending (values need not be UTF-8)."""
    raw = getattr(sys.stdin, "buffer", None)
    lines: Iterator[bytes] = iter(raw) if raw is not None else (line.encode() for line in sys.stdin)
    for line in lines:
        if line.endswith(b"\n"):
            line = line[:-2] if line.endswith(b"\r\n") else line[:-1]
        yield line


def split_key(line: bytes, separator: bytes | None) -> tuple[bytes | None, bytes]:
    if separator is None:
        return None, line
    key, sep, value = line.partition(separator)
    return (key, value) if sep else (None, line)


class ProduceTally:
    """Acknowledgements and failures, counted from futures as they complete (no locks, no callbacks)."""

    def __init__(self) -> None:
        self.pending: deque[Any] = deque()
        self.acked = 0
        self.failed = 0
        self.errors: dict[str, int] = {}
        self.offsets: dict[int, tuple[int, int]] = {}  # partition -> (first, last)

    def add(self, future: Any) -> None:
        self.pending.append(future)
        # Settle what has finished at the front, so memory stays bounded by what is in flight.
        while self.pending and self.pending[0].done():
            self._settle(self.pending.popleft())

    def fail(self, error: BaseException) -> None:
        self.failed += 1
        message = one_line(error)
        self.errors[message] = self.errors.get(message, 0) + 1

    def settle_all(self) -> None:
        while self.pending:
            future = self.pending.popleft()
            if future.done():
                self._settle(future)
            else:
                self.fail(LogbrokerError("not acknowledged before the producer stopped"))

    def _settle(self, future: Any) -> None:
        error = future.exception(0)
        if error is not None:
            self.fail(error)
            return
        self.acked += 1
        meta = future.result(0)
        if meta.offset >= 0:
            first, last = self.offsets.get(meta.partition, (meta.offset, meta.offset))
            self.offsets[meta.partition] = (min(first, meta.offset), max(last, meta.offset))
        else:
            self.offsets.setdefault(meta.partition, (-1, -1))


def cmd_produce(args: argparse.Namespace) -> int:
    from logbroker_client.producer import Producer

    separator = None
    if args.key_separator is not None:
        if not args.key_separator:
            raise UsageError("--key-separator must not be empty")
        separator = args.key_separator.encode()
    tally = ProduceTally()
    progress = Progress("produce", unit="records")
    started = time.monotonic()
    interrupted = False
    producer = Producer(args.bootstrap, acks=args.acks, compression=args.compression,
                        linger_ms=args.linger_ms, batch_size=args.batch_size)
    try:
        try:
            for line in stdin_lines():
                key, value = split_key(line, separator)
                try:
                    tally.add(producer.send(args.topic, value=value, key=key, partition=args.partition,
                                            delay_ms=args.delay_ms, deliver_at_ms=args.deliver_at,
                                            priority=args.priority))
                except RecordTooLargeError as exc:  # this record only; the rest can still go
                    tally.fail(exc)
                progress.update(1, len(line))
        except KeyboardInterrupt:
            interrupted = True  # stop reading, but deliver (and report) what was already sent
        producer.flush()
    finally:
        producer.close()
        progress.close()
    tally.settle_all()
    report_produce(tally, progress.nbytes, time.monotonic() - started, args.acks)
    if tally.failed:
        worst = max(tally.errors.items(), key=lambda item: item[1])
        print(f"lb: {tally.failed} of {tally.acked + tally.failed} record(s) failed; "
              f"{worst[1]} with: {worst[0]}", file=sys.stderr)
        return EXIT_ERROR
    return EXIT_INTERRUPTED if interrupted else EXIT_OK


def report_produce(tally: ProduceTally, nbytes: int, seconds: float, acks: str) -> None:
    sent = tally.acked + tally.failed
    rate = sent / seconds if seconds > 0 else 0.0
    if acks == "0":
        where = "offsets unknown with --acks 0"
    else:
        where = ", ".join(f"{p}:{first}..{last}" for p, (first, last) in sorted(tally.offsets.items()))
        where = f"offsets {where}" if where else "no offsets"
    failed = f", {tally.failed} failed" if tally.failed else ""
    print(f"produced {tally.acked} record(s){failed}, {human_bytes(nbytes)} in {seconds:.2f}s "
          f"({rate:,.0f} records/s) to {len(tally.offsets)} partition(s); {where}")


# ------------------------------------------------------------------------------------- consume


def decode_escapes(text: str) -> str:
    """Let a shell-quoted template say \\t and \\n (and \\\\ for a backslash)."""
    return re.sub(r"\\([tn\\])", lambda m: {"t": "\t", "n": "\n", "\\": "\\"}[m.group(1)], text)


def check_template(template: str, fields: Sequence[str] = TEMPLATE_FIELDS) -> str:
    template = decode_escapes(template)
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(template) if name is not None]
    except ValueError as exc:
        raise UsageError(f"--format {template!r}: {exc}") from None
    for name in names:
        base = re.split(r"[.\[]", name, maxsplit=1)[0]
        if base not in fields:
            listed = " ".join("{" + field + "}" for field in fields)
            raise UsageError(f"--format: unknown field {{{name}}}; the fields are {listed}")
    try:
        template.format_map(sample_fields())
    except (ValueError, TypeError, IndexError, KeyError, AttributeError) as exc:
        raise UsageError(f"--format {template!r}: {exc}") from None
    return template


def sample_fields() -> dict[str, object]:
    return {"topic": "t", "partition": 0, "offset": 0, "timestamp": 0, "time": "1970-01-01T00:00:00.000Z",
            "key": "", "value": "", "headers": "", "delivery_count": 1}


def text(data: bytes | None) -> str:
    return "" if data is None else data.decode("utf-8", errors="replace")


def record_fields(record: Any) -> dict[str, object]:
    moment = EPOCH + timedelta(milliseconds=record.timestamp)
    return {
        "topic": record.topic, "partition": record.partition, "offset": record.offset,
        "timestamp": record.timestamp, "time": moment.isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "key": text(record.key), "value": text(record.value),
        "headers": ",".join(f"{k}={text(v)}" for k, v in (record.headers or ())),
        "delivery_count": getattr(record, "delivery_count", 1),
    }


def renderer(template: str | None) -> Callable[[Any], str]:
    if template is None:
        return lambda record: text(record.value)
    return lambda record: template.format_map(record_fields(record))


def start_positions(consumer: Any, tps: list[Any], args: argparse.Namespace) -> None:
    """Seek every partition: an offset, the beginning, a time, or (by default) the end."""
    if args.offset is not None:
        consumer.seek(tps[0], args.offset)
    elif args.from_beginning:
        consumer.seek_to_beginning(*tps)
    elif args.from_timestamp is not None:
        found = consumer.offsets_for_times({tp: args.from_timestamp for tp in tps})
        at_end = [tp for tp in tps if found.get(tp) is None]
        for tp in tps:
            if found.get(tp) is not None:
                consumer.seek(tp, found[tp].offset)
        if at_end:  # nothing at or after that time yet: wait for new records
            consumer.seek_to_end(*at_end)
    else:
        consumer.seek_to_end(*tps)


def cmd_consume(args: argparse.Namespace) -> int:
    from logbroker_client.admin import Admin
    from logbroker_client.consumer import Consumer
    from logbroker_client.types import TopicPartition

    if args.group is not None:
        return consume_in_group(args)
    if args.offset is not None and args.partition is None:
        raise UsageError("--offset needs --partition (an offset means something in one partition only)")
    render = renderer(None if args.format is None else check_template(args.format))
    if args.partition is not None:
        tps = [TopicPartition(args.topic, args.partition)]
    else:
        with Admin(args.bootstrap) as admin:
            described = admin.describe_topics([args.topic])[0]
        tps = [TopicPartition(args.topic, p.partition) for p in described.partitions]
    # auto_offset_reset="none": a requested offset that does not exist is an error with the broker's
    # message (the valid range), not a silent jump to somewhere else.
    with Consumer(args.bootstrap, auto_offset_reset="none") as consumer:
        consumer.assign(tps)
        start_positions(consumer, tps, args)
        count, seconds = consume_loop(consumer, render, args.max_messages, args.timeout_ms)
    print(f"consumed {count} record(s) from {len(tps)} partition(s) in {seconds:.2f}s", file=sys.stderr)
    return EXIT_OK


def consume_in_group(args: argparse.Namespace) -> int:
    """Join the group: its members share the topic's partitions, and each printed batch is committed, so the
    next run (of any member) resumes after it. A new group starts at the end, or the beginning."""
    from logbroker_client.admin import Admin
    from logbroker_client.consumer import Consumer

    if args.partition is not None or args.offset is not None or args.from_timestamp is not None:
        raise UsageError("--group reads the partitions the group's coordinator assigns, from the group's committed "
                         "offsets: it cannot be combined with --partition, --offset or --from-timestamp "
                         "(move a group with `lb group reset-offsets`)")
    render = renderer(None if args.format is None else check_template(args.format))
    with Admin(args.bootstrap) as admin:
        admin.describe_topics([args.topic])  # an unknown topic is named now, not waited for
    reset = "earliest" if args.from_beginning else "latest"
    stop_on_sigterm()
    with Consumer(args.bootstrap, group_id=args.group, auto_offset_reset=reset, enable_auto_commit=False,
                  client_id=f"lb-consume-{os.getpid()}") as consumer:
        consumer.subscribe([args.topic])
        count, seconds = consume_loop(consumer, render, args.max_messages, args.timeout_ms,
                                      after_batch=lambda _: commit_printed(consumer),
                                      assignment=consumer.assignment)
        commit_printed(consumer)  # a new group's starting point too, so the next run misses nothing after it
    print(f"consumed {count} record(s) from {args.topic} as group {args.group} in {seconds:.2f}s", file=sys.stderr)
    return EXIT_OK


def stop_on_sigterm() -> None:
    """`kill` stops a group member as Ctrl-C does: it commits and leaves the group at once, so its partitions
    move to the other members now rather than after the session timeout."""
    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # only the main thread may set handlers (tests call main() elsewhere)
        signal.signal(signal.SIGTERM, interrupt)


def commit_printed(consumer: Any) -> None:
    """Commit what was printed; a member that lost its partitions meanwhile warns and reads on (their new
    owner starts from the last commit, so those records are printed again there: at least once)."""
    try:
        consumer.commit()
    except CommitFailedError as exc:
        print(f"lb: warning: {one_line(exc)}", file=sys.stderr)


def consume_loop(consumer: Any, render: Callable[[Any], str], max_messages: int | None,
                 timeout_ms: int | None, after_batch: Callable[[list[Any]], None] | None = None,
                 assignment: Callable[[], set[Any]] | None = None) -> tuple[int, float]:
    """Print records until max_messages, an idle timeout, or Ctrl-C; returns (count, seconds). after_batch
    runs with each batch once it is written out.

    A group member (`assignment` given) is not idle while it joins: its idle clock starts when the coordinator
    hands it partitions, and again whenever it is handed a different set. Until its first partitions it waits
    up to GROUP_JOIN_WAIT_S (or the idle timeout, if longer), since a member of a group with more members than
    partitions may never get any. A member that timed out while joining would read and commit nothing."""
    started = time.monotonic()
    idle_s = None if timeout_ms is None else timeout_ms / 1000
    idle_until = None if idle_s is None else started + (idle_s if assignment is None
                                                        else max(idle_s, GROUP_JOIN_WAIT_S))
    held: set[Any] = set()
    count = 0
    out = sys.stdout
    with contextlib.suppress(KeyboardInterrupt):  # Ctrl-C is how a tail ends: not an error
        while max_messages is None or count < max_messages:
            if assignment is not None and (now_held := assignment()) != held:
                held = now_held
                if held and idle_s is not None:
                    idle_until = time.monotonic() + idle_s
            wait = POLL_SLICE_S
            if idle_until is not None:
                wait = min(wait, idle_until - time.monotonic())
                if wait <= 0:
                    break
            limit = None if max_messages is None else max_messages - count
            records = consumer.poll(timeout=wait, max_records=limit)
            if records:
                if idle_s is not None:
                    idle_until = time.monotonic() + idle_s
                out.write("".join(render(r) + "\n" for r in records))
                out.flush()  # a pipe reader (grep, jq) sees records as they arrive
                count += len(records)
                if after_batch is not None:
                    after_batch(records)
    return count, time.monotonic() - started


# -------------------------------------------------------------------------------------- groups


def cmd_group_list(args: argparse.Namespace) -> int:
    from logbroker_client.admin import Admin

    with Admin(args.bootstrap) as admin:
        groups = admin.list_groups()
    if not groups:
        print("no consumer groups yet (`lb consume TOPIC --group NAME` creates one)")
        return EXIT_OK
    print_table(("GROUP", "STATE", "MEMBERS"), [(g.group_id, g.state, g.members) for g in groups], sys.stdout)
    return EXIT_OK


def cmd_group_describe(args: argparse.Namespace) -> int:
    from logbroker_client.admin import Admin

    with Admin(args.bootstrap) as admin:
        groups = admin.describe_groups(args.groups)
    for i, group in enumerate(groups):
        if i:
            print()
        write_group(group, sys.stdout)
    return EXIT_OK


def write_group(group: Any, out: TextIO) -> None:
    out.write(f"group {group.group_id}: {group.state}, {len(group.members)} member(s), coordinator broker "
              f"{group.coordinator_id}, assignor {group.assignor}, epoch {group.group_epoch}\n")
    if group.members:
        members: list[tuple[object, ...]] = [
            (m.member_id, m.instance_id or "-", m.client_id or "-", m.client_host or "-", partition_list(m.partitions))
            for m in group.members]
        print_table(("MEMBER", "INSTANCE", "CLIENT ID", "HOST", "PARTITIONS"), members, out)
    if group.partitions:
        clients = {m.member_id: m.client_id or m.member_id for m in group.members}
        rows = [(p.topic, p.partition, dash(p.committed), dash(p.log_end), dash(p.lag),
                 clients.get(p.member_id or "", "-")) for p in group.partitions]
        print_table(("TOPIC", "PARTITION", "COMMITTED", "LOG END", "LAG", "OWNER"), rows, out)
    out.write(f"total lag: {group.total_lag}\n")


def dash(value: object) -> str:
    return "-" if value is None else str(value)


def partition_list(tps: Sequence[Any]) -> str:
    """orders-0,1,2 payments-3: each topic once, then its partitions."""
    by_topic: dict[str, list[int]] = {}
    for tp in tps:
        by_topic.setdefault(tp.topic, []).append(tp.partition)
    return " ".join(f"{topic}-{','.join(map(str, sorted(parts)))}" for topic, parts in sorted(by_topic.items())) or "-"


def cmd_group_reset_offsets(args: argparse.Namespace) -> int:
    from logbroker_client.admin import Admin

    with Admin(args.bootstrap) as admin:
        changes = admin.reset_offsets(args.group, args.topic, to_earliest=args.to_earliest, to_latest=args.to_latest,
                                      to_offset=args.to_offset, to_datetime=args.to_datetime,
                                      shift_by=args.shift_by, dry_run=args.dry_run)
    rows = [(c.topic, c.partition, dash(c.previous), c.new) for c in changes]
    print_table(("TOPIC", "PARTITION", "OLD OFFSET", "NEW OFFSET"), rows, sys.stdout)
    if args.dry_run:
        print("dry run: nothing was changed (run again without --dry-run to commit these offsets)")
    else:
        print(f"group {args.group} now resumes {args.topic} at these offsets ({len(changes)} partition(s))")
    return EXIT_OK


def cmd_group_delete(args: argparse.Namespace) -> int:
    from logbroker_client.admin import Admin

    with Admin(args.bootstrap) as admin:
        admin.delete_groups(args.groups)
    for group_id in args.groups:
        print(f"deleted group {group_id} and its committed offsets")
    return EXIT_OK


# -------------------------------------------------------------------------------------- parser


def bootstrap_parent() -> argparse.ArgumentParser:
    # SUPPRESS on the subcommands keeps `lb --bootstrap X topic list` from being reset by the
    # subcommand's own default; both spellings work.
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--bootstrap", default=argparse.SUPPRESS, metavar="HOST:PORT[,HOST:PORT]",
                        help="brokers to contact first (default: $LOGBROKER_BOOTSTRAP, else 127.0.0.1:9092)")
    return parent


def add_topic_commands(sub: Any, parent: argparse.ArgumentParser) -> None:
    topic = sub.add_parser("topic", help="create, list, describe, alter and delete topics; add partitions, "
                                         "move replicas")
    topic_sub = topic.add_subparsers(dest="topic_command", required=True, metavar="COMMAND")
    create = topic_sub.add_parser("create", parents=[parent], help="create a topic")
    create.add_argument("name")
    create.add_argument("--partitions", type=positive_int, help="number of partitions (default: the broker's)")
    create.add_argument("--replication-factor", type=positive_int, help="copies of each partition")
    create.add_argument("--config", type=parse_config_pair, action="append", default=[], metavar="KEY=VALUE",
                        help="a topic setting such as retention.ms=86400000 (repeatable)")
    create.set_defaults(func=cmd_topic_create, parser=create)
    listing = topic_sub.add_parser("list", parents=[parent], help="list topic names")
    listing.set_defaults(func=cmd_topic_list, parser=listing)
    describe = topic_sub.add_parser("describe", parents=[parent], help="partitions, leaders, offsets, configs")
    describe.add_argument("names", nargs="*", metavar="NAME", help="topics to describe (default: all)")
    describe.set_defaults(func=cmd_topic_describe, parser=describe)
    delete = topic_sub.add_parser("delete", parents=[parent], help="delete a topic and its data")
    delete.add_argument("name")
    delete.set_defaults(func=cmd_topic_delete, parser=delete)
    from logbroker_client import cli_admin  # alter, add-partitions, move-replicas build on this module's helpers

    cli_admin.add_topic_change_commands(topic_sub, parent)


def add_cluster_commands(sub: Any, parent: argparse.ArgumentParser) -> None:
    cluster = sub.add_parser("cluster", help="inspect the cluster; drain a broker")
    cluster_sub = cluster.add_subparsers(dest="cluster_command", required=True, metavar="COMMAND")
    describe = cluster_sub.add_parser("describe", parents=[parent], help="brokers and the controller")
    describe.set_defaults(func=cmd_cluster_describe, parser=describe)
    from logbroker_client import cli_admin

    cli_admin.add_cluster_change_commands(cluster_sub, parent)


def add_produce_command(sub: Any, parent: argparse.ArgumentParser) -> None:
    produce = sub.add_parser("produce", parents=[parent], help="send one record per line of stdin",
                             description="Send one record per line of stdin (the line ending is not sent).")
    produce.add_argument("topic")
    produce.add_argument("--key-separator", metavar="SEP",
                         help="split each line at the first SEP into key and value (lines without it: null key)")
    produce.add_argument("--partition", type=non_negative_int, help="send every record to this partition")
    produce.add_argument("--acks", choices=("all", "1", "0"), default="all",
                         help="all: after replication (default); 1: after the leader's write; 0: do not wait")
    produce.add_argument("--compression", choices=("none", "zstd"), default="none")
    produce.add_argument("--linger-ms", type=non_negative_int, default=5,
                         help="wait up to this long to fill a batch (default 5)")
    produce.add_argument("--batch-size", type=positive_int, default=1 << 20, help="bytes per batch (default 1 MiB)")
    when = produce.add_mutually_exclusive_group()
    when.add_argument("--delay-ms", type=non_negative_int, metavar="N",
                      help="share consumers get each record N ms from now, not before (plain consumers at once)")
    when.add_argument("--deliver-at", type=parse_timestamp, metavar="TIME",
                      help="share consumers get each record at TIME, not before: ISO 8601 (naive = UTC) or epoch ms")
    produce.add_argument("--priority", type=priority_level, metavar="K",
                         help="send to priority lane K of the queue: the topic TOPIC.pK (it must exist); 0, the "
                              "default, is TOPIC itself and the least urgent")
    produce.set_defaults(func=cmd_produce, parser=produce)


def add_consume_command(sub: Any, parent: argparse.ArgumentParser) -> None:
    consume = sub.add_parser(
        "consume", parents=[parent], help="print records to stdout",
        description="Print records, by default new ones (from the end) of every partition, until Ctrl-C.")
    consume.add_argument("topic")
    consume.add_argument("--partition", type=non_negative_int, help="read this partition only")
    start = consume.add_mutually_exclusive_group()
    start.add_argument("--offset", type=non_negative_int, help="start at this offset (needs --partition)")
    start.add_argument("--from-beginning", action="store_true", help="start at the oldest record")
    start.add_argument("--from-timestamp", type=parse_timestamp, metavar="TIME",
                       help="start at the first record at or after TIME: ISO 8601 (naive = UTC) or epoch ms")
    consume.add_argument("--group", metavar="GROUP",
                         help="consume as a member of this consumer group: partitions shared with its other members, "
                              "progress committed, resuming where the group left off (a new group starts at the "
                              "end, or with --from-beginning at the beginning)")
    consume.add_argument("--max-messages", type=positive_int, metavar="N", help="stop after N records")
    consume.add_argument("--timeout-ms", type=non_negative_int, metavar="T",
                         help="stop when no record arrives for T ms (with --group, counted from when the member "
                              "is given its partitions: joining is not idling)")
    consume.add_argument("--format", metavar="TEMPLATE",
                         help="for example '{partition}:{offset} {key}={value}'; fields: "
                              + FIELD_LIST + " (default: {value})")
    consume.set_defaults(func=cmd_consume, parser=consume)


def add_group_commands(sub: Any, parent: argparse.ArgumentParser) -> None:
    group = sub.add_parser("group", help="list, describe, reset and delete consumer groups; show or change configs")
    group_sub = group.add_subparsers(dest="group_command", required=True, metavar="COMMAND")
    listing = group_sub.add_parser("list", parents=[parent], help="every consumer group, its state and members")
    listing.set_defaults(func=cmd_group_list, parser=listing)
    describe = group_sub.add_parser("describe", parents=[parent],
                                    help="members, their partitions, committed offsets and lag")
    describe.add_argument("groups", nargs="+", metavar="GROUP")
    describe.set_defaults(func=cmd_group_describe, parser=describe)
    reset = group_sub.add_parser(
        "reset-offsets", parents=[parent], help="move a group's committed offsets (the group must be empty)",
        description="Move the committed offsets of an empty group (no running member) on every partition of a "
                    "topic; its consumers resume there. Offsets are kept within each partition's log.")
    reset.add_argument("group")
    reset.add_argument("--topic", required=True)
    where = reset.add_mutually_exclusive_group(required=True)
    where.add_argument("--to-earliest", action="store_true", help="the oldest record still stored")
    where.add_argument("--to-latest", action="store_true", help="the end: skip everything stored so far")
    where.add_argument("--to-offset", type=non_negative_int, metavar="N", help="offset N in every partition")
    where.add_argument("--to-datetime", type=parse_timestamp, metavar="TIME",
                       help="the first record at or after TIME: ISO 8601 (naive = UTC) or epoch ms")
    where.add_argument("--shift-by", type=int, metavar="N", help="N records later (negative: earlier)")
    reset.add_argument("--dry-run", action="store_true", help="show the new offsets without committing them")
    reset.set_defaults(func=cmd_group_reset_offsets, parser=reset)
    delete = group_sub.add_parser("delete", parents=[parent], help="delete empty groups and their offsets")
    delete.add_argument("groups", nargs="+", metavar="GROUP")
    delete.set_defaults(func=cmd_group_delete, parser=delete)
    from logbroker_client import cli_share

    cli_share.add_group_config_command(group_sub, parent)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lb", description="logbroker command-line client")
    parser.add_argument("--bootstrap", default=None, metavar="HOST:PORT[,HOST:PORT]",
                        help="brokers to contact first (default: $LOGBROKER_BOOTSTRAP, else 127.0.0.1:9092)")
    parser.add_argument("-v", "--verbose", action="store_true", help="log the client's retries and warnings")
    parser.add_argument("--version", action="version", version=f"lb {package_version()}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    parent = bootstrap_parent()
    add_topic_commands(sub, parent)
    add_cluster_commands(sub, parent)
    add_produce_command(sub, parent)
    add_consume_command(sub, parent)
    add_group_commands(sub, parent)
    from logbroker_client import cli_share  # it builds on this module's helpers

    cli_share.add_share_commands(sub, parent)
    cli_share.add_dlq_commands(sub, parent)
    from logbroker_client import cli_health

    cli_health.add_health_command(sub, parent)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage errors and --help; returning keeps main() callable in-process
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    configure_logging(args.verbose)
    try:
        return int(args.func(args))
    except UsageError as exc:
        sub = args.parser  # the command that ran, so the usage line is that command's
        sub.print_usage(sys.stderr)
        print(f"{sub.prog}: error: {exc}", file=sys.stderr)
        return EXIT_USAGE
    except LogbrokerError as exc:
        print(f"lb: {one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("lb: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        # The reader went away (`lb consume ... | head`); that ends the output, it is not an error.
        silence_stdout()
        return EXIT_OK


def configure_logging(verbose: bool) -> None:
    """The client logs failures it also reports to the caller; the CLI reports them itself, once, so
    without --verbose only errors the CLI cannot see (a crashing callback) get through."""
    global _log_handler
    logger = logging.getLogger("logbroker_client")
    if _log_handler is not None:  # main() may run many times in one process (tests): bind today's stderr
        logger.removeHandler(_log_handler)
    _log_handler = logging.StreamHandler(sys.stderr)
    _log_handler.setFormatter(logging.Formatter("lb: %(name)s: %(message)s"))
    logger.addHandler(_log_handler)
    logger.setLevel(logging.INFO if verbose else logging.ERROR)


def silence_stdout() -> None:
    """Point stdout at /dev/null so the interpreter's final flush does not fail on the broken pipe."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


if __name__ == "__main__":
    sys.exit(main())
