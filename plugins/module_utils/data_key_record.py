"""The fleet's data key record: what `kms_enclave_data_key` stores (an SSM parameter next to the KMS key)
and what hosts receive, so every controller, CI runner and host uses the same data key.

The record is JSON and holds only ciphertext (``GenerateDataKeyWithoutPlaintext``'s ``CiphertextBlob``),
which only an attested enclave can turn into a key; it is not secret. Shared by the module, the
gateway (``enclave_tokenizer.parent``) and the tests. Stdlib only.

    {"format": 1, "key_arn": "...", "generation": 2, "ciphertext": "<base64>",
     "encryption_context": {...}, "created": "<ISO time>",
     "previous": {"generation": 1, "ciphertext": "...", "encryption_context": {...}, "created": "..."}}

``generation`` moves forward by one at each rotation and is also bound into the data key's KMS
encryption context (``GENERATION_CONTEXT_KEY``), so the enclave can check it without trusting the
host. A data key adopted from before records existed has generation 0 and no such context entry.
``previous`` is the data key the current one replaced: the enclave keeps it for detokenize and
lookups of tokens made before the rotation (the migration window) until the next rotation.
"""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

FORMAT = 1
GENERATION_CONTEXT_KEY = "enclave-tokenizer:key-generation"
# SSM standard parameters hold 4 KiB; a record with two AWS data key blobs is well under 2 KiB.
MAX_RECORD = 4096


class RecordError(ValueError):
    pass


def context_generation(context: dict[str, str] | None) -> int:
    """The generation bound in an encryption context (0: none, a data key from before generations)."""
    raw = (context or {}).get(GENERATION_CONTEXT_KEY)
    if raw is None:
        return 0
    if not (isinstance(raw, str) and raw.isascii() and raw.isdigit() and len(raw) <= 9):
        raise RecordError(f"{GENERATION_CONTEXT_KEY} must be a decimal number, not {raw!r}")
    return int(raw)


def generation_context(base: dict[str, str], generation: int) -> dict[str, str]:
    """The encryption context of a data key of this generation (generation 0 keeps the base as is)."""
    context = {k: v for k, v in base.items() if k != GENERATION_CONTEXT_KEY}
    if generation:
        context[GENERATION_CONTEXT_KEY] = str(generation)
    return context


def entry(ciphertext: bytes, context: dict[str, str], created: str) -> dict[str, Any]:
    return {
        "generation": context_generation(context),
        "ciphertext": base64.b64encode(ciphertext).decode("ascii"),
        "encryption_context": dict(context),
        "created": created,
    }


def build(key_arn: str, current: dict[str, Any], previous: dict[str, Any] | None = None) -> dict[str, Any]:
    record = {"format": FORMAT, "key_arn": key_arn, **current}
    if previous is not None:
        record["previous"] = {k: v for k, v in previous.items() if k != "previous"}
    return record


def dumps(record: dict[str, Any]) -> str:
    text = json.dumps(record, sort_keys=True, separators=(",", ":"))
    if len(text) > MAX_RECORD:
        raise RecordError(f"data key record is {len(text)} bytes, more than {MAX_RECORD}")
    return text


def _check_entry(data: Any, where: str) -> dict[str, Any]:
    if not isinstance(data, dict):
        raise RecordError(f"{where} must be an object")
    context = data.get("encryption_context", {})
    if not (isinstance(context, dict) and all(isinstance(k, str) and isinstance(v, str) for k, v in context.items())):
        raise RecordError(f"{where}.encryption_context must map strings to strings")
    try:
        blob = base64.b64decode(data.get("ciphertext") or "", validate=True)
    except (binascii.Error, ValueError, TypeError):
        raise RecordError(f"{where}.ciphertext must be base64") from None
    if not blob:
        raise RecordError(f"{where}.ciphertext is empty")
    generation = data.get("generation")
    if generation != context_generation(context):
        raise RecordError(f"{where}.generation {generation!r} differs from its encryption context's")
    return {**data, "blob": blob, "encryption_context": context}


def loads(text: str | bytes, where: str = "data key record") -> dict[str, Any]:
    """Parse and check a record; entries gain ``blob`` (the raw ciphertext bytes)."""
    if len(text) > MAX_RECORD:
        raise RecordError(f"{where} is larger than {MAX_RECORD} bytes")
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise RecordError(f"{where} is not JSON: {exc}") from None
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise RecordError(f"{where} is not a format {FORMAT} data key record")
    if not isinstance(data.get("key_arn"), str) or not data["key_arn"]:
        raise RecordError(f"{where} has no key_arn")
    record = _check_entry(data, where)
    if data.get("previous") is not None:
        record["previous"] = _check_entry(data["previous"], f"{where}.previous")
        if record["previous"]["generation"] >= record["generation"]:
            raise RecordError(f"{where}.previous must be of an older generation than the current key")
    return record


def looks_like_record(raw: bytes) -> bool:
    return raw.lstrip().startswith(b"{")
