"""Idempotent re-run of site.yml on the embedded default (localhost, emulated).

Target: the second run takes ≤ 10 s and reports changed=0. Converges first (not timed), then times
one re-run and prints its CPU seconds (the playbook and every module run it started: on a shared
machine the figure that does not depend on the load) and the slowest tasks (ansible.posix.profile_tasks),
which is what dominates. Then the host idles and the CPU of its services (supervisor, gateway,
vsock-proxy, their restart loops, the enclave) is measured. Figures are printed, never asserted.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

from .bench_rollout import IDLE_S, _processes, idle_cpu, idle_report

REPO = Path(__file__).resolve().parents[2]
PLAYBOOK = [str(Path(sys.executable).parent / "ansible-playbook"), "site.yml"]
# What roles nitro_cli and supervised_service install on a host (localhost here): the services' venv,
# and their restart loops where systemd is not PID 1.
HOST_SERVICE_MARKS = ("/opt/nitro-enclaves/venv/bin/", "/usr/local/sbin/supervise-nitro-enclave",
                      "/usr/local/sbin/supervise-enclave-tokenizer")  # fmt: skip


# (target, figure, goal) rows for `make bench`'s summary.
SUMMARY: list[tuple[str, str, str]] = []


def local_host_services() -> set[int]:
    """The localhost's host services (the local KMS is the controller's, not the host's; container hosts of
    another bench, in their own PID namespace, are not this host)."""
    ours = os.readlink("/proc/self/ns/pid")

    def here(pid: int) -> bool:
        try:
            return os.readlink(f"/proc/{pid}/ns/pid") == ours
        except OSError:
            return False

    return {
        pid
        for pid, (_, cmdline, _) in _processes().items()
        if any(mark in cmdline for mark in HOST_SERVICE_MARKS) and "nitro-local-aws" not in cmdline and here(pid)
    }


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


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
        # The failed task first (the recap of every task's time would fill the tail), then the tail.
        failed_at = max(result.stdout.find("fatal: ["), 0)
        print(result.stdout[failed_at : failed_at + 3000], result.stdout[-1500:], result.stderr[-2000:], sep="\n")
        raise SystemExit(f"site.yml failed with exit code {result.returncode}")
    return elapsed, result.stdout


def main() -> None:
    converge, _ = run_site()
    print(f"converge run: {converge:.1f} s (not the figure); load average {loadavg()}")
    children = resource.getrusage(resource.RUSAGE_CHILDREN)
    elapsed, out = run_site()
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = sum(getattr(after, f) - getattr(children, f) for f in ("ru_utime", "ru_stime"))
    recap = re.search(r"localhost\s*:\s*ok=(\d+)\s+changed=(\d+)", out)
    ok, changed = (int(recap.group(1)), int(recap.group(2))) if recap else (-1, -1)
    SUMMARY.append(("site.yml idempotent re-run", f"{elapsed:.1f} s, changed={changed}", "<= 10 s, changed=0"))
    print(
        f"idempotent re-run of site.yml: {elapsed:.1f} s (target <= 10 s), {cpu:.1f} cpu-s, tasks ok={ok}, "
        f"changed={changed}; load average {loadavg()} on {os.cpu_count()} cores"
    )
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
    services = local_host_services()
    if services:
        idle = idle_cpu({"localhost": services}, IDLE_S)
        print(*idle_report(idle, IDLE_S), sep="\n")
        SUMMARY.append(
            ("idle host services, localhost", f"{100 * idle['localhost'] / IDLE_S:.2f} % of a core", "<= 0.5 %")
        )


if __name__ == "__main__":
    main()
