"""The committed stubs must match proto/: regenerate into a temporary directory and compare."""

from __future__ import annotations

from pathlib import Path

from logbroker_client import proto_gen


def test_committed_stubs_are_fresh(tmp_path: Path) -> None:
    proto_gen.generate(tmp_path)
    stale = [
        path.name
        for path in sorted(tmp_path.iterdir())
        if path.read_text() != (proto_gen.OUTPUT_DIR / path.name).read_text()
    ]
    assert not stale, f"stubs are stale against proto/: {stale}; run `make proto` and commit the result"
