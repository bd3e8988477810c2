"""playbooks/provision.yml and the fleet's amazon.aws.aws_ec2 inventory against a real nitro-local-aws."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path
from typing import Any

from tests.conftest import REPO_ROOT, VENV_BIN

from .conftest import AMI, Ec2Endpoint, ansible_env, run_playbook, task_result

PROVISION = "playbooks/provision.yml"
FLEET_DIR = REPO_ROOT / "inventory" / "fleet"


def fleet_inventory(endpoint: Ec2Endpoint, tmp_path: Path) -> Path:
    """The shipped fleet inventory (config + group_vars) with only endpoint_url added."""
    target = tmp_path / "fleet"
    shutil.copytree(FLEET_DIR, target)
    config = target / "aws_ec2.yml"
    text = config.read_text()
    assert "\nplugin: amazon.aws.aws_ec2\n" in text
    config.write_text(
        text.replace("\nplugin: amazon.aws.aws_ec2\n", f"\nplugin: amazon.aws.aws_ec2\nendpoint_url: {endpoint.url}\n")
    )
    return target


def plain(value: Any) -> Any:
    """ansible-inventory 2.19 marks plugin-provided strings as {"__ansible_unsafe": value}; unwrap them."""
    if isinstance(value, dict):
        if set(value) == {"__ansible_unsafe"}:
            return value["__ansible_unsafe"]
        return {key: plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    return value


def ansible_inventory(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(VENV_BIN / "ansible-inventory"), *args],
        cwd=REPO_ROOT,
        env=ansible_env(),
        capture_output=True,
        text=True,
        timeout=120,
    )


def launch(ec2, *, enclave: bool, tags: dict[str, str], stopped: bool = False) -> str:
    iid = ec2.run_instances(
        ImageId=AMI,
        MinCount=1,
        MaxCount=1,
        InstanceType="m5.xlarge",
        EnclaveOptions={"Enabled": enclave},
        TagSpecifications=[{"ResourceType": "instance", "Tags": [{"Key": k, "Value": v} for k, v in tags.items()]}],
    )["Instances"][0]["InstanceId"]
    if stopped:
        ec2.stop_instances(InstanceIds=[iid])
    return iid


def test_provision_creates_role_profile_and_hosts_and_inventory_lists_exactly_them(
    ec2_aws: Ec2Endpoint, tmp_path: Path
) -> None:
    ec2, iam = ec2_aws.client("ec2"), ec2_aws.client("iam")
    # Hosts the inventory must leave out: enclave flag off, fleet tag missing, not running.
    noise = {
        "no-enclave": launch(ec2, enclave=False, tags={"Role": "enclave-host", "Name": "plain"}),
        "untagged": launch(ec2, enclave=True, tags={"Name": "other"}),
        "stopped": launch(ec2, enclave=True, tags={"Role": "enclave-host", "Name": "parked"}, stopped=True),
    }

    first = run_playbook(ec2_aws, PROVISION, {"provision_ami": AMI, "provision_count": 2})
    assert first.rc == 0, first.stdout + first.stderr
    assert first.result["stats"]["localhost"]["changed"] == 3
    fleet = task_result(first.result, "Enclave-enabled instances")
    host_ids = fleet["instance_ids"]
    assert len(host_ids) == 2

    role = iam.get_role(RoleName="enclave-parent")["Role"]
    assert role["AssumeRolePolicyDocument"]["Statement"][0]["Principal"] == {"Service": "ec2.amazonaws.com"}
    profile = iam.get_instance_profile(InstanceProfileName="enclave-parent")["InstanceProfile"]
    assert [r["RoleName"] for r in profile["Roles"]] == ["enclave-parent"]
    record = task_result(first.result, "Record the fleet")["ansible_facts"]
    assert record["provision_parent_role_arn"] == role["Arn"]
    reservations = ec2.describe_instances(InstanceIds=host_ids)["Reservations"]
    hosts = [inst for res in reservations for inst in res["Instances"]]
    for inst in hosts:
        assert inst["EnclaveOptions"] == {"Enabled": True}
        assert inst["IamInstanceProfile"]["Arn"] == profile["Arn"]
        assert {"Key": "Role", "Value": "enclave-host"} in inst["Tags"]

    second = run_playbook(ec2_aws, PROVISION, {"provision_ami": AMI, "provision_count": 2})
    assert second.rc == 0, second.stdout + second.stderr
    assert second.result["stats"]["localhost"]["changed"] == 0

    listed = ansible_inventory("-i", str(fleet_inventory(ec2_aws, tmp_path)), "--list")
    assert listed.returncode == 0, listed.stderr
    assert "Failed to parse" not in listed.stderr
    inventory = plain(json.loads(listed.stdout))
    expected = {inst["PrivateIpAddress"]: inst["InstanceId"] for inst in hosts}
    assert sorted(inventory["enclave_hosts"]["hosts"]) == sorted(expected)
    hostvars = inventory["_meta"]["hostvars"]
    assert set(hostvars) == set(expected), f"noise leaked in: {noise}"
    for address, iid in expected.items():
        assert hostvars[address]["ansible_host"] == address
        assert hostvars[address]["nitro_instance_id"] == iid
        assert hostvars[address]["enclave_options"] == {"enabled": True}
    # group_vars shipped next to the config apply to the fleet.
    graph = ansible_inventory("-i", str(tmp_path / "fleet"), "--host", next(iter(expected)))
    assert plain(json.loads(graph.stdout))["ansible_user"] == "ec2-user"


def test_provision_adopts_instances_only_with_allow_restart(ec2_aws: Ec2Endpoint) -> None:
    ec2 = ec2_aws.client("ec2")
    iid = launch(ec2, enclave=False, tags={"Name": "legacy"})

    refused = run_playbook(ec2_aws, PROVISION, {"provision_instance_ids": [iid]})
    assert refused.rc != 0
    assert "allow_restart" in task_result(refused.result, "Enclave-enabled instances")["msg"]
    assert ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]["EnclaveOptions"] == {
        "Enabled": False
    }

    adopted = run_playbook(ec2_aws, PROVISION, {"provision_instance_ids": [iid], "provision_allow_restart": True})
    assert adopted.rc == 0, adopted.stdout + adopted.stderr
    inst = ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]
    assert inst["EnclaveOptions"] == {"Enabled": True}
    assert inst["State"]["Name"] == "running"
    assert {"Key": "Role", "Value": "enclave-host"} in inst["Tags"]


def test_provision_without_ami_or_ids_fails_early(ec2_aws: Ec2Endpoint) -> None:
    result = run_playbook(ec2_aws, PROVISION, {})
    assert result.rc != 0
    assert "provision_ami" in task_result(result.result, "Check the launch parameters")["msg"]
    assert ec2_aws.client("iam").list_roles()["Roles"] == []


def test_default_inventory_never_reads_the_fleet_config() -> None:
    """ansible.cfg loads inventory/ (a directory): the fleet's aws_ec2 config must stay out of it."""
    listed = ansible_inventory("--list")
    assert listed.returncode == 0, listed.stderr
    assert "aws_ec2" not in listed.stderr
    hostvars = json.loads(listed.stdout)["_meta"]["hostvars"]
    assert "localhost" in hostvars
    assert not any(host[0].isdigit() for host in hostvars)
