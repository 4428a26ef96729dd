"""Ending a broker's background tasks for sure.

Python 3.11's asyncio.wait_for swallows a cancellation that arrives just as the awaitable it waits on
completes (CPython gh-86296, fixed in 3.12 by rewriting wait_for over asyncio.timeout). A task that loops
around a wait_for, such as the leader reporter around a controller proposal, can therefore carry on after one
cancel(), and a stop that cancelled it once and awaited it waited forever (a broker's stop hung so in CI).
"""

from __future__ import annotations

import asyncio
from typing import Any

# A task is cancelled again if it has not ended this long after a cancellation: long enough for its own
# cleanup (closing a stream) to finish undisturbed, short enough that a stop is not held up noticeably.
CANCEL_AGAIN_AFTER_S = 1.0


async def cancel_and_wait(task: asyncio.Task[Any]) -> None:
    """Cancel a task and wait until it has ended, cancelling again while it carries on. What it failed with
    (other than its cancellation) is raised here, as awaiting it would."""
    while not task.done():
        task.cancel()
        await asyncio.wait({task}, timeout=CANCEL_AGAIN_AFTER_S)
    if not task.cancelled():
        task.result()
