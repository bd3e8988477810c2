"""kms_enclave_key names the default principals' account without STS when the key exists: a key found by
alias name is in the credentials' own account, and its metadata says which (one client and call fewer)."""

from __future__ import annotations

from typing import Any

import pytest
from nitro_fakes import load_module

KEY_META = {
    "KeyId": "1234abcd-12ab-34cd-56ef-1234567890ab",
    "AWSAccountId": "210987654321",
    "Arn": "arn:aws-us-gov:kms:us-gov-west-1:210987654321:key/1234abcd-12ab-34cd-56ef-1234567890ab",
}


class FakeSts:
    def get_caller_identity(self, **_: Any) -> dict[str, str]:
        return {"Account": "111122223333", "Arn": "arn:aws:sts::111122223333:assumed-role/ops/session"}


class FakeModule:
    def __init__(self) -> None:
        self.clients: list[str] = []

    def client(self, service: str, **_: Any) -> FakeSts:
        self.clients.append(service)
        return FakeSts()


def _params(account_id: str = "") -> dict[str, Any]:
    statement = {"sid": "EnclaveDecrypt", "principal_role_names": ["enclave-parent"], "pcr0": ["ab" * 48]}
    return {"statements": [statement], "account_id": account_id, "allow_debug_pcrs": False}


def _principals(specs: list[Any]) -> list[str]:
    (spec,) = specs
    return list(spec.principals)


@pytest.mark.parametrize(
    ("meta", "account_id", "clients", "principal"),
    [
        (KEY_META, "", [], "arn:aws-us-gov:iam::210987654321:role/enclave-parent"),  # the key's account, no STS
        (None, "", ["sts"], "arn:aws:iam::111122223333:role/enclave-parent"),  # a key to create: STS says
        (KEY_META, "444455556666", [], "arn:aws:iam::444455556666:role/enclave-parent"),  # account_id wins
    ],
)
def test_the_default_principals_account(meta: Any, account_id: str, clients: list[str], principal: str) -> None:
    module, result = FakeModule(), {}
    specs = load_module("kms_enclave_key").statement_specs(module, _params(account_id), result, meta)
    assert module.clients == clients
    assert _principals(specs) == [principal] and result["account"] == principal.split(":")[4]
