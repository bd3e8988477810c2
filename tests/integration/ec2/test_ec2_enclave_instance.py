"""ec2_enclave_instance run through the `ansible` CLI against a real nitro-local-aws (moto server + extensions).

moto's request recorder shows exactly which AWS actions each run made, so "no state-changing call" is
checked on the wire, not inferred from the end state.
"""

from __future__ import annotations

import pytest

from .conftest import AMI, Ec2Endpoint, run_module

READS = {"ec2:DescribeInstances", "ec2:DescribeInstanceTypes"}


def fleet_args(name: str = "enclave-host", count: int = 2, **extra) -> dict:
    return {"name": name, "exact_count": count, "image_id": AMI, "instance_type": "m5.xlarge", **extra}


def live_instances(ec2, **filters: str) -> list[dict]:
    aws_filters = [{"Name": k, "Values": [v]} for k, v in filters.items()]
    aws_filters.append({"Name": "instance-state-name", "Values": ["pending", "running", "stopping", "stopped"]})
    pages = ec2.describe_instances(Filters=aws_filters)
    return [inst for res in pages["Reservations"] for inst in res["Instances"]]


def plain_instance(ec2, instance_type: str = "m5.xlarge", stopped: bool = False) -> str:
    iid = ec2.run_instances(ImageId=AMI, MinCount=1, MaxCount=1, InstanceType=instance_type)["Instances"][0][
        "InstanceId"
    ]
    if stopped:
        ec2.stop_instances(InstanceIds=[iid])
    return iid


def enclave_enabled(ec2, iid: str) -> bool:
    return ec2.describe_instance_attribute(InstanceId=iid, Attribute="enclaveOptions")["EnclaveOptions"]["Enabled"]


def test_launch_then_rerun_changes_nothing(ec2_aws: Ec2Endpoint) -> None:
    ec2, iam = ec2_aws.client("ec2"), ec2_aws.client("iam")
    iam.create_role(RoleName="enclave-parent", AssumeRolePolicyDocument="{}")
    iam.create_instance_profile(InstanceProfileName="enclave-parent")
    iam.add_role_to_instance_profile(InstanceProfileName="enclave-parent", RoleName="enclave-parent")
    subnet = ec2.describe_subnets()["Subnets"][0]["SubnetId"]
    group = ec2.create_security_group(GroupName="enclave", Description="enclave hosts")["GroupId"]
    ec2.create_key_pair(KeyName="ops")
    args = fleet_args(
        subnet_id=subnet,
        security_group_ids=[group],
        key_name="ops",
        iam_instance_profile="enclave-parent",
        tags={"Role": "enclave-host", "Environment": "test"},
    )

    first = run_module(ec2_aws, args)
    assert first.rc == 0, first.result
    assert first.result["changed"] is True
    assert first.result["actions"]["launch"] == 2
    assert len(first.result["launched_ids"]) == 2
    assert sorted(first.result["launched_ids"]) == first.result["instance_ids"]
    for inst in first.result["instances"]:
        assert inst["enclave_options"] == {"enabled": True}
        assert inst["state"] == "running"
        assert inst["private_ip_address"]
        assert inst["subnet_id"] == subnet
        assert inst["key_name"] == "ops"
        assert inst["iam_instance_profile_arn"].endswith(":instance-profile/enclave-parent")
        assert inst["tags"] == {"Name": "enclave-host", "Role": "enclave-host", "Environment": "test"}
    # What AWS now holds, read back independently.
    on_aws = live_instances(ec2, **{"tag:Name": "enclave-host"})
    assert sorted(i["InstanceId"] for i in on_aws) == first.result["instance_ids"]
    for inst in on_aws:
        assert inst["EnclaveOptions"] == {"Enabled": True}
        assert [g["GroupId"] for g in inst["SecurityGroups"]] == [group]
        assert enclave_enabled(ec2, inst["InstanceId"])

    ec2_aws.start_recording()
    second = run_module(ec2_aws, args, diff=True)
    actions = ec2_aws.stop_recording()
    assert second.rc == 0, second.result
    assert second.result["changed"] is False
    assert second.result["instance_ids"] == first.result["instance_ids"]
    assert second.result["launched_ids"] == []
    assert set(actions) <= READS, actions
    assert "diff" not in second.result or second.result["diff"]["before"] == second.result["diff"]["after"]


def test_scale_up_launches_only_the_missing(ec2_aws: Ec2Endpoint) -> None:
    first = run_module(ec2_aws, fleet_args(count=1))
    second = run_module(ec2_aws, fleet_args(count=3))
    assert second.result["actions"]["launch"] == 2
    assert set(first.result["instance_ids"]) < set(second.result["instance_ids"])
    assert len(second.result["instance_ids"]) == 3


def test_surplus_is_refused_not_terminated(ec2_aws: Ec2Endpoint) -> None:
    run_module(ec2_aws, fleet_args(count=2))
    ec2_aws.start_recording()
    smaller = run_module(ec2_aws, fleet_args(count=1))
    assert set(ec2_aws.stop_recording()) <= READS
    assert smaller.rc != 0
    assert "never terminates" in smaller.result["msg"]
    assert len(live_instances(ec2_aws.client("ec2"), **{"tag:Name": "enclave-host"})) == 2


def test_adopt_running_instance_needs_allow_restart(ec2_aws: Ec2Endpoint) -> None:
    ec2 = ec2_aws.client("ec2")
    iid = plain_instance(ec2)

    ec2_aws.start_recording()
    refused = run_module(ec2_aws, {"instance_ids": [iid]})
    actions = ec2_aws.stop_recording()
    assert refused.rc != 0
    assert "allow_restart: true" in refused.result["msg"]
    assert iid in refused.result["msg"]
    assert set(actions) <= READS, actions
    assert not enclave_enabled(ec2, iid)
    assert live_instances(ec2, **{"instance-id": iid})[0]["State"]["Name"] == "running"

    ec2_aws.start_recording()
    adopted = run_module(ec2_aws, {"instance_ids": [iid], "allow_restart": True, "tags": {"Role": "enclave-host"}})
    actions = ec2_aws.stop_recording()
    assert adopted.rc == 0, adopted.result
    assert adopted.result["changed"] is True
    assert adopted.result["actions"]["enable_with_restart"] == [iid]
    assert adopted.result["actions"]["tag"] == [iid]
    assert adopted.result["instances"][0]["enclave_options"] == {"enabled": True}
    assert adopted.result["instances"][0]["state"] == "running"
    changes = [a for a in actions if a not in READS]
    assert changes == [
        "ec2:StopInstances",
        "ec2:ModifyInstanceAttribute",
        "ec2:StartInstances",
        "ec2:CreateTags",
    ]
    assert enclave_enabled(ec2, iid)

    again = run_module(ec2_aws, {"instance_ids": [iid], "allow_restart": True, "tags": {"Role": "enclave-host"}})
    assert again.result["changed"] is False


def test_adopt_stopped_instance_enables_and_starts_without_restart_permission(ec2_aws: Ec2Endpoint) -> None:
    ec2 = ec2_aws.client("ec2")
    iid = plain_instance(ec2, stopped=True)
    ec2_aws.start_recording()
    adopted = run_module(ec2_aws, {"instance_ids": [iid]})
    actions = ec2_aws.stop_recording()
    assert adopted.rc == 0, adopted.result
    assert adopted.result["actions"]["enable_stopped"] == [iid]
    assert [a for a in actions if a not in READS] == ["ec2:ModifyInstanceAttribute", "ec2:StartInstances"]
    assert enclave_enabled(ec2, iid)
    assert adopted.result["instances"][0]["state"] == "running"


def test_adopt_by_name_counts_existing_instances(ec2_aws: Ec2Endpoint) -> None:
    ec2 = ec2_aws.client("ec2")
    iid = plain_instance(ec2, stopped=True)
    ec2.create_tags(Resources=[iid], Tags=[{"Key": "Name", "Value": "enclave-host"}])
    result = run_module(ec2_aws, fleet_args(count=2))
    assert result.rc == 0, result.result
    assert result.result["actions"]["enable_stopped"] == [iid]
    assert result.result["actions"]["launch"] == 1
    assert iid in result.result["instance_ids"]
    assert all(inst["enclave_options"]["enabled"] for inst in result.result["instances"])


def test_unknown_instance_id_is_a_clear_failure(ec2_aws: Ec2Endpoint) -> None:
    result = run_module(ec2_aws, {"instance_ids": ["i-0123456789abcdef0"]})
    assert result.rc != 0
    assert "cannot adopt" in result.result["msg"]


@pytest.mark.parametrize(
    ("instance_type", "rule"),
    [
        ("t2.micro", "NitroEnclavesSupport == 'supported'"),
        ("m5.metal", "bare metal"),
        ("m5.large", "at least 4 vCPUs"),
        ("c6g.large", "at least 4 vCPUs"),  # supports enclaves per AWS's table, but has 2 vCPUs
        ("zz9.huge", "unknown instance type"),  # DescribeInstanceTypes says it does not exist
    ],
)
def test_unsupported_instance_type_refused_before_any_change(
    ec2_aws: Ec2Endpoint, instance_type: str, rule: str
) -> None:
    ec2_aws.start_recording()
    result = run_module(ec2_aws, fleet_args(count=1, instance_type=instance_type))
    actions = ec2_aws.stop_recording()
    assert result.rc != 0
    assert result.result["msg"].startswith("refusing: ")
    assert rule in result.result["msg"]
    assert instance_type in result.result["msg"]
    assert set(actions) <= READS, actions
    assert live_instances(ec2_aws.client("ec2")) == []


def test_adopting_an_unsupported_type_is_refused_even_with_restart(ec2_aws: Ec2Endpoint) -> None:
    ec2 = ec2_aws.client("ec2")
    iid = plain_instance(ec2, "t3.xlarge")
    ec2_aws.start_recording()
    result = run_module(ec2_aws, {"instance_ids": [iid], "allow_restart": True})
    assert set(ec2_aws.stop_recording()) <= READS
    assert result.rc != 0
    assert "t3.xlarge" in result.result["msg"]
    assert "NitroEnclavesSupport" in result.result["msg"]
    assert live_instances(ec2, **{"instance-id": iid})[0]["State"]["Name"] == "running"


def test_launch_without_image_is_refused(ec2_aws: Ec2Endpoint) -> None:
    result = run_module(ec2_aws, {"name": "enclave-host", "instance_type": "m5.xlarge"})
    assert result.rc != 0
    assert "image_id and instance_type" in result.result["msg"]


def test_check_mode_makes_only_read_calls(ec2_aws: Ec2Endpoint) -> None:
    ec2 = ec2_aws.client("ec2")
    running = plain_instance(ec2)
    stopped_named = plain_instance(ec2, stopped=True)
    ec2.create_tags(Resources=[running, stopped_named], Tags=[{"Key": "Name", "Value": "enclave-host"}])

    ec2_aws.start_recording()
    launch = run_module(ec2_aws, fleet_args(name="other-fleet", count=2), check=True, diff=True)
    adopt = run_module(ec2_aws, fleet_args(count=3, allow_restart=True), check=True, diff=True)
    actions = ec2_aws.stop_recording()

    assert launch.rc == 0 and adopt.rc == 0, (launch.result, adopt.result)
    assert set(actions) <= READS, actions
    assert "ec2:DescribeInstances" in actions

    assert launch.result["changed"] is True
    assert launch.result["actions"]["launch"] == 2
    assert launch.result["launched_ids"] == []
    assert launch.result["diff"]["before"] == {"instances": {}}
    assert sorted(launch.result["diff"]["after"]["instances"]) == ["(new instance 1)", "(new instance 2)"]

    assert adopt.result["changed"] is True
    assert adopt.result["actions"]["enable_with_restart"] == [running]
    assert adopt.result["actions"]["enable_stopped"] == [stopped_named]
    assert adopt.result["actions"]["launch"] == 1
    after = adopt.result["diff"]["after"]["instances"]
    assert after[running]["enclave_options"] == {"enabled": True}
    assert adopt.result["diff"]["before"]["instances"][stopped_named]["state"] == "stopped"
    assert after[stopped_named]["state"] == "running"

    # Nothing changed on the endpoint.
    assert not enclave_enabled(ec2, running)
    assert live_instances(ec2, **{"instance-id": stopped_named})[0]["State"]["Name"] == "stopped"
    assert len(live_instances(ec2)) == 2
