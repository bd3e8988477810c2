"""Fixtures shared by the whole suite: real servers, never in-process mocks, for integration tests."""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
# A nitro-local-aws started by a test without --state-file keeps its keys in memory: never the host's
# /var/lib/nitro-local-aws/state.json, which tests running side by side would otherwise share.
os.environ.setdefault("NITRO_LOCAL_AWS_STATE", "")
VENV_BIN = Path(sys.executable).parent
PYTHON_BASE_IMAGE = "nitro-ansible/python:3.11-bookworm"
SYSTEMD_BASE_IMAGE = "nitro-ansible/systemd:bookworm"


def attested_key_policy(role_arn: str, pcr0: str, account: str = "123456789012") -> dict:
    """A key policy: the account root administers, `role_arn` may Decrypt only with an attestation
    document whose PCR0 is `pcr0` (the seed's KMS policy)."""
    return {
        "Version": "2012-10-17",
        "Statement": [
            {
                "Sid": "Admin",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{account}:root"},
                "Action": "kms:*",
                "Resource": "*",
            },
            {
                "Sid": "EnclaveDecrypt",
                "Effect": "Allow",
                "Principal": {"AWS": role_arn},
                "Action": "kms:Decrypt",
                "Resource": "*",
                "Condition": {"StringEqualsIgnoreCase": {"kms:RecipientAttestation:PCR0": pcr0}},
            },
        ],
    }


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


def wait_for_port(host: str, port: int, timeout: float = 30.0, proc: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode} before listening on {host}:{port}")
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.1)
    raise TimeoutError(f"nothing listened on {host}:{port} within {timeout} s")


def start_systemd_host(name: str) -> None:
    """A fleet host for a playbook: a systemd container from the local base image, on the host network
    (its gateway and the controller's local KMS are on loopback). Replaces a leftover of the same name."""
    subprocess.run(["docker", "rm", "-f", name], capture_output=True, check=False)
    subprocess.run(
        ["docker", "run", "-d", "--name", name, "--hostname", name, "--network", "host", "--cap-add", "SYS_ADMIN",
         "--tmpfs", "/run", "--tmpfs", "/run/lock", "--tmpfs", "/tmp:exec",
         "-v", "/sys/fs/cgroup:/sys/fs/cgroup:ro", "-e", "container=docker", SYSTEMD_BASE_IMAGE, "/sbin/init"],
        check=True, capture_output=True,
    )  # fmt: skip


def one_host_inventory(
    path: Path, host: str, kms_port: int, group_vars: dict | None = None, host_vars: dict | None = None
) -> Path:
    """An inventory of that container as the only enclave host, with the controller's local KMS on its own
    port and its keys in a state file next to the inventory (never the machine's /var/lib: a later run
    starts clean), and one enclave CPU as on our 2-vCPU machines."""
    import yaml

    base = {
        "kms_enclave_policy_local_port": kms_port,
        "kms_enclave_policy_local_state_file": str(path.parent / "local-aws-state.json"),
        "nitro_allocator_cpu_count": 1,
        "nitro_enclave_cpu_count": 1,
    }
    connection = {"ansible_connection": "community.docker.docker", "ansible_python_interpreter": "/usr/bin/python3"}
    hosts = {host: {**connection, **(host_vars or {})}}
    inventory = {"all": {"vars": {**base, **(group_vars or {})}, "children": {"enclave_hosts": {"hosts": hosts}}}}
    path.write_text(yaml.safe_dump(inventory))
    return path


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@contextlib.contextmanager
def running_local_aws(workdir: Path, env: dict[str, str] | None = None, *extra: str) -> Iterator[str]:
    """A real `nitro-local-aws` (moto server + project extensions) on a free loopback port; yields its URL.

    Each test package starts its own (with its own environment: emulator home, fault file, recorder),
    since they reset or instrument the server in ways that would disturb each other.
    """
    port = free_port()
    # Never the host's /var/lib/nitro-local-aws: each server keeps its keys in its own work directory.
    state = () if "--state-file" in extra else ("--state-file", str(workdir / f"local-aws-{port}.state.json"))
    with (workdir / f"local-aws-{port}.log").open("wb") as log:
        proc = subprocess.Popen(
            [str(VENV_BIN / "nitro-local-aws"), "--port", str(port), *state, *extra],
            stdout=log,
            stderr=subprocess.STDOUT,
            cwd=workdir,
            env=env,
        )
    try:
        wait_for_port("127.0.0.1", port, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """A reachable Docker engine with the project's base images; provisions them if needed."""
    if shutil.which("docker") is None and os.geteuid() != 0:
        pytest.fail("docker is not installed and this is not root: run `make setup` first")
    subprocess.run([str(REPO_ROOT / "scripts" / "base-images.sh")], check=True)
    return PYTHON_BASE_IMAGE
