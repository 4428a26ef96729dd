"""Prints which README blocks ran and which were skipped, and why, at the end of the run (even with -q)."""

from __future__ import annotations

import pytest

from tests.docs.readme_doc import REPORT


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if REPORT:
        terminalreporter.section("README blocks")
        for line in REPORT:
            terminalreporter.write_line(line)
