"""Run the Raft simulator over many seeds: ``python -m tests.raft.sim.run --seeds N --start S``.

Exits non-zero on the first invariant violation, printing the seed, the invariant, the last events and
the one command that replays it.
"""

from __future__ import annotations

import argparse
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


def _run_seed_star(args: tuple[int, int, str | None]) -> Outcome:
    return run_seed(*args)


def outcomes(seeds: range, chaos_steps: int, mutant: str | None, jobs: int) -> Iterator[Outcome]:
    work = [(seed, chaos_steps, mutant) for seed in seeds]
    if jobs <= 1 or len(work) < 2:
        yield from map(_run_seed_star, work)
        return
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        yield from pool.imap(_run_seed_star, work, chunksize=4)


def replay_command(seed: int, chaos_steps: int, mutant: str | None) -> str:
    if mutant is None and chaos_steps == DEFAULT_CHAOS_STEPS:
        return f"make sim SEEDS=1 START={seed}"
    extra = f" --mutant {mutant}" if mutant else ""
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
    parser.add_argument("--mutant", choices=sorted(MUTANTS), help="run against a deliberately broken node")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="worker processes")
    args = parser.parse_args(argv)

    seeds = range(args.start, args.start + args.seeds)
    progress = Progress(len(seeds))
    for done, outcome in enumerate(outcomes(seeds, args.steps, args.mutant, args.jobs), start=1):
        if outcome.violation is not None:
            if progress.live:
                sys.stderr.write("\n")
            print(f"VIOLATION after {done} seeds: seed {outcome.seed}: {outcome.violation}")
            print(f"  {outcome.detail}")
            print(f"last {len(outcome.trace)} events:")
            print("\n".join(outcome.trace))
            print(f"replay: {replay_command(outcome.seed, args.steps, args.mutant)}")
            return 1
        progress.update(done)
    print(f"sim: {len(seeds)} seeds from {args.start} passed ({args.steps} chaos steps each)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
