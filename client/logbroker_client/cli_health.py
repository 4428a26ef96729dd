"""`lb health`: is every partition served, and fully replicated?

Exit 0 with one line when every partition of every topic has a live leader and its whole replica set in sync;
otherwise exit 1 with a table of the partitions that do not (leader or "offline", replicas, in-sync set) and,
for each, what to do. The answer comes from DescribeTopics (the leaders' own views of their in-sync sets),
corrected by which brokers answer their health check now, as `lb topic describe` does; like every admin call it
tries each bootstrap address in turn.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Mapping
from typing import Any, TextIO

from logbroker_client.cli import EXIT_ERROR, EXIT_OK, print_table
from logbroker_client.metadata import DOWN, NO_ANSWER, NOT_READY


def plural(count: int, word: str) -> str:
    return f"{count} {word}" if count == 1 else f"{count} {word}s"


def cmd_health(args: argparse.Namespace) -> int:
    from logbroker_client.admin import Admin

    with Admin(args.bootstrap) as admin:
        states = admin.broker_states()
        topics = admin.describe_topics(broker_states=states)
        addresses = admin.broker_addresses()
    return report_health(topics, states, addresses, sys.stdout)


def report_health(topics: list[Any], states: Mapping[int, str], addresses: Mapping[int, str], out: TextIO) -> int:
    partitions = sum(len(t.partitions) for t in topics)
    rows = []
    for topic in sorted(topics, key=lambda t: t.name):
        for p in topic.partitions:
            if p.offline or set(p.isr) != set(p.replicas):
                rows.append((topic.name, p.partition, "offline" if p.offline else p.leader_id,
                             ",".join(map(str, p.replicas)), "-" if p.offline else ",".join(map(str, p.isr)) or "-",
                             advice(p, states, addresses)))
    not_up = sorted(node for node, state in states.items() if state != "up")
    if not rows:
        out.write(f"healthy: {plural(len(topics), 'topic')}, {plural(partitions, 'partition')}, all with a leader "
                  "and a full in-sync set\n")
        if not_up:  # brokers that hold no replica: nothing is at risk, but they are not serving
            out.write(f"note: {describe_brokers(not_up, states, addresses)} (holding no replica)\n")
        return EXIT_OK
    offline = sum(1 for row in rows if row[2] == "offline")
    out.write(f"unhealthy: {len(rows)} of {plural(partitions, 'partition')} in {plural(len(topics), 'topic')} "
              f"need attention ({offline} offline, {len(rows) - offline} under-replicated)\n")
    print_table(("TOPIC", "PARTITION", "LEADER", "REPLICAS", "ISR", "WHAT TO DO"), rows, out)
    return EXIT_ERROR


def describe_brokers(nodes: list[int], states: Mapping[int, str], addresses: Mapping[int, str]) -> str:
    return ", ".join(f"broker {node} ({addresses.get(node, '?')}) is {states.get(node, DOWN)}" for node in nodes)


def advice(p: Any, states: Mapping[int, str], addresses: Mapping[int, str]) -> str:
    """What brings the partition back to a live leader and a full in-sync set."""
    missing = [node for node in p.replicas if node not in p.isr or p.offline]
    down = [node for node in missing if states.get(node, DOWN) == DOWN]
    silent = [node for node in missing if states.get(node) == NO_ANSWER]
    starting = [node for node in missing if states.get(node) == NOT_READY]
    steps = []
    if down:
        steps.append(f"start broker {' and '.join(map(str, down))} "
                     f"({', '.join(addresses.get(n, '?') for n in down)})")
    if silent:
        steps.append(f"broker {' and '.join(map(str, silent))} does not answer (paused, overloaded or cut off): "
                     "see its log")
    if starting:
        steps.append(f"broker {' and '.join(map(str, starting))} is starting: check again shortly")
    if p.offline:
        majority = len(p.replicas) // 2 + 1
        up = len(p.replicas) - len(down) - len(silent)
        if not steps or up >= majority:
            return "; ".join([*steps, "a leader is being elected: check again shortly"])
        if up == 0:
            return "; ".join(steps) + " (no replica is up)"
        return "; ".join(steps) + f" (a leader needs {majority} of the {len(p.replicas)} replicas up; {up} are)"
    caught_up = [node for node in missing if node not in down and node not in silent and node not in starting]
    if caught_up:
        steps.append(f"broker {' and '.join(map(str, caught_up))} is catching up with the leader: check again "
                     "shortly (if it lasts, see that broker's log)")
    return "; ".join(steps) + ("; the replica catches up by itself once back" if down or silent else "")


def add_health_command(sub: Any, parent: argparse.ArgumentParser) -> None:
    health = sub.add_parser(
        "health", parents=[parent], help="exit 0 if every partition has a leader and a full in-sync set",
        description="Check every partition of every topic: exit 0 and say so when each has a live leader and all "
                    "its replicas in sync; otherwise list those that do not, with what to do, and exit 1.")
    health.set_defaults(func=cmd_health, parser=health)
