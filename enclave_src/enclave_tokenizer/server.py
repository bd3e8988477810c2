"""The enclave's tokenization server: ``python -m enclave_tokenizer.server``.

asyncio Protocol (not streams) so a pipelined burst of frames is parsed, answered and written in one
pass. Fast ops (tokenize, detokenize, health) answer inline, in order; slow ops (attest, provision) run
in a worker thread and answer when done, so clients match responses by id.

Hostile input: oversize frame -> error then close; malformed JSON / unknown op / bad fields -> error, the
connection stays usable; slow or stuck clients -> a sweeper aborts connections past their deadline;
too many connections -> ``busy`` then close. Nothing logged ever carries a PAN, token key or plaintext.
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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

from nitro_module_utils.data_key_record import RecordError, context_generation

from . import kms, protocol, vsock
from .protocol import ProtocolError
from .tokens import MODES, TokenError, Tokenizer, capability_matches, normalize_pan

log = logging.getLogger("enclave_tokenizer.server")

APP_VERSION = "1.0.0"
CAPABILITY_CONTEXT_KEY = "enclave-tokenizer:detokenize-capability-sha256"
_HEX64 = re.compile(r"[0-9a-f]{64}")
_WRITE_HIGH_WATER = 1 << 20
Handler = Callable[[dict[str, Any]], Any]


@dataclass
class ServerConfig:
    port: int = 5000
    cid: int = vsock.VMADDR_CID_ANY
    max_frame: int = protocol.DEFAULT_MAX_FRAME
    max_batch: int = 10_000
    max_connections: int = 4096
    idle_timeout: float = 300.0  # no frame started for this long -> close
    frame_timeout: float = 10.0  # a started frame must complete within this
    write_timeout: float = 10.0  # a client that stops reading is dropped after this
    kms_timeout: float = 20.0
    proxy_cid: int = vsock.PARENT_CID
    proxy_port: int = kms.DEFAULT_PROXY_PORT
    # Set in the image (TOKENIZER_KMS_KEY_ARN, measured into PCR2): the only KMS key a data key may come from.
    kms_key_arn: str = ""

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
    if not isinstance(value, str) or not value or len(value) > max_len:
        raise RequestError("bad_request", f"'{name}' must be a non-empty string")
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
        if version != protocol.PROTOCOL_VERSION:
            raise _WithId(request_id, "unsupported_version", f"protocol version {protocol.PROTOCOL_VERSION} only")
        op = request.get("op")
        if not isinstance(op, str) or (op not in self.fast_ops and op not in self.slow_ops):
            # The op is not echoed: it is arbitrary client text.
            ops = ", ".join(sorted([*self.fast_ops, *self.slow_ops]))
            raise _WithId(request_id, "unknown_op", f"unknown op; supported: {ops}")
        return request_id, op, request

    def handle_fast(self, request_id: Any, op: str, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return protocol.ok(request_id, self.fast_ops[op](request))
        except Exception as exc:
            return self._failure(request_id, op, exc)

    async def handle_slow(self, request_id: Any, op: str, request: dict[str, Any]) -> dict[str, Any]:
        try:
            return protocol.ok(request_id, await self.slow_ops[op](request))
        except Exception as exc:
            return self._failure(request_id, op, exc)

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
        if mode not in MODES:
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
            if "pan" not in request:
                raise RequestError("bad_request", "'pan' or 'pans' is required")
            pan = normalize_pan(request["pan"])
            self.stats.tokens += 1
            return {"token": make(pan), "last_four": pan[-4:], "key_check": tokenizer.key_check}
        tokens: list[str | None] = []
        last_four: list[str | None] = []
        errors: list[dict[str, Any]] = []
        add_token, add_last = tokens.append, last_four.append
        for index, raw in enumerate(pans):
            try:
                pan = normalize_pan(raw)
            except TokenError as exc:
                add_token(None)
                add_last(None)
                errors.append({"index": index, "code": exc.code, "message": exc.message})
                continue
            add_token(make(pan))
            add_last(pan[-4:])
        self.stats.tokens += len(pans) - len(errors)
        return {"tokens": tokens, "last_four": last_four, "errors": errors, "key_check": tokenizer.key_check}

    def op_detokenize(self, request: dict[str, Any]) -> dict[str, Any]:
        tokenizer = self._tokenizer()
        if self.key.capability_sha256 is None:
            raise RequestError("forbidden", "detokenize is not enabled: no capability was provisioned")
        if not capability_matches(request.get("capability"), self.key.capability_sha256):
            raise RequestError("forbidden", "a valid detokenize capability is required")
        tokens = self._batch(request, "tokens")
        if tokens is None:
            if "token" not in request:
                raise RequestError("bad_request", "'token' or 'tokens' is required")
            pan, key_check = self._detokenize(tokenizer, request["token"])
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
    def __init__(self, server: TokenizerServer) -> None:
        self.server = server
        self.service = server.service
        self.decoder = protocol.FrameDecoder(server.config.max_frame)
        self.transport: asyncio.Transport | None = None
        self.tasks: set[asyncio.Task[None]] = set()
        self.deadline = 0.0
        self.eof = False
        self.write_paused = False

    # -- lifecycle
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        stats = self.service.stats
        if len(self.server.connections) >= self.server.config.max_connections:
            stats.rejected_busy += 1
            transport.write(protocol.encode_frame(protocol.error(None, "busy", "too many connections")))
            transport.close()
            return
        transport.set_write_buffer_limits(high=_WRITE_HIGH_WATER)
        self.server.connections.add(self)
        stats.connections += 1
        stats.connections_total += 1
        self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        if self in self.server.connections:
            self.server.connections.discard(self)
            self.service.stats.connections -= 1
        for task in self.tasks:
            task.cancel()

    def _arm(self) -> None:
        """Deadline for the current state: idle between frames, frame_timeout inside one."""
        config = self.server.config
        timeout = config.frame_timeout if self.decoder.pending else config.idle_timeout
        if self.write_paused:
            timeout = config.write_timeout
        self.deadline = time.monotonic() + timeout

    def expired(self, now: float) -> bool:
        return now > self.deadline

    # -- input
    def data_received(self, data: bytes) -> None:
        decoder = self.decoder
        frames = decoder.feed(data)
        out = []
        service = self.service
        stats = service.stats
        for body in frames:
            stats.requests += 1
            try:
                request_id, op, request = service.decode(body)
            except _WithId as exc:
                stats.errors += 1
                out.append(protocol.encode_frame(protocol.error(exc.request_id, exc.code, exc.message)))
                continue
            except (ProtocolError, RequestError) as exc:
                stats.errors += 1
                out.append(protocol.encode_frame(protocol.error(None, exc.code, exc.message)))
                continue
            if op in service.fast_ops:
                out.append(protocol.encode_frame(service.handle_fast(request_id, op, request)))
            else:
                self._spawn(service.handle_slow(request_id, op, request))
        if decoder.error is not None:
            out.append(protocol.encode_frame(protocol.error(None, decoder.error.code, decoder.error.message)))
            self._send(out)
            self._close()
            return
        if out:
            self._send(out)
        if not self.write_paused:
            self._arm()

    def eof_received(self) -> bool:
        # Half-closed: answer what is in flight, then close (returning True keeps our side open).
        self.eof = True
        if not self.tasks:
            self._close()
        return True

    # -- output
    def _send(self, frames: list[bytes]) -> None:
        if self.transport is not None and not self.transport.is_closing():
            self.transport.write(b"".join(frames))

    def _spawn(self, coro: Any) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self._slow_done)

    def _slow_done(self, task: asyncio.Task[dict[str, Any]]) -> None:
        self.tasks.discard(task)
        if not task.cancelled():
            self._send([protocol.encode_frame(task.result())])
        if self.eof and not self.tasks:
            self._close()

    def pause_writing(self) -> None:
        # The client is not reading: stop reading its requests too, and start the write deadline.
        self.write_paused = True
        if self.transport is not None:
            self.transport.pause_reading()
        self._arm()

    def resume_writing(self) -> None:
        self.write_paused = False
        if self.transport is not None and not self.transport.is_closing():
            self.transport.resume_reading()
        self._arm()

    def _close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def abort(self) -> None:
        if self.transport is not None:
            self.transport.abort()


class TokenizerServer:
    def __init__(self, config: ServerConfig | None = None) -> None:
        self.config = config or ServerConfig()
        self.service = TokenizerService(self.config)
        self.connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.Task[None] | None = None

    async def start(self) -> None:
        sock = vsock.listen(self.config.port, self.config.cid)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Connection(self), sock=sock)
        self._sweeper = loop.create_task(self._sweep())
        log.info("listening on %s", vsock.describe(self.config.cid, self.config.port))

    async def _sweep(self) -> None:
        """Drop connections past their deadline (slowloris, stuck readers, idle)."""
        while True:
            await asyncio.sleep(min(1.0, self.config.frame_timeout / 4))
            now = time.monotonic()
            for conn in [c for c in self.connections if c.expired(now)]:
                conn.abort()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
            for conn in list(self.connections):
                conn.abort()
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
    logging.basicConfig(level=args.log_level.upper(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    config = ServerConfig.from_env(
        port=args.port, max_frame=args.max_frame, max_connections=args.max_connections, proxy_port=args.proxy_port
    )
    asyncio.run(TokenizerServer(config).serve_forever())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
