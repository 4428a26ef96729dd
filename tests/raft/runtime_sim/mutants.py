"""Deliberately broken runtimes. The runtime simulation must catch each of them; tests prove it does.

Each mutant breaks one durability rule of Replica (logbroker/cluster/replica.py) by overriding one method.
"""

from __future__ import annotations

from dataclasses import replace

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


MUTANTS: dict[str, type[ObservedReplica]] = {
    "answer-before-fsync": AnswerBeforeFsync,
    "release-before-fsync": ReleaseBeforeFsync,
}
