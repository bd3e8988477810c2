"""Fixtures for the EC2 enclave tests: a dedicated real `nitro-local-aws` and ways to drive Ansible at it.

The EC2 tests get their own server (not the shared `local_aws`) because they reset moto's state between
tests and turn on moto's request recorder, which writes to a file chosen when the server starts; both
would disturb other pieces' tests sharing the session server.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs

import boto3
import pytest

from tests.conftest import REPO_ROOT, VENV_BIN, running_local_aws

REGION = "us-east-1"
AMI = "ami-12c6146b"  # any id works: moto does not validate AMIs unless told to
# Dummies long enough that Ansible's no_log masking of the secret cannot hit ordinary output.
DUMMY_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-access-key",
    "AWS_SECRET_ACCESS_KEY": "testing-secret-key",
    "AWS_REGION": REGION,
    "AWS_DEFAULT_REGION": REGION,
}


@dataclass
class Ec2Endpoint:
    url: str
    recording: Path

    def _post(self, path: str) -> bytes:
        request = urllib.request.Request(f"{self.url}{path}", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=10) as answer:
            return answer.read()

    def reset(self) -> None:
        self._post("/moto-api/reset")

    def client(self, service: str) -> Any:
        return boto3.client(
            service,
            region_name=REGION,
            endpoint_url=self.url,
            aws_access_key_id=DUMMY_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=DUMMY_ENV["AWS_SECRET_ACCESS_KEY"],
        )

    def start_recording(self) -> None:
        self._post("/moto-api/recorder/reset-recording")
        self._post("/moto-api/recorder/start-recording")

    def stop_recording(self) -> list[str]:
        """Stop moto's recorder; return the AWS actions (e.g. 'ec2:DescribeInstances') it saw, in order."""
        self._post("/moto-api/recorder/stop-recording")
        actions = []
        for line in self.recording.read_text().splitlines():
            entry = json.loads(line)
            body = entry.get("body") or ""
            if entry.get("body_encoded"):
                body = base64.b64decode(body).decode()
            action = parse_qs(body).get("Action", ["?"])[0]
            service = entry["headers"].get("Authorization", "").split("/")[3:4] or ["?"]
            actions.append(f"{service[0]}:{action}")
        return actions


@pytest.fixture(scope="session")
def ec2_endpoint(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Ec2Endpoint]:
    workdir = tmp_path_factory.mktemp("ec2-local-aws")
    recording = workdir / "recording.jsonl"
    env = {**os.environ, "MOTO_RECORDER_FILEPATH": str(recording)}
    with running_local_aws(workdir, env) as url:
        yield Ec2Endpoint(url, recording)


@pytest.fixture
def ec2_aws(ec2_endpoint: Ec2Endpoint, monkeypatch: pytest.MonkeyPatch) -> Ec2Endpoint:
    """A clean local endpoint (moto state reset) and dummy AWS credentials in the environment."""
    ec2_endpoint.reset()
    for key, value in DUMMY_ENV.items():
        monkeypatch.setenv(key, value)
    monkeypatch.delenv("AWS_PROFILE", raising=False)
    return ec2_endpoint


def ansible_env(**extra: str) -> dict[str, str]:
    env = {
        **os.environ,
        **DUMMY_ENV,
        "ANSIBLE_CONFIG": str(REPO_ROOT / "ansible.cfg"),
        "PATH": f"{VENV_BIN}{os.pathsep}{os.environ.get('PATH', '')}",
        "ANSIBLE_NOCOLOR": "1",
    }
    env.pop("AWS_PROFILE", None)
    env.update(extra)
    return env


@dataclass
class ModuleRun:
    rc: int
    result: dict[str, Any]
    stdout: str
    stderr: str


def run_module(endpoint: Ec2Endpoint, args: dict[str, Any], *, check: bool = False, diff: bool = False) -> ModuleRun:
    """Run ec2_enclave_instance once on localhost through the `ansible` CLI; parse the JSON callback."""
    argv = [
        str(VENV_BIN / "ansible"),
        "localhost",
        "-m",
        "nitro_enclaves.fleet.ec2_enclave_instance",
        "-a",
        json.dumps({"endpoint_url": endpoint.url, "region": REGION, **args}),
    ]
    if check:
        argv.append("--check")
    if diff:
        argv.append("--diff")
    env = ansible_env(
        ANSIBLE_LOAD_CALLBACK_PLUGINS="1",
        ANSIBLE_STDOUT_CALLBACK="ansible.posix.json",
        ANSIBLE_CALLBACKS_ENABLED="ansible.posix.json",
    )
    proc = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    try:
        report = json.loads(proc.stdout)
        result = report["plays"][0]["tasks"][0]["hosts"]["localhost"]
    except (json.JSONDecodeError, KeyError, IndexError) as exc:
        raise AssertionError(f"no JSON result (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}") from exc
    return ModuleRun(proc.returncode, result, proc.stdout, proc.stderr)


def run_playbook(endpoint: Ec2Endpoint, playbook: str, extra_vars: dict[str, Any]) -> ModuleRun:
    """Run a playbook from the repo root against the endpoint; result = the json callback's report."""
    argv = [
        str(VENV_BIN / "ansible-playbook"),
        playbook,
        "-e",
        json.dumps({"provision_endpoint_url": endpoint.url, "provision_region": REGION, **extra_vars}),
    ]
    env = ansible_env(ANSIBLE_STDOUT_CALLBACK="ansible.posix.json", ANSIBLE_CALLBACKS_ENABLED="ansible.posix.json")
    proc = subprocess.run(argv, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300)
    try:
        report = json.loads(proc.stdout)
    except json.JSONDecodeError as exc:
        raise AssertionError(f"no JSON report (rc={proc.returncode}):\n{proc.stdout}\n{proc.stderr}") from exc
    return ModuleRun(proc.returncode, report, proc.stdout, proc.stderr)


def task_result(report: dict[str, Any], task_name_prefix: str) -> dict[str, Any]:
    for play in report["plays"]:
        for task in play["tasks"]:
            if task["task"]["name"].startswith(task_name_prefix):
                return task["hosts"]["localhost"]
    raise KeyError(task_name_prefix)
