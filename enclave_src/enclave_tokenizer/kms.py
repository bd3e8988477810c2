"""Minimal AWS KMS client for inside the enclave: SigV4-signed JSON calls over vsock to the parent's
vsock-proxy (CID 3, port 8000 by default), TLS terminated inside the enclave for https endpoints.

Stdlib only on purpose: botocore adds ~80 MB to the enclave image (and to the EIF, whose size sets the
enclave's minimum memory) for the single call we make. The signer is tested against botocore's.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import hmac
import http.client
import json
import ssl
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from . import vsock

DEFAULT_PROXY_PORT = 8000
SERVICE = "kms"
KEY_ENCRYPTION_ALGORITHM = "RSAES_OAEP_SHA_256"
MAX_RESPONSE = 1 << 20


class KmsError(Exception):
    """A KMS or transport failure. ``code`` is AWS's error type (e.g. AccessDeniedException) or ours."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass(frozen=True, repr=False)
class Credentials:
    access_key_id: str
    secret_access_key: str
    session_token: str | None = None

    def __repr__(self) -> str:  # keep secrets out of logs and tracebacks
        return f"Credentials(access_key_id={self.access_key_id[:4]}...)"


def default_endpoint(region: str) -> str:
    suffix = "amazonaws.com.cn" if region.startswith("cn-") else "amazonaws.com"
    return f"https://kms.{region}.{suffix}"


def _hmac(key: bytes, text: str) -> bytes:
    return hmac.digest(key, text.encode("utf-8"), "sha256")


def sign_v4(
    *,
    method: str,
    host: str,
    path: str,
    headers: dict[str, str],
    body: bytes,
    region: str,
    credentials: Credentials,
    now: dt.datetime,
    service: str = SERVICE,
) -> dict[str, str]:
    """Headers for an AWS Signature Version 4 request (no query string: KMS is POST /)."""
    amz_date = now.strftime("%Y%m%dT%H%M%SZ")
    date = amz_date[:8]
    signed = {k.lower(): " ".join(v.strip().split()) for k, v in headers.items()}
    signed["host"] = host
    signed["x-amz-date"] = amz_date
    if credentials.session_token:
        signed["x-amz-security-token"] = credentials.session_token
    names = sorted(signed)
    canonical_headers = "".join(f"{n}:{signed[n]}\n" for n in names)
    signed_headers = ";".join(names)
    canonical_request = "\n".join(
        [method, path or "/", "", canonical_headers, signed_headers, hashlib.sha256(body).hexdigest()]
    )
    scope = f"{date}/{region}/{service}/aws4_request"
    string_to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical_request.encode()).hexdigest()]
    )
    key = _hmac(("AWS4" + credentials.secret_access_key).encode(), date)
    for part in (region, service, "aws4_request"):
        key = _hmac(key, part)
    signature = hmac.new(key, string_to_sign.encode(), hashlib.sha256).hexdigest()
    out = dict(headers)
    out["Host"] = host
    out["X-Amz-Date"] = amz_date
    if credentials.session_token:
        out["X-Amz-Security-Token"] = credentials.session_token
    out["Authorization"] = (
        f"AWS4-HMAC-SHA256 Credential={credentials.access_key_id}/{scope}, "
        f"SignedHeaders={signed_headers}, Signature={signature}"
    )
    return out


class _VsockHTTPConnection(http.client.HTTPConnection):
    def __init__(self, host: str, *, cid: int, port: int, timeout: float) -> None:
        super().__init__(host, timeout=timeout)
        self._vsock_addr = (cid, port)

    def connect(self) -> None:
        self.sock = vsock.connect(*self._vsock_addr, timeout=self.timeout)


class _VsockHTTPSConnection(http.client.HTTPSConnection):
    def __init__(self, host: str, *, cid: int, port: int, timeout: float, context: ssl.SSLContext) -> None:
        super().__init__(host, timeout=timeout, context=context)
        self._vsock_addr = (cid, port)

    def connect(self) -> None:
        raw = vsock.connect(*self._vsock_addr, timeout=self.timeout)
        # TLS to KMS is end to end: the parent's proxy only sees ciphertext.
        self.sock = self._context.wrap_socket(raw, server_hostname=self.host.split(":")[0])


def call(
    operation: str,
    payload: dict[str, Any],
    *,
    region: str,
    credentials: Credentials,
    endpoint: str | None = None,
    proxy_cid: int = vsock.PARENT_CID,
    proxy_port: int = DEFAULT_PROXY_PORT,
    timeout: float = 15.0,
    now: dt.datetime | None = None,
    allow_plain_http: bool = False,
) -> dict[str, Any]:
    """One KMS JSON-1.1 call (``TrentService.<operation>``) through the vsock-proxy.

    Plain http only with ``allow_plain_http`` (the emulated local endpoint): on a Nitro host the verified
    TLS session to KMS is what makes the answer trustworthy, since the parent relays every byte.
    """
    url = urlsplit(endpoint or default_endpoint(region))
    allowed = ("http", "https") if allow_plain_http else ("https",)
    if url.scheme not in allowed or not url.hostname:
        raise KmsError("InvalidEndpoint", f"KMS endpoint must be an {' or '.join(allowed)} URL")
    host = url.netloc
    body = json.dumps(payload, separators=(",", ":")).encode()
    headers = sign_v4(
        method="POST",
        host=host,
        path="/",
        headers={
            "Content-Type": "application/x-amz-json-1.1",
            "X-Amz-Target": f"TrentService.{operation}",
        },
        body=body,
        region=region,
        credentials=credentials,
        now=now or dt.datetime.now(dt.UTC),
    )
    conn: http.client.HTTPConnection
    if url.scheme == "https":
        conn = _VsockHTTPSConnection(
            host, cid=proxy_cid, port=proxy_port, timeout=timeout, context=ssl.create_default_context()
        )
    else:
        conn = _VsockHTTPConnection(host, cid=proxy_cid, port=proxy_port, timeout=timeout)
    try:
        conn.request("POST", "/", body=body, headers=headers)
        response = conn.getresponse()
        raw = response.read(MAX_RESPONSE + 1)
        status = response.status
    except (OSError, http.client.HTTPException) as exc:
        raise KmsError(
            "KmsUnreachable", f"KMS via vsock-proxy {proxy_cid}:{proxy_port}: {type(exc).__name__}"
        ) from None
    finally:
        conn.close()
    if len(raw) > MAX_RESPONSE:
        raise KmsError("InvalidResponse", "KMS response too large")
    try:
        data = json.loads(raw) if raw else {}
    except ValueError:
        raise KmsError("InvalidResponse", f"KMS answered HTTP {status} with a non-JSON body") from None
    if not isinstance(data, dict):
        raise KmsError("InvalidResponse", "KMS response is not a JSON object")
    if status != 200:
        code = str(data.get("__type", f"HTTP{status}")).rsplit("#", 1)[-1]
        message = str(data.get("message") or data.get("Message") or "")[:500]
        raise KmsError(code, message)
    return data


@dataclass(frozen=True)
class RecipientAnswer:
    envelope: bytes  # DER CMS EnvelopedData (CiphertextForRecipient)
    key_id: str  # ARN of the KMS key that decrypted, as KMS reported it


def decrypt_for_recipient(
    ciphertext_blob: bytes,
    attestation_document: bytes,
    *,
    key_id: str | None = None,
    encryption_context: dict[str, str] | None = None,
    **call_args: Any,
) -> RecipientAnswer:
    """KMS Decrypt with Recipient: the CiphertextForRecipient envelope and the KeyId KMS names.

    Refuses any answer without CiphertextForRecipient, or with a plaintext: either means the endpoint
    did not honour attestation and the key would have crossed the parent in the clear.
    """
    payload: dict[str, Any] = {
        "CiphertextBlob": base64.b64encode(ciphertext_blob).decode(),
        "Recipient": {
            "AttestationDocument": base64.b64encode(attestation_document).decode(),
            "KeyEncryptionAlgorithm": KEY_ENCRYPTION_ALGORITHM,
        },
    }
    if key_id:
        payload["KeyId"] = key_id
    if encryption_context:
        payload["EncryptionContext"] = encryption_context
    data = call("Decrypt", payload, **call_args)
    if data.get("Plaintext"):
        raise KmsError("PlaintextRefused", "KMS returned a plaintext key; refusing an unattested answer")
    blob = data.get("CiphertextForRecipient")
    if not isinstance(blob, str) or not blob:
        raise KmsError("MissingCiphertextForRecipient", "KMS answer has no CiphertextForRecipient")
    answered_key = data.get("KeyId")
    if not isinstance(answered_key, str) or not answered_key:
        raise KmsError("InvalidResponse", "KMS answer has no KeyId")
    try:
        return RecipientAnswer(base64.b64decode(blob, validate=True), answered_key[:2048])
    except ValueError:
        raise KmsError("InvalidResponse", "CiphertextForRecipient is not base64") from None
