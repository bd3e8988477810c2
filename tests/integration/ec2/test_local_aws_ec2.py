"""The local endpoint's EnclaveOptions, through boto3 against a real nitro-local-aws process."""

from __future__ import annotations

import pytest
from botocore.exceptions import ClientError

from .conftest import AMI, Ec2Endpoint


def launch(ec2, instance_type: str = "m5.xlarge", **extra) -> str:
    answer = ec2.run_instances(ImageId=AMI, MinCount=1, MaxCount=1, InstanceType=instance_type, **extra)
    return answer["Instances"][0]["InstanceId"]


def describe(ec2, iid: str) -> dict:
    return ec2.describe_instances(InstanceIds=[iid])["Reservations"][0]["Instances"][0]


def ids_with_filter(ec2, value: str) -> set[str]:
    pages = ec2.describe_instances(Filters=[{"Name": "enclave-options.enabled", "Values": [value]}])
    return {inst["InstanceId"] for res in pages["Reservations"] for inst in res["Instances"]}


def test_run_instances_stores_enclave_options(ec2_aws: Ec2Endpoint) -> None:
    ec2 = ec2_aws.client("ec2")
    answer = ec2.run_instances(
        ImageId=AMI, MinCount=1, MaxCount=1, InstanceType="m5.xlarge", EnclaveOptions={"Enabled": True}
    )
    enabled = answer["Instances"][0]["InstanceId"]
    assert answer["Instances"][0]["EnclaveOptions"] == {"Enabled": True}
    plain = launch(ec2)
    assert describe(ec2, enabled)["EnclaveOptions"] == {"Enabled": True}
    assert describe(ec2, plain)["EnclaveOptions"] == {"Enabled": False}
    attribute = ec2.describe_instance_attribute(InstanceId=enabled, Attribute="enclaveOptions")
    assert attribute["InstanceId"] == enabled
    assert attribute["EnclaveOptions"] == {"Enabled": True}
    assert ids_with_filter(ec2, "true") == {enabled}
    assert ids_with_filter(ec2, "false") == {plain}


def test_launch_template_enclave_options_apply(ec2_aws: Ec2Endpoint) -> None:
    ec2 = ec2_aws.client("ec2")
    ec2.create_launch_template(
        LaunchTemplateName="enclave",
        LaunchTemplateData={"ImageId": AMI, "InstanceType": "m5.xlarge", "EnclaveOptions": {"Enabled": True}},
    )
    answer = ec2.run_instances(MinCount=1, MaxCount=1, LaunchTemplate={"LaunchTemplateName": "enclave"})
    assert describe(ec2, answer["Instances"][0]["InstanceId"])["EnclaveOptions"] == {"Enabled": True}


@pytest.mark.parametrize("instance_type", ["t2.micro", "m5.large", "m5.metal"])
def test_run_instances_refuses_types_without_enclave_support(ec2_aws: Ec2Endpoint, instance_type: str) -> None:
    ec2 = ec2_aws.client("ec2")
    with pytest.raises(ClientError) as err:
        launch(ec2, instance_type, EnclaveOptions={"Enabled": True})
    assert err.value.response["Error"]["Code"] == "UnsupportedOperation"
    assert ec2.describe_instances()["Reservations"] == []


def test_enclaves_and_hibernation_are_exclusive(ec2_aws: Ec2Endpoint) -> None:
    ec2 = ec2_aws.client("ec2")
    with pytest.raises(ClientError) as err:
        launch(ec2, EnclaveOptions={"Enabled": True}, HibernationOptions={"Configured": True})
    assert err.value.response["Error"]["Code"] == "InvalidParameterCombination"


def test_modify_only_on_a_stopped_instance(ec2_aws: Ec2Endpoint) -> None:
    ec2 = ec2_aws.client("ec2")
    iid = launch(ec2)
    with pytest.raises(ClientError) as err:
        ec2.modify_instance_attribute(InstanceId=iid, EnclaveOptions={"Enabled": True})
    assert err.value.response["Error"]["Code"] == "IncorrectInstanceState"
    assert f"'{iid}' is not in the 'stopped' state" in err.value.response["Error"]["Message"]
    assert describe(ec2, iid)["EnclaveOptions"] == {"Enabled": False}

    ec2.stop_instances(InstanceIds=[iid])
    with pytest.raises(ClientError) as dry:
        ec2.modify_instance_attribute(InstanceId=iid, EnclaveOptions={"Enabled": True}, DryRun=True)
    assert dry.value.response["Error"]["Code"] == "DryRunOperation"
    assert describe(ec2, iid)["EnclaveOptions"] == {"Enabled": False}

    ec2.modify_instance_attribute(InstanceId=iid, EnclaveOptions={"Enabled": True})
    assert ec2.describe_instance_attribute(InstanceId=iid, Attribute="enclaveOptions")["EnclaveOptions"] == {
        "Enabled": True
    }
    # The Attribute/Value form of the same call.
    ec2.modify_instance_attribute(InstanceId=iid, Attribute="enclaveOptions", Value="false")
    assert describe(ec2, iid)["EnclaveOptions"] == {"Enabled": False}
    ec2.start_instances(InstanceIds=[iid])
    assert describe(ec2, iid)["State"]["Name"] == "running"


def test_modify_refuses_enabling_on_an_unsupported_type(ec2_aws: Ec2Endpoint) -> None:
    ec2 = ec2_aws.client("ec2")
    iid = launch(ec2, "t2.micro")
    ec2.stop_instances(InstanceIds=[iid])
    with pytest.raises(ClientError) as err:
        ec2.modify_instance_attribute(InstanceId=iid, EnclaveOptions={"Enabled": True})
    assert err.value.response["Error"]["Code"] == "UnsupportedOperation"


def test_other_attributes_still_reach_moto(ec2_aws: Ec2Endpoint) -> None:
    ec2 = ec2_aws.client("ec2")
    iid = launch(ec2)
    ec2.stop_instances(InstanceIds=[iid])
    ec2.modify_instance_attribute(InstanceId=iid, InstanceType={"Value": "m5.2xlarge"})
    assert ec2.describe_instance_attribute(InstanceId=iid, Attribute="instanceType")["InstanceType"] == {
        "Value": "m5.2xlarge"
    }
    with pytest.raises(ClientError) as err:
        ec2.describe_instance_attribute(InstanceId="i-00000000000000000", Attribute="enclaveOptions")
    assert err.value.response["Error"]["Code"] == "InvalidInstanceID.NotFound"


def test_every_instance_of_a_launch_gets_the_instance_profile(ec2_aws: Ec2Endpoint) -> None:
    # moto 5.2 alone attaches it to the first instance only.
    iam = ec2_aws.client("iam")
    iam.create_role(RoleName="parent", AssumeRolePolicyDocument="{}")
    profile = iam.create_instance_profile(InstanceProfileName="parent")["InstanceProfile"]
    iam.add_role_to_instance_profile(InstanceProfileName="parent", RoleName="parent")
    ec2 = ec2_aws.client("ec2")
    answer = ec2.run_instances(
        ImageId=AMI, MinCount=3, MaxCount=3, InstanceType="m5.xlarge", IamInstanceProfile={"Name": "parent"}
    )
    for iid in (inst["InstanceId"] for inst in answer["Instances"]):
        assert describe(ec2, iid)["IamInstanceProfile"]["Arn"] == profile["Arn"]
