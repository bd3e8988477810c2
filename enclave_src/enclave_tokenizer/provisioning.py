"""Provisioning: the data key the enclave holds, how a provision request is checked, and the attested KMS
Decrypt that releases the key (``attest`` and ``provision``, the slow ops of TokenizerService).

A provision replaces the held key only as a rotation to a newer generation under the pinned KMS key; the
plaintext keys exist only in this process. Nothing here logs a key, a credential or request text.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import logging
import os
import re
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.data_key_record import (
    RecordError,
    context_generation,
)

from . import kms
from .config import RequestError, ServerConfig
from .tokens import Tokenizer

log = logging.getLogger("enclave_tokenizer.server")  # one logger name for the whole server, as before the split

CAPABILITY_CONTEXT_KEY = "enclave-tokenizer:detokenize-capability-sha256"
_HEX64 = re.compile(r"[0-9a-f]{64}")


@dataclass
class _KeyState:
    """The data key the enclave holds, and what pins it against replacement by the parent.

    ``key_arn`` is the KeyId of the (TLS-authenticated, on a Nitro host) KMS answer that released the key;
    ``generation`` is bound in the data key's encryption context by KMS. Both only a KMS caller allowed to
    make data keys under the fleet's key can choose, never a host that may only Decrypt with attestation.
    """

    tokenizer: Tokenizer | None = None
    capability_sha256: str | None = None
    provisioned_at: float | None = None
    last_error: dict[str, str] | None = None
    attempts: int = 0
    blob: bytes | None = None
    key_arn: str | None = None
    generation: int = 0
    # The key the current one replaced (rotation): detokenize and lookups of tokens made before.
    previous: Tokenizer | None = None
    previous_generation: int | None = None
    key_changes: int = 0
    last_key_change: dict[str, Any] | None = None
    refused: int = 0
    last_refusal: dict[str, str] | None = None


def _b64_field(request: dict[str, Any], name: str, required: bool, max_len: int = 8192) -> bytes | None:
    value = request.get(name)
    if value is None:
        if required:
            raise RequestError("bad_request", f"'{name}' (base64) is required")
        return None
    if not isinstance(value, str) or len(value) > max_len * 4 // 3 + 4:
        raise RequestError("bad_request", f"'{name}' must be a base64 string")
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise RequestError("bad_request", f"'{name}' is not valid base64") from None


def _str_field(request: dict[str, Any], name: str, required: bool = False, max_len: int = 2048) -> str | None:
    value = request.get(name)
    if value is None and not required:
        return None
    # Printable ASCII: these values go into KMS requests (headers, host names), where CR/LF, NUL or
    # non-ASCII would be injection or an encoding failure deep in the HTTP stack.
    if not isinstance(value, str) or not value or len(value) > max_len or not (value.isascii() and value.isprintable()):
        raise RequestError("bad_request", f"'{name}' must be a non-empty string of printable ASCII, at most {max_len}")
    return value


# AWS region names: lowercase ASCII words and a number (us-east-1, us-gov-west-1, eusc-de-east-1).
_REGION = re.compile(r"[a-z]{2,4}(-[a-z]+){1,3}-[0-9]{1,2}")
# Credentials and key ids go into HTTP headers and the signature: printable ASCII, no spaces or CR-LF.
_HEADER_SAFE = re.compile(r"[\x21-\x7e]+")
_LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")


def _ascii_field(request: dict[str, Any], name: str, required: bool = False, max_len: int = 2048) -> str | None:
    value = _str_field(request, name, required, max_len)
    if value is not None and not _HEADER_SAFE.fullmatch(value):
        raise RequestError("bad_request", f"'{name}' must be printable ASCII without spaces")
    return value


def _context_field(request: dict[str, Any], name: str) -> dict[str, str] | None:
    context = request.get(name)
    if context is not None and not (
        isinstance(context, dict)
        and len(context) <= 64
        and all(isinstance(k, str) and isinstance(v, str) and len(k) + len(v) <= 2048 for k, v in context.items())
    ):
        raise RequestError("bad_request", f"'{name}' must map strings to strings (at most 64 entries)")
    try:
        context_generation(context)
    except RecordError as exc:
        raise RequestError("bad_request", f"'{name}': {exc}") from None
    return context


def _emulated_nsm() -> bool:
    """True in the emulator: its NSM is a UNIX socket, a real enclave's is /dev/nsm. The image's environment
    is measured, so a host cannot make a real enclave believe it is emulated."""
    from . import nsm

    return bool(os.environ.get(nsm.NSM_SOCKET_ENV))


def _kms_endpoint(request: dict[str, Any], region: str) -> tuple[str, bool]:
    """(endpoint, plain http allowed): on a Nitro host only the regional HTTPS endpoint (certificate
    verified inside the enclave); plain http only to a loopback endpoint in the emulator."""
    endpoint = _ascii_field(request, "endpoint", max_len=256)
    regional = kms.default_endpoint(region)
    if not _emulated_nsm():
        if endpoint not in (None, regional, regional + "/"):
            raise RequestError("bad_request", f"'endpoint' must be {regional} (or omitted) on a Nitro host")
        return regional, False
    if endpoint is None:
        return regional, False
    url = urlsplit(endpoint)
    if url.scheme not in ("http", "https") or (url.scheme == "http" and url.hostname not in _LOOPBACK_HOSTS):
        raise RequestError("bad_request", "'endpoint' must be https, or http to a loopback address (emulator)")
    return endpoint, True


class ProvisioningOps:
    """The slow ops of TokenizerService (a mixin: it holds ``config``, ``key`` and ``_provision_lock``)."""

    config: ServerConfig
    key: _KeyState
    _provision_lock: asyncio.Lock

    async def op_attest(self, request: dict[str, Any]) -> dict[str, Any]:
        nonce = _b64_field(request, "nonce", required=False, max_len=512)
        user_data = _b64_field(request, "user_data", required=False, max_len=512)
        from . import nsm

        try:
            document = await asyncio.get_running_loop().run_in_executor(
                None, lambda: nsm.get_attestation_document(user_data=user_data, nonce=nonce)
            )
        except (nsm.NsmError, OSError, ValueError) as exc:
            raise RequestError("nsm_error", f"NSM attestation failed: {type(exc).__name__}") from None
        return {"document": base64.b64encode(document).decode("ascii")}

    def _parse_provision(self, request: dict[str, Any]) -> dict[str, Any]:
        blob = _b64_field(request, "ciphertext_blob", required=True)
        region = request.get("region")
        if not isinstance(region, str) or not _REGION.fullmatch(region):
            raise RequestError("bad_request", "'region' must be an AWS region name such as us-east-1")
        creds = request.get("credentials")
        if not isinstance(creds, dict):
            raise RequestError("bad_request", "'credentials' must be an object")
        credentials = kms.Credentials(
            access_key_id=_ascii_field(creds, "access_key_id", required=True, max_len=128) or "",
            secret_access_key=_ascii_field(creds, "secret_access_key", required=True, max_len=256) or "",
            session_token=_ascii_field(creds, "session_token", max_len=8192),
        )
        context = _context_field(request, "encryption_context")
        capability = request.get("detokenize_capability_sha256")
        if capability is not None and not (isinstance(capability, str) and _HEX64.fullmatch(capability)):
            raise RequestError("bad_request", "'detokenize_capability_sha256' must be 64 lowercase hex chars")
        bound = (context or {}).get(CAPABILITY_CONTEXT_KEY)
        if bound is not None:
            # Bound by KMS: a parent cannot swap the capability without a matching encryption context.
            if capability is not None and capability != bound:
                raise RequestError("bad_request", "capability digest differs from the encryption context's")
            capability = bound
        proxy_port = request.get("proxy_port", self.config.proxy_port)
        if isinstance(proxy_port, bool) or not isinstance(proxy_port, int) or not 0 < proxy_port < 2**32:
            raise RequestError("bad_request", "'proxy_port' must be a vsock port number")
        if proxy_port != self.config.proxy_port:
            # KMS only through the vsock-proxy the image was configured with, never a port the caller picks.
            port = self.config.proxy_port
            raise RequestError("bad_request", f"'proxy_port' must be the configured vsock-proxy port {port}")
        endpoint, plain_http = _kms_endpoint(request, region)
        previous = request.get("previous")
        if previous is not None:
            if not isinstance(previous, dict):
                raise RequestError("bad_request", "'previous' must be an object")
            previous = {
                "blob": _b64_field(previous, "ciphertext_blob", required=True),
                "context": _context_field(previous, "encryption_context"),
            }
            if context_generation(previous["context"]) >= context_generation(context):
                raise RequestError("bad_request", "'previous' must be a data key of an older generation")
        return {
            "blob": blob,
            "capability": capability,
            "key_id": _ascii_field(request, "key_id"),
            "context": context,
            "generation": context_generation(context),
            "previous": previous,
            "pinned_key_arn": self.config.kms_key_arn or self.key.key_arn,
            "call_args": {
                "region": region,
                "credentials": credentials,
                "endpoint": endpoint,
                "allow_plain_http": plain_http,
                "proxy_cid": self.config.proxy_cid,
                "proxy_port": proxy_port,
                "timeout": self.config.kms_timeout,
            },
        }

    def _refuse(self, message: str, new_key_check: str | None = None) -> RequestError:
        key = self.key
        key.refused += 1
        key.last_refusal = {"at": f"{time.time():.3f}", "message": message}
        log.warning(
            "provision refused: %s (held key check %s generation %d, offered key check %s)",
            message,
            key.tokenizer.key_check if key.tokenizer else None,
            key.generation,
            new_key_check or "not decrypted",
        )
        return RequestError("provision_refused", message)

    async def op_provision(self, request: dict[str, Any]) -> dict[str, Any]:
        params = self._parse_provision(request)
        async with self._provision_lock:
            key = self.key
            params["pinned_key_arn"] = self.config.kms_key_arn or key.key_arn
            if key.tokenizer is not None:
                if params["blob"] == key.blob:  # the same data key again (a gateway restart): nothing to do
                    return {"provisioned": True, "key_check": key.tokenizer.key_check, "generation": key.generation}
                if params["generation"] <= key.generation:
                    # Refused before any KMS call: only a rotation to a newer generation may replace the key.
                    raise self._refuse(
                        f"the enclave holds a generation {key.generation} data key; another one is accepted only "
                        "as a rotation to a newer generation under the same KMS key"
                    )
            key.attempts += 1
            try:
                loaded = await asyncio.get_running_loop().run_in_executor(None, _bootstrap_key, params)
            except RequestError as exc:
                if exc.code == "provision_refused":
                    raise self._refuse(exc.message) from None
                key.last_error = {"code": exc.code, "message": exc.message}
                log.warning("provision failed: %s", exc.code)
                raise
            tokenizer, key_arn, previous = loaded
            old = key.tokenizer
            if old is not None and old.key_check != tokenizer.key_check:
                key.previous, key.previous_generation = old, key.generation
                key.key_changes += 1
                key.last_key_change = {
                    "at": round(time.time(), 3),
                    "old_key_check": old.key_check,
                    "new_key_check": tokenizer.key_check,
                    "old_generation": key.generation,
                    "new_generation": params["generation"],
                }
                log.warning(
                    "data key rotated: generation %d -> %d, key check %s -> %s (the previous key stays for "
                    "detokenize and lookups)",
                    key.generation,
                    params["generation"],
                    old.key_check,
                    tokenizer.key_check,
                    extra={"event": "key_change", **key.last_key_change},
                )
            elif old is None and previous is not None:
                key.previous, key.previous_generation = previous, context_generation(params["previous"]["context"])
            key.tokenizer, key.blob, key.key_arn = tokenizer, params["blob"], key_arn
            key.generation = params["generation"]
            key.capability_sha256 = params["capability"]
            key.provisioned_at = time.time()
            key.last_error = None
            log.info("provisioned data key (key check %s, generation %d)", tokenizer.key_check, key.generation)
            return {"provisioned": True, "key_check": tokenizer.key_check, "generation": key.generation}


def _bootstrap_key(params: dict[str, Any]) -> tuple[Tokenizer, str, Tokenizer | None]:
    """Attested KMS Decrypt of the data key (and of the previous one, when given), in a worker thread.

    Returns (tokenizer, KMS key ARN, previous tokenizer). The plaintext keys exist only in this process.
    A KMS answer naming another key than the pinned one is refused (``provision_refused``).
    """
    tokenizer, key_arn = _decrypt_data_key(params["blob"], params["context"], params)
    pinned = params["pinned_key_arn"]
    if pinned and key_arn != pinned:
        raise RequestError("provision_refused", f"the data key is under {key_arn}, not the pinned key {pinned}")
    previous = None
    if params["previous"] is not None:
        previous, previous_arn = _decrypt_data_key(params["previous"]["blob"], params["previous"]["context"], params)
        if previous_arn != key_arn:
            raise RequestError("provision_refused", "the previous data key is under another KMS key")
    return tokenizer, key_arn, previous


def _decrypt_data_key(blob: bytes, context: dict[str, str] | None, params: dict[str, Any]) -> tuple[Tokenizer, str]:
    from cryptography.hazmat.primitives import serialization
    from cryptography.hazmat.primitives.asymmetric import rsa

    from . import cms, nsm

    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    spki = private_key.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    try:
        document = nsm.get_attestation_document(public_key=spki)
    except (nsm.NsmError, OSError, ValueError) as exc:
        raise RequestError("nsm_error", f"NSM attestation failed: {type(exc).__name__}") from None
    try:
        answer = kms.decrypt_for_recipient(
            blob, document, key_id=params["key_id"], encryption_context=context, **params["call_args"]
        )
    except kms.KmsError as exc:
        code = "kms_denied" if exc.code in ("AccessDeniedException", "KMSInvalidStateException") else "kms_error"
        raise RequestError(code, f"KMS Decrypt failed: {exc.code}: {exc.message}") from None
    try:
        data_key = cms.decrypt_enveloped_data(answer.envelope, private_key)
    except (cms.CmsError, ValueError) as exc:
        raise RequestError("cms_error", f"cannot unwrap CiphertextForRecipient: {type(exc).__name__}") from None
    if len(data_key) != 32:
        raise RequestError("bad_key", "the data key must be 256 bits (GenerateDataKey KeySpec AES_256)")
    return Tokenizer.from_data_key(data_key), answer.key_id
