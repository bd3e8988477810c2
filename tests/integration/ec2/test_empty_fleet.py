"""site.yml against a fleet inventory that fails to load or holds no enclave host fails loudly."""

from __future__ import annotations

import subprocess
from pathlib import Path

from tests.conftest import REPO_ROOT, VENV_BIN

from .conftest import Ec2Endpoint, ansible_env
from .test_provision_inventory import fleet_inventory


def site(inventory: Path, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), "site.yml"],
        cwd=REPO_ROOT,
        env=ansible_env(**env),
        capture_output=True,
        text=True,
        timeout=300,
    )


def test_fleet_without_credentials_fails_with_the_plugin_error(ec2_endpoint: Ec2Endpoint, tmp_path: Path) -> None:
    inventory = fleet_inventory(ec2_endpoint, tmp_path)
    env = ansible_env()
    no_credentials = {
        "AWS_ACCESS_KEY_ID": "",
        "AWS_SECRET_ACCESS_KEY": "",
        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "none"),
        "AWS_CONFIG_FILE": str(tmp_path / "none"),
        # botocore would otherwise ask the instance metadata service, off this machine.
        "AWS_EC2_METADATA_DISABLED": "true",
    }
    run = subprocess.run(
        [str(VENV_BIN / "ansible-playbook"), "-i", str(inventory), "site.yml"],
        cwd=REPO_ROOT,
        env={k: v for k, v in {**env, **no_credentials}.items() if v},
        capture_output=True,
        text=True,
        timeout=300,
    )
    output = run.stdout + run.stderr
    assert run.returncode != 0, output
    assert "Unable to locate credentials" in output
    assert "Completely failed to parse inventory source" in output
    assert "PLAY RECAP" not in output  # nothing ran


def test_fleet_with_no_enclave_host_fails_naming_the_group(ec2_aws: Ec2Endpoint, tmp_path: Path) -> None:
    run = site(fleet_inventory(ec2_aws, tmp_path))
    output = run.stdout + run.stderr
    assert run.returncode != 0, output
    assert "No host is in the group enclave_hosts" in output
    assert "Role=enclave-host" in output
