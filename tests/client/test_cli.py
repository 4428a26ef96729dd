"""The `lb` command line: run in-process against a real broker, plus one run of the installed script."""

from __future__ import annotations

import io
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest
from logbroker_client import cli
from logbroker_client.progress import Progress

from tests.support.brokers import free_port


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def feed_stdin(monkeypatch: pytest.MonkeyPatch, text: str) -> None:
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(text.encode()), encoding="utf-8"))


def iso(ms: int) -> str:
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


# ------------------------------------------------------------------------------ pure helpers


def test_parse_timestamp_accepts_iso_with_zone_naive_as_utc_and_plain_ms() -> None:
    assert cli.parse_timestamp("2026-11-24T10:00:00Z") == 1795514400000
    assert cli.parse_timestamp("2026-11-24T10:00:00") == 1795514400000  # naive means UTC
    assert cli.parse_timestamp("2026-11-24T12:00:00+02:00") == 1795514400000
    assert cli.parse_timestamp("2026-11-24T10:00:00.250Z") == 1795514400250
    assert cli.parse_timestamp("1795514400000") == 1795514400000


@pytest.mark.parametrize("bad", ["yesterday", "2026-13-01T00:00:00Z", "1969-12-31T23:59:59Z", "-5"])
def test_parse_timestamp_rejects_nonsense(bad: str) -> None:
    with pytest.raises(Exception, match="ISO 8601|before 1970"):
        cli.parse_timestamp(bad)


def test_split_key_at_first_separator_and_null_key_without_one() -> None:
    assert cli.split_key(b"user-1:a:b", b":") == (b"user-1", b"a:b")
    assert cli.split_key(b"no separator here", b":") == (None, b"no separator here")
    assert cli.split_key(b"k:v", None) == (None, b"k:v")


def test_template_escapes_and_unknown_fields() -> None:
    assert cli.check_template(r"{key}\t{value}\n") == "{key}\t{value}\n"
    with pytest.raises(cli.UsageError, match=r"unknown field \{colour\}"):
        cli.check_template("{colour}")


def test_progress_writes_plain_lines_when_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    stream = io.StringIO()
    progress = Progress("produce", total=100, stream=stream, plain_interval_s=0.0)
    progress.update(50, 5000)
    progress.close()
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
    assert stream.getvalue().startswith("produce: 50/100 records")
    quiet = io.StringIO()
    Progress("bench", total=10, stream=quiet, mode="tty", plain_interval_s=0.0).update(5)
    assert quiet.getvalue() == ""  # benchmarks show progress on a terminal only


def test_progress_draws_a_bar_on_a_terminal_unless_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.delenv("CI", raising=False)
    stream = Terminal()
    progress = Progress("produce", total=10, stream=stream)
    progress._next_draw = 0.0  # draw on the next update
    progress.update(5)
    progress.close()
    assert stream.getvalue().startswith("\rproduce [") and "50%" in stream.getvalue()
    monkeypatch.setenv("CI", "true")
    ci = Terminal()
    ci_progress = Progress("produce", total=10, stream=ci, plain_interval_s=0.0)
    ci_progress.update(5)
    assert not ci.getvalue().startswith("\r")


# ------------------------------------------------------------------------------ usage errors


class JoiningMember:
    """A group member whose coordinator hands it a partition only after `join_s`; the partition's one record
    is fetched on the poll after that. Stands in for a Consumer in consume_loop."""

    def __init__(self, join_s: float) -> None:
        self.joined_at = time.monotonic() + join_s
        self.delivered = False

    def assignment(self) -> set[str]:
        return {"orders-0"} if time.monotonic() >= self.joined_at else set()

    def poll(self, timeout: float, max_records: int | None = None) -> list[str]:
        if self.assignment() and not self.delivered:
            self.delivered = True
            return ["order-1"]
        time.sleep(min(timeout, 0.02))
        return []


def test_a_group_members_idle_clock_starts_when_it_is_given_its_partitions(
        capsys: pytest.CaptureFixture[str]) -> None:
    member = JoiningMember(join_s=0.5)
    count, seconds = cli.consume_loop(member, str, None, timeout_ms=200, assignment=member.assignment)
    assert count == 1 and capsys.readouterr().out == "order-1\n"
    assert 0.5 + 0.2 <= seconds < 5  # idle for 200 ms after the record, not 200 ms from the start
    # Without the assignment (a plain assign()ed consumer) the clock runs from the start.
    count, seconds = cli.consume_loop(JoiningMember(join_s=0.5), str, None, timeout_ms=200)
    assert count == 0 and seconds < 0.5


def test_a_group_member_never_given_partitions_stops_after_the_join_wait(
        capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(cli, "GROUP_JOIN_WAIT_S", 0.3)
    member = JoiningMember(join_s=3600)  # more members than partitions: this one is never given any
    count, seconds = cli.consume_loop(member, str, None, timeout_ms=100, assignment=member.assignment)
    assert count == 0 and 0.3 <= seconds < 3


def test_offset_without_partition_is_a_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    code, out, err = run(capsys, "consume", "orders", "--offset", "5", "--bootstrap", "127.0.0.1:1")
    assert code == 2
    assert "usage: lb consume" in err and "--offset needs --partition" in err
    assert out == ""


def test_conflicting_start_options_and_bad_values_are_usage_errors(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "consume", "t", "--from-beginning", "--offset", "1", "--partition", "0")[0] == 2
    assert run(capsys, "consume", "t", "--from-timestamp", "soon")[0] == 2
    assert run(capsys, "topic", "create", "t", "--config", "novalue")[0] == 2
    code, _, err = run(capsys, "produce", "t", "--acks", "2")
    assert code == 2 and "invalid choice" in err


# ------------------------------------------------------------------------------ against a broker


def test_topic_create_list_describe_delete(capsys: pytest.CaptureFixture[str], bootstrap: str) -> None:
    code, out, err = run(capsys, "topic", "create", "orders", "--partitions", "3", "--config",
                         "retention.ms=3600000", "--bootstrap", bootstrap)
    assert (code, err) == (0, "") and "created topic orders" in out
    assert run(capsys, "--bootstrap", bootstrap, "topic", "create", "audit", "--partitions", "1")[0] == 0

    code, out, _ = run(capsys, "topic", "list", "--bootstrap", bootstrap)
    assert code == 0 and out.split() == ["audit", "orders"]

    code, out, _ = run(capsys, "topic", "describe", "orders", "--bootstrap", bootstrap)
    lines = out.splitlines()
    assert code == 0 and lines[0] == "topic orders: 3 partition(s), replication factor 1"
    assert lines[1].split() == ["PARTITION", "LEADER", "REPLICAS", "ISR", "LOG", "START", "HIGH", "WATERMARK", "SIZE"]
    # Each partition's leader wrote one no-op control batch when it was elected: the high watermark is 1.
    assert [line.split()[:6] for line in lines[2:5]] == [[str(p), "1", "1", "1", "0", "1"] for p in range(3)]
    assert "  retention.ms = 3600000" in lines

    code, out, err = run(capsys, "topic", "delete", "audit", "--bootstrap", bootstrap)
    assert code == 0 and "deleted topic audit" in out
    assert run(capsys, "topic", "list", "--bootstrap", bootstrap)[1].split() == ["orders"]
    code, _, err = run(capsys, "topic", "delete", "audit", "--bootstrap", bootstrap)
    assert code == 1 and err.startswith("lb: ") and "does not exist" in err


def test_cluster_describe_lists_the_broker_as_controller(capsys: pytest.CaptureFixture[str], bootstrap: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOGBROKER_BOOTSTRAP", bootstrap)  # the default when --bootstrap is absent
    code, out, _ = run(capsys, "cluster", "describe")
    assert code == 0
    assert [line.split() for line in out.splitlines()[-2:]] == [["NODE", "ID", "ADDRESS", "STATUS", "CONTROLLER"],
                                                                ["1", bootstrap, "up", "*"]]


def test_produce_keyed_lines_then_consume_from_an_offset(capsys: pytest.CaptureFixture[str], bootstrap: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(capsys, "topic", "create", "events", "--partitions", "2", "--bootstrap", bootstrap)[0] == 0
    lines = [f"user-{i}:value {i}:with colon" for i in range(10)] + ["no key here"]
    feed_stdin(monkeypatch, "\n".join(lines) + "\n")
    code, out, err = run(capsys, "produce", "events", "--partition", "1", "--key-separator", ":",
                         "--acks", "all", "--bootstrap", bootstrap)
    assert code == 0, err
    # Offset 0 holds the partition leader's no-op control batch, so the records take offsets 1..11.
    assert "produced 11 record(s)" in out and "to 1 partition(s)" in out and "offsets 1:1..11" in out

    code, out, err = run(capsys, "consume", "events", "--partition", "1", "--offset", "5", "--timeout-ms", "1000",
                         "--format", "{partition}/{offset} [{key}] {value}", "--bootstrap", bootstrap)
    assert code == 0
    expected = [f"1/{i + 1} [user-{i}] value {i}:with colon" for i in range(4, 10)] + ["1/11 [] no key here"]
    assert out.splitlines() == expected
    assert "consumed 7 record(s) from 1 partition(s)" in err

    # Default output is the value alone; --max-messages stops early; all partitions by default.
    code, out, _ = run(capsys, "consume", "events", "--from-beginning", "--max-messages", "3",
                       "--bootstrap", bootstrap)
    assert code == 0 and out.splitlines() == [f"value {i}:with colon" for i in range(3)]


def test_consume_from_timestamp_starts_at_first_record_at_or_after_it(
        capsys: pytest.CaptureFixture[str], bootstrap: str, monkeypatch: pytest.MonkeyPatch) -> None:
    from logbroker_client.producer import Producer

    assert run(capsys, "topic", "create", "clicks", "--partitions", "2", "--bootstrap", bootstrap)[0] == 0
    old = int(time.time() * 1000) - 3_600_000  # an hour ago, one second apart
    with Producer(bootstrap, acks="all") as producer:
        for i in range(4):
            producer.send("clicks", f"old {i}".encode(), partition=0, timestamp_ms=old + i * 1000)
        producer.send("clicks", b"old p1", partition=1, timestamp_ms=old)
    feed_stdin(monkeypatch, "new 0\nnew 1\n")
    assert run(capsys, "produce", "clicks", "--partition", "0", "--bootstrap", bootstrap)[0] == 0

    # Between old 1 and old 2: partition 0 starts at old 2; partition 1 has nothing that late (its end).
    code, out, _ = run(capsys, "consume", "clicks", "--from-timestamp", iso(old + 1500), "--timeout-ms", "1000",
                       "--format", "{partition}:{value}", "--bootstrap", bootstrap)
    assert code == 0 and out.splitlines() == ["0:old 2", "0:old 3", "0:new 0", "0:new 1"]

    # Exactly at a record's time includes it; a time after every old record gives only the new ones.
    code, out, _ = run(capsys, "consume", "clicks", "--from-timestamp", str(old + 3000), "--timeout-ms", "500",
                       "--bootstrap", bootstrap)
    assert out.splitlines() == ["old 3", "new 0", "new 1"]
    code, out, _ = run(capsys, "consume", "clicks", "--from-timestamp", iso(old + 60_000), "--timeout-ms", "500",
                       "--format", "{value} {timestamp}", "--bootstrap", bootstrap)
    assert [line.split()[0] + " " + line.split()[1] for line in out.splitlines()] == ["new 0", "new 1"]
    assert all(int(line.split()[-1]) > old + 60_000 for line in out.splitlines())


def test_failed_records_are_counted_and_exit_non_zero(capsys: pytest.CaptureFixture[str], bootstrap: str,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    assert run(capsys, "topic", "create", "small", "--partitions", "1", "--config", "max.message.bytes=200",
               "--bootstrap", bootstrap)[0] == 0
    feed_stdin(monkeypatch, "x" * 1000 + "\n")
    code, out, err = run(capsys, "produce", "small", "--bootstrap", bootstrap)
    assert code == 1
    assert "produced 0 record(s), 1 failed" in out
    assert err.startswith("lb: 1 of 1 record(s) failed") and "max.message.bytes" in err
    assert err.count("\n") == 1  # the client's own warning is not repeated without --verbose
    feed_stdin(monkeypatch, "x" * 1000 + "\n")
    code, _, err = run(capsys, "--verbose", "produce", "small", "--bootstrap", bootstrap)
    assert code == 1 and "lb: logbroker_client.producer: small-0: 1 record(s) failed" in err


def test_unknown_topic_is_one_error_line_and_exit_1(capsys: pytest.CaptureFixture[str], bootstrap: str,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    for argv in (["consume", "ghost", "--timeout-ms", "100"], ["topic", "describe", "ghost"]):
        code, out, err = run(capsys, *argv, "--bootstrap", bootstrap)
        assert code == 1 and out == ""
        assert err == "lb: topic 'ghost' does not exist; create it with `lb topic create ghost --partitions N`\n"
    feed_stdin(monkeypatch, "a\n")
    code, _, err = run(capsys, "produce", "ghost", "--bootstrap", bootstrap)
    assert code == 1 and err.startswith("lb: topic 'ghost' does not exist")


def test_offset_out_of_range_shows_the_valid_range(capsys: pytest.CaptureFixture[str], bootstrap: str) -> None:
    assert run(capsys, "topic", "create", "empty", "--partitions", "1", "--bootstrap", bootstrap)[0] == 0
    code, out, err = run(capsys, "consume", "empty", "--partition", "0", "--offset", "7", "--timeout-ms", "2000",
                         "--bootstrap", bootstrap)
    assert code == 1 and out == ""
    assert err.startswith("lb: ") and "valid offsets are 0..1" in err and err.count("\n") == 1


def test_invalid_topic_name_is_rejected_with_the_rule(capsys: pytest.CaptureFixture[str], bootstrap: str) -> None:
    code, out, err = run(capsys, "topic", "create", "bad name!", "--partitions", "1", "--bootstrap", bootstrap)
    assert code == 1 and out == ""
    assert err.startswith("lb: topic name 'bad name!' has characters outside [A-Za-z0-9._-]")
    assert err.count("\n") == 1


def test_unreachable_bootstrap_is_one_error_line(capsys: pytest.CaptureFixture[str]) -> None:
    address = f"127.0.0.1:{free_port()}"  # nothing listens there
    for argv in (["topic", "list"], ["cluster", "describe"], ["consume", "orders", "--timeout-ms", "100"]):
        code, out, err = run(capsys, *argv, "--bootstrap", address)
        assert code == 1 and out == ""
        assert err.startswith(f"lb: cannot reach a broker at {address}") and err.count("\n") == 1
        assert "Traceback" not in err
    code, _, err = run(capsys, "topic", "list", "--bootstrap", "no-port-here")
    assert code == 1 and err.startswith("lb: bootstrap address 'no-port-here' is not HOST:PORT")


def test_installed_lb_script_produces_and_consumes(bootstrap: str, tmp_path: Path) -> None:
    script = Path(sys.executable).with_name("lb")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "logbroker_client.cli"]
    env = {**os.environ, "LOGBROKER_BOOTSTRAP": bootstrap, "CI": "true"}

    def lb(*argv: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([*command, *argv], input=stdin, capture_output=True, text=True, env=env, timeout=60)

    assert lb("topic", "create", "script", "--partitions", "1").returncode == 0
    produced = lb("produce", "script", "--key-separator", "=", stdin="a=1\nb=2\nc=3\n")
    assert produced.returncode == 0, produced.stderr
    consumed = lb("consume", "script", "--from-beginning", "--max-messages", "3", "--format", "{key}\\t{value}")
    assert consumed.returncode == 0, consumed.stderr
    assert consumed.stdout == "a\t1\nb\t2\nc\t3\n"
    assert consumed.stderr.strip().startswith("consumed 3 record(s)")
    usage = lb("consume", "script", "--offset", "1")
    assert usage.returncode == 2 and "--offset needs --partition" in usage.stderr



def test_version_comes_from_the_package_metadata(capsys: pytest.CaptureFixture[str]) -> None:
    from importlib import metadata

    code, out, _ = run(capsys, "--version")
    assert code == 0 and out == f"lb {metadata.version('logbroker')}\n"


def test_when_no_address_answers_the_error_names_every_one_tried(capsys: pytest.CaptureFixture[str],
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    dead = [f"127.0.0.1:{free_port()}" for _ in range(3)]
    code, out, err = run(capsys, "topic", "describe", "--bootstrap", ",".join(dead))
    assert code == 1 and out == ""
    assert err == (f"lb: cannot reach a broker at {', '.join(dead)} (connection refused); is it running? "
                   "`make run` (or `logbroker dev`) starts a local cluster\n")
    # Nobody named a broker: the error says which default it tried and how to name one.
    monkeypatch.delenv("LOGBROKER_BOOTSTRAP", raising=False)
    monkeypatch.setattr("logbroker_client.connection.DEFAULT_BOOTSTRAP", dead[0])
    code, _, err = run(capsys, "topic", "list")
    assert code == 1 and err.endswith(f"no broker was named, so the default {dead[0]} was tried: "
                                      "set LOGBROKER_BOOTSTRAP or pass --bootstrap HOST:PORT\n")


def test_a_dead_address_before_a_live_one_is_passed_over(capsys: pytest.CaptureFixture[str], bootstrap: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("LOGBROKER_BOOTSTRAP", f"127.0.0.1:{free_port()},{bootstrap}")
    assert run(capsys, "topic", "create", "passed", "--partitions", "1")[0] == 0
    feed_stdin(monkeypatch, "a\nb\n")
    code, out, err = run(capsys, "produce", "passed")
    assert code == 0 and "produced 2 record(s)" in out, err
    code, out, err = run(capsys, "consume", "passed", "--from-beginning", "--max-messages", "2")
    assert (code, out) == (0, "a\nb\n"), err
    code, out, err = run(capsys, "topic", "describe", "passed")
    assert code == 0 and out.splitlines()[2].split()[:2] == ["0", "1"], err
