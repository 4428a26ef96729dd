"""`lb consume --group` and `lb group ...` against a real broker, run in-process."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from logbroker_client import Admin, Consumer, Producer, cli

from tests.support.brokers import InProcessBroker

SESSION_MS = 2_000


@pytest.fixture
def bootstrap(tmp_path: Path) -> Iterator[str]:
    broker = InProcessBroker(tmp_path / "data", group_session_timeout_ms=SESSION_MS,  # type: ignore[arg-type]
                             group_heartbeat_interval_ms=200).start()
    try:
        yield broker.address
    finally:
        broker.stop()


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def orders(bootstrap: str, count: int, start: int = 0) -> None:
    Admin(bootstrap).create_topic("orders", partitions=3) if start == 0 else None
    with Producer(bootstrap) as producer:
        for n in range(start, start + count):
            producer.send("orders", value=b"order-%d" % n, key=b"user-%d" % n)
        assert producer.flush() == 0


def consume(capsys: pytest.CaptureFixture[str], bootstrap: str, *extra: str, idle_ms: int = 1000) -> list[str]:
    code, out, err = run(capsys, "consume", "orders", "--group", "shop", "--timeout-ms", str(idle_ms),
                         "--bootstrap", bootstrap, *extra)
    assert code == 0, err
    return out.split()


def table(out: str, header: str) -> list[list[str]]:
    """The rows of the table whose header line starts with `header`."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(header))
    rows = []
    for line in lines[start + 1:]:
        if not line or ":" in line or line.startswith(("MEMBER", "TOPIC")):  # a summary line or the next table
            break
        rows.append(line.split())
    return rows


@pytest.mark.slow  # 8 s: make test-slow; the README test runs the same story (resume, lag 0, reset) by default
def test_a_group_resumes_where_it_left_off_shows_lag_0_and_replays_after_a_reset(
        capsys: pytest.CaptureFixture[str], bootstrap: str) -> None:
    orders(bootstrap, 12)
    # A new group starts at the end (and commits it). The idle clock starts once the member holds its
    # partitions, so a slow join on a loaded machine does not end the run before it could commit anything.
    assert consume(capsys, bootstrap) == []
    assert sorted(consume(capsys, bootstrap, "--from-beginning", "--max-messages", "5")) == []  # not new any more
    code, out, _ = run(capsys, "group", "delete", "shop", "--bootstrap", bootstrap)
    assert code == 0 and "deleted group shop" in out
    first = consume(capsys, bootstrap, "--from-beginning", "--max-messages", "5")
    rest = consume(capsys, bootstrap)
    assert len(first) == 5 and sorted(first + rest) == sorted(f"order-{n}" for n in range(12))

    code, out, _ = run(capsys, "group", "describe", "shop", "--bootstrap", bootstrap)
    assert code == 0 and out.startswith("group shop: empty, 0 member(s)")
    rows = table(out, "TOPIC")
    assert [row[:2] for row in rows] == [["orders", "0"], ["orders", "1"], ["orders", "2"]]
    assert all(row[2] == row[3] and row[4] == "0" for row in rows), out  # committed = log end, lag 0
    assert out.rstrip().endswith("total lag: 0")
    code, out, _ = run(capsys, "group", "list", "--bootstrap", bootstrap)
    assert code == 0 and table(out, "GROUP") == [["shop", "empty", "0"]]

    code, out, _ = run(capsys, "group", "reset-offsets", "shop", "--topic", "orders", "--to-earliest",
                       "--dry-run", "--bootstrap", bootstrap)
    assert code == 0 and "dry run: nothing was changed" in out
    assert all(row[3] == "0" for row in table(out, "TOPIC")), out
    assert consume(capsys, bootstrap) == []  # the dry run moved nothing
    code, out, _ = run(capsys, "group", "reset-offsets", "shop", "--topic", "orders", "--to-earliest",
                       "--bootstrap", bootstrap)
    assert code == 0 and "group shop now resumes orders at these offsets (3 partition(s))" in out
    assert sorted(consume(capsys, bootstrap)) == sorted(f"order-{n}" for n in range(12))  # replayed


def test_describe_shows_members_with_client_id_host_partitions_and_lag(
        capsys: pytest.CaptureFixture[str], bootstrap: str) -> None:
    orders(bootstrap, 9)
    with Consumer(bootstrap, group_id="shop", client_id="billing-7", auto_offset_reset="earliest",
                  enable_auto_commit=False, session_timeout_ms=SESSION_MS) as member:
        member.subscribe(["orders"])
        read = 0
        deadline = time.monotonic() + 10
        while read < 9:
            assert time.monotonic() < deadline, "the member did not read the topic"
            read += len(member.poll(timeout=0.2))
        member.commit()
        orders(bootstrap, 3, start=9)  # three more, not consumed: lag 3
        code, out, _ = run(capsys, "group", "describe", "shop", "--bootstrap", bootstrap)
        assert code == 0 and out.startswith("group shop: stable, 1 member(s)")
        (member_row,) = table(out, "MEMBER")
        assert member_row[2] == "billing-7" and member_row[-1] == "orders-0,1,2"
        assert {row[5] for row in table(out, "TOPIC")} == {"billing-7"}
        assert out.rstrip().endswith("total lag: 3")

        code, _, err = run(capsys, "group", "reset-offsets", "shop", "--topic", "orders", "--to-latest",
                           "--bootstrap", bootstrap)
        assert code == 1 and err.startswith("lb: group 'shop' has 1 live member(s) (billing-7)")
        assert "stop its consumers" in err and err.count("\n") == 1
        code, _, err = run(capsys, "group", "delete", "shop", "--bootstrap", bootstrap)
        assert code == 1 and "live member" in err


def test_bad_group_input_is_one_error_line(capsys: pytest.CaptureFixture[str], bootstrap: str) -> None:
    orders(bootstrap, 1)
    code, out, err = run(capsys, "group", "describe", "nope", "--bootstrap", bootstrap)
    assert (code, out) == (1, "") and err == "lb: group 'nope' does not exist (no member and no committed offset)\n"
    code, _, err = run(capsys, "group", "describe", "", "--bootstrap", bootstrap)
    assert code == 1 and err.startswith("lb: a group id must have 1 to 255 characters, got an empty one")
    code, _, err = run(capsys, "consume", "orders", "--group", "g" * 256, "--bootstrap", bootstrap)
    assert code == 1 and err == "lb: a group id must have 1 to 255 characters, got 256\n"
    code, _, err = run(capsys, "consume", "ghost", "--group", "shop", "--bootstrap", bootstrap)
    assert code == 1 and "ghost" in err
    code, _, err = run(capsys, "group", "reset-offsets", "shop", "--topic", "orders", "--to-offset", "-1")
    assert code == 2 and "must be 0 or more" in err
    code, _, err = run(capsys, "group", "reset-offsets", "shop", "--topic", "orders")
    assert code == 2 and "one of the arguments" in err
    code, _, err = run(capsys, "consume", "orders", "--group", "shop", "--partition", "0")
    assert code == 2 and "--group reads the partitions the group's coordinator assigns" in err
    code, _, err = run(capsys, "group", "reset-offsets", "shop", "--topic", "orders", "--shift-by", "-1",
                       "--bootstrap", bootstrap)
    assert code == 1 and err.startswith("lb: orders-0 has no committed offset to shift")
