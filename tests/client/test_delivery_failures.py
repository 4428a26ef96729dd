"""What a producer says when records fail: flush() counts them (or raises), and a record too large for its
topic is named as such, with the limit and the topic config to raise, by both producers."""

from __future__ import annotations

import pytest
from logbroker_client import Admin, Producer
from logbroker_client.aio import AsyncProducer
from logbroker_client.errors import DeliveryFailedError, RecordTooLargeError

FIVE_MB = 5 * 1000 * 1000
DEFAULT_LIMIT = (1 << 20) + 12  # the broker's default max.message.bytes


def check_oversized_error(error: BaseException | None, topic: str) -> None:
    assert isinstance(error, RecordTooLargeError), f"{type(error).__name__}: {error}"
    text = str(error)
    assert f"{topic}-0: a single record of" in text
    assert f"max.message.bytes={DEFAULT_LIMIT}" in text and f"max.message.bytes of {topic!r}" in text
    assert "smaller batches" not in text  # one record cannot be split into batches


def test_a_five_megabyte_record_is_named_too_large_and_flush_counts_it(bootstrap: str) -> None:
    Admin(bootstrap).create_topic("big", partitions=1)
    with Producer(bootstrap) as producer:
        small = producer.send("big", value=b"fits", partition=0)
        huge = producer.send("big", value=b"x" * FIVE_MB, partition=0)
        after = producer.send("big", value=b"after", partition=0)
        assert producer.flush(timeout=30) == 1  # the oversized record alone: the others are not at fault
        check_oversized_error(huge.exception(timeout=0), "big")
        assert small.result(timeout=0).offset + 1 == after.result(timeout=0).offset
        assert producer.flush(timeout=5) == 0  # counted once: since the previous flush only


def test_flush_raises_a_summary_when_asked(bootstrap: str) -> None:
    Admin(bootstrap).create_topic("tiny", partitions=1, configs={"max.message.bytes": "300"})
    with Producer(bootstrap) as producer:
        for _ in range(3):
            producer.send("tiny", value=b"y" * 1000, partition=0, key=None)
            producer.flush(timeout=10, raise_on_failure=False)  # one batch per record
        producer.send("tiny", value=b"y" * 1000, partition=0)
        with pytest.raises(DeliveryFailedError) as caught:
            producer.flush(timeout=10, raise_on_failure=True)
    assert caught.value.failed_records == 1
    assert str(caught.value).startswith("1 record(s) failed since the last flush; 1 with: tiny-0: a single record")
    assert sum(caught.value.errors.values()) == 1


async def test_async_producer_names_an_oversized_record_and_flush_counts_it(bootstrap: str) -> None:
    Admin(bootstrap).create_topic("big-async", partitions=1)
    async with AsyncProducer(bootstrap) as producer:
        fits = await producer.send("big-async", value=b"fits", partition=0)
        huge = await producer.send("big-async", value=b"x" * FIVE_MB, partition=0)
        after = await producer.send("big-async", value=b"after", partition=0)
        assert await producer.flush() == 1  # the oversized record alone: the others are not at fault
        assert (await fits).offset + 1 == (await after).offset
        with pytest.raises(RecordTooLargeError) as caught:
            await huge
        check_oversized_error(caught.value, "big-async")
        assert (await fits).offset >= 0
        huge_again = await producer.send("big-async", value=b"x" * FIVE_MB, partition=0)
        with pytest.raises(DeliveryFailedError, match="1 record"):
            await producer.flush(raise_on_failure=True)
        with pytest.raises(RecordTooLargeError):
            await huge_again
