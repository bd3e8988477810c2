"""Parent-side plumbing shared by the gateway and the CLI: configuration, enclave discovery through
nitro-cli, the provision request (ciphertext + instance-role credentials) and attestation checks.

Configuration file (YAML, templated by the vsock_tokenizer role); every key may be overridden by the
env var ``ENCLAVE_TOKENIZER_<KEY>`` (upper case). Keys and defaults: see ``GatewayConfig``.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import dataclasses
import json
import os
import secrets
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from . import kms
from .client import AsyncClient, CidSource, Client
from .tokens import MODES

ENV_PREFIX = "ENCLAVE_TOKENIZER_"
# Where the vsock_tokenizer role writes it (vsock_tokenizer_config_dir), then the path of earlier versions.
DEFAULT_CONFIG = "/etc/nitro-enclaves/tokenizer/gateway.yaml"
CONFIG_PATHS = (DEFAULT_CONFIG, "/etc/enclave-tokenizer/gateway.yaml")
CONFIG_ENV = "ENCLAVE_TOKENIZER_CONFIG"
NITRO_DEVICE = "/dev/nitro_enclaves"


def default_config() -> str | None:
    """The configuration a tool uses without --config: $ENCLAVE_TOKENIZER_CONFIG, else the first of
    CONFIG_PATHS that exists, else None (env-only configuration)."""
    explicit = os.environ.get(CONFIG_ENV)
    if explicit:
        return explicit
    return next((path for path in CONFIG_PATHS if os.path.exists(path)), None)


def adopt_emulated_vsock() -> str | None:
    """On an emulated host (no Nitro device, the emulator's vsock directory present) point the vsock
    transport at that directory unless $NITRO_VSOCK_DIR already says where; returns the directory in force."""
    from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import vsock as vsock_transport

    unset = not os.environ.get(vsock_transport.ENV_DIR)
    if unset and not os.path.exists(NITRO_DEVICE) and os.path.isdir(vsock_transport.DEFAULT_VSOCK_DIR):
        os.environ[vsock_transport.ENV_DIR] = vsock_transport.DEFAULT_VSOCK_DIR
    return vsock_transport.emulation_dir()


class ConfigError(ValueError):
    pass


@dataclass
class GatewayConfig:
    # HTTP listener for local apps.
    listen_host: str = "127.0.0.1"
    listen_port: int = 8080
    # HTTP worker processes sharing the port (SO_REUSEPORT), each with its own enclave connection pool.
    workers: int = 1
    # Which enclave: a fixed CID, or discovered by name through `nitro-cli describe-enclaves`.
    enclave_cid: int | None = None
    enclave_name: str | None = None
    enclave_port: int = 5000
    nitro_cli: str = "nitro-cli"
    # vsock client pool.
    pool_size: int = 4
    request_timeout: float = 5.0
    connect_timeout: float = 2.0
    max_batch: int = 1000  # PANs per HTTP request
    max_body: int = 1 << 20
    monitor_interval: float = 5.0  # health poll: detects enclave restarts and re-provisions
    # Key bootstrap: what the enclave needs to call KMS Decrypt with attestation.
    kms_region: str | None = None
    kms_ciphertext_file: str | None = None  # GenerateDataKeyWithoutPlaintext's CiphertextBlob (raw or base64)
    kms_key_id: str | None = None
    kms_endpoint: str | None = None  # URL the ENCLAVE signs for (local: the local KMS); default regional
    kms_proxy_port: int = kms.DEFAULT_PROXY_PORT
    kms_encryption_context: dict[str, str] = field(default_factory=dict)
    aws_profile: str | None = None  # credentials: botocore default chain (instance role on EC2)
    detokenize_capability_sha256: str | None = None
    # Attestation check for `/healthz?attest=1` and `enclave-tokenizer attest --verify`.
    measurements_file: str | None = None  # <eif>.measurements.json
    # The enclave supervisor's report (<run config>.status): why the configuration on disk is not what runs.
    supervisor_status_file: str | None = None
    # Seconds a request waits for an enclave being relaunched (re-provisioned) before it is answered 503.
    hold_timeout: float = 30.0
    attestation_root_pem: str | None = None  # default: AWS Nitro Enclaves Root G1
    allow_debug: bool = False
    log_level: str = "INFO"
    log_format: str = "json"  # or "text" (redaction.setup)
    access_log: bool = True  # one JSON line per HTTP request (enclave_tokenizer.access), never a body
    # Token modes /v1/tokenize serves (a fleet may refuse fpe or reversible tokens): others are 403.
    allowed_modes: list[str] = field(default_factory=lambda: list(MODES))
    # GET /metrics (Prometheus); the attestation + canary self-check runs every this many s (0: never).
    metrics: bool = True
    metrics_self_check_interval: float = 300.0

    @classmethod
    def load(cls, path: str | os.PathLike[str] | None = None, **overrides: Any) -> GatewayConfig:
        data: dict[str, Any] = {}
        if path is not None:
            try:
                loaded = yaml.safe_load(Path(path).read_text(encoding="utf-8"))
            except (OSError, yaml.YAMLError) as exc:
                raise ConfigError(f"cannot read config {path}: {exc}") from None
            if loaded is not None and not isinstance(loaded, dict):
                raise ConfigError(f"{path}: top level must be a mapping")
            data.update(loaded or {})
        fields = {f.name: f for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(f"unknown config keys: {', '.join(unknown)}")
        for name in fields:
            raw = os.environ.get(ENV_PREFIX + name.upper())
            if raw is not None:
                data[name] = yaml.safe_load(raw) if raw else None
        data.update({k: v for k, v in overrides.items() if v is not None})
        config = cls(**data)
        config._check()
        return config

    def _check(self) -> None:
        for name, kind in (("listen_port", int), ("enclave_port", int), ("pool_size", int), ("kms_proxy_port", int)):
            if not isinstance(getattr(self, name), kind):
                raise ConfigError(f"{name} must be an integer")
        if isinstance(self.workers, bool) or not isinstance(self.workers, int) or not 1 <= self.workers <= 64:
            raise ConfigError(f"workers must be an integer from 1 to 64, not {self.workers!r}")
        if self.enclave_cid is None and not self.enclave_name:
            raise ConfigError("set enclave_cid or enclave_name")
        if not isinstance(self.kms_encryption_context, dict):
            raise ConfigError("kms_encryption_context must be a mapping of strings")
        modes = self.allowed_modes
        if not isinstance(modes, list) or not modes or any(m not in MODES for m in modes):
            raise ConfigError(f"allowed_modes={modes!r}: expected a non-empty list of {', '.join(MODES)}")
        if self.log_format not in ("json", "text"):
            raise ConfigError(f"log_format={self.log_format!r}: expected json or text")
        for name in ("access_log", "metrics", "allow_debug"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name}={getattr(self, name)!r}: expected true or false")
        interval = self.metrics_self_check_interval
        if isinstance(interval, bool) or not isinstance(interval, int | float) or interval < 0:
            raise ConfigError(f"metrics_self_check_interval must be seconds >= 0 (0: off), not {interval!r}")

    @property
    def provisioning_configured(self) -> bool:
        return bool(self.kms_region and self.kms_ciphertext_file)


# ------------------------------------------------------------------------------------ enclave discovery


async def describe_enclave(nitro_cli: str, name: str) -> dict[str, Any] | None:
    """The `nitro-cli describe-enclaves` entry named ``name`` (None if absent)."""
    proc = await asyncio.create_subprocess_exec(
        nitro_cli, "describe-enclaves", stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE
    )
    try:
        out, err = await asyncio.wait_for(proc.communicate(), 30)
    except TimeoutError:
        proc.kill()
        raise RuntimeError("nitro-cli describe-enclaves timed out") from None
    if proc.returncode != 0:
        raise RuntimeError(f"nitro-cli describe-enclaves failed: {err.decode(errors='replace').strip()[:300]}")
    try:
        enclaves = json.loads(out)
    except ValueError:
        raise RuntimeError("nitro-cli describe-enclaves printed no JSON") from None
    for enclave in enclaves if isinstance(enclaves, list) else []:
        if isinstance(enclave, dict) and enclave.get("EnclaveName") == name:
            return enclave
    return None


# ------------------------------------------------------------------------------------ provisioning


def read_ciphertext(path: str) -> bytes:
    """The data key's KMS ciphertext: raw bytes, or their base64 text (what the AWS CLI prints)."""
    raw = Path(path).read_bytes()
    text = raw.strip()
    try:
        if text and all(c in b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/=\n\r" for c in text):
            return base64.b64decode(text, validate=False)
    except (binascii.Error, ValueError):
        pass
    return raw


def read_data_key(path: str) -> dict[str, Any]:
    """The fleet's data key record (JSON, what kms_enclave_data_key stores in SSM), or a legacy ciphertext
    file as a generation-0 record without context. Entries carry ``blob`` (raw ciphertext)."""
    from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import data_key_record

    raw = Path(path).read_bytes()
    if not data_key_record.looks_like_record(raw):
        return {"blob": read_ciphertext(path), "generation": 0, "encryption_context": {}}
    try:
        return data_key_record.loads(raw, path)
    except data_key_record.RecordError as exc:
        raise ConfigError(str(exc)) from None


def current_credentials(profile: str | None = None) -> kms.Credentials:
    """Temporary credentials from botocore's default chain (the instance role on EC2)."""
    import botocore.session

    session = botocore.session.Session(profile=profile)
    creds = session.get_credentials()
    if creds is None:
        raise ConfigError("no AWS credentials found (instance role, environment or profile)")
    frozen = creds.get_frozen_credentials()
    return kms.Credentials(frozen.access_key, frozen.secret_key, frozen.token)


def provision_request(config: GatewayConfig) -> dict[str, Any]:
    """The `provision` request body (contains temporary credentials: never log it)."""
    if not config.provisioning_configured:
        raise ConfigError("kms_region and kms_ciphertext_file are required to provision")
    assert config.kms_ciphertext_file is not None
    record = read_data_key(config.kms_ciphertext_file)
    creds = current_credentials(config.aws_profile)
    request: dict[str, Any] = {
        "ciphertext_blob": base64.b64encode(record["blob"]).decode(),
        "region": config.kms_region,
        "credentials": {
            "access_key_id": creds.access_key_id,
            "secret_access_key": creds.secret_access_key,
            **({"session_token": creds.session_token} if creds.session_token else {}),
        },
        "proxy_port": config.kms_proxy_port,
    }
    for key, value in (
        ("endpoint", config.kms_endpoint),
        ("key_id", config.kms_key_id),
        ("encryption_context", {**config.kms_encryption_context, **record["encryption_context"]} or None),
        ("detokenize_capability_sha256", config.detokenize_capability_sha256),
    ):
        if value:
            request[key] = value
    previous = record.get("previous")
    if previous is not None:
        # The key the current one replaced: the enclave keeps it for detokenize and lookups of old tokens.
        request["previous"] = {
            "ciphertext_blob": base64.b64encode(previous["blob"]).decode(),
            "encryption_context": {**config.kms_encryption_context, **previous["encryption_context"]},
        }
    return request


# ------------------------------------------------------------------------------------ attestation


def load_measurements(path: str | os.PathLike[str]) -> dict[int, str]:
    """Expected PCRs, {index: lowercase hex}, from an `<eif>.measurements.json` artifact or the enclave's
    run configuration (its `measurements`)."""
    from .attestation import AttestationError, pcrs_from_measurements

    try:
        return pcrs_from_measurements(Path(path))
    except AttestationError as exc:
        raise ConfigError(f"cannot read measurements from {path}: {exc.message}") from None


def verify_document(document: bytes, nonce: bytes, config: GatewayConfig) -> dict[str, Any]:
    """Verify an enclave's document against the measurements artifact; JSON-ready result.

    Raises attestation.AttestationError (with ``check``) or ConfigError.
    """
    from . import attestation

    expected = load_measurements(config.measurements_file) if config.measurements_file else None
    if expected is None:
        raise ConfigError("measurements_file is required to verify attestation")
    root = Path(config.attestation_root_pem).read_bytes() if config.attestation_root_pem else None
    result = attestation.verify_attestation_document(
        document, root_pem=root, expected_pcrs=expected, nonce=nonce, allow_debug=config.allow_debug
    )
    return result.to_json_dict()


def fresh_nonce() -> bytes:
    return secrets.token_bytes(32)


def sync_client(config: GatewayConfig, cid: int) -> Client:
    return Client(cid, config.enclave_port, timeout=config.request_timeout, pool_size=config.pool_size)


def async_client(config: GatewayConfig, cid: CidSource) -> AsyncClient:
    return AsyncClient(
        cid,
        config.enclave_port,
        timeout=config.request_timeout,
        connect_timeout=config.connect_timeout,
        pool_size=config.pool_size,
    )
