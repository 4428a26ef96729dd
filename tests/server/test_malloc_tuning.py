"""The broker fixes glibc's mmap threshold so that freed large buffers leave its resident memory."""

from __future__ import annotations

import subprocess
import sys

import pytest

from logbroker.server.malloc_tuning import fix_mmap_threshold

BUFFERS = 200
BUFFER_BYTES = 1 << 20

# In a fresh interpreter: free one buffer of 1 MiB (glibc slides its threshold at the first such free),
# then allocate BUFFERS buffers of 1 MiB, free all but the newest (which pins the top of
# a heap arena, as a buffer still in use does in a broker), and print how much resident memory remains
# above what the process held before.
BURST = f"""
import sys
from logbroker.server.malloc_tuning import fix_mmap_threshold
from tests.support.rss import rss_mb
import os
if sys.argv[1] == "fixed":
    assert fix_mmap_threshold()
served = bytearray({BUFFER_BYTES})  # a buffer freed before the burst, as in a broker that has been serving
del served
before = rss_mb(os.getpid())
buffers = [bytearray({BUFFER_BYTES}) for _ in range({BUFFERS})]
for buffer in buffers:
    buffer[::4096] = b"x" * len(buffer[::4096])  # touch every page, as a received batch does
newest = buffers.pop()
del buffers
print(rss_mb(os.getpid()) - before)
"""


def retained_mb_after_burst(mode: str) -> int:
    done = subprocess.run([sys.executable, "-c", BURST, mode], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return int(done.stdout)


@pytest.fixture(scope="module", autouse=True)
def glibc() -> None:
    if not fix_mmap_threshold():
        pytest.skip("this C library has no mallopt (not glibc): the broker leaves allocation as it is")


def test_with_the_threshold_fixed_freed_megabyte_buffers_leave_resident_memory() -> None:
    retained_mb = retained_mb_after_burst("fixed")
    assert retained_mb < 20, f"{retained_mb} MiB of {BUFFERS} freed 1 MiB buffers still resident"


def test_with_the_sliding_threshold_they_stay_which_is_what_the_fix_is_for() -> None:
    retained_mb = retained_mb_after_burst("sliding")
    assert retained_mb > BUFFERS // 2, f"only {retained_mb} MiB retained: glibc no longer slides its threshold"
