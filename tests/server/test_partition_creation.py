"""A big topic's new partitions are made durable a chunk at a time: one syncfs for the chunk's files and names, so
no new partition's directory needs an fsync of its own; where syncfs is missing, file by file as before."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
from logbroker_client import Admin, Producer

from logbroker.server.controller_client import OPEN_PARTITIONS_AT_ONCE
from logbroker.storage import files
from logbroker.storage.files import FileSystemSync
from tests.support.brokers import InProcessBroker

TOPIC = "chunked"
PARTITIONS = OPEN_PARTITIONS_AT_ONCE + 8  # more than a broker opens at once: opened in chunks (open_partitions)


def count_directory_fsyncs(monkeypatch: pytest.MonkeyPatch) -> Counter[str]:
    """Every fsync of a directory from now on, by the directory's name."""
    synced: Counter[str] = Counter()
    real = files.OS_FILES.fsync_dir

    def counting(directory: Path) -> None:
        synced[Path(directory).name] += 1
        real(directory)

    monkeypatch.setattr(files.OS_FILES, "fsync_dir", counting)
    return synced


def create_and_write(tmp_path: Path) -> None:
    broker = InProcessBroker(tmp_path / "data").start()
    try:
        Admin(broker.address).create_topic(TOPIC, partitions=PARTITIONS)
        with Producer(broker.address, acks="all") as producer:
            for partition in range(PARTITIONS):
                producer.send(TOPIC, value=b"v", partition=partition)
            assert producer.flush(timeout=30) == 0
    finally:
        broker.stop()


def test_a_file_system_sync_reports_what_it_did(tmp_path: Path) -> None:
    sync = FileSystemSync(tmp_path)
    try:
        (tmp_path / "f").write_bytes(b"x")
        assert sync.sync() is (files._SYNCFS is not None)
    finally:
        sync.close()


@pytest.mark.skipif(files._SYNCFS is None, reason="no syncfs(2) in this C library (not Linux)")
def test_one_sync_per_chunk_spares_each_new_partition_directory_an_fsync(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The same creation and writes twice, with syncfs and without: every new partition's directory is fsynced
    once less with it (its log's first flush owes nothing for its creation), and at least once without."""
    with_syncfs = count_directory_fsyncs(monkeypatch)
    create_and_write(tmp_path / "with")
    monkeypatch.undo()
    monkeypatch.setattr(files, "_SYNCFS", None)
    without = count_directory_fsyncs(monkeypatch)
    create_and_write(tmp_path / "without")
    for index in range(PARTITIONS):
        name = f"{TOPIC}-{index}"
        assert without[name] >= 1 and with_syncfs[name] == without[name] - 1, (name, with_syncfs, without)
