"""kms_enclave_policy through ansible-playbook against a real nitro-local-aws (moto server) process."""

from __future__ import annotations

import copy
import hashlib
import json

import boto3
import botocore.config
import botocore.exceptions
import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import kms_policy

from .conftest import ACCOUNT, NEW_PCR0, OLD_PCR0, REGION, ROLE, get_policy, run_module_tasks

SID = "EnclaveDecrypt"
P0 = "kms:RecipientAttestation:PCR0"
FOREIGN = [
    {
        "Sid": "Allow access for Key Administrators",
        "Effect": "Allow",
        "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:role/key-admin"},
        "Action": ["kms:Create*", "kms:Describe*", "kms:Put*", "kms:Get*", "kms:ScheduleKeyDeletion"],
        "Resource": "*",
    },
    {
        "Sid": "Enable encrypt from instance",
        "Effect": "Allow",
        "Principal": {"AWS": ROLE},
        "Action": "kms:Encrypt",
        "Resource": "*",
    },
    {
        "Effect": "Deny",
        "Principal": "*",
        "Action": "kms:ScheduleKeyDeletion",
        "Resource": "*",
        "Condition": {"Bool": {"aws:MultiFactorAuthPresent": "false"}},
    },
]


def task(name: str, **args) -> dict:
    return {"name": name, "nitro_enclaves.fleet.kms_enclave_policy": args}


def stmt(**fields) -> dict:
    return {"sid": SID, **fields}


def attested_values(policy: dict, sid: str = SID) -> dict:
    (found,) = [s for s in policy["Statement"] if s.get("Sid") == sid]
    return found["Condition"]["StringEqualsIgnoreCase"]


def test_create_rotate_remove_preserving_foreign_statements(tmp_path, kms_endpoint, kms, key_id) -> None:
    policy = get_policy(kms, key_id)
    policy["Statement"] += FOREIGN
    original = json.dumps(policy, indent=4)  # our own spacing: foreign text must survive
    kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=original)
    run = run_module_tasks(
        tmp_path,
        kms_endpoint,
        [
            task("create", key_id=key_id, statements=[stmt(principals=[ROLE], pcr0=[OLD_PCR0.upper()])]),
            task("same again", key_id=key_id, statements=[stmt(principals=[ROLE], pcr0=[OLD_PCR0])]),
            task("phase 1", key_id=key_id, pcr_values_mode="add", statements=[stmt(pcr0=[NEW_PCR0])]),
            task("phase 1 again", key_id=key_id, pcr_values_mode="add", statements=[stmt(pcr0=[NEW_PCR0])]),
            task("phase 2", key_id=key_id, pcr_values_mode="remove", statements=[stmt(pcr0=[OLD_PCR0])]),
            task("phase 2 again", key_id=key_id, pcr_values_mode="remove", statements=[stmt(pcr0=[OLD_PCR0])]),
            task("replace", key_id=key_id, statements=[stmt(pcr0=[OLD_PCR0], actions=["Decrypt", "GenerateDataKey"])]),
            task("absent", key_id=key_id, state="absent", statements=[{"sid": SID}]),
            task("absent again", key_id=key_id, state="absent", statements=[{"sid": SID}]),
        ],
    )
    r = {x["task"]: x for x in run.results}
    assert run.rc == 0, run.stdout
    assert all(not x.get("failed") for x in run.results), run.stdout
    assert [r[n]["changed"] for n in r] == [True, False, True, False, True, False, True, True, False]
    assert r["create"]["statements_changed"] == [SID]
    assert r["same again"]["statements_changed"] == []
    assert attested_values(r["create"]["policy"]) == {P0: [OLD_PCR0]}
    assert attested_values(r["phase 1"]["policy"]) == {P0: [OLD_PCR0, NEW_PCR0]}
    assert attested_values(r["phase 2"]["policy"]) == {P0: [NEW_PCR0]}
    replaced = next(s for s in r["replace"]["policy"]["Statement"] if s.get("Sid") == SID)
    assert replaced["Action"] == ["kms:Decrypt", "kms:GenerateDataKey"]
    assert attested_values(r["replace"]["policy"]) == {P0: [OLD_PCR0]}
    # Every foreign statement is byte-identical in every result, and in KMS at the end.
    for result in run.results:
        assert [s for s in result["policy"]["Statement"] if s.get("Sid") != SID] == policy["Statement"]
    final = kms.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"]
    assert json.loads(final) == policy
    # The module returned what KMS holds.
    assert r["absent"]["policy"] == json.loads(final)


def test_key_id_forms_and_pcr3_pcr4_from_eif_library(tmp_path, kms_endpoint, kms, key_id) -> None:
    kms.create_alias(AliasName="alias/tokenizer-test-forms", TargetKeyId=key_id)
    arn = kms.describe_key(KeyId=key_id)["KeyMetadata"]["Arn"]
    base = stmt(principals=[ROLE], pcr0=[OLD_PCR0], pcr3_role_arn=[ROLE], pcr4_instance_id=["i-1234567890abcdef0"])
    run = run_module_tasks(
        tmp_path,
        kms_endpoint,
        [
            task("by alias", key_id="alias/tokenizer-test-forms", statements=[base]),
            task("by arn", key_arn=arn, statements=[base]),
            task("by id", key_id=key_id, statements=[base]),
        ],
    )
    assert [x["changed"] for x in run.results] == [True, False, False], run.stdout
    assert {x["key_id"] for x in run.results} == {key_id}
    values = attested_values(get_policy(kms, key_id))
    # Reference vector (nitro-cli-and-eif.md §4.3) for the instance; the role one recomputed by formula.
    assert values["kms:RecipientAttestation:PCR4"] == [
        "08f996b5d43e047a9eb51e7f548bfee7e164fd7dc8f65541f2ac09d6545ac812719327281c401a67a10fcba87ae79ce0"
    ]
    assert values["kms:RecipientAttestation:PCR3"] == [hashlib.sha384(b"\0" * 48 + ROLE.encode()).hexdigest()]


def test_check_mode_and_diff(tmp_path, kms_endpoint, kms, key_id) -> None:
    before = kms.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"]
    run = run_module_tasks(
        tmp_path,
        kms_endpoint,
        [task("plan", key_id=key_id, statements=[stmt(principals=[ROLE], pcr0=[OLD_PCR0])])],
        check=True,
        diff=True,
    )
    (result,) = run.results
    assert result["changed"] is True and result["statements_changed"] == [SID]
    assert kms.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"] == before  # nothing written
    diff = result["diff"]
    assert json.loads(diff["before"]) == json.loads(before)
    after = json.loads(diff["after"])
    assert after == result["policy"]
    assert attested_values(after) == {P0: [OLD_PCR0]}
    assert key_id in diff["before_header"]
    # Real run then check mode again: no change predicted, diff before == after.
    run = run_module_tasks(
        tmp_path,
        kms_endpoint,
        [task("apply", key_id=key_id, statements=[stmt(principals=[ROLE], pcr0=[OLD_PCR0])])],
    )
    assert run.results[0]["changed"] is True
    run = run_module_tasks(
        tmp_path,
        kms_endpoint,
        [task("plan again", key_id=key_id, statements=[stmt(principals=[ROLE], pcr0=[OLD_PCR0])])],
        check=True,
        diff=True,
    )
    assert run.results[0]["changed"] is False
    assert run.results[0]["diff"]["before"] == run.results[0]["diff"]["after"]


def test_every_validation_failure_leaves_the_policy_alone(tmp_path, kms_endpoint, kms, key_id) -> None:
    policy = get_policy(kms, key_id)
    policy["Statement"].append(
        {"Sid": "HostDecrypt", "Effect": "Allow", "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:role/host"},
         "Action": "kms:Decrypt", "Resource": "*"}
    )  # fmt: skip
    text = kms_policy.dump_policy(policy)
    kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=text)
    ok = stmt(principals=[ROLE], pcr0=[OLD_PCR0])
    admin_sid = "Enable IAM User Permissions"
    huge = [stmt(sid=f"S{i}", principals=[ROLE], pcr0=[f"{j:02x}" * 48 for j in range(1, 81)]) for i in range(4)]
    cases = {
        "short pcr": ([stmt(principals=[ROLE], pcr0=["ab" * 47])], {}, "96 hex"),
        "non-hex pcr": ([stmt(principals=[ROLE], pcr8=["zz" * 48])], {}, "96 hex"),
        "debug pcr": ([stmt(principals=[ROLE], pcr0=["0" * 96])], {}, "debug"),
        "user principal": ([stmt(principals=[f"arn:aws:iam::{ACCOUNT}:user/bob"], pcr0=[OLD_PCR0])], {}, "role ARN"),
        "encrypt action": ([stmt(principals=[ROLE], actions=["kms:Encrypt"], pcr0=[OLD_PCR0])], {}, "cannot be bound"),
        "no measurement": ([stmt(principals=[ROLE])], {}, "no attestation condition"),
        "no principals": ([stmt(pcr0=[OLD_PCR0])], {}, "needs principals"),
        "bypass": ([stmt(principals=[f"arn:aws:iam::{ACCOUNT}:role/host"], pcr0=[OLD_PCR0])], {}, "bypass"),
        "admin sid": ([stmt(sid=admin_sid, principals=[ROLE], pcr0=[OLD_PCR0])], {}, "not an attested"),
        "admin sid absent": ([{"sid": admin_sid}], {"state": "absent"}, "not an attested"),
        "too big": (huge, {}, "32768"),
        "remove missing": ([stmt(pcr0=[OLD_PCR0])], {"pcr_values_mode": "remove"}, "does not exist"),
        "duplicate sid": ([ok, ok], {}, "more than once"),
        "bad pcr4 source": ([stmt(principals=[ROLE], pcr0=[OLD_PCR0], pcr4_instance_id=["i-nope"])], {}, "instance id"),
        "missing key": ([ok], {"key_id": "alias/does-not-exist"}, "KMS call failed"),
    }  # fmt: skip
    tasks = [task(name, **{"key_id": key_id, "statements": s, **extra}) for name, (s, extra, _) in cases.items()]
    run = run_module_tasks(tmp_path, kms_endpoint, tasks)
    for result in run.results:
        expected = cases[result["task"]][2]
        assert result.get("failed") is True, result
        assert expected in result["msg"], (result["task"], result["msg"])
        assert result.get("changed") is not True
    assert kms.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"] == text
    # The debug value passes with allow_debug_pcrs; the account-root delegation is reported as a warning.
    run = run_module_tasks(
        tmp_path,
        kms_endpoint,
        [task("debug ok", key_id=key_id, allow_debug_pcrs=True, statements=[stmt(principals=[ROLE], pcr0=["0" * 96])])],
    )
    (result,) = run.results
    assert result["changed"] is True and not result.get("failed"), json.dumps(result)
    assert attested_values(get_policy(kms, key_id)) == {P0: ["0" * 96]}
    assert any("IAM policies of account" in w for w in result.get("warnings", [])), result


def test_remove_of_the_last_value_refused_and_lockout_kept(tmp_path, kms_endpoint, kms, key_id) -> None:
    admin = f"arn:aws:iam::{ACCOUNT}:user/local-operator"  # the identity the module runs as (identities.py)
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "Admins", "Effect": "Allow", "Principal": {"AWS": admin}, "Action": "kms:*", "Resource": "*"},
        ],
    }
    kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
    run = run_module_tasks(
        tmp_path,
        kms_endpoint,
        [
            task("create", key_id=key_id, statements=[stmt(principals=[ROLE], pcr0=[OLD_PCR0])]),
            task("remove last", key_id=key_id, pcr_values_mode="remove", statements=[stmt(pcr0=[OLD_PCR0])]),
        ],
    )
    assert run.results[0]["changed"] is True
    assert run.results[1]["failed"] is True and "widen" in run.results[1]["msg"]
    assert attested_values(get_policy(kms, key_id)) == {P0: [OLD_PCR0]}
    # Someone hand-converts the admin statement into a conditioned one: the module refuses further writes.
    hijacked = copy.deepcopy(get_policy(kms, key_id))
    hijacked["Statement"][0]["Condition"] = {"StringEquals": {"aws:PrincipalTag/team": "sec"}}
    hijacked["Statement"].append(
        {
            "Sid": "Readers",
            "Effect": "Allow",
            "Principal": {"AWS": admin},
            "Action": ["kms:Get*", "kms:Describe*"],
            "Resource": "*",
        }
    )
    # KMS's own lockout check would refuse this (the writer loses PutKeyPolicy), hence the bypass.
    kms.put_key_policy(
        KeyId=key_id, PolicyName="default", Policy=json.dumps(hijacked), BypassPolicyLockoutSafetyCheck=True
    )
    run = run_module_tasks(
        tmp_path,
        kms_endpoint,
        [task("add", key_id=key_id, pcr_values_mode="add", statements=[stmt(pcr0=[NEW_PCR0])])],
    )
    assert run.results[0]["failed"] is True and "kms:PutKeyPolicy" in run.results[0]["msg"]


def test_throttling_is_retried(tmp_path, kms_endpoint, kms, key_id) -> None:
    # botocore's own retries off: every retry seen here is AWSRetry's jittered backoff in the module.
    kms_endpoint.set_faults(DescribeKey=1, GetKeyPolicy=2, PutKeyPolicy=1)
    run = run_module_tasks(
        tmp_path,
        kms_endpoint,
        [task("throttled", key_id=key_id, statements=[stmt(principals=[ROLE], pcr0=[OLD_PCR0])])],
        env={"AWS_MAX_ATTEMPTS": "1", "AWS_RETRY_MODE": "legacy"},
    )
    (result,) = run.results
    assert result["changed"] is True and not result.get("failed"), json.dumps(result)
    assert kms_endpoint.faults_left() == {"DescribeKey": 0, "GetKeyPolicy": 0, "PutKeyPolicy": 0}
    assert attested_values(get_policy(kms, key_id)) == {P0: [OLD_PCR0]}


def test_throttling_fault_file_is_real(kms_endpoint, kms, key_id) -> None:
    """The injected error is what botocore sees from AWS: a ThrottlingException (guards the test above)."""
    plain = boto3.client(
        "kms",
        region_name=REGION,
        endpoint_url=kms_endpoint.url,
        aws_access_key_id="x",
        aws_secret_access_key="y",
        config=botocore.config.Config(retries={"total_max_attempts": 1, "mode": "legacy"}),
    )
    kms_endpoint.set_faults(GetKeyPolicy=1)
    with pytest.raises(botocore.exceptions.ClientError) as info:
        plain.get_key_policy(KeyId=key_id, PolicyName="default")
    assert info.value.response["Error"]["Code"] == "ThrottlingException"
    assert plain.get_key_policy(KeyId=key_id, PolicyName="default")["Policy"]
