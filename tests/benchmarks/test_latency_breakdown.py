"""The latency breakdown benchmark, run small on three brokers: every stage is seen for every record, and the
stages come out in the order the produce path has to pass them."""

from __future__ import annotations

import json

import pytest

from benchmarks import latency_breakdown

# (earlier, later): the later event cannot happen before the earlier one for any record. Percentiles are taken
# over the same records for every stage, so the order holds for each percentile too.
CAUSAL_PAIRS = [
    ("client_sender_took", "client_request_built"),
    ("client_request_built", "leader_produce_arrived"),
    ("leader_produce_arrived", "leader_proposed"),
    ("leader_proposed", "leader_ready"),
    ("leader_ready", "leader_appends_to_transport"),
    ("leader_appends_to_transport", "leader_persist_start"),
    ("leader_persist_start", "leader_write_start"),
    ("leader_write_start", "leader_fsync_end"),
    ("leader_fsync_end", "leader_persist_end"),
    ("leader_appends_to_transport", "leader_append_streamed_first"),
    ("leader_append_streamed_first", "leader_append_streamed_last"),
    ("leader_append_streamed_first", "follower_append_received"),
    ("follower_append_received", "follower_append_stepped"),
    ("follower_append_stepped", "follower_ready"),
    ("follower_ready", "follower_persist_start"),
    ("follower_persist_start", "follower_write_start"),
    ("follower_write_start", "follower_fsync_end"),
    ("follower_fsync_end", "follower_persist_end"),
    ("follower_persist_end", "follower_ack_sent"),
    ("follower_ack_sent", "follower_ack_streamed"),
    ("follower_ack_streamed", "leader_ack_received"),
    ("leader_ack_received", "leader_ack_stepped"),
    ("leader_ack_stepped", "leader_commit_applied"),
    ("leader_commit_applied", "leader_produce_answered"),  # acks=all: answered once committed
    ("leader_produce_answered", "client_answer_received"),
    ("client_answer_received", "client_future_resolved"),
    ("client_answer_received", "client_caller_woke"),
]


@pytest.mark.slow  # 10-15 s of brokers for a benchmark tool: make test-slow
def test_every_stage_of_a_lone_acks_all_record_is_traced_in_causal_order(capsys: pytest.CaptureFixture[str]) -> None:
    code = latency_breakdown.main(["--brokers", "3", "--replication-factor", "3", "--acks", "all",
                                   "--records", "60", "--warmup", "10", "--rate", "100"])
    captured = capsys.readouterr()
    result = json.loads(captured.out.strip().splitlines()[-1])
    assert code == 0, captured.err
    assert (result["records"], result["warmup"], result["measured"], result["failed"]) == (60, 10, 50, 0)
    assert result["complete"] == 50, f"stages missing for some records: {result['missing_stages']}"
    assert result["missing_stages"] == {}

    stages = result["stages"]
    names = [name for name, _, _ in latency_breakdown.stages_for(3)]
    assert sorted(stages) == sorted(f"{name}_ms" for name in names)
    for name in names:
        assert stages[f"{name}_ms"]["p50"] is not None and stages[f"{name}_ms"]["p90"] is not None, name
        assert stages[f"{name}_ms"]["p50"] <= stages[f"{name}_ms"]["p90"], name
    for earlier, later in CAUSAL_PAIRS:
        for q in ("p50", "p90"):
            assert stages[f"{earlier}_ms"][q] <= stages[f"{later}_ms"][q], (earlier, later, q, stages)

    end_to_end = result["end_to_end_ms"]
    assert end_to_end["p50"] == stages["client_caller_woke_ms"]["p50"]  # every record was complete
    assert end_to_end["p50"] <= end_to_end["p99"] <= end_to_end["max"]
    table = captured.err.splitlines()
    for name in names:  # stderr is no terminal here: one plain line per stage
        assert any(line.startswith(f"{name}: p50 ") for line in table), name
