"""A simulated network: per-message random delay (so reordering), loss, duplication and partitions.

Partitions are checked at delivery time, so messages in flight when a partition starts are lost with it.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass

from logbroker.raft.types import Message


@dataclass(frozen=True)
class NetworkProfile:
    drop_rate: float = 0.0
    duplicate_rate: float = 0.0
    max_delay_steps: int = 1


class Network:
    def __init__(self, rng: random.Random, profile: NetworkProfile) -> None:
        self._rng = rng
        self.profile = profile
        self._queue: list[tuple[int, float, int, Message]] = []
        self._sequence = 0
        self._side: dict[int, int] = {}  # node -> partition side; nodes missing share side 0

    def send(self, now: int, message: Message) -> str | None:
        """Queue a message; returns "drop" or "dup" when the network interfered, for the trace."""
        if self._rng.random() < self.profile.drop_rate:
            return "drop"
        self._schedule(now, message)
        if self._rng.random() < self.profile.duplicate_rate:
            self._schedule(now, message)
            return "dup"
        return None

    def _schedule(self, now: int, message: Message) -> None:
        delay = self._rng.randint(1, self.profile.max_delay_steps)
        self._sequence += 1
        heapq.heappush(self._queue, (now + delay, self._rng.random(), self._sequence, message))

    def due(self, now: int) -> list[Message]:
        """Messages whose delivery time has come and that can cross the current partition."""
        found = []
        while self._queue and self._queue[0][0] <= now:
            message = heapq.heappop(self._queue)[3]
            if self.connected(message.from_node, message.to_node):
                found.append(message)
        return found

    def connected(self, a: int, b: int) -> bool:
        return self._side.get(a, 0) == self._side.get(b, 0)

    def partition(self, groups: list[set[int]]) -> None:
        self._side = {node: side for side, group in enumerate(groups) for node in group}

    def heal(self) -> None:
        self._side = {}

    @property
    def partitioned(self) -> bool:
        return len(set(self._side.values())) > 1

    def in_flight(self) -> int:
        return len(self._queue)
