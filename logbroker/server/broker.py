"""The broker's core, free of gRPC: topics, partitions, produce, fetch, offsets.

The gRPC layer (service.py) turns requests into calls here and exceptions into error codes. Keeping
this layer transport-free lets the cluster work replace the single-broker topic catalogue with the
controller without touching the wire code.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import shutil
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from logbroker_client import records as rec

from logbroker.cluster.topic_store import MAX_PARTITIONS, TopicNameError, TopicSpec, TopicStore, check_topic_name
from logbroker.server import errors
from logbroker.server.config import BrokerConfig
from logbroker.server.partition import Partition, now_ms
from logbroker.storage import filenames
from logbroker.storage.config import InvalidConfigError, LogConfig
from logbroker.storage.errors import OffsetOutOfRangeError, StorageError
from logbroker.storage.log import PartitionLog

log = logging.getLogger("logbroker.broker")

EARLIEST_TIMESTAMP = -2
LATEST_TIMESTAMP = -1


@dataclass
class ProduceResult:
    base_offset: int
    log_append_time_ms: int
    log_start_offset: int


@dataclass
class FetchResult:
    records: bytes
    high_watermark: int
    log_start_offset: int


class Broker:
    def __init__(self, config: BrokerConfig) -> None:
        self.config = config
        self.data_dir = Path(config.data_dir)
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self._executor = ThreadPoolExecutor(max_workers=config.flush_threads, thread_name_prefix="flush")
        self._topics = TopicStore(self.data_dir)
        self._partitions: dict[tuple[str, int], Partition] = {}
        self._data_arrived = asyncio.Event()
        self._log_defaults = LogConfig.from_mapping(config.log_defaults)

    # ------------------------------------------------------------------------------- lifecycle

    def open(self) -> None:
        """Open every partition of every known topic (recovering logs that were not closed cleanly)."""
        known = set()
        for spec in self._topics.all():
            log_config = self._log_config(spec.configs)
            for index in range(spec.partitions):
                self._open_partition(spec.name, index, log_config)
                known.add(filenames.partition_dir_name(spec.name, index))
        self._remove_orphans(known)
        log.info("broker %d opened %d topic(s), %d partition(s) under %s",
                 self.config.node_id, len(self._topics.all()), len(self._partitions), self.data_dir)

    def _remove_orphans(self, known: set[str]) -> None:
        # A crash between removing a topic from the catalogue and deleting its files leaves these.
        for path in self.data_dir.iterdir():
            if path.is_dir() and path.name not in known and filenames.parse_partition_dir_name(path.name):
                log.warning("removing %s: no topic in the catalogue owns it (an interrupted delete)", path)
                shutil.rmtree(path, ignore_errors=True)

    async def close(self) -> None:
        for partition in list(self._partitions.values()):
            await partition.close()
        self._partitions.clear()
        self._executor.shutdown(wait=True)
        log.info("broker %d closed every partition cleanly", self.config.node_id)

    def _log_config(self, overrides: dict[str, str]) -> LogConfig:
        return LogConfig.from_mapping({**self._log_defaults.to_mapping(), **overrides})

    def _open_partition(self, topic: str, index: int, log_config: LogConfig) -> Partition:
        directory = self.data_dir / filenames.partition_dir_name(topic, index)
        plog = PartitionLog.open(directory, log_config, topic, index)
        partition = Partition(
            topic, index, plog, self._executor, self._wake_fetchers, flush_always=log_config.flush == "always"
        )
        self._partitions[(topic, index)] = partition
        return partition

    # ---------------------------------------------------------------------------------- topics

    def create_topic(self, name: str, partitions: int, replication_factor: int,
                     configs: dict[str, str], validate_only: bool = False) -> None:
        try:
            check_topic_name(name)
        except TopicNameError as exc:
            raise errors.InvalidTopic(str(exc)) from None
        if name in self._topics:
            raise errors.TopicAlreadyExists(f"topic {name!r} already exists")
        if partitions == -1:
            partitions = self.config.default_partitions
        if replication_factor == -1:
            replication_factor = self.config.default_replication_factor
        if not 1 <= partitions <= MAX_PARTITIONS:
            raise errors.InvalidPartitions(f"partitions must be between 1 and {MAX_PARTITIONS}, got {partitions}")
        if replication_factor != 1:
            raise errors.InvalidReplicationFactor(
                f"replication factor {replication_factor} needs {replication_factor} brokers; this cluster has 1"
            )
        try:
            log_config = self._log_config(configs)
        except InvalidConfigError as exc:
            raise errors.InvalidConfig(f"topic {name!r}: {exc}") from None
        if validate_only:
            return
        self._topics.add(TopicSpec(name, partitions, replication_factor, dict(configs)))
        for index in range(partitions):
            self._open_partition(name, index, log_config)
        log.info("created topic %s with %d partition(s), configs %s", name, partitions, configs or "{}")

    async def delete_topic(self, name: str) -> None:
        spec = self._require_topic(name)
        self._topics.remove(name)
        for index in range(spec.partitions):
            partition = self._partitions.pop((name, index))
            await partition.close()
            partition.log.delete()
        self._wake_fetchers()
        log.info("deleted topic %s and its %d partition(s)", name, spec.partitions)

    def topics(self) -> list[TopicSpec]:
        return self._topics.all()

    def topic(self, name: str) -> TopicSpec:
        return self._require_topic(name)

    def effective_configs(self, name: str) -> dict[str, str]:
        """The topic's log settings: broker defaults overlaid with the topic's own."""
        return self._log_config(self._require_topic(name).configs).to_mapping()

    def _require_topic(self, name: str) -> TopicSpec:
        spec = self._topics.get(name)
        if spec is None:
            raise errors.UnknownTopicOrPartition(
                f"topic {name!r} does not exist; create it with `lb topic create {name} --partitions N`"
            )
        return spec

    def partition(self, topic: str, index: int) -> Partition:
        partition = self._partitions.get((topic, index))
        if partition is None:
            spec = self._require_topic(topic)
            raise errors.UnknownTopicOrPartition(
                f"topic {topic!r} has partitions 0..{spec.partitions - 1}; partition {index} does not exist"
            )
        return partition

    # --------------------------------------------------------------------------------- produce

    async def produce(self, topic: str, index: int, records: bytes, acks: int) -> ProduceResult:
        partition = self.partition(topic, index)
        batches = self._validated(partition, records)
        try:
            result = await partition.append(batches, wait_durable=acks != 0)
        except StorageError as exc:
            raise errors.StorageFailure(f"{partition.name}: {exc}") from None
        except OSError as exc:
            raise errors.StorageFailure(f"{partition.name}: write failed: {exc}") from None
        return ProduceResult(result.base_offset, now_ms(), partition.log.log_start_offset)

    def _validated(self, partition: Partition, records: bytes) -> bytearray:
        """Check every batch of the request (O(1) Python per batch); nothing is written on any failure."""
        if not records:
            raise errors.CorruptBatch(f"{partition.name}: the request carries no record batch")
        limit = partition.log.config.max_message_bytes
        pos = 0
        end = len(records)
        while pos < end:
            try:
                header = rec.validate_batch(records, pos, end)
            except rec.CorruptBatchError as exc:
                raise errors.CorruptBatch(
                    f"{partition.name}: batch at byte {pos} of the request rejected: {exc}; nothing was written"
                ) from None
            if header.size > limit:
                raise errors.RecordTooLarge(
                    f"{partition.name}: batch of {header.size} bytes exceeds max.message.bytes={limit}; "
                    "send smaller batches or raise the topic's max.message.bytes"
                )
            if header.attributes & rec.CONTROL_FLAG:
                raise errors.CorruptBatch(f"{partition.name}: clients may not write control batches")
            codec = header.attributes & rec.COMPRESSION_MASK
            if codec not in (rec.COMPRESSION_NONE, rec.COMPRESSION_ZSTD):
                raise errors.CorruptBatch(
                    f"{partition.name}: compression codec {codec} is not supported; use none (0) or zstd (4)"
                )
            pos += header.size
        return bytearray(records)

    # ----------------------------------------------------------------------------------- fetch

    def _wake_fetchers(self) -> None:
        self._data_arrived.set()
        self._data_arrived = asyncio.Event()

    def read(self, topic: str, index: int, offset: int, max_bytes: int) -> FetchResult:
        partition = self.partition(topic, index)
        hw = partition.high_watermark
        try:
            data = b"" if offset == hw else partition.log.read(offset, max_bytes, max_offset=hw)
        except OffsetOutOfRangeError as exc:  # the storage message already names the partition
            raise errors.OffsetOutOfRange(str(exc)) from None
        if offset > hw:
            raise errors.OffsetOutOfRange(
                f"{partition.name}: offset {offset} is past the high watermark {hw}; "
                f"valid offsets are {partition.log.log_start_offset}..{hw}"
            )
        return FetchResult(data, hw, partition.log.log_start_offset)

    async def wait_for_data(self, timeout_s: float) -> None:
        """Sleep until any partition's high watermark moves, or the timeout passes."""
        event = self._data_arrived
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)

    # ---------------------------------------------------------------------------- list offsets

    def list_offset(self, topic: str, index: int, timestamp_ms: int) -> tuple[int, int]:
        """(offset, timestamp) for earliest (-2), latest (-1) or the first record at or after a time."""
        partition = self.partition(topic, index)
        if timestamp_ms == EARLIEST_TIMESTAMP:
            return partition.log.log_start_offset, -1
        if timestamp_ms == LATEST_TIMESTAMP:
            return partition.high_watermark, -1
        if timestamp_ms < 0:
            raise errors.InvalidRequest(f"timestamp {timestamp_ms} is neither -1 (latest), -2 (earliest) nor >= 0")
        batch_offset = partition.log.offset_for_timestamp(timestamp_ms)
        if batch_offset is None or batch_offset >= partition.high_watermark:
            return -1, -1
        return self._first_record_at_or_after(partition, batch_offset, timestamp_ms)

    @staticmethod
    def _first_record_at_or_after(partition: Partition, batch_offset: int, timestamp_ms: int) -> tuple[int, int]:
        # The time index finds the first batch whose maxTimestamp reaches the target; decoding that one
        # batch (off the hot path) finds the exact record, as Kafka does.
        data = partition.log.read(batch_offset, 1, max_offset=partition.high_watermark)
        for pos, header in rec.iter_batch_headers(data):
            if header.is_control or header.max_timestamp < timestamp_ms:
                continue
            for record in rec.decode_records(data, pos, header):
                if record.offset >= batch_offset and record.timestamp >= timestamp_ms:
                    return record.offset, record.timestamp
        return -1, -1

    # ---------------------------------------------------------------------------- maintenance

    async def run_maintenance(self) -> None:
        """Retention and interval flushes, forever (cancelled at shutdown)."""
        loop = asyncio.get_running_loop()
        interval_flush_ms = min(
            [p.log.config.flush_interval_ms for p in self._partitions.values() if p.log.config.flush != "always"]
            or [1000]
        )
        next_retention = 0.0
        while True:
            await asyncio.sleep(min(interval_flush_ms, self.config.retention_check_interval_ms) / 1000)
            for partition in list(self._partitions.values()):
                if partition.log.config.flush != "always":
                    await loop.run_in_executor(self._executor, partition.flush_now)
            if loop.time() >= next_retention:
                next_retention = loop.time() + self.config.retention_check_interval_ms / 1000
                self.apply_retention()

    def apply_retention(self) -> int:
        deleted = 0
        for partition in list(self._partitions.values()):
            count = partition.log.apply_retention(now_ms())
            if count:
                log.info("%s: retention deleted %d segment(s); log now starts at offset %d",
                         partition.name, count, partition.log.log_start_offset)
            deleted += count
        return deleted
