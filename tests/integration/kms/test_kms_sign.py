"""KMS Sign/Verify/GetPublicKey on the local endpoint with AWS semantics, and EIF signing with a KMS key
(build-enclave/sign-eif `--private-key <key ARN>`), as aws-nitro-enclaves-cose's KmsKey signs: the SHA-384
digest of the COSE Sig_structure, MessageType DIGEST, ECDSA_SHA_384, DER signature turned into r||s."""

from __future__ import annotations

import datetime as dt
import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import eif
from botocore.exceptions import ClientError
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, utils
from cryptography.x509.oid import NameOID

from nitro_emulator import eif_writer, signing
from nitro_emulator.local_aws.identities import INSTANCE_ROLE_KEY, OPERATOR_KEY
from tests.conftest import VENV_BIN
from tests.integration.ec2.conftest import DUMMY_ENV, REGION

from .conftest import KmsEndpoint, kms_key_certificate


@pytest.fixture
def signing_key(kms: Any) -> dict[str, Any]:
    return kms.create_key(KeySpec="ECC_NIST_P384", KeyUsage="SIGN_VERIFY")["KeyMetadata"]


def test_sign_raw_and_digest_as_aws(kms: Any, signing_key: dict[str, Any]) -> None:
    assert signing_key["SigningAlgorithms"] == ["ECDSA_SHA_384"]
    public = serialization.load_der_public_key(kms.get_public_key(KeyId=signing_key["KeyId"])["PublicKey"])
    assert isinstance(public, ec.EllipticCurvePublicKey) and public.curve.name == "secp384r1"
    message = b"the bytes to sign"
    raw = kms.sign(KeyId=signing_key["Arn"], Message=message, SigningAlgorithm="ECDSA_SHA_384")
    assert raw["KeyId"] == signing_key["Arn"] and raw["SigningAlgorithm"] == "ECDSA_SHA_384"
    public.verify(raw["Signature"], message, ec.ECDSA(hashes.SHA384()))  # DER, over the raw message
    digest = hashlib.sha384(message).digest()
    pre = kms.sign(KeyId=signing_key["KeyId"], Message=digest, MessageType="DIGEST", SigningAlgorithm="ECDSA_SHA_384")
    public.verify(pre["Signature"], digest, ec.ECDSA(utils.Prehashed(hashes.SHA384())))
    public.verify(pre["Signature"], message, ec.ECDSA(hashes.SHA384()))  # same thing, said twice
    ok = kms.verify(
        KeyId=signing_key["KeyId"],
        Message=digest,
        MessageType="DIGEST",
        Signature=pre["Signature"],
        SigningAlgorithm="ECDSA_SHA_384",
    )
    assert ok["SignatureValid"] is True
    with pytest.raises(ClientError) as bad:
        kms.verify(
            KeyId=signing_key["KeyId"], Message=b"other", Signature=raw["Signature"], SigningAlgorithm="ECDSA_SHA_384"
        )
    assert bad.value.response["Error"]["Code"] == "KMSInvalidSignatureException"


@pytest.mark.parametrize(
    ("kwargs", "code", "text"),
    [
        ({"Message": b"short", "MessageType": "DIGEST"}, "ValidationException", "Digest is invalid length"),
        ({"Message": b"x", "SigningAlgorithm": "ECDSA_SHA_256"}, "InvalidKeyUsageException", "ECDSA_SHA_384"),
        ({"Message": b"x" * 4097}, "ValidationException", "4096"),
    ],
)
def test_sign_refusals(kms: Any, signing_key: dict[str, Any], kwargs: dict[str, Any], code: str, text: str) -> None:
    args = {"KeyId": signing_key["KeyId"], "SigningAlgorithm": "ECDSA_SHA_384", **kwargs}
    with pytest.raises(ClientError) as refused:
        kms.sign(**args)
    assert refused.value.response["Error"]["Code"] == code and text in refused.value.response["Error"]["Message"]


def test_sign_needs_a_sign_verify_key_and_permission(
    kms_endpoint: KmsEndpoint, kms: Any, signing_key: dict[str, Any]
) -> None:
    symmetric = kms.create_key()["KeyMetadata"]["KeyId"]
    with pytest.raises(ClientError) as usage:
        kms.sign(KeyId=symmetric, Message=b"x", SigningAlgorithm="ECDSA_SHA_384")
    assert usage.value.response["Error"]["Code"] == "InvalidKeyUsageException"
    instance = kms_endpoint.client(INSTANCE_ROLE_KEY)  # no IAM policy grants it kms:Sign
    with pytest.raises(ClientError) as denied:
        instance.sign(KeyId=signing_key["KeyId"], Message=b"x", SigningAlgorithm="ECDSA_SHA_384")
    assert denied.value.response["Error"]["Code"] == "AccessDeniedException"


def test_eif_signed_with_a_kms_key(
    kms_endpoint: KmsEndpoint, kms: Any, signing_key: dict[str, Any], tmp_path: Path
) -> None:
    cert = kms_key_certificate(kms, signing_key, tmp_path / "kms.crt")
    path = tmp_path / "kms.eif"
    metadata = eif.make_metadata("t", "1", dict.fromkeys(eif.BUILD_INFO_KEYS, "x"))
    eif_writer.write_eif(path, kernel=b"K", cmdline="c", ramdisks=[b"A", b"B"], metadata=metadata)
    env = {
        **os.environ,
        **DUMMY_ENV,
        "AWS_ACCESS_KEY_ID": OPERATOR_KEY,
        "AWS_ENDPOINT_URL_KMS": kms_endpoint.url,
        "AWS_DEFAULT_REGION": REGION,
    }
    arn = signing_key["Arn"]
    assert signing.KMS_KEY_ARN.match(arn), arn
    done = subprocess.run(
        [
            str(VENV_BIN / "nitro-cli-emulator"),
            "sign-eif",
            "--eif-path",
            str(path),
            "--signing-certificate",
            str(cert),
            "--private-key",
            arn,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    image = eif.read_eif(path)
    assert image.pcrs["PCR8"] == eif.pcr8_from_certificate(cert.read_bytes())
    signing.verify_before_run(path)
    info, check = signing.certificate_inspector(image.signatures[0], image.pcrs["PCR0"])
    assert check is True and info["IssuerName"] == {"commonName": "test-ca"}
    # A certificate that is not the KMS key's is refused before anything is written.
    other = tmp_path / "other.crt"
    other_key = ec.generate_private_key(ec.SECP384R1())
    other.write_bytes(
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .issuer_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "x")]))
        .public_key(other_key.public_key())
        .serial_number(1)
        .not_valid_before(dt.datetime.now(dt.UTC) - dt.timedelta(days=1))
        .not_valid_after(dt.datetime.now(dt.UTC) + dt.timedelta(days=1))
        .sign(other_key, hashes.SHA384())
        .public_bytes(serialization.Encoding.PEM)
    )
    before = path.read_bytes()
    refused = subprocess.run(
        [
            str(VENV_BIN / "nitro-cli-emulator"),
            "sign-eif",
            "--eif-path",
            str(path),
            "--signing-certificate",
            str(other),
            "--private-key",
            arn,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert refused.returncode == 60 and "does not match the private key" in refused.stderr
    assert path.read_bytes() == before
