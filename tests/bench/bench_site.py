"""Idempotent re-run of site.yml on the embedded default (localhost, emulated).

Target: the second run takes ≤ 20 s and reports changed=0. Converges first (not timed), then times
one re-run and prints the slowest tasks (ansible.posix.profile_tasks), which is what dominates.
Figures are printed, never asserted.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = [str(Path(sys.executable).parent / "ansible-playbook"), "site.yml"]


def run_site() -> tuple[float, str]:
    env = dict(
        os.environ,
        ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
        ANSIBLE_NOCOLOR="1",
        PROFILE_TASKS_TASK_OUTPUT_LIMIT="all",  # every task in the recap, not the top 20
    )
    start = time.perf_counter()
    result = subprocess.run(PLAYBOOK, cwd=REPO, env=env, capture_output=True, text=True, check=False)
    elapsed = time.perf_counter() - start
    if result.returncode != 0:
        print(result.stdout[-4000:], result.stderr[-2000:], sep="\n")
        raise SystemExit(f"site.yml failed with exit code {result.returncode}")
    return elapsed, result.stdout


def main() -> None:
    converge, _ = run_site()
    print(f"converge run: {converge:.1f} s (not the figure)")
    elapsed, out = run_site()
    recap = re.search(r"localhost\s*:\s*ok=(\d+)\s+changed=(\d+)", out)
    ok, changed = (int(recap.group(1)), int(recap.group(2))) if recap else (-1, -1)
    print(f"idempotent re-run of site.yml: {elapsed:.1f} s (target <= 20 s), tasks ok={ok}, changed={changed}")
    tasks = [(name.strip(), float(seconds)) for name, seconds in re.findall(r"^(.+?) -+ (\d+\.\d+)s$", out, re.M)]
    if tasks:
        total = sum(seconds for _, seconds in tasks)
        print(f"recap lists {len(tasks)} task timings, {total:.1f} s in all; slowest:")
        for name, seconds in tasks[:8]:
            print(f"  {seconds:5.2f} s  ({100 * seconds / total:4.1f} %)  {name}")
        print(
            f"what dominates: the slowest task is {100 * tasks[0][1] / total:.0f} % of task time; the mean task "
            f"takes {total / len(tasks):.2f} s, so the count of tasks (module start-ups) sets the total"
        )


if __name__ == "__main__":
    main()
