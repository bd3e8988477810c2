"""Fleet rollout of a new EIF across 10 container hosts vs 1 (target: at most 3x the single-host time).

Each host is an unprivileged systemd container from the local base image on the host network, with
its own gateway port. site.yml converges the fleet (not timed); then rollout.yml rolls it to a new
image in two batches (serial 50 %) and is timed. Figures are printed, never asserted; the slowest
tasks of the 10-host rollout show what dominates.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
IMAGE = "nitro-ansible/systemd:bookworm"
KMS_PORT = 44566
GATEWAY_BASE_PORT = 19000


def docker(*args: str) -> str:
    return subprocess.run(["docker", *args], capture_output=True, text=True, check=True).stdout.strip()


def start_hosts(count: int) -> list[str]:
    names = [f"nitro-bench-{i}" for i in range(1, count + 1)]
    for name in names:
        subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
        docker(
            "run", "-d", "--name", name, "--hostname", name, "--network", "host", "--cap-add", "SYS_ADMIN",
            "--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp:exec",
            "-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro", "-e", "container=docker", IMAGE, "/sbin/init",
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


def playbook(inventory_path: Path, *args: str) -> tuple[float, str]:
    env = dict(
        os.environ, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_NOCOLOR="1", PROFILE_TASKS_TASK_OUTPUT_LIMIT="8"
    )
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
    if result.returncode != 0:
        print(result.stdout[-6000:], result.stderr[-2000:], sep="\n")
        raise SystemExit(f"{args[0]} failed with exit code {result.returncode}")
    return elapsed, result.stdout


def rollout_seconds(count: int) -> tuple[float, str]:
    names = start_hosts(count)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            inv = inventory(names, Path(tmp))
            converge, _ = playbook(inv, "site.yml")
            print(f"  {count} host(s): site.yml converged in {converge:.0f} s (not the figure)", flush=True)
            version = f"bench-{count}-{int(time.time())}"
            return playbook(inv, "playbooks/rollout.yml", "-e", f"enclave_image_version={version}",
                            "-e", "rollout_batch_size=50%")  # fmt: skip
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
    one, _ = rollout_seconds(1)
    print(f"rollout to a new EIF, 1 host: {one:.0f} s", flush=True)
    ten, out = rollout_seconds(10)
    print(f"rollout to a new EIF, 10 hosts (2 batches of 5): {ten:.0f} s")
    print(f"ratio 10 hosts / 1 host: {ten / one:.2f}x (target <= 3x)")
    slowest = re.findall(r"^(.+?) -+ (\d+\.\d+)s$", out, flags=re.MULTILINE)[:8]
    print("slowest tasks of the 10-host rollout (what dominates):")
    for name, seconds in slowest:
        print(f"  {float(seconds):6.1f} s  {name.strip()}")


if __name__ == "__main__":
    main()
