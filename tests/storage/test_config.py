from __future__ import annotations

import pytest

from logbroker.storage import config as cfg
from logbroker.storage.config import LogConfig
from logbroker.storage.errors import InvalidConfigError


def test_defaults() -> None:
    config = LogConfig()
    assert config.segment_bytes == 1 << 30 == cfg.DEFAULT_SEGMENT_BYTES
    assert config.segment_ms == 7 * 24 * 3600 * 1000
    assert config.retention_ms == 7 * 24 * 3600 * 1000
    assert config.retention_bytes == -1
    assert config.index_interval_bytes == 4096
    assert config.max_message_bytes == 1048588
    assert (config.flush, config.flush_interval_ms, config.cleanup_policy) == ("always", 1000, "delete")
    assert not config.compacted


def test_from_mapping_parses_kafka_keys() -> None:
    config = LogConfig.from_mapping({
        "segment.bytes": "1048576", "segment.ms": "60000", "retention.ms": "-1", "retention.bytes": "1000000",
        "index.interval.bytes": "0", "max.message.bytes": "2000", "cleanup.policy": "compact",
        "flush": "interval", "flush.interval.ms": "250",
    })
    assert config == LogConfig(1048576, 60000, -1, 1000000, 0, 2000, "compact", "interval", 250)
    assert config.compacted


def test_to_mapping_round_trips() -> None:
    config = LogConfig(segment_bytes=4096, retention_ms=-1, cleanup_policy="compact")
    mapping = config.to_mapping()
    assert mapping["segment.bytes"] == "4096" and mapping["retention.ms"] == "-1"
    assert set(mapping) == set(cfg.LOG_CONFIG_KEYS)
    assert LogConfig.from_mapping(mapping) == config


def test_from_mapping_overrides_given_defaults() -> None:
    defaults = LogConfig(retention_ms=1000)
    assert LogConfig.from_mapping({"segment.ms": "5"}, defaults) == LogConfig(retention_ms=1000, segment_ms=5)


@pytest.mark.parametrize(("key", "value", "allowed"), [
    ("segment.bytes", "10", "an integer in 14..2147483647"),
    ("segment.bytes", "4294967296", "an integer in 14..2147483647"),
    ("segment.bytes", "1.5", "an integer"),
    ("segment.bytes", "", "an integer"),
    ("segment.ms", "0", "an integer >= 1"),
    ("retention.ms", "-2", "an integer >= 0 or -1"),
    ("retention.bytes", "ten", "an integer >= 0 or -1"),
    ("index.interval.bytes", "-1", "an integer in 0..2147483647"),
    ("max.message.bytes", "1e6", "an integer"),
    ("cleanup.policy", "compact,delete", "one of 'delete', 'compact'"),
    ("flush", "sometimes", "one of 'always', 'interval'"),
    ("flush.interval.ms", "0", "an integer >= 1"),
])
def test_bad_values_name_the_key_the_value_and_what_is_allowed(key: str, value: str, allowed: str) -> None:
    with pytest.raises(InvalidConfigError) as info:
        LogConfig.from_mapping({key: value})
    message = str(info.value)
    assert key in message and repr(value) in message and allowed in message


def test_unknown_key_lists_the_allowed_ones() -> None:
    with pytest.raises(InvalidConfigError, match="unknown log config key 'segment.size'.*segment.bytes"):
        LogConfig.from_mapping({"segment.size": "1"})


def test_direct_construction_is_validated_too() -> None:
    with pytest.raises(InvalidConfigError, match="segment.ms"):
        LogConfig(segment_ms=0)
    with pytest.raises(InvalidConfigError, match="retention.bytes"):
        LogConfig(retention_bytes=True)  # a bool is not a size
    assert isinstance(InvalidConfigError("x"), ValueError)
