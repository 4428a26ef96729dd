"""`lb share consume`, `lb share describe`, `lb group config`, `lb dlq redrive` and `lb produce --delay-ms /
--deliver-at / --priority` against a real broker, run in-process."""

from __future__ import annotations

import io
import sys
import time
from collections.abc import Iterator
from datetime import UTC, datetime

import pytest
from logbroker_client import Admin, cli

from tests.support.brokers import InProcessBroker, wait_until

DEADLINE_S = 10.0


@pytest.fixture(scope="module")
def bootstrap(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    broker = InProcessBroker(tmp_path_factory.mktemp("share-cli") / "data").start()
    try:
        yield broker.address
    finally:
        broker.stop()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def produce(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, bootstrap: str, topic: str,
            lines: str, *extra: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(lines.encode()), encoding="utf-8"))
    code, _, err = run(capsys, "produce", topic, "--bootstrap", bootstrap, *extra)
    assert code == 0, err


def share_consume(capsys: pytest.CaptureFixture[str], bootstrap: str, topic: str, group: str,
                  *extra: str) -> list[str]:
    code, out, err = run(capsys, "share", "consume", topic, "--group", group, "--bootstrap", bootstrap, *extra)
    assert code == 0, err
    return out.splitlines()


def describe_rows(capsys: pytest.CaptureFixture[str], bootstrap: str, group: str, topic: str) -> list[list[str]]:
    """The partition rows of `lb share describe`: topic, partition, start, available, in flight, delayed, oldest
    age, dead-lettered."""
    code, out, err = run(capsys, "share", "describe", group, "--topic", topic, "--bootstrap", bootstrap)
    assert code == 0, err
    lines = out.splitlines()
    assert lines[1].split()[:4] == ["TOPIC", "PARTITION", "START", "AVAILABLE"], out
    return [line.split() for line in lines[2:] if line.startswith(topic + " ")]


def test_consume_release_reject_describe_and_redrive_round_trip(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, bootstrap: str) -> None:
    Admin(bootstrap).create_topic("jobs", partitions=1)
    produce(capsys, monkeypatch, bootstrap, "jobs", "".join(f"job-{n}\n" for n in range(6)))
    code, out, err = run(capsys, "group", "config", "workers", "--set", "share.delivery.count.limit=2",
                         "--bootstrap", bootstrap)
    assert code == 0, err
    assert "group workers: share.delivery.count.limit = 2" in out
    assert ["share.delivery.count.limit", "2"] in [line.split() for line in out.splitlines()]

    printed = share_consume(capsys, bootstrap, "jobs", "workers", "--max-messages", "2",
                            "--format", "{offset} #{delivery_count} {value}")
    assert [line.split()[1:] for line in printed] == [["#1", "job-0"], ["#1", "job-1"]]
    (row,) = describe_rows(capsys, bootstrap, "workers", "jobs")
    assert row[3:6] == ["4", "0", "0"]  # available 4, none in flight, none delayed

    assert share_consume(capsys, bootstrap, "jobs", "workers", "--max-messages", "1", "--release",
                         "--release-delay-ms", "60000") == ["job-2"]
    assert share_consume(capsys, bootstrap, "jobs", "workers", "--max-messages", "1", "--reject",
                         "--reason", "broken") == ["job-3"]
    wait_until(lambda: describe_rows(capsys, bootstrap, "workers", "jobs")[0][-1] == "1", DEADLINE_S,
               "the rejected job to be dead-lettered")
    (row,) = describe_rows(capsys, bootstrap, "workers", "jobs")
    assert row[3:6] == ["2", "0", "1"] and row[6] != "-"  # job-4 and job-5 wait; job-2 is delayed

    code, out, err = run(capsys, "dlq", "redrive", "jobs.dlq", "--timeout-ms", "1000", "--bootstrap", bootstrap)
    assert code == 0, err
    assert out.strip() == "moved 1 dead letter(s) from jobs.dlq: 1 to jobs"
    code, out, err = run(capsys, "consume", "jobs", "--offset", "7", "--partition", "0", "--max-messages", "1",
                         "--format", "{value} [{headers}]", "--bootstrap", bootstrap)
    assert code == 0, err
    assert out.splitlines() == ["job-3 []"]  # back in its topic, without the lb.dlq.* headers
    code, out, _ = run(capsys, "dlq", "redrive", "jobs.dlq", "--timeout-ms", "300", "--bootstrap", bootstrap)
    assert code == 0 and out.strip() == "moved 0 dead letter(s) from jobs.dlq"  # each dead letter moves once


def test_produce_with_a_delay_holds_records_back_from_share_consumers_only(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, bootstrap: str) -> None:
    Admin(bootstrap).create_topic("alarms", partitions=1)
    produce(capsys, monkeypatch, bootstrap, "alarms", "wake up\n", "--delay-ms", "60000")
    produce(capsys, monkeypatch, bootstrap, "alarms", "at noon\n", "--deliver-at", "2999-01-01T12:00:00Z")
    code, out, err = run(capsys, "consume", "alarms", "--from-beginning", "--max-messages", "2",
                         "--format", "{value}|{headers}", "--bootstrap", bootstrap)
    assert code == 0, err
    first, second = out.splitlines()  # a plain consumer reads the log as written
    assert first.startswith("wake up|lb.deliver.at.ms=") and int(first.rsplit("=", 1)[1]) > time.time() * 1000
    assert second == f"at noon|lb.deliver.at.ms={int(datetime(2999, 1, 1, 12, tzinfo=UTC).timestamp() * 1000)}"
    assert share_consume(capsys, bootstrap, "alarms", "sleepers", "--timeout-ms", "700") == []
    wait_until(lambda: describe_rows(capsys, bootstrap, "sleepers", "alarms")[0][5] == "2", DEADLINE_S,
               "both records to show as delayed")


def test_priority_lanes_from_the_command_line(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch, bootstrap: str) -> None:
    for lane in ("builds", "builds.p1"):
        Admin(bootstrap).create_topic(lane, partitions=1)
    produce(capsys, monkeypatch, bootstrap, "builds", "nightly\n")
    produce(capsys, monkeypatch, bootstrap, "builds", "hotfix\n", "--priority", "1")
    printed = share_consume(capsys, bootstrap, "builds", "builders", "--priorities", "2", "--max-messages", "2",
                            "--format", "{topic} {value}")
    assert printed == ["builds.p1 hotfix", "builds nightly"]


def test_errors_are_one_line_and_exit_1(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch,
                                        bootstrap: str) -> None:
    Admin(bootstrap).create_topic("plain", partitions=1)
    produce(capsys, monkeypatch, bootstrap, "plain", "not a dead letter\n")
    cases = [
        (("share", "consume", "plain", "--group", ""), "group id must have 1 to 255 characters"),
        (("share", "consume", "missing", "--group", "g"), "missing"),
        (("share", "consume", "plain", "--group", "g", "--priorities", "2"), "lb topic create plain.p1"),
        (("group", "config", "g", "--set", "share.nope=1"), "unknown group config 'share.nope'"),
        (("group", "config", "g", "--set", "share.delivery.count.limit=0"), "share.delivery.count.limit must be"),
        (("dlq", "redrive", "plain", "--timeout-ms", "3000"), "has no lb.dlq.topic header"),
        (("share", "describe", "g", "--topic", "missing"), "missing"),
    ]
    for argv, message in cases:
        code, out, err = run(capsys, *argv, "--bootstrap", bootstrap)
        assert code == 1, (argv, out, err)
        assert err.startswith("lb: ") and message in err, (argv, err)
    code, _, err = run(capsys, "produce", "plain", "--delay-ms", "-5", "--bootstrap", bootstrap)
    assert code == 2 and "must be 0 or more" in err
    code, _, err = run(capsys, "share", "consume", "plain", "--group", "g", "--release-delay-ms", "5",
                       "--bootstrap", bootstrap)
    assert code == 2 and "--release-delay-ms goes with --release" in err
