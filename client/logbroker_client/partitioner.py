"""Kafka's default partitioner: murmur2 of the key, so a key lands where Kafka would put it.

Kafka computes `toPositive(murmur2(keyBytes)) % numPartitions`, with toPositive = `h & 0x7fffffff`
and murmur2 the 32-bit MurmurHash2 with seed 0x9747b28c. Null keys use the sticky partitioner: stay
on one partition until its batch is sent, then move on, so small batches do not spray every partition.
"""

from __future__ import annotations

import random
from functools import lru_cache

from logbroker_client.errors import UnknownTopicOrPartitionError

_M = 0x5BD1E995
_SEED = 0x9747B28C
_MASK = 0xFFFFFFFF


@lru_cache(maxsize=1 << 16)  # hot keys repeat; the pure-Python hash costs a few microseconds
def murmur2(data: bytes) -> int:
    """MurmurHash2 as Kafka's Utils.murmur2 computes it, returned as a signed 32-bit int."""
    length = len(data)
    h = (_SEED ^ length) & _MASK
    tail = length & ~3
    for i in range(0, tail, 4):
        k = data[i] | (data[i + 1] << 8) | (data[i + 2] << 16) | (data[i + 3] << 24)
        k = (k * _M) & _MASK
        k ^= k >> 24
        k = (k * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    remaining = length & 3
    if remaining == 3:
        h ^= data[tail + 2] << 16
    if remaining >= 2:
        h ^= data[tail + 1] << 8
    if remaining >= 1:
        h ^= data[tail]
        h = (h * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for_key(key: bytes, num_partitions: int) -> int:
    return (murmur2(key) & 0x7FFFFFFF) % num_partitions


def choose_partition(topic: str, key: bytes | None, partition: int | None, count: int,
                     null_key_partitioner: StickyPartitioner | RoundRobinPartitioner) -> int:
    """The partition a record goes to: the one asked for (checked), its key's, or the null-key choice."""
    if partition is None:
        return null_key_partitioner.partition(topic, count) if key is None else partition_for_key(key, count)
    if not 0 <= partition < count:
        raise UnknownTopicOrPartitionError(
            f"topic {topic!r} has partitions 0..{count - 1}; partition {partition} does not exist", topic, partition)
    return partition


class StickyPartitioner:
    """Null-key records: one partition per topic until its batch is sealed."""

    def __init__(self, rng: random.Random | None = None) -> None:
        self._current: dict[str, int] = {}
        self._rng = rng or random.Random()

    def partition(self, topic: str, num_partitions: int) -> int:
        current = self._current.get(topic)
        if current is None or current >= num_partitions:
            current = self._current[topic] = self._rng.randrange(num_partitions)
        return current

    def on_batch_sealed(self, topic: str, partition: int, num_partitions: int) -> None:
        if num_partitions > 1 and self._current.get(topic) == partition:
            choice = self._rng.randrange(num_partitions - 1)
            self._current[topic] = choice if choice < partition else choice + 1


class RoundRobinPartitioner:
    def __init__(self) -> None:
        self._next: dict[str, int] = {}

    def partition(self, topic: str, num_partitions: int) -> int:
        n = self._next.get(topic, 0)
        self._next[topic] = n + 1
        return n % num_partitions

    def on_batch_sealed(self, topic: str, partition: int, num_partitions: int) -> None:
        return None
