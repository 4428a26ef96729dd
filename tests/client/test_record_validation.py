"""validate_records: a CRC-valid batch whose records contradict its header is refused, saying what disagrees;
the consumer's decoder refuses the same batches; and the C walk accepts exactly what the Python walk does."""

from __future__ import annotations

import struct
import tracemalloc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from kafka.record.default_records import DefaultRecordBatchBuilder
from logbroker_client import records as rec
from logbroker_client.connection import MAX_MESSAGE_BYTES

from tests.support import batches
from tests.support.batches import HEADER_LIES, LYING_BATCHES, seal, section, zstd_bomb, zstd_frame

CODECS = [rec.COMPRESSION_NONE, rec.COMPRESSION_ZSTD]
SMALL_RECORD = st.tuples(  # small fields, so that random byte flips mostly land on lengths and deltas
    st.integers(min_value=0, max_value=2**41),
    st.one_of(st.none(), st.binary(max_size=6)),
    st.one_of(st.none(), st.binary(max_size=12)),
    st.lists(st.tuples(st.text(max_size=3), st.one_of(st.none(), st.binary(max_size=4))), max_size=2),
)


def validate(batch: bytes, max_records_bytes: int = rec.MAX_RECORDS_BYTES) -> None:
    rec.validate_records(batch, 0, rec.validate_batch(batch), max_records_bytes)


def decode(batch: bytes) -> list[rec.Record]:
    return rec.decode_records(batch, 0, rec.read_header(batch))


@pytest.mark.parametrize("kind", list(LYING_BATCHES))
def test_each_lie_passes_the_crc_and_is_refused_saying_what_disagrees(kind: str) -> None:
    build, message = LYING_BATCHES[kind]
    batch = build()
    header = rec.read_header(batch)
    assert rec.crc32c(batch[rec.CRC_START:]) == header.crc  # only the record walk can catch it
    with pytest.raises(rec.CorruptBatchError) as caught:
        rec.validate_records(batch, 0, header)
    assert message in str(caught.value)


@pytest.mark.parametrize("kind", list(LYING_BATCHES))
def test_the_consumer_decoder_refuses_the_same_lies_and_keeps_nothing_of_them(kind: str) -> None:
    batch = LYING_BATCHES[kind][0]()
    out = [rec.Record("t", 0, 0, 0, None, b"earlier", rec.NO_HEADERS)]
    with pytest.raises(rec.CorruptBatchError):
        rec.decode_records(batch, 0, rec.read_header(batch), out=out)
    assert [r.value for r in out] == [b"earlier"]


def test_a_record_length_past_the_batch_end_names_the_record_and_the_bytes_left() -> None:
    with pytest.raises(rec.CorruptBatchError, match=r"record 2 is \d+ bytes long but only \d+ bytes of the batch"):
        validate(batches.record_longer_than_the_batch())


def test_the_walk_stays_inside_the_batch_when_more_bytes_follow_it() -> None:
    # On produce the batch sits in a request, followed by the next batch: those bytes are not its records.
    lying = batches.fewer_records_than_the_header()
    request = lying + seal(section(3), count=3)
    with pytest.raises(rec.CorruptBatchError, match="header says 3 records, the batch holds 2"):
        rec.validate_records(request, 0, rec.validate_batch(request, 0, len(lying)))
    rec.validate_records(request, len(lying), rec.validate_batch(request, len(lying)))


@pytest.mark.parametrize("field, value, message", [
    ("key", -5, "record 0 has key length -5"),
    ("value", -2, "record 0 has value length -2"),
])
def test_lengths_below_minus_one_are_refused(field: str, value: int, message: str) -> None:
    length = rec.encode_varint(value)
    body = b"\x00\x00\x00" + (length + b"\x01" if field == "key" else b"\x01" + length) + b"\x00"
    with pytest.raises(rec.CorruptBatchError, match=message):
        validate(seal(rec.encode_varint(len(body)) + body, count=1))


def test_a_header_count_the_record_cannot_hold_is_refused() -> None:
    body = b"\x00\x00\x00\x01\x01" + rec.encode_varint(1_000_000)
    with pytest.raises(rec.CorruptBatchError, match="record 0 has header count 1000000"):
        validate(seal(rec.encode_varint(len(body)) + body, count=1))


def test_an_unknown_codec_is_refused() -> None:
    with pytest.raises(rec.CorruptBatchError, match="unsupported compression codec 5"):
        validate(seal(section(3), count=3, attributes=5))  # 1-4: gzip, snappy, lz4, zstd


def test_a_zstd_section_is_walked_after_decompressing() -> None:
    good = seal(zstd_frame(section(3)), count=3, attributes=rec.COMPRESSION_ZSTD)
    validate(good)
    lying = seal(zstd_frame(section(3)), count=4, attributes=rec.COMPRESSION_ZSTD)
    with pytest.raises(rec.CorruptBatchError, match="header says 4 records, the batch holds 3"):
        validate(lying)


def test_a_zstd_frame_without_its_size_is_read_as_well() -> None:
    batch = seal(zstd_frame(section(5), declare_size=False), count=5, attributes=rec.COMPRESSION_ZSTD)
    validate(batch)
    assert [r.value for r in decode(batch)] == [b"v%d" % i for i in range(5)]


@pytest.mark.parametrize("declare_size", [True, False])
def test_zstd_output_over_the_limit_is_refused(declare_size: bool) -> None:
    records = section(100)
    batch = seal(zstd_frame(records, declare_size), count=100, attributes=rec.COMPRESSION_ZSTD)
    validate(batch, max_records_bytes=len(records))  # at the limit: fine
    with pytest.raises(rec.CorruptBatchError, match=f"limit of {len(records) - 1} bytes"):
        validate(batch, max_records_bytes=len(records) - 1)


def test_a_frame_declaring_a_gigabyte_is_refused_from_its_header_alone() -> None:
    # Magic, a descriptor saying "single segment, 8-byte content size", the size, and no blocks at all.
    frame = struct.pack("<IBQ", 0xFD2FB528, 0xE0, 1 << 30) + b"\x00" * 8
    with pytest.raises(rec.CorruptBatchError, match="declares 1073741824 bytes, over the limit"):
        validate(seal(frame, count=1, attributes=rec.COMPRESSION_ZSTD))


def test_a_zstd_bomb_is_stopped_without_expanding_it_in_memory() -> None:
    bomb = zstd_bomb(64 << 20)  # a few kilobytes on the wire
    assert len(bomb) < 64 << 10
    limit_bytes = 4 << 20
    tracemalloc.start()
    try:
        with pytest.raises(rec.CorruptBatchError, match="expands past the limit"):
            validate(bomb, max_records_bytes=limit_bytes)
        peak_bytes = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak_bytes < 3 * limit_bytes


def test_the_zstd_limit_is_the_largest_message_a_client_sends() -> None:
    assert rec.MAX_RECORDS_BYTES == MAX_MESSAGE_BYTES


def test_control_batches_from_the_broker_pass() -> None:
    validate(rec.build_control_batch(9, 2, batches.TIMESTAMP_MS))
    validate(rec.build_control_batch(0, 1, batches.TIMESTAMP_MS, key=b"\x00\x00\x00\x02", value=b"config"))


@pytest.mark.parametrize("codec", CODECS)
def test_kafka_python_batches_pass(codec: int) -> None:
    builder = DefaultRecordBatchBuilder(magic=2, compression_type=codec, is_transactional=False, producer_id=-1,
                                        producer_epoch=-1, base_sequence=-1, batch_size=2**30)
    for i in range(50):
        builder.append(i, timestamp=1000 + i, key=b"k%d" % i if i % 2 else None, value=b"x" * i,
                       headers=[("h", b"1"), ("none", None)] if i % 3 else [])
    validate(bytes(builder.build()))


@pytest.mark.parametrize("codec", CODECS)
@settings(max_examples=80, deadline=None)
@given(records=st.lists(SMALL_RECORD, min_size=1, max_size=30), base_offset=st.integers(0, 2**40))
def test_every_batch_the_builder_builds_passes(codec: int, records: list, base_offset: int) -> None:
    validate(rec.build_batch(records, compression=codec, base_offset=base_offset))


def _flipped(records: list, flips: list[tuple[int, int]]) -> tuple[bytes, int]:
    """The uncompressed record section of records with bytes XORed at (position, mask) pairs."""
    batch = rec.build_batch(records)
    damaged = bytearray(batch[rec.HEADER_SIZE:])
    for position, mask in flips:
        damaged[position % len(damaged)] ^= mask
    return bytes(damaged), len(records)


def _outcome(check: object) -> str:
    try:
        check()  # type: ignore[operator]
    except rec.CorruptBatchError:
        return "refused"
    return "accepted"


FLIPS = st.lists(st.tuples(st.integers(0, 10_000), st.integers(1, 255)), min_size=1, max_size=3)


@pytest.mark.parametrize("codec", CODECS)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(records=st.lists(SMALL_RECORD, min_size=1, max_size=8), flips=FLIPS)
def test_flipped_bytes_under_a_good_crc_are_refused_or_decode_consistently(
    codec: int, records: list, flips: list[tuple[int, int]]
) -> None:
    damaged, count = _flipped(records, flips)
    batch = rec.build_batch_from_records(damaged, count=count, base_timestamp=0, max_timestamp=0,
                                         compression=codec, base_offset=100)
    header = rec.validate_batch(batch)  # the CRC was computed over the damaged bytes
    validated = _outcome(lambda: rec.validate_records(batch, 0, header))
    decoded = _outcome(lambda: decode(batch))
    assert validated == decoded  # what the broker accepts, every consumer can read
    if validated == "accepted":
        assert [r.offset for r in decode(batch)] == list(range(100, 100 + count))


@pytest.mark.skipif(not rec.NATIVE_RECORD_WALK, reason="the C record walk is not built (no compiler at install)")
@settings(max_examples=500, deadline=None)
@given(records=st.lists(SMALL_RECORD, min_size=1, max_size=8), flips=FLIPS, count_change=st.sampled_from([0, 0, 1, -1]))
def test_the_c_walk_accepts_exactly_what_the_python_walk_accepts(
    records: list, flips: list[tuple[int, int]], count_change: int
) -> None:
    damaged, count = _flipped(records, flips)
    count += count_change
    native = rec._recordwalk.records_agree(damaged, 0, len(damaged), count)
    python = _outcome(lambda: rec._walk_records(damaged, 0, len(damaged), count)) == "accepted"
    assert native == python


@pytest.mark.skipif(not rec.NATIVE_RECORD_WALK, reason="the C record walk is not built (no compiler at install)")
@pytest.mark.parametrize("kind", [kind for kind in LYING_BATCHES if kind not in HEADER_LIES])
def test_the_c_walk_refuses_every_lie_the_python_walk_refuses(kind: str) -> None:
    batch = LYING_BATCHES[kind][0]()
    header = rec.read_header(batch)
    assert not rec._recordwalk.records_agree(batch, rec.HEADER_SIZE, len(batch), header.records_count)


def test_varints_longer_than_ten_bytes_are_refused_by_both_walks() -> None:
    body = b"\x00" + b"\xff" * 10 + b"\x00" + b"\x00\x01\x01\x00"  # an 11-byte timestampDelta
    records = rec.encode_varint(len(body)) + body
    with pytest.raises(rec.CorruptBatchError, match="varint longer than 10 bytes"):
        rec._walk_records(records, 0, len(records), 1)
    if rec.NATIVE_RECORD_WALK:
        assert not rec._recordwalk.records_agree(records, 0, len(records), 1)
