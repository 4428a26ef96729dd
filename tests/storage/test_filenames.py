from __future__ import annotations

import pytest

from logbroker.storage import filenames


def test_segment_file_names_are_zero_padded_base_offsets() -> None:
    assert filenames.log_file_name(0) == "00000000000000000000.log"
    assert filenames.index_file_name(1000) == "00000000000000001000.index"
    assert filenames.time_index_file_name(2**63 - 1) == "09223372036854775807.timeindex"
    with pytest.raises(ValueError):
        filenames.log_file_name(-1)


def test_parse_segment_file_name_round_trips() -> None:
    for base in (0, 42, 10**18):
        for make, suffix in ((filenames.log_file_name, ".log"), (filenames.index_file_name, ".index"),
                             (filenames.time_index_file_name, ".timeindex")):
            assert filenames.parse_segment_file_name(make(base)) == (base, suffix)
    for name in ("42.log", "0000000000000000004x.log", "00000000000000000042.log.tmp", "x.index", "",
                 filenames.CLEAN_SHUTDOWN_FILE, filenames.RECOVERY_CHECKPOINT_FILE):
        assert filenames.parse_segment_file_name(name) is None


def test_partition_dir_names_split_at_the_last_dash() -> None:
    assert filenames.partition_dir_name("orders", 3) == "orders-3"
    assert filenames.parse_partition_dir_name("orders-3") == ("orders", 3)
    assert filenames.parse_partition_dir_name("my-topic-name-12") == ("my-topic-name", 12)
    assert filenames.parse_partition_dir_name(filenames.partition_dir_name("a-1", 0)) == ("a-1", 0)
    for name in ("orders", "orders-", "-3", "orders-x", "orders-3a", "lost+found", ".-1"):
        assert filenames.parse_partition_dir_name(name) is None


def test_partition_dir_name_rejects_unsafe_names() -> None:
    for topic in ("", ".", "..", "a/b", "a\x00b"):
        with pytest.raises(ValueError, match="invalid topic name"):
            filenames.partition_dir_name(topic, 0)
    with pytest.raises(ValueError, match="numbered from 0"):
        filenames.partition_dir_name("orders", -1)


def test_marker_and_checkpoint_are_not_segment_names() -> None:
    assert not filenames.CLEAN_SHUTDOWN_FILE.endswith(filenames.SEGMENT_SUFFIXES)
    assert not filenames.RECOVERY_CHECKPOINT_FILE.endswith(filenames.SEGMENT_SUFFIXES)
