"""Resident memory of broker processes, read from /proc/<pid>/status (VmRSS), once or sampled in the background."""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from contextlib import contextmanager

SAMPLE_INTERVAL_S = 0.05


def rss_mb(pid: int) -> int:
    """VmRSS of a process in MiB (0 once it has exited)."""
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) // 1024
    except FileNotFoundError:
        pass
    return 0


class PeakRss:
    """The largest VmRSS seen per pid while sampling ran."""

    def __init__(self, pids: Iterable[int]) -> None:
        self.peak_mb = {pid: rss_mb(pid) for pid in pids}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, name="rss-sampler", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _sample(self) -> None:
        while not self._stop.wait(SAMPLE_INTERVAL_S):
            for pid in self.peak_mb:
                self.peak_mb[pid] = max(self.peak_mb[pid], rss_mb(pid))


@contextmanager
def peak_rss(pids: Iterable[int]) -> Iterator[PeakRss]:
    """Sample the RSS of ``pids`` until the block ends; read ``.peak_mb`` afterwards."""
    sampler = PeakRss(pids)
    sampler.start()
    try:
        yield sampler
    finally:
        sampler.stop()
