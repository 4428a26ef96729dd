"""Client ids and throttle times: what every client sends so the broker can apply its quotas, and how it honours
the throttle_time_ms a broker answers with (it waits that long before its next request to that broker, as
Kafka's clients do since KIP-219; a client that does not is held by the broker instead)."""

from __future__ import annotations

import itertools
import os
import time
from collections.abc import Callable

CLIENT_ID_METADATA_KEY = "client-id"  # the gRPC metadata key the broker reads the client id from
MAX_CLIENT_ID_CHARS = 255
_numbers = itertools.count(1)

CallMetadata = tuple[tuple[str, str], ...]


def client_id_metadata(client_id: str) -> CallMetadata:
    if len(client_id) > MAX_CLIENT_ID_CHARS or not client_id.isprintable() or not client_id.isascii():
        raise ValueError(f"client_id must be at most {MAX_CLIENT_ID_CHARS} printable ASCII characters, "
                         f"got {client_id!r}")
    return ((CLIENT_ID_METADATA_KEY, client_id),) if client_id else ()


def default_producer_client_id() -> str:
    return f"producer-{os.getpid()}-{next(_numbers)}"


class BrokerPauses:
    """Brokers that answered with a throttle time, and until when the client leaves them alone."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self._until: dict[str, float] = {}

    def note(self, address: str, throttle_ms: int) -> None:
        if throttle_ms > 0:
            self._until[address] = max(self._until.get(address, 0.0), self.clock() + throttle_ms / 1000)

    def paused(self, address: str) -> bool:
        until = self._until.get(address)
        if until is None:
            return False
        if until <= self.clock():
            del self._until[address]
            return False
        return True

    def wait_s(self) -> float:
        """How long until the first pause ends (0 when no broker is paused)."""
        now = self.clock()
        return max(0.0, min((until - now for until in self._until.values()), default=0.0))
