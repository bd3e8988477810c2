"""The grammar AWS KMS enforces on a key policy document (PutKeyPolicy, CreateKey `Policy`).

KMS answers `MalformedPolicyDocumentException` for a document that breaks the IAM policy grammar: not a
JSON object, no statements, an Effect other than Allow/Deny, a statement without principal or action, a
`Condition` that is not a map of operators to maps of keys to values, an unknown condition operator,
more than 32 KiB. The local endpoint stores only what passes, so what it evaluates later has the
shape AWS guarantees. Stdlib only; messages name the statement and the bad element.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .kms_policy import MAX_POLICY_BYTES, PolicyError, as_list

VERSIONS = ("2012-10-17", "2008-10-17")
STATEMENT_KEYS = {
    "Sid",
    "Effect",
    "Principal",
    "NotPrincipal",
    "Action",
    "NotAction",
    "Resource",
    "NotResource",
    "Condition",
}
PRINCIPAL_TYPES = ("AWS", "Service", "Federated", "CanonicalUser")
# IAM's condition operators (before the IfExists suffix / set qualifiers).
OPERATORS = {
    "StringEquals", "StringNotEquals", "StringEqualsIgnoreCase", "StringNotEqualsIgnoreCase", "StringLike",
    "StringNotLike", "NumericEquals", "NumericNotEquals", "NumericLessThan", "NumericLessThanEquals",
    "NumericGreaterThan", "NumericGreaterThanEquals", "DateEquals", "DateNotEquals", "DateLessThan",
    "DateLessThanEquals", "DateGreaterThan", "DateGreaterThanEquals", "Bool", "BinaryEquals", "IpAddress",
    "NotIpAddress", "ArnEquals", "ArnLike", "ArnNotEquals", "ArnNotLike", "Null",
}  # fmt: skip
_AWS_PRINCIPAL = re.compile(r"^(\*|\d{12}|arn:aws[a-z-]*:(iam|sts)::\d{12}:[\x21-\x7e]{1,1024})$")
_ACTION = re.compile(r"^(\*|[a-zA-Z0-9-]+:[a-zA-Z0-9*?]+)$")


def _strings(value: Any, where: str) -> list[str]:
    items = as_list(value)
    if not items or not all(isinstance(item, str) and item for item in items):
        raise PolicyError(f"{where} must be a non-empty string or list of non-empty strings")
    return items


def _check_principal(value: Any, where: str) -> None:
    if value == "*":
        return
    if not isinstance(value, dict) or not value or set(value) - set(PRINCIPAL_TYPES):
        raise PolicyError(f'{where} must be "*" or a map with keys among {", ".join(PRINCIPAL_TYPES)}')
    for kind, names in value.items():
        for name in _strings(names, f"{where}.{kind}"):
            if kind == "AWS" and not _AWS_PRINCIPAL.match(name):
                raise PolicyError(f'{where}.AWS: {name[:100]!r} is not an account id, IAM/STS ARN or "*"')


def _check_condition(value: Any, where: str) -> None:
    if not isinstance(value, dict):
        raise PolicyError(f"{where} must be a map of condition operators, got {type(value).__name__}")
    for operator, entries in value.items():
        qualifier, _sep, base = operator.rpartition(":")
        base = base[: -len("IfExists")] if base.endswith("IfExists") else base
        if qualifier not in ("", "ForAnyValue", "ForAllValues") or base not in OPERATORS:
            raise PolicyError(f"{where}: {operator[:100]!r} is not a condition operator")
        if not isinstance(entries, dict) or not entries:
            raise PolicyError(f"{where}.{operator} must map condition keys to values")
        for key, values in entries.items():
            items = as_list(values)
            if not key or not items or not all(isinstance(v, (str, bool, int, float)) for v in items):
                raise PolicyError(f"{where}.{operator}.{key[:100]}: values must be strings, numbers or booleans")


def check_statement(stmt: Any, where: str) -> None:
    if not isinstance(stmt, dict):
        raise PolicyError(f"{where} must be a JSON object")
    unknown = sorted(set(stmt) - STATEMENT_KEYS)
    if unknown:
        raise PolicyError(f"{where} has unknown element(s) {', '.join(k[:40] for k in unknown)}")
    if stmt.get("Effect") not in ("Allow", "Deny"):
        raise PolicyError(f"{where}: Effect must be Allow or Deny")
    if "Sid" in stmt and not isinstance(stmt["Sid"], str):
        raise PolicyError(f"{where}: Sid must be a string")
    for pair in (("Principal", "NotPrincipal"), ("Action", "NotAction"), ("Resource", "NotResource")):
        present = [name for name in pair if name in stmt]
        if len(present) != 1:
            raise PolicyError(f"{where} must have exactly one of {' / '.join(pair)}")
    principal = "Principal" if "Principal" in stmt else "NotPrincipal"
    _check_principal(stmt[principal], f"{where}.{principal}")
    action = "Action" if "Action" in stmt else "NotAction"
    for name in _strings(stmt[action], f"{where}.{action}"):
        if not _ACTION.match(name):
            raise PolicyError(f"{where}.{action}: {name[:100]!r} is not a service:action pattern")
    _strings(stmt.get("Resource", stmt.get("NotResource")), f"{where}.Resource")
    if "Condition" in stmt:
        _check_condition(stmt["Condition"], f"{where}.Condition")


def parse_key_policy(text: Any) -> dict[str, Any]:
    """The policy as a dict, or PolicyError naming what AWS would refuse."""
    if not isinstance(text, str) or not text.strip():
        raise PolicyError("the policy must be a non-empty JSON string")
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_POLICY_BYTES:
        raise PolicyError(f"the policy is {size} bytes; key policies are limited to {MAX_POLICY_BYTES}")
    try:
        policy = json.loads(text)
    except (ValueError, RecursionError) as exc:
        raise PolicyError(f"the policy is not valid JSON: {str(exc)[:200]}") from exc
    if not isinstance(policy, dict):
        raise PolicyError("the policy must be a JSON object")
    unknown = sorted(set(policy) - {"Version", "Id", "Statement"})
    if unknown:
        raise PolicyError(f"the policy has unknown element(s) {', '.join(k[:40] for k in unknown)}")
    if "Version" in policy and policy["Version"] not in VERSIONS:
        raise PolicyError(f"Version must be one of {', '.join(VERSIONS)}")
    statements = as_list(policy.get("Statement"))
    if not statements:
        raise PolicyError("the policy has no Statement")
    for index, stmt in enumerate(statements):
        check_statement(stmt, f"Statement[{index}]")
    return policy
