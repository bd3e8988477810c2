"""The local KMS keeps its keys (and the SSM parameters next to them) across restarts of the endpoint."""

from __future__ import annotations

import json
import os
import stat

import boto3

from nitro_emulator.local_aws.identities import OPERATOR_KEY
from tests.conftest import running_local_aws

from .conftest import DUMMY_ENV, REGION


def clients(url: str) -> tuple:
    make = lambda service: boto3.client(  # noqa: E731
        service,
        region_name=REGION,
        endpoint_url=url,
        aws_access_key_id=OPERATOR_KEY,
        aws_secret_access_key=DUMMY_ENV["AWS_SECRET_ACCESS_KEY"],
    )
    return make("kms"), make("ssm")


def test_keys_aliases_policies_and_parameters_survive_a_restart(tmp_path, emulator_home) -> None:
    state = tmp_path / "state" / "state.json"
    env = {**os.environ, "NITRO_EMULATOR_HOME": str(emulator_home)}
    with running_local_aws(tmp_path, env, "--state-file", str(state)) as url:
        kms, ssm = clients(url)
        key_id = kms.create_key(Description="fleet key", Tags=[{"TagKey": "fleet", "TagValue": "a"}])["KeyMetadata"][
            "KeyId"
        ]
        kms.create_alias(AliasName="alias/fleet", TargetKeyId=key_id)
        policy = json.loads(kms.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"])
        policy["Statement"].append(
            {
                "Sid": "Marker",
                "Effect": "Deny",
                "Principal": {"AWS": "arn:aws:iam::123456789012:role/nobody"},
                "Action": "kms:*",
                "Resource": "*",
            }
        )
        kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
        blob = kms.generate_data_key_without_plaintext(KeyId="alias/fleet", KeySpec="AES_256")["CiphertextBlob"]
        before = kms.decrypt(CiphertextBlob=blob)["Plaintext"]
        ssm.put_parameter(Name="/nitro/fleet/datakey", Value=blob.hex(), Type="String")
        ssm.put_parameter(Name="/nitro/fleet/datakey", Value="v2-" + blob.hex(), Type="String", Overwrite=True)
    assert stat.S_IMODE(state.stat().st_mode) == 0o600
    assert stat.S_IMODE(state.parent.stat().st_mode) == 0o700
    assert not [p for p in state.parent.iterdir() if p.name != "state.json"]  # no temporary left over
    with running_local_aws(tmp_path, env, "--state-file", str(state)) as url:
        kms, ssm = clients(url)
        assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == before
        assert kms.describe_key(KeyId="alias/fleet")["KeyMetadata"]["KeyId"] == key_id
        stored = json.loads(kms.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"])
        assert stored == policy
        assert kms.list_resource_tags(KeyId=key_id)["Tags"] == [{"TagKey": "fleet", "TagValue": "a"}]
        parameter = ssm.get_parameter(Name="/nitro/fleet/datakey")["Parameter"]
        assert parameter["Value"] == "v2-" + blob.hex() and parameter["Version"] == 2
        # And it keeps working: a new key after the restart is saved too.
        kms.create_key(Description="second")
    assert len(json.loads(state.read_text())["kms_keys"]) == 2


def test_a_key_pending_deletion_is_saved_and_restored(tmp_path, emulator_home) -> None:
    # ScheduleKeyDeletion gives the key a datetime: the state file must still be written (the fuzz test
    # found every later request answering 500 once a deletion was scheduled).
    state = tmp_path / "state.json"
    env = {**os.environ, "NITRO_EMULATOR_HOME": str(emulator_home)}
    with running_local_aws(tmp_path, env, "--state-file", str(state)) as url:
        kms, _ = clients(url)
        key_id = kms.create_key(Description="doomed")["KeyMetadata"]["KeyId"]
        when = kms.schedule_key_deletion(KeyId=key_id, PendingWindowInDays=7)["DeletionDate"]
        assert kms.create_key(Description="after")["KeyMetadata"]["KeyId"]
    assert len(json.loads(state.read_text())["kms_keys"]) == 2
    with running_local_aws(tmp_path, env, "--state-file", str(state)) as url:
        kms, _ = clients(url)
        meta = kms.describe_key(KeyId=key_id)["KeyMetadata"]
        assert meta["KeyState"] == "PendingDeletion"
        assert abs((meta["DeletionDate"] - when).total_seconds()) < 1
        kms.cancel_key_deletion(KeyId=key_id)


def test_a_state_file_others_can_read_is_refused(tmp_path, emulator_home) -> None:
    state = tmp_path / "state.json"
    state.write_text(json.dumps({"format": 1, "kms_keys": [], "ssm_parameters": []}))
    state.chmod(0o644)
    env = {**os.environ, "NITRO_EMULATOR_HOME": str(emulator_home)}
    try:
        with running_local_aws(tmp_path, env, "--state-file", str(state)):
            raise AssertionError("the endpoint started with a world-readable state file")
    except RuntimeError as exc:
        assert "exited" in str(exc)
    log = "".join(p.read_text() for p in tmp_path.glob("local-aws-*.log"))
    assert "chmod 600" in log
