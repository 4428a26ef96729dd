from __future__ import annotations

from pathlib import Path

from logbroker_client.records import build_batch, iter_batch_headers, iter_batches, validate_batch

from logbroker.storage import filenames
from logbroker.storage.compaction import compact_segment, latest_offsets
from logbroker.storage.log import PartitionLog
from tests.storage.conftest import T0, open_log


def keyed_batch(pairs: list[tuple[str, str | None]], timestamp_ms: int = T0) -> bytes:
    return build_batch([(timestamp_ms + i, key.encode(), None if value is None else value.encode(), [])
                        for i, (key, value) in enumerate(pairs)])


def records(log: PartitionLog) -> list[tuple[int, bytes | None, bytes | None]]:
    data = log.read(log.log_start_offset, 1 << 30)
    return [(r.offset, r.key, r.value) for _, rs in iter_batches(data) for r in rs]


def fill(log: PartitionLog) -> None:
    log.append(bytearray(keyed_batch([("a", "a0"), ("b", "b0"), ("c", "c0")])), 1, T0)  # offsets 0..2
    log.append(bytearray(keyed_batch([("a", "a1"), ("d", "d0")])), 1, T0)  # 3..4
    log.append(bytearray(keyed_batch([("b", "b1"), ("b", "b2"), ("c", None)])), 2, T0)  # 5..7
    log.append(bytearray(keyed_batch([("a", "a2")])), 2, T0)  # 8, in the active segment


def test_compact_keeps_the_last_record_per_key_and_the_offsets(log_dir: Path) -> None:
    config = {"cleanup_policy": "compact", "segment_bytes": 14}
    log = open_log(log_dir, **config)
    fill(log)
    assert log.segment_count == 4  # one batch per segment
    result = log.compact()
    assert result.records_removed == 4 and result.segments_rewritten >= 1 and result.bytes_removed > 0
    # a0 and b0 are superseded in closed segments; b1 by b2; c0 by the tombstone. a1 is superseded only by
    # a record in the active segment, which compaction does not look at.
    assert records(log) == [(3, b"a", b"a1"), (4, b"d", b"d0"), (6, b"b", b"b2"), (7, b"c", None), (8, b"a", b"a2")]
    data = log.read(0, 1 << 30)
    for position, _ in iter_batch_headers(data):
        validate_batch(data, position)
    assert [(h.base_offset, h.last_offset, h.leader_epoch) for _, h in iter_batch_headers(data)] == [
        (3, 4, 1), (6, 7, 2), (8, 8, 2)]
    assert log.read(1, 1) == log.read(3, 1)  # an offset in a gap reads from the next batch
    assert log.epoch_at(5) == 2
    assert log.compact().records_removed == 0
    expected = records(log)
    log.close()
    assert records(open_log(log_dir, **config)) == expected  # clean reopen trusts the rebuilt indexes


def test_gaps_survive_recovery_even_after_switching_back_to_delete(log_dir: Path) -> None:
    log = open_log(log_dir, cleanup_policy="compact", segment_bytes=14)
    fill(log)
    log.compact()
    expected = records(log)
    log.close()
    (log_dir / filenames.CLEAN_SHUTDOWN_FILE).unlink()
    (log_dir / filenames.RECOVERY_CHECKPOINT_FILE).unlink()
    reopened = open_log(log_dir, cleanup_policy="delete", segment_bytes=14)
    assert records(reopened) == expected and reopened.log_end_offset == 9
    assert reopened.append(bytearray(keyed_batch([("e", "e0")])), 3, T0).base_offset == 9


def test_compact_is_a_no_op_for_delete_policy_and_retention_skips_compacted_logs(log_dir: Path) -> None:
    log = open_log(log_dir, segment_bytes=14, retention_ms=1)
    fill(log)
    before = records(log)
    assert log.compact().records_removed == 0 and records(log) == before
    compacted = open_log(log_dir.parent / "other-0", cleanup_policy="compact", segment_bytes=14, retention_ms=1)
    fill(compacted)
    assert compacted.apply_retention(now_ms=T0 + 10**9) == 0


def test_compact_segment_splits_partially_kept_batches_into_runs() -> None:
    batch = keyed_batch([("x", "1"), ("y", "1"), ("x", "2"), ("z", "1"), ("y", "2")])
    latest = latest_offsets([batch])
    assert latest == {b"x": 2, b"y": 4, b"z": 3}
    rewrite = compact_segment(batch, latest)
    assert rewrite.records_removed == 2
    headers = [(h.base_offset, h.last_offset) for _, h in iter_batch_headers(rewrite.data)]
    assert headers == [(2, 4)]
    assert [(r.offset, r.value) for _, rs in iter_batches(rewrite.data) for r in rs] == [
        (2, b"2"), (3, b"1"), (4, b"2")]
