"""Pure logic of ec2_enclave_instance: instance type rules, argument rules, planning, request shapes."""

from __future__ import annotations

import datetime as dt
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.ec2_enclave import (
    RULE_METAL,
    RULE_SUPPORT,
    EnclaveInstanceError,
    Plan,
    check_instance_types,
    check_plan,
    diff_view,
    instance_type_violations,
    launch_request,
    plan,
    summarize,
    validate_params,
)
from moto.ec2.models.instance_types import INSTANCE_TYPES

# Real DescribeInstanceTypes entries (moto ships AWS's table): one per rule outcome.
OK_TYPES = ["m5.xlarge", "c5.2xlarge", "m6i.xlarge", "c6g.xlarge"]


def instance(iid: str, state: str = "running", enabled: bool = True, **tags: str) -> dict:
    return {
        "InstanceId": iid,
        "InstanceType": "m5.xlarge",
        "State": {"Name": state},
        "EnclaveOptions": {"Enabled": enabled},
        "Tags": [{"Key": k, "Value": v} for k, v in tags.items()],
        "LaunchTime": dt.datetime(2026, 1, 1, tzinfo=dt.UTC),
    }


@pytest.mark.parametrize("name", OK_TYPES)
def test_supported_types_pass(name: str) -> None:
    assert instance_type_violations(INSTANCE_TYPES[name]) == []


@pytest.mark.parametrize(
    ("name", "rules"),
    [
        ("t2.micro", ["NitroEnclavesSupport", "at least 4 vCPUs"]),  # Xen, 1 vCPU
        ("t3.xlarge", ["NitroEnclavesSupport"]),  # Nitro and 4 vCPUs, but burstable types are excluded
        ("m5.large", ["NitroEnclavesSupport", "at least 4 vCPUs"]),  # 2 vCPUs
        ("m5.metal", ["NitroEnclavesSupport", "bare metal"]),
        ("c6g.large", ["at least 4 vCPUs"]),  # supported by AWS's table, but only 2 vCPUs
    ],
)
def test_each_broken_rule_is_named(name: str, rules: list[str]) -> None:
    violations = instance_type_violations(INSTANCE_TYPES[name])
    assert len(violations) == len(rules), violations
    for rule, violation in zip(rules, violations, strict=True):
        assert rule in violation


def test_metal_rule_stands_alone() -> None:
    # AWS marks metal types unsupported too; the metal rule must fire on its own.
    info = {"NitroEnclavesSupport": "supported", "BareMetal": True, "VCpuInfo": {"DefaultVCpus": 96}}
    assert instance_type_violations(info) == [RULE_METAL]


def test_min_vcpus_is_a_knob() -> None:
    assert instance_type_violations(INSTANCE_TYPES["c6g.large"], min_vcpus=2) == []
    assert instance_type_violations(INSTANCE_TYPES["m5.xlarge"], min_vcpus=8)


def test_missing_fields_fail_closed() -> None:
    violations = instance_type_violations({})
    assert any(RULE_SUPPORT in v for v in violations)
    assert any("vCPUs" in v for v in violations)


def test_check_instance_types_names_type_and_unknown() -> None:
    infos = {name: INSTANCE_TYPES[name] for name in ("m5.xlarge", "t2.micro")}
    with pytest.raises(EnclaveInstanceError) as err:
        check_instance_types(infos, ["m5.xlarge", "t2.micro", "zz.bogus"])
    message = str(err.value)
    assert message.startswith("refusing: ")
    assert "t2.micro: " + RULE_SUPPORT in message
    assert "zz.bogus: unknown instance type" in message
    assert "m5.xlarge" not in message
    check_instance_types(infos, ["m5.xlarge"])  # no error


@pytest.mark.parametrize(
    ("params", "fragment"),
    [
        ({}, "one of name or instance_ids"),
        ({"instance_ids": ["i-1"], "exact_count": 2}, "exact_count applies to name"),
        ({"name": "x", "exact_count": 0}, "at least 1"),
        ({"name": "x", "min_vcpus": 1}, "min_vcpus must be at least 2"),
        ({"name": "x", "wait_timeout": 0}, "wait_timeout"),
    ],
)
def test_argument_rules(params: dict, fragment: str) -> None:
    with pytest.raises(EnclaveInstanceError, match=fragment):
        validate_params(params)


def test_plan_launches_missing_and_nothing_when_converged() -> None:
    assert plan([], {"Name": "h"}, exact_count=3).launch == 3
    converged = plan([instance("i-1", Name="h"), instance("i-2", Name="h")], {"Name": "h"}, exact_count=2)
    assert not converged.changed
    assert converged.actions() == {
        "launch": 0,
        "enable_with_restart": [],
        "enable_stopped": [],
        "start": [],
        "tag": [],
    }


def test_plan_sorts_instances_by_what_they_need() -> None:
    fleet = [
        instance("i-run-off", "running", enabled=False, Name="h"),
        instance("i-pending-off", "pending", enabled=False, Name="h"),
        instance("i-stopped-off", "stopped", enabled=False, Name="h"),
        instance("i-stopping-on", "stopping", enabled=True, Name="h"),
        instance("i-ok", "running", enabled=True),  # lacks the Name tag value
    ]
    result = plan(fleet, {"Name": "h", "Role": "enclave-host"}, exact_count=5)
    assert result.enable_with_restart == ["i-run-off", "i-pending-off"]
    assert result.enable_stopped == ["i-stopped-off"]
    assert result.start == ["i-stopping-on"]
    assert result.tag["i-ok"] == {"Name": "h", "Role": "enclave-host"}
    assert result.tag["i-run-off"] == {"Role": "enclave-host"}
    assert result.launch == 0


def test_plan_reports_newest_as_surplus_and_check_plan_refuses() -> None:
    old, new = instance("i-old", Name="h"), instance("i-new", Name="h")
    new["LaunchTime"] = dt.datetime(2026, 6, 1, tzinfo=dt.UTC)
    result = plan([new, old], {"Name": "h"}, exact_count=1)
    assert result.surplus == ["i-new"]
    with pytest.raises(EnclaveInstanceError, match="never terminates"):
        check_plan(result, allow_restart=True, launch_ready=True)


def test_check_plan_restart_needs_permission() -> None:
    needs_restart = Plan(enable_with_restart=["i-1"])
    with pytest.raises(EnclaveInstanceError, match="allow_restart: true") as err:
        check_plan(needs_restart, allow_restart=False, launch_ready=True)
    assert "i-1" in str(err.value)
    assert "stop -> modify EnclaveOptions -> start" in str(err.value)
    check_plan(needs_restart, allow_restart=True, launch_ready=False)


def test_check_plan_launch_needs_image_and_type() -> None:
    with pytest.raises(EnclaveInstanceError, match="image_id and instance_type"):
        check_plan(Plan(launch=2), allow_restart=False, launch_ready=False)


def test_launch_request_is_the_seed_command() -> None:
    request = launch_request(
        2,
        image_id="ami-1",
        instance_type="m5.xlarge",
        tags={"Name": "h", "Role": "r"},
        subnet_id="subnet-1",
        security_group_ids=["sg-1"],
        key_name="ops",
        iam_instance_profile="enclave-parent",
        client_token="tok",
    )
    assert request == {
        "ImageId": "ami-1",
        "InstanceType": "m5.xlarge",
        "MinCount": 2,
        "MaxCount": 2,
        "EnclaveOptions": {"Enabled": True},
        "ClientToken": "tok",
        "SubnetId": "subnet-1",
        "SecurityGroupIds": ["sg-1"],
        "KeyName": "ops",
        "IamInstanceProfile": {"Name": "enclave-parent"},
        "TagSpecifications": [
            {"ResourceType": "instance", "Tags": [{"Key": "Name", "Value": "h"}, {"Key": "Role", "Value": "r"}]},
            {"ResourceType": "volume", "Tags": [{"Key": "Name", "Value": "h"}, {"Key": "Role", "Value": "r"}]},
        ],
    }
    arn = "arn:aws:iam::123456789012:instance-profile/p"
    by_arn = launch_request(1, image_id="a", instance_type="t", tags={}, iam_instance_profile=arn)
    assert by_arn["IamInstanceProfile"] == {"Arn": arn}
    assert "TagSpecifications" not in by_arn and "SubnetId" not in by_arn
    assert by_arn["ClientToken"] != launch_request(1, image_id="a", instance_type="t", tags={})["ClientToken"]


def test_summarize_and_diff_view() -> None:
    raw = instance("i-1", Name="h")
    raw["PrivateIpAddress"] = "10.0.0.5"
    raw["Placement"] = {"AvailabilityZone": "us-east-1a"}
    summary = summarize(raw)
    assert summary["instance_id"] == "i-1"
    assert summary["private_ip_address"] == "10.0.0.5"
    assert summary["enclave_options"] == {"enabled": True}
    assert summary["launch_time"] == "2026-01-01T00:00:00+00:00"
    assert summary["availability_zone"] == "us-east-1a"
    view = diff_view({"i-1": summary}, launches=1)
    assert view["instances"]["i-1"] == {"state": "running", "enclave_options": {"enabled": True}, "tags": {"Name": "h"}}
    assert view["instances"]["(new instance 1)"]["enclave_options"] == {"enabled": True}


def test_module_documentation_renders_with_every_option() -> None:
    """ansible-doc must render DOCUMENTATION/EXAMPLES/RETURN (amazon.aws fragments resolved)."""
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [str(Path(sys.executable).parent / "ansible-doc"), "--json", "nitro_enclaves.fleet.ec2_enclave_instance"],
        cwd=root,
        env={**os.environ, "ANSIBLE_CONFIG": str(root / "ansible.cfg")},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)["nitro_enclaves.fleet.ec2_enclave_instance"]
    options = set(doc["doc"]["options"])
    own = {
        "name", "exact_count", "instance_ids", "image_id", "instance_type", "subnet_id", "security_group_ids",
        "key_name", "iam_instance_profile", "tags", "allow_restart", "min_vcpus", "wait", "wait_timeout",
    }  # fmt: skip
    assert own <= options
    assert {"region", "endpoint_url", "access_key", "profile", "validate_certs"} <= options  # amazon.aws common
    assert doc["doc"]["options"]["allow_restart"]["default"] is False
    assert set(doc["return"]) == {"instances", "instance_ids", "launched_ids", "actions"}
    assert "enclave_options" in doc["return"]["instances"]["contains"]
    assert "ec2_enclave_instance:" in doc["examples"]
