"""Property tests: RaftLog always reads back the log a simple model says it holds, whatever interleaving
of appends, truncations, resets and Ready hand-offs happens; and majority arithmetic is right."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from logbroker.raft.log import RaftLog
from logbroker.raft.membership import Membership
from logbroker.raft.quorum import VoteResult, committed_offset, vote_result
from logbroker.raft.types import Entry, EntryKind, Ready
from tests.raft.sim.storage import MemoryLogStorage

MEMBERSHIP = Membership.of([1, 2, 3])
OPERATIONS = st.lists(
    st.tuples(st.sampled_from(["append", "truncate", "reset", "hand_out", "apply"]), st.integers(0, 10_000)),
    max_size=60,
)


class LogModel:
    def __init__(self) -> None:
        self.first = 0
        self.prev_term = 0
        self.entries: list[Entry] = []

    @property
    def last(self) -> int:
        return self.entries[-1].last_offset if self.entries else self.first - 1

    @property
    def last_term(self) -> int:
        return self.entries[-1].term if self.entries else self.prev_term

    def term_at(self, offset: int) -> int | None:
        if offset == self.first - 1:
            return self.prev_term
        for entry in self.entries:
            if entry.base_offset <= offset <= entry.last_offset:
                return entry.term
        return None


@settings(max_examples=300, deadline=None)
@given(OPERATIONS)
def test_the_log_reads_back_exactly_what_was_appended_whatever_the_ready_interleaving(
    operations: list[tuple[str, int]],
) -> None:
    storage = MemoryLogStorage(MEMBERSHIP)
    log = RaftLog(storage)
    model = LogModel()
    outstanding: Ready | None = None
    for name, value in operations:
        if name == "append":
            term = model.last_term + value % 2 if model.last_term else 1
            size = 1 + value % 4
            entry = Entry(model.last + 1, model.last + size, term, EntryKind.DATA, str(value).encode())
            log.append([entry])
            model.entries.append(entry)
        elif name == "truncate" and model.entries:
            index = value % len(model.entries)
            log.truncate(model.entries[index].base_offset)
            del model.entries[index:]
        elif name == "reset":
            start = model.last + 1 + value % 5
            term = model.last_term + 1
            log.reset(start, term, MEMBERSHIP)
            model.first, model.prev_term, model.entries = start, term, []
        elif name == "hand_out" and outstanding is None:
            reset, truncate_from, entries = log.take_unstable()
            outstanding = Ready(reset_log=reset, truncate_from=truncate_from, entries=entries)
        elif name == "apply" and outstanding is not None:
            storage.write_ready(outstanding)
            storage.fsync()
            log.advance(outstanding.reset_log)
            outstanding = None
        assert log.first_offset == model.first
        assert log.last_offset == model.last
        for offset in range(model.first - 1, model.last + 2):
            assert log.term_at(offset) == model.term_at(offset), (offset, name)
        if model.entries:
            assert log.entries(model.first, 1 << 30) == model.entries
    # Once everything is handed out and applied, storage holds exactly the model's log.
    if outstanding is not None:
        storage.write_ready(outstanding)
        log.advance(outstanding.reset_log)
    reset, truncate_from, entries = log.take_unstable()
    storage.write_ready(Ready(reset_log=reset, truncate_from=truncate_from, entries=entries))
    log.advance(reset)
    assert (storage.first_offset, storage.last_offset) == (model.first, model.last)
    if model.entries:
        assert storage.entries(model.first, 1 << 30) == model.entries


@given(st.dictionaries(st.integers(1, 7), st.integers(-1, 50), min_size=1))
def test_the_commit_offset_is_the_highest_offset_a_majority_of_voters_hold(matches: dict[int, int]) -> None:
    voters = set(matches)
    commit = committed_offset(voters, lambda n: matches[n])
    assert sum(1 for m in matches.values() if m >= commit) > len(voters) // 2
    assert sum(1 for m in matches.values() if m >= commit + 1) <= len(voters) // 2


@given(st.integers(1, 7), st.data())
def test_an_election_is_won_only_with_a_majority_and_lost_only_when_a_majority_is_impossible(
    voter_count: int, data: st.DataObject
) -> None:
    voters = list(range(voter_count))
    votes = data.draw(st.dictionaries(st.sampled_from(voters), st.booleans()))
    granted = sum(votes.values())
    rejected = len(votes) - granted
    result = vote_result(voters, votes)
    majority = voter_count // 2 + 1
    assert (result is VoteResult.WON) == (granted >= majority)
    assert (result is VoteResult.LOST) == (granted < majority and voter_count - rejected < majority)
