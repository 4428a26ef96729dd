"""Broker configuration: defaults as named constants, a TOML file, and flags that win over it."""

from __future__ import annotations

import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

DEFAULT_LISTEN = "127.0.0.1:9092"
DEFAULT_NODE_ID = 1
DEFAULT_PARTITIONS = 1
DEFAULT_REPLICATION_FACTOR = 1
DEFAULT_MAX_REQUEST_BYTES = 100 * 1024 * 1024
DEFAULT_MAX_FETCH_WAIT_MS = 30_000
DEFAULT_RETENTION_CHECK_INTERVAL_MS = 60_000
DEFAULT_SHUTDOWN_GRACE_MS = 5_000
DEFAULT_FLUSH_THREADS = 4


class BrokerConfigError(ValueError):
    """A setting is missing or wrong; the message names it and says what is allowed."""


@dataclass
class BrokerConfig:
    data_dir: Path = Path("./data")
    listen: str = DEFAULT_LISTEN
    node_id: int = DEFAULT_NODE_ID
    default_partitions: int = DEFAULT_PARTITIONS
    default_replication_factor: int = DEFAULT_REPLICATION_FACTOR
    max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES
    max_fetch_wait_ms: int = DEFAULT_MAX_FETCH_WAIT_MS
    retention_check_interval_ms: int = DEFAULT_RETENTION_CHECK_INTERVAL_MS
    shutdown_grace_ms: int = DEFAULT_SHUTDOWN_GRACE_MS
    flush_threads: int = DEFAULT_FLUSH_THREADS
    # Defaults for every topic's log, in Kafka's key spelling ("segment.bytes", "flush", ...).
    log_defaults: dict[str, str] = field(default_factory=dict)

    @property
    def host(self) -> str:
        return split_host_port(self.listen)[0]

    @property
    def port(self) -> int:
        return split_host_port(self.listen)[1]

    def validate(self) -> BrokerConfig:
        split_host_port(self.listen)
        for name in ("default_partitions", "default_replication_factor", "max_request_bytes", "flush_threads"):
            if getattr(self, name) < 1:
                raise BrokerConfigError(f"{name} must be at least 1, got {getattr(self, name)}")
        return self


def split_host_port(address: str) -> tuple[str, int]:
    host, sep, port = address.rpartition(":")
    if not sep or not host or not port.isdigit() or not 0 <= int(port) < 65536:
        raise BrokerConfigError(f"address {address!r} is not HOST:PORT (for example 127.0.0.1:9092)")
    return host, int(port)


def load_config(path: Path | None, overrides: dict[str, Any]) -> BrokerConfig:
    """Read the TOML file (if any), then apply flag overrides that were given (not None)."""
    values: dict[str, Any] = {}
    if path is not None:
        try:
            values = tomllib.loads(path.read_text())
        except FileNotFoundError:
            raise BrokerConfigError(f"config file {path} does not exist") from None
        except tomllib.TOMLDecodeError as exc:
            raise BrokerConfigError(f"config file {path} is not valid TOML: {exc}") from None
    known = {f.name for f in fields(BrokerConfig)}
    log_table = values.pop("log", {})
    unknown = sorted(set(values) - known)
    if unknown:
        raise BrokerConfigError(f"config file {path}: unknown setting(s) {', '.join(unknown)}; known: {sorted(known)}")
    values.update({k: v for k, v in overrides.items() if v is not None})
    if "data_dir" in values:
        values["data_dir"] = Path(values["data_dir"])
    values["log_defaults"] = {str(k): str(v) for k, v in {**log_table, **values.get("log_defaults", {})}.items()}
    return BrokerConfig(**values).validate()
