"""The disk ID of a data directory: created once, kept across restarts, refused clearly when damaged; and its
registration in the metadata log, which keeps the first registration of an ID and takes a new ID over it."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace

import pytest
from logbroker_client import Admin

from logbroker.cluster.liveness import Liveness
from logbroker.cluster.metadata import ClusterState
from logbroker.server import broker as broker_module
from logbroker.server.broker import Broker
from logbroker.server.config import BrokerConfig
from logbroker.server.controller_client import CONTROLLER_DIR, ControllerClient
from logbroker.server.disk_identity import (
    DISK_ID_FILE,
    METADATA_CATCH_UP_FILE,
    DiskIdentityError,
    is_disk_id,
    load_or_create_disk_id,
)
from logbroker.server.errors import LeaderNotAvailable
from tests.support.brokers import InProcessBroker


def test_an_empty_data_directory_gets_a_disk_id_that_stays(tmp_path: Path) -> None:
    first = load_or_create_disk_id(tmp_path)
    assert is_disk_id(first)
    assert (tmp_path / DISK_ID_FILE).read_text() == f"{first}\n"
    assert load_or_create_disk_id(tmp_path) == first
    other = tmp_path / "other"
    other.mkdir()
    assert load_or_create_disk_id(other) != first  # random: another disk, another ID
    assert not list(tmp_path.glob("*.tmp"))  # written through a temporary file, which is gone


@pytest.mark.parametrize("content", [b"", b"not-an-id\n", b"ABCDEF" * 6, b"\xff\xfe\x00"])
def test_a_damaged_disk_id_is_refused_with_what_to_do(tmp_path: Path, content: bytes) -> None:
    (tmp_path / DISK_ID_FILE).write_bytes(content)
    with pytest.raises(DiskIdentityError) as caught:
        load_or_create_disk_id(tmp_path)
    message = str(caught.value)
    assert str(tmp_path / DISK_ID_FILE) in message
    assert "damaged" in message or "cannot read" in message
    assert (tmp_path / DISK_ID_FILE).read_bytes() == content  # left as found, for the operator


def test_a_registration_keeps_its_first_offset_and_a_new_disk_is_kept_beside_it() -> None:
    state = ClusterState()
    old, new = "a" * 32, "b" * 32
    assert state.apply({"op": "broker_disk", "node": 2, "disk_id": old}, 5) is None
    state.apply({"op": "broker_disk", "node": 2, "disk_id": old}, 9)  # a retried registration
    assert state.disk_registrations == {(2, old): 5}
    state.apply({"op": "broker_disk", "node": 2, "disk_id": new}, 12)  # the disk was replaced
    state.apply({"op": "broker_disk", "node": 3, "disk_id": old}, 13)
    state.apply({"op": "broker_disk", "node": 2, "disk_id": old}, 20)  # the old disk again: still registered at 5
    assert state.disk_registrations == {(2, old): 5, (2, new): 12, (3, old): 13}


def _controller_side(registered: dict[tuple[int, str], int], alive: set[int]) -> ControllerClient:
    """A controller client over the parts await_disks_registered reads: the metadata's registrations, liveness
    (broker 1's view of brokers 2 and 3, all alive unless left out of ``alive``) and a 5 ms tick."""
    cluster = ClusterState()
    for offset, (node, disk_id) in enumerate(registered):
        cluster.apply({"op": "broker_disk", "node": node, "disk_id": disk_id}, offset)
    liveness = Liveness(1, [1, 2, 3], timeout_ticks=3)
    liveness.is_alive = lambda node: node == 1 or node in alive  # type: ignore[method-assign]
    broker = SimpleNamespace(node_id=1, disk_id="1" * 32, cluster=cluster, liveness=liveness,
                             config=SimpleNamespace(log_defaults={}, raft_tick_ms=5))
    return ControllerClient(broker)  # type: ignore[arg-type]


def _heartbeat(liveness: Liveness, from_node: int, disk_registered: bool) -> None:
    [(_, beat)] = Liveness(from_node, [from_node, 1], 3).heartbeats(metadata_term=1, disk_registered=disk_registered)
    liveness.note_heartbeat(beat)


async def test_new_partitions_wait_for_a_replaced_disk_whose_broker_says_it_is_not_registered_yet() -> None:
    old_disk = "3" * 32
    client = _controller_side({(1, "1" * 32): 0, (2, "2" * 32): 1, (3, old_disk): 2}, alive={2, 3})
    liveness = client.broker.liveness
    _heartbeat(liveness, 3, disk_registered=False)  # broker 3 came back on a new disk, not registered yet

    waiting = asyncio.create_task(client.await_disks_registered([[1, 3], [2, 3]], "create t", timeout_s=5))
    await asyncio.sleep(0.05)
    assert not waiting.done()  # the old disk's registration does not count
    await client.await_disks_registered([[1, 2]], "create u", timeout_s=1)  # a topic not on broker 3 goes on

    _heartbeat(liveness, 3, disk_registered=True)
    await asyncio.wait_for(waiting, timeout=1)


async def test_a_broker_that_never_registers_its_disk_fails_the_create_naming_it() -> None:
    client = _controller_side({(1, "1" * 32): 0, (2, "2" * 32): 1, (3, "3" * 32): 2}, alive={2, 3})
    _heartbeat(client.broker.liveness, 3, disk_registered=False)
    with pytest.raises(LeaderNotAvailable, match=r"create t: broker\(s\) 3 are starting"):
        await client.await_disks_registered([[2, 3]], "create t", timeout_s=0.05)


async def test_a_down_broker_is_not_waited_for_whatever_it_last_said() -> None:
    client = _controller_side({(1, "1" * 32): 0, (2, "2" * 32): 1, (3, "3" * 32): 2}, alive={2})
    _heartbeat(client.broker.liveness, 3, disk_registered=False)
    await asyncio.wait_for(client.await_disks_registered([[2, 3]], "create t", timeout_s=5), timeout=1)


def _registrations(broker: InProcessBroker) -> tuple[str, bool, dict[tuple[int, str], int]]:
    assert broker.server is not None
    inner = broker.server.broker
    return inner.disk_id, bool(broker.call(lambda: inner.controller_client.disk_registered)), dict(
        broker.call(lambda: dict(inner.cluster.disk_registrations)))  # type: ignore[call-overload]


def test_a_serving_broker_has_its_disk_registered_once_across_restarts(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path / "data").start()  # start() returns once the broker reports SERVING
    try:
        disk_id, registered, disks = _registrations(broker)
        assert registered and list(disks) == [(1, disk_id)]
        Admin(broker.address).create_topic("kept", partitions=1)
    finally:
        broker.stop()
    again = InProcessBroker(tmp_path / "data").start()
    try:
        assert _registrations(again) == (disk_id, True, disks)  # the same disk: not registered a second time
    finally:
        again.stop()


def test_another_disk_registered_under_this_node_id_is_logged_once(tmp_path: Path,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    broker = InProcessBroker(tmp_path / "data").start()
    try:
        assert broker.server is not None
        client = broker.server.broker.controller_client
        other = "c" * 32
        with caplog.at_level("WARNING", logger="logbroker.broker"):
            broker.run(client.propose_command({"op": "broker_disk", "node": 1, "disk_id": other}, 10))
        warned = [r.getMessage() for r in caplog.records if "another disk" in r.getMessage()]
        assert len(warned) == 1 and other in warned[0] and "node id 1" in warned[0], warned
        assert broker.call(lambda: client.disk_registered)  # its own registration stands
    finally:
        broker.stop()


class Killed(BaseException):
    """The process dying at this point."""


def test_a_new_disk_says_its_metadata_log_waits_before_it_has_an_id(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """Killed between the two files, a broker must not restart as a known disk holding an empty metadata log and no
    reason to wait: the marker comes first, and a restart keeps it."""
    def killed_while_writing(data_dir: Path) -> str:
        raise Killed()

    monkeypatch.setattr(broker_module, "load_or_create_disk_id", killed_while_writing)
    with pytest.raises(Killed):
        Broker(BrokerConfig(data_dir=tmp_path, listen="127.0.0.1:0"))
    assert (tmp_path / METADATA_CATCH_UP_FILE).exists() and not (tmp_path / DISK_ID_FILE).exists()
    monkeypatch.undo()
    restarted = Broker(BrokerConfig(data_dir=tmp_path, listen="127.0.0.1:0"))
    assert restarted.disk_is_new and is_disk_id(restarted.disk_id)
    assert (tmp_path / METADATA_CATCH_UP_FILE).exists()


def test_a_data_directory_from_before_disk_ids_gets_an_id_but_no_metadata_wait(tmp_path: Path) -> None:
    """An upgraded broker's directory has a metadata log and no disk.id: its metadata log is its own, not lost."""
    (tmp_path / CONTROLLER_DIR).mkdir()
    broker = Broker(BrokerConfig(data_dir=tmp_path, listen="127.0.0.1:0"))
    assert broker.disk_is_new and (tmp_path / DISK_ID_FILE).exists()
    assert not (tmp_path / METADATA_CATCH_UP_FILE).exists()
