"""The producer's buffer limit, the same on both producers: send() blocks (awaits) while buffer_memory is full,
up to max_block_ms, then raises RequestTimedOutError; room freed by acknowledgements lets it go on."""

from __future__ import annotations

import time

import pytest
from logbroker_client import Admin, AsyncProducer, Producer
from logbroker_client.errors import LogbrokerError, RequestTimedOutError

VALUE = b"x" * 200
BUFFER = 2000  # about nine records of 200 bytes
MAX_BLOCK_MS = 300


def fill(send) -> None:  # type: ignore[no-untyped-def]
    for _ in range(BUFFER // len(VALUE)):
        send()


def test_sync_send_blocks_while_the_buffer_is_full_then_raises(bootstrap: str) -> None:
    Admin(bootstrap).create_topic("full", partitions=1)
    # A long linger keeps every record in its open batch: nothing is sent, nothing frees the buffer.
    with Producer(bootstrap, linger_ms=60_000, buffer_memory=BUFFER, max_block_ms=MAX_BLOCK_MS) as producer:
        futures = []
        fill(lambda: futures.append(producer.send("full", VALUE, partition=0)))
        started = time.monotonic()
        with pytest.raises(RequestTimedOutError, match="buffer full"):
            producer.send("full", VALUE, partition=0)
        assert MAX_BLOCK_MS / 1000 <= time.monotonic() - started < MAX_BLOCK_MS / 1000 + 2
        assert producer.flush(timeout=10) == 0
        offsets = [f.result(timeout=0).offset for f in futures]
        assert offsets == list(range(offsets[0], offsets[0] + len(futures)))
        again = producer.send("full", VALUE, partition=0)  # flushed: room again
        assert producer.flush(timeout=10) == 0 and again.result(timeout=0).offset == offsets[-1] + 1


def test_sync_send_waits_for_acknowledgements_to_free_room(bootstrap: str) -> None:
    Admin(bootstrap).create_topic("room", partitions=1)
    with Producer(bootstrap, linger_ms=50, buffer_memory=BUFFER, max_block_ms=10_000) as producer:
        futures = [producer.send("room", VALUE, partition=0) for _ in range(100)]  # far past the buffer
        assert producer.flush(timeout=20) == 0
        offsets = [f.result(timeout=0).offset for f in futures]
        assert offsets == list(range(offsets[0], offsets[0] + 100))


async def test_async_send_awaits_while_the_buffer_is_full_then_raises(bootstrap: str) -> None:
    Admin(bootstrap).create_topic("full-async", partitions=1)
    async with AsyncProducer(bootstrap, linger_ms=60_000, buffer_memory=BUFFER,
                             max_block_ms=MAX_BLOCK_MS) as producer:
        futures = [await producer.send("full-async", VALUE, partition=0) for _ in range(BUFFER // len(VALUE))]
        started = time.monotonic()
        with pytest.raises(RequestTimedOutError, match="buffer full"):
            await producer.send("full-async", VALUE, partition=0)
        assert MAX_BLOCK_MS / 1000 <= time.monotonic() - started < MAX_BLOCK_MS / 1000 + 2
        assert await producer.flush(timeout=10) == 0
        offsets = [(await f).offset for f in futures]
        assert offsets == list(range(offsets[0], offsets[0] + len(futures)))
        again = await producer.send("full-async", VALUE, partition=0)  # flushed: room again
        assert await producer.flush(timeout=10) == 0 and (await again).offset == offsets[-1] + 1


async def test_async_send_waits_for_acknowledgements_to_free_room(bootstrap: str) -> None:
    Admin(bootstrap).create_topic("room-async", partitions=1)
    async with AsyncProducer(bootstrap, linger_ms=50, buffer_memory=BUFFER, max_block_ms=10_000) as producer:
        futures = [await producer.send("room-async", VALUE, partition=0) for _ in range(100)]
        assert await producer.flush(timeout=20) == 0
        offsets = [(await f).offset for f in futures]
        assert offsets == list(range(offsets[0], offsets[0] + 100))
        assert producer._core.buffered_bytes == 0  # every byte counted in is counted out


async def test_async_producer_refuses_sends_once_closed(bootstrap: str) -> None:
    Admin(bootstrap).create_topic("closed-async", partitions=1)
    producer = AsyncProducer(bootstrap)
    await producer.send_and_wait("closed-async", b"v")
    await producer.close()
    with pytest.raises(LogbrokerError, match="closed"):
        await producer.send("closed-async", b"late")
