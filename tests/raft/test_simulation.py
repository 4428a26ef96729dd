"""The deterministic simulator, run over a few hundred short seeds, and against deliberately broken nodes."""

from __future__ import annotations

import pytest

from tests.raft.sim.cluster import Simulation
from tests.raft.sim.run import main, run_seed

PYTEST_SEEDS = 300  # the default suite's share; `make sim` runs as many as asked
PYTEST_CHAOS_STEPS = 300
MUTANT_SEEDS = 40
ANSWER_BEFORE_PERSIST_SEEDS = 100


@pytest.mark.parametrize("block", range(4))
def test_no_invariant_is_violated_and_the_cluster_recovers_on_every_seed(block: int) -> None:
    per_block = PYTEST_SEEDS // 4
    for seed in range(block * per_block, (block + 1) * per_block):
        outcome = run_seed(seed, chaos_steps=PYTEST_CHAOS_STEPS)
        assert outcome.violation is None, (seed, outcome.violation, outcome.detail, "\n".join(outcome.trace))


def test_a_seed_replays_exactly() -> None:
    first, second = Simulation(17, chaos_steps=100), Simulation(17, chaos_steps=100)
    assert first.run() == second.run()
    assert list(first.trace) == list(second.trace)


def test_the_simulator_injects_every_kind_of_fault() -> None:
    seen: set[str] = set()
    for seed in range(30):
        simulation = Simulation(seed, chaos_steps=PYTEST_CHAOS_STEPS)
        simulation.run()
        seen |= {kind for kind, count in simulation.stats.items() if count}
    faults = {
        "partition",
        "isolate_leader",
        "heal",
        "crash",
        "crash_leader",
        "restart",
        "retention",
        "transfer",
        "crash_mid_save",
        "crash_mid_fsync",
        "cut_tail",
    }
    assert faults <= seen
    assert {"member_ok", "reset_log", "timeout_now", "pre_vote", "vote"} <= seen
    assert {"save_lost", "save_torn", "save_whole", "tail_cut"} <= seen  # the faults that took effect


@pytest.mark.parametrize("mutant", ["vote-without-log-check", "uncapped-heartbeat-commit"])
def test_the_simulator_catches_a_broken_node(mutant: str) -> None:
    caught = [
        outcome
        for seed in range(MUTANT_SEEDS)
        if (outcome := run_seed(seed, chaos_steps=PYTEST_CHAOS_STEPS, mutant=mutant)).violation is not None
    ]
    assert caught, f"mutant {mutant} survived {MUTANT_SEEDS} seeds"


def test_the_simulator_catches_a_node_that_answers_before_its_persist() -> None:
    # Rarer to catch: a lost acknowledgement or vote breaks safety only with other faults around it.
    caught = next((seed for seed in range(ANSWER_BEFORE_PERSIST_SEEDS)
                   if run_seed(seed, chaos_steps=PYTEST_CHAOS_STEPS, mutant="answer-before-persist").violation), None)
    assert caught is not None, f"answer-before-persist survived {ANSWER_BEFORE_PERSIST_SEEDS} seeds"


def test_the_runner_exits_non_zero_and_prints_the_replay_command_for_a_violation(
    capsys: pytest.CaptureFixture[str],
) -> None:
    status = main(
        [
            "--seeds",
            "20",
            "--start",
            "0",
            "--steps",
            "150",
            "--mutant",
            "vote-without-log-check",
            "--jobs",
            "1",
        ]
    )
    printed = capsys.readouterr().out
    assert status == 1
    assert "VIOLATION" in printed and "last " in printed
    assert (
        "python -m tests.raft.sim.run --seeds 1 --start" in printed
        and "--mutant vote-without-log-check" in printed
    )


def test_the_runner_exits_zero_when_every_seed_passes(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["--seeds", "3", "--start", "5", "--steps", "100", "--jobs", "1"]) == 0
    assert "3 seeds from 5 passed" in capsys.readouterr().out


@pytest.mark.slow
def test_two_thousand_long_seeds_pass() -> None:
    assert main(["--seeds", "2000", "--start", "100000", "--steps", "1000"]) == 0
