"""A share-group worker for the acceptance tests, speaking the raw Share gRPC service.

It takes records from a share group (ShareFetch with a long poll), "processes" each acquired record
(sleeps ``work_ms``), and acknowledges it: accept, or reject when the value holds a poison token, or
release when it holds a release token. Acknowledgements travel with the next ShareFetch (or a final
ShareAcknowledge when the worker stops). Every event goes to a JSON-lines file, one object per line,
flushed at once, so a SIGKILLed worker leaves everything it saw up to the kill:

    started / stopped                       member, group, topic, pid
    acquired     one per record             partition, offset, delivery_count, lock_deadline_ms, value,
                                            sent_ms, received_ms (the fetch that brought it)
    accepted / released / rejected          partition, first_offset, last_offset, sent_ms, received_ms
    ack_error    the broker refused an ack  + ack_type, error, message
    ack_unknown  an ack whose outcome is unknown: its request failed and the retry was refused, so the
                 first attempt may have been applied (a checker counts it as maybe applied)
    ack_unsent   an ack the worker stopped before sending (its lock expires; the record comes back)
    fetch_failed / partition_error          the request or one partition failed (retried after a pause)

Times are the host's wall clock in ms (``time.time_ns() // 10**6``), the clock the brokers stamp lock
deadlines with, so a checker can compare them. Leaders are found with Broker.Metadata and forgotten on
NOT_LEADER or any failed call, so the worker follows failovers and outlives broker restarts.

Run it as a subprocess (``python -m tests.support.share_worker --bootstrap ... --group G --topic T
--events FILE --work-ms N [--reject-values poison]``; SIGTERM stops it cleanly) or in-process
(``ShareWorker(settings).start()`` ... ``.stop()``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from logbroker_client import records as rec
from logbroker_client.proto import logbroker_pb2 as pb
from logbroker_client.proto import logbroker_pb2_grpc as pb_grpc

REQUEST_TIMEOUT_S = 5.0  # on top of the long poll
METADATA_TIMEOUT_S = 2.0
RETRY_PAUSE_S = 0.1
DRAIN_TIMEOUT_S = 5.0
REPO_ROOT = Path(__file__).resolve().parents[2]
CHANNEL_OPTIONS = [("grpc.enable_retries", 0), ("grpc.initial_reconnect_backoff_ms", 100),
                   ("grpc.max_reconnect_backoff_ms", 1_000), ("grpc.max_receive_message_length", 64 << 20)]
RETRIABLE_ERRORS = {pb.ErrorCode.NOT_LEADER, pb.ErrorCode.LEADER_NOT_AVAILABLE, pb.ErrorCode.REQUEST_TIMED_OUT,
                    pb.ErrorCode.NOT_ENOUGH_REPLICAS, pb.ErrorCode.STORAGE_ERROR,
                    pb.ErrorCode.UNKNOWN_TOPIC_OR_PARTITION}
ACK_EVENTS = {pb.AckType.ACCEPT: "accepted", pb.AckType.RELEASE: "released", pb.AckType.REJECT: "rejected",
              pb.AckType.RENEW: "renewed"}
VALUE_CHARS = 40  # how much of each value an acquired event keeps


def now_ms() -> int:
    return time.time_ns() // 1_000_000


def error_name(code: int) -> str:
    return str(pb.ErrorCode.Name(code)) if code in pb.ErrorCode.values() else str(code)


def value_text(value: bytes | None) -> str | None:
    return None if value is None else value[:VALUE_CHARS].decode("latin-1")


# ------------------------------------------------------------------------------------------ routing


class Brokers:
    """Channels to brokers, and each partition's leader (asked of Metadata, forgotten on failures)."""

    def __init__(self, bootstrap: Sequence[str]) -> None:
        self.bootstrap = list(bootstrap)
        self._channels: dict[str, grpc.Channel] = {}
        self._leaders: dict[tuple[str, int], str] = {}
        self._known: dict[int, str] = {}  # node id -> address, from Metadata

    def channel(self, address: str) -> grpc.Channel:
        if address not in self._channels:
            self._channels[address] = grpc.insecure_channel(address, options=CHANNEL_OPTIONS)
        return self._channels[address]

    def share(self, address: str) -> pb_grpc.ShareStub:
        return pb_grpc.ShareStub(self.channel(address))

    def broker(self, address: str) -> pb_grpc.BrokerStub:
        return pb_grpc.BrokerStub(self.channel(address))

    def metadata(self, topic: str) -> pb.TopicMetadata | None:
        """The topic as the first broker that answers sees it (None if nobody answers or it is unknown)."""
        for address in [*self.bootstrap, *self._known.values()]:
            try:
                answer = self.broker(address).Metadata(pb.MetadataRequest(topics=[topic]), timeout=METADATA_TIMEOUT_S)
            except grpc.RpcError:
                continue
            self._known.update({b.node_id: f"{b.host}:{b.port}" for b in answer.brokers})
            if answer.topics and not answer.topics[0].error_code:
                return answer.topics[0]
        return None

    def leader(self, topic: str, partition: int) -> str | None:
        key = (topic, partition)
        if key not in self._leaders:
            described = self.metadata(topic)
            if described is not None:
                for part in described.partitions:
                    if part.leader_id in self._known and not part.error_code:
                        self._leaders[(topic, part.partition)] = self._known[part.leader_id]
        return self._leaders.get(key)

    def partition_count(self, topic: str) -> int:
        described = self.metadata(topic)
        return len(described.partitions) if described is not None else 0

    def moved(self, topic: str, partition: int, hint: str = "") -> None:
        """The partition's leader is not where we thought: use the hint, else ask Metadata next time."""
        if hint:
            self._leaders[(topic, partition)] = hint
        else:
            self._leaders.pop((topic, partition), None)

    def forget_address(self, address: str) -> None:
        for key in [k for k, v in self._leaders.items() if v == address]:
            del self._leaders[key]

    def close(self) -> None:
        for channel in self._channels.values():
            channel.close()
        self._channels.clear()


# ------------------------------------------------------------------------------------------- events


class EventLog:
    """JSON lines appended to a file, each flushed at once; also counted in memory."""

    def __init__(self, path: Path, common: dict[str, Any]) -> None:
        self.path = path
        self.common = common
        self.counts: Counter[str] = Counter()
        self.records_accepted = 0
        self._lock = threading.Lock()
        self._file = open(path, "a", encoding="utf-8")  # noqa: SIM115 (closed by close())

    def write(self, event: str, **fields: Any) -> None:
        line = json.dumps({"event": event, **self.common, **fields}, separators=(",", ":"))
        with self._lock:
            self._file.write(line + "\n")
            self._file.flush()
            self.counts[event] += 1
            if event == "accepted":
                self.records_accepted += fields["last_offset"] - fields["first_offset"] + 1

    def close(self) -> None:
        with self._lock:
            self._file.close()


# --------------------------------------------------------------------------------------------- acks


@dataclass
class PendingAck:
    first_offset: int
    last_offset: int
    ack_type: int
    uncertain: bool = False  # an earlier attempt failed without an answer: it may have been applied
    reason: str = ""

    def to_pb(self) -> pb.AckRange:
        return pb.AckRange(first_offset=self.first_offset, last_offset=self.last_offset, type=self.ack_type,
                           reason=self.reason)


@dataclass
class PendingAcks:
    """Acknowledgements waiting for the next request, per partition, adjacent equal ones merged."""

    by_partition: dict[int, list[PendingAck]] = field(default_factory=dict)

    def add(self, partition: int, offset: int, ack_type: int, reason: str = "") -> None:
        acks = self.by_partition.setdefault(partition, [])
        last = acks[-1] if acks else None
        if (last is not None and last.last_offset + 1 == offset and last.ack_type == ack_type
                and last.reason == reason and not last.uncertain):
            last.last_offset = offset
        else:
            acks.append(PendingAck(offset, offset, ack_type, reason=reason))

    def take(self, partition: int) -> list[PendingAck]:
        return self.by_partition.pop(partition, [])

    def put_back(self, partition: int, acks: Iterable[PendingAck]) -> None:
        returned = list(acks)
        for ack in returned:
            ack.uncertain = True
        self.by_partition[partition] = returned + self.by_partition.get(partition, [])

    def partitions(self) -> list[int]:
        return [p for p, acks in self.by_partition.items() if acks]


# ------------------------------------------------------------------------------------------- worker


@dataclass
class WorkerSettings:
    bootstrap: list[str]
    group: str
    topic: str
    events_path: Path
    work_ms: float = 0.0
    reject_values: tuple[bytes, ...] = ()  # a value holding any of these is rejected (poison)
    release_values: tuple[bytes, ...] = ()  # ... or released, every time
    member_id: str = ""
    partitions: tuple[int, ...] = ()  # default: every partition of the topic
    max_records: int = 10
    max_wait_ms: int = 500

    def __post_init__(self) -> None:
        self.member_id = self.member_id or f"worker-{uuid.uuid4().hex[:12]}"


@dataclass(frozen=True)
class Sent:
    """What one request carried, to pair with its answer."""

    acks: dict[int, list[PendingAck]]
    sent_ms: int


class ShareWorker:
    """One member of a share group: fetch, process, acknowledge, log every event."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.member_id = settings.member_id
        self.brokers = Brokers(settings.bootstrap)
        self.pending = PendingAcks()
        self.events = EventLog(settings.events_path, {"member": self.member_id, "group": settings.group,
                                                      "topic": settings.topic})
        self._stopping = threading.Event()
        self._thread: threading.Thread | None = None

    # ----------------------------------------------------------------------------- lifecycle
    def start(self) -> ShareWorker:
        self._thread = threading.Thread(target=self.run, name=f"share-{self.member_id}", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout_s: float = 20.0) -> None:
        self._stopping.set()
        if self._thread is not None:
            self._thread.join(timeout_s)
            assert not self._thread.is_alive(), f"share worker {self.member_id} did not stop in {timeout_s}s"

    def request_stop(self) -> None:
        self._stopping.set()

    @property
    def records_accepted(self) -> int:
        return self.events.records_accepted

    def run(self) -> None:
        self.events.write("started", pid=os.getpid(), time_ms=now_ms())
        try:
            while not self._stopping.is_set():
                if not self._fetch_round():
                    self._stopping.wait(RETRY_PAUSE_S)
            self._drain_acks()
        finally:
            self.events.write("stopped", time_ms=now_ms(), counts=dict(self.events.counts))
            self.events.close()
            self.brokers.close()

    # ------------------------------------------------------------------------------- fetching
    def _partitions(self) -> tuple[int, ...]:
        if not self.settings.partitions:
            self.settings.partitions = tuple(range(self.brokers.partition_count(self.settings.topic)))
        return self.settings.partitions

    def _by_leader(self, partitions: Iterable[int]) -> dict[str, list[int]]:
        grouped: dict[str, list[int]] = {}
        for partition in partitions:
            leader = self.brokers.leader(self.settings.topic, partition)
            if leader is not None:
                grouped.setdefault(leader, []).append(partition)
        return grouped

    def _fetch_round(self) -> bool:
        """One ShareFetch per leader; True when at least one answered."""
        grouped = self._by_leader(self._partitions())
        wait_ms = self.settings.max_wait_ms // max(1, len(grouped))
        answered = [self._fetch_from(address, partitions, wait_ms) for address, partitions in grouped.items()]
        return any(answered)

    def _fetch_from(self, address: str, partitions: list[int], wait_ms: int) -> bool:
        sent = Sent({p: self.pending.take(p) for p in partitions}, now_ms())
        request = pb.ShareFetchRequest(group_id=self.settings.group, member_id=self.member_id,
                                       max_wait_ms=wait_ms, max_records=self.settings.max_records,
                                       client_id="share-worker", partitions=[
                                           pb.SharePartitionFetch(topic=self.settings.topic, partition=p,
                                                                  acks=[a.to_pb() for a in sent.acks[p]])
                                           for p in partitions])
        try:
            response = self.brokers.share(address).ShareFetch(request, timeout=wait_ms / 1000 + REQUEST_TIMEOUT_S)
        except grpc.RpcError as exc:
            self._request_failed(address, sent, exc)
            return False
        received_ms = now_ms()
        acquired: list[tuple[int, rec.Record | None]] = []
        for part in response.partitions:
            acquired += self._on_partition(part, sent, received_ms)
        self._process(acquired)
        return True

    def _request_failed(self, address: str, sent: Sent, exc: grpc.RpcError) -> None:
        self.events.write("fetch_failed", address=address, code=str(exc.code()), time_ms=now_ms())
        self.brokers.forget_address(address)
        for partition, acks in sent.acks.items():
            self.pending.put_back(partition, acks)

    def _on_partition(self, part: pb.SharePartitionData, sent: Sent,
                      received_ms: int) -> list[tuple[int, rec.Record | None]]:
        acks = sent.acks.get(part.partition, [])
        if part.error_code:
            self._partition_failed(part, acks)
            return []
        self._settle(part.partition, acks, part.ack_results, sent.sent_ms, received_ms)
        records = records_by_offset(part.records)
        acquired = []
        for item in part.acquired:
            for offset in range(item.first_offset, item.last_offset + 1):
                record = records.get(offset)
                self.events.write("acquired", partition=part.partition, offset=offset,
                                  delivery_count=item.delivery_count, lock_deadline_ms=item.lock_deadline_ms,
                                  value=value_text(record.value if record else None), sent_ms=sent.sent_ms,
                                  received_ms=received_ms)
                acquired.append((part.partition, record))
        return acquired

    def _partition_failed(self, part: pb.SharePartitionData, acks: list[PendingAck]) -> None:
        self.events.write("partition_error", partition=part.partition, error=error_name(part.error_code),
                          message=part.error_message, time_ms=now_ms())
        if part.error_code in RETRIABLE_ERRORS:
            self.brokers.moved(self.settings.topic, part.partition, part.leader.leader_address)
            self.pending.put_back(part.partition, acks)
            return
        for ack in acks:
            self._ack_event("ack_error", part.partition, ack, 0, now_ms(), error_name(part.error_code),
                            part.error_message)

    # ----------------------------------------------------------------------------- processing
    def _process(self, acquired: list[tuple[int, rec.Record | None]]) -> None:
        for partition, record in acquired:
            if record is None:
                continue  # logged with value None; nothing to work on, and it comes back after its lock
            if self.settings.work_ms:
                time.sleep(self.settings.work_ms / 1000)
            self.pending.add(partition, record.offset, *self._verdict(record.value or b""))

    def _verdict(self, value: bytes) -> tuple[int, str]:
        if any(token in value for token in self.settings.reject_values):
            return pb.AckType.REJECT, "poison"
        if any(token in value for token in self.settings.release_values):
            return pb.AckType.RELEASE, ""
        return pb.AckType.ACCEPT, ""

    # ---------------------------------------------------------------------------------- acks
    def _settle(self, partition: int, acks: list[PendingAck], results: Sequence[pb.AckResult], sent_ms: int,
                received_ms: int) -> None:
        for index, ack in enumerate(acks):
            if index >= len(results):
                self._ack_event("ack_unknown", partition, ack, sent_ms, received_ms, "NO_RESULT",
                                "the broker answered without a result for this ack")
                continue
            result = results[index]
            if not result.error_code:
                self._ack_event(ACK_EVENTS[ack.ack_type], partition, ack, sent_ms, received_ms)
            else:
                kind = "ack_unknown" if ack.uncertain else "ack_error"
                self._ack_event(kind, partition, ack, sent_ms, received_ms, error_name(result.error_code),
                                result.error_message)

    def _ack_event(self, event: str, partition: int, ack: PendingAck, sent_ms: int, received_ms: int,
                   error: str = "", message: str = "") -> None:
        fields: dict[str, Any] = {"partition": partition, "first_offset": ack.first_offset,
                                  "last_offset": ack.last_offset, "sent_ms": sent_ms, "received_ms": received_ms}
        if error:
            fields.update(ack_type=ACK_EVENTS[ack.ack_type], error=error, message=message)
        self.events.write(event, **fields)

    def _drain_acks(self) -> None:
        """Send what is still pending with ShareAcknowledge, following leaders, for a few seconds."""
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self.pending.partitions() and time.monotonic() < deadline:
            for address, partitions in self._by_leader(self.pending.partitions()).items():
                self._acknowledge_at(address, partitions)
            if self.pending.partitions():
                time.sleep(RETRY_PAUSE_S)
        for partition in self.pending.partitions():
            for ack in self.pending.take(partition):  # never sent, unless an earlier attempt's fate is unknown
                self._ack_event("ack_unknown" if ack.uncertain else "ack_unsent", partition, ack, 0, now_ms(),
                                "NOT_SENT", "the worker stopped before the broker answered")

    def _acknowledge_at(self, address: str, partitions: list[int]) -> None:
        sent = Sent({p: self.pending.take(p) for p in partitions}, now_ms())
        request = pb.ShareAcknowledgeRequest(group_id=self.settings.group, member_id=self.member_id, partitions=[
            pb.SharePartitionFetch(topic=self.settings.topic, partition=p, acks=[a.to_pb() for a in sent.acks[p]])
            for p in partitions])
        try:
            response = self.brokers.share(address).ShareAcknowledge(request, timeout=REQUEST_TIMEOUT_S)
        except grpc.RpcError as exc:
            self._request_failed(address, sent, exc)
            return
        for part in response.partitions:
            acks = sent.acks.get(part.partition, [])
            if part.error_code:
                self._partition_failed(part, acks)
            else:
                self._settle(part.partition, acks, part.ack_results, sent.sent_ms, now_ms())


def records_by_offset(data: bytes) -> dict[int, rec.Record]:
    """The data records of a ShareFetch answer by offset (control batches skipped)."""
    out: dict[int, rec.Record] = {}
    for header, records in rec.iter_batches(data):
        if not header.is_control:
            out.update((record.offset, record) for record in records)
    return out


# ----------------------------------------------------------------------------------- as a process


class WorkerProcess:
    """``python -m tests.support.share_worker`` as a subprocess: start, SIGKILL, SIGTERM."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.settings = settings
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = settings.events_path.with_suffix(".log")

    def command(self) -> list[str]:
        s = self.settings
        args = [sys.executable, "-m", "tests.support.share_worker", "--bootstrap", ",".join(s.bootstrap),
                "--group", s.group, "--topic", s.topic, "--events", str(s.events_path), "--work-ms", str(s.work_ms),
                "--member-id", s.member_id, "--max-records", str(s.max_records), "--max-wait-ms", str(s.max_wait_ms)]
        for flag, tokens in (("--reject-values", s.reject_values), ("--release-values", s.release_values)):
            if tokens:
                args += [flag, ",".join(t.decode() for t in tokens)]
        if s.partitions:
            args += ["--partitions", ",".join(map(str, s.partitions))]
        return args

    def start(self) -> WorkerProcess:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT),
                                                                          os.environ.get("PYTHONPATH")]))}
        with open(self.log_path, "ab") as log_file:
            self.proc = subprocess.Popen(self.command(), stdout=log_file, stderr=subprocess.STDOUT, env=env)
        return self

    def wait_started(self, timeout_s: float = 20.0) -> None:
        """Until the worker wrote its first event (its imports take a moment)."""
        deadline = time.monotonic() + timeout_s
        while not (self.settings.events_path.exists() and self.settings.events_path.stat().st_size):
            assert self.proc is not None and self.proc.poll() is None, f"worker exited: {self.log_text()}"
            assert time.monotonic() < deadline, f"worker did not start in {timeout_s}s: {self.log_text()}"
            time.sleep(0.05)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def stop(self, timeout_s: float = 20.0) -> None:
        """SIGTERM (the worker sends its pending acks and exits), SIGKILL if it does not."""
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.kill()

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def parse_args(argv: Sequence[str] | None = None) -> WorkerSettings:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--bootstrap", required=True, help="HOST:PORT[,HOST:PORT...]")
    parser.add_argument("--group", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--events", required=True, type=Path, help="JSON-lines file the events are appended to")
    parser.add_argument("--work-ms", type=float, default=0.0, help="time spent on each record")
    parser.add_argument("--reject-values", default="", help="comma-separated tokens: values holding one are rejected")
    parser.add_argument("--release-values", default="", help="comma-separated tokens: values holding one are released")
    parser.add_argument("--member-id", default="")
    parser.add_argument("--partitions", default="", help="comma-separated partitions (default: all)")
    parser.add_argument("--max-records", type=int, default=10)
    parser.add_argument("--max-wait-ms", type=int, default=500)
    args = parser.parse_args(argv)
    return WorkerSettings(bootstrap=args.bootstrap.split(","), group=args.group, topic=args.topic,
                          events_path=args.events, work_ms=args.work_ms, reject_values=_tokens(args.reject_values),
                          release_values=_tokens(args.release_values), member_id=args.member_id,
                          partitions=tuple(int(p) for p in args.partitions.split(",") if p),
                          max_records=args.max_records, max_wait_ms=args.max_wait_ms)


def _tokens(text: str) -> tuple[bytes, ...]:
    return tuple(token.encode() for token in text.split(",") if token)


def main(argv: Sequence[str] | None = None) -> int:
    worker = ShareWorker(parse_args(argv))
    signal.signal(signal.SIGTERM, lambda *_: worker.request_stop())
    with contextlib.suppress(KeyboardInterrupt):
        worker.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())
