"""Tried / clean counts of the fuzz suites, per surface; conftest.py prints them in the terminal summary.

A test calls ``tried(surface)`` for every generated input and ``clean(surface)`` once the input was
handled as promised (accepted and consistent, or refused with a clear message). Both count the
examples hypothesis shrinks with, so a failing property shows as tried > clean."""

from __future__ import annotations

from collections import Counter

TRIED: Counter[str] = Counter()
CLEAN: Counter[str] = Counter()


def tried(surface: str) -> None:
    TRIED[surface] += 1


def clean(surface: str) -> None:
    CLEAN[surface] += 1


def summary_lines() -> list[str]:
    return [f"{surface}: {TRIED[surface]} tried, {CLEAN[surface]} clean" for surface in sorted(TRIED)]
