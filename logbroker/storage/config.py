"""Per-partition log configuration, with Kafka's topic-config key names."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, fields, replace

from logbroker.storage.errors import InvalidConfigError

DEFAULT_SEGMENT_BYTES = 1 << 30
DEFAULT_SEGMENT_MS = 7 * 24 * 60 * 60 * 1000
DEFAULT_RETENTION_MS = 7 * 24 * 60 * 60 * 1000  # -1 keeps records forever
DEFAULT_RETENTION_BYTES = -1  # -1: no size limit
DEFAULT_INDEX_INTERVAL_BYTES = 4096
DEFAULT_MAX_MESSAGE_BYTES = (1 << 20) + 12
DEFAULT_FLUSH = "always"
DEFAULT_FLUSH_INTERVAL_MS = 1000
DEFAULT_CLEANUP_POLICY = "delete"

FLUSH_ALWAYS = "always"
FLUSH_INTERVAL = "interval"
FLUSH_POLICIES = (FLUSH_ALWAYS, FLUSH_INTERVAL)
CLEANUP_DELETE = "delete"
CLEANUP_COMPACT = "compact"
CLEANUP_POLICIES = (CLEANUP_DELETE, CLEANUP_COMPACT)

# Positions in a segment are u32 in the index; Kafka caps segment.bytes at Int.MaxValue too.
MIN_SEGMENT_BYTES = 14
MAX_SEGMENT_BYTES = (1 << 31) - 1
MAX_INT32 = (1 << 31) - 1


@dataclass(frozen=True)
class _Key:
    name: str  # the Kafka-style key, e.g. "segment.bytes"
    attr: str  # the LogConfig field
    is_int: bool  # parsed from a decimal integer string, else taken as text
    check: Callable[[object], str | None]  # returns what is allowed when the value is not


def _int_range(low: int, high: int | None = None, also: tuple[int, ...] = ()) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        ok = isinstance(value, int) and not isinstance(value, bool) and (
            value in also or (value >= low and (high is None or value <= high))
        )
        if ok:
            return None
        allowed = f"an integer >= {low}" if high is None else f"an integer in {low}..{high}"
        if also:
            allowed += " or " + " or ".join(str(v) for v in also)
        return allowed
    return check


def _one_of(choices: tuple[str, ...]) -> Callable[[object], str | None]:
    def check(value: object) -> str | None:
        return None if value in choices else "one of " + ", ".join(repr(c) for c in choices)
    return check


_KEYS: tuple[_Key, ...] = (
    _Key("segment.bytes", "segment_bytes", True, _int_range(MIN_SEGMENT_BYTES, MAX_SEGMENT_BYTES)),
    _Key("segment.ms", "segment_ms", True, _int_range(1)),
    _Key("retention.ms", "retention_ms", True, _int_range(0, also=(-1,))),
    _Key("retention.bytes", "retention_bytes", True, _int_range(0, also=(-1,))),
    _Key("index.interval.bytes", "index_interval_bytes", True, _int_range(0, MAX_INT32)),
    _Key("max.message.bytes", "max_message_bytes", True, _int_range(0, MAX_INT32)),
    _Key("cleanup.policy", "cleanup_policy", False, _one_of(CLEANUP_POLICIES)),
    _Key("flush", "flush", False, _one_of(FLUSH_POLICIES)),
    _Key("flush.interval.ms", "flush_interval_ms", True, _int_range(1)),
)
_BY_NAME = {key.name: key for key in _KEYS}


@dataclass(frozen=True)
class LogConfig:
    segment_bytes: int = DEFAULT_SEGMENT_BYTES
    segment_ms: int = DEFAULT_SEGMENT_MS
    retention_ms: int = DEFAULT_RETENTION_MS
    retention_bytes: int = DEFAULT_RETENTION_BYTES
    index_interval_bytes: int = DEFAULT_INDEX_INTERVAL_BYTES
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES
    cleanup_policy: str = DEFAULT_CLEANUP_POLICY
    flush: str = DEFAULT_FLUSH
    flush_interval_ms: int = DEFAULT_FLUSH_INTERVAL_MS

    def __post_init__(self) -> None:
        # Validate direct construction too, so a bad value never reaches the log.
        for key in _KEYS:
            value = getattr(self, key.attr)
            allowed = key.check(value)
            if allowed is not None:
                raise InvalidConfigError(f"invalid value {value!r} for {key.name}: allowed is {allowed}")

    @classmethod
    def from_mapping(cls, mapping: Mapping[str, str], defaults: LogConfig | None = None) -> LogConfig:
        """Parse Kafka-style keys ("segment.bytes": "1048576", ...) over defaults (or the built-in ones)."""
        base = defaults if defaults is not None else cls()
        changes: dict[str, object] = {}
        for name, raw in mapping.items():
            key = _BY_NAME.get(name)
            if key is None:
                raise InvalidConfigError(
                    f"unknown log config key {name!r}: allowed keys are {', '.join(sorted(_BY_NAME))}"
                )
            changes[key.attr] = _parse(key, raw)
        return replace(base, **changes)  # type: ignore[arg-type]

    def to_mapping(self) -> dict[str, str]:
        return {key.name: str(getattr(self, key.attr)) for key in _KEYS}

    @property
    def compacted(self) -> bool:
        return self.cleanup_policy == CLEANUP_COMPACT


def _parse(key: _Key, raw: str) -> object:
    text = str(raw).strip()
    if key.is_int:
        # Integer-valued key: accept only plain decimal integers such as "4096" or "-1".
        body = text[1:] if text[:1] in "+-" else text
        if not body.isdigit() or not body.isascii():
            raise InvalidConfigError(
                f"invalid value {raw!r} for {key.name}: allowed is {key.check(None)}"
            )
        value: object = int(text)
    else:
        value = text
    allowed = key.check(value)
    if allowed is not None:
        raise InvalidConfigError(f"invalid value {raw!r} for {key.name}: allowed is {allowed}")
    return value


LOG_CONFIG_KEYS = tuple(key.name for key in _KEYS)
assert {f.name for f in fields(LogConfig)} == {key.attr for key in _KEYS}
