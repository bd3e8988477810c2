"""Attestation-enforcing KMS for the local endpoint: a thin layer on moto's KMS response handlers.

moto 5.2 ignores `Recipient` (it returns plaintext) and never evaluates key-policy conditions. With this
layer, `Decrypt`, `GenerateDataKey`, `GenerateDataKeyPair` and `GenerateRandom` that carry
`Recipient={AttestationDocument, KeyEncryptionAlgorithm: RSAES_OAEP_SHA_256}` behave as AWS documents:

1. the attestation document is verified (COSE signature, certificate chain, validity now, made within
   MAX_DOCUMENT_AGE) against the trusted roots: the emulator's root (`nitro_emulator.nsm.emulator_root_pem()`)
   plus any `--attestation-root` PEMs (e.g. the AWS Nitro root);
2. its PCRs become the `kms:RecipientAttestation:*` condition keys of the request (below);
3. the secret is returned only as `CiphertextForRecipient` (CMS EnvelopedData to the document's RSA public
   key, in KMS's BER encoding, `enclave_tokenizer.cms`), never as `Plaintext`.

Every request is authorised as AWS does it (`_authorize_request`, before moto runs):
- the caller is the principal its access key maps to (`identities.py`: instance role, key administrator,
  operator), with that principal's IAM permissions;
- the key policy is evaluated with `kms_policy.evaluate` (plugins/module_utils): explicit Deny wins, any
  matching Allow grants (attested or not), a statement naming the account root grants what the caller's
  IAM policies grant; `kms:RecipientAttestation:*` keys exist only when the request carries a verified
  `Recipient`, so an Allow conditioned on them never grants a request without one;
- actions without a key (CreateKey, ListKeys, GenerateRandom...) are decided by IAM permissions alone.
Denied -> `AccessDeniedException` naming the caller, action and key. PutKeyPolicy / CreateKey refuse a
policy AWS would refuse (`MalformedPolicyDocumentException`, including the lockout safety check), and
request bodies are checked against botocore's model first (`kms_requests.py`), so no input reaches
moto in a shape it would answer with HTTP 500.

Remaining differences, documented: an attestation document older than MAX_DOCUMENT_AGE (5 minutes)
is refused as stale (AWS's window is not published); principals named in a policy are not checked for
existence; an unverifiable document is answered with `ValidationException` naming the failed check
(AWS's exact error code for that case is not documented in the sources we have).

Test hook: when env `NITRO_LOCAL_AWS_KMS_FAULTS` names a JSON file `{"<Action>": <n>, ...}`, the next n
calls of each action are answered with `ThrottlingException` (the file is decremented), so retry logic
can be tested against the real server. Without the variable nothing is read.
"""

from __future__ import annotations

import base64
import binascii
import datetime as dt
import json
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from moto.core.exceptions import JsonRESTError
from moto.kms.exceptions import ValidationException
from moto.kms.responses import KmsResponse

from . import kms_sign

KEY_ENCRYPTION_ALGORITHM = "RSAES_OAEP_SHA_256"
FAULTS_ENV = "NITRO_LOCAL_AWS_KMS_FAULTS"
KEY_PAIR_SPECS = ("RSA_2048", "RSA_3072", "RSA_4096", "ECC_NIST_P256", "ECC_NIST_P384", "ECC_NIST_P521")

_LOG = logging.getLogger("nitro-local-aws")
_state: dict[str, Any] = {"extra_roots": [], "roots": None}
_lock = threading.Lock()


class AccessDeniedException(JsonRESTError):
    # moto's own class blanks the message; AWS sends one and clients show it.
    code = 400

    def __init__(self, message: str) -> None:
        super().__init__("AccessDeniedException", message)


class ThrottlingException(JsonRESTError):
    code = 400

    def __init__(self) -> None:
        super().__init__("ThrottlingException", "Rate exceeded")


def _read_root(spec: str) -> bytes:
    if spec.lstrip().startswith("-----BEGIN"):
        return spec.encode()
    return Path(spec).read_bytes()


def trusted_roots() -> list[bytes]:
    """Emulator root (created on first use under NITRO_EMULATOR_HOME) + configured roots."""
    with _lock:
        if _state["roots"] is None:
            from nitro_emulator.nsm import emulator_root_pem

            _state["roots"] = [emulator_root_pem(), *_state["extra_roots"]]
        return list(_state["roots"])


MAX_DOCUMENT_AGE = dt.timedelta(minutes=5)
RECIPIENT_ACTIONS = ("Decrypt", "DeriveSharedSecret", "GenerateDataKey", "GenerateDataKeyPair", "GenerateRandom")
# Actions AWS authorises with IAM policies only (no key, or the key does not exist yet).
KEYLESS_ACTIONS = ("CreateKey", "ListKeys", "ListAliases", "GenerateRandom", "ListRetirableGrants", "RetireGrant")


class MalformedPolicyDocumentException(JsonRESTError):
    code = 400

    def __init__(self, message: str) -> None:
        super().__init__("MalformedPolicyDocumentException", message)


def _identity(self: KmsResponse) -> Any:
    from . import identities

    return identities.identity_for(identities.access_key_of(self.headers), self.current_account)


def _verify_recipient(self: KmsResponse) -> Any | None:
    """The verified attestation document of the request's Recipient, or None without Recipient."""
    if hasattr(self, "_nitro_attestation"):
        return self._nitro_attestation
    recipient = self._get_param("Recipient")
    if recipient is None:
        return None
    if not isinstance(recipient, dict):
        raise ValidationException("Recipient must be a structure")
    algorithm = recipient.get("KeyEncryptionAlgorithm", KEY_ENCRYPTION_ALGORITHM)
    if algorithm != KEY_ENCRYPTION_ALGORITHM:
        raise ValidationException(
            f"1 validation error detected: Value '{str(algorithm)[:64]}' at 'recipient.keyEncryptionAlgorithm' "
            f"failed to satisfy constraint: Member must satisfy enum value set: [{KEY_ENCRYPTION_ALGORITHM}]"
        )
    try:
        document = base64.b64decode(recipient.get("AttestationDocument") or "", validate=True)
    except (binascii.Error, ValueError, TypeError) as exc:
        raise ValidationException("Recipient.AttestationDocument is not valid base64") from exc
    if not 1 <= len(document) <= 262144:
        raise ValidationException("Recipient.AttestationDocument must be 1..262144 bytes")
    from enclave_tokenizer.attestation import AttestationError, verify_attestation_document

    try:
        # Debug documents verify; the key policy decides (their PCR0 is zero, which policies refuse).
        result = verify_attestation_document(document, root_pem=trusted_roots(), allow_debug=True)
    except AttestationError as exc:
        raise ValidationException(f"The attestation document is not valid: {exc}") from exc
    now = dt.datetime.now(dt.UTC)
    if not now - MAX_DOCUMENT_AGE <= result.timestamp <= now + MAX_DOCUMENT_AGE:
        raise ValidationException(
            f"The attestation document is stale: it was made at {result.timestamp.isoformat()}, more than "
            f"{int(MAX_DOCUMENT_AGE.total_seconds())} s from now; request a fresh one for each call"
        )
    if not result.public_key:
        raise ValidationException("The attestation document has no public_key to encrypt the response to")
    return result


def _key_of_blob(self: KmsResponse, param: str) -> str | None:
    """moto's ciphertext blobs start with the 36-character key id (how Decrypt finds the key)."""
    blob = self._get_param(param)  # moto's _get_param has base64-decoded it already
    if not isinstance(blob, bytes):
        return None
    try:
        return blob[:36].decode("ascii")
    except UnicodeDecodeError:
        return None


def _find_key(self: KmsResponse, key_id: Any) -> Any | None:
    if not isinstance(key_id, str) or not key_id:
        return None
    backend = self.kms_backend
    try:
        return backend.keys.get(backend.any_id_to_key_id(key_id))
    except (KeyError, ValueError, IndexError, AttributeError, JsonRESTError):
        return None


def _keys_for(self: KmsResponse, action: str) -> list[tuple[str, Any]]:
    """(IAM action, key) pairs the request needs; a key that does not exist is left to moto (NotFound)."""
    if action in KEYLESS_ACTIONS:
        return []
    if action == "ReEncrypt":
        source = _find_key(self, self._get_param("SourceKeyId") or _key_of_blob(self, "CiphertextBlob"))
        target = _find_key(self, self._get_param("DestinationKeyId"))
        return [(f"kms:{name}", key) for name, key in (("ReEncryptFrom", source), ("ReEncryptTo", target)) if key]
    key_id = self._get_param("TargetKeyId") or self._get_param("KeyId")
    if action == "Decrypt" and not key_id:
        key_id = _key_of_blob(self, "CiphertextBlob")
    if action == "DeleteAlias":
        key_id = self._get_param("AliasName")
    key = _find_key(self, key_id)
    return [(f"kms:{action}", key)] if key is not None else []


def _request_context(self: KmsResponse, who: Any, attestation: Any) -> dict[str, Any]:
    from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import kms_policy

    context: dict[str, Any] = {
        "aws:PrincipalArn": who.principal,
        "aws:PrincipalAccount": who.account,
        "kms:CallerAccount": who.account,
        "aws:SecureTransport": "true",  # AWS KMS endpoints are TLS-only
    }
    encryption_context = self._get_param("EncryptionContext")
    if isinstance(encryption_context, dict):
        for name, value in encryption_context.items():
            context[f"kms:EncryptionContext:{name}"] = str(value)
        context["kms:EncryptionContextKeys"] = [str(name) for name in encryption_context]
    if attestation is not None:
        context.update(kms_policy.attestation_context(attestation.pcrs))
    return context


def _denied(who: Any, action: str, resource: str, reason: str, attestation: Any) -> AccessDeniedException:
    detail = f"User: {who.arn} is not authorized to perform: {action} on resource: {resource}"
    if attestation is not None:
        detail += (
            f" with the attestation document of module {attestation.module_id} "
            f"(PCR0 {attestation.pcrs.get(0, b'').hex() or 'absent'})"
        )
    return AccessDeniedException(f"{detail}: {reason}")


def _authorize_request(self: KmsResponse, action: str) -> None:
    """Key policy + IAM, as AWS evaluates them; raises AccessDeniedException or ValidationException."""
    from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import kms_policy

    who = _identity(self)
    attestation = _verify_recipient(self) if action in RECIPIENT_ACTIONS else None
    self._nitro_attestation = attestation
    context = _request_context(self, who, attestation)
    iam_policy = {"Statement": [who.iam_statement()]}

    def iam_allows(name: str) -> bool:
        return kms_policy.evaluate(iam_policy, name, context).allowed

    needed = _keys_for(self, action)
    if not needed and action in KEYLESS_ACTIONS and not iam_allows(f"kms:{action}"):
        raise _denied(who, f"kms:{action}", "*", "no identity-based policy allows it", attestation)
    for name, key in needed:
        try:
            policy = json.loads(key.policy or "{}")
        except (ValueError, TypeError, RecursionError):
            policy = {}
        decision = kms_policy.evaluate(
            policy if isinstance(policy, dict) else {}, name, context, principal=who.principal, iam_allows=iam_allows
        )
        if not decision.allowed:
            raise _denied(who, name, key.arn, decision.reason, attestation)


def _check_new_policy(self: KmsResponse, action: str) -> None:
    """PutKeyPolicy / CreateKey(Policy): the grammar AWS enforces and its lockout safety check."""
    from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import kms_policy, kms_policy_document

    text = self._get_param("Policy")
    if text is None or action not in ("PutKeyPolicy", "CreateKey"):
        return
    try:
        policy = kms_policy_document.parse_key_policy(text)
    except kms_policy.PolicyError as exc:
        raise MalformedPolicyDocumentException(str(exc)) from exc
    if self._get_param("BypassPolicyLockoutSafetyCheck") is True:
        return
    who = _identity(self)
    context = _request_context(self, who, None)
    iam_policy = {"Statement": [who.iam_statement()]}
    decision = kms_policy.evaluate(
        policy,
        "kms:PutKeyPolicy",
        context,
        principal=who.principal,
        iam_allows=lambda name: kms_policy.evaluate(iam_policy, name, context).allowed,
    )
    if not decision.allowed:
        raise MalformedPolicyDocumentException(
            "The new key policy will not allow you to update the key policy in the future."
        )


def _for_recipient(secret: bytes, attestation: Any) -> str:
    from enclave_tokenizer.cms import CmsError, build_enveloped_data

    try:
        envelope = build_enveloped_data(secret, attestation.public_key)
    except CmsError as exc:
        raise ValidationException(f"The attestation document's public_key cannot be used: {exc}") from exc
    return base64.b64encode(envelope).decode()


def _key_id_for_blob(self: KmsResponse) -> str | None:
    """Decrypt may omit KeyId; moto's blobs start with the key id (36 chars) — ask moto to resolve it."""
    key_id = self._get_param("KeyId")
    if key_id:
        self._validate_key_id(key_id)
    return key_id


# --------------------------------------------------------------------------------------------------
# Handlers


def _patched_decrypt(original: Callable[[KmsResponse], str]) -> Callable[[KmsResponse], str]:
    def decrypt(self: KmsResponse) -> str:
        attestation = _verify_recipient(self)
        if attestation is None:
            return original(self)
        key_id = _key_id_for_blob(self)
        plaintext, arn = self.kms_backend.decrypt(
            ciphertext_blob=self._get_param("CiphertextBlob"),
            encryption_context=self._get_param("EncryptionContext", {}),
            key_id=key_id,
        )
        return json.dumps(
            {
                "KeyId": arn,
                "EncryptionAlgorithm": "SYMMETRIC_DEFAULT",
                "CiphertextForRecipient": _for_recipient(plaintext, attestation),
            }
        )

    return decrypt


def _patched_generate_data_key(original: Callable[[KmsResponse], str]) -> Callable[[KmsResponse], str]:
    def generate_data_key(self: KmsResponse) -> str:
        # GenerateDataKeyWithoutPlaintext reuses this handler in moto and takes no Recipient.
        attestation = _verify_recipient(self) if self._get_action() == "GenerateDataKey" else None
        if attestation is None:
            return original(self)
        result = json.loads(original(self))
        plaintext = base64.b64decode(result.pop("Plaintext"))
        result["CiphertextForRecipient"] = _for_recipient(plaintext, attestation)
        return json.dumps(result)

    return generate_data_key


def _patched_generate_random(original: Callable[[KmsResponse], str]) -> Callable[[KmsResponse], str]:
    def generate_random(self: KmsResponse) -> str:
        attestation = _verify_recipient(self)
        if attestation is None:
            return original(self)
        result = json.loads(original(self))
        entropy = base64.b64decode(result.pop("Plaintext"))
        return json.dumps({"CiphertextForRecipient": _for_recipient(entropy, attestation)})

    return generate_random


def _new_key_pair(spec: str) -> tuple[bytes, bytes]:
    """(PKCS#8 DER private key, SPKI DER public key)."""
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import ec, rsa

    if spec.startswith("RSA_"):
        private: Any = rsa.generate_private_key(public_exponent=65537, key_size=int(spec[4:]))
    else:
        curve = {"ECC_NIST_P256": ec.SECP256R1, "ECC_NIST_P384": ec.SECP384R1, "ECC_NIST_P521": ec.SECP521R1}[spec]
        private = ec.generate_private_key(curve())
    private_der = private.private_bytes(
        serialization.Encoding.DER, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    public_der = private.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return private_der, public_der


def generate_data_key_pair(self: KmsResponse) -> str:
    """GenerateDataKeyPair, which moto lacks: the private key is returned encrypted under the KMS key and
    in plaintext, or, with Recipient, as CiphertextForRecipient instead of plaintext."""
    key_id = self._get_param("KeyId")
    spec = self._get_param("KeyPairSpec")
    self._validate_key_id(key_id or "")
    if spec not in KEY_PAIR_SPECS:
        raise ValidationException(
            f"1 validation error detected: Value '{spec}' at 'keyPairSpec' failed to satisfy constraint: "
            f"Member must satisfy enum value set: [{', '.join(KEY_PAIR_SPECS)}]"
        )
    attestation = _verify_recipient(self)
    private_der, public_der = _new_key_pair(spec)
    blob, arn = self.kms_backend.encrypt(
        key_id=key_id, plaintext=private_der, encryption_context=self._get_param("EncryptionContext", {})
    )
    result = {
        "PrivateKeyCiphertextBlob": base64.b64encode(blob).decode(),
        "PublicKey": base64.b64encode(public_der).decode(),
        "KeyId": arn,
        "KeyPairSpec": spec,
    }
    if attestation is None:
        result["PrivateKeyPlaintext"] = base64.b64encode(private_der).decode()
    else:
        result["CiphertextForRecipient"] = _for_recipient(private_der, attestation)
    return json.dumps(result)


# --------------------------------------------------------------------------------------------------
# Fault injection (tests only)


def _take_fault(action: str) -> bool:
    path = os.environ.get(FAULTS_ENV)
    if not path:
        return False
    with _lock:
        try:
            faults = json.loads(Path(path).read_text() or "{}")
        except (OSError, ValueError):
            return False
        left = int(faults.get(action, 0))
        if left <= 0:
            return False
        faults[action] = left - 1
        Path(path).write_text(json.dumps(faults))
        return True


class UnsupportedOperationException(JsonRESTError):
    code = 400

    def __init__(self, message: str) -> None:
        super().__init__("UnsupportedOperationException", message)


def _error_response(self: KmsResponse, error: JsonRESTError) -> tuple[int, dict[str, Any], str]:
    return error.code, {**self.response_headers, "Content-Type": "application/x-amz-json-1.1"}, error.description


def _patched_dispatch(original: Callable[..., Any]) -> Callable[..., Any]:
    def dispatch(self: KmsResponse, request: Any, full_url: str | None = None, headers: Any = None) -> Any:
        # moto decodes and parses the body before any handler runs: a body that is not UTF-8 JSON
        # would end there in a 500 page. AWS answers SerializationException.
        try:
            return original(self, request, full_url, headers)
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            from .kms_requests import SerializationException

            error = SerializationException(f"The request body is not valid UTF-8 JSON ({type(exc).__name__})")
            return error.code, {"Content-Type": "application/x-amz-json-1.1"}, error.description

    return dispatch


def _patched_call_action(original: Callable[[KmsResponse], Any]) -> Callable[[KmsResponse], Any]:
    def call_action(self: KmsResponse) -> Any:
        from .kms_requests import check_request

        action = self._get_action()
        try:
            if _take_fault(action):
                raise ThrottlingException()
            check_request(action, self.body)
            _authorize_request(self, action)
            _check_new_policy(self, action)
            return original(self)
        except JsonRESTError as error:
            return _error_response(self, error)
        except NotImplementedError:
            return _error_response(self, UnsupportedOperationException(f"{action} is not implemented locally"))
        except Exception as exc:
            # One line, no traceback and no request values (they may hold key material); through logging,
            # so the redaction filters the server installs see it too.
            _LOG.error("%s failed in moto: %s", action, type(exc).__name__)
            message = f"The request could not be processed ({type(exc).__name__}); check the parameters"
            return _error_response(self, ValidationException(message))

    return call_action


def install(attestation_roots: list[str] | None = None, **_: object) -> None:
    """Patch moto's KmsResponse before the server starts. Idempotent."""
    _state["extra_roots"] = [_read_root(spec) for spec in attestation_roots or []]
    _state["roots"] = None
    if getattr(KmsResponse, "_nitro_attested", False):
        return
    # moto's own "enforcement" (a Deny kms:* anywhere refuses DescribeKey to everyone, whoever it names)
    # would contradict the evaluation above.
    import moto.kms.responses

    moto.kms.responses.validate_policy = lambda key, action: None  # type: ignore[assignment]
    KmsResponse.decrypt = _patched_decrypt(KmsResponse.decrypt)  # type: ignore[method-assign]
    KmsResponse.generate_data_key = _patched_generate_data_key(KmsResponse.generate_data_key)  # type: ignore[method-assign]
    KmsResponse.generate_random = _patched_generate_random(KmsResponse.generate_random)  # type: ignore[method-assign]
    KmsResponse.generate_data_key_pair = generate_data_key_pair  # type: ignore[attr-defined]
    kms_sign.install()
    KmsResponse.call_action = _patched_call_action(KmsResponse.call_action)  # type: ignore[method-assign]
    KmsResponse._dispatch = _patched_dispatch(KmsResponse._dispatch)  # type: ignore[method-assign]
    KmsResponse._nitro_attested = True  # type: ignore[attr-defined]


__all__ = ["AccessDeniedException", "install", "trusted_roots"]
