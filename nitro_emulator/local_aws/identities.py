"""Who a local caller is: access key id -> IAM principal, and what that principal's IAM policies allow.

AWS decides a KMS request from the key policy *and*, where the key policy names the account
(`arn:aws:iam::<account>:root`), from the caller's IAM policies. moto models neither, so the local
endpoint keeps a small, documented table (README "Local identities"):

| access key id         | principal (GetCallerIdentity Arn)                     | IAM policies (KMS part)     |
| --------------------- | ----------------------------------------------------- | --------------------------- |
| `local-instance-role` | role `enclave-parent` (session `i-0123456789abcdef0`) | none (provision.yml: none)  |
| `local-key-admin`     | role `nitro-enclave-key-admin`                        | key administration, no use  |
| any other             | user `local-operator`                                 | AdministratorAccess (`*`)   |

"Any other" keeps moto's convention that any credentials work (the controller's `local-endpoint`);
it is the one place the endpoint is kinder than AWS, which rejects unknown keys
(UnrecognizedClientException). The account is moto's (`123456789012` unless `MOTO_ACCOUNT_ID`); the
instance role's name and session follow the emulated host (`NITRO_LOCAL_AWS_INSTANCE_ROLE`,
`NITRO_LOCAL_AWS_INSTANCE_ID`, the values the emulated NSM measures into PCR3/PCR4).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field

INSTANCE_ROLE_KEY = "local-instance-role"
KEY_ADMIN_KEY = "local-key-admin"
OPERATOR_KEY = "local-endpoint"
DEFAULT_INSTANCE_ROLE = "enclave-parent"
DEFAULT_INSTANCE_ID = "i-0123456789abcdef0"
KEY_ADMIN_ROLE = "nitro-enclave-key-admin"
INSTANCE_ROLE_ENV = "NITRO_LOCAL_AWS_INSTANCE_ROLE"
INSTANCE_ID_ENV = "NITRO_LOCAL_AWS_INSTANCE_ID"
# AWS's "key administrators" action set (the console's default key policy): manage, never use.
KEY_ADMIN_ACTIONS = (
    "kms:Create*",
    "kms:Describe*",
    "kms:Enable*",
    "kms:List*",
    "kms:Put*",
    "kms:Update*",
    "kms:Revoke*",
    "kms:Disable*",
    "kms:Get*",
    "kms:Delete*",
    "kms:TagResource",
    "kms:UntagResource",
    "kms:ScheduleKeyDeletion",
    "kms:CancelKeyDeletion",
)


@dataclass(frozen=True)
class Identity:
    """A caller: `principal` is what key policies name (the role ARN for a role session)."""

    arn: str  # GetCallerIdentity's Arn (the session ARN for a role)
    principal: str
    account: str
    user_id: str
    iam_actions: tuple[str, ...] = field(default=())  # IAM Allow patterns for `Resource: *`

    def iam_statement(self) -> Mapping[str, object]:
        return {"Effect": "Allow", "Action": list(self.iam_actions), "Resource": "*"}


def instance_role_name() -> str:
    return os.environ.get(INSTANCE_ROLE_ENV) or DEFAULT_INSTANCE_ROLE


def instance_id() -> str:
    return os.environ.get(INSTANCE_ID_ENV) or DEFAULT_INSTANCE_ID


def instance_role_arn(account: str) -> str:
    return f"arn:aws:iam::{account}:role/{instance_role_name()}"


def identity_for(access_key_id: str | None, account: str) -> Identity:
    if access_key_id == INSTANCE_ROLE_KEY:
        role = instance_role_name()
        return Identity(
            arn=f"arn:aws:sts::{account}:assumed-role/{role}/{instance_id()}",
            principal=instance_role_arn(account),
            account=account,
            user_id=f"AROALOCALINSTANCEROLE:{instance_id()}",
        )
    if access_key_id == KEY_ADMIN_KEY:
        return Identity(
            arn=f"arn:aws:sts::{account}:assumed-role/{KEY_ADMIN_ROLE}/local-key-admin",
            principal=f"arn:aws:iam::{account}:role/{KEY_ADMIN_ROLE}",
            account=account,
            user_id="AROALOCALKEYADMIN:local-key-admin",
            iam_actions=KEY_ADMIN_ACTIONS,
        )
    return Identity(
        arn=f"arn:aws:iam::{account}:user/local-operator",
        principal=f"arn:aws:iam::{account}:user/local-operator",
        account=account,
        user_id="AIDALOCALOPERATOR",
        iam_actions=("*",),
    )


_CREDENTIAL = re.compile(r"Credential=([^/,\s]{1,128})/")


def access_key_of(headers: Mapping[str, str]) -> str | None:
    """The SigV4 access key id of a request (moto only recognises 20-character AKIA-style ids)."""
    match = _CREDENTIAL.search(headers.get("Authorization") or "")
    return match.group(1) if match else None


def install(**_: object) -> None:
    """GetCallerIdentity answers from the same table, so `kms_enclave_policy` finds the account and
    principal the way it does on AWS."""
    from moto.sts.responses import TokenResponse

    if getattr(TokenResponse, "_nitro_identities", False):
        return
    original = TokenResponse.get_caller_identity

    def get_caller_identity(self: TokenResponse) -> object:
        access_key = access_key_of(self.headers)
        if access_key is None or self.backend.get_assumed_role_from_access_key(access_key):
            return original(self)
        from moto.core.responses import ActionResult

        who = identity_for(access_key, self.current_account)
        return ActionResult({"UserId": who.user_id, "Account": who.account, "Arn": who.arn})

    TokenResponse.get_caller_identity = get_caller_identity  # type: ignore[method-assign]
    TokenResponse._nitro_identities = True  # type: ignore[attr-defined]
