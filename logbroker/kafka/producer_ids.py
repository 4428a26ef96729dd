"""Producer ids for Kafka's idempotent producers (InitProducerId), unique across the cluster.

An id is ``1 << 62 | node_id << 40 | n``: bit 62 keeps them apart from the ids logbroker's own gRPC producer
picks at random below 2**62, the node id keeps brokers apart without asking each other, and n counts up on
this broker. n survives restarts through a file in the data directory that records the end of the block
of ids handed out from (written and fsynced before the first id of a block is given), so a broker that
crashes skips the rest of its block instead of handing an id out twice. 2**40 ids per broker, node ids
below 2**22.
"""

from __future__ import annotations

import os
from pathlib import Path

BLOCK = 1000
NODE_SHIFT = 40
KAFKA_ID_BIT = 1 << 62
MAX_NODE_ID = (1 << 22) - 1
FILE_NAME = "kafka-producer-ids"


class ProducerIdAllocator:
    def __init__(self, data_dir: Path, node_id: int) -> None:
        if not 0 <= node_id <= MAX_NODE_ID:
            raise ValueError(f"node id {node_id} is too large for Kafka producer ids (at most {MAX_NODE_ID})")
        self.path = Path(data_dir) / FILE_NAME
        self.node_id = node_id
        self._next = self._reserved_end = self._read()

    def _read(self) -> int:
        try:
            return int(self.path.read_text().strip() or 0)
        except FileNotFoundError:
            return 0
        except ValueError:
            raise ValueError(f"{self.path} does not hold a number; it records the producer ids handed out "
                             "(delete it only if no Kafka producer of this broker is alive)") from None

    def _reserve(self) -> None:
        end = self._reserved_end + BLOCK
        tmp = self.path.with_suffix(".tmp")
        with open(tmp, "w") as out:
            out.write(f"{end}\n")
            out.flush()
            os.fsync(out.fileno())
        os.replace(tmp, self.path)
        dir_fd = os.open(self.path.parent, os.O_RDONLY)
        try:
            os.fsync(dir_fd)
        finally:
            os.close(dir_fd)
        self._reserved_end = end

    def next_id(self) -> int:
        if self._next >= self._reserved_end:
            self._reserve()
        n = self._next
        self._next += 1
        return KAFKA_ID_BIT | self.node_id << NODE_SHIFT | n
