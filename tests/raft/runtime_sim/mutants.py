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
    """Releases acks=1 producers as soon as the entries are written, before the fsync."""

    async def _append(self, entries):  # type: ignore[no-untyped-def]
        await super()._append(entries)
        self.durable_offset = self.log.log_end_offset
        self._release(self._durable_waiters, self.durable_offset)


class TrustCacheAfterFailedFsync(ObservedReplica):
    """After a failed fsync, lets its log be reopened whole, trusting what reads show: with Linux's fsync
    semantics the unwritten pages are dropped, so a power cut later takes entries it acknowledged since."""

    def _stop_after_failure(self, exc: Exception) -> None:
        super()._stop_after_failure(exc)
        if not isinstance(exc, DamagedLogError):
            self.damaged_from = None


MUTANTS: dict[str, type[ObservedReplica]] = {
    "answer-before-fsync": AnswerBeforeFsync,
    "release-before-fsync": ReleaseBeforeFsync,
    "trust-cache-after-failed-fsync": TrustCacheAfterFailedFsync,
}
