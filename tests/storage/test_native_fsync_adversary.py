"""Adversarial tests of the native fsync threads (logbroker/storage/_fsyncthreads.c and fsync_threads.py): the C
object used directly and through its asyncio wrapper, with bad descriptors, many jobs, closes from odd places and
descriptors reused under a pending fsync."""

from __future__ import annotations

import asyncio
import errno
import gc
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from logbroker.cluster.fsync_threads import FsyncThreads
from logbroker.storage.files import OS_FILES

native_module = pytest.importorskip("logbroker.storage._fsyncthreads")
Native = native_module.FsyncThreads

REPO = Path(__file__).resolve().parents[2]


def open_fds() -> set[int]:
    """This process's open descriptors (not the one listdir used for the listing, closed by now)."""
    found = set()
    for name in os.listdir("/proc/self/fd"):
        try:
            os.fstat(int(name))
        except OSError:
            continue
        found.add(int(name))
    return found


def wait_for_ready(native: object, deadline_s: float = 5.0) -> None:
    import select
    readable, _, _ = select.select([native.fileno()], [], [], deadline_s)  # type: ignore[attr-defined]
    assert readable, "the eventfd never became readable"


def collect(native: object, count: int, deadline_s: float = 10.0) -> list[tuple[int, int]]:
    """Every (token, errno) until count jobs came back, within the deadline."""
    got: list[tuple[int, int]] = []
    deadline = time.monotonic() + deadline_s
    while len(got) < count:
        assert time.monotonic() < deadline, f"only {len(got)} of {count} jobs came back"
        import select
        select.select([native.fileno()], [], [], 0.2)  # type: ignore[attr-defined]
        got.extend(native.completed())  # type: ignore[attr-defined]
    return got


def run_python(code: str, timeout_s: float = 8.0, *flags: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, *flags, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout_s)


# ------------------------------------------------------------------------------------------- the C object


def test_bad_thread_counts_are_refused_and_a_second_init_too() -> None:
    for threads in (0, -1, 65):
        with pytest.raises(ValueError, match="threads must be 1 to 64"):
            Native(threads)
    native = Native(1)
    try:
        with pytest.raises(RuntimeError, match="already running"):
            native.__init__(2)
    finally:
        native.close()


def test_an_uninitialised_object_refuses_jobs_and_answers_harmlessly() -> None:
    native = Native.__new__(Native)
    with pytest.raises(RuntimeError, match="not running"):
        native.submit(0, 1)
    assert native.completed() == []
    assert native.fileno() == -1
    native.close()  # no threads to stop, no crash
    del native
    gc.collect()


def test_invalid_and_closed_descriptors_come_back_as_ebadf_with_their_tokens() -> None:
    native = Native(2)
    try:
        read_end, write_end = os.pipe()
        os.close(write_end)
        closed_fd = read_end
        os.close(read_end)
        native.submit(-1, 11)
        native.submit(closed_fd, 12)
        got = dict(collect(native, 2))
        assert got == {11: errno.EBADF, 12: errno.EBADF}
    finally:
        native.close()


def test_a_pipe_cannot_be_fdatasynced_and_says_so() -> None:
    native = Native(1)
    read_end, write_end = os.pipe()
    try:
        native.submit(os.dup(read_end), 5)
        assert collect(native, 1) == [(5, errno.EINVAL)]
    finally:
        native.close()
        os.close(read_end)
        os.close(write_end)


def test_tokens_round_trip_at_the_limits_of_a_long_long() -> None:
    native = Native(1)
    try:
        for token in (-(2 ** 63), 2 ** 63 - 1, 0):
            native.submit(-1, token)
        with pytest.raises(OverflowError):
            native.submit(-1, 2 ** 63)
        with pytest.raises(TypeError):
            native.submit("3", 1)
        got = collect(native, 3)
        assert sorted(token for token, _ in got) == [-(2 ** 63), 0, 2 ** 63 - 1]
        assert native.completed() == []  # nothing more was queued by the refused submits
    finally:
        native.close()


def test_completed_with_nothing_finished_returns_at_once() -> None:
    native = Native(2)
    try:
        started = time.monotonic()
        for _ in range(100):
            assert native.completed() == []
        assert time.monotonic() - started < 1.0
    finally:
        native.close()


def test_thousands_of_jobs_on_many_threads_each_come_back_once_and_no_descriptor_leaks(tmp_path: Path) -> None:
    files = []
    for index in range(8):
        fd = os.open(tmp_path / f"f{index}", os.O_RDWR | os.O_CREAT, 0o644)
        os.write(fd, b"x" * 100)
        files.append(fd)
    before = open_fds()
    native = Native(64)
    eventfd = native.fileno()
    try:
        jobs = 4000
        for token in range(jobs):
            native.submit(os.dup(files[token % len(files)]), token)
        got = collect(native, jobs, deadline_s=15)
        assert sorted(token for token, _ in got) == list(range(jobs))
        assert all(code == 0 for _, code in got)
    finally:
        native.close()
    assert native.completed() == []
    assert open_fds() - before == {eventfd}  # every copy closed by its thread; only the eventfd remains
    del native
    gc.collect()
    assert open_fds() <= before, "the eventfd outlived its object"
    for fd in files:
        os.close(fd)


def test_close_finishes_every_job_then_refuses_more_and_may_be_called_again(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    native = Native(3)
    try:
        for token in range(500):
            os.write(fd, b"y")
            native.submit(os.dup(fd), token)
        native.close()
        got = native.completed()  # close joined the threads: everything is done already
        assert sorted(token for token, _ in got) == list(range(500))
        copy = os.dup(fd)
        with pytest.raises(RuntimeError, match="closed"):
            native.submit(copy, 999)
        os.close(copy)  # refused: still the caller's (closing it again would fail if the threads had taken it)
        native.close()
        assert native.completed() == []
    finally:
        os.close(fd)


def test_an_object_dropped_with_jobs_pending_syncs_them_and_closes_every_copy(tmp_path: Path) -> None:
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    before = open_fds()
    native = Native(2)
    for token in range(2000):
        native.submit(os.dup(fd), token)
    del native  # never closed: dealloc must join the threads after the jobs, and close the eventfd
    gc.collect()
    assert open_fds() <= before
    os.close(fd)


def test_close_from_another_thread_while_jobs_are_in_flight_answers_them_all(tmp_path: Path) -> None:
    import threading
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)
    native = Native(4)
    try:
        for token in range(1000):
            native.submit(os.dup(fd), token)
        closer = threading.Thread(target=native.close)
        closer.start()
        closer.join(10)
        assert not closer.is_alive()
        assert sorted(token for token, _ in native.completed()) == list(range(1000))
    finally:
        os.close(fd)


def test_close_from_two_threads_at_once_neither_hangs_nor_crashes() -> None:
    code = """
        import os, tempfile, threading
        from logbroker.storage._fsyncthreads import FsyncThreads
        for attempt in range(20):
            native = FsyncThreads(8)
            with tempfile.TemporaryFile() as f:
                f.write(b"x" * 100)
                f.flush()
                for token in range(200):
                    native.submit(os.dup(f.fileno()), token)
                barrier = threading.Barrier(3)
                def close():
                    barrier.wait()
                    native.close()
                closers = [threading.Thread(target=close) for _ in range(3)]
                for closer in closers:
                    closer.start()
                for closer in closers:
                    closer.join()
                assert len(native.completed()) == 200
        print("ok")
    """
    try:
        result = run_python(code, 3.0)
    except subprocess.TimeoutExpired:
        pytest.fail("concurrent close() hung")
    assert result.returncode == 0, f"concurrent close() crashed: rc {result.returncode} {result.stderr[-500:]}"
    assert result.stdout.strip() == "ok"


def test_a_queued_fsync_never_lands_on_a_file_that_took_its_descriptor_number(tmp_path: Path) -> None:
    """One thread, a queue ahead of the job: the original descriptor is closed and its number given to a pipe
    (which fdatasync refuses with EINVAL) before the job runs. The job syncs its own copy: success."""
    native = Native(1)
    filler = os.open(tmp_path / "filler", os.O_RDWR | os.O_CREAT, 0o644)
    target = os.open(tmp_path / "target", os.O_RDWR | os.O_CREAT, 0o644)
    read_end, write_end = os.pipe()
    try:
        os.write(target, b"durable")
        for token in range(3000):
            os.write(filler, b"z")
            native.submit(os.dup(filler), token)
        native.submit(os.dup(target), 10_000)
        os.dup2(read_end, target)  # the number now names a pipe
        got = dict(collect(native, 3001, deadline_s=15))
        assert got[10_000] == 0
    finally:
        native.close()
        for fd in (filler, target, read_end, write_end):
            os.close(fd)


# ------------------------------------------------------------------------------------------ the wrapper


def test_wrapper_bad_descriptors_raise_oserror_at_once_and_leave_nothing_in_flight() -> None:
    syncer = FsyncThreads.start(2)
    assert syncer is not None

    async def scenario() -> None:
        before = open_fds()
        read_end, write_end = os.pipe()
        os.close(read_end)
        os.close(write_end)
        for fd in (-1, read_end):
            with pytest.raises(OSError) as raised:
                syncer.fdatasync(OS_FILES, fd)
            assert raised.value.errno == errno.EBADF
        assert syncer.in_flight == 0
        assert open_fds() <= before

    try:
        asyncio.run(scenario())
    finally:
        syncer.close()


def test_wrapper_einval_comes_back_as_oserror_through_the_future() -> None:
    syncer = FsyncThreads.start(1)
    assert syncer is not None
    read_end, write_end = os.pipe()

    async def scenario() -> None:
        with pytest.raises(OSError) as raised:
            await asyncio.wait_for(syncer.fdatasync(OS_FILES, read_end), 5)
        assert raised.value.errno == errno.EINVAL
        assert syncer.in_flight == 0

    try:
        asyncio.run(scenario())
    finally:
        syncer.close()
        os.close(read_end)
        os.close(write_end)


def test_wrapper_many_concurrent_fsyncs_and_cancelled_waiters(tmp_path: Path) -> None:
    syncer = FsyncThreads.start(8)
    assert syncer is not None
    fds = [os.open(tmp_path / f"f{i}", os.O_RDWR | os.O_CREAT, 0o644) for i in range(4)]

    async def scenario() -> None:
        before = open_fds()
        futures = []
        for index in range(2000):
            os.write(fds[index % 4], b"a")
            futures.append(syncer.fdatasync(OS_FILES, fds[index % 4]))
        for future in futures[::3]:
            future.cancel()  # the waiter went away: the fsync still runs and its answer is dropped quietly
        kept = [f for i, f in enumerate(futures) if i % 3]
        await asyncio.wait_for(asyncio.gather(*kept), 10)
        deadline = time.monotonic() + 5
        while syncer.in_flight:
            assert time.monotonic() < deadline, f"{syncer.in_flight} fsyncs never answered"
            await asyncio.sleep(0.01)
        assert open_fds() <= before

    try:
        asyncio.run(scenario())
    finally:
        syncer.close()
        for fd in fds:
            os.close(fd)


def test_wrapper_close_answers_every_pending_waiter_with_its_fsync(tmp_path: Path) -> None:
    syncer = FsyncThreads.start(2)
    assert syncer is not None
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)

    async def scenario() -> None:
        futures = []
        for _ in range(300):
            os.write(fd, b"b")
            futures.append(syncer.fdatasync(OS_FILES, fd))
        syncer.close()  # on the loop, before any completion was collected
        assert all(f.done() for f in futures)
        assert all(f.exception() is None for f in futures)  # they ran: not cancelled
        assert syncer.in_flight == 0
        before = open_fds()
        with pytest.raises(RuntimeError, match="closed"):
            syncer.fdatasync(OS_FILES, fd)
        assert open_fds() <= before, "the refused job's copy of the descriptor leaked"
        syncer.close()  # twice: harmless

    try:
        asyncio.run(scenario())
    finally:
        os.close(fd)


def test_wrapper_used_from_a_second_event_loop_is_refused_not_left_hanging(tmp_path: Path) -> None:
    syncer = FsyncThreads.start(1)
    assert syncer is not None
    fd = os.open(tmp_path / "f", os.O_RDWR | os.O_CREAT, 0o644)

    async def sync_once() -> None:
        await asyncio.wait_for(syncer.fdatasync(OS_FILES, fd), 3)

    try:
        asyncio.run(sync_once())
        with pytest.raises(RuntimeError, match="the event loop that first used it"):
            asyncio.run(sync_once())
        assert syncer.in_flight == 0
    finally:
        syncer.close()
        os.close(fd)


def test_wrapper_refuses_a_second_event_loop_under_python_dash_o() -> None:
    code = """
        import asyncio, tempfile
        from logbroker.storage.files import OS_FILES
        from logbroker.cluster.fsync_threads import FsyncThreads
        syncer = FsyncThreads.start(1)
        f = tempfile.TemporaryFile()
        async def once():
            await asyncio.wait_for(syncer.fdatasync(OS_FILES, f.fileno()), 1)
        asyncio.run(once())
        try:
            asyncio.run(once())
        except asyncio.TimeoutError:
            print("hung")
        except Exception as exc:
            print("refused", type(exc).__name__)
        syncer.close()
    """
    result = run_python(code, 10.0, "-O")
    assert result.returncode == 0, result.stderr[-500:]
    assert result.stdout.strip().startswith("refused"), result.stdout


def test_wrapper_out_of_descriptors_raises_emfile_and_leaks_no_waiter() -> None:
    """With RLIMIT_NOFILE exhausted the copy cannot be made: fdatasync raises EMFILE at once (Replica then falls
    back to the pool), with no future and no token left behind."""
    code = """
        import asyncio, errno, os, resource, tempfile
        from logbroker.storage.files import OS_FILES
        from logbroker.cluster.fsync_threads import FsyncThreads
        syncer = FsyncThreads.start(2)
        f = tempfile.TemporaryFile()
        async def main():
            await syncer.fdatasync(OS_FILES, f.fileno())  # the loop's reader is in place
            soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
            resource.setrlimit(resource.RLIMIT_NOFILE, (64, hard))
            hogs = []
            try:
                while True:
                    hogs.append(os.open('/dev/null', os.O_RDONLY))
            except OSError as exc:
                assert exc.errno == errno.EMFILE
            try:
                syncer.fdatasync(OS_FILES, f.fileno())
            except OSError as exc:
                print("raised", exc.errno == errno.EMFILE, syncer.in_flight)
            for fd in hogs[:4]:
                os.close(fd)
            await asyncio.wait_for(syncer.fdatasync(OS_FILES, f.fileno()), 3)
            print("recovered", syncer.in_flight)
            for fd in hogs[4:]:
                os.close(fd)
        asyncio.run(main())
        syncer.close()
    """
    result = run_python(code, 10.0)
    assert result.returncode == 0, result.stderr[-800:]
    assert result.stdout.split("\n")[:2] == ["raised True 0", "recovered 0"], result.stdout
