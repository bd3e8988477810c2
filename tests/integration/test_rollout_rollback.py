"""rollout.yml with a bad image on a one-host fleet (a systemd container from the local base image):
the host's batch is put back on its previous EIF and run configuration, serves healthily on it, the key
policy keeps the old PCR0 and the play fails naming the host and the reason. Then a good rollout. A
steady load runs through the gateway meanwhile; its figures (requests sent, failed, longest gap) are
printed; no request may be lost."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import boto3
import pytest

from tests.bench.load import Load
from tests.conftest import REPO_ROOT, VENV_BIN, one_host_inventory, start_systemd_host

pytestmark = [pytest.mark.docker, pytest.mark.root, pytest.mark.slow]

HOST = "nitro-safe-rollback-1"
KMS_PORT = 44611
GATEWAY = "127.0.0.1:19511"
HOLD_S = 120  # covers two enclave boots (the bad image's, then the previous one's) on a loaded 2-core machine


def _playbook(inventory: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ, ANSIBLE_CONFIG=str(REPO_ROOT / "ansible.cfg"), ANSIBLE_NOCOLOR="1")
    return subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), *args],
        cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=1800, check=False,
    )  # fmt: skip


@pytest.fixture(scope="module")
def fleet(docker_engine: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    start_systemd_host(HOST)
    work = tmp_path_factory.mktemp("rollback")
    group_vars = {
        # The test checks that held requests are answered, not how fast the host boots.
        "vsock_tokenizer_hold_timeout": HOLD_S,
        "enclave_image_build_dir": str(REPO_ROOT / ".cache" / "enclave-build" / "rollback-test"),
    }
    inventory = one_host_inventory(
        work / "hosts.yml", HOST, KMS_PORT, group_vars, {"vsock_tokenizer_gateway_listen": GATEWAY}
    )
    try:
        site = _playbook(inventory, "site.yml")
        assert site.returncode == 0, site.stdout[-4000:]
        yield inventory
    finally:
        subprocess.run(["docker", "rm", "-f", HOST], capture_output=True, check=False)
        _playbook(inventory, "tests/molecule/cleanup.yml", "-e", f"kms_enclave_policy_local_port={KMS_PORT}")


def _attested_pcr0() -> str:
    with urllib.request.urlopen(f"http://{GATEWAY}/healthz?attest=1&wait=60", timeout=90) as answer:
        report = json.loads(answer.read())
    assert report["status"] == "ok", report
    return report["attestation"]["pcrs"]["0"]


def _policy_text() -> str:
    kms = boto3.client("kms", endpoint_url=f"http://127.0.0.1:{KMS_PORT}", region_name="us-east-1",
                       aws_access_key_id="local-endpoint", aws_secret_access_key="local-endpoint")  # fmt: skip
    key_id = kms.describe_key(KeyId="alias/nitro-enclave-tokenizer")["KeyMetadata"]["KeyId"]
    return kms.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"]


def _bad_source(tmp: Path, dockerfile_tail: str) -> Path:
    source = tmp / "enclave_src"
    shutil.copytree(REPO_ROOT / "enclave_src", source, ignore=shutil.ignore_patterns("__pycache__"))
    with (source / "Dockerfile").open("a") as dockerfile:
        dockerfile.write(dockerfile_tail)
    return source


def test_a_bad_image_is_rolled_back_and_a_good_one_rolls_with_no_request_lost(fleet: Path, tmp_path: Path) -> None:
    old_pcr0 = _attested_pcr0()
    crashing = _bad_source(tmp_path, '\nCMD ["python3", "-c", "raise SystemExit(\'crashes at start\')"]\n')
    with Load(f"http://{GATEWAY}", timeout=HOLD_S + 30) as load:
        bad = _playbook(fleet, "playbooks/rollout.yml", "-e", "enclave_image_version=crash-1",
                        "-e", f"enclave_image_src={crashing}")  # fmt: skip
    print(f"\nrollout of an image that crashes at start, 1 host: {load.figures()}")
    assert bad.returncode != 0
    assert f"Not healthy on the new image: {HOST} (supervisor: fallback: " in bad.stdout, bad.stdout[-4000:]
    assert "running the previous configuration" in bad.stdout
    assert f"{HOST} is back on its previous image and serves healthily" in bad.stdout
    assert _attested_pcr0() == old_pcr0
    assert old_pcr0 in _policy_text()
    assert load.failed == 0, load.figures()

    with Load(f"http://{GATEWAY}", timeout=HOLD_S + 30) as load:
        good = _playbook(fleet, "playbooks/rollout.yml", "-e", "enclave_image_version=good-2")
    print(f"rollout of a good image, 1 host: {load.figures()}")
    assert good.returncode == 0, good.stdout[-4000:]
    new_pcr0 = _attested_pcr0()
    assert new_pcr0 != old_pcr0 and new_pcr0 in _policy_text() and old_pcr0 not in _policy_text()
    assert load.failed == 0, load.figures()
