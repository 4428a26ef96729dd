"""Run the Raft simulator over many seeds: ``python -m tests.raft.sim.run --seeds N --start S``.

``--runtime`` runs the runtime simulation instead (tests/raft/runtime_sim: production Replica objects over
production partition logs on simulated disks); ``--seconds`` is then its virtual chaos time per seed.

Exits non-zero on the first invariant violation, printing the seed, the invariant, the last events and
the one command that replays it.
"""

from __future__ import annotations

import argparse
import logging
import multiprocessing
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass

from logbroker.raft.node import RaftNode
from tests.raft.sim.checkers import InvariantViolation
from tests.raft.sim.cluster import Simulation
from tests.raft.sim.mutants import MUTANTS

DEFAULT_CHAOS_STEPS = 600
DEFAULT_RUNTIME_SECONDS = 3.0


@dataclass
class Outcome:
    seed: int
    violation: str | None = None
    detail: str = ""
    trace: tuple[str, ...] = ()


def node_class_for(mutant: str | None) -> type[RaftNode]:
    return MUTANTS[mutant] if mutant else RaftNode


def run_seed(seed: int, chaos_steps: int = DEFAULT_CHAOS_STEPS, mutant: str | None = None) -> Outcome:
    simulation = Simulation(seed, chaos_steps=chaos_steps, node_class=node_class_for(mutant))
    try:
        simulation.run()
    except InvariantViolation as violation:
        return Outcome(seed, violation.invariant, violation.detail, tuple(simulation.format_trace()))
    return Outcome(seed)


def run_runtime_seed(seed: int, chaos_s: float = DEFAULT_RUNTIME_SECONDS, mutant: str | None = None) -> Outcome:
    """One seed of the runtime simulation (imported here: it pulls in the whole broker runtime)."""
    from tests.raft.runtime_sim.cluster import ObservedReplica, RuntimeSimulation
    from tests.raft.runtime_sim.mutants import MUTANTS as RUNTIME_MUTANTS

    logging.disable(logging.CRITICAL)  # the replicas log every disk failure the simulation injects
    replica_class = RUNTIME_MUTANTS[mutant] if mutant else ObservedReplica
    simulation = RuntimeSimulation(seed, chaos_s=chaos_s, replica_class=replica_class)
    try:
        simulation.run()
    except InvariantViolation as violation:
        return Outcome(seed, violation.invariant, violation.detail, tuple(simulation.format_trace()))
    finally:
        logging.disable(logging.NOTSET)
    return Outcome(seed)


def _run_seed_star(args: tuple[int, float, str | None, bool]) -> Outcome:
    seed, length, mutant, runtime = args
    return run_runtime_seed(seed, length, mutant) if runtime else run_seed(seed, int(length), mutant)


def outcomes(seeds: range, chaos_steps: float, mutant: str | None, jobs: int, runtime: bool = False
             ) -> Iterator[Outcome]:
    work = [(seed, chaos_steps, mutant, runtime) for seed in seeds]
    if jobs <= 1 or len(work) < 2:
        yield from map(_run_seed_star, work)
        return
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        yield from pool.imap(_run_seed_star, work, chunksize=4)


def replay_command(seed: int, chaos_steps: float, mutant: str | None, runtime: bool = False) -> str:
    extra = f" --mutant {mutant}" if mutant else ""
    if runtime:
        if mutant is None and chaos_steps == DEFAULT_RUNTIME_SECONDS:
            return f"make sim-runtime SEEDS=1 START={seed}"
        return f"python -m tests.raft.sim.run --runtime --seeds 1 --start {seed} --seconds {chaos_steps}{extra}"
    if mutant is None and chaos_steps == DEFAULT_CHAOS_STEPS:
        return f"make sim SEEDS=1 START={seed}"
    return f"python -m tests.raft.sim.run --seeds 1 --start {seed} --steps {chaos_steps}{extra}"


class Progress:
    """One rewritten status line on a terminal; plain periodic lines in CI or when piped."""

    def __init__(self, total: int) -> None:
        self.total = total
        self.started = time.monotonic()
        self.live = sys.stderr.isatty() and os.environ.get("CI", "").lower() not in ("true", "1")
        self.last_print = 0.0

    def update(self, done: int) -> None:
        now = time.monotonic()
        final = done == self.total
        if not final and now - self.last_print < (0.2 if self.live else 10.0):
            return
        self.last_print = now
        elapsed = now - self.started
        rate = done / elapsed if elapsed > 0 else 0.0
        line = f"sim: {done}/{self.total} seeds, {rate:.1f} seeds/s, {elapsed:.0f}s, no violations"
        if self.live:
            sys.stderr.write("\r" + line + ("\n" if final else ""))
        else:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--seeds", type=int, default=200, help="how many seeds to run")
    parser.add_argument("--start", type=int, default=0, help="first seed")
    parser.add_argument("--steps", type=int, default=DEFAULT_CHAOS_STEPS, help="chaos steps per seed")
    parser.add_argument("--runtime", action="store_true",
                        help="simulate the real runtime (Replica, PartitionLog, simulated disks) instead of the core")
    parser.add_argument("--seconds", type=float, default=DEFAULT_RUNTIME_SECONDS,
                        help="--runtime: virtual seconds of chaos per seed")
    parser.add_argument("--mutant", help="run against a deliberately broken node (with --runtime: runtime); one of "
                        f"{', '.join(sorted(MUTANTS))} / {', '.join(sorted(_runtime_mutants()))}")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    args = parser.parse_args(argv)
    if args.mutant is not None and args.mutant not in (_runtime_mutants() if args.runtime else MUTANTS):
        parser.error(f"unknown {'runtime ' if args.runtime else ''}mutant {args.mutant!r}")
    length = args.seconds if args.runtime else args.steps

    seeds = range(args.start, args.start + args.seeds)
    progress = Progress(len(seeds))
    for done, outcome in enumerate(outcomes(seeds, length, args.mutant, args.jobs, args.runtime), start=1):
        if outcome.violation is not None:
            if progress.live:
                sys.stderr.write("\n")
            print(f"VIOLATION after {done} seeds: seed {outcome.seed}: {outcome.violation}")
            print(f"  {outcome.detail}")
            print(f"last {len(outcome.trace)} events:")
            print("\n".join(outcome.trace))
            print(f"replay: {replay_command(outcome.seed, length, args.mutant, args.runtime)}")
            return 1
        progress.update(done)
    elapsed = time.monotonic() - progress.started
    what = f"{args.seconds:g} virtual seconds of chaos" if args.runtime else f"{args.steps} chaos steps"
    print(f"sim{' (runtime)' if args.runtime else ''}: {len(seeds)} seeds from {args.start} passed "
          f"({what} each) in {elapsed:.0f} s")
    return 0


def _runtime_mutants() -> list[str]:
    from tests.raft.runtime_sim.mutants import MUTANTS as RUNTIME_MUTANTS

    return sorted(RUNTIME_MUTANTS)


if __name__ == "__main__":
    sys.exit(main())
