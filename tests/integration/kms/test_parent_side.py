"""The local KMS from the parent's side, with the documented local identities (identities.py): the
instance role cannot read the data key without an attested enclave, whatever else it tries."""

from __future__ import annotations

import datetime as dt
import json

import botocore.exceptions
import pytest
from enclave_tokenizer.cms import decrypt_enveloped_data

from nitro_emulator.local_aws.identities import INSTANCE_ROLE_KEY, KEY_ADMIN_KEY, OPERATOR_KEY
from nitro_emulator.nsm import build_attestation_document

from .conftest import MODULE_ID, OLD_PCR0, ROLE, document, get_policy, put_attested_statement, recipient

DATA_KEY_CONTEXT = {"purpose": "tokenizer-data-key"}


def code(info: pytest.ExceptionInfo) -> str:
    return info.value.response["Error"]["Code"]


@pytest.fixture
def data_key(kms, key_id) -> bytes:
    """The project's shape: the default (root) policy + the role's attested Decrypt; a data key blob."""
    put_attested_statement(kms, key_id, [OLD_PCR0], ["kms:Decrypt"])
    return kms.generate_data_key_without_plaintext(KeyId=key_id, KeySpec="AES_256", EncryptionContext=DATA_KEY_CONTEXT)[
        "CiphertextBlob"
    ]


def test_identities_answer_get_caller_identity(kms_endpoint) -> None:
    arns = {
        key: kms_endpoint.client(key, "sts").get_caller_identity()["Arn"]
        for key in (INSTANCE_ROLE_KEY, KEY_ADMIN_KEY, OPERATOR_KEY)
    }
    assert arns[INSTANCE_ROLE_KEY] == "arn:aws:sts::123456789012:assumed-role/enclave-parent/i-0123456789abcdef0"
    assert ROLE.endswith("role/enclave-parent")
    assert arns[KEY_ADMIN_KEY].startswith("arn:aws:sts::123456789012:assumed-role/nitro-enclave-key-admin/")
    assert arns[OPERATOR_KEY] == "arn:aws:iam::123456789012:user/local-operator"


def test_instance_role_without_attestation_is_denied(parent_kms, data_key) -> None:
    with pytest.raises(botocore.exceptions.ClientError) as info:
        parent_kms.decrypt(CiphertextBlob=data_key, EncryptionContext=DATA_KEY_CONTEXT)
    assert code(info) == "AccessDeniedException"
    assert "assumed-role/enclave-parent" in str(info.value) and "kms:Decrypt" in str(info.value)
    for call in (
        lambda: parent_kms.re_encrypt(
            CiphertextBlob=data_key, DestinationKeyId=parent_kms.list_keys()["Keys"][0]["KeyId"]
        ),
        lambda: parent_kms.get_key_policy(KeyId=get_key(parent_kms, data_key), PolicyName="default"),
    ):
        with pytest.raises(botocore.exceptions.ClientError) as info:
            call()
        assert code(info) == "AccessDeniedException"


def get_key(client, blob: bytes) -> str:
    return blob[:36].decode()


def test_instance_role_with_the_right_pcrs_gets_only_ciphertext_for_recipient(
    parent_kms, kms_endpoint, enclave, data_key
) -> None:
    doc = document(kms_endpoint.emulator_home, OLD_PCR0, enclave.public_der)
    answer = parent_kms.decrypt(CiphertextBlob=data_key, EncryptionContext=DATA_KEY_CONTEXT, Recipient=recipient(doc))
    assert "Plaintext" not in answer
    assert len(decrypt_enveloped_data(answer["CiphertextForRecipient"], enclave.private_key)) == 32


def test_wrong_pcrs_other_root_expired_or_replayed_documents_are_denied(
    parent_kms, kms_endpoint, enclave, data_key, tmp_path
) -> None:
    home = kms_endpoint.emulator_home
    measured = {0: bytes.fromhex(OLD_PCR0), 1: b"\x11" * 48, 2: b"\x22" * 48}
    now = dt.datetime.now(dt.UTC)
    cases = {
        "wrong PCR0": (document(home, "c3" * 48, enclave.public_der), "AccessDeniedException"),
        "another root": (document(tmp_path / "elsewhere", OLD_PCR0, enclave.public_der), "ValidationException"),
        "expired": (
            build_attestation_document(
                measured, MODULE_ID, public_key=enclave.public_der, home=home, now=now - dt.timedelta(hours=4)
            ),
            "ValidationException",
        ),
        "replayed": (
            build_attestation_document(
                measured, MODULE_ID, public_key=enclave.public_der, home=home, now=now - dt.timedelta(minutes=10)
            ),
            "ValidationException",
        ),
    }
    for name, (doc, expected) in cases.items():
        with pytest.raises(botocore.exceptions.ClientError) as info:
            parent_kms.decrypt(CiphertextBlob=data_key, EncryptionContext=DATA_KEY_CONTEXT, Recipient=recipient(doc))
        assert code(info) == expected, name
    assert "stale" in str(info.value)


def test_key_administrator_manages_the_policy_but_cannot_decrypt(admin_kms, kms_endpoint, enclave, data_key) -> None:
    key_id = get_key(admin_kms, data_key)
    policy = get_policy(admin_kms, key_id)
    admin_kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
    admin_kms.describe_key(KeyId=key_id)
    for kwargs in ({}, {"Recipient": recipient(document(kms_endpoint.emulator_home, OLD_PCR0, enclave.public_der))}):
        with pytest.raises(botocore.exceptions.ClientError) as info:
            admin_kms.decrypt(CiphertextBlob=data_key, EncryptionContext=DATA_KEY_CONTEXT, **kwargs)
        assert code(info) == "AccessDeniedException"


def test_any_matching_allow_grants_an_attested_call(kms, kms_endpoint, enclave, data_key) -> None:
    """As in AWS: the operator's IAM policies (through the root statement) grant Decrypt, attested or not."""
    doc = document(kms_endpoint.emulator_home, "d4" * 48, enclave.public_der)
    answer = kms.decrypt(CiphertextBlob=data_key, EncryptionContext=DATA_KEY_CONTEXT, Recipient=recipient(doc))
    assert "Plaintext" not in answer and answer["CiphertextForRecipient"]
    assert len(kms.decrypt(CiphertextBlob=data_key, EncryptionContext=DATA_KEY_CONTEXT)["Plaintext"]) == 32


@pytest.mark.parametrize(
    "condition",
    [["StringEquals"], "kms:RecipientAttestation:PCR0", {"StringEquals": "x"}, {"NoSuchOperator": {"a": "b"}}],
)
def test_malformed_policies_are_refused_as_aws_does(kms, parent_kms, key_id, condition) -> None:
    policy = get_policy(kms, key_id)
    policy["Statement"].append(
        {
            "Sid": "Bad",
            "Effect": "Allow",
            "Principal": {"AWS": ROLE},
            "Action": "kms:Decrypt",
            "Resource": "*",
            "Condition": condition,
        }
    )
    with pytest.raises(botocore.exceptions.ClientError) as info:
        kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
    assert code(info) == "MalformedPolicyDocumentException"
    assert info.value.response["ResponseMetadata"]["HTTPStatusCode"] == 400
    with pytest.raises(botocore.exceptions.ClientError) as info:
        kms.create_key(Policy=json.dumps(policy))
    assert code(info) == "MalformedPolicyDocumentException"
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"still works")["CiphertextBlob"]
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == b"still works"


def test_lockout_safety_check(kms, admin_kms, key_id) -> None:
    only_role = {
        "Version": "2012-10-17",
        "Statement": [{"Effect": "Allow", "Principal": {"AWS": ROLE}, "Action": "kms:Encrypt", "Resource": "*"}],
    }
    with pytest.raises(botocore.exceptions.ClientError) as info:
        kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(only_role))
    assert code(info) == "MalformedPolicyDocumentException" and "update the key policy in the future" in str(info.value)
    kms.put_key_policy(
        KeyId=key_id, PolicyName="default", Policy=json.dumps(only_role), BypassPolicyLockoutSafetyCheck=True
    )
    with pytest.raises(botocore.exceptions.ClientError) as info:
        admin_kms.get_key_policy(KeyId=key_id, PolicyName="default")
    assert code(info) == "AccessDeniedException"


def test_pcr3_pinned_policy_rehearses_the_instance_role(
    parent_kms, kms, kms_endpoint, enclave, key_id, monkeypatch
) -> None:
    """The emulated NSM measures the host's role into PCR3 (and its id into PCR4): a policy pinning the
    role (pcr3_role_arn, as kms_enclave_policy writes it) grants only enclaves on hosts with that role."""
    from nitro_emulator import state

    put_attested_statement(kms, key_id, [OLD_PCR0], ["kms:Decrypt"], pcr3_role_arn=[ROLE])
    blob = kms.encrypt(KeyId=key_id, Plaintext=b"pinned to the role")["CiphertextBlob"]

    def host_document() -> bytes:
        pcrs = {0: bytes.fromhex(OLD_PCR0), 1: b"\x11" * 48, 2: b"\x22" * 48, **state.host_pcrs()}
        return build_attestation_document(
            pcrs, MODULE_ID, public_key=enclave.public_der, home=kms_endpoint.emulator_home
        )

    monkeypatch.delenv("NITRO_EMULATOR_INSTANCE_ROLE_ARN", raising=False)  # the default: provision.yml's role
    answer = parent_kms.decrypt(CiphertextBlob=blob, Recipient=recipient(host_document()))
    assert decrypt_enveloped_data(answer["CiphertextForRecipient"], enclave.private_key) == b"pinned to the role"
    for other in ("arn:aws:iam::123456789012:role/someone-else", ""):
        monkeypatch.setenv("NITRO_EMULATOR_INSTANCE_ROLE_ARN", other)
        with pytest.raises(botocore.exceptions.ClientError) as info:
            parent_kms.decrypt(CiphertextBlob=blob, Recipient=recipient(host_document()))
        assert code(info) == "AccessDeniedException", other
