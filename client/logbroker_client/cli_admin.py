"""`lb topic alter / add-partitions / move-replicas` and `lb cluster drain`: changing topics after creation.

Moves run in the cluster, not in this process: the CLI records the target and then follows the partition's
leader, printing a line per membership step (a learner added, caught up and promoted, an old replica
removed, leadership handed over), which reads the same on a terminal and in a CI log. Interrupting the CLI
does not stop a move; running the same command again follows it from where it is.
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, TextIO

from logbroker_client.errors import LogbrokerError
from logbroker_client.types import PartitionInfo, TopicPartition

EXIT_OK = 0
DEFAULT_MOVE_TIMEOUT_MS = 300_000
POLL_INTERVAL_S = 0.5


class MoveNotFinishedError(LogbrokerError):
    """A followed move did not finish within the CLI's timeout (it goes on in the cluster)."""


@dataclass(frozen=True)
class MoveView:
    """What one describe showed of a moving partition."""

    voters: tuple[int, ...]
    learners: tuple[int, ...]
    leader: int


def parse_broker_list(text: str) -> list[int]:
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of broker ids, e.g. 1,2,3") from None


def step_lines(name: str, before: MoveView | None, now: MoveView) -> list[str]:
    """One line per change between two looks at a moving partition."""
    if before is None:
        return [f"{name}: voters {_ids(now.voters)}, learners {_ids(now.learners)}, leader {now.leader}"]
    lines = []
    for node in now.learners:
        if node not in before.learners and node not in before.voters:
            lines.append(f"{name}: broker {node} added as a learner; it copies the log")
    for node in now.voters:
        if node in before.learners:
            lines.append(f"{name}: broker {node} caught up and is now a voter")
    for node in (*before.voters, *before.learners):
        if node not in now.voters and node not in now.learners:
            lines.append(f"{name}: broker {node} removed from the partition")
    if now.leader != before.leader and now.leader >= 0:
        lines.append(f"{name}: broker {now.leader} leads now")
    return lines


def move_finished(p: PartitionInfo, target: Sequence[int]) -> bool:
    """Done when the controller has recorded the target as the assignment and every replica is in sync."""
    return not p.target_replicas and p.replicas == list(target) and sorted(p.isr) == sorted(target)


def follow_moves(admin: Any, moves: dict[TopicPartition, list[int]], timeout_s: float, out: TextIO) -> None:
    """Print each step of the moves until all are done; MoveNotFinishedError when the time runs out."""
    views: dict[TopicPartition, MoveView] = {}
    pending = dict(moves)
    deadline = time.monotonic() + timeout_s
    while pending:
        described = {t.name: t for t in admin.describe_topics(sorted({tp.topic for tp in pending}))}
        for tp, target in list(pending.items()):
            p = described[tp.topic].partitions[tp.partition]
            name = f"{tp.topic}-{tp.partition}"
            if p.target_replicas and p.target_replicas != target:
                raise MoveNotFinishedError(f"{name} is now being moved to {_ids(p.target_replicas)} by another "
                                           f"request; follow that one (`lb topic describe {tp.topic}`)")
            if move_finished(p, target):
                out.write(f"{name}: done: replicas {_ids(p.replicas)}, in sync {_ids(p.isr)}, leader {p.leader_id}\n")
                del pending[tp]
                continue
            if p.voters:
                view = MoveView(tuple(p.voters), tuple(p.learners), p.leader_id)
                for line in step_lines(name, views.get(tp), view):
                    out.write(line + "\n")
                views[tp] = view
        out.flush()
        if pending and time.monotonic() >= deadline:
            still = ", ".join(f"{tp.topic}-{tp.partition}" for tp in pending)
            raise MoveNotFinishedError(f"{still} still moving after {timeout_s:.0f} s; the move goes on in the "
                                       "cluster: run the same command again to follow it")
        if pending:
            time.sleep(POLL_INTERVAL_S)


def _ids(nodes: Sequence[int]) -> str:
    return ",".join(map(str, nodes)) or "-"


# ------------------------------------------------------------------------------------------ commands


def cmd_topic_alter(args: argparse.Namespace) -> int:
    from logbroker_client.admin import Admin
    from logbroker_client.cli import UsageError

    if not args.config and not args.delete_config:
        raise UsageError("give at least one --config KEY=VALUE or --delete-config KEY")
    with Admin(args.bootstrap) as admin:
        overrides = admin.alter_topic_configs(args.name, dict(args.config), args.delete_config)
    print(f"altered topic {args.name}; its overrides are now: "
          + (", ".join(f"{k}={v}" for k, v in sorted(overrides.items())) or "none (broker defaults)"))
    return EXIT_OK


def cmd_topic_add_partitions(args: argparse.Namespace) -> int:
    from logbroker_client.admin import Admin

    with Admin(args.bootstrap) as admin:
        admin.add_partitions(args.name, args.to)
    print(f"topic {args.name} now has {args.to} partitions")
    return EXIT_OK


def cmd_topic_move_replicas(args: argparse.Namespace) -> int:
    from logbroker_client.admin import Admin

    with Admin(args.bootstrap) as admin:
        admin.move_replicas(args.name, args.partition, args.to)
        print(f"{args.name}-{args.partition}: moving to brokers {_ids(args.to)}", flush=True)
        if not args.no_wait:
            follow_moves(admin, {TopicPartition(args.name, args.partition): args.to}, args.timeout_ms / 1000,
                         sys.stdout)
    return EXIT_OK


def cmd_cluster_drain(args: argparse.Namespace) -> int:
    from logbroker_client.admin import Admin

    with Admin(args.bootstrap) as admin:
        plan = admin.drain_broker(args.broker)
        if not plan:
            print(f"broker {args.broker} holds no replica; nothing to move")
            return EXIT_OK
        for tp, target in sorted(plan.items()):
            print(f"{tp.topic}-{tp.partition}: moving to brokers {_ids(target)}", flush=True)
        if not args.no_wait:
            follow_moves(admin, plan, args.timeout_ms / 1000, sys.stdout)
            print(f"broker {args.broker} holds no replica now")
    return EXIT_OK


def add_topic_change_commands(topic_sub: Any, parent: argparse.ArgumentParser) -> None:
    from logbroker_client.cli import parse_config_pair, positive_int

    alter = topic_sub.add_parser("alter", parents=[parent], help="change a topic's configs, applied at once")
    alter.add_argument("name")
    alter.add_argument("--config", type=parse_config_pair, action="append", default=[], metavar="KEY=VALUE",
                       help="a setting such as retention.ms=86400000 (repeatable)")
    alter.add_argument("--delete-config", action="append", default=[], metavar="KEY",
                       help="put a setting back to the broker default (repeatable)")
    alter.set_defaults(func=cmd_topic_alter, parser=alter)
    add = topic_sub.add_parser("add-partitions", parents=[parent], help="grow a topic's partition count")
    add.add_argument("name")
    add.add_argument("--to", type=positive_int, required=True, metavar="N", help="the new partition count")
    add.set_defaults(func=cmd_topic_add_partitions, parser=add)
    move = topic_sub.add_parser("move-replicas", parents=[parent], help="move a partition's replicas to other brokers")
    move.add_argument("name")
    move.add_argument("--partition", type=int, required=True, metavar="P")
    move.add_argument("--to", type=parse_broker_list, required=True, metavar="ID[,ID...]",
                      help="the brokers to hold the partition; the first is its preferred leader")
    _add_follow_options(move)
    move.set_defaults(func=cmd_topic_move_replicas, parser=move)


def add_cluster_change_commands(cluster_sub: Any, parent: argparse.ArgumentParser) -> None:
    drain = cluster_sub.add_parser("drain", parents=[parent], help="move every replica off a broker")
    drain.add_argument("broker", type=int, metavar="BROKER", help="the broker's node id")
    _add_follow_options(drain)
    drain.set_defaults(func=cmd_cluster_drain, parser=drain)


def _add_follow_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--no-wait", action="store_true", help="record the move and return without following it")
    parser.add_argument("--timeout-ms", type=int, default=DEFAULT_MOVE_TIMEOUT_MS,
                        help=f"how long to follow the move (default {DEFAULT_MOVE_TIMEOUT_MS})")
