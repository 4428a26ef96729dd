"""The v2 record-batch codec: round trips, cross-checks with kafka-python, and every rejection."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from kafka.record.default_records import DefaultRecordBatch, DefaultRecordBatchBuilder
from logbroker_client import records as rec

HEADERS = st.lists(st.tuples(st.text(max_size=10), st.one_of(st.none(), st.binary(max_size=20))), max_size=3)
RECORD = st.tuples(
    st.integers(min_value=0, max_value=2**41),
    st.one_of(st.none(), st.binary(max_size=300)),
    st.one_of(st.none(), st.binary(max_size=20000)),
    HEADERS,
)


def _ours(records, compression=rec.COMPRESSION_NONE, base_offset=0, leader_epoch=-1):
    return rec.build_batch(records, compression=compression, base_offset=base_offset, leader_epoch=leader_epoch)


def _theirs(records, codec):
    builder = DefaultRecordBatchBuilder(
        magic=2, compression_type=codec, is_transactional=False,
        producer_id=-1, producer_epoch=-1, base_sequence=-1, batch_size=2**30,
    )
    for i, (ts, key, value, headers) in enumerate(records):
        builder.append(i, timestamp=ts, key=key, value=value, headers=headers)
    return bytes(builder.build())


def test_header_is_61_bytes_and_crc_covers_attributes_onwards():
    batch = _ours([(1000, b"k", b"v", [])])
    header = rec.validate_batch(batch)
    assert len(batch) == header.size
    assert header.magic == 2 and header.records_count == 1
    assert header.crc == rec.crc32c(batch[21:])


@settings(max_examples=60, deadline=None)
@given(st.lists(RECORD, min_size=1, max_size=20), st.sampled_from([rec.COMPRESSION_NONE, rec.COMPRESSION_ZSTD]))
def test_round_trip(records, compression):
    batch = _ours(records, compression, base_offset=77)
    header = rec.validate_batch(batch)
    decoded = rec.decode_records(batch, 0, header)
    assert [(r.offset, r.timestamp, r.key, r.value, list(r.headers)) for r in decoded] == [
        (77 + i, ts, k, v, list(h)) for i, (ts, k, v, h) in enumerate(records)
    ]


@pytest.mark.parametrize("codec", [rec.COMPRESSION_NONE, rec.COMPRESSION_ZSTD])
@settings(max_examples=40, deadline=None)
@given(records=st.lists(RECORD, min_size=1, max_size=10))
def test_kafka_python_bytes_decode_with_ours(codec, records):
    batch = _theirs(records, codec)
    header = rec.validate_batch(batch)
    decoded = rec.decode_records(batch, 0, header)
    assert [(r.offset, r.timestamp, r.key, r.value, list(r.headers)) for r in decoded] == [
        (i, ts, k, v, list(h)) for i, (ts, k, v, h) in enumerate(records)
    ]


@pytest.mark.parametrize("codec", [rec.COMPRESSION_NONE, rec.COMPRESSION_ZSTD])
@settings(max_examples=40, deadline=None)
@given(records=st.lists(RECORD, min_size=1, max_size=10))
def test_our_bytes_decode_with_kafka_python(codec, records):
    batch = _ours(records, codec, base_offset=5)
    theirs = DefaultRecordBatch(batch)
    assert theirs.validate_crc()
    assert theirs.compression_type == codec
    got = [(r.offset, r.timestamp, r.key, r.value, list(r.headers)) for r in theirs]
    assert got == [(5 + i, ts, k, v, list(h)) for i, (ts, k, v, h) in enumerate(records)]


def test_uncompressed_bytes_match_kafka_python_exactly():
    records = [(1_700_000_000_000 + i, b"key%d" % i, b"value" * i, [("h", b"x")]) for i in range(5)]
    # kafka-python leaves partitionLeaderEpoch at 0 where the Java producer writes -1.
    assert _ours(records, leader_epoch=0) == _theirs(records, 0)


def test_compressible_kafka_python_zstd_batch_decodes_with_ours():
    records = [(1000 + i, None, b"abc" * 200, []) for i in range(20)]
    batch = _theirs(records, rec.COMPRESSION_ZSTD)
    header = rec.validate_batch(batch)
    assert header.compression == rec.COMPRESSION_ZSTD
    assert len(batch) < 2000
    assert [r.value for r in rec.decode_records(batch, 0, header)] == [b"abc" * 200] * 20


def test_stamping_offsets_and_epoch_keeps_the_crc_valid():
    batch = bytearray(_ours([(1, None, b"a", []), (2, None, b"b", [])]))
    rec.stamp_batch(batch, 1234, 7)
    header = rec.validate_batch(batch)
    assert (header.base_offset, header.leader_epoch, header.last_offset) == (1234, 7, 1235)


def test_control_batch_yields_no_records():
    batch = rec.build_control_batch(9, 2, 1000)
    header = rec.validate_batch(batch)
    assert header.is_control
    assert [r for _, r in rec.iter_batches(batch)] == [[]]


def test_flipped_bit_fails_the_crc():
    batch = bytearray(_ours([(1, b"k", b"value", [])]))
    batch[-2] ^= 0x10
    with pytest.raises(rec.CorruptBatchError, match="CRC mismatch"):
        rec.validate_batch(batch)


def test_wrong_magic_is_rejected_by_name():
    batch = bytearray(_ours([(1, b"k", b"value", [])]))
    batch[16] = 1
    with pytest.raises(rec.CorruptBatchError, match="magic 1"):
        rec.validate_batch(batch)


@pytest.mark.parametrize("cut", [0, 1, 30, 60, 61, 70])
def test_truncated_batch_is_rejected(cut):
    batch = _ours([(1, b"k", b"v" * 20, [])])
    with pytest.raises(rec.CorruptBatchError, match="truncated"):
        rec.validate_batch(batch[:cut])


def test_count_that_disagrees_with_last_offset_delta_is_rejected():
    batch = bytearray(_ours([(1, b"k", b"v", [])]))
    struct.pack_into(">i", batch, 57, 3)
    with pytest.raises(rec.CorruptBatchError, match="recordsCount"):
        rec.validate_batch(batch)


@given(st.integers(min_value=-(2**63), max_value=2**63 - 1))
def test_varint_round_trip(value):
    encoded = rec.encode_varint(value)
    assert rec.decode_varint(encoded, 0) == (value, len(encoded))
    assert len(encoded) <= 10


def test_records_without_headers_share_one_empty_tuple() -> None:
    batch = _ours([(1, None, b"a", []), (2, None, b"b", [("h", b"x")])])
    first, second = rec.decode_records(batch, 0, rec.validate_batch(batch))
    assert first.headers is rec.NO_HEADERS and list(second.headers) == [("h", b"x")]
