"""Kafka's classic group protocol (JoinGroup, SyncGroup, Heartbeat, LeaveGroup) with client-side assignors.

A second membership model beside the KIP-848 one in coordinator.py, kept in the same shard and the same
__consumer_offsets records; committed offsets are shared (one table per group). A group is either classic
or KIP-848 at a time: a member of one kind cannot join while the group has members of the other kind.

The round, as in Kafka's GroupCoordinator:
- Empty / Stable --(a new member joins, a member's protocols change, a member leaves or times out)-->
  PreparingRebalance: every known member must send JoinGroup again within its rebalance timeout (they
  learn of the rebalance through REBALANCE_IN_PROGRESS on Heartbeat). Members that do not are dropped.
- When every known member has joined, the round completes: the generation moves on, the protocol is
  chosen by vote among the protocols all members support, and each JoinGroup is answered; the leader
  gets every member's metadata --> CompletingRebalance.
- The leader sends SyncGroup with the assignment of each member; it is written (one record holding the
  whole generation) and, once committed, every SyncGroup of that generation is answered with the
  member's assignment --> Stable.

JoinGroup and SyncGroup answers that must wait for other members are parked here as "pending" results,
which the front end polls (pending_join / pending_sync); the shard stays free of I/O and futures.

Persisted: the last synced generation (protocol, leader, members with their metadata and assignment) as
one record ["c", group] (a null value deletes it). Volatile: sessions, rounds in progress. A new coordinator
therefore knows every member of the last stable generation at once and gives each a fresh session;
a round that was in progress is restarted by the members' rejoin (they get NOT_COORDINATOR meanwhile).
"""

from __future__ import annotations

import base64
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from logbroker.groups import records as r
from logbroker.groups.errors import GroupError, NonEmptyGroup, UnknownMemberId
from logbroker.groups.records import StateRecord

EMPTY = "Empty"
PREPARING = "PreparingRebalance"
COMPLETING = "CompletingRebalance"
STABLE = "Stable"
MIN_SESSION_TIMEOUT_MS = 1_000
MAX_SESSION_TIMEOUT_MS = 30 * 60_000
MAX_MEMBERS = 1_000


class IllegalGeneration(GroupError):
    code = "ILLEGAL_GENERATION"


class RebalanceInProgress(GroupError):
    code = "REBALANCE_IN_PROGRESS"


class InconsistentGroupProtocol(GroupError):
    code = "INCONSISTENT_GROUP_PROTOCOL"


class MemberIdRequired(GroupError):
    code = "MEMBER_ID_REQUIRED"

    def __init__(self, message: str, member_id: str) -> None:
        super().__init__(message)
        self.member_id = member_id


class InvalidSessionTimeout(GroupError):
    code = "INVALID_SESSION_TIMEOUT"


class GroupMaxSizeReached(GroupError):
    code = "GROUP_MAX_SIZE_REACHED"


@dataclass
class ClassicMember:
    member_id: str
    instance_id: str = ""
    client_id: str = ""
    client_host: str = ""
    session_timeout_ms: int = 45_000
    rebalance_timeout_ms: int = 300_000
    protocols: list[tuple[str, bytes]] = field(default_factory=list)
    assignment: bytes = b""
    last_heartbeat_ms: int = 0  # volatile

    def metadata_for(self, protocol: str) -> bytes:
        return next((m for name, m in self.protocols if name == protocol), b"")


@dataclass(frozen=True)
class JoinResult:
    generation: int
    protocol_type: str
    protocol: str
    leader: str
    member_id: str
    members: tuple[tuple[str, str, bytes], ...]  # (member id, instance id, metadata): the leader's only


@dataclass
class ClassicGroup:
    group_id: str
    protocol_type: str = ""
    protocol: str = ""
    generation: int = 0
    leader: str = ""
    state: str = EMPTY
    members: dict[str, ClassicMember] = field(default_factory=dict)
    # Volatile: the round in progress.
    pending_members: set[str] = field(default_factory=set)  # given an id (MEMBER_ID_REQUIRED), not joined yet
    joined: set[str] = field(default_factory=set)
    rebalance_deadline_ms: int = 0
    join_results: dict[str, JoinResult] = field(default_factory=dict)
    sync_results: dict[str, bytes] = field(default_factory=dict)  # generation's assignment, once committed

    def to_value(self) -> dict[str, Any]:
        return {"type": self.protocol_type, "protocol": self.protocol, "generation": self.generation,
                "leader": self.leader, "members": [
                    {"id": m.member_id, "instance_id": m.instance_id, "client_id": m.client_id,
                     "client_host": m.client_host, "session_ms": m.session_timeout_ms,
                     "rebalance_ms": m.rebalance_timeout_ms, "metadata": _b64(m.metadata_for(self.protocol)),
                     "assignment": _b64(m.assignment)} for m in sorted(self.members.values(),
                                                                       key=lambda m: m.member_id)]}


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


class ClassicGroups:
    """The classic groups of one shard; every persisted change goes through ``replay``."""

    def __init__(self, clock_ms: Callable[[], int], replay: Callable[[StateRecord], None]) -> None:
        self.clock_ms = clock_ms
        self._replay_record = replay  # the shard's replay: records change state only through it
        self.groups: dict[str, ClassicGroup] = {}

    # ------------------------------------------------------------------------------- records
    def replay(self, group_id: str, value: dict[str, Any] | None) -> None:
        if value is None:
            self.groups.pop(group_id, None)
            return
        group = self.groups.get(group_id) or ClassicGroup(group_id)
        self.groups[group_id] = group
        group.protocol_type, group.protocol = value["type"], value["protocol"]
        group.generation, group.leader = value["generation"], value["leader"]
        now_ms = self.clock_ms()
        members = {}
        for item in value["members"]:
            old = group.members.get(item["id"])
            members[item["id"]] = ClassicMember(
                item["id"], item["instance_id"], item["client_id"], item["client_host"], item["session_ms"],
                item["rebalance_ms"], [(group.protocol, base64.b64decode(item["metadata"]))],
                base64.b64decode(item["assignment"]), old.last_heartbeat_ms if old is not None else now_ms)
        if group.state in (EMPTY, STABLE) or not members:  # a leader's own writes keep its round as it is
            group.members = members
            group.state = STABLE if members else EMPTY
            group.sync_results = {m.member_id: m.assignment for m in members.values()}

    def clear(self) -> None:
        self.groups.clear()

    def snapshot_records(self) -> list[StateRecord]:
        return [StateRecord((r.CLASSIC, g.group_id), g.to_value())
                for g in sorted(self.groups.values(), key=lambda g: g.group_id) if g.generation or g.members]

    def _write(self, out: list[StateRecord], group: ClassicGroup, value: dict[str, Any] | None) -> None:
        record = StateRecord((r.CLASSIC, group.group_id), value)
        self._replay_record(record)
        out.append(record)

    def has_members(self, group_id: str) -> bool:
        group = self.groups.get(group_id)
        return group is not None and bool(group.members or group.pending_members)

    def refuse_if_classic(self, group_id: str) -> None:
        """For KIP-848 heartbeats: a group is of one protocol at a time."""
        if self.has_members(group_id):
            raise InconsistentGroupProtocol(
                f"group {group_id!r} has members of Kafka's classic protocol (JoinGroup/SyncGroup); a KIP-848 "
                "consumer cannot join it until they leave (use another group id, or stop them)")

    # -------------------------------------------------------------------------------- join
    def join(self, group_id: str, member_id: str, instance_id: str, protocol_type: str,
             protocols: list[tuple[str, bytes]], session_timeout_ms: int, rebalance_timeout_ms: int,
             client_id: str, client_host: str, require_known_member_id: bool,
             other_protocol_members: int) -> tuple[JoinResult | None, str]:
        """(the answer now, or None to wait for the round; the member id)."""
        if other_protocol_members:
            raise InconsistentGroupProtocol(
                f"group {group_id!r} has {other_protocol_members} KIP-848 member(s) (logbroker's own consumer); "
                "a classic Kafka consumer cannot join it until they leave (use another group id)")
        if not MIN_SESSION_TIMEOUT_MS <= session_timeout_ms <= MAX_SESSION_TIMEOUT_MS:
            raise InvalidSessionTimeout(f"session timeout {session_timeout_ms} ms is outside "
                                        f"{MIN_SESSION_TIMEOUT_MS}..{MAX_SESSION_TIMEOUT_MS} ms")
        if not protocols:
            raise InconsistentGroupProtocol(f"group {group_id!r}: a member must name at least one protocol")
        group = self.groups.get(group_id) or ClassicGroup(group_id)
        self.groups[group_id] = group
        if group.members and (
                protocol_type != group.protocol_type or not self._common(group, protocols, member_id)):
            raise InconsistentGroupProtocol(
                f"group {group_id!r} uses protocol type {group.protocol_type!r} with protocols "
                f"{sorted(self._candidates(group))}; the member offers {protocol_type!r} "
                f"{[n for n, _ in protocols]}")
        now_ms = self.clock_ms()
        if instance_id:
            previous = next((m for m in group.members.values() if m.instance_id == instance_id), None)
            if previous is not None and previous.member_id != member_id:
                self._drop(group, previous.member_id)  # a static member restarted: its new id replaces the old
                member_id = ""
        if not member_id:
            member_id = f"{client_id or 'member'}-{uuid.uuid4()}"
            if len(group.members) + len(group.pending_members) >= MAX_MEMBERS:
                raise GroupMaxSizeReached(f"group {group_id!r} has {MAX_MEMBERS} members already")
            if require_known_member_id and not instance_id:
                group.pending_members.add(member_id)
                raise MemberIdRequired(f"group {group_id!r}: join again with the member id given", member_id)
        elif member_id not in group.members and member_id not in group.pending_members:
            raise UnknownMemberId(f"group {group_id!r}: member {member_id} is not in the group; join with an empty "
                                  "member id")
        group.pending_members.discard(member_id)
        member = group.members.get(member_id)
        if member is None:
            member = group.members[member_id] = ClassicMember(member_id)
            changed = True
        else:
            changed = member.protocols != protocols or member_id == group.leader
        member.instance_id, member.client_id, member.client_host = instance_id, client_id, client_host
        member.session_timeout_ms, member.rebalance_timeout_ms = session_timeout_ms, rebalance_timeout_ms
        member.protocols, member.last_heartbeat_ms = list(protocols), now_ms
        group.protocol_type = protocol_type
        if group.state in (STABLE, COMPLETING) and not changed:
            # A follower asking again with nothing new: it gets the current generation back.
            return self._join_result(group, member_id), member_id
        if group.state != PREPARING:
            self._prepare(group, now_ms)
        group.joined.add(member_id)
        group.join_results.pop(member_id, None)
        self._maybe_complete(group, now_ms)
        return group.join_results.pop(member_id, None), member_id

    def _candidates(self, group: ClassicGroup, exclude: str = "") -> set[str]:
        names: set[str] | None = None
        for member in group.members.values():
            if member.member_id != exclude:
                mine = {n for n, _ in member.protocols}
                names = mine if names is None else names & mine
        return names or set()

    def _common(self, group: ClassicGroup, protocols: list[tuple[str, bytes]], member_id: str) -> bool:
        others = [m for m in group.members.values() if m.member_id != member_id]
        return not others or bool(self._candidates(group, exclude=member_id) & {n for n, _ in protocols})

    def _prepare(self, group: ClassicGroup, now_ms: int) -> None:
        group.state = PREPARING
        group.joined = set()
        group.join_results = {}
        group.sync_results = {}
        timeout = max((m.rebalance_timeout_ms for m in group.members.values()), default=0)
        group.rebalance_deadline_ms = now_ms + timeout

    def _maybe_complete(self, group: ClassicGroup, now_ms: int, force: bool = False) -> bool:
        """End the round once every known member has joined (or, forced, at the rebalance deadline)."""
        if group.state != PREPARING or not (force or set(group.members) <= group.joined):
            return False
        for member_id in list(group.members):
            if member_id not in group.joined:
                del group.members[member_id]
        group.generation += 1
        if not group.members:
            group.state, group.protocol, group.leader = EMPTY, "", ""
            return True
        votes: dict[str, int] = {}
        candidates = self._candidates(group)
        for member in group.members.values():
            choice = next(n for n, _ in member.protocols if n in candidates)
            votes[choice] = votes.get(choice, 0) + 1
        group.protocol = max(sorted(votes), key=lambda n: votes[n])
        if group.leader not in group.members:
            group.leader = min(group.joined & set(group.members))
        group.state = COMPLETING
        for member_id, member in group.members.items():
            member.last_heartbeat_ms = now_ms
            group.join_results[member_id] = self._join_result(group, member_id)
        group.joined = set()
        return True

    def _join_result(self, group: ClassicGroup, member_id: str) -> JoinResult:
        members: tuple[tuple[str, str, bytes], ...] = ()
        if member_id == group.leader:
            members = tuple((m.member_id, m.instance_id, m.metadata_for(group.protocol))
                            for m in sorted(group.members.values(), key=lambda m: m.member_id))
        return JoinResult(group.generation, group.protocol_type, group.protocol, group.leader, member_id, members)

    def pending_join(self, group_id: str, member_id: str) -> JoinResult | None:
        """The answer to a waiting JoinGroup, once its round completed (taken once)."""
        group = self.groups.get(group_id)
        if group is None:
            raise UnknownMemberId(f"group {group_id!r} no longer exists here; join again")
        found = group.join_results.pop(member_id, None)
        if found is None and member_id not in group.members:
            raise UnknownMemberId(f"group {group_id!r}: member {member_id} was removed during the rebalance; "
                                  "join again")
        return found

    # -------------------------------------------------------------------------------- sync
    def _member(self, group_id: str, member_id: str, generation: int) -> tuple[ClassicGroup, ClassicMember]:
        group = self.groups.get(group_id)
        member = group.members.get(member_id) if group is not None else None
        if group is None or member is None:
            raise UnknownMemberId(f"group {group_id!r}: member {member_id or '(none)'} is not in the group; "
                                  "join again")
        if generation != group.generation:
            raise IllegalGeneration(f"group {group_id!r} is at generation {group.generation}, the member named "
                                    f"{generation}; join again")
        member.last_heartbeat_ms = self.clock_ms()
        return group, member

    def sync(self, group_id: str, member_id: str, generation: int,
             assignments: dict[str, bytes]) -> tuple[bytes | None, list[StateRecord]]:
        """(the member's assignment now, or None to wait for the leader's; records to write)."""
        group, _ = self._member(group_id, member_id, generation)
        out: list[StateRecord] = []
        if group.state == PREPARING:
            raise RebalanceInProgress(f"group {group_id!r} is rebalancing; join again")
        if group.state == STABLE:
            return group.sync_results.get(member_id, b""), out
        if member_id == group.leader:
            for mid, member in group.members.items():
                member.assignment = assignments.get(mid, b"")
            self._write(out, group, group.to_value())  # replayed while COMPLETING: the round stays as it is
            group.state = STABLE
            group.sync_results = {}  # filled once the record is committed: see sync_committed
            return None, out
        return None, out

    def sync_committed(self, group_id: str, generation: int) -> None:
        """The leader's assignment of this generation is committed: every SyncGroup may be answered."""
        group = self.groups.get(group_id)
        if group is not None and group.generation == generation and group.state == STABLE:
            group.sync_results = {m.member_id: m.assignment for m in group.members.values()}

    def pending_sync(self, group_id: str, member_id: str, generation: int) -> bytes | None:
        group, _ = self._member(group_id, member_id, generation)
        if group.state == PREPARING:
            raise RebalanceInProgress(f"group {group_id!r} is rebalancing again; join again")
        return group.sync_results.get(member_id) if group.state == STABLE else None

    # ------------------------------------------------------------------------ heartbeat, leave
    def heartbeat(self, group_id: str, member_id: str, generation: int) -> None:
        group = self.groups.get(group_id)
        if group is not None and group.state == PREPARING and member_id in group.members:
            group.members[member_id].last_heartbeat_ms = self.clock_ms()
            raise RebalanceInProgress(f"group {group_id!r} is rebalancing; join again")
        self._member(group_id, member_id, generation)

    def leave(self, group_id: str, members: list[tuple[str, str]]) -> tuple[list[str], list[StateRecord]]:
        """Remove (member id, instance id) pairs; returns the ones not found, and the records to write."""
        group = self.groups.get(group_id)
        out: list[StateRecord] = []
        unknown = []
        for member_id, instance_id in members:
            if group is not None and not member_id and instance_id:
                member_id = next((m.member_id for m in group.members.values() if m.instance_id == instance_id), "")
            if group is None or member_id not in group.members:
                unknown.append(member_id)
                continue
            self._drop(group, member_id)
        if group is not None and len(unknown) < len(members):
            self._after_departure(out, group)
        return unknown, out

    def _drop(self, group: ClassicGroup, member_id: str) -> None:
        group.members.pop(member_id, None)
        group.joined.discard(member_id)
        group.join_results.pop(member_id, None)

    def _after_departure(self, out: list[StateRecord], group: ClassicGroup) -> None:
        now_ms = self.clock_ms()
        if not group.members:
            group.generation += 1
            group.state, group.protocol, group.leader = EMPTY, "", ""
            group.join_results, group.sync_results, group.joined = {}, {}, set()
            self._write(out, group, group.to_value())
            return
        if group.state == PREPARING:
            self._maybe_complete(group, now_ms)
        else:
            self._prepare(group, now_ms)

    # ----------------------------------------------------------------------------------- time
    def expire(self) -> list[StateRecord]:
        """Members whose session ended; rounds past their rebalance deadline."""
        now_ms = self.clock_ms()
        out: list[StateRecord] = []
        for group in list(self.groups.values()):
            waiting = group.joined if group.state == PREPARING else set()
            silent = [m.member_id for m in group.members.values()
                      if m.member_id not in waiting and now_ms - m.last_heartbeat_ms > m.session_timeout_ms]
            for member_id in silent:
                self._drop(group, member_id)
            if silent:
                self._after_departure(out, group)
            if group.state == PREPARING and now_ms > group.rebalance_deadline_ms:
                self._maybe_complete(group, now_ms, force=True)
                if not group.members:
                    self._write(out, group, group.to_value())
        return out

    # ------------------------------------------------------------------------------ describe
    def delete(self, group_id: str) -> list[StateRecord]:
        group = self.groups.get(group_id)
        out: list[StateRecord] = []
        if group is None:
            return out
        if group.members:
            raise NonEmptyGroup(f"group {group_id!r} has {len(group.members)} live member(s); stop them first")
        self._write(out, group, None)
        return out
