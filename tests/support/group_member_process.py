"""A consumer-group member for the acceptance scenarios: logbroker_client.Consumer(group_id=...) in a process.

It subscribes to one topic, polls, "processes" every record (writes it down), and commits either itself
after its polls (``--commit sync``: explicit positions, each commit written down with its outcome) or
through the client's auto-commit (``--commit auto``: the client commits what poll() returned, which only
the group's committed offsets show). Every event goes to a JSON-lines file, one object per line, flushed
at once, so a SIGKILLed member leaves everything it did up to the kill (at most the last line is torn).

Each line carries ``event``, ``member`` (the name given, default the file's stem), ``incarnation`` (new
for every run of the process, so a restarted static member is a new owner), ``pid`` and ``t_us`` (the
host's wall clock, microseconds since the epoch, the same clock in every process of the host):

    started     group, topic, instance_id, commit ("sync" or "auto"), session_timeout_ms
    assigned    partitions, positions [[partition, offset or null], ...]: where it starts (on_assigned)
    revoked     partitions (on_revoked, written after the revoke's own commit in sync mode)
    lost        partitions (on_lost: taken away without a chance to commit)
    consumed    records [[partition, offset, seq], ...] returned by one poll(), seq read from the value
                (-1 when it does not start with a sequence number); poll_start_us; t_us is when poll()
                returned, so the records were handed out at or before t_us; owned_at_us is when the
                consumer last confirmed its session owned them (Consumer.ownership_checked_at_ms)
    commit      offsets [[partition, offset], ...], sent_us, t_us (answered), ok, error
    error       where, error (class name), message: a call that raised (poll keeps being called)
    closed      after close() returned (it commits in auto mode, revokes, and leaves the group)

Run it as ``python -m tests.support.group_member_process --bootstrap H:P[,H:P] --group G --topic T
--events FILE [--instance-id ID] [--session-timeout-ms N] [--commit sync|auto]``; SIGTERM (or SIGINT)
closes the consumer and exits. The client's log (INFO: heartbeat failures, coordinator moves) goes to
stdout. ``MemberProcess`` starts, signals and reads such a process from a test, and writes its stdout next
to the events file (FILE with the suffix .log).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from logbroker_client import Consumer, TopicPartition
from logbroker_client.errors import LogbrokerError

from tests.support.checker import SEQ_DIGITS, sequence_of

REPO_ROOT = Path(__file__).resolve().parents[2]
POLL_TIMEOUT_S = 0.2
STOP_TIMEOUT_S = 30.0
START_TIMEOUT_S = 30.0
IDLE_COMMIT_INTERVALS = 10  # sync: with nothing new consumed, the positions are committed again this much less often


def now_us() -> int:
    return time.time_ns() // 1000


def seq_or_unknown(value: bytes | None) -> int:
    if value is None or len(value) < SEQ_DIGITS or not value[:SEQ_DIGITS].isdigit():
        return -1
    return sequence_of(value)


# ---------------------------------------------------------------------------------------------- events


class EventFile:
    """JSON lines appended to a file, each written with one call and flushed at once."""

    def __init__(self, path: Path, common: dict[str, Any]) -> None:
        self.common = common
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, event: str, **fields: Any) -> None:
        fields.setdefault("t_us", now_us())
        line = json.dumps({"event": event, **self.common, **fields}, separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()

    def close(self) -> None:
        with self._lock:
            self._file.close()


def read_events(path: Path) -> list[dict[str, Any]]:
    """The events of one file, skipping a torn last line (a SIGKILL in the middle of a write)."""
    if not path.exists():
        return []
    events = []
    for line in path.read_text(encoding="utf-8").splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            events.append(json.loads(line))
    return events


# ---------------------------------------------------------------------------------------------- member


@dataclass
class MemberSettings:
    bootstrap: str
    group: str
    topic: str
    events_path: Path
    name: str = ""
    instance_id: str | None = None
    session_timeout_ms: int = 45_000
    commit: str = "sync"  # "sync": explicit commits after polls; "auto": the client's auto-commit
    commit_interval_ms: int = 100  # sync: at most one commit per interval
    auto_commit_interval_ms: int = 1000
    max_records: int = 500
    request_timeout_ms: int = 5000

    def __post_init__(self) -> None:
        if self.commit not in ("sync", "auto"):
            raise ValueError(f"commit must be 'sync' or 'auto', got {self.commit!r}")
        self.name = self.name or self.events_path.stem


class GroupMemberRunner:
    """Polls until asked to stop, then closes the consumer; every step is an event."""

    def __init__(self, settings: MemberSettings) -> None:
        self.settings = settings
        self.incarnation = uuid.uuid4().hex[:8]
        self.events = EventFile(settings.events_path, {"member": settings.name, "incarnation": self.incarnation,
                                                       "pid": os.getpid()})
        self.stopping = threading.Event()
        self.consumer: Consumer | None = None
        self._uncommitted = False
        self._last_commit = 0.0

    def request_stop(self) -> None:
        self.stopping.set()

    def run(self) -> None:
        s = self.settings
        self.events.write("started", group=s.group, topic=s.topic, instance_id=s.instance_id, commit=s.commit,
                          session_timeout_ms=s.session_timeout_ms)
        try:
            self.consumer = Consumer(
                s.bootstrap, group_id=s.group, auto_offset_reset="earliest", enable_auto_commit=s.commit == "auto",
                auto_commit_interval_ms=s.auto_commit_interval_ms, group_instance_id=s.instance_id,
                session_timeout_ms=s.session_timeout_ms, client_id=f"member-{s.name}", fetch_max_wait_ms=100,
                max_poll_records=s.max_records, request_timeout_ms=s.request_timeout_ms)
            self.consumer.subscribe([s.topic], on_assigned=self._on_assigned, on_revoked=self._on_revoked,
                                    on_lost=self._on_lost)
            while not self.stopping.is_set():
                self._poll_once()
            self._guarded("close", self.consumer.close)
        finally:
            self.events.write("closed")
            self.events.close()

    def _poll_once(self) -> None:
        assert self.consumer is not None
        started = now_us()
        try:
            records = self.consumer.poll(timeout=POLL_TIMEOUT_S)
        except LogbrokerError as exc:
            self._error("poll", exc)
            time.sleep(0.1)
            return
        if records:
            self.events.write("consumed", poll_start_us=started, owned_at_us=self._owned_at_us(),
                              records=[[r.partition, r.offset, seq_or_unknown(r.value)] for r in records])
            self._uncommitted = True
        if self.settings.commit == "sync" and self._commit_due():
            self._commit(self.consumer.assignment())

    def _owned_at_us(self) -> int:
        """The wall-clock instant the consumer last confirmed its session owned what poll() returned (asked of
        the consumer, which made that check; the monotonic clock read first, so a pause between the two reads
        can only make the instant later, never hide a late check)."""
        assert self.consumer is not None
        checked_ms = self.consumer.ownership_checked_at_ms
        monotonic_now_ms = time.monotonic() * 1000
        wall_us = now_us()
        if checked_ms is None:
            return wall_us
        return wall_us - int((monotonic_now_ms - checked_ms) * 1000)

    def _commit_due(self) -> bool:
        elapsed_ms = (time.monotonic() - self._last_commit) * 1000
        interval_ms = self.settings.commit_interval_ms
        return elapsed_ms >= interval_ms and (self._uncommitted or elapsed_ms >= IDLE_COMMIT_INTERVALS * interval_ms)

    def _commit(self, tps: Iterable[TopicPartition]) -> None:
        """Commit the position of each partition (what poll() has handed out of it), and write it down."""
        assert self.consumer is not None
        self._last_commit = time.monotonic()
        offsets: dict[TopicPartition, int] = {}
        for tp in sorted(tps):
            try:
                offsets[tp] = self.consumer.position(tp)
            except LogbrokerError as exc:
                self._error("position", exc)
        if not offsets:
            return
        sent = now_us()
        error: LogbrokerError | None = None
        try:
            self.consumer.commit(offsets)
        except LogbrokerError as exc:
            error = exc
        self.events.write("commit", sent_us=sent, offsets=[[tp.partition, o] for tp, o in offsets.items()],
                          ok=error is None, error="" if error is None else f"{type(error).__name__}: {error}")
        if error is None:
            self._uncommitted = False
        elif self.settings.commit_interval_ms:
            time.sleep(self.settings.commit_interval_ms / 1000)  # not a tight loop against a moving coordinator

    # ------------------------------------------------------------------------------------ callbacks

    def _on_assigned(self, tps: set[TopicPartition]) -> None:
        assert self.consumer is not None
        positions: list[list[int | None]] = []
        for tp in sorted(tps):
            try:
                positions.append([tp.partition, self.consumer.position(tp)])
            except LogbrokerError as exc:
                self._error("position", exc)
                positions.append([tp.partition, None])
        self.events.write("assigned", partitions=sorted(tp.partition for tp in tps), positions=positions)

    def _on_revoked(self, tps: set[TopicPartition]) -> None:
        if self.settings.commit == "sync":
            self._commit(tps)  # the next owner resumes where this one stopped
        self.events.write("revoked", partitions=sorted(tp.partition for tp in tps))

    def _on_lost(self, tps: set[TopicPartition]) -> None:
        self.events.write("lost", partitions=sorted(tp.partition for tp in tps))

    # --------------------------------------------------------------------------------------- errors

    def _error(self, where: str, exc: BaseException) -> None:
        self.events.write("error", where=where, error=type(exc).__name__, message=str(exc)[:300])

    def _guarded(self, where: str, call: Callable[[], Any]) -> None:
        try:
            call()
        except LogbrokerError as exc:
            self._error(where, exc)


# ------------------------------------------------------------------------------------------ as a process


class MemberProcess:
    """``python -m tests.support.group_member_process`` as a subprocess: start, SIGKILL, SIGSTOP/SIGCONT, SIGTERM."""

    def __init__(self, settings: MemberSettings) -> None:
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = settings.events_path.with_suffix(".log")

    @property
    def name(self) -> str:
        return self.settings.name

    def command(self) -> list[str]:
        s = self.settings
        args = [sys.executable, "-m", "tests.support.group_member_process", "--bootstrap", s.bootstrap,
                "--group", s.group, "--topic", s.topic, "--events", str(s.events_path), "--name", s.name,
                "--session-timeout-ms", str(s.session_timeout_ms), "--commit", s.commit,
                "--commit-interval-ms", str(s.commit_interval_ms),
                "--auto-commit-interval-ms", str(s.auto_commit_interval_ms), "--max-records", str(s.max_records),
                "--request-timeout-ms", str(s.request_timeout_ms)]
        if s.instance_id:
            args += ["--instance-id", s.instance_id]
        return args

    def start(self) -> MemberProcess:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                          os.environ.get("PYTHONPATH")]))}
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(self.command(), stdout=log_file, stderr=subprocess.STDOUT, env=env,
                                         cwd=REPO_ROOT)
        return self

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def events(self) -> list[dict[str, Any]]:
        return read_events(self.settings.events_path)

    def wait_for(self, condition: Callable[[list[dict[str, Any]]], bool], what: str,
                 timeout_s: float = START_TIMEOUT_S) -> list[dict[str, Any]]:
        """Until condition(events of this member) holds; fails early if the process exits."""
        deadline = time.monotonic() + timeout_s
        while True:
            events = self.events()
            if condition(events):
                return events
            assert self.proc is not None and self.proc.poll() is None, \
                f"member {self.name} exited with {self.proc and self.proc.returncode} waiting for {what}:\n" \
                f"{self.log_text()[-3000:]}"
            assert time.monotonic() < deadline, f"member {self.name}: timed out after {timeout_s}s waiting for {what}"
            time.sleep(0.05)

    def signal(self, signum: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(signum)

    def kill(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(ProcessLookupError):
            self.proc.send_signal(signal.SIGCONT)
            self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def pause(self) -> None:
        self.signal(signal.SIGSTOP)

    def resume(self) -> None:
        self.signal(signal.SIGCONT)

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM: the member closes its consumer (commit, revoke, leave) and exits; SIGKILL if it hangs."""
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGCONT)
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()
            raise AssertionError(f"member {self.name} did not stop within {timeout_s}s:\n"
                                 f"{self.log_text()[-3000:]}") from None

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def parse_args(argv: Sequence[str] | None = None) -> MemberSettings:
    parser = argparse.ArgumentParser(prog="python -m tests.support.group_member_process",
                                     description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", required=True, help="HOST:PORT[,HOST:PORT...]")
    parser.add_argument("--group", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--events", required=True, type=Path, help="JSON-lines file the events are appended to")
    parser.add_argument("--name", default="", help="the member's name in the events (default: the file's stem)")
    parser.add_argument("--instance-id", default=None, help="group_instance_id: a static member")
    parser.add_argument("--session-timeout-ms", type=int, default=45_000, help="the brokers' group session timeout")
    parser.add_argument("--commit", choices=("sync", "auto"), default="sync")
    parser.add_argument("--commit-interval-ms", type=int, default=100)
    parser.add_argument("--auto-commit-interval-ms", type=int, default=1000)
    parser.add_argument("--max-records", type=int, default=500, help="max_poll_records")
    parser.add_argument("--request-timeout-ms", type=int, default=5000)
    args = parser.parse_args(argv)
    return MemberSettings(bootstrap=args.bootstrap, group=args.group, topic=args.topic, events_path=args.events,
                          name=args.name, instance_id=args.instance_id, session_timeout_ms=args.session_timeout_ms,
                          commit=args.commit, commit_interval_ms=args.commit_interval_ms,
                          auto_commit_interval_ms=args.auto_commit_interval_ms, max_records=args.max_records,
                          request_timeout_ms=args.request_timeout_ms)


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stdout,
                        format="%(asctime)s.%(msecs)03d %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    runner = GroupMemberRunner(parse_args(argv))
    signal.signal(signal.SIGTERM, lambda *_: runner.request_stop())
    signal.signal(signal.SIGINT, lambda *_: runner.request_stop())
    runner.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
