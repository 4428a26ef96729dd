"""The leader's view of one follower: how far it matches, what to send next, and how much is in flight.

PROBE: the leader does not know where the follower's log matches its own. It sends one AppendEntries and
waits for the answer (or the next heartbeat response) before sending another, backing off with the
follower's hints until one is accepted.

REPLICATE: the follower is known to match up to ``match_offset``. The leader streams entries without
waiting (pipelining), moving ``next_offset`` ahead optimistically, but stops once ``max_inflight_bytes``
are unacknowledged, so a slow follower cannot make the leader buffer unbounded data on the wire.
"""

from __future__ import annotations

import enum
from collections import deque
from dataclasses import dataclass, field

from logbroker.raft.errors import check


class ProgressState(enum.Enum):
    PROBE = "probe"
    REPLICATE = "replicate"


@dataclass(slots=True)
class Progress:
    match_offset: int
    next_offset: int
    is_learner: bool = False
    state: ProgressState = ProgressState.PROBE
    # In PROBE: an append is outstanding, so wait for its answer before sending another.
    probe_sent: bool = False
    # In REPLICATE: (last offset sent, bytes) for each unacknowledged append, oldest first.
    inflight: deque[tuple[int, int]] = field(default_factory=deque)
    inflight_bytes: int = 0
    # Set by any response; check-quorum reads and clears it once per election timeout.
    recent_active: bool = False
    # The follower's last heartbeat answer said it does not wait to catch up (RaftNode.wait_to_catch_up); False
    # until it answers one. Only a heartbeat ends that wait, so a leader keeps sending them until this is True.
    reported_caught_up: bool = False

    def is_paused(self, max_inflight_bytes: int) -> bool:
        if self.state is ProgressState.PROBE:
            return self.probe_sent
        # Always allow one message, so that an entry bigger than the window still gets through.
        return bool(self.inflight) and self.inflight_bytes >= max_inflight_bytes

    def sent(self, last_offset: int, size_bytes: int) -> None:
        """Record an append that carried entries up to ``last_offset``."""
        if self.state is ProgressState.REPLICATE:
            check(last_offset >= self.next_offset, "replicating entries out of order")
            self.next_offset = last_offset + 1
            self.inflight.append((last_offset, size_bytes))
            self.inflight_bytes += size_bytes
        else:
            self.probe_sent = True

    def acknowledge(self, match_offset: int) -> bool:
        """The follower holds our log up to ``match_offset``; False if that is old news."""
        self.probe_sent = False
        if match_offset <= self.match_offset:
            return False
        self.match_offset = match_offset
        self.next_offset = max(self.next_offset, match_offset + 1)
        self._free_inflight(match_offset)
        return True

    def _free_inflight(self, upto: int) -> None:
        while self.inflight and self.inflight[0][0] <= upto:
            self.inflight_bytes -= self.inflight.popleft()[1]

    def reject(self, rejected_prev: int, retry_from: int) -> bool:
        """The follower refused an append whose previous entry ended at ``rejected_prev``.

        ``retry_from`` is where the leader wants to resume (already aligned to an entry start). Returns
        False for stale rejections, which must not move ``next_offset`` back again.
        """
        if self.state is ProgressState.REPLICATE:
            if rejected_prev <= self.match_offset:
                return False
            self.become_probe()
        elif rejected_prev != self.next_offset - 1:
            return False
        self.next_offset = max(self.match_offset + 1, min(retry_from, rejected_prev))
        self.probe_sent = False
        return True

    def forget_beyond(self, follower_last_offset: int) -> None:
        """The follower's log ends at ``follower_last_offset``, below what it acknowledged: it lost entries
        (a wiped or truncated disk). Its match moves back, so the leader sends them again and stops
        counting it as holding them; probing restarts from its real end."""
        check(follower_last_offset < self.match_offset, "forget_beyond must move the match offset back")
        self.match_offset = follower_last_offset
        self.become_probe()

    def become_probe(self) -> None:
        self.state = ProgressState.PROBE
        self.next_offset = self.match_offset + 1
        self.probe_sent = False
        self._clear_inflight()

    def become_replicate(self) -> None:
        self.state = ProgressState.REPLICATE
        self.next_offset = self.match_offset + 1
        self.probe_sent = False
        self._clear_inflight()

    def _clear_inflight(self) -> None:
        self.inflight.clear()
        self.inflight_bytes = 0
