"""A replica that lost its state waits to catch up before it votes, and that wait survives a restart.

Three production Replicas on one event loop (the harness of test_replica_quiescence). Node 3's directory is
wiped and it rejoins, catching up one entry per append; it restarts half-way. Its log is then not empty, and
nothing in the log says it is incomplete: only the Raft state saved with its appends does (HardState.catching_up).
Without it the restarted replica would vote as if it held everything it once acknowledged."""

from __future__ import annotations

import asyncio
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from logbroker.raft.types import Message, MessageType, Role
from logbroker.storage import filenames
from logbroker.storage.config import LogConfig
from tests.cluster.test_replica_quiescence import (
    GROUP,
    Network,
    elected_quiet_group,
    open_replica,
    open_replicas,
    until,
    write_one,
)

ENTRIES = 12
# One entry per append and one append in flight: node 3 catches up an entry a tick, so it can stop half-way.
ONE_ENTRY_AT_A_TIME = {"max_msg_bytes": 1, "max_inflight_bytes": 1}


def test_a_replica_restarted_half_way_through_catching_up_still_waits_until_it_has(tmp_path: Path) -> None:
    async def scenario() -> None:
        network = Network()
        with ThreadPoolExecutor(2) as executor:
            replicas = open_replicas(tmp_path, network, executor, **ONE_ENTRY_AT_A_TIME)
            try:
                replicas[1].campaign_now()
                await until(network, lambda: replicas[1].node.role is Role.LEADER, "node 1 to lead")
                last = [write_one(replicas[1], f"record {i}".encode()) for i in range(ENTRIES)][-1]
                await until(network, lambda: all(r.durable_offset > last.last_offset for r in replicas.values()),
                            "every replica to hold every record")

                network.dead.add(3)  # a crash, then a new disk
                replicas[3].close()
                shutil.rmtree(tmp_path / "broker-3" / GROUP)
                network.dead.discard(3)
                wiped = open_replica(tmp_path, network, executor, 3, **ONE_ENTRY_AT_A_TIME)
                assert wiped.holds_nothing
                wiped.rejoin_after_losing_state(1, replicas[1].term)
                half_way = ENTRIES // 2
                await until(network, lambda: wiped.durable_offset > half_way, "node 3 to catch up half-way")
                network.dead.add(3)
                await until(network, lambda: wiped.durable_offset == wiped.log.log_end_offset,
                            "node 3's appends to be on its disk")
                assert wiped.node.catching_up and wiped.log.log_end_offset <= last.last_offset, (
                    "node 3 caught up entirely: the test needs it half-way")
                wiped.close()

                restarted = open_replica(tmp_path, network, executor, 3, **ONE_ENTRY_AT_A_TIME)
                assert not restarted.holds_nothing and restarted.node.catching_up, (
                    "restarted half-way through its catch-up, node 3 forgot that it waits to catch up")
                network.dead.discard(3)
                await until(network, lambda: not restarted.node.catching_up, "node 3 to catch up")
                assert restarted.log.log_end_offset > last.last_offset
                await until(network, lambda: restarted.durable_offset == restarted.log.log_end_offset,
                            "node 3's catch-up to be on its disk")
                restarted.close()
                assert not open_replica(tmp_path, network, executor, 3).node.catching_up, (
                    "once caught up, node 3 must vote again after a restart")
            finally:
                for replica in network.replicas.values():
                    replica.close()

    asyncio.run(scenario())


def test_a_follower_back_from_being_down_is_unconfirmed_until_it_answers_in_the_leaders_term(tmp_path: Path) -> None:
    """Its broker may have restarted on an empty disk, and what the leader knew of its log may be gone: the leader
    counts it out of the in-sync set (ReplicaManager.in_sync_replicas) until an answer in its own term tells it
    where that log ends. An answer in an older term is dropped unread and confirms nothing."""
    async def scenario() -> None:
        async with elected_quiet_group(tmp_path) as (network, replicas):
            leader = replicas[1]
            term = leader.term
            network.dead.add(3)
            leader.peer_returned(3)
            replicas[2].peer_returned(3)  # a follower keeps no such list: in-sync sets are the leader's
            assert leader.unconfirmed_followers == {3} and not replicas[2].unconfirmed_followers
            leader.step(Message(MessageType.HEARTBEAT_RESP, 3, 1, term - 1, last_log_offset=-1))
            assert leader.unconfirmed_followers == {3}
            network.dead.discard(3)
            await until(network, lambda: not leader.unconfirmed_followers, "node 3 to answer the woken leader")
            assert leader.term == term and leader.node.progress(3) is not None

    asyncio.run(scenario())


def test_a_replica_whose_segments_were_deleted_but_whose_raft_state_stayed_knows_it_lost_its_log(
        tmp_path: Path) -> None:
    """The broker keeps every group's term and vote in one state log beside the partition directories, so an
    operator who deletes a damaged replica's directory (as the broker's error advises) leaves its Raft state. Its
    saved term says it took part in the group; its log holds no segment: it may have acknowledged what it no
    longer holds, and ReplicaManager makes it catch up before it votes. A replica new here has no saved term."""
    async def scenario() -> None:
        network = Network()
        with ThreadPoolExecutor(2) as executor:
            replicas = open_replicas(tmp_path, network, executor)
            try:
                assert not any(r.lost_its_log for r in replicas.values()), "a new replica has lost nothing"
                replicas[1].campaign_now()
                await until(network, lambda: replicas[1].node.role is Role.LEADER, "node 1 to lead")
                last = write_one(replicas[1], b"acknowledged by all three")
                await until(network, lambda: all(r.durable_offset > last.last_offset for r in replicas.values()),
                            "every replica to hold the record")
                replicas[3].close()
                directory = tmp_path / "broker-3" / GROUP
                for path in directory.iterdir():
                    if path.name != "raft.state":  # the state log stays: here, the group's own state file
                        path.unlink()
                emptied = open_replica(tmp_path, network, executor, 3)
                assert emptied.lost_its_log and not emptied.holds_nothing and emptied.term > 0
                emptied.close()
                replicas[2].close()
                assert not open_replica(tmp_path, network, executor, 2).lost_its_log  # its log is whole
            finally:
                for replica in network.replicas.values():
                    replica.close()

    asyncio.run(scenario())


def test_a_replica_whose_newest_segment_files_were_deleted_catches_up_before_it_votes(tmp_path: Path) -> None:
    """Deleting only the newest segment's files leaves a log that loads cleanly and ends below what the replica
    acknowledged. With the lagging replica it could elect a leader lacking those entries, so it waits to catch up
    like a replica that lost its whole log, and votes again once it holds them."""
    small_segments = LogConfig(segment_bytes=1024)
    async def scenario() -> None:
        network = Network()
        with ThreadPoolExecutor(2) as executor:
            replicas = open_replicas(tmp_path, network, executor, small_segments)
            try:
                replicas[1].campaign_now()
                await until(network, lambda: replicas[1].node.role is Role.LEADER, "node 1 to lead")
                last = [write_one(replicas[1], bytes(100) + f"record {i}".encode()) for i in range(30)][-1]
                await until(network, lambda: all(r.durable_offset > last.last_offset for r in replicas.values()),
                            "every replica to hold every record")
                newest_base = replicas[3].log.segments[-1].base_offset
                assert newest_base > 0, "the test needs several segments"
                replicas[3].close()
                for path in (tmp_path / "broker-3" / GROUP).iterdir():
                    if path.stem == Path(filenames.log_file_name(newest_base)).stem:
                        path.unlink()
                shortened = open_replica(tmp_path, network, executor, 3, small_segments)
                assert shortened.log.log_end_offset == newest_base <= last.last_offset
                assert shortened.lost_its_log and not shortened.holds_nothing
                shortened.rejoin_after_losing_state(1, replicas[1].term)
                assert shortened.node.catching_up
                await until(network, lambda: not shortened.node.catching_up
                            and shortened.durable_offset > last.last_offset, "node 3 to catch up")
                assert not shortened.lost_its_log
            finally:
                for replica in network.replicas.values():
                    replica.close()

    asyncio.run(scenario())
