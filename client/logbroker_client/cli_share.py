"""`lb share`, `lb dlq` and `lb group config`: queues (share groups) and their dead letters from the command line.

    lb share consume TOPIC --group G     print records and acknowledge them (--release, --reject to test retries)
    lb share describe G --topic T        queue depth, in flight, delayed, oldest age, dead-lettered, per member
    lb group config G [--set KEY=VALUE]  show or change a group's configs (lock duration, delivery limit, ...)
    lb dlq redrive T.dlq                 move dead letters back to the topic they came from (SQS's redrive)

Errors end as one `lb: <message>` line and exit status 1, as everywhere in cli.py.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

from logbroker_client.cli import (
    EXIT_ERROR,
    EXIT_OK,
    TEMPLATE_FIELDS,
    UsageError,
    check_template,
    consume_loop,
    non_negative_int,
    parse_config_pair,
    positive_int,
    print_table,
    renderer,
    stop_on_sigterm,
)
from logbroker_client.errors import AcknowledgementError, LogbrokerError
from logbroker_client.lanes import MAX_PRIORITY_LEVELS
from logbroker_client.progress import Progress

SHARE_FIELDS = (*TEMPLATE_FIELDS, "delivery_count")
DEFAULT_REDRIVE_GROUP = "lb-dlq-redrive"  # one group for every run: each dead letter is moved once
DEFAULT_REDRIVE_IDLE_MS = 2_000
DLQ_HEADER_PREFIX = "lb.dlq."
SOURCE_TOPIC_HEADER = "lb.dlq.topic"
MAX_CLI_IN_FLIGHT = 500


def priority_levels(text: str) -> int:
    value = positive_int(text)
    if value > MAX_PRIORITY_LEVELS:
        raise argparse.ArgumentTypeError(f"at most {MAX_PRIORITY_LEVELS} priority levels, got {value}")
    return value


def human_age(ms: int) -> str:
    """350ms, 12.3s, 5m03s, 2h05m; "-" for none."""
    if ms <= 0:
        return "-"
    if ms < 1_000:
        return f"{ms}ms"
    if ms < 60_000:
        return f"{ms / 1000:.1f}s"
    minutes, seconds = divmod(ms // 1000, 60)
    if minutes < 60:
        return f"{minutes}m{seconds:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


# ------------------------------------------------------------------------------- share consume


def finisher(args: argparse.Namespace) -> tuple[Callable[[Any], None], str]:
    """What `lb share consume` does with each printed record, and the word for it."""
    if args.reject:
        reason = args.reason or "rejected by lb share consume --reject"
        return (lambda record: record.reject(reason)), "rejected"
    if args.release:
        delay_ms = args.release_delay_ms or 0
        return (lambda record: record.release(delay_ms)), "released"
    return (lambda record: record.ack()), "acknowledged"


def cmd_share_consume(args: argparse.Namespace) -> int:
    from logbroker_client.share import ShareConsumer

    if args.release_delay_ms is not None and not args.release:
        raise UsageError("--release-delay-ms goes with --release")
    if args.reason is not None and not args.reject:
        raise UsageError("--reason goes with --reject")
    render = renderer(None if args.format is None else check_template(args.format, SHARE_FIELDS))
    finish, done = finisher(args)
    stop_on_sigterm()
    failure: AcknowledgementError | None = None
    with ShareConsumer(args.group, args.bootstrap, max_in_flight=in_flight_for(args.max_messages, args.max_in_flight),
                       client_id=f"lb-share-consume-{os.getpid()}") as consumer:
        consumer.subscribe([args.topic], priorities=args.priorities)

        printed = 0

        def after_batch(records: list[Any]) -> None:
            nonlocal printed
            for record in records:
                finish(record)
            printed += len(records)
            if args.max_messages is not None:  # acquire no more than will be printed
                consumer.max_in_flight = in_flight_for(max(1, args.max_messages - printed), args.max_in_flight)

        count, seconds = consume_loop(consumer, render, args.max_messages, args.timeout_ms, after_batch)
        try:
            consumer.commit()
        except AcknowledgementError as exc:
            failure = exc
    print(f"consumed {count} record(s) from {args.topic} as share group {args.group} ({done}) in {seconds:.2f}s",
          file=sys.stderr)
    if failure is not None:
        raise failure
    return EXIT_OK


def in_flight_for(max_messages: int | None, max_in_flight: int = MAX_CLI_IN_FLIGHT) -> int:
    """Acquire no more records than will be printed."""
    return max_in_flight if max_messages is None else min(max_in_flight, max_messages)


# ------------------------------------------------------------------------------ share describe


def cmd_share_describe(args: argparse.Namespace) -> int:
    from logbroker_client.admin import Admin

    with Admin(args.bootstrap) as admin:
        described = admin.describe_share_group(args.group, args.topic, priorities=args.priorities)
    write_share_group(described, sys.stdout)
    return EXIT_OK


def write_share_group(described: Any, out: Any) -> None:
    topics = ", ".join(dict.fromkeys(p.topic for p in described.partitions))
    out.write(f"share group {described.group_id} on {topics}: {described.available} available, "
              f"{described.in_flight} in flight, {described.delayed} delayed, {described.dead_lettered} "
              "dead-lettered\n")
    rows = [(p.topic, p.partition, p.start_offset, p.available, p.in_flight, p.delayed,
             human_age(p.oldest_available_age_ms), p.dead_lettered) for p in described.partitions]
    print_table(("TOPIC", "PARTITION", "START", "AVAILABLE", "IN FLIGHT", "DELAYED", "OLDEST AGE", "DEAD-LETTERED"),
                rows, out)
    members = described.in_flight_by_member()
    if not members:
        out.write("no member holds records now\n")
        return
    held = [(member, count, member_partitions(described.partitions, member))
            for member, count in sorted(members.items(), key=lambda item: (-item[1], item[0]))]
    print_table(("MEMBER", "IN FLIGHT", "PARTITIONS"), held, out)


def member_partitions(partitions: Sequence[Any], member: str) -> str:
    """jobs-0:3,jobs-1:2: where a member's records are."""
    return ",".join(f"{p.topic}-{p.partition}:{p.in_flight_by_member[member]}"
                    for p in partitions if p.in_flight_by_member.get(member))


# -------------------------------------------------------------------------------- group config


def cmd_group_config(args: argparse.Namespace) -> int:
    from logbroker_client.admin import Admin

    changes = dict(args.set)
    with Admin(args.bootstrap) as admin:
        if changes:
            admin.alter_group_configs(args.group, changes)
        configs = admin.describe_group_configs(args.group)
    for key, value in changes.items():
        print(f"group {args.group}: {key} = {value}" if value else f"group {args.group}: {key} back to its default")
    print_table(("KEY", "VALUE"), sorted(configs.items()), sys.stdout)
    return EXIT_OK


# -------------------------------------------------------------------------------- dlq redrive


def redrive_target(record: Any, to: str | None) -> str:
    if to:
        return to
    source = record.header(SOURCE_TOPIC_HEADER)
    if not source:
        raise LogbrokerError(f"the record at {record.topic}-{record.partition} offset {record.offset} has no "
                             f"{SOURCE_TOPIC_HEADER} header, so where it came from is unknown; name the topic to move "
                             "it to with --to TOPIC")
    return str(source.decode("utf-8", errors="replace"))


def without_dlq_headers(headers: Sequence[tuple[str, bytes | None]]) -> list[tuple[str, bytes | None]]:
    return [(key, value) for key, value in headers if not key.startswith(DLQ_HEADER_PREFIX)]


class Redrive:
    """Moves a batch of dead letters: produce each to its source topic, wait for the acknowledgements, then ack
    the dead letters whose copy was stored (release the others, for a later run)."""

    def __init__(self, producer: Any, to: str | None) -> None:
        self.producer = producer
        self.to = to
        self.moved: Counter[str] = Counter()
        self.failed = 0
        self.last_error = ""

    def move(self, records: Sequence[Any]) -> None:
        targets = [redrive_target(record, self.to) for record in records]  # all known before anything is sent
        sent = [(record, self.producer.send(target, value=record.value, key=record.key,
                                            headers=without_dlq_headers(record.headers)))
                for record, target in zip(records, targets, strict=True)]
        self.producer.flush()
        for record, future in sent:
            error = future.exception(0)
            if error is None:
                record.ack()
                self.moved[future.result(0).topic] += 1
            else:
                record.release(1)
                self.failed += 1
                self.last_error = str(error)


def cmd_dlq_redrive(args: argparse.Namespace) -> int:
    from logbroker_client.producer import Producer
    from logbroker_client.share import ShareConsumer

    group = args.group or DEFAULT_REDRIVE_GROUP
    idle_s = (args.timeout_ms if args.timeout_ms is not None else DEFAULT_REDRIVE_IDLE_MS) / 1000
    stop_on_sigterm()
    progress = Progress("redrive", total=args.max_messages, unit="records")
    with ShareConsumer(group, args.bootstrap, max_in_flight=in_flight_for(args.max_messages),
                       client_id=f"lb-dlq-redrive-{os.getpid()}") as consumer, \
            Producer(args.bootstrap, acks="all") as producer:
        consumer.subscribe([args.dlq])
        redrive = Redrive(producer, args.to)
        try:
            redrive_loop(consumer, redrive, progress, args.max_messages, idle_s)
        finally:
            progress.close()
    report_redrive(redrive, args.dlq)
    return EXIT_ERROR if redrive.failed else EXIT_OK


def redrive_loop(consumer: Any, redrive: Redrive, progress: Progress, max_messages: int | None,
                 idle_s: float) -> None:
    """Until max_messages are moved, or none arrives for idle_s (the DLQ is empty), or Ctrl-C."""
    last_record = time.monotonic()
    done = 0
    try:
        while max_messages is None or done < max_messages:
            wait = last_record + idle_s - time.monotonic()
            if wait <= 0:
                return
            limit = None if max_messages is None else max_messages - done
            records = consumer.poll(timeout=min(wait, 1.0), max_records=limit)
            if not records:
                continue
            last_record = time.monotonic()
            redrive.move(records)
            consumer.commit()  # each dead letter is acked only after its copy is stored
            done += len(records)
            progress.update(len(records))
            if max_messages is not None:
                consumer.max_in_flight = in_flight_for(max(1, max_messages - done))
    except KeyboardInterrupt:
        return


def report_redrive(redrive: Redrive, dlq: str) -> None:
    moved = ", ".join(f"{count} to {topic}" for topic, count in sorted(redrive.moved.items()))
    total = sum(redrive.moved.values())
    print(f"moved {total} dead letter(s) from {dlq}" + (f": {moved}" if moved else ""))
    if redrive.failed:
        print(f"lb: {redrive.failed} dead letter(s) could not be produced and stay in {dlq} (run again to retry); "
              f"the last error: {redrive.last_error}", file=sys.stderr)


# -------------------------------------------------------------------------------------- parser


def add_share_commands(sub: Any, parent: argparse.ArgumentParser) -> None:
    share = sub.add_parser("share", help="queues: consume as a share group, describe a share group")
    share_sub = share.add_subparsers(dest="share_command", required=True, metavar="COMMAND")
    consume = share_sub.add_parser(
        "consume", parents=[parent], help="print records of a queue and acknowledge them",
        description="Take records from TOPIC as a member of share group GROUP (each record goes to one member at a "
                    "time), print each and acknowledge it; --release or --reject instead, to try retries and dead "
                    "letters. Runs until Ctrl-C, --max-messages or --timeout-ms.")
    consume.add_argument("topic")
    consume.add_argument("--group", required=True, metavar="GROUP", help="the share group (the queue's workers)")
    consume.add_argument("--max-messages", type=positive_int, metavar="N", help="stop after N records")
    consume.add_argument("--timeout-ms", type=non_negative_int, metavar="T",
                         help="stop when no record arrives for T ms")
    finish = consume.add_mutually_exclusive_group()
    finish.add_argument("--release", action="store_true",
                        help="give each record back instead of acknowledging it (it is delivered again)")
    finish.add_argument("--reject", action="store_true", help="reject each record: it goes to the dead-letter topic")
    consume.add_argument("--release-delay-ms", type=non_negative_int, metavar="N",
                         help="with --release: deliver again after N ms (default: the group's retry backoff)")
    consume.add_argument("--reason", help="with --reject: the reason kept in the dead letter's lb.dlq.reason header")
    consume.add_argument("--priorities", type=priority_levels, default=1, metavar="N",
                         help="the queue has N priority lanes: TOPIC and TOPIC.p1 .. TOPIC.p<N-1> (most urgent)")
    consume.add_argument("--max-in-flight", type=positive_int, default=MAX_CLI_IN_FLIGHT, metavar="N",
                         help=f"hold at most N records at a time (default {MAX_CLI_IN_FLIGHT}; 1 takes one by one)")
    consume.add_argument("--format", metavar="TEMPLATE",
                         help="for example '{offset} {delivery_count} {value}'; fields: "
                              + " ".join("{" + name + "}" for name in SHARE_FIELDS) + " (default: {value})")
    consume.set_defaults(func=cmd_share_consume, parser=consume)
    describe = share_sub.add_parser(
        "describe", parents=[parent], help="queue depth, in flight, delayed, dead letters, per member",
        description="Per partition of TOPIC as share group GROUP sees it: where it starts, records available (the "
                    "queue depth), in flight, delayed, the oldest available record's age and the dead-lettered "
                    "count; then the records each member holds.")
    describe.add_argument("group", metavar="GROUP")
    describe.add_argument("--topic", required=True)
    describe.add_argument("--priorities", type=priority_levels, default=1, metavar="N",
                          help="describe the N priority lanes of the queue TOPIC")
    describe.set_defaults(func=cmd_share_describe, parser=describe)


def add_group_config_command(group_sub: Any, parent: argparse.ArgumentParser) -> None:
    config = group_sub.add_parser(
        "config", parents=[parent], help="show or change a group's configs",
        description="Show a group's configs (defaults included); with --set, change them first. Share groups: "
                    "share.record.lock.duration.ms, share.delivery.count.limit, share.retry.backoff (fixed or "
                    "exponential), share.retry.backoff.ms, share.retry.backoff.max.ms, share.auto.offset.reset, "
                    "share.dlq.topic, share.ordering (none or key). An empty value (KEY=) puts a key back to its "
                    "default.")
    config.add_argument("group", metavar="GROUP")
    config.add_argument("--set", type=parse_config_pair, action="append", default=[], metavar="KEY=VALUE",
                        help="change a config (repeatable)")
    config.set_defaults(func=cmd_group_config, parser=config)


def add_dlq_commands(sub: Any, parent: argparse.ArgumentParser) -> None:
    dlq = sub.add_parser("dlq", help="dead-letter topics: move dead letters back")
    dlq_sub = dlq.add_subparsers(dest="dlq_command", required=True, metavar="COMMAND")
    redrive = dlq_sub.add_parser(
        "redrive", parents=[parent], help="move dead letters back to the topic they came from",
        description="Move the records of a dead-letter topic back to their source topic (from each record's "
                    "lb.dlq.topic header, or --to), without the lb.dlq.* headers. It reads with a share group of its "
                    "own, and acknowledges a dead letter only once its copy is stored, so each is moved once. Stops "
                    "when the dead-letter topic has had nothing new for --timeout-ms.")
    redrive.add_argument("dlq", metavar="DLQ_TOPIC")
    redrive.add_argument("--group", metavar="GROUP",
                         help=f"the share group that reads it (default {DEFAULT_REDRIVE_GROUP})")
    redrive.add_argument("--to", metavar="TOPIC", help="move every record to TOPIC instead of its source topic")
    redrive.add_argument("--max-messages", type=positive_int, metavar="N", help="move at most N records")
    redrive.add_argument("--timeout-ms", type=non_negative_int, metavar="T",
                         help=f"stop when nothing arrives for T ms (default {DEFAULT_REDRIVE_IDLE_MS})")
    redrive.set_defaults(func=cmd_dlq_redrive, parser=redrive)
