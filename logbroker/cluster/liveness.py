"""Broker liveness: one heartbeat per broker pair per tick, whatever the number of Raft groups.

Idle Raft groups go quiet (no ticks, no heartbeats of their own, see Replica.maybe_quiesce); what keeps
their followers from waiting forever on a dead leader is this table. Any message from a peer counts as
a sign of life; a peer silent for `timeout_ticks` is declared down, and the broker then wakes every
group that peer was leading so its followers elect a new leader. A leader does not wait for a follower on a
peer that is down before it goes quiet; when that peer is heard from again, the broker wakes the groups it
leads with a replica there, so their heartbeats show the returning follower what it missed.
"""

from __future__ import annotations

from logbroker.raft.types import Message, MessageType

LIVENESS_GROUP = "__liveness"


class Liveness:
    def __init__(self, node_id: int, peers: list[int], timeout_ticks: int) -> None:
        self.node_id = node_id
        self.peers = [p for p in peers if p != node_id]
        self.timeout_ticks = timeout_ticks
        self._now = 0
        self._last_heard: dict[int, int] = {p: 0 for p in self.peers}  # peers start alive: give them a timeout
        self._down: set[int] = set()
        self._unregistered_disks: set[int] = set()  # peers whose last heartbeat said their disk is not registered

    def heartbeats(self, metadata_term: int, disk_registered: bool) -> list[tuple[str, Message]]:
        """One heartbeat per peer. Its term is this broker's term in the metadata log (0: it holds none), which a
        broker on a new disk uses to tell a new cluster from one it must catch up with (disk_identity.py). Its
        reject flag says that the metadata applied here does not yet name this broker's disk: the controller
        records no new partition on this broker until it does (ControllerClient.await_disks_registered), even
        when an earlier disk of this broker is registered (this one may have replaced it)."""
        return [(LIVENESS_GROUP, Message(MessageType.HEARTBEAT, self.node_id, peer, metadata_term,
                                         reject=not disk_registered))
                for peer in self.peers]

    def note_heartbeat(self, heartbeat: Message) -> None:
        """A peer's liveness heartbeat: keep what it says of the peer's disk (see heartbeats)."""
        if heartbeat.reject:
            self._unregistered_disks.add(heartbeat.from_node)
        else:
            self._unregistered_disks.discard(heartbeat.from_node)

    def says_disk_registered(self, peer: int) -> bool:
        """False while the peer's last heartbeat said the metadata it applied does not name its disk yet. A peer
        not heard from since this broker started counts as registered: the metadata then decides alone."""
        return peer not in self._unregistered_disks

    def heard_from(self, peer: int) -> bool:
        """Note a message from ``peer``; True if it had been declared down (it is alive again from now on)."""
        self._last_heard[peer] = self._now
        if peer in self._down:
            self._down.discard(peer)
            return True
        return False

    def is_alive(self, peer: int) -> bool:
        return peer == self.node_id or peer not in self._down

    def tick(self) -> list[int]:
        """Advance one tick; return the peers that have just gone silent for too long."""
        self._now += 1
        newly_down = [p for p in self.peers
                      if p not in self._down and self._now - self._last_heard.get(p, 0) > self.timeout_ticks]
        self._down.update(newly_down)
        return newly_down
