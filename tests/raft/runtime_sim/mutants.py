"""Deliberately broken runtimes. The runtime simulation must catch each of them; tests prove it does.

Each mutant breaks one durability rule of Replica (logbroker/cluster/replica.py) by overriding one method.
"""

from __future__ import annotations

from dataclasses import replace

from logbroker.cluster.raft_storage import DamagedLogError
from logbroker.raft.types import Ready
from tests.raft.runtime_sim.cluster import ObservedReplica


class AnswerBeforeFsync(ObservedReplica):
    """Sends every message of a Ready before persisting it: a follower acknowledges entries (and a voter grants
    its vote) that a power cut can still take away."""

    async def _handle(self, ready: Ready) -> None:
        await super()._handle(replace(ready, messages=ready.all_messages, messages_after_persist=()))


class ReleaseBeforeFsync(ObservedReplica):
    """Releases acks=1 producers as soon as the entries are written, before the fsync. (The simulation runs a
    pool job's write on its loop thread, so the write step may release waiters, as this mutant does.)"""

    def _write(self, data, timestamp_ms):  # type: ignore[no-untyped-def]
        super()._write(data, timestamp_ms)
        self.durable_offset = self.log.log_end_offset
        self._release(self._durable_waiters, self.durable_offset)


class TrustCacheAfterFailedFsync(ObservedReplica):
    """After a failed fsync, neither writes the unsynced bytes again, nor cuts its log at once, nor lets the
    reopen cut it, trusting what reads show: with Linux's fsync semantics the unwritten pages are dropped, so
    a power cut later takes entries it acknowledged since."""

    def _fsync(self, state):  # type: ignore[no-untyped-def]
        self._never_redirty()
        super()._fsync(state)

    def _end_flush(self, pending, error):  # type: ignore[no-untyped-def]
        self._never_redirty()  # the same on the split path (an fsync run apart from its write)
        super()._end_flush(pending, error)

    def _never_redirty(self) -> None:
        for segment in self.log.segments:  # nor write the bytes again, so the next fsync would persist them
            segment._redirty = lambda start, end: None  # type: ignore[method-assign]

    def _forget_unsynced(self) -> None:
        """The mutation: no cut, so the dropped pages stay in the log and reads still show them."""

    def _stop_after_failure(self, exc: Exception) -> None:
        super()._stop_after_failure(exc)
        if not isinstance(exc, DamagedLogError):
            self.damaged_from = None


class SyncedBeforeFsyncReturns(ObservedReplica):
    """On the split path (a small append written on the loop, its fsync run apart), counts the log durable as
    soon as the fsync is asked for, before it returned: the replica answers for entries a power cut can still
    take away. (Seeds that do not give replicas that path run this replica unchanged.)"""

    async def _write_then_sync(self, data, timestamp_ms):  # type: ignore[no-untyped-def]
        self._write(data, timestamp_ms)
        pending = self.log.begin_flush()
        if pending is None or pending.fd is None or self._syncer is None:
            return
        fsync = self._syncer.fdatasync(self.log.fs, pending.fd)
        self._end_flush(pending, None)  # the mutation: before the fsync's outcome is known
        await fsync


MUTANTS: dict[str, type[ObservedReplica]] = {
    "answer-before-fsync": AnswerBeforeFsync,
    "release-before-fsync": ReleaseBeforeFsync,
    "trust-cache-after-failed-fsync": TrustCacheAfterFailedFsync,
    "synced-before-fsync-returns": SyncedBeforeFsyncReturns,
}
