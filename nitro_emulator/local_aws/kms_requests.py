"""KMS request bodies checked against botocore's KMS model before moto sees them, as AWS's front end does.

moto trusts its input: a number where a string belongs, or a body that is not a JSON object, ends in an
unhandled exception (HTTP 500 with a traceback). AWS answers such requests with `SerializationException`
(wrong JSON type, body not an object) or `ValidationException` (length, enum, pattern, required member),
naming the member. This module gives the same answers from the same model the SDKs are generated from.
"""

from __future__ import annotations

import base64
import binascii
import json
import re
from functools import lru_cache
from typing import Any

from moto.core.exceptions import JsonRESTError

MAX_BODY_BYTES = 1024 * 1024  # far above any valid KMS request (AttestationDocument <= 256 KiB)


class SerializationException(JsonRESTError):
    code = 400

    def __init__(self, message: str) -> None:
        super().__init__("SerializationException", message)


class RequestValidationException(JsonRESTError):
    code = 400

    def __init__(self, message: str) -> None:
        super().__init__("ValidationException", message)


class UnknownOperationException(JsonRESTError):
    code = 400

    def __init__(self, action: str) -> None:
        super().__init__("UnknownOperationException", f"Unknown operation {action[:64]!r}")


@lru_cache(maxsize=1)
def _model() -> Any:
    import botocore.session

    return botocore.session.get_session().get_service_model("kms")


def _join(path: str, member: str) -> str:
    camel = member[:1].lower() + member[1:]
    return f"{path}.{camel}" if path else camel


def _problem(path: str, rule: str, value: Any = None) -> str:
    """AWS's wording: "Value 'x' at 'keyId' failed to satisfy constraint: Member must ..."."""
    shown = "" if value is None else f" '{str(value)[:64]}'"
    return f"Value{shown} at '{path}' failed to satisfy constraint: Member must {rule}"


def _check_string(shape: Any, value: str, path: str, problems: list[str]) -> None:
    meta = shape.metadata
    if "min" in meta and len(value) < meta["min"]:
        problems.append(_problem(path, f"have length greater than or equal to {meta['min']}"))
    if "max" in meta and len(value) > meta["max"]:
        problems.append(_problem(path, f"have length less than or equal to {meta['max']}"))
    if shape.enum and value not in shape.enum:
        problems.append(_problem(path, f"satisfy enum value set: [{', '.join(shape.enum)}]", value))
    if "pattern" in meta and not re.search(meta["pattern"], value):
        problems.append(_problem(path, f"satisfy regular expression pattern: {meta['pattern']}", value))


def _check(shape: Any, value: Any, path: str, problems: list[str]) -> None:
    kind = shape.type_name
    wanted = {
        "structure": dict,
        "map": dict,
        "list": list,
        "string": str,
        "blob": str,
        "boolean": bool,
        "integer": int,
        "long": int,
        "timestamp": (int, float),
    }.get(kind)
    if value is None:
        return
    if wanted is None or not isinstance(value, wanted) or (kind in ("integer", "long") and isinstance(value, bool)):
        raise SerializationException(f"Unexpected JSON type {type(value).__name__} at '{path}' (expected {kind})")
    if kind == "structure":
        for member in shape.required_members:
            if value.get(member) is None:
                problems.append(
                    f"Value null at '{_join(path, member)}' failed to satisfy constraint: Member must not be null"
                )
        for name, member_value in value.items():
            if name in shape.members:
                _check(shape.members[name], member_value, _join(path, name), problems)
    elif kind == "map":
        for key, item in value.items():
            _check(shape.key, key, f"{path}.key", problems)
            _check(shape.value, item, f"{path}.{key}", problems)
    elif kind == "list":
        meta = shape.metadata
        if "max" in meta and len(value) > meta["max"]:
            problems.append(_problem(path, f"have length less than or equal to {meta['max']}"))
        for index, item in enumerate(value):
            _check(shape.member, item, f"{path}.{index + 1}.member", problems)
    elif kind == "string":
        _check_string(shape, value, path, problems)
    elif kind == "blob":
        try:
            raw = base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError) as exc:
            raise SerializationException(f"Value at '{path}' is not valid base64") from exc
        meta = shape.metadata
        if ("min" in meta and len(raw) < meta["min"]) or ("max" in meta and len(raw) > meta["max"]):
            problems.append(_problem(path, f"have length between {meta.get('min', 0)} and {meta.get('max')} bytes"))
    elif kind in ("integer", "long"):
        meta = shape.metadata
        if ("min" in meta and value < meta["min"]) or ("max" in meta and value > meta["max"]):
            problems.append(_problem(path, f"be between {meta.get('min')} and {meta.get('max')}", value))


def check_request(action: str, body: bytes | str | None) -> None:
    """Raise the AWS-shaped error for a request AWS would refuse before looking at any key."""
    if action not in _model().operation_names:
        raise UnknownOperationException(action)
    if isinstance(body, bytes) and len(body) > MAX_BODY_BYTES:
        raise RequestValidationException(f"Request body is {len(body)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        params = json.loads(body or "{}")
    except (ValueError, UnicodeDecodeError, RecursionError) as exc:
        raise SerializationException("The request body is not valid JSON") from exc
    if not isinstance(params, dict):
        raise SerializationException("The request body must be a JSON object")
    problems: list[str] = []
    try:
        _check(_model().operation_model(action).input_shape, params, "", problems)
    except RecursionError as exc:
        raise SerializationException("The request body is nested too deeply") from exc
    if problems:
        count = len(problems)
        raise RequestValidationException(
            f"{count} validation error{'s' if count > 1 else ''} detected: " + "; ".join(problems[:10])
        )
