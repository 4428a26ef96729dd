"""`logbroker dev` supervises its brokers: a killed broker is reported (which, how, where its log is), the
others keep serving, the dead one is started again and serves, and Ctrl-C stops every broker."""

from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO

import grpc
import pytest
from logbroker_client import Admin, Producer
from logbroker_client.connection import Connection
from logbroker_client.proto import logbroker_pb2 as pb

from tests.support.brokers import REPO_ROOT, wait_until
from tests.support.dev_ports import free_dev_base_port

START_TIMEOUT_S = 60.0


class Lines:
    """The supervisor's output, read by a thread as it comes, searchable with a deadline."""

    def __init__(self, stream: IO[str]) -> None:
        self.lines: list[str] = []
        self._changed = threading.Condition()
        threading.Thread(target=self._read, args=(stream,), daemon=True).start()

    def _read(self, stream: IO[str]) -> None:
        for line in stream:
            with self._changed:
                self.lines.append(line.rstrip("\n"))
                self._changed.notify_all()

    def find(self, pattern: str) -> re.Match[str] | None:
        with self._changed:
            return next((m for m in map(re.compile(pattern).search, self.lines) if m), None)

    def wait_for(self, pattern: str, timeout_s: float) -> re.Match[str]:
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while True:
                found = next((m for m in map(re.compile(pattern).search, self.lines) if m), None)
                if found is not None:
                    return found
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise AssertionError(f"no line matching {pattern!r} within {timeout_s}s; output:\n"
                                         + "\n".join(self.lines))
                self._changed.wait(remaining)


def local_log_end(address: str, topic: str) -> int:
    """Where that broker's own replica of partition 0 ends (-1 if it cannot say)."""
    conn = Connection(address)
    try:
        answer = conn.admin.DescribeTopics(pb.DescribeTopicsRequest(names=[topic], local_only=True), timeout=2)
    except grpc.RpcError:
        return -1
    finally:
        conn.close()
    part = answer.topics[0].partitions[0] if answer.topics and answer.topics[0].partitions else None
    return part.log_end_offset if part is not None and part.local_replica else -1


def pid_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    return False


def test_dev_reports_a_killed_broker_keeps_serving_and_restarts_it(tmp_path: Path) -> None:
    base = free_dev_base_port(3)
    addresses = {n: f"127.0.0.1:{base + n - 1}" for n in (1, 2, 3)}
    data_dir = tmp_path / "data"
    proc = subprocess.Popen(
        [sys.executable, "-m", "logbroker.server.cli", "dev", "--data-dir", str(data_dir), "--base-port", str(base)],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONPATH": str(REPO_ROOT), "CI": "true"})
    assert proc.stdout is not None
    out = Lines(proc.stdout)
    pids: dict[int, int] = {}
    try:
        for node in (1, 2, 3):
            found = out.wait_for(rf"^broker {node}: {addresses[node]}, pid (\d+), .*log in (\S+)$", 10)
            pids[node] = int(found.group(1))
            assert found.group(2) == str(data_dir.resolve() / f"broker-{node}.log")
            out.wait_for(rf"^  \S*logbroker\S* serve --node-id {node} .*--listen {addresses[node]} ", 1)
        metrics = [f"http://127.0.0.1:{base + 200 + n - 1}/metrics" for n in (1, 2, 3)]
        out.wait_for(re.escape(f"Prometheus metrics: {' '.join(metrics)}"), 1)
        out.wait_for(rf"^data ports .*: {base + 400} {base + 401} {base + 402}$", 1)
        out.wait_for(r"^cluster serving: all 3 brokers up", START_TIMEOUT_S)
        with urllib.request.urlopen(metrics[0], timeout=5) as scraped:  # `make run` serves metrics
            assert b"logbroker_controller_active" in scraped.read()
        bootstrap = ",".join(addresses.values())
        with Admin(bootstrap) as admin:
            admin.create_topic("dev", partitions=1, replication_factor=3)
            leader = admin.describe_topics(["dev"])[0].partitions[0].leader_id
        victim = next(n for n in (1, 2, 3) if n != leader)  # the leader stays: the write needs no election
        survivors = [n for n in (1, 2, 3) if n != victim]

        os.kill(pids[victim], signal.SIGKILL)
        out.wait_for(rf"^broker {victim} \(pid {pids[victim]}, {addresses[victim]}\) killed by signal 9 "
                     rf"\(SIGKILL\); its log: .*broker-{victim}\.log$", 10)
        out.wait_for(rf"brokers {survivors[0]}, {survivors[1]} are still running and keep serving", 1)
        out.wait_for(rf"restarting broker {victim} in 1s \(restart 1 of at most 3 in 60s\)", 1)
        with Producer(bootstrap, acks="all") as producer:
            written = producer.send("dev", value=b"while one is down").result(timeout=20)
        # The supervisor waits a second before the restart, and a broker takes longer than that to serve.
        assert out.find(rf"broker {victim} is serving again") is None, "the write did not happen with one down"

        restarted = out.wait_for(rf"^broker {victim}: restarted, pid (\d+)$", 10)
        assert int(restarted.group(1)) != pids[victim]
        out.wait_for(rf"^broker {victim} is serving again", START_TIMEOUT_S)
        # It serves again: its own replica catches up with the record written while it was down.
        wait_until(lambda: local_log_end(addresses[victim], "dev") > written.offset, 30,
                   f"broker {victim} to hold offset {written.offset} again")
        pids[victim] = int(restarted.group(1))

        proc.send_signal(signal.SIGINT)  # Ctrl-C
        assert proc.wait(30) == 0
        out.wait_for(r"^all brokers stopped$", 5)
        wait_until(lambda: all(pid_gone(pid) for pid in pids.values()), 10, "every broker process to exit")
    finally:
        if proc.poll() is None:
            proc.kill()  # its brokers get SIGTERM from the kernel when it dies (PR_SET_PDEATHSIG)
            proc.wait(10)
        for pid in pids.values():
            if not pid_gone(pid):
                os.kill(pid, signal.SIGKILL)


@pytest.mark.slow  # ~6 s (restarts paced at 3 a minute); the default suite keeps the restart test above
def test_dev_gives_up_on_a_broker_that_keeps_dying_and_says_why(tmp_path: Path) -> None:
    base = free_dev_base_port(1)
    with socket.socket() as squatter:  # the broker's port is taken: it fails at every start
        squatter.bind(("127.0.0.1", base))
        squatter.listen()
        proc = subprocess.run(
            [sys.executable, "-m", "logbroker.server.cli", "dev", "--brokers", "1", "--data-dir",
             str(tmp_path / "data"), "--base-port", str(base)],
            capture_output=True, text=True, timeout=120, env={**os.environ, "PYTHONPATH": str(REPO_ROOT)})
    lines = proc.stdout.splitlines()
    assert proc.returncode == 1, proc.stdout
    # How it dies is the broker's business (gRPC has been seen to abort while failing to bind): count deaths.
    death = (r"^broker 1 \(pid \d+, .*\) (exited with status \d+|killed by signal \d+ \(\w+\)); "
             r"its log: .*broker-1\.log$")
    assert len([line for line in lines if re.match(death, line)]) == 4, proc.stdout  # the first start, 3 restarts
    assert any("cannot listen on" in line and line.startswith("  | ") for line in lines), proc.stdout
    assert not any(line.startswith("  | ---- ") for line in lines), "a log tail shows an earlier run's lines"
    assert [line for line in lines if line.startswith("  restarting broker 1")] == [
        f"  restarting broker 1 in 1s (restart {n} of at most 3 in 60s)" for n in (1, 2, 3)]
    assert "  not restarting broker 1: it died 4 times within 60s, so something stops it from running: fix what " \
           "its log says. To start it by hand:" in lines
    assert lines[-1].startswith("no broker is running and none will be restarted")
