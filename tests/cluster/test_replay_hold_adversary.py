"""Adversarial tests of --advertised-peers and of replicas opened holding nothing while a broker replays the
metadata log (docs/raft.md, "A voter that lost its whole state").

Deadlock hunts: after each sequence every partition of every topic has a leader within a deadline, and the
restarted broker's replicas catch up, so that a second broker's loss still leaves a voting majority.
Loss hunts: every record acknowledged with acks=all is read back afterwards.
Advertised peers: clients bootstrapped at any broker reach every leader while brokers are cut off from each
other, and hostile or inconsistent configurations are refused at start with a clear message.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from logbroker_client import Admin, Producer

from logbroker.server.config import BrokerConfig, BrokerConfigError, load_config
from tests.support.brokers import REPO_ROOT, wait_until
from tests.support.checker import AckLog, assert_clean, make_value, read_log
from tests.support.cluster import BrokerCluster

LEADER_TIMEOUT_S = 30.0


# ---------------------------------------------------------------------------------------------- helpers


def _admin(cluster: BrokerCluster, *nodes: int) -> Admin:
    return Admin(cluster.bootstrap_of(*nodes) if nodes else cluster.bootstrap, request_timeout_ms=5000)


def create_topic(cluster: BrokerCluster, name: str, partitions: int, *via: int) -> None:
    def created() -> bool:
        try:
            with _admin(cluster, *via) as admin:
                admin.create_topic(name, partitions=partitions, replication_factor=3)
            return True
        except Exception as exc:  # noqa: BLE001 - retried until the deadline; "already exists" ends it
            return "exist" in str(exc).lower()
    wait_until(created, LEADER_TIMEOUT_S, f"topic {name} to be created", interval_s=0.2)


def delete_topic(cluster: BrokerCluster, name: str, *via: int) -> None:
    def deleted() -> bool:
        try:
            with _admin(cluster, *via) as admin:
                admin.delete_topic(name)
            return True
        except Exception as exc:  # noqa: BLE001
            return "not exist" in str(exc).lower() or "unknown" in str(exc).lower()
    wait_until(deleted, LEADER_TIMEOUT_S, f"topic {name} to be deleted", interval_s=0.2)


def wait_log(cluster: BrokerCluster, node: int, text: str, since: int, timeout_s: float = 30.0) -> None:
    """Wait until broker `node`'s log, past byte `since` (this run of it), holds `text`."""
    wait_until(lambda: text in cluster.brokers[node].log_since(since), timeout_s, f"broker {node} to log {text!r}",
               interval_s=0.01)


def produce_all(bootstrap: str, topic: str, partitions: int, per_partition: int, acks: AckLog,
                tag: bytes = b"") -> None:
    """acks=all records to every partition; every one must be acknowledged."""
    before = acks.count()  # sequences go on from there, so each partition's are increasing across calls
    with Producer(bootstrap, acks="all", linger_ms=2, request_timeout_ms=3000,
                  delivery_timeout_ms=int(LEADER_TIMEOUT_S * 1000)) as producer:
        for seq in range(before, before + per_partition * partitions):
            value = make_value(seq, tag=tag + b"-%d" % (seq % partitions))
            producer.send(topic, value=value, partition=seq % partitions).add_done_callback(acks.callback(value))
        producer.flush(timeout=LEADER_TIMEOUT_S + 10)
    assert acks.count() == before + per_partition * partitions, acks.summary()


def assert_acked_readable(cluster: BrokerCluster, topic: str, partitions: int, acks: AckLog,
                          bootstrap: str | None = None) -> None:
    log = read_log(bootstrap or cluster.bootstrap, topic, range(partitions), timeout_s=LEADER_TIMEOUT_S)
    # Values of one partition carry their own sequence (seq % partitions == partition): check per partition.
    for partition in range(partitions):
        acked = {v: place for v, place in acks.snapshot().items() if place[0] == partition}
        assert_clean(acked, {partition: log[partition]}, f"{topic}-{partition}: ")


# --------------------------------------------------------------------------- advertised_peers configs

PEERS = {1: "127.0.0.1:19001", 2: "127.0.0.1:19002", 3: "127.0.0.1:19003"}


def _config(tmp_path: Path, **kwargs: object) -> BrokerConfig:
    secret = tmp_path / "secret"
    if not secret.exists():
        secret.write_text("s" * 64)
    values: dict[str, object] = {"node_id": 1, "listen": PEERS[1], "peers": dict(PEERS), "cluster_secret_file": secret}
    values.update(kwargs)
    return BrokerConfig(**values)  # type: ignore[arg-type]


def test_inconsistent_advertised_peers_are_refused_with_a_clear_message(tmp_path: Path) -> None:
    """A config naming other brokers for clients than --peers does, or not HOST:PORT, is refused at start."""
    good = {n: f"10.0.0.{n}:9092" for n in PEERS}
    assert _config(tmp_path, advertised_peers=good).validate().client_addresses() == good
    assert _config(tmp_path).validate().client_addresses() == PEERS  # default: --peers
    for bad, words in [({1: good[1], 2: good[2]}, ["advertised_peers", "[1, 2]", "[1, 2, 3]"]),
                       ({**good, 4: "10.0.0.4:9092"}, ["advertised_peers", "[1, 2, 3, 4]"]),
                       ({**good, 2: "10.0.0.2"}, ["10.0.0.2", "HOST:PORT"]),
                       ({**good, 2: ":9092"}, [":9092", "HOST:PORT"]),
                       ({**good, 3: "10.0.0.3:70000"}, ["70000", "HOST:PORT"]),
                       ({**good, 3: "10.0.0.3:port"}, ["port", "HOST:PORT"])]:
        with pytest.raises(BrokerConfigError) as info:
            _config(tmp_path, advertised_peers=bad).validate()
        assert all(w in str(info.value) for w in words), (bad, str(info.value))
    # A broker without --peers (a cluster of one) may only advertise itself.
    with pytest.raises(BrokerConfigError, match="advertised_peers"):
        BrokerConfig(node_id=1, listen=PEERS[1], advertised_peers={2: "10.0.0.2:9092"}).validate()
    assert BrokerConfig(node_id=1, listen=PEERS[1], advertised_peers={1: "10.0.0.1:9092"}
                        ).validate().client_addresses() == {1: "10.0.0.1:9092"}
    # TOML spelling, as a string and as a table, goes through the same checks.
    config_file = tmp_path / "broker.toml"
    config_file.write_text('advertised_peers = "1=10.0.0.1:9092,2=10.0.0.2:9092"\n')
    with pytest.raises(BrokerConfigError, match=r"advertised_peers names nodes \[1, 2\]"):
        load_config(config_file, {"peers": dict(PEERS), "node_id": 1, "listen": PEERS[1],
                                  "cluster_secret_file": tmp_path / "secret"})
    config_file.write_text('[advertised_peers]\n1 = "10.0.0.1:9092"\n2 = "10.0.0.2:9092"\n3 = "10.0.0.3:9092"\n')
    loaded = load_config(config_file, {"peers": dict(PEERS), "node_id": 1, "listen": PEERS[1],
                                       "cluster_secret_file": tmp_path / "secret"})
    assert loaded.client_addresses() == good
    # The real command refuses at start, exit code 2, and says why on stderr.
    proc = subprocess.run(
        [sys.executable, "-m", "logbroker.server.cli", "serve", "--node-id", "1", "--data-dir", str(tmp_path / "d"),
         "--listen", PEERS[1], "--peers", ",".join(f"{n}={a}" for n, a in PEERS.items()),
         "--cluster-secret-file", str(tmp_path / "secret"), "--advertised-peers", "1=10.0.0.1:9092,3=10.0.0.3:9092"],
        capture_output=True, text=True, timeout=60, cwd=REPO_ROOT, env={"PYTHONPATH": str(REPO_ROOT),
                                                                         "PATH": "/usr/bin:/bin"})
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    assert "advertised_peers names nodes [1, 3]" in proc.stderr, proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_hostile_advertised_peers_are_refused(tmp_path: Path) -> None:
    good = {n: f"10.0.0.{n}:9092" for n in PEERS}
    for bad in [{**good, 1: "10.0.0.1:0"},  # clients cannot connect to port 0
                {n: "10.0.0.1:9092" for n in PEERS},  # every broker at one address: clients misrouted
                {**good, 2: "http://10.0.0.2:9092"}]:  # not a host name
        with pytest.raises(BrokerConfigError):
            _config(tmp_path, advertised_peers=bad).validate()
    config_file = tmp_path / "broker.toml"
    overrides = {"peers": dict(PEERS), "node_id": 1, "listen": PEERS[1], "cluster_secret_file": tmp_path / "secret"}
    _config(tmp_path)  # writes the secret
    for text in ['[advertised_peers]\none = "10.0.0.1:9092"\n', 'advertised_peers = ["10.0.0.1:9092"]\n']:
        config_file.write_text(text)
        with pytest.raises(BrokerConfigError, match="advertised_peers"):
            load_config(config_file, overrides)


# ------------------------------------------------------------------- advertised_peers in a live cluster


@pytest.mark.slow  # a fault sequence on three brokers: make test-slow
def test_clients_reach_every_leader_while_brokers_are_cut_off(proxied_cluster: BrokerCluster) -> None:
    """Brokers talk through proxies, clients directly: wherever a client bootstraps, Metadata names the direct
    addresses, and acks=all produce reaches every partition's leader while any one broker is isolated, or one
    link between two brokers is cut; every acknowledged record is readable afterwards."""
    cluster = proxied_cluster
    topic, partitions = "adv", 3
    create_topic(cluster, topic, partitions)
    cluster.leaders_of_all({topic: partitions})
    direct = {n: b.address for n, b in cluster.brokers.items()}
    for node in cluster.brokers:
        with Admin(cluster.bootstrap_of(node), request_timeout_ms=5000) as admin:
            assert admin.broker_addresses() == direct, f"broker {node} advertises proxies to clients"
    acks = AckLog()
    faults = [("isolate", 1), ("isolate", 2), ("isolate", 3), ("cut", (1, 2)), ("cut", (3, 1))]
    for round_no, (kind, what) in enumerate(faults):
        if kind == "isolate":
            assert isinstance(what, int)
            cluster.isolate(what)
            cut_off = (what,)
        else:
            assert isinstance(what, tuple)
            cluster.cut_link(*what)
            cluster.cut_link(what[1], what[0])
            cut_off = ()
        try:
            # Leaders move off an isolated broker; a client bootstrapped at it (or anywhere) must follow.
            cluster.leaders_of_all({topic: partitions}, exclude=cut_off)
            for boot in cluster.brokers:
                produce_all(cluster.bootstrap_of(boot), topic, partitions, 5, acks,
                            tag=b"r%d-b%d" % (round_no, boot))
        finally:
            cluster.heal()
    cluster.wait_all_caught_up({topic: partitions})
    for boot in cluster.brokers:
        assert_acked_readable(cluster, topic, partitions, acks, cluster.bootstrap_of(boot))


# ---------------------------------------------------------------------------- replicas holding nothing


@pytest.mark.slow
def test_replaced_disk_never_helps_elect_a_leader_lacking_acked_records(cluster: BrokerCluster) -> None:
    """The durability scenario the hold exists for: records acked by {leader, A} while B is down; the leader
    dies, A's disk is replaced, B returns. A and B must not elect B (it lacks the records); once the old leader
    is back every acked record is there, and no partition is left without a leader."""
    topic, partitions = "safety", 2
    create_topic(cluster, topic, partitions)
    leaders = cluster.leaders_of_all({topic: partitions})
    leader = leaders[(topic, 0)]
    acks = AckLog()
    produce_all(cluster.bootstrap, topic, partitions, 20, acks, tag=b"before")
    cluster.wait_all_caught_up({topic: partitions})
    others = [n for n in cluster.brokers if n != leader]
    lagging, wiped = others
    cluster.kill(lagging)
    produce_all(cluster.bootstrap_of(leader, wiped), topic, partitions, 30, acks, tag=b"lagging-down")
    cluster.kill(leader)
    cluster.brokers[wiped].replace_disk()
    cluster.brokers[wiped].launch()
    cluster.brokers[lagging].launch()
    # Neither serves yet: A's metadata log waits to catch up too (disk_identity.py), so the two cannot elect a
    # controller leader before the old leader returns. Until then A must not vote: no leader of partition 0 with
    # a log missing records.
    acked_ends = {p: max((o for pp, o in acks.snapshot().values() if pp == p), default=-1)
                  for p in range(partitions)}
    deadline = time.monotonic() + 4.0
    while time.monotonic() < deadline:
        for partition in range(partitions):
            for node, view in cluster.views(topic, partition, [wiped, lagging]).items():
                if view.leader_id == node and view.local_replica:
                    assert view.log_end_offset > acked_ends[partition], (
                        f"broker {node} leads {topic}-{partition} with log end {view.log_end_offset}, "
                        f"below acknowledged offset {acked_ends[partition]}")
        time.sleep(0.1)
    cluster.brokers[leader].launch()
    cluster.wait_serving()
    cluster.leaders_of_all({topic: partitions})
    cluster.wait_all_caught_up({topic: partitions})
    assert_acked_readable(cluster, topic, partitions, acks)
    # The wiped broker caught up for real: with the old leader gone again, it and the lagging one elect.
    cluster.kill(leader)
    cluster.leaders_of_all({topic: partitions}, exclude=(leader,))
    assert_acked_readable(cluster, topic, partitions, acks, cluster.bootstrap_of(wiped, lagging))


@pytest.mark.slow  # a fault sequence on three brokers: make test-slow
def test_topic_changes_during_replays_and_full_restarts_never_deadlock(cluster: BrokerCluster) -> None:
    """Broker 3 misses topic creations, deletions and re-creations of one name while it is down with its disk
    wiped, and more while it is frozen right after it started (so they reach it mid-replay); then every broker is
    killed at once right after a topic creation, and all restart together, broker 2 with an empty disk. After
    each step every partition must get a leader and every replica catch up; then, with another broker down, the
    broker that held nothing must vote so that every partition still gets a leader. No acked record is lost."""
    create_topic(cluster, "kept", 2)
    create_topic(cluster, "doomed", 2)
    create_topic(cluster, "reborn", 2)
    acks = AckLog()
    cluster.leaders_of_all({"kept": 2, "doomed": 2, "reborn": 2})
    produce_all(cluster.bootstrap, "kept", 2, 10, acks, tag=b"kept")
    cluster.brokers[3].replace_disk()
    create_topic(cluster, "missed", 2, 1, 2)  # broker 3 never took part
    delete_topic(cluster, "reborn", 1, 2)
    create_topic(cluster, "reborn", 3, 1, 2)  # the same name again, a new topic ID
    since = cluster.brokers[3].log_size()
    cluster.brokers[3].launch()
    wait_log(cluster, 3, "serving on", since)  # its port is open: it is replaying the metadata log now
    cluster.pause(3)
    # While broker 3 is mid-start: more creations and a deletion of a topic whose replica it holds.
    create_topic(cluster, "during", 2, 1, 2)
    delete_topic(cluster, "doomed", 1, 2)
    create_topic(cluster, "doomed", 1, 1, 2)
    cluster.resume(3)
    cluster.wait_serving(3)
    create_topic(cluster, "after", 2)
    topics = {"kept": 2, "missed": 2, "reborn": 3, "during": 2, "doomed": 1, "after": 2}
    cluster.leaders_of_all(topics)
    cluster.wait_all_caught_up(topics)
    assert "holds no Raft state or log" in cluster.brokers[3].log_text()[since:]  # the hold was exercised
    cluster.kill(1)  # broker 3 must be a voter again everywhere
    cluster.leaders_of_all(topics, exclude=(1,))
    cluster.restart(1)
    cluster.wait_all_caught_up(topics)
    assert_acked_readable(cluster, "kept", 2, acks)

    # Every broker killed together, right after a topic was created (its leader report may not be out yet),
    # and all three restart at once, broker 2 with an empty disk.
    produce_all(cluster.bootstrap, "kept", 2, 10, acks, tag=b"kept2")
    create_topic(cluster, "lastsecond", 3)
    for node in (1, 2, 3):
        cluster.kill(node)
    shutil.rmtree(cluster.brokers[2].data_dir)
    cluster.brokers[2].data_dir.mkdir()
    for node in (1, 2, 3):
        cluster.brokers[node].launch()
    create_topic(cluster, "racing", 2)  # while all three replay
    cluster.wait_serving()
    topics.update({"lastsecond": 3, "racing": 2})
    cluster.leaders_of_all(topics)
    cluster.wait_all_caught_up(topics)
    cluster.kill(3)  # broker 2 must have caught up on everything and vote with broker 1
    cluster.leaders_of_all(topics, exclude=(3,))
    assert_acked_readable(cluster, "kept", 2, acks, cluster.bootstrap_of(1, 2))


@pytest.mark.slow  # a fault sequence on three brokers: make test-slow
def test_broker_cut_off_from_the_controller_leader_during_replay(proxied_cluster: BrokerCluster) -> None:
    """A broker restarts with an empty disk while cut off from the controller leader (it hears the third
    broker only), and topics are created and deleted meanwhile. Once healed, nothing may stay held: every
    partition is led, every replica catches up, and with the controller leader's broker gone the restarted
    broker votes."""
    cluster = proxied_cluster
    create_topic(cluster, "base", 3)
    cluster.leaders_of_all({"base": 3})
    acks = AckLog()
    produce_all(cluster.bootstrap, "base", 3, 10, acks, tag=b"base")
    with Admin(cluster.bootstrap, request_timeout_ms=5000) as admin:
        controller = int(admin.describe_cluster().controller_id)
    assert controller in cluster.brokers
    victim = next(n for n in sorted(cluster.brokers) if n != controller)
    third = next(n for n in sorted(cluster.brokers) if n not in (controller, victim))
    cluster.brokers[victim].replace_disk()
    create_topic(cluster, "unseen", 2, controller, third)
    cluster.cut_link(victim, controller)
    cluster.cut_link(controller, victim)
    since = cluster.brokers[victim].log_size()
    cluster.brokers[victim].launch()
    try:
        wait_log(cluster, victim, "serving on", since)  # started, replaying through the third broker only
        create_topic(cluster, "cutoff", 2, controller, third)
        delete_topic(cluster, "unseen", controller, third)
        # The cluster keeps serving through the two connected brokers, also for a client of the cut-off one.
        produce_all(cluster.bootstrap_of(controller, third), "base", 3, 5, acks, tag=b"cut")
        topics_now = {"base": 3, "cutoff": 2}
        cluster.leaders_of_all(topics_now)
        # The cut-off broker must not lead a partition with a log missing acknowledged records.
        ends = {p: max(o for v, (pp, o) in acks.snapshot().items() if pp == p) for p in range(3)}
        for partition in range(3):
            view = cluster.partition_view(victim, "base", partition)
            if view is not None and view.leader_id == victim and view.local_replica:
                assert view.log_end_offset > ends[partition], view
        # Hold the cut while the victim is up for a while (a fault's duration, not a wait for an outcome):
        # it must not take part in electing a leader lacking acked records meanwhile.
        hold_until = time.monotonic() + 3.0
        while time.monotonic() < hold_until:
            for partition in range(3):
                view = cluster.partition_view(victim, "base", partition)
                if view is not None and view.leader_id == victim and view.local_replica:
                    assert view.log_end_offset > ends[partition], view
            time.sleep(0.1)
    finally:
        cluster.heal()
    cluster.wait_serving(victim)
    topics = {"base": 3, "cutoff": 2}
    cluster.leaders_of_all(topics)
    cluster.wait_all_caught_up(topics)
    cluster.kill(controller)
    cluster.leaders_of_all(topics, exclude=(controller,))
    assert_acked_readable(cluster, "base", 3, acks, cluster.bootstrap_of(victim, third))
