"""The C record codec (_recordcodec.c) against the Python one it shortcuts: the same bytes out of the encoder,
the same records out of the decoder, and no batch the Python decoder refuses is accepted by the C one."""

from __future__ import annotations

import gc

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from logbroker_client import records as rec

pytestmark = pytest.mark.skipif(not rec.NATIVE_RECORD_CODEC,
                                reason="the C record codec was not built here (no compiler when installed)")

if rec.NATIVE_RECORD_CODEC:
    from logbroker_client import _recordcodec

FIELD = st.one_of(st.none(), st.binary(max_size=300))
HEADERS = st.lists(st.tuples(st.text(max_size=4), st.one_of(st.none(), st.binary(max_size=6))), max_size=3)
RECORDS = st.lists(st.tuples(st.integers(-(2**40), 2**40), FIELD, FIELD, HEADERS), min_size=1, max_size=20)


def python_decode(section: bytes, header: rec.BatchHeader, min_offset: int = 0) -> list[rec.Record]:
    out: list[rec.Record] = []
    rec._decode_record_block(section, header, "t", 3, min_offset, out)
    return out


def c_decode(section: bytes, header: rec.BatchHeader, min_offset: int = 0) -> list[rec.Record] | None:
    out: list[rec.Record] = []
    ok = _recordcodec.decode_block(section, header.records_count, header.base_offset, header.base_timestamp, "t", 3,
                                   min_offset, out, rec.Record, rec.NO_HEADERS)
    return out if ok else None


def section_of(records: list[tuple[int, bytes | None, bytes | None, list[tuple[str, bytes | None]]]],
               builder_class: type[rec.PythonBatchBuilder] = rec.BatchBuilder) -> tuple[bytes, rec.BatchHeader]:
    builder = builder_class()
    for timestamp_ms, key, value, headers in records:
        builder.append(1_700_000_000_000 + timestamp_ms, key, value, headers)
    batch = builder.build(base_offset=1_000)
    header = rec.read_header(batch)
    return bytes(rec.batch_records_bytes(batch, 0, header)), header


@settings(max_examples=300, deadline=None)
@given(st.integers(0, 20_000), st.integers(-(2**62), 2**62), FIELD, FIELD)
def test_the_c_encoder_writes_the_python_encoders_bytes(offset_delta: int, timestamp_delta: int,
                                                         key: bytes | None, value: bytes | None) -> None:
    assert _recordcodec.encode_plain(offset_delta, timestamp_delta, key, value) == rec.encode_record(
        offset_delta, timestamp_delta, key, value)


@settings(max_examples=300, deadline=None)
@given(RECORDS, st.integers(1_000, 1_025))
def test_the_c_decoder_gives_the_python_decoders_records(records: list, min_offset: int) -> None:  # type: ignore[type-arg]
    section, header = section_of(records)
    assert c_decode(section, header, min_offset) == python_decode(section, header, min_offset)


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(RECORDS, st.data())
def test_bytes_the_python_decoder_refuses_are_never_accepted_by_the_c_one(records: list,  # type: ignore[type-arg]
                                                                          data: st.DataObject) -> None:
    section, header = section_of(records)
    damaged = bytearray(section)
    for _ in range(data.draw(st.integers(1, 4))):
        damaged[data.draw(st.integers(0, len(damaged) - 1))] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        damaged = damaged[:data.draw(st.integers(0, len(damaged)))]
    try:
        expected: list[rec.Record] | None = python_decode(bytes(damaged), header)
    except rec.CorruptBatchError:
        expected = None
    got = c_decode(bytes(damaged), header)
    assert got is None or got == expected  # refusing is always safe: the Python decode then has the last word


def test_a_timestamp_delta_beyond_64_bits_is_left_to_python() -> None:
    huge_varint = b"\xff" * 9 + b"\x03"  # a zig-zag varint of 66 bits: Python's ints take it, int64 does not
    body = b"\x00" + huge_varint + b"\x00" + b"\x01" + b"\x02v" + b"\x00"
    record = rec.encode_varint(len(body)) + body
    header = rec.BatchHeader(0, len(record) + 49, 0, 2, 0, 0, 0, 0, 0, 0, 0, 0, 1)
    assert c_decode(record, header) is None
    assert python_decode(record, header)[0].timestamp == rec.decode_varint(huge_varint, 0)[0]


def test_decode_records_uses_the_c_path_and_keeps_nothing_of_a_refused_batch() -> None:
    section, header = section_of([(0, b"k", b"v", [("h", b"1")]), (5, None, None, [])])
    builder = rec.BatchBuilder()
    builder.append(1_700_000_000_000, b"k", b"v", [("h", b"1")])
    builder.append(1_700_000_000_005, None, None)
    batch = builder.build(base_offset=1_000)
    decoded = rec.decode_records(batch, 0, rec.read_header(batch), "t", 3)
    assert decoded == python_decode(section, header)
    assert decoded[0].headers == [("h", b"1")] and decoded[1].headers is rec.NO_HEADERS


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(RECORDS)
def test_without_the_c_codec_the_python_paths_build_and_read_the_same_batches(
        monkeypatch: pytest.MonkeyPatch, records: list) -> None:  # type: ignore[type-arg]
    native_section, header = section_of(records)
    with monkeypatch.context() as patched:
        patched.setattr(rec, "_recordcodec", None)
        python_section, _ = section_of(records, rec.PythonBatchBuilder)
        builder = rec.PythonBatchBuilder()
        for timestamp_ms, key, value, headers in records:
            builder.append(1_700_000_000_000 + timestamp_ms, key, value, headers)
        batch = builder.build(base_offset=1_000)
        decoded = rec.decode_records(batch, 0, rec.read_header(batch), "t", 3)
    assert python_section == native_section
    assert decoded == c_decode(native_section, header)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(-(2**63), 2**63 - 1), FIELD, FIELD, HEADERS), min_size=1, max_size=20))
def test_the_c_builder_builds_the_python_builders_batches(records: list) -> None:  # type: ignore[type-arg]
    """Any timestamps a batch can hold (deltas beyond 64 bits go back to Python in both), with and without
    headers: the same fields after every append, the same batch at the end."""
    native, python = rec.BatchBuilder(), rec.PythonBatchBuilder()
    assert isinstance(native, _recordcodec.Builder)
    for timestamp_ms, key, value, headers in records:
        assert native.append(timestamp_ms, key, value, headers) == python.append(timestamp_ms, key, value, headers)
        assert ((native.count, native.size_bytes, native.base_timestamp, native.max_timestamp)
                == (python.count, python.size_bytes, python.base_timestamp, python.max_timestamp))
    assert native.build(base_offset=7, leader_epoch=2) == python.build(base_offset=7, leader_epoch=2)


@pytest.mark.parametrize("builder_class", [rec.BatchBuilder, rec.PythonBatchBuilder])
@pytest.mark.parametrize("timestamp_ms", [2**63, -(2**63) - 1, 2**70])
def test_a_timestamp_beyond_64_bits_is_refused_at_append_and_nothing_is_added(
        builder_class: type[rec.PythonBatchBuilder], timestamp_ms: int) -> None:
    builder = builder_class()
    builder.append(1_000, None, b"kept")
    with pytest.raises(ValueError, match="does not fit a record batch's 64-bit timestamp"):
        builder.append(timestamp_ms, None, b"refused")
    assert (builder.count, builder.max_timestamp) == (1, 1_000)
    built = builder.build()
    assert [r.value for r in rec.decode_records(built, 0, rec.read_header(built), "t", 0)] == [b"kept"]


def test_records_without_headers_are_left_out_of_the_cycle_collector_and_those_with_headers_are_not() -> None:
    section, header = section_of([(0, None, b"plain", []), (1, b"k", b"v", [("h", b"x")])])
    plain, with_headers = c_decode(section, header) or []
    assert plain.headers is rec.NO_HEADERS and not gc.is_tracked(plain)  # cannot be part of a cycle
    assert with_headers.headers == [("h", b"x")] and gc.is_tracked(with_headers)  # its list could be made one
    assert plain == python_decode(section, header)[0]
