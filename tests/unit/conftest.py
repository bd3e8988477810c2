"""Unit-test hooks: the fuzz suites' counts (fuzz_counts) in the terminal summary of `make test`."""

from __future__ import annotations

from typing import Any

import fuzz_counts


def pytest_terminal_summary(terminalreporter: Any, exitstatus: int, config: Any) -> None:
    lines = fuzz_counts.summary_lines()
    if lines:
        terminalreporter.section("fuzz counts (tried / clean)")
        for line in lines:
            terminalreporter.write_line(line)
