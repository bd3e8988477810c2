"""Fixtures shared by the whole suite: real servers, never in-process mocks, for integration tests."""

from __future__ import annotations

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
VENV_BIN = Path(sys.executable).parent
PYTHON_BASE_IMAGE = "nitro-ansible/python:3.11-bookworm"
SYSTEMD_BASE_IMAGE = "nitro-ansible/systemd:bookworm"


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


@pytest.fixture(scope="session")
def repo_root() -> Path:
    return REPO_ROOT


@pytest.fixture(scope="session")
def local_aws(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `nitro-local-aws` (moto server + project extensions) on a loopback port; yields its URL."""
    port = free_port()
    log = tmp_path_factory.mktemp("local-aws") / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [str(VENV_BIN / "nitro-local-aws"), "--port", str(port)],
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        wait_for_port("127.0.0.1", port, proc=proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@pytest.fixture
def aws_env(local_aws: str, monkeypatch: pytest.MonkeyPatch) -> str:
    """Environment for boto3 clients against the local endpoint (dummy credentials, no real AWS)."""
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing")
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return local_aws


@pytest.fixture(scope="session")
def docker_engine() -> str:
    """A reachable Docker engine with the project's base images; provisions them if needed."""
    if shutil.which("docker") is None and os.geteuid() != 0:
        pytest.fail("docker is not installed and this is not root: run `make setup` first")
    subprocess.run([str(REPO_ROOT / "scripts" / "base-images.sh")], check=True)
    return PYTHON_BASE_IMAGE
