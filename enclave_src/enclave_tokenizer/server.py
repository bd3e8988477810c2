"""The enclave's tokenization server: ``python -m enclave_tokenizer.server``.

asyncio Protocol (not streams) so a pipelined burst of frames is parsed, answered and written in one
pass. Fast ops (tokenize, detokenize, health) answer inline, in order; slow ops (attest, provision) run
in a worker thread and answer when done, so clients match responses by id.

Hostile input: oversize frame -> error then close; malformed JSON / unknown op / bad fields -> error, the
connection stays usable; slow or stuck clients -> a sweeper aborts connections past their deadline;
too many connections -> ``busy`` then close. Memory is bounded for the enclave's size (see ServerConfig):
a client that does not read its answers is no longer read, then dropped; unfinished input across all
connections has one budget; attest/provision have a global cap. Nothing logged ever carries a PAN, token
key or plaintext, and bad input never logs a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import binascii
import contextlib
import logging
import os
import re
import signal
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.data_key_record import (
    RecordError,
    context_generation,
)

from . import kms, protocol, redaction, vsock
from .protocol import ProtocolError
from .tokens import MODES, TokenError, Tokenizer, capability_matches, normalize_pan

log = logging.getLogger("enclave_tokenizer.server")

APP_VERSION = "1.0.0"
CAPABILITY_CONTEXT_KEY = "enclave-tokenizer:detokenize-capability-sha256"
_HEX64 = re.compile(r"[0-9a-f]{64}")
Handler = Callable[[dict[str, Any]], Any]


@dataclass
class ServerConfig:
    port: int = 5000
    cid: int = vsock.VMADDR_CID_ANY
    max_frame: int = protocol.DEFAULT_MAX_FRAME
    max_batch: int = 10_000
    max_connections: int = 4096
    idle_timeout: float = 300.0  # no frame started for this long -> close
    frame_timeout: float = 10.0  # a frame must complete within this of its first byte (absolute, not per byte)
    write_timeout: float = 10.0  # a client that stops reading is dropped after this
    # Sized for the deployed enclave (192-224 MiB, interpreter ~40 MiB of it): answers waiting for one
    # client past write_buffer_limit stop the server reading that client; all clients' unsent answers past
    # output_budget get such a client dropped; all unfinished (or unread, paused) input past input_budget
    # gets the connection that grew it answered `busy` and closed.
    write_buffer_limit: int = 512 << 10
    output_budget: int = 32 << 20
    input_budget: int = 32 << 20
    max_slow_ops: int = 8  # attest/provision in flight across connections; more are answered `busy`
    max_slow_frame: int = 32 << 10  # an attest/provision request is a few KiB; bounds what waiting ones hold
    kms_timeout: float = 20.0
    proxy_cid: int = vsock.PARENT_CID
    proxy_port: int = kms.DEFAULT_PROXY_PORT
    # Set in the image (TOKENIZER_KMS_KEY_ARN, measured into PCR2): the only KMS key a data key may come from.
    kms_key_arn: str = ""
    # Worker processes sharing the listener (enclave_tokenizer.workers); 0: one per CPU this process may
    # run on (the enclave's vCPUs; the emulator pins the enclave to its CPUs).
    workers: int = 0
    # µs the event loop polls before it sleeps (enclave_tokenizer.eventloop); 0: plain asyncio.
    busy_poll_us: int = 50

    @classmethod
    def from_env(cls, **overrides: Any) -> ServerConfig:
        """Defaults, then TOKENIZER_<FIELD> env vars (set in the enclave image), then explicit overrides."""
        config = cls()
        for name, default in list(vars(config).items()):
            raw = os.environ.get(f"TOKENIZER_{name.upper()}")
            if raw is not None:
                setattr(config, name, type(default)(raw))
        for name, value in overrides.items():
            if value is not None:
                setattr(config, name, value)
        return config


class RequestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


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


@dataclass
class Stats:
    started: float = field(default_factory=time.time)
    connections: int = 0
    connections_total: int = 0
    rejected_busy: int = 0
    dropped_deadline: int = 0  # idle, slowloris or not reading past write_timeout
    dropped_not_reading: int = 0  # unsent answers past the output budget
    dropped_input_budget: int = 0
    requests: int = 0
    errors: int = 0
    tokens: int = 0


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


class TokenizerService:
    """Operations on decoded requests; the transport-independent core (tests drive it directly too)."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.key = _KeyState()
        self.stats = Stats()
        self._provision_lock = asyncio.Lock()
        self.fast_ops: dict[str, Handler] = {
            "tokenize": self.op_tokenize,
            "detokenize": self.op_detokenize,
            "health": self.op_health,
        }
        self.slow_ops = {"attest": self.op_attest, "provision": self.op_provision}

    # ---------------------------------------------------------------- dispatch
    def decode(self, body: bytes) -> tuple[Any, str, dict[str, Any]]:
        """(id, op, request) or raises ProtocolError/RequestError carrying the id when known."""
        request = protocol.decode_message(body)
        request_id = request.get("id")
        if not protocol.valid_id(request_id):
            raise RequestError("bad_request", "'id' must be an integer or a string of at most 128 chars")
        version = request.get("v", protocol.PROTOCOL_VERSION)
        if version != protocol.PROTOCOL_VERSION or type(version) is not int:  # 1.0 and true equal 1
            raise _WithId(request_id, "unsupported_version", f"protocol version {protocol.PROTOCOL_VERSION} only")
        op = request.get("op")
        if not isinstance(op, str) or (op not in self.fast_ops and op not in self.slow_ops):
            # The op is not echoed: it is arbitrary client text.
            ops = ", ".join(sorted([*self.fast_ops, *self.slow_ops]))
            raise _WithId(request_id, "unknown_op", f"unknown op; supported: {ops}")
        return request_id, op, request

    def handle_fast(self, request_id: Any, op: str, request: dict[str, Any]) -> dict[str, Any]:
        try:
            answer = protocol.ok(request_id, self.fast_ops[op](request))
        except Exception as exc:
            answer = self._failure(request_id, op, exc)
        return protocol.with_rid(answer, request) if "rid" in request else answer

    async def handle_slow(self, request_id: Any, op: str, request: dict[str, Any]) -> dict[str, Any]:
        rid = request.get("rid")
        if type(rid) is str and len(rid) <= protocol.MAX_ID_LENGTH:
            redaction.request_id.set(rid)  # this task's records carry it (each task has its own context)
        try:
            answer = protocol.ok(request_id, await self.slow_ops[op](request))
        except Exception as exc:
            answer = self._failure(request_id, op, exc)
        return protocol.with_rid(answer, request)

    def _failure(self, request_id: Any, op: str, exc: Exception) -> dict[str, Any]:
        self.stats.errors += 1
        if isinstance(exc, RequestError | TokenError):
            return protocol.error(request_id, exc.code, exc.message)
        # Only the type: messages of unexpected errors could quote input.
        log.error("internal error in %s: %s", op, type(exc).__name__)
        return protocol.error(request_id, "internal", "internal error")

    # ---------------------------------------------------------------- ops
    def _tokenizer(self) -> Tokenizer:
        tokenizer = self.key.tokenizer
        if tokenizer is None:
            raise RequestError("not_provisioned", "the enclave has no data key yet (provision first)")
        return tokenizer

    def _batch(self, request: dict[str, Any], name: str) -> list[Any] | None:
        items = request.get(name)
        if items is None:
            return None
        if not isinstance(items, list):
            raise RequestError("bad_request", f"'{name}' must be a list")
        if len(items) > self.config.max_batch:
            raise RequestError("batch_too_large", f"at most {self.config.max_batch} items per request")
        return items

    def op_tokenize(self, request: dict[str, Any]) -> dict[str, Any]:
        mode = request.get("mode", "opaque")
        if type(mode) is not str or mode not in MODES:
            raise RequestError("bad_request", f"'mode' must be one of {', '.join(MODES)}")
        tokenizer = self._tokenizer()
        if request.get("key", "current") == "previous":
            # Lookups during a rotation's migration window: the token the previous key made for this PAN.
            if self.key.previous is None:
                raise RequestError("bad_request", "no previous key is held ('key' may be 'current')")
            tokenizer = self.key.previous
        elif request.get("key", "current") != "current":
            raise RequestError("bad_request", "'key' must be 'current' or 'previous'")
        make = {"opaque": tokenizer.opaque, "fpe": tokenizer.fpe, "reversible": tokenizer.reversible}[mode]
        pans = self._batch(request, "pans")
        if pans is None:
            pan = request.get("pan")
            if type(pan) is not str:
                raise RequestError("bad_request", "'pan' (a string of digits) or 'pans' (a list) is required")
            pan = normalize_pan(pan)
            self.stats.tokens += 1
            return {"token": make(pan), "last_four": pan[-4:], "key_check": tokenizer.key_check}
        tokens, last_four, errors = tokenizer.tokenize_many(pans, mode)
        self.stats.tokens += len(pans) - len(errors)
        return {"tokens": tokens, "last_four": last_four, "errors": errors, "key_check": tokenizer.key_check}

    def op_detokenize(self, request: dict[str, Any]) -> dict[str, Any]:
        tokenizer = self._tokenizer()
        if self.key.capability_sha256 is None:
            raise RequestError("forbidden", "detokenize is not enabled: no capability was provisioned")
        capability = request.get("capability")
        if capability is not None and type(capability) is not str:
            raise RequestError("bad_request", "'capability' must be a string")
        if not capability_matches(capability, self.key.capability_sha256):
            raise RequestError("forbidden", "a valid detokenize capability is required")
        tokens = self._batch(request, "tokens")
        if tokens is None:
            token = request.get("token")
            if type(token) is not str:
                raise RequestError("bad_request", "'token' (a string) or 'tokens' (a list) is required")
            pan, key_check = self._detokenize(tokenizer, token)
            return {"pan": pan, "last_four": pan[-4:], "key_check": key_check}
        pans: list[str | None] = []
        errors: list[dict[str, Any]] = []
        for index, token in enumerate(tokens):
            try:
                pans.append(self._detokenize(tokenizer, token)[0])
            except TokenError as exc:
                pans.append(None)
                errors.append({"index": index, "code": exc.code, "message": exc.message})
        return {"pans": pans, "errors": errors}

    def _detokenize(self, tokenizer: Tokenizer, token: object) -> tuple[str, str]:
        """(PAN, key check of the key that made the token): the current key, else the previous one."""
        try:
            return tokenizer.detokenize(token), tokenizer.key_check
        except TokenError:
            previous = self.key.previous
            if previous is None:
                raise
            return previous.detokenize(token), previous.key_check

    def op_health(self, request: dict[str, Any]) -> dict[str, Any]:
        key = self.key
        return {
            "version": APP_VERSION,
            "protocol": protocol.PROTOCOL_VERSION,
            "provisioned": key.tokenizer is not None,
            "key_check": key.tokenizer.key_check if key.tokenizer else None,
            "detokenize_enabled": key.capability_sha256 is not None,
            "provisioned_at": key.provisioned_at,
            "provision_attempts": key.attempts,
            "last_provision_error": key.last_error,
            "key_generation": key.generation if key.tokenizer else None,
            "key_arn": key.key_arn,
            "previous_key_check": key.previous.key_check if key.previous else None,
            "previous_key_generation": key.previous_generation,
            "key_changes": key.key_changes,
            "last_key_change": key.last_key_change,
            "provision_refused": key.refused,
            "last_provision_refusal": key.last_refusal,
            "uptime_s": round(time.time() - self.stats.started, 3),
            "connections": self.stats.connections,
            "requests": self.stats.requests,
            "tokens": self.stats.tokens,
            "dropped_connections": {
                "deadline": self.stats.dropped_deadline,
                "not_reading": self.stats.dropped_not_reading,
                "input_budget": self.stats.dropped_input_budget,
                "busy": self.stats.rejected_busy,
            },
        }

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


class _WithId(RequestError):
    def __init__(self, request_id: Any, code: str, message: str) -> None:
        super().__init__(code, message)
        self.request_id = request_id


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


class _Connection(asyncio.Protocol):
    """One client. Frames are answered in the order they arrive; while the client does not read its
    answers, complete frames wait in ``backlog`` and the socket is not read (so a client can make the
    server hold at most write_buffer_limit + one answer + one read of input)."""

    def __init__(self, server: TokenizerServer) -> None:
        self.server = server
        self.service = server.service
        self.decoder = protocol.FrameDecoder(server.config.max_frame)
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task[dict[str, Any]]] = set()
        self.backlog: list[bytes] = []
        self.held = 0  # input bytes charged to server.input_held (partial frame + backlog)
        self.unsent = 0  # output bytes charged to server.output_held (last sampled write buffer)
        now = time.monotonic()
        self.active_at = now  # last input: the idle deadline runs from here
        self.frame_started = now  # first byte of the unfinished frame: its absolute deadline
        self.paused_at = 0.0
        self.eof = False
        self.write_paused = False

    # -- lifecycle
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        stats = self.service.stats
        if len(self.server.connections) >= self.server.config.max_connections:
            stats.rejected_busy += 1
            transport.write(protocol.encode_frame(protocol.error(None, "busy", "too many connections")))
            transport.close()
            return
        transport.set_write_buffer_limits(high=self.server.config.write_buffer_limit)
        self.server.connections.add(self)
        stats.connections += 1
        stats.connections_total += 1

    def connection_lost(self, exc: Exception | None) -> None:
        if self.server.on_close is not None:
            self.server.on_close()
        if self in self.server.connections:
            self.server.connections.discard(self)
            self.service.stats.connections -= 1
        self._release()
        for task in self.tasks:
            task.cancel()

    def _release(self) -> None:
        """Give back this connection's share of the global budgets (it holds nothing any more)."""
        self.backlog = []
        self.decoder = protocol.FrameDecoder(self.server.config.max_frame)
        self.server.input_held -= self.held
        self.server.output_held -= self.unsent
        self.held = self.unsent = 0

    def expired(self, now: float) -> bool:
        config = self.server.config
        if self.write_paused:
            return now - self.paused_at > config.write_timeout
        if self.decoder.pending:
            return now - self.frame_started > config.frame_timeout
        return now - self.active_at > config.idle_timeout

    # -- input
    def data_received(self, data: bytes) -> None:
        try:
            self._receive(data)
        except Exception as exc:
            # A bug, not bad input (that is answered): no traceback, it could quote request bytes.
            log.error("internal error on a connection: %s", type(exc).__name__)
            self.abort()

    def _receive(self, data: bytes) -> None:
        decoder = self.decoder
        was_pending = decoder.pending
        frames = decoder.feed(data)
        now = time.monotonic()
        self.active_at = now
        if decoder.pending and (frames or not was_pending):
            self.frame_started = now  # a new frame began in this read; an unfinished one keeps its start
        if frames:
            self._answer(frames)
        self._after_input()

    def _answer(self, frames: list[bytes]) -> None:
        """Answer frames in order, flushing every write_buffer_limit bytes; if the client is then not
        reading, keep the rest in the backlog (reading is paused) until resume_writing."""
        service = self.service
        stats = service.stats
        config = self.server.config
        limit = config.write_buffer_limit
        out: list[bytes] = []
        size = 0
        for index, body in enumerate(frames):
            stats.requests += 1
            try:
                request_id, op, request = service.decode(body)
            except _WithId as exc:
                stats.errors += 1
                answer = protocol.encode_frame(protocol.error(exc.request_id, exc.code, exc.message))
            except (ProtocolError, RequestError) as exc:
                stats.errors += 1
                answer = protocol.encode_frame(protocol.error(None, exc.code, exc.message))
            else:
                if op in service.fast_ops:
                    answer = protocol.encode_frame(service.handle_fast(request_id, op, request))
                else:
                    refusal = self._slow(request_id, op, request, len(body))
                    if refusal is None:
                        continue
                    answer = protocol.encode_frame(refusal)
            out.append(answer)
            size += len(answer)
            if size >= limit:
                self._send(out)
                out, size = [], 0
                if self.write_paused or self.transport is None or self.transport.is_closing():
                    self.backlog = frames[index + 1 :]
                    return
        if out:
            self._send(out)
        self.backlog = []

    def _slow(self, request_id: Any, op: str, request: dict[str, Any], size: int) -> dict[str, Any] | None:
        """Start a slow op, or the answer refusing it (None when started)."""
        config = self.server.config
        service = self.service
        if size > config.max_slow_frame:
            service.stats.errors += 1
            return protocol.error(request_id, "bad_request", f"{op} requests are at most {config.max_slow_frame} bytes")
        if self.server.slow_inflight >= config.max_slow_ops:
            service.stats.errors += 1
            return protocol.error(request_id, "busy", f"{config.max_slow_ops} attest/provision requests in flight")
        self.server.slow_inflight += 1
        task = asyncio.get_running_loop().create_task(service.handle_slow(request_id, op, request))
        self.tasks.add(task)
        task.add_done_callback(self._slow_done)
        return None

    def _after_input(self) -> None:
        """Charge the input held to the global budget; the fatal decoder error once all before it is answered."""
        if self.transport is None or self.transport.is_closing():
            return
        decoder = self.decoder
        held = decoder.pending + sum(map(len, self.backlog)) if self.backlog else decoder.pending
        server = self.server
        server.input_held += held - self.held
        self.held = held
        if held and server.input_held > server.config.input_budget:
            self.service.stats.dropped_input_budget += 1
            self._send([protocol.encode_frame(protocol.error(None, "busy", "too much unfinished input; retry"))])
            self._release()
            self._close()
            return
        if decoder.error is not None and not self.backlog:
            self._send([protocol.encode_frame(protocol.error(None, decoder.error.code, decoder.error.message))])
            self._close()

    def eof_received(self) -> bool:
        # Half-closed: answer what is in flight, then close (returning True keeps our side open).
        self.eof = True
        if not self.tasks and not self.backlog:
            self._close()
        return True

    # -- output
    def _send(self, frames: list[bytes]) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        transport.write(b"".join(frames))  # may call pause_writing
        self._account_output()
        if self.write_paused and self.server.output_held > self.server.config.output_budget:
            self.service.stats.dropped_not_reading += 1
            self.abort()

    def _account_output(self) -> None:
        """Re-sample the unsent bytes; between samples the buffer only shrinks, so the sum is an upper bound."""
        transport = self.transport
        unsent = 0 if transport is None or transport.is_closing() else transport.get_write_buffer_size()
        if unsent != self.unsent:
            self.server.output_held += unsent - self.unsent
            self.unsent = unsent

    def _slow_done(self, task: asyncio.Task[dict[str, Any]]) -> None:
        self.server.slow_inflight -= 1
        self.tasks.discard(task)
        try:
            if not task.cancelled():
                self._send([protocol.encode_frame(task.result())])
            if self.eof and not self.tasks and not self.backlog:
                self._close()
        except Exception as exc:
            log.error("internal error answering %s: %s", "a slow op", type(exc).__name__)
            self.abort()

    def pause_writing(self) -> None:
        # The client is not reading: stop reading its requests too, and start the write deadline.
        self.write_paused = True
        self.paused_at = time.monotonic()
        if self.transport is not None:
            self.transport.pause_reading()

    def resume_writing(self) -> None:
        try:
            self.write_paused = False
            self._account_output()
            transport = self.transport
            if transport is None or transport.is_closing():
                return
            now = time.monotonic()
            self.active_at = now
            if self.decoder.pending:
                self.frame_started = now  # the unfinished frame could not progress while we were not reading
            if self.backlog:
                frames, self.backlog = self.backlog, []
                self._answer(frames)
                self._after_input()
            if self.write_paused or transport.is_closing():
                return
            if self.eof:
                if not self.tasks and not self.backlog:
                    self._close()
            else:
                transport.resume_reading()
        except Exception as exc:
            log.error("internal error on a connection: %s", type(exc).__name__)
            self.abort()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()
        self._release()


class TokenizerServer:
    def __init__(
        self,
        config: ServerConfig | None = None,
        service: TokenizerService | None = None,
        listen_sock: socket.socket | None = None,
        on_close: Callable[[], None] | None = None,
    ) -> None:
        self.config = config or ServerConfig()
        self.service = service or TokenizerService(self.config)
        self._listen_sock = listen_sock  # a worker serves the listener its parent opened
        self.connections: set[_Connection] = set()
        self.input_held = 0  # bytes of unfinished or not yet answered frames, all connections
        self.output_held = 0  # bytes of answers not yet taken by the kernel, all connections (upper bound)
        self.slow_inflight = 0
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None
        self.on_close = on_close  # called once per connection served, when it ends (workers count them)
        self._adopting: set[asyncio.Task[Any]] = set()

    async def start(self, listen: bool = True) -> None:
        """Listen (or, ``listen=False``, only serve the connections given to :meth:`adopt`)."""
        loop = asyncio.get_running_loop()
        if listen:
            sock = self._listen_sock or vsock.listen(self.config.port, self.config.cid)
            sock.setblocking(False)
            self._server = await loop.create_server(lambda: _Connection(self), sock=sock)
            log.info("listening on %s", vsock.describe(self.config.cid, self.config.port))
        self._sweeper = loop.create_task(self._sweep())

    def adopt(self, sock: socket.socket) -> None:
        """Serve a connection accepted elsewhere (the workers' parent accepts and hands them over)."""
        sock.setblocking(False)
        task = asyncio.get_running_loop().create_task(
            asyncio.get_running_loop().connect_accepted_socket(lambda: _Connection(self), sock)
        )
        self._adopting.add(task)
        task.add_done_callback(self._adopted)

    def _adopted(self, task: asyncio.Task[Any]) -> None:
        self._adopting.discard(task)
        # Never served (the socket failed before a connection was made): it still counts as ended.
        if (task.cancelled() or task.exception() is not None) and self.on_close is not None:
            self.on_close()

    async def _sweep(self) -> None:
        """Drop connections past their deadline (slowloris, stuck readers, idle); re-sample unsent output."""
        stats = self.service.stats
        logged = (0, 0, 0)
        while True:
            await asyncio.sleep(min(1.0, self.config.frame_timeout / 4, self.config.write_timeout / 4))
            now = time.monotonic()
            for conn in list(self.connections):
                if conn.expired(now):
                    stats.dropped_deadline += 1
                    conn.abort()
                elif conn.unsent:
                    conn._account_output()
            # One line per sweep, not one per connection: an attack must not flood the log.
            dropped = (stats.dropped_deadline, stats.dropped_not_reading, stats.dropped_input_budget)
            if dropped != logged:
                log.warning(
                    "dropped connections: %d past their deadline, %d not reading (output budget), "
                    "%d over the input budget (totals since start)",
                    *dropped,
                )
                logged = dropped

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        for conn in list(self.connections):
            conn.abort()
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()

    async def serve_forever(self) -> None:
        await self.start()
        assert self._server is not None
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        await self.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="enclave-tokenizer-server", description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, help="vsock port (default 5000, env TOKENIZER_PORT)")
    parser.add_argument("--max-frame", type=int, help="frame size limit in bytes")
    parser.add_argument("--max-connections", type=int)
    parser.add_argument("--proxy-port", type=int, help="parent vsock-proxy port for KMS (default 8000)")
    parser.add_argument("--log-level", default=os.environ.get("TOKENIZER_LOG_LEVEL", "INFO"))
    args = parser.parse_args(argv)
    redaction.setup(args.log_level)  # every record masked (card numbers, credentials)
    config = ServerConfig.from_env(
        port=args.port, max_frame=args.max_frame, max_connections=args.max_connections, proxy_port=args.proxy_port
    )
    from . import workers

    count = workers.worker_count(config)
    if count > 1:
        return workers.serve(config, count)
    from . import eventloop

    eventloop.run(TokenizerServer(config).serve_forever(), config.busy_poll_us)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
