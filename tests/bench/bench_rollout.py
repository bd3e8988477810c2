"""Fleet rollout of a new EIF across 50 emulated hosts vs 1 (targets: <= 4x the single-host time,
<= 3 cpu-s per host, idle host services <= 0.5 % of a core per host).

Each host is a container from the local base image on the host network, with its own gateway port. To
fit 50 on 2 cores they are lighter than a systemd container: no systemd and no journald (PID 1 sleeps
under docker's init, which reaps orphans), so supervised_service runs every service under its restart
loop, as on any host without systemd; the roles, the services and the enclave app are the same.
BENCH_ROLLOUT_HOSTS sets the fleet size (default 50), BENCH_ROLLOUT_SYSTEMD=1 brings back systemd
hosts. Set-up (not timed): site.yml converges the single host, which is then committed as an image; the
fleet's hosts start from it (its venv, wheelhouse, EIF and service files: converging 50 fresh hosts took
longer than 17 min on 2 cores), and site.yml converges them too, which then only gives each host its own
settings and starts its services and enclave. Then rollout.yml rolls the fleet to a new image in two
batches (serial 50 %) and is timed. Then the fleet idles for IDLE_S seconds and the CPU (utime + stime, reaped
children included) of each host's processes is summed. Figures are printed, never asserted. What
dominates is shown two ways: where the CPU went while each rollout ran (2 cores shared by the
controller, the container hosts and their enclaves), and the slowest tasks of the fleet's rollout.
"""

from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
IMAGE = "nitro-ansible/systemd:bookworm"
# The single host, converged by site.yml, committed: the fleet's hosts start from it (see converge_fleet).
CONVERGED_IMAGE = "nitro-bench-rollout/converged:latest"
KMS_PORT = 44566
GATEWAY_BASE_PORT = 19000
HOSTS = int(os.environ.get("BENCH_ROLLOUT_HOSTS", "50"))
SYSTEMD = os.environ.get("BENCH_ROLLOUT_SYSTEMD", "") == "1"
IDLE_S = float(os.environ.get("BENCH_ROLLOUT_IDLE_S", "30"))


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True).stdout.strip()


# (target, figure, goal) rows for `make bench`'s summary.
SUMMARY: list[tuple[str, str, str]] = []


def start_hosts(count: int, image: str = IMAGE) -> list[str]:
    names = [f"nitro-bench-{i}" for i in range(1, count + 1)]
    # Without systemd, docker's init (tini) is PID 1: it reaps the detached enclave processes that exit.
    command = [image, "/sbin/init"] if SYSTEMD else ["--init", image, "sleep", "infinity"]
    for name in names:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        docker(
            "run", "-d", "--name", name, "--hostname", name, "--network", "host", "--cap-add", "SYS_ADMIN",
            "--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp:exec",
            "-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro", "-e", "container=docker", *command,
        )  # fmt: skip
    return names


def inventory(names: list[str], directory: Path) -> Path:
    hosts = {
        name: {
            "ansible_connection": "community.docker.docker",
            "ansible_python_interpreter": "/usr/bin/python3",
            "vsock_tokenizer_gateway_listen": f"127.0.0.1:{GATEWAY_BASE_PORT + i}",
        }
        for i, name in enumerate(names, start=1)
    }
    data = {
        "all": {
            "vars": {
                "kms_enclave_policy_local_port": KMS_PORT,
                "nitro_allocator_cpu_count": 1,
                "nitro_enclave_cpu_count": 1,
                "enclave_image_build_dir": str(REPO / ".cache" / "enclave-build" / "bench"),
            },
            "children": {"enclave_hosts": {"hosts": hosts}},
        }
    }
    path = directory / "hosts.yml"
    path.write_text(yaml.safe_dump(data))
    return path


# Who used the CPU while a playbook ran, by process family (Linux /proc; children count once reaped). Only
# this bench's processes count: the container hosts' (below their containerd shims: services, enclaves,
# docker exec module runs) and its local KMS; the machine is shared with other jobs.
CPU_FAMILIES = (
    ("host services (supervisor, gateway, vsock-proxy, restart loops)",
     ("enclave-supervisor", "enclave-tokenizer", "vsock-proxy", "supervise-")),
    ("new enclaves (boot and app)",
     ("nitro_emulator.enclave_process", "nitro_emulator.isolation", "enclave_tokenizer.server")),
    ("module runs inside the hosts (docker exec, reaped by the shim) and the hosts' init", ("",)),
)  # fmt: skip


def _processes() -> dict[int, tuple[float, str, int]]:
    ticks = os.sysconf("SC_CLK_TCK")
    seen: dict[int, tuple[float, str, int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        seen[int(entry.name)] = (sum(int(f) for f in fields[11:15]) / ticks, cmdline, int(fields[1]))
    return seen


def descendants(roots: set[int], processes: dict[int, tuple[float, str, int]]) -> set[int]:
    """``roots`` and every process below them."""
    found, frontier = set(roots), set(roots)
    while frontier:
        frontier = {pid for pid, (_, _, ppid) in processes.items() if ppid in frontier and pid not in found}
        found |= frontier
    return found


def idle_cpu(hosts: dict[str, set[int]], seconds: float) -> dict[str, float]:
    """CPU seconds each host's processes (the given roots and their descendants; processes that start
    meanwhile, such as a nitro-cli call, count once reaped by their parent) use over ``seconds`` of idling."""
    before = _processes()
    members = {host: descendants(roots, before) for host, roots in hosts.items()}
    time.sleep(seconds)
    after = _processes()
    return {
        host: sum(max(after[pid][0] - before[pid][0], 0.0) for pid in pids if pid in after and pid in before)
        for host, pids in members.items()
    }


def container_roots(names: list[str]) -> dict[str, set[int]]:
    """Each container host's PID 1 as the host sees it (its services run below it)."""
    return {name: {int(docker("inspect", "--format", "{{.State.Pid}}", name))} for name in names}


def idle_report(per_host: dict[str, float], seconds: float) -> list[str]:
    values = sorted(per_host.values())
    mean = sum(values) / len(values)
    return [
        f"idle host services over {seconds:.0f} s: {100 * mean / seconds:.2f} % of a core per host on average "
        f"(max {100 * values[-1] / seconds:.2f} %, {len(values)} host(s); target <= 0.5 %)"
    ]


def bench_processes(names: list[str], processes: dict[int, tuple[float, str, int]]) -> set[int]:
    """The container hosts' processes (their shims and below) and the bench's local KMS."""
    ids = [docker("inspect", "--format", "{{.Id}}", name) for name in names]
    shims = {pid for pid, (_, cmd, _) in processes.items() if "containerd-shim" in cmd and any(i in cmd for i in ids)}
    kms = {pid for pid, (_, cmd, _) in processes.items() if "nitro-local-aws" in cmd and f"--port {KMS_PORT}" in cmd}
    return descendants(shims | kms, processes)


def _family(cmdline: str) -> str:
    if "nitro-local-aws" in cmdline:
        return "local KMS on the controller"
    return next(f for f, marks in CPU_FAMILIES if any(m in cmdline for m in marks))


def _command_key(cmdline: str) -> str:
    """A short name for a process: its program and the first argument that tells what it runs."""
    words = [w for w in cmdline.split() if not w.startswith("-")][:3]
    return " ".join(Path(w).name if "/" in w else w for w in words)[:60] or "?"


def cpu_report(
    before: dict[int, tuple[float, str, int]], controller_seconds: float, wall: float, names: list[str]
) -> tuple[list[str], float]:
    """Lines of where the CPU went, and the CPU seconds of the controller and the hosts in all.

    A process's CPU counts in its parent once reaped (cutime). A process that was there before and is
    gone after has been reaped into its parent (for detached enclave processes: the container's init)
    with all it used before the run too: that earlier part is taken off again, from the reaper's family.
    """
    after = _processes()
    used = {family: 0.0 for family, _ in CPU_FAMILIES}
    used["local KMS on the controller"] = 0.0
    by_command: dict[str, float] = {}
    for pid in bench_processes(names, after):
        seconds, cmdline, _ = after[pid]
        same = pid in before and before[pid][1] == cmdline
        delta = seconds - before[pid][0] if same else seconds
        used[_family(cmdline)] += delta
        by_command[_command_key(cmdline)] = by_command.get(_command_key(cmdline), 0.0) + delta
    for pid in bench_processes(names, before) - set(after):
        seconds, _, ppid = before[pid]
        reaper = before.get(ppid, after.get(ppid, (0.0, "", 0)))[1]
        used[_family(reaper)] -= seconds
        by_command[_command_key(reaper)] = by_command.get(_command_key(reaper), 0.0) - seconds
    rows = [("ansible-playbook on the controller (forks, docker CLI, local modules, EIF build)", controller_seconds)]
    rows += sorted(used.items(), key=lambda row: -row[1])
    capacity = wall * (os.cpu_count() or 1)
    lines = [
        f"  {cpu_s:6.1f} cpu-s ({100 * cpu_s / capacity:4.1f} % of {capacity:.0f})  {name}" for name, cpu_s in rows
    ]
    lines.append("  in the hosts, by process (reaped children in their parent):")
    top = sorted(by_command.items(), key=lambda row: -row[1])[:8]
    lines += [f"    {cpu_s:6.1f} cpu-s  {name}" for name, cpu_s in top]
    engine = sum(after[pid][0] - before[pid][0] for pid in _engine(after) if pid in before)
    lines.append(
        f"  {engine:6.1f} cpu-s  docker engine (dockerd, containerd: the hosts' docker exec; machine-wide, other "
        "jobs' containers too: not in the figure)"
    )
    return lines, sum(cpu_s for _, cpu_s in rows)


def _engine(processes: dict[int, tuple[float, str, int]]) -> set[int]:
    return {pid for pid, (_, cmd, _) in processes.items() if cmd.split(" ", 1)[0].rsplit("/", 1)[-1] in ENGINE}


ENGINE = ("dockerd", "containerd")


def playbook(
    inventory_path: Path, *args: str, cpu: list[str] | None = None, names: list[str] | None = None
) -> tuple[float, str, float]:
    """Runs a playbook: wall seconds, its output, and (with ``cpu``) the CPU seconds it cost in all."""
    env = dict(
        os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1", PROFILE_TASKS_TASK_OUTPUT_LIMIT="8"
    )
    before = _processes() if cpu is not None else {}
    children_before = resource.getrusage(resource.RUSAGE_CHILDREN)
    start = time.perf_counter()
    result = subprocess.run(
        [str(BIN / "ansible-playbook"), "-i", str(inventory_path), *args],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        check=False,
    )
    elapsed = time.perf_counter() - start
    total = 0.0
    if cpu is not None:
        children = resource.getrusage(resource.RUSAGE_CHILDREN)
        controller = sum(getattr(children, f) - getattr(children_before, f) for f in ("ru_utime", "ru_stime"))
        cpu[:], total = cpu_report(before, controller, elapsed, names or [])
    if result.returncode != 0:
        print(result.stdout[-6000:], result.stderr[-2000:], sep="\n")
        raise SystemExit(f"{args[0]} failed with exit code {result.returncode}")
    return elapsed, result.stdout, total


def rollout_seconds(count: int) -> tuple[float, str, list[str], float, dict[str, float]]:
    """Rollout wall time, its output, where the CPU went, the CPU seconds it took in all, and each host's
    idle CPU afterwards."""
    # The fleet starts from the converged single host (its venv, wheelhouse, EIF and services' files):
    # site.yml then only gives each host its own settings and starts its services and enclave.
    names = start_hosts(count, IMAGE if count == 1 else CONVERGED_IMAGE)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            inv = inventory(names, Path(tmp))
            converge, _, _ = playbook(inv, "site.yml")
            print(f"  {count} host(s): site.yml converged in {converge:.0f} s (not the figure)", flush=True)
            if count == 1:
                docker("commit", names[0], CONVERGED_IMAGE)
            version = f"bench-{count}-{int(time.time())}"
            cpu: list[str] = []
            elapsed, out, total = playbook(inv, "playbooks/rollout.yml", "-e", f"enclave_image_version={version}",
                                           "-e", "rollout_batch_size=50%", cpu=cpu, names=names)  # fmt: skip
            idle = idle_cpu(container_roots(names), IDLE_S)
            return elapsed, out, cpu, total, idle
    finally:
        for name in names:
            subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        env = dict(os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"))
        subprocess.run(
            [
                str(BIN / "ansible-playbook"),
                "tests/molecule/cleanup.yml",
                "-e",
                f"kms_enclave_policy_local_port={KMS_PORT}",
            ],
            cwd=REPO,
            env=env,
            capture_output=True,
            check=False,
        )


def main() -> None:
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}", flush=True)
    try:
        one, _, one_cpu, one_total, _ = rollout_seconds(1)
        print(f"rollout to a new EIF, 1 host: {one:.0f} s; CPU while it ran:", *one_cpu, sep="\n", flush=True)
        many, out, many_cpu, many_total, idle = rollout_seconds(HOSTS)
    finally:
        subprocess.run(["docker", "image", "rm", "-f", CONVERGED_IMAGE], capture_output=True, check=False)
    half = (HOSTS + 1) // 2
    print(f"rollout to a new EIF, {HOSTS} hosts (2 batches of {half}): {many:.0f} s; CPU while it ran:", *many_cpu,
          sep="\n")  # fmt: skip
    print(f"ratio {HOSTS} hosts / 1 host: {many / one:.2f}x (target <= 4x)")
    print(f"CPU per host: {many_total / HOSTS:.2f} cpu-s (1 host: {one_total:.2f}; target <= 3)")
    print(*idle_report(idle, IDLE_S), sep="\n")
    idle_share = 100 * sum(idle.values()) / len(idle) / IDLE_S
    SUMMARY.extend([
        (f"rollout {HOSTS} hosts / 1 host", f"{many / one:.2f}x", "<= 4x"),
        (f"rollout CPU per host ({HOSTS} hosts)", f"{many_total / HOSTS:.2f} cpu-s", "<= 3 cpu-s"),
        (f"idle host services ({HOSTS} hosts)", f"{idle_share:.2f} % of a core", "<= 0.5 %"),
    ])  # fmt: skip
    print(f"load average after: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    slowest = re.findall(r"^(.+?) -+ (\d+\.\d+)s$", out, flags=re.MULTILINE)[:8]
    print(f"slowest tasks of the {HOSTS}-host rollout (wall time of each task across its batch):")
    for name, seconds in slowest:
        print(f"  {float(seconds):6.1f} s  {name.strip()}")


if __name__ == "__main__":
    main()
