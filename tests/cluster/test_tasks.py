"""cancel_and_wait: a broker's background task ends at a stop even when it survives one cancellation."""

from __future__ import annotations

import asyncio

import pytest

from logbroker.cluster.tasks import cancel_and_wait


async def _swallows_the_first_cancel(loops: list[int]) -> None:
    """What a loop around Python 3.11's asyncio.wait_for may do: a cancellation arriving as the awaited
    thing completes is lost, and the loop goes round again."""
    swallowed = False
    while True:
        loops.append(1)
        try:
            await asyncio.sleep(0.01)
        except asyncio.CancelledError:
            if swallowed:
                raise
            swallowed = True


def test_a_task_that_outlives_one_cancellation_is_cancelled_again_until_it_ends() -> None:
    async def scenario() -> None:
        loops: list[int] = []
        task = asyncio.get_running_loop().create_task(_swallows_the_first_cancel(loops))
        await asyncio.sleep(0.05)
        await asyncio.wait_for(cancel_and_wait(task), 10)
        assert task.cancelled()
        ended_after = len(loops)
        await asyncio.sleep(0.05)
        assert len(loops) == ended_after  # nothing runs on after the stop

    asyncio.run(scenario())


def test_what_the_task_failed_with_is_raised_and_an_ended_task_is_left_alone() -> None:
    async def fails() -> None:
        raise OSError("disk gone")

    async def scenario() -> None:
        failing = asyncio.get_running_loop().create_task(fails())
        await asyncio.sleep(0)
        with pytest.raises(OSError, match="disk gone"):
            await cancel_and_wait(failing)
        done = asyncio.get_running_loop().create_task(asyncio.sleep(0))
        await done
        await cancel_and_wait(done)
        assert not done.cancelled()

    asyncio.run(scenario())
