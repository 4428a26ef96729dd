"""The broker's shared Raft state log: newest save wins, torn tails, failed fdatasyncs, rewrites, group commit."""

from __future__ import annotations

import asyncio
import concurrent.futures
import dataclasses
import random
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from logbroker.cluster.raft_storage import ReplicaState, ReplicaStateFile
from logbroker.cluster.state_log import STATE_LOG_FILE, GroupStateFile, RaftStateLog, _encode
from logbroker.raft.membership import Membership
from logbroker.storage.files import OS_FILES, FileSystem
from tests.raft.runtime_sim.disk import SimDisk

MEMBERS = Membership.of([1, 2, 3])
DIRECTORY = Path("/data")


def state(term: int, vote: int | None = None) -> ReplicaState:
    return ReplicaState(term=term, vote=vote, voters=(1, 2, 3))


def sim_disk(seed: int = 1) -> SimDisk:
    return SimDisk(random.Random(seed), lambda: 0)


def test_a_group_never_saved_loads_fresh_with_the_given_membership(tmp_path: Path) -> None:
    log = RaftStateLog.open(tmp_path)
    loaded = GroupStateFile(log, "t-0@id").load(MEMBERS)
    assert (loaded.term, loaded.vote, loaded.voters) == (0, None, (1, 2, 3))


def test_the_newest_save_of_each_group_wins_after_reopening(tmp_path: Path) -> None:
    log = RaftStateLog.open(tmp_path)
    for term in (1, 2, 3):
        log.save("a", state(term, vote=2))
    log.save("b", state(7, vote=1))
    log.close()
    again = RaftStateLog.open(tmp_path)
    assert again.state_of("a") == state(3, vote=2)
    assert again.state_of("b") == state(7, vote=1)


def test_a_forgotten_group_stays_forgotten_after_reopening(tmp_path: Path) -> None:
    log = RaftStateLog.open(tmp_path)
    log.save("a", state(3, vote=2))
    log.forget("a")
    log.close()
    assert RaftStateLog.open(tmp_path).state_of("a") is None


@pytest.mark.parametrize("cut_bytes", [1, 5, 13, 40])
def test_a_torn_last_record_is_cut_and_the_previous_save_wins(tmp_path: Path, cut_bytes: int) -> None:
    log = RaftStateLog.open(tmp_path)
    log.save("a", state(4, vote=1))
    size_after_first = log.size_bytes
    log.save("a", state(5, vote=3))
    log.close()
    path = tmp_path / STATE_LOG_FILE
    data = path.read_bytes()
    path.write_bytes(data[:len(data) - cut_bytes])
    again = RaftStateLog.open(tmp_path)
    assert again.state_of("a") == state(4, vote=1)
    assert path.stat().st_size == size_after_first  # the torn bytes are gone before anything is appended
    again.save("a", state(6))
    again.close()
    assert RaftStateLog.open(tmp_path).state_of("a") == state(6)


def test_a_damaged_byte_in_the_last_record_fails_its_check(tmp_path: Path) -> None:
    log = RaftStateLog.open(tmp_path)
    log.save("a", state(4, vote=1))
    log.save("a", state(5, vote=3))
    log.close()
    path = tmp_path / STATE_LOG_FILE
    data = bytearray(path.read_bytes())
    data[-3] ^= 0x20
    path.write_bytes(bytes(data))
    assert RaftStateLog.open(tmp_path).state_of("a") == state(4, vote=1)


def test_after_a_power_cut_every_save_that_returned_survives() -> None:
    for seed in range(30):
        disk = sim_disk(seed)
        log = RaftStateLog.open(DIRECTORY, fs=disk)
        rng = random.Random(seed)
        returned: dict[str, ReplicaState] = {}
        for term in range(1, 40):
            group = f"g{rng.randrange(5)}"
            saved = state(term, vote=rng.randrange(1, 4))
            log.save(group, saved)
            returned[group] = saved
        # A save written but never synced: a power cut may keep it, tear it or lose it.
        assert log._fd is not None
        disk.pwrite(log._fd, b"LBS1" + bytes(30), log.size_bytes)
        disk.power_cut()
        again = RaftStateLog.open(DIRECTORY, fs=disk)
        for group, saved in returned.items():
            assert again.state_of(group) == saved, f"seed {seed}: {group}"


class FailingFdatasync(FileSystem):
    """The real OS, with fdatasync failing while `failing` is set."""

    def __init__(self) -> None:
        self.failing = False

    def fdatasync(self, fd: int) -> None:
        if self.failing:
            raise OSError(5, "Input/output error (test)")
        OS_FILES.fdatasync(fd)


def test_a_failed_fdatasync_fails_every_save_until_a_rewrite_succeeds(tmp_path: Path) -> None:
    fs = FailingFdatasync()
    log = RaftStateLog.open(tmp_path, fs=fs)
    log.save("a", state(1, vote=1))
    fs.failing = True
    with pytest.raises(OSError):
        log.save("a", state(2, vote=2))
    fs.failing = False
    # The next save rewrites the file from memory first (the failed pages may be gone), then appends.
    log.save("b", state(3, vote=3))
    log.close()
    again = RaftStateLog.open(tmp_path)
    assert again.state_of("a") == state(2, vote=2)
    assert again.state_of("b") == state(3, vote=3)


def test_the_file_is_rewritten_with_one_record_per_group_once_it_grows(tmp_path: Path) -> None:
    log = RaftStateLog.open(tmp_path, min_compact_bytes=2000)
    for term in range(1, 200):
        log.save(f"g{term % 3}", state(term, vote=1))
    assert log.size_bytes < 2000 + 200  # rewritten on the way, not one record per save
    log.close()
    again = RaftStateLog.open(tmp_path)
    assert again.groups == ["g0", "g1", "g2"]
    assert again.state_of("g0") == state(198, vote=1)
    assert again.state_of("g1") == state(199, vote=1)


def test_every_field_of_the_state_survives_reopening(tmp_path: Path) -> None:
    every_field_set = ReplicaState(term=7, vote=3, commit_offset=41, start_prev_term=5, voters=(1, 2, 3),
                                   learners=(4,), log_start_offset=12, catching_up=True)
    assert all(getattr(every_field_set, f.name) != f.default for f in dataclasses.fields(ReplicaState))
    log = RaftStateLog.open(tmp_path)
    log.save("g", every_field_set)
    log.close()
    assert RaftStateLog.open(tmp_path).state_of("g") == every_field_set


def test_a_replica_not_catching_up_is_saved_without_the_field_and_read_back_as_not_catching_up(
        tmp_path: Path) -> None:
    """Records written before the field existed have no catching_up: they must read as not waiting (the
    replica votes), and ordinary records keep those bytes."""
    ordinary = ReplicaState(term=7, vote=3, voters=(1, 2, 3))
    assert b"catching_up" not in _encode("g", ordinary)
    assert b"catching_up" in _encode("g", dataclasses.replace(ordinary, catching_up=True))
    log = RaftStateLog.open(tmp_path)
    log.save("g", ordinary)
    log.close()
    assert b"catching_up" not in (tmp_path / STATE_LOG_FILE).read_bytes()
    assert RaftStateLog.open(tmp_path).state_of("g") == ordinary


def test_the_live_size_counts_one_record_per_group_across_reopens_and_rewrites(tmp_path: Path) -> None:
    """The rewrite threshold compares the file with the live records' size, which is kept per group, not
    computed again at each save: it must match what a rewrite writes, whatever happened before."""
    log = RaftStateLog.open(tmp_path, min_compact_bytes=1500)
    for term in range(1, 60):
        log.save(f"group-{term % 7}", state(term, vote=term % 3 or None))
    log.forget("group-3")
    log.close()
    log = RaftStateLog.open(tmp_path, min_compact_bytes=1500)
    for term in range(60, 90):
        log.save(f"group-{term % 5}-{'x' * (term % 4)}", state(term, vote=1))
    log.forget("group-0")
    expected = sum(len(_encode(group, log.state_of(group))) for group in log.groups)
    assert log._live_bytes == expected
    log.close()


def test_concurrent_saves_share_fdatasyncs_and_all_survive(tmp_path: Path) -> None:
    log = RaftStateLog.open(tmp_path)
    threads = [threading.Thread(target=lambda g=g: [log.save(f"g{g}", state(t)) for t in range(1, 21)])
               for g in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert log.fdatasyncs <= 8 * 20
    log.close()
    again = RaftStateLog.open(tmp_path)
    assert all(again.state_of(f"g{g}") == state(20) for g in range(8))


def test_a_legacy_state_file_moves_into_the_log(tmp_path: Path) -> None:
    legacy = tmp_path / "t-0" / "raft.state"
    legacy.parent.mkdir()
    old = ReplicaStateFile(legacy)
    old.save(state(9, vote=2))
    old.close()
    log = RaftStateLog.open(tmp_path)
    handle = GroupStateFile(log, "t-0@id", legacy_path=legacy)
    assert handle.load(MEMBERS) == state(9, vote=2)
    assert not legacy.exists()
    log.close()
    assert RaftStateLog.open(tmp_path).state_of("t-0@id") == state(9, vote=2)


def test_the_group_handle_tracks_what_it_saved(tmp_path: Path) -> None:
    log = RaftStateLog.open(tmp_path)
    handle = GroupStateFile(log, "g")
    loaded = handle.load(MEMBERS)
    assert handle.last_saved == loaded
    handle.save(state(2, vote=1))
    assert handle.last_saved == state(2, vote=1)
    handle.close()
    assert log.state_of("g") == state(2, vote=1)


# ------------------------------------------------------------------ saves from the event loop (SharedStateSync)


class CountingExecutor(ThreadPoolExecutor):
    """One worker, like a busy pool; counts the jobs it was given."""

    def __init__(self) -> None:
        super().__init__(max_workers=1)
        self.jobs = 0

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        self.jobs += 1
        return super().submit(fn, *args, **kwargs)


def test_a_thousand_saves_from_the_loop_share_a_few_fdatasyncs_and_all_survive(tmp_path: Path) -> None:
    log = RaftStateLog.open(tmp_path)
    executor = CountingExecutor()
    handles = [GroupStateFile(log, f"g{i}") for i in range(1000)]

    async def elect_all() -> None:
        await asyncio.gather(*(h.save_soon(state(2, vote=int(h.group[1:]) % 3 + 1), executor) for h in handles))

    asyncio.run(elect_all())
    executor.shutdown()
    # Every save waited for an fdatasync, and they shared them: one job ran at a time, each covering every
    # record written before it began (with a pool of 8 blocking saves it took at least 125).
    assert 1 <= log.fdatasyncs <= 5 and executor.jobs == log.fdatasyncs
    assert all(h.last_saved == state(2, vote=int(h.group[1:]) % 3 + 1) for h in handles)
    log.close()
    again = RaftStateLog.open(tmp_path)
    assert all(again.state_of(f"g{i}") == state(2, vote=i % 3 + 1) for i in range(1000))


class GatedFdatasync(FileSystem):
    """The real OS, with fdatasync held at a gate: `started` is set when one begins, `release` lets it run."""

    def __init__(self) -> None:
        self.started, self.release = threading.Event(), threading.Event()

    def fdatasync(self, fd: int) -> None:
        self.started.set()
        self.release.wait(10)
        OS_FILES.fdatasync(fd)


def test_a_save_written_while_an_fdatasync_runs_waits_for_the_next(tmp_path: Path) -> None:
    fs = GatedFdatasync()
    log = RaftStateLog.open(tmp_path, fs=fs)
    executor = ThreadPoolExecutor(max_workers=1)

    async def scenario() -> None:
        first = asyncio.ensure_future(GroupStateFile(log, "a").save_soon(state(1, vote=1), executor))
        await asyncio.get_running_loop().run_in_executor(None, fs.started.wait, 10)
        second = asyncio.ensure_future(GroupStateFile(log, "b").save_soon(state(1, vote=2), executor))
        await asyncio.sleep(0.05)
        assert not first.done() and not second.done()
        fs.release.set()
        await first
        await second
        assert log.is_durable((0, log.size_bytes))

    asyncio.run(scenario())
    executor.shutdown()
    assert log.fdatasyncs == 2  # the second record was written after the first fdatasync began


def test_a_failed_fdatasync_fails_the_loops_saves_and_the_next_ones_succeed_after_a_rewrite(tmp_path: Path) -> None:
    fs = FailingFdatasync()
    log = RaftStateLog.open(tmp_path, fs=fs)
    executor = ThreadPoolExecutor(max_workers=1)

    async def save(group: str, term: int) -> None:
        await GroupStateFile(log, group).save_soon(state(term, vote=1), executor)

    fs.failing = True
    with pytest.raises(OSError):
        asyncio.run(save("a", 1))
    fs.failing = False
    asyncio.run(save("b", 2))  # the append rewrites the file from memory first
    executor.shutdown()
    log.close()
    again = RaftStateLog.open(tmp_path)
    assert again.state_of("b") == state(2, vote=1)


class KilledExecutor(concurrent.futures.Executor):
    """A process that died: every job is cancelled, never run (as the runtime simulation's executor does)."""

    def __init__(self) -> None:
        self.jobs = 0

    def submit(self, fn, /, *args, **kwargs):  # type: ignore[no-untyped-def,override]
        self.jobs += 1
        assert self.jobs < 10, "the saves keep resubmitting their fdatasync to a dead executor"
        future: concurrent.futures.Future[None] = concurrent.futures.Future()
        future.cancel()
        return future


def test_saves_whose_fdatasync_never_runs_are_cancelled_not_retried_for_ever(tmp_path: Path) -> None:
    log = RaftStateLog.open(tmp_path)
    killed = KilledExecutor()

    async def save() -> None:
        await GroupStateFile(log, "a").save_soon(state(1, vote=1), killed)

    with pytest.raises(asyncio.CancelledError):
        asyncio.run(save())
    assert killed.jobs == 1
    shut = ThreadPoolExecutor(max_workers=1)
    shut.shutdown()
    with pytest.raises(RuntimeError, match="shutdown"):
        asyncio.run(GroupStateFile(log, "b").save_soon(state(1, vote=2), shut))
    executor = ThreadPoolExecutor(max_workers=1)  # a live pool: saves work again
    asyncio.run(GroupStateFile(log, "c").save_soon(state(1, vote=3), executor))
    executor.shutdown()
    assert log.is_durable((0, log.size_bytes))
