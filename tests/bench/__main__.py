"""`make bench`: runs every tests/bench/bench_*.py `main()` in turn; each prints its own figures."""

from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path


def main(selected: list[str]) -> int:
    names = sorted(p.stem for p in Path(__file__).parent.glob("bench_*.py"))
    if selected:
        names = [n for n in names if any(s in n for s in selected)]
    rows: list[tuple[str, str, str]] = []
    for name in names:
        print(f"\n=== {name} ===", flush=True)
        module = importlib.import_module(f"tests.bench.{name}")
        module.main()
        rows += getattr(module, "SUMMARY", [])  # (target, figure, goal) rows a benchmark filled in
    if rows:
        # The machine is shared: every figure is read next to the load it was measured under.
        load = " ".join(f"{x:.2f}" for x in os.getloadavg())
        print(f"\n=== summary (load average {load} on {os.cpu_count()} cores) ===")
        width = max(len(target) for target, _, _ in rows)
        for target, figure, goal in rows:
            print(f"{target:<{width}}  {figure:>22}  (target {goal})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
