"""Ports for a `logbroker dev` cluster started by a test."""

from __future__ import annotations

import random
import socket

from logbroker_client.data_wire import DEFAULT_DATA_PORT_OFFSET

from logbroker.server.config import DEFAULT_RAFT_PORT_OFFSET
from logbroker.server.dev import KAFKA_PORT_OFFSET, METRICS_PORT_OFFSET
from tests.support.brokers import LOWEST_TEST_PORT, ephemeral_port_low

DEV_PORT_OFFSETS = (0, KAFKA_PORT_OFFSET, METRICS_PORT_OFFSET, DEFAULT_RAFT_PORT_OFFSET, DEFAULT_DATA_PORT_OFFSET)


def free_dev_base_port(count: int = 3) -> int:
    """A base port with `count` consecutive free ports (broker n listens on base + n - 1) at each offset `logbroker
    dev` gives a broker's listeners (gRPC, Kafka, metrics, Raft, data), all below the kernel's range for outgoing
    connections: a port in that range can be taken by any client's socket between this check and the broker's
    bind. That happened to a dev broker's data port, and later to one's Raft port, and the broker did not start."""
    highest_base = ephemeral_port_low() - max(DEV_PORT_OFFSETS) - count
    for _ in range(100):
        base = random.randint(LOWEST_TEST_PORT, highest_base)
        ports = [base + offset + n for offset in DEV_PORT_OFFSETS for n in range(count)]
        sockets = [socket.socket() for _ in ports]
        try:
            for s, port in zip(sockets, ports, strict=True):
                s.bind(("127.0.0.1", port))
        except OSError:
            continue
        finally:
            for s in sockets:
                s.close()
        return base
    raise AssertionError(f"no base port with {count} free ports at each of the offsets {DEV_PORT_OFFSETS}")
