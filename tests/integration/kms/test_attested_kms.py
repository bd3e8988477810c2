"""The local KMS enforces attestation: Recipient requests against a real nitro-local-aws process."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import boto3
import botocore.exceptions
import cbor2
import pytest
from cryptography.hazmat.primitives import serialization
from enclave_tokenizer.cms import decrypt_enveloped_data

from nitro_emulator.nsm import emulator_root_pem
from tests.conftest import running_local_aws

from .conftest import (
    DUMMY_ENV,
    NEW_PCR0,
    OLD_PCR0,
    REGION,
    document,
    get_policy,
    put_attested_statement,
    recipient,
)

SECRET = b"32-byte data key for the enclave"


def error_code(info: pytest.ExceptionInfo) -> str:
    return info.value.response["Error"]["Code"]


@pytest.fixture
def attested_key(kms, key_id) -> tuple[str, bytes]:
    """A key whose policy lets the enclave role Decrypt / GenerateDataKey with PCR0 = OLD only."""
    put_attested_statement(kms, key_id, [OLD_PCR0], ["kms:Decrypt", "kms:GenerateDataKey", "kms:GenerateRandom"])
    return key_id, kms.encrypt(KeyId=key_id, Plaintext=SECRET)["CiphertextBlob"]


def test_decrypt_allowed_for_matching_pcrs_returns_only_ciphertext_for_recipient(
    parent_kms, kms, kms_endpoint, enclave, attested_key
) -> None:
    key_id, blob = attested_key
    doc = document(kms_endpoint.emulator_home, OLD_PCR0.upper(), enclave.public_der)
    answer = parent_kms.decrypt(CiphertextBlob=blob, Recipient=recipient(doc))
    assert "Plaintext" not in answer
    assert answer["KeyId"].endswith(key_id)
    assert decrypt_enveloped_data(answer["CiphertextForRecipient"], enclave.private_key) == SECRET
    # With KeyId given too (by alias) the same.
    kms.create_alias(AliasName=f"alias/attested-{key_id}", TargetKeyId=key_id)
    answer = parent_kms.decrypt(CiphertextBlob=blob, KeyId=f"alias/attested-{key_id}", Recipient=recipient(doc))
    assert decrypt_enveloped_data(answer["CiphertextForRecipient"], enclave.private_key) == SECRET


def test_decrypt_denied_for_a_different_pcr0(parent_kms, kms, kms_endpoint, enclave, attested_key) -> None:
    _, blob = attested_key
    doc = document(kms_endpoint.emulator_home, NEW_PCR0, enclave.public_der)
    with pytest.raises(botocore.exceptions.ClientError) as info:
        parent_kms.decrypt(CiphertextBlob=blob, Recipient=recipient(doc))
    assert error_code(info) == "AccessDeniedException"
    assert "not authorized to perform: kms:Decrypt" in str(info.value)
    assert NEW_PCR0 in str(info.value)  # says which measurement was refused


def test_decrypt_denied_for_a_debug_mode_document(parent_kms, kms, kms_endpoint, enclave, attested_key) -> None:
    _, blob = attested_key
    doc = document(kms_endpoint.emulator_home, OLD_PCR0, enclave.public_der, debug=True)
    with pytest.raises(botocore.exceptions.ClientError) as info:
        parent_kms.decrypt(CiphertextBlob=blob, Recipient=recipient(doc))
    assert error_code(info) == "AccessDeniedException"
    assert "0" * 96 in str(info.value)


def test_decrypt_denied_for_a_document_from_another_root(parent_kms, kms, enclave, attested_key, tmp_path) -> None:
    _, blob = attested_key
    doc = document(tmp_path / "other-emulator", OLD_PCR0, enclave.public_der)
    with pytest.raises(botocore.exceptions.ClientError) as info:
        parent_kms.decrypt(CiphertextBlob=blob, Recipient=recipient(doc))
    assert error_code(info) == "ValidationException"
    assert "root" in str(info.value)


def test_another_root_is_trusted_when_configured(tmp_path, emulator_home, enclave) -> None:
    """`nitro-local-aws --attestation-root PEM` adds a trust anchor (how the AWS root is configured)."""
    other_home = tmp_path / "other-emulator"
    root_file = tmp_path / "other-root.pem"
    root_file.write_bytes(emulator_root_pem(other_home))
    env = {**os.environ, "NITRO_EMULATOR_HOME": str(emulator_home)}
    with running_local_aws(tmp_path, env, "--attestation-root", str(root_file)) as url:
        client = boto3.client(
            "kms",
            region_name=REGION,
            endpoint_url=url,
            aws_access_key_id=DUMMY_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=DUMMY_ENV["AWS_SECRET_ACCESS_KEY"],
        )
        key_id = client.create_key()["KeyMetadata"]["KeyId"]
        put_attested_statement(client, key_id, [OLD_PCR0], ["kms:Decrypt"])
        blob = client.encrypt(KeyId=key_id, Plaintext=SECRET)["CiphertextBlob"]
        for home in (other_home, emulator_home):  # the configured root and the default one
            answer = client.decrypt(
                CiphertextBlob=blob, Recipient=recipient(document(home, OLD_PCR0, enclave.public_der))
            )
            assert decrypt_enveloped_data(answer["CiphertextForRecipient"], enclave.private_key) == SECRET
        third = document(tmp_path / "third", OLD_PCR0, enclave.public_der)
        with pytest.raises(botocore.exceptions.ClientError) as info:
            client.decrypt(CiphertextBlob=blob, Recipient=recipient(third))
        assert error_code(info) == "ValidationException"


def test_tampered_or_unusable_documents_refused(parent_kms, kms, kms_endpoint, enclave, attested_key) -> None:
    _, blob = attested_key
    good = document(kms_endpoint.emulator_home, OLD_PCR0, enclave.public_der)
    envelope = cbor2.loads(good)
    payload = cbor2.loads(envelope[2])
    payload["pcrs"][0] = bytes.fromhex(NEW_PCR0)  # claims another image; signature no longer matches
    forged = cbor2.dumps([envelope[0], envelope[1], cbor2.dumps(payload), envelope[3]])
    no_key = document(kms_endpoint.emulator_home, OLD_PCR0, None)
    for doc, reason in ((forged, "signature"), (no_key, "public_key"), (b"\x84garbage", "not valid")):
        with pytest.raises(botocore.exceptions.ClientError) as info:
            parent_kms.decrypt(CiphertextBlob=blob, Recipient=recipient(doc))
        assert error_code(info) == "ValidationException", doc[:10]
        assert reason in str(info.value)
    with pytest.raises(botocore.exceptions.ClientError) as info:
        parent_kms.decrypt(
            CiphertextBlob=blob, Recipient={"AttestationDocument": good, "KeyEncryptionAlgorithm": "RSA_PKCS1"}
        )
    assert error_code(info) == "ValidationException"


def test_rotation_both_values_then_only_new(parent_kms, kms, kms_endpoint, enclave, key_id) -> None:
    blob = kms.encrypt(KeyId=key_id, Plaintext=SECRET)["CiphertextBlob"]
    old_doc = document(kms_endpoint.emulator_home, OLD_PCR0, enclave.public_der)
    new_doc = document(kms_endpoint.emulator_home, NEW_PCR0, enclave.public_der)
    put_attested_statement(kms, key_id, [OLD_PCR0, NEW_PCR0], ["kms:Decrypt"])
    for doc in (old_doc, new_doc):
        answer = parent_kms.decrypt(CiphertextBlob=blob, Recipient=recipient(doc))
        assert decrypt_enveloped_data(answer["CiphertextForRecipient"], enclave.private_key) == SECRET
    put_attested_statement(kms, key_id, [NEW_PCR0], ["kms:Decrypt"])
    parent_kms.decrypt(CiphertextBlob=blob, Recipient=recipient(new_doc))
    with pytest.raises(botocore.exceptions.ClientError) as info:
        parent_kms.decrypt(CiphertextBlob=blob, Recipient=recipient(old_doc))
    assert error_code(info) == "AccessDeniedException"


def test_all_conditions_must_match(parent_kms, kms, kms_endpoint, enclave, key_id) -> None:
    """Several keys are AND'ed: PCR0 right but PCR8 wrong is denied."""
    pcr8 = "c3" * 48
    put_attested_statement(kms, key_id, [OLD_PCR0], ["kms:Decrypt"], pcr8=[pcr8])
    blob = kms.encrypt(KeyId=key_id, Plaintext=SECRET)["CiphertextBlob"]
    home = kms_endpoint.emulator_home
    ok = document(home, OLD_PCR0, enclave.public_der, pcrs={8: bytes.fromhex(pcr8)})
    parent_kms.decrypt(CiphertextBlob=blob, Recipient=recipient(ok))
    for doc in (
        document(home, OLD_PCR0, enclave.public_der),
        document(home, OLD_PCR0, enclave.public_der, pcrs={8: b"\x01" * 48}),
    ):
        with pytest.raises(botocore.exceptions.ClientError) as info:
            parent_kms.decrypt(CiphertextBlob=blob, Recipient=recipient(doc))
        assert error_code(info) == "AccessDeniedException"


def test_default_policy_and_explicit_deny(parent_kms, kms, kms_endpoint, enclave, key_id) -> None:
    """The default policy's root statement grants the role only what its IAM policies grant (nothing);
    an explicit Deny beats the attested Allow."""
    blob = kms.encrypt(KeyId=key_id, Plaintext=SECRET)["CiphertextBlob"]
    doc = document(kms_endpoint.emulator_home, OLD_PCR0, enclave.public_der)
    with pytest.raises(botocore.exceptions.ClientError) as info:
        parent_kms.decrypt(CiphertextBlob=blob, Recipient=recipient(doc))
    assert error_code(info) == "AccessDeniedException"
    put_attested_statement(kms, key_id, [OLD_PCR0], ["kms:Decrypt"])
    policy = get_policy(kms, key_id)
    policy["Statement"].append(
        {"Sid": "Freeze", "Effect": "Deny", "Principal": "*", "Action": "kms:Decrypt", "Resource": "*"}
    )
    kms.put_key_policy(KeyId=key_id, PolicyName="default", Policy=json.dumps(policy))
    with pytest.raises(botocore.exceptions.ClientError) as info:
        parent_kms.decrypt(CiphertextBlob=blob, Recipient=recipient(doc))
    assert error_code(info) == "AccessDeniedException" and "Freeze" in str(info.value)


def test_action_must_be_in_the_statement(parent_kms, kms, kms_endpoint, enclave, key_id) -> None:
    put_attested_statement(kms, key_id, [OLD_PCR0], ["kms:Decrypt"])
    doc = document(kms_endpoint.emulator_home, OLD_PCR0, enclave.public_der)
    for call in (
        lambda: parent_kms.generate_data_key(KeyId=key_id, KeySpec="AES_256", Recipient=recipient(doc)),
        lambda: parent_kms.generate_data_key_pair(KeyId=key_id, KeyPairSpec="RSA_2048", Recipient=recipient(doc)),
    ):
        with pytest.raises(botocore.exceptions.ClientError) as info:
            call()
        assert error_code(info) == "AccessDeniedException"


def test_generate_data_key_with_recipient(parent_kms, kms, kms_endpoint, enclave, attested_key) -> None:
    key_id, _ = attested_key
    doc = document(kms_endpoint.emulator_home, OLD_PCR0, enclave.public_der)
    answer = parent_kms.generate_data_key(KeyId=key_id, KeySpec="AES_256", Recipient=recipient(doc))
    assert "Plaintext" not in answer
    data_key = decrypt_enveloped_data(answer["CiphertextForRecipient"], enclave.private_key)
    assert len(data_key) == 32
    # CiphertextBlob is the same data key under the KMS key: an attested Decrypt gives it back.
    again = parent_kms.decrypt(CiphertextBlob=answer["CiphertextBlob"], Recipient=recipient(doc))
    assert decrypt_enveloped_data(again["CiphertextForRecipient"], enclave.private_key) == data_key


def test_generate_data_key_pair_with_and_without_recipient(parent_kms, kms, kms_endpoint, enclave, key_id) -> None:
    put_attested_statement(kms, key_id, [OLD_PCR0], ["kms:GenerateDataKeyPair"])
    doc = document(kms_endpoint.emulator_home, OLD_PCR0, enclave.public_der)
    answer = parent_kms.generate_data_key_pair(KeyId=key_id, KeyPairSpec="ECC_NIST_P384", Recipient=recipient(doc))
    assert "PrivateKeyPlaintext" not in answer
    private_der = decrypt_enveloped_data(answer["CiphertextForRecipient"], enclave.private_key)
    private = serialization.load_der_private_key(private_der, password=None)
    public = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    assert public == answer["PublicKey"]
    assert kms.decrypt(CiphertextBlob=answer["PrivateKeyCiphertextBlob"])["Plaintext"] == private_der
    # Without Recipient: the ordinary (non-attested) shape.
    plain = kms.generate_data_key_pair(KeyId=key_id, KeyPairSpec="RSA_2048")
    assert {"PrivateKeyPlaintext", "PrivateKeyCiphertextBlob", "PublicKey"} <= set(plain)
    with pytest.raises(botocore.exceptions.ClientError) as info:
        kms.generate_data_key_pair(KeyId=key_id, KeyPairSpec="RSA_1024")
    assert error_code(info) == "ValidationException"


def test_generate_random_with_recipient(parent_kms, kms, kms_endpoint, enclave) -> None:
    # GenerateRandom has no key: IAM decides. The operator's IAM policies allow it...
    doc = document(kms_endpoint.emulator_home, OLD_PCR0, enclave.public_der)
    answer = kms.generate_random(NumberOfBytes=48, Recipient=recipient(doc))
    assert "Plaintext" not in answer
    assert len(decrypt_enveloped_data(answer["CiphertextForRecipient"], enclave.private_key)) == 48
    other_root = document(Path(kms_endpoint.faults.parent) / "elsewhere", OLD_PCR0, enclave.public_der)
    with pytest.raises(botocore.exceptions.ClientError) as info:
        kms.generate_random(NumberOfBytes=48, Recipient=recipient(other_root))
    assert error_code(info) == "ValidationException"
    # ...the instance role has no IAM policy (provision.yml attaches none), so it is denied.
    with pytest.raises(botocore.exceptions.ClientError) as info:
        parent_kms.generate_random(NumberOfBytes=48, Recipient=recipient(doc))
    assert error_code(info) == "AccessDeniedException"


def test_without_recipient_moto_behaviour_is_unchanged(kms, attested_key) -> None:
    key_id, blob = attested_key
    assert kms.decrypt(CiphertextBlob=blob)["Plaintext"] == SECRET
    answer = kms.generate_data_key(KeyId=key_id, KeySpec="AES_128")
    assert len(answer["Plaintext"]) == 16
    assert len(base64.b64encode(kms.generate_random(NumberOfBytes=8)["Plaintext"])) == 12
    assert "CiphertextBlob" in kms.generate_data_key_without_plaintext(KeyId=key_id, KeySpec="AES_256")
