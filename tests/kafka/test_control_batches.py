"""The Kafka port sends logbroker's own control batches (Raft no-ops, share-group state) as empty data batches:
no client hands their records to an application, every client moves past their offsets, and a consumer at the
log end long-polls instead of being answered at once with a no-op."""

from __future__ import annotations

from logbroker_client import records as rec

from logbroker.kafka.handlers.fetch import emptied_control_batches


def data_batch(base_offset: int, values: list[bytes]) -> bytes:
    builder = rec.BatchBuilder()
    for value in values:
        builder.append(1_700_000_000_000, None, value)
    return builder.build(base_offset=base_offset, leader_epoch=3)


def control_batch(base_offset: int) -> bytes:
    return rec.build_control_batch(base_offset, 3, 1_700_000_000_000, b"\x00\x00\x00\x07", b"raft no-op")


def test_control_batches_become_empty_batches_over_the_same_offsets() -> None:
    fetched = data_batch(0, [b"a", b"b"]) + control_batch(2) + data_batch(3, [b"c"]) + control_batch(4)
    sent, data_bytes = emptied_control_batches(fetched)
    headers = [header for _, header in rec.iter_batch_headers(sent)]
    assert [(h.base_offset, h.last_offset, h.records_count, h.is_control) for h in headers] == [
        (0, 1, 2, False), (2, 2, 0, False), (3, 3, 1, False), (4, 4, 0, False)]
    for pos, header in rec.iter_batch_headers(sent):  # every CRC holds
        assert rec.crc32c(sent[pos + rec.CRC_START:pos + header.size]) == header.crc
    assert [r.value for _, records in rec.iter_batches(sent) for r in records] == [b"a", b"b", b"c"]
    assert data_bytes == len(data_batch(0, [b"a", b"b"])) + len(data_batch(3, [b"c"]))


def test_a_fetch_without_control_batches_is_passed_through_untouched() -> None:
    fetched = data_batch(0, [b"a"]) + data_batch(1, [b"b"])
    sent, data_bytes = emptied_control_batches(fetched)
    assert sent is fetched and data_bytes == len(fetched)


def test_only_control_batches_count_as_no_data_for_the_long_poll() -> None:
    assert emptied_control_batches(control_batch(9))[1] == 0
