"""Where a broker's Raft port is, and where it finds its peers': derived from --listen and --peers by one
offset, or given; a setting that cannot work is refused at start with a message that says what to set."""

from __future__ import annotations

import pytest

from logbroker.server.config import DEFAULT_RAFT_PORT_OFFSET, BrokerConfig, BrokerConfigError, load_config

SECRET = "a-cluster-secret-of-enough-length"
PEERS = {1: "10.0.0.1:9092", 2: "10.0.0.2:9092", 3: "10.0.0.3:9192"}


def config(**settings: object) -> BrokerConfig:
    return BrokerConfig(node_id=1, listen="10.0.0.1:9092", peers=dict(PEERS), cluster_secret=SECRET,
                        **settings).validate()  # type: ignore[arg-type]


def test_by_default_every_raft_port_is_the_client_port_plus_the_offset() -> None:
    c = config()
    assert c.raft_listen_address() == ("10.0.0.1", 9092 + DEFAULT_RAFT_PORT_OFFSET)
    assert c.raft_peer_addresses() == {1: "10.0.0.1:9392", 2: "10.0.0.2:9392", 3: "10.0.0.3:9492"}


def test_a_given_raft_listen_sets_the_offset_for_every_peer() -> None:
    c = config(raft_listen="0.0.0.0:9093")
    assert c.raft_listen_address() == ("0.0.0.0", 9093)
    assert c.raft_peer_addresses() == {1: "10.0.0.1:9093", 2: "10.0.0.2:9093", 3: "10.0.0.3:9193"}


def test_given_raft_peers_win_and_must_name_every_broker() -> None:
    given = {1: "127.0.0.1:7001", 2: "127.0.0.1:7002", 3: "127.0.0.1:7003"}
    assert config(raft_listen="127.0.0.1:7001", raft_peers=given).raft_peer_addresses() == given
    with pytest.raises(BrokerConfigError, match=r"raft_peers names nodes \[1, 2\] but --peers names \[1, 2, 3\]"):
        config(raft_peers={1: "127.0.0.1:7001", 2: "127.0.0.1:7002"})


def test_a_raft_port_beyond_the_last_port_is_refused_with_what_to_set() -> None:
    with pytest.raises(BrokerConfigError, match="--raft-listen HOST:PORT"):
        BrokerConfig(node_id=1, listen="127.0.0.1:65400", peers={1: "127.0.0.1:65400", 2: "127.0.0.1:65401"},
                     cluster_secret=SECRET).validate()


def test_the_toml_file_takes_raft_peers_as_a_table_or_a_string(tmp_path: object) -> None:
    from pathlib import Path
    path = Path(str(tmp_path)) / "broker.toml"
    path.write_text('node_id = 2\nlisten = "127.0.0.1:9093"\npeers = "1=127.0.0.1:9092,2=127.0.0.1:9093"\n'
                    'raft_listen = "127.0.0.1:7002"\n[raft_peers]\n1 = "127.0.0.1:7001"\n2 = "127.0.0.1:7002"\n')
    c = load_config(path, {"cluster_secret": SECRET}).validate()
    assert c.raft_peer_addresses() == {1: "127.0.0.1:7001", 2: "127.0.0.1:7002"}
    c = load_config(None, {"node_id": 2, "listen": "127.0.0.1:9093", "peers": "1=127.0.0.1:9092,2=127.0.0.1:9093",
                           "raft_peers": "1=127.0.0.1:7001,2=127.0.0.1:7002", "cluster_secret": SECRET}).validate()
    assert c.raft_peer_addresses()[1] == "127.0.0.1:7001"


def test_a_cluster_of_one_needs_no_raft_port_so_a_high_client_port_is_fine() -> None:
    assert BrokerConfig(listen="127.0.0.1:65500").validate().peers == {}


def test_clients_are_told_the_peers_addresses_unless_advertised_ones_are_given() -> None:
    assert config().client_addresses() == PEERS
    advertised = {1: "lb-1.example:9092", 2: "lb-2.example:9092", 3: "lb-3.example:9092"}
    c = config(advertised_peers=advertised)
    assert c.client_addresses() == advertised
    assert c.peer_addresses() == PEERS  # brokers still reach each other at --peers
    with pytest.raises(BrokerConfigError,
                       match=r"advertised_peers names nodes \[1\] but --peers names \[1, 2, 3\]; name every broker"):
        config(advertised_peers={1: "lb-1.example:9092"})
    c = load_config(None, {"node_id": 1, "listen": "10.0.0.1:9092", "peers": "1=10.0.0.1:9092,2=10.0.0.2:9092",
                           "advertised_peers": "1=lb-1.example:9092,2=lb-2.example:9092",
                           "cluster_secret": SECRET}).validate()
    assert c.client_addresses() == {1: "lb-1.example:9092", 2: "lb-2.example:9092"}
