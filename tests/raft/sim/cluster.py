"""A deterministic simulation of one Raft group: nodes, a faulty network, disks with an fsync boundary,
crashes, restarts, clock skew, retention, membership changes, leadership transfers and client writes.

Everything random comes from one ``random.Random(seed)``, so a seed replays exactly. Time advances in
steps; in each step the simulator maybe injects a fault, lets clients propose, delivers due messages,
ticks the nodes (each at its own rate), runs every node's Ready loop, then runs the checkers. A Ready's
fsync may take several steps: its early messages (a leader's appends) leave when it is written, so
followers may acknowledge entries before the leader's own fsync, which counts only once it is done; the
node meanwhile steps messages and ticks, and a crash in between loses the write.

A run has two phases. Chaos: faults at random for ``chaos_steps`` steps. Then healing: the network is
repaired, every node restarted, and within ``liveness_steps`` a leader must commit a fresh proposal, and
every voter must then catch up with it (a node whose log lost its tail included).
"""

from __future__ import annotations

import random
from collections import Counter, deque
from dataclasses import dataclass, field, replace

from logbroker.raft.errors import RaftError
from logbroker.raft.membership import ChangeKind, Membership, MembershipChange
from logbroker.raft.node import RaftNode
from logbroker.raft.types import Entry, Message, RaftConfig, Ready, Role
from tests.raft.sim.checkers import Checkers, InvariantViolation
from tests.raft.sim.network import Network, NetworkProfile
from tests.raft.sim.state_file import SaveFate
from tests.raft.sim.storage import MemoryLogStorage

ELECTION_TICKS = 10
TRACE_LENGTH = 30
MAX_READIES_PER_STEP = 100
MAX_UNCOMMITTED_OFFSETS = 100
LIVENESS_ELECTION_TIMEOUTS = 40  # after healing, a commit must happen within this many election timeouts
CATCH_UP_STALL_ELECTION_TIMEOUTS = 10  # then a voter still behind must not go this long without its log growing
CATCH_UP_MAX_STEPS = 20_000  # and the whole catch-up must end


@dataclass(frozen=True)
class SimProfile:
    """The shape of one seed's run, drawn from the seed."""

    voters: tuple[int, ...]
    spares: tuple[int, ...]  # running, but not members until a membership change adds them
    network: NetworkProfile
    tick_rates: dict[int, float]
    fault_rate: float
    crash_before_fsync_rate: float
    propose_rate: float
    persisted_lag_steps: int
    fsync_steps: int  # a Ready's persist takes up to this many steps; its early messages leave at its start
    max_msg_bytes: int
    max_inflight_bytes: int

    @classmethod
    def draw(cls, rng: random.Random) -> SimProfile:
        voter_count = rng.choice((3, 3, 5))
        nodes = list(range(1, 6))
        return cls(
            voters=tuple(nodes[:voter_count]),
            spares=tuple(nodes[voter_count:]),
            network=NetworkProfile(
                drop_rate=rng.choice((0.0, 0.02, 0.1, 0.25)),
                duplicate_rate=rng.choice((0.0, 0.02, 0.1)),
                max_delay_steps=rng.choice((1, 2, 4, 8)),
            ),
            # Clock skew: a node may tick at half or one and a half times the simulator's pace.
            tick_rates={node: rng.uniform(0.5, 1.5) for node in nodes},
            fault_rate=rng.choice((0.02, 0.05, 0.1)),
            crash_before_fsync_rate=rng.choice((0.0, 0.005, 0.02)),
            propose_rate=rng.choice((0.1, 0.3, 0.7)),
            persisted_lag_steps=rng.choice((0, 0, 2)),
            fsync_steps=rng.choice((0, 1, 2, 3)),
            max_msg_bytes=rng.choice((64, 256, 4096)),
            max_inflight_bytes=rng.choice((128, 1024, 1 << 20)),
        )


@dataclass
class SimNode:
    node_id: int
    storage: MemoryLogStorage
    node: RaftNode
    tick_rate: float
    up: bool = True
    tick_credit: float = 0.0
    incarnation: int = 0
    pending_persisted: deque[tuple[int, int, int]] = field(default_factory=deque)  # (due step, offset, term)
    crash_in_next_save: bool = False  # fault crash_mid_save: crash while saving the next hard state
    persisting: Ready | None = None  # written, its early messages sent, its fsync not done yet
    persist_due: int = 0  # the step at which that fsync completes
    refill_to: int | None = None  # after a tail cut: the log end it had; "damaged" until it holds that again


@dataclass
class SimResult:
    seed: int
    steps: int
    committed_offset: int
    max_term: int
    liveness_steps: int


class Simulation:
    def __init__(
        self,
        seed: int,
        chaos_steps: int = 300,
        node_class: type[RaftNode] = RaftNode,
        profile: SimProfile | None = None,
    ) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.profile = profile if profile is not None else SimProfile.draw(self.rng)
        self.chaos_steps = chaos_steps
        self.fsync_steps = self.profile.fsync_steps
        self.node_class = node_class
        self.network = Network(random.Random(self.rng.random()), self.profile.network)
        self.checkers = Checkers()
        self.trace: deque[tuple[int, str]] = deque(maxlen=TRACE_LENGTH)
        self.stats: Counter[str] = Counter()  # faults injected and messages delivered, by kind
        self.now = 0
        self.proposal_count = 0
        self.initial_membership = Membership.of(self.profile.voters)
        self.nodes: dict[int, SimNode] = {}
        for node_id in self.profile.voters + self.profile.spares:
            storage = MemoryLogStorage(self.initial_membership)
            self.nodes[node_id] = SimNode(
                node_id, storage, self._make_node(node_id, storage, 0), self.profile.tick_rates[node_id]
            )

    # ---------------------------------------------------------------------------- nodes
    def _make_node(self, node_id: int, storage: MemoryLogStorage, incarnation: int) -> RaftNode:
        config = RaftConfig(
            node_id=node_id,
            election_timeout_ticks=ELECTION_TICKS,
            max_msg_bytes=self.profile.max_msg_bytes,
            max_inflight_bytes=self.profile.max_inflight_bytes,
        )
        rng = random.Random(self.seed * 7919 + node_id * 104729 + incarnation)
        base = storage.base_membership
        assert base is not None
        hard_state = storage.durable_hard_state
        if hard_state.commit_offset > storage.last_offset:
            # Recovery cut the log below the commit offset: start from what is there, as Replica does.
            hard_state = replace(hard_state, commit_offset=storage.last_offset)
        return self.node_class(config, storage, rng, base, hard_state=hard_state)

    def note(self, text: str) -> None:
        self.trace.append((self.now, text))

    def up_nodes(self) -> dict[int, RaftNode]:
        return {i: n.node for i, n in self.nodes.items() if n.up}

    def leader(self) -> SimNode | None:
        """The up leader of the highest term, if any."""
        leaders = [n for n in self.nodes.values() if n.up and n.node.role is Role.LEADER]
        return max(leaders, key=lambda n: n.node.term) if leaders else None

    # ---------------------------------------------------------------------------- the run
    def run(self) -> SimResult:
        try:
            for _ in range(self.chaos_steps):
                self.step(chaos=True)
            liveness = self.heal_and_wait_for_commit()
        except InvariantViolation:
            raise
        except (AssertionError, RaftError) as error:
            raise InvariantViolation("node internal error", f"{type(error).__name__}: {error}") from error
        return SimResult(
            self.seed,
            self.now,
            self.checkers.max_committed_offset,
            max(n.node.term for n in self.nodes.values()),
            liveness,
        )

    def step(self, chaos: bool) -> None:
        self.now += 1
        if chaos and self.rng.random() < self.profile.fault_rate:
            self.inject_fault()
        if self.rng.random() < self.profile.propose_rate:
            self.client_propose()
        for message in self.network.due(self.now):
            self.deliver(message)
        for sim_node in self.nodes.values():
            if sim_node.up:
                self.tick(sim_node)
        for sim_node in self.nodes.values():
            self.report_persisted(sim_node)
            self.process(sim_node, chaos)
        self.note_refills()
        self.checkers.after_step(self.up_nodes())

    def deliver(self, message: Message) -> None:
        target = self.nodes.get(message.to_node)
        if target is None or not target.up:
            return
        self.stats[message.type.value] += 1
        self.note(f"deliver {message!r}")
        target.node.step(message)

    def tick(self, sim_node: SimNode) -> None:
        sim_node.tick_credit += sim_node.tick_rate
        while sim_node.tick_credit >= 1.0:
            sim_node.tick_credit -= 1.0
            sim_node.node.tick()

    def report_persisted(self, sim_node: SimNode) -> None:
        while sim_node.up and sim_node.pending_persisted and sim_node.pending_persisted[0][0] <= self.now:
            _, offset, term = sim_node.pending_persisted.popleft()
            sim_node.node.persisted(offset, term)

    def process(self, sim_node: SimNode, chaos: bool) -> None:
        """The runtime's Ready loop, following the contract: send the early messages, write, fsync (which may
        take a few steps, during which the node goes on stepping messages and ticking), send the messages
        that wait for the fsync, apply, advance."""
        for _ in range(MAX_READIES_PER_STEP):
            if not sim_node.up:
                return
            if sim_node.persisting is not None:
                if sim_node.persist_due > self.now or not self.finish_persist(sim_node, chaos):
                    return
                continue
            ready = sim_node.node.ready()
            if ready is None:
                return
            self.checkers.before_write(sim_node.node_id, sim_node.storage, ready)
            self.send(ready.messages)  # a leader's appends go out before its own write and fsync
            self.checkers.on_write(sim_node.node_id, sim_node.node, ready)
            sim_node.storage.write_ready(ready)
            sim_node.persisting = ready
            slow = ready.must_persist and self.fsync_steps
            sim_node.persist_due = self.now + (self.rng.randint(0, self.fsync_steps) if slow else 0)
        raise InvariantViolation("livelock", f"node {sim_node.node_id} kept producing Readies without input")

    def finish_persist(self, sim_node: SimNode, chaos: bool) -> bool:
        """The fsync of the Ready being persisted completes (or a crash comes first: False)."""
        ready = sim_node.persisting
        assert ready is not None
        if sim_node.crash_in_next_save and ready.hard_state is not None:
            self.crash_during_save(sim_node)
            return False
        crash_rate = self.profile.crash_before_fsync_rate if chaos else 0.0
        if ready.must_persist and self.rng.random() < crash_rate:
            self.crash(sim_node, "before fsync")
            return False
        sim_node.persisting = None
        sim_node.storage.fsync()
        self.checkers.after_persist(sim_node.node_id, sim_node.node, ready)
        self.handle_persisted_entries(sim_node, ready)
        if ready.leader_change is not None:
            change = ready.leader_change
            self.note(f"node {sim_node.node_id}: {change.role.value}, leader {change.leader_id}, t{change.term}")
        self.send(ready.messages_after_persist)
        self.checkers.on_committed(sim_node.node_id, sim_node.node, ready.committed_entries)
        sim_node.node.advance(ready)
        return True

    def send(self, messages: tuple[Message, ...]) -> None:
        for message in messages:
            interference = self.network.send(self.now, message)
            if interference is not None:
                self.note(f"{interference} {message!r}")

    def handle_persisted_entries(self, sim_node: SimNode, ready: Ready) -> None:
        if not ready.entries:
            return
        last = ready.entries[-1]
        if self.profile.persisted_lag_steps:
            # The fsync is done but its completion reaches the node later, as with a group-commit thread.
            due = self.now + self.rng.randint(0, self.profile.persisted_lag_steps)
            sim_node.pending_persisted.append((due, last.last_offset, last.term))
        else:
            sim_node.node.persisted(last.last_offset, last.term)

    # ---------------------------------------------------------------------------- faults
    def inject_fault(self) -> None:
        fault = self.rng.choice(
            (
                "partition",
                "isolate_leader",
                "heal",
                "heal",
                "crash",
                "crash_leader",
                "restart",
                "restart",
                "retention",
                "transfer",
                "member",
                "crash_mid_save",
                "crash_mid_fsync",
                "cut_tail",
            )
        )
        self.stats[fault] += 1
        getattr(self, f"fault_{fault}")()

    def fault_partition(self) -> None:
        nodes = sorted(self.nodes)
        self.rng.shuffle(nodes)
        cut = self.rng.randint(1, len(nodes) - 1)
        groups = [set(nodes[:cut]), set(nodes[cut:])]
        self.network.partition(groups)
        self.note(f"partition {sorted(groups[0])} | {sorted(groups[1])}")

    def fault_isolate_leader(self) -> None:
        """Cut the leader off with at most a minority, so the rest elect a new one and it goes stale."""
        leader = self.leader()
        if leader is None:
            return
        others = sorted(set(self.nodes) - {leader.node_id})
        self.rng.shuffle(others)
        with_leader = {leader.node_id, *others[: self.rng.randint(0, (len(self.nodes) - 1) // 2 - 1)]}
        self.network.partition([with_leader, set(self.nodes) - with_leader])
        self.note(f"isolate leader: {sorted(with_leader)} | {sorted(set(self.nodes) - with_leader)}")

    def fault_crash_leader(self) -> None:
        leader = self.leader()
        if leader is not None:
            self.crash(leader, "leader")

    def fault_heal(self) -> None:
        self.network.heal()
        self.note("heal network")

    def fault_crash(self) -> None:
        up = [n for n in self.nodes.values() if n.up]
        if up:
            self.crash(self.rng.choice(up), "at random")

    def fault_crash_mid_fsync(self) -> None:
        """Crash a node whose fsync is still running: what it wrote since its last fsync is lost, though the
        messages sent before the fsync (a leader's appends) are on their way."""
        persisting = [n for n in self.nodes.values() if n.up and n.persisting is not None and n.storage.dirty]
        if persisting:
            self.crash(self.rng.choice(persisting), "in the middle of an fsync")

    def crash(self, sim_node: SimNode, why: str) -> None:
        sim_node.storage.crash()
        sim_node.up = False
        sim_node.crash_in_next_save = False
        sim_node.persisting = None
        sim_node.pending_persisted.clear()
        self.note(f"crash node {sim_node.node_id} ({why})")

    def fault_crash_mid_save(self) -> None:
        """Crash a node in the middle of its next hard state save: its log is fsynced, the save is lost, torn
        (the state file falls back to its older slot) or whole."""
        up = [n for n in self.nodes.values() if n.up and not n.crash_in_next_save]
        if up:
            sim_node = self.rng.choice(up)
            sim_node.crash_in_next_save = True
            self.note(f"node {sim_node.node_id} will crash during its next state save")

    def crash_during_save(self, sim_node: SimNode) -> None:
        fate = self.rng.choice(list(SaveFate))
        sim_node.storage.crash_during_state_save(fate)
        self.stats[f"save_{fate.value}"] += 1
        self.crash(sim_node, f"during a state save, which was {fate.value}")

    def fault_restart(self) -> None:
        down = [n for n in self.nodes.values() if not n.up]
        if down:
            self.restart(self.rng.choice(down))

    def restart(self, sim_node: SimNode) -> None:
        sim_node.incarnation += 1
        sim_node.node = self._make_node(sim_node.node_id, sim_node.storage, sim_node.incarnation)
        sim_node.up = True
        sim_node.tick_credit = 0.0
        self.note(
            f"restart node {sim_node.node_id} (t{sim_node.node.term}, log ..{sim_node.node.log.last_offset})"
        )
        self.checkers.on_restart(sim_node.node_id, sim_node.node)

    def fault_cut_tail(self) -> None:
        """Restart a crashed node whose recovery cut a damaged tail off its log: a durable suffix is gone.

        Raft assumes an acknowledged entry stays where it was acknowledged. It can survive one node
        breaking that only for entries a majority holds without it: an entry on a bare majority including
        the damaged node may already be committed (or be committed by counting its stale acknowledgement
        before the leader hears of the loss), and would then live on a minority. So the cut takes only such
        entries, and no other node is cut until this one holds its old log end again.
        """
        if any(n.refill_to is not None for n in self.nodes.values()):
            return
        down = [n for n in self.nodes.values() if not n.up]
        if not down:
            return
        sim_node = self.rng.choice(down)
        storage = sim_node.storage
        cuts = self.safe_cuts(sim_node)
        if not cuts:
            return
        cut = self.rng.choice(cuts[:8])
        sim_node.refill_to = storage.last_offset
        storage.cut_durable_tail(cut)
        self.stats["tail_cut"] += 1
        self.checkers.on_log_cut(sim_node.node_id, storage.last_offset)
        self.note(f"recovery cut node {sim_node.node_id}'s log at {cut} (it ended at {sim_node.refill_to})")
        self.restart(sim_node)

    def safe_cuts(self, damaged: SimNode) -> list[int]:
        """Entry starts at which the damaged node's log may be cut: every entry from there on is held by a
        majority of the voters without it, under every membership some node is using. Latest first."""
        others = [n.storage for n in self.nodes.values() if n is not damaged]
        voter_sets = {n.node.membership.voters - {damaged.node_id} for n in self.nodes.values()}
        majorities = [(voters, len(voters | {damaged.node_id}) // 2 + 1) for voters in voter_sets]
        ids = {n.storage: n.node_id for n in self.nodes.values()}
        cuts: list[int] = []
        for entry in reversed(damaged.storage.durable_entries()):
            holders = {ids[s] for s in others if s.durably_holds(entry)}
            if any(len(holders & voters) < majority for voters, majority in majorities):
                break
            cuts.append(entry.base_offset)
        return cuts

    def note_refills(self) -> None:
        """A damaged node is whole again once its durable log reaches where it ended before the cut."""
        for sim_node in self.nodes.values():
            if sim_node.refill_to is not None and sim_node.node.log.durable_offset >= sim_node.refill_to:
                self.note(f"node {sim_node.node_id} holds up to {sim_node.refill_to} again")
                sim_node.refill_to = None

    def fault_retention(self) -> None:
        """Delete an applied, durable prefix of one node's log, as segment retention would."""
        up = [n for n in self.nodes.values() if n.up and n.persisting is None]  # retention cuts a synced log
        if not up:
            return
        leader = self.leader()
        if leader is not None and leader.persisting is not None:
            leader = None
        # Retention on the leader is what forces lagging followers through a log reset, so favour it.
        sim_node = leader if leader is not None and self.rng.random() < 0.5 else self.rng.choice(up)
        node, storage = sim_node.node, sim_node.storage
        limit = min(node.applied_offset, node.log.durable_offset, storage.last_offset) + 1
        starts = [
            e.base_offset for e in storage.durable_entries() if storage.first_offset < e.base_offset <= limit
        ]
        if not starts:
            return
        offset = starts[-1] if self.rng.random() < 0.5 else self.rng.choice(starts)
        storage.delete_before(offset, node.membership_at(offset - 1))
        self.note(f"retention on node {sim_node.node_id}: log now starts at {offset}")

    def fault_transfer(self) -> None:
        leader = self.leader()
        if leader is None:
            return
        voters = sorted(leader.node.membership.voters - {leader.node_id})
        if voters:
            target = self.rng.choice(voters)
            leader.node.transfer_leadership(target)
            self.note(f"transfer leadership {leader.node_id} -> {target}")

    def fault_member(self) -> None:
        leader = self.leader()
        if leader is None:
            return
        membership = leader.node.membership
        change = self.pick_membership_change(leader.node_id, membership)
        if change is None:
            return
        try:
            entry = leader.node.propose_membership_change(change)
        except RaftError as refused:
            self.note(f"membership change {change.kind.value} {change.node_id} refused: {refused}")
            return
        self.stats["member_ok"] += 1
        self.note(f"membership change {change.kind.value} {change.node_id} at {entry.last_offset}")

    def pick_membership_change(self, leader_id: int, membership: Membership) -> MembershipChange | None:
        outsiders = sorted(set(self.nodes) - membership.members)
        options: list[MembershipChange] = []
        options += [MembershipChange(ChangeKind.PROMOTE_LEARNER, n) for n in sorted(membership.learners)]
        options += [MembershipChange(ChangeKind.ADD_LEARNER, n) for n in outsiders]
        if len(membership.voters) > 3:
            voters = sorted(membership.voters - {leader_id})
            options += [MembershipChange(ChangeKind.REMOVE_NODE, n) for n in voters]
        options += [MembershipChange(ChangeKind.REMOVE_NODE, n) for n in sorted(membership.learners)]
        return self.rng.choice(options) if options else None

    # ---------------------------------------------------------------------------- clients
    def client_propose(self) -> Entry | None:
        leaders = [n for n in self.nodes.values() if n.up and n.node.role is Role.LEADER]
        if not leaders:
            return None
        sim_node = self.rng.choice(leaders)
        if sim_node.node.log.last_offset - sim_node.node.commit_offset > MAX_UNCOMMITTED_OFFSETS:
            return None  # clients bound their in-flight writes, as a producer's max in-flight requests do
        self.proposal_count += 1
        payload = f"s{self.seed}p{self.proposal_count}".encode()
        try:
            entry = sim_node.node.propose(payload, self.rng.randint(1, 4))
        except RaftError:
            return None
        self.note(
            f"propose at node {sim_node.node_id}: [{entry.base_offset}..{entry.last_offset}] t{entry.term}"
        )
        return entry

    # ---------------------------------------------------------------------------- liveness
    def heal_and_wait_for_commit(self) -> int:
        """Repair everything, then require a leader to commit a new proposal within a bounded time."""
        self.network.heal()
        self.network.profile = replace(self.network.profile, drop_rate=0.0)
        # Slow disks, like lossy links, are a fault: with both, an election's round trip (two fsyncs and two
        # network delays) can outlast the election timeout, and elections then fail for ever.
        self.fsync_steps = min(self.fsync_steps, 1)
        for sim_node in self.nodes.values():
            sim_node.crash_in_next_save = False
            if not sim_node.up:
                self.restart(sim_node)
        self.note("healed: network repaired, every node up")
        marker: Entry | None = None
        budget = LIVENESS_ELECTION_TIMEOUTS * ELECTION_TICKS
        for elapsed in range(1, budget + 1):
            leader = self.leader()
            if leader is not None and (marker is None or marker.term != leader.node.term):
                marker = self.propose_marker(leader)
            self.step(chaos=False)
            if marker is not None and self.is_committed(marker):
                self.wait_for_catch_up(marker)
                return elapsed
        raise InvariantViolation(
            "liveness", f"no leader committed a new proposal within {budget} steps after the faults healed"
        )

    def wait_for_catch_up(self, marker: Entry) -> None:
        """Every voter must come to hold the committed marker. One far behind may take long with small
        messages, so what fails is a voter whose log stops growing, or a catch-up without end."""
        stall_limit = CATCH_UP_STALL_ELECTION_TIMEOUTS * ELECTION_TICKS
        ends: dict[int, int] = {}
        stalled = 0
        for _ in range(CATCH_UP_MAX_STEPS):
            behind = self.voters_without(marker)
            if not behind:
                return
            now = {i: self.nodes[i].node.log.last_offset for i in behind}
            stalled = stalled + 1 if now == ends else 0
            if stalled > stall_limit:
                raise InvariantViolation(
                    "catch-up", f"voters {behind} lack the entry committed at {marker.last_offset}, and their "
                    f"logs have not grown for {stall_limit} steps")
            ends = now
            self.step(chaos=False)
        raise InvariantViolation("catch-up", f"voters still lack the committed entry after {CATCH_UP_MAX_STEPS} steps")

    def voters_without(self, entry: Entry) -> list[int]:
        leader = self.leader()
        voters = leader.node.membership.voters if leader is not None else frozenset(self.profile.voters)
        return sorted(i for i in voters if not self.holds(self.nodes[i].node, entry))

    @staticmethod
    def holds(node: RaftNode, entry: Entry) -> bool:
        """Whether node's log has the entry, or has moved its start past it (which only a commit allows)."""
        return entry.last_offset < node.log.first_offset or node.log.term_at(entry.last_offset) == entry.term

    def propose_marker(self, leader: SimNode) -> Entry | None:
        try:
            entry = leader.node.propose(f"s{self.seed}-marker-t{leader.node.term}".encode(), 1)
        except RaftError:
            return None
        self.note(f"liveness marker at node {leader.node_id}: {entry.last_offset} t{entry.term}")
        return entry

    def is_committed(self, entry: Entry) -> bool:
        known = self.checkers.committed.get(entry.last_offset)
        return known is not None and known.term == entry.term and known.payload == entry.payload

    def format_trace(self) -> list[str]:
        return [f"  step {step:5d}  {text}" for step, text in self.trace]
