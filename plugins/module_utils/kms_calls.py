"""The KMS and STS calls of the attested key policy: read, merge (kms_policy), write; the account role
names resolve in. Shared by the kms_enclave_policy and kms_enclave_key modules (boto3 clients made by
AnsibleAWSModule with KMS_RETRY)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ansible_collections.amazon.aws.plugins.module_utils.retries import AWSRetry

from .kms_policy import MergeResult, StatementSpec, apply_statements, dump_policy, load_policy

# KMS reports quota throttling as "ThrottlingException", which AWSRetry does not retry by default.
# Throttling on a busy account is normal during fleet rollouts; back off with jitter.
KMS_RETRY = AWSRetry.jittered_backoff(retries=8, delay=1, max_delay=20, catch_extra_error_codes=["ThrottlingException"])

# The options of one attested statement (kms_enclave_policy's and kms_enclave_key's statements; documented
# by the doc fragment nitro_enclaves.fleet.kms_statements). image_sha384 is PCR0 under another name;
# pcr3_role_arn / pcr4_instance_id are converted to PCR3 / PCR4 values.
MEASUREMENT_OPTIONS = ["image_sha384"] + [f"pcr{i}" for i in range(9)] + ["pcr3_role_arn", "pcr4_instance_id"]
STATEMENT_OPTIONS: dict[str, dict] = dict(
    sid=dict(type="str", required=True),
    principals=dict(type="list", elements="str"),
    actions=dict(type="list", elements="str"),
    **{name: dict(type="list", elements="str") for name in MEASUREMENT_OPTIONS},
)


@dataclass
class PolicySync:
    key_id: str
    key_arn: str
    before: dict[str, Any]
    result: MergeResult


def sync_key_policy(
    client: Any,
    key_id: str,
    specs: Sequence[StatementSpec],
    *,
    state: str,
    mode: str,
    check_mode: bool,
    meta: Mapping[str, Any] | None = None,
) -> PolicySync:
    """Merge the attested statements into the key's policy and write it when it changed (not in check
    mode). ``meta``: the key's DescribeKey answer when the caller has it (one call fewer). Raises
    kms_policy.PolicyError for a policy to refuse, botocore errors for failed calls."""
    if meta is None:
        meta = client.describe_key(KeyId=key_id, aws_retry=True)["KeyMetadata"]
    text = client.get_key_policy(KeyId=meta["KeyId"], PolicyName="default", aws_retry=True)["Policy"]
    before = load_policy(text)
    result = apply_statements(before, specs, state=state, mode=mode)
    if result.changed and not check_mode:
        policy = dump_policy(result.policy)
        client.put_key_policy(KeyId=meta["KeyId"], PolicyName="default", Policy=policy, aws_retry=True)
    return PolicySync(key_id=meta["KeyId"], key_arn=meta["Arn"], before=before, result=result)


def caller_account(sts: Any) -> tuple[str, str]:
    """(account, partition) of the credentials, from STS GetCallerIdentity (needs no permission)."""
    identity = sts.get_caller_identity(aws_retry=True)
    return identity["Account"], identity["Arn"].split(":")[1]


def key_account(meta: dict) -> tuple[str, str]:
    """(account, partition) of a key's metadata. A key found by alias name is in the credentials' own account
    (KMS resolves an alias name only there), so this is what caller_account would say, without STS."""
    return meta["AWSAccountId"], meta["Arn"].split(":")[1]


def role_arns(names: Sequence[str], account: str, partition: str = "aws") -> list[str]:
    """IAM role ARNs for role names (or paths, ``path/name``) in ``account``."""
    return [f"arn:{partition}:iam::{account}:role/{name.lstrip('/')}" for name in names]
