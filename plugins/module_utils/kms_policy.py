"""KMS key policies bound to Nitro Enclaves attestation: build, merge, compare, validate, evaluate.

Pure logic (stdlib only) shared by the `kms_enclave_policy` module, the local attested KMS
(`nitro_emulator.local_aws.kms`) and the tests.

Vocabulary:
- an *attested statement* is an Allow statement whose Condition carries at least one
  `kms:RecipientAttestation:*` key; the module manages such statements by `Sid` and never touches
  any other statement of the policy;
- attestation values live under `StringEqualsIgnoreCase` (AWS's recommended operator); several
  values for one key are OR'ed by IAM, which is how an old and a new image coexist in a rollout.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .pcr import PCR_HEX_LEN, pcr_hex_problem

ATTESTATION_PREFIX = "kms:RecipientAttestation:"
ATTESTED_OPERATOR = "StringEqualsIgnoreCase"
# The operations KMS accepts a Recipient (attestation document) for.
ALLOWED_ACTIONS = (
    "kms:Decrypt",
    "kms:DeriveSharedSecret",
    "kms:GenerateDataKey",
    "kms:GenerateDataKeyPair",
    "kms:GenerateRandom",
)
DEFAULT_ACTIONS = ("kms:Decrypt",)
MAX_POLICY_BYTES = 32768
# Option name -> condition key suffix. image_sha384 is PCR0 under another name (AWS docs).
CONDITION_OPTIONS: dict[str, str] = {"image_sha384": "ImageSha384"} | {f"pcr{i}": f"PCR{i}" for i in range(9)}
ADMIN_ACTION = "kms:PutKeyPolicy"
POLICY_VERSION = "2012-10-17"

_ROLE_ARN = re.compile(r"^arn:aws[a-z-]*:iam::\d{12}:role/[\w+=,.@/-]{1,512}$")
_SID = re.compile(r"^[A-Za-z0-9 _.:-]{1,128}$")
_ATTESTATION_KEY = re.compile(r"^kms:recipientattestation:(imagesha384|pcr([0-9]|[12][0-9]|3[01]))$", re.I)


class PolicyError(ValueError):
    """A statement or policy the module must refuse; the message names the rule."""


# --------------------------------------------------------------------------------------------------
# Small helpers


def as_list(value: Any) -> list[Any]:
    """IAM allows a scalar wherever a list is allowed."""
    if value is None:
        return []
    if isinstance(value, (list, tuple)):
        return list(value)
    return [value]


def condition_key(suffix: str) -> str:
    return ATTESTATION_PREFIX + suffix


def is_attestation_key(key: str) -> bool:
    return bool(_ATTESTATION_KEY.match(key))


def canonical_attestation_key(key: str) -> str:
    """`kms:recipientattestation:pcr0` -> `kms:RecipientAttestation:PCR0` (IAM keys are case-insensitive)."""
    match = _ATTESTATION_KEY.match(key)
    if not match:
        raise PolicyError(f"{key!r} is not a kms:RecipientAttestation condition key")
    suffix = match.group(1)
    return condition_key("ImageSha384" if suffix.lower() == "imagesha384" else suffix.upper())


def normalize_pcr(value: Any, name: str, allow_debug: bool = False) -> str:
    """96 hex chars, any case in, lower case out; all-zero (debug-mode enclave) refused unless allowed."""
    if not isinstance(value, str):
        raise PolicyError(f"{name}: PCR value must be a string of {PCR_HEX_LEN} hex characters, got {value!r}")
    text = value.strip()
    problem = pcr_hex_problem(text)
    if problem:
        raise PolicyError(f"{name}: PCR value must be exactly {PCR_HEX_LEN} hex characters (SHA-384), got {problem}")
    text = text.lower()
    if set(text) == {"0"} and not allow_debug:
        raise PolicyError(
            f"{name}: an all-zero PCR matches debug-mode enclaves, whose memory the parent can read; "
            "set allow_debug_pcrs to allow it"
        )
    return text


def validate_role_arn(arn: Any) -> str:
    if not isinstance(arn, str) or not _ROLE_ARN.match(arn):
        raise PolicyError(f"principal {arn!r} is not an IAM role ARN (arn:aws:iam::<account>:role/<name>)")
    return arn


def normalize_action(action: Any) -> str:
    if not isinstance(action, str):
        raise PolicyError(f"action {action!r} is not a string")
    name = action if ":" in action else f"kms:{action}"
    for allowed in ALLOWED_ACTIONS:
        if allowed.lower() == name.lower():
            return allowed
    raise PolicyError(f"action {action!r} cannot be bound to attestation; allowed: {', '.join(ALLOWED_ACTIONS)}")


def _dedupe(values: Iterable[str]) -> list[str]:
    seen: dict[str, None] = {}
    for value in values:
        seen.setdefault(value, None)
    return list(seen)


# --------------------------------------------------------------------------------------------------
# Condition evaluation (the operators used by key policies we write or are likely to meet)


def _like_regex(pattern: str) -> re.Pattern[str]:
    # IAM wildcards: * any run, ? one char; everything else literal.
    parts = ("." if ch == "?" else ".*" if ch == "*" else re.escape(ch) for ch in pattern)
    return re.compile("^" + "".join(parts) + "$", re.S)


def _string_match(base: str, context_value: str, condition_value: str) -> bool:
    if base in ("StringEquals", "StringNotEquals"):
        return context_value == condition_value
    if base in ("StringEqualsIgnoreCase", "StringNotEqualsIgnoreCase"):
        return context_value.casefold() == condition_value.casefold()
    if base in ("StringLike", "StringNotLike", "ArnLike", "ArnNotLike"):
        return bool(_like_regex(condition_value).match(context_value))
    if base in ("ArnEquals", "ArnNotEquals"):
        return context_value == condition_value
    if base == "Bool":
        return context_value.lower() == condition_value.lower()
    raise PolicyError(f"unsupported condition operator {base!r}")


SUPPORTED_OPERATORS = (
    "StringEquals",
    "StringNotEquals",
    "StringEqualsIgnoreCase",
    "StringNotEqualsIgnoreCase",
    "StringLike",
    "StringNotLike",
    "ArnEquals",
    "ArnNotEquals",
    "ArnLike",
    "ArnNotLike",
    "Bool",
    "Null",
)


def _split_operator(operator: str) -> tuple[str | None, str, bool]:
    """`ForAnyValue:StringLikeIfExists` -> ("ForAnyValue", "StringLike", True)."""
    qualifier: str | None = None
    if ":" in operator:
        qualifier, operator = operator.split(":", 1)
        if qualifier not in ("ForAnyValue", "ForAllValues"):
            raise PolicyError(f"unsupported condition set operator {qualifier!r}")
    if_exists = operator.endswith("IfExists")
    base = operator[: -len("IfExists")] if if_exists else operator
    if base not in SUPPORTED_OPERATORS or (base == "Null" and (if_exists or qualifier)):
        raise PolicyError(f"unsupported condition operator {operator!r}")
    return qualifier, base, if_exists


def _lookup(context: Mapping[str, Any], key: str) -> list[str] | None:
    # Condition keys are case-insensitive.
    wanted = key.lower()
    for name, value in context.items():
        if name.lower() == wanted:
            return None if value is None else [str(v) for v in as_list(value)]
    return None


def condition_operator_matches(operator: str, key: str, values: Any, context: Mapping[str, Any]) -> bool:
    """One `operator: {key: values}` entry against a request context (IAM semantics).

    Several condition values are OR'ed; a negated operator is true when no value matches (NOR).
    A missing key makes a positive operator false and a negated one true, unless ...IfExists (true).
    """
    qualifier, base, if_exists = _split_operator(operator)
    condition_values = [str(v) for v in as_list(values)]
    present = _lookup(context, key)
    if base == "Null":
        want_absent = {v.lower() for v in condition_values} == {"true"}
        return (present is None or present == []) == want_absent
    negated = "Not" in base
    if present is None:
        if qualifier == "ForAllValues":
            return True
        if qualifier == "ForAnyValue":
            return False
        return True if if_exists else negated

    def one(context_value: str) -> bool:
        hit = any(_string_match(base, context_value, cv) for cv in condition_values)
        return not hit if negated else hit

    if qualifier == "ForAllValues":
        return all(one(v) for v in present)
    if qualifier == "ForAnyValue":
        return any(one(v) for v in present)
    if len(present) != 1:
        # A single-valued operator applied to a multi-valued key never matches (positive) in IAM.
        return negated
    return one(present[0])


def conditions_match(condition: Any, context: Mapping[str, Any]) -> bool:
    """All operators AND, all keys under one operator AND."""
    if not condition:
        return True
    if not isinstance(condition, Mapping):
        raise PolicyError(f"Condition must map operators to keys, got {type(condition).__name__}")
    for operator, entries in condition.items():
        if not isinstance(entries, Mapping):
            raise PolicyError(f"condition operator {operator!r} must map keys to values")
        for key, values in entries.items():
            if not condition_operator_matches(str(operator), str(key), values, context):
                return False
    return True


def _principal_values(stmt: Mapping[str, Any], field_name: str) -> list[str] | None:
    principal = stmt.get(field_name)
    if principal is None:
        return None
    if principal == "*":
        return ["*"]
    if isinstance(principal, Mapping):
        return [str(v) for v in as_list(principal.get("AWS"))]
    return [str(v) for v in as_list(principal)]


_ACCOUNT_PRINCIPAL = re.compile(r"^(?:arn:aws[a-z-]*:iam::(\d{12}):root|(\d{12}))$")


def account_of_principal(value: str) -> str | None:
    """`arn:aws:iam::<acct>:root` or `<acct>`: the account, which in a key policy delegates to IAM."""
    match = _ACCOUNT_PRINCIPAL.match(value)
    return (match.group(1) or match.group(2)) if match else None


def _account_of_arn(arn: str) -> str | None:
    parts = arn.split(":")
    return parts[4] if len(parts) > 5 and parts[4].isdigit() else None


def principal_match(stmt: Mapping[str, Any], principal: str | None) -> str | None:
    """How the statement's principal names the caller: "direct", "account" (the caller's account, which
    AWS reads as "whatever that account's IAM policies allow"), or None.

    `principal=None` means "the caller matches any principal" (callers that evaluate one statement set).
    """
    if principal is None:
        return "direct"
    caller_account = account_of_principal(principal) or _account_of_arn(principal)
    listed = _principal_values(stmt, "Principal")
    if listed is not None:
        if "*" in listed or principal in listed:
            return "direct"
        if any(account_of_principal(p) == caller_account for p in listed if caller_account):
            return "account"
        return None
    excluded = _principal_values(stmt, "NotPrincipal")
    if excluded is not None:
        hit = principal in excluded or any(account_of_principal(p) == caller_account for p in excluded)
        return None if hit else "direct"
    return None


def principal_matches(stmt: Mapping[str, Any], principal: str | None) -> bool:
    """The statement names the caller or the caller's account (see `principal_match`)."""
    return principal_match(stmt, principal) is not None


def action_matches(stmt: Mapping[str, Any], action: str) -> bool:
    def hit(patterns: Any) -> bool:
        return any(_like_regex(str(p).lower()).match(action.lower()) for p in as_list(patterns))

    if "Action" in stmt:
        return hit(stmt["Action"])
    if "NotAction" in stmt:
        return not hit(stmt["NotAction"])
    return False


@dataclass(frozen=True)
class Decision:
    allowed: bool
    reason: str
    sid: str | None = None


def statement_applies(stmt: Mapping[str, Any], principal: str | None, action: str, context: Mapping[str, Any]) -> bool:
    """Principal, action and conditions all match. An unsupported operator or a malformed condition fails
    closed: it never grants (Allow) and always applies (Deny)."""
    if not (principal_matches(stmt, principal) and action_matches(stmt, action)):
        return False
    try:
        return conditions_match(stmt.get("Condition"), context)
    except PolicyError:
        return stmt.get("Effect") == "Deny"


IamCheck = Callable[[str], bool]


def evaluate(
    policy: Mapping[str, Any],
    action: str,
    context: Mapping[str, Any],
    *,
    principal: str | None = None,
    statement_filter: Callable[[Mapping[str, Any]], bool] | None = None,
    iam_allows: IamCheck | None = None,
) -> Decision:
    """IAM-style decision for one request: explicit Deny wins, then any Allow, else implicit deny.

    A statement naming the caller's account (`...:root`) grants only what `iam_allows(action)` says the
    caller's IAM policies grant (AWS: that statement "enables IAM policies"); without `iam_allows` it
    grants nothing to a caller other than the account itself. A Deny naming the account applies to every
    principal in it. `statement_filter` restricts which Allow statements may grant. Never raises: a
    policy that cannot be read grants nothing.
    """
    try:
        statements = [s for s in as_list(policy.get("Statement")) if isinstance(s, Mapping)]
        for stmt in statements:
            if stmt.get("Effect") == "Deny" and statement_applies(stmt, principal, action, context):
                return Decision(False, f"explicitly denied by statement {stmt.get('Sid')!r}", stmt.get("Sid"))
        for stmt in statements:
            if stmt.get("Effect") != "Allow" or (statement_filter and not statement_filter(stmt)):
                continue
            if not statement_applies(stmt, principal, action, context):
                continue
            if principal_match(stmt, principal) == "account" and not (iam_allows and iam_allows(action)):
                continue
            return Decision(True, f"allowed by statement {stmt.get('Sid')!r}", stmt.get("Sid"))
    except (PolicyError, TypeError, ValueError, AttributeError, RecursionError) as exc:
        return Decision(False, f"the key policy cannot be evaluated: {exc}")
    return Decision(False, "no statement allows this request")


def attestation_context(pcrs: Mapping[int, bytes | str]) -> dict[str, str]:
    """Request context KMS derives from a verified attestation document's PCRs."""
    context: dict[str, str] = {}
    for index, value in pcrs.items():
        text = value.hex() if isinstance(value, (bytes, bytearray)) else str(value).lower()
        context[condition_key(f"PCR{int(index)}")] = text
    if 0 in pcrs:
        context[condition_key("ImageSha384")] = context[condition_key("PCR0")]
    return context


# --------------------------------------------------------------------------------------------------
# Statement model


def attestation_conditions(stmt: Mapping[str, Any]) -> dict[str, list[str]]:
    """Attestation key -> lower-case values, gathered from StringEquals[IgnoreCase] (other operators kept
    aside by the merge)."""
    found: dict[str, list[str]] = {}
    condition = stmt.get("Condition") or {}
    if not isinstance(condition, Mapping):
        return found
    for operator in ("StringEqualsIgnoreCase", "StringEquals"):
        entries = condition.get(operator) or {}
        if not isinstance(entries, Mapping):
            continue
        for key, values in entries.items():
            if is_attestation_key(key):
                name = canonical_attestation_key(key)
                found[name] = _dedupe(found.get(name, []) + [str(v).lower() for v in as_list(values)])
    return found


def has_attestation_condition(stmt: Mapping[str, Any]) -> bool:
    condition = stmt.get("Condition") or {}
    if not isinstance(condition, Mapping):
        return False
    return any(
        is_attestation_key(key) for entries in condition.values() if isinstance(entries, Mapping) for key in entries
    )


def is_attested_statement(stmt: Mapping[str, Any]) -> bool:
    return stmt.get("Effect") == "Allow" and has_attestation_condition(stmt)


@dataclass
class StatementSpec:
    """What the user asked for one statement. None = "not given" (keep the existing value)."""

    sid: str
    principals: list[str] | None = None
    actions: list[str] | None = None
    conditions: dict[str, list[str]] = field(default_factory=dict)  # full condition key -> values


PcrHelper = Callable[[str], str]


def _load_pcr_helpers() -> tuple[PcrHelper, PcrHelper]:
    # The EIF library owns the PCR3/PCR4 formulas; imported lazily so evaluation never needs it.
    from . import eif

    return eif.pcr3_from_role_arn, eif.pcr4_from_instance_id


def parse_statement_spec(
    raw: Mapping[str, Any],
    allow_debug: bool = False,
    pcr_helpers: tuple[PcrHelper, PcrHelper] | None = None,
) -> StatementSpec:
    """Module option dict -> StatementSpec, validating every value."""
    sid = raw.get("sid")
    if not isinstance(sid, str) or not _SID.match(sid):
        raise PolicyError(f"statement sid {sid!r} must be 1-128 characters of letters, digits, space, _ . : -")
    principals = raw.get("principals")
    if principals is not None:
        principals = sorted(_dedupe(validate_role_arn(p) for p in as_list(principals)))
        if not principals:
            raise PolicyError(f"statement {sid!r}: principals must not be empty")
    actions = raw.get("actions")
    if actions is not None:
        actions = sorted(_dedupe(normalize_action(a) for a in as_list(actions)))
        if not actions:
            raise PolicyError(f"statement {sid!r}: actions must not be empty")
    conditions: dict[str, list[str]] = {}
    for option, suffix in CONDITION_OPTIONS.items():
        values = [normalize_pcr(v, f"{sid}.{option}", allow_debug) for v in as_list(raw.get(option))]
        if values:
            conditions[condition_key(suffix)] = _dedupe(values)
    derived = {"pcr3_role_arn": (3, validate_role_arn), "pcr4_instance_id": (4, _validate_instance_id)}
    for option, (index, check) in derived.items():
        sources = [check(v) for v in as_list(raw.get(option))]
        if not sources:
            continue
        helpers = pcr_helpers or _load_pcr_helpers()
        key = condition_key(f"PCR{index}")
        computed = [helpers[0 if index == 3 else 1](v).lower() for v in sources]
        conditions[key] = _dedupe(conditions.get(key, []) + computed)
    return StatementSpec(sid=sid, principals=principals, actions=actions, conditions=conditions)


def _validate_instance_id(value: Any) -> str:
    if not isinstance(value, str) or not re.match(r"^i-[0-9a-f]{8}([0-9a-f]{9})?$", value):
        raise PolicyError(f"pcr4_instance_id {value!r} is not an EC2 instance id (i-<8 or 17 hex>)")
    return value


def build_statement(
    sid: str,
    principals: Sequence[str],
    actions: Sequence[str],
    conditions: Mapping[str, Sequence[str]],
    extra_condition: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """The attested statement as written to KMS (lists everywhere, stable key order)."""
    condition: dict[str, Any] = copy.deepcopy(dict(extra_condition or {}))
    attested = dict(condition.get(ATTESTED_OPERATOR) or {})
    for key in sorted(conditions):
        attested[key] = list(conditions[key])
    condition[ATTESTED_OPERATOR] = attested
    return {
        "Sid": sid,
        "Effect": "Allow",
        "Principal": {"AWS": list(principals)},
        "Action": list(actions),
        "Resource": "*",
        "Condition": condition,
    }


def _split_existing_condition(stmt: Mapping[str, Any]) -> dict[str, Any]:
    """The existing statement's conditions minus the attestation keys we manage."""
    kept: dict[str, Any] = {}
    for operator, entries in (stmt.get("Condition") or {}).items():
        if operator in ("StringEqualsIgnoreCase", "StringEquals") and isinstance(entries, Mapping):
            rest = {k: v for k, v in entries.items() if not is_attestation_key(k)}
            if rest:
                kept[operator] = rest
        else:
            kept[operator] = copy.deepcopy(entries)
    return kept


def merge_statement(existing: Mapping[str, Any] | None, spec: StatementSpec, mode: str) -> dict[str, Any]:
    """The statement `spec` asks for, given the one currently in the policy (or None).

    mode applies to attestation values: replace = exactly the given keys and values; add = union per key;
    remove = drop the given values (refused if a key would be left without values, which would widen
    the statement). Principals/actions replace the existing ones when given.
    """
    if mode not in ("replace", "add", "remove"):
        raise PolicyError(f"pcr_values_mode must be replace, add or remove, not {mode!r}")
    current = attestation_conditions(existing) if existing else {}
    if mode == "replace":
        merged = {k: list(v) for k, v in spec.conditions.items()}
    elif mode == "add":
        merged = {k: list(v) for k, v in current.items()}
        for key, values in spec.conditions.items():
            merged[key] = _dedupe(merged.get(key, []) + list(values))
    else:
        if existing is None:
            raise PolicyError(f"statement {spec.sid!r} does not exist; nothing to remove values from")
        merged = {k: list(v) for k, v in current.items()}
        for key, values in spec.conditions.items():
            if key not in merged:
                continue
            left = [v for v in merged[key] if v not in values]
            if not left:
                raise PolicyError(
                    f"statement {spec.sid!r}: removing {key} values would leave the key without values, "
                    "which would drop the condition and widen access; add the new value first "
                    "or use state=absent"
                )
            merged[key] = left
    if not merged:
        raise PolicyError(
            f"statement {spec.sid!r} has no attestation condition (image_sha384/pcr0..pcr8); "
            "without one it is a plain Allow that any code on the host could use"
        )
    if existing is not None:
        principals = spec.principals if spec.principals is not None else _principal_values(existing, "Principal")
        actions = spec.actions if spec.actions is not None else as_list(existing.get("Action"))
        extra = _split_existing_condition(existing)
    else:
        principals, actions, extra = spec.principals, spec.actions or list(DEFAULT_ACTIONS), {}
    if not principals:
        raise PolicyError(f"statement {spec.sid!r} is new and needs principals (IAM role ARNs)")
    return build_statement(spec.sid, principals, actions, merged, extra)


# --------------------------------------------------------------------------------------------------
# Comparison (order-insensitive)

_SET_FIELDS = ("Action", "NotAction", "Resource", "NotResource")


def canonical_statement(stmt: Mapping[str, Any]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in stmt.items():
        if key in _SET_FIELDS:
            out[key] = sorted({str(v) for v in as_list(value)})
        elif key in ("Principal", "NotPrincipal"):
            if isinstance(value, Mapping):
                out[key] = {k: sorted({str(v) for v in as_list(v2)}) for k, v2 in value.items()}
            else:
                out[key] = sorted({str(v) for v in as_list(value)})
        elif key == "Condition" and isinstance(value, Mapping):
            out[key] = {
                op: {
                    ck: sorted({str(v).lower() if "IgnoreCase" in op else str(v) for v in as_list(cv)})
                    for ck, cv in entries.items()
                }
                if isinstance(entries, Mapping)
                else entries
                for op, entries in value.items()
            }
        else:
            out[key] = value
    return out


def canonical_policy(policy: Mapping[str, Any]) -> dict[str, Any]:
    out = {k: v for k, v in policy.items() if k != "Statement"}
    statements = [canonical_statement(s) if isinstance(s, Mapping) else s for s in as_list(policy.get("Statement"))]
    out["Statement"] = sorted(statements, key=lambda s: json.dumps(s, sort_keys=True))
    return out


def statements_equal(a: Mapping[str, Any] | None, b: Mapping[str, Any] | None) -> bool:
    if a is None or b is None:
        return a is b
    return canonical_statement(a) == canonical_statement(b)


def policies_equal(a: Mapping[str, Any], b: Mapping[str, Any]) -> bool:
    return json.dumps(canonical_policy(a), sort_keys=True) == json.dumps(canonical_policy(b), sort_keys=True)


# --------------------------------------------------------------------------------------------------
# Whole-policy validation and the merge entry point


def dump_policy(policy: Mapping[str, Any]) -> str:
    """The exact text sent to PutKeyPolicy (and shown in diffs)."""
    return json.dumps(policy, indent=2)


def load_policy(text: str | None) -> dict[str, Any]:
    if not text:
        return {"Version": POLICY_VERSION, "Statement": []}
    try:
        policy = json.loads(text)
    except ValueError as exc:
        raise PolicyError(f"the key's current policy is not valid JSON: {exc}") from exc
    if not isinstance(policy, dict):
        raise PolicyError("the key's current policy is not a JSON object")
    return policy


def _statements(policy: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    return [s for s in as_list(policy.get("Statement")) if isinstance(s, Mapping)]


def key_administrators(policy: Mapping[str, Any]) -> set[str]:
    """Principals an unconditioned Allow grants kms:PutKeyPolicy (what KMS's lockout check needs)."""
    admins: set[str] = set()
    for stmt in _statements(policy):
        if stmt.get("Effect") == "Allow" and not stmt.get("Condition") and action_matches(stmt, ADMIN_ACTION):
            admins.update(_principal_values(stmt, "Principal") or [])
    return admins


def find_bypasses(policy: Mapping[str, Any], managed_sids: Iterable[str]) -> list[str]:
    """Attested grants that another Allow without an attestation condition makes pointless.

    Stricter than "unconditioned": an Allow whose only conditions are non-attestation keys (e.g.
    kms:ViaService) still lets host code call the action without an attestation document.
    Account principals (`...:root`) delegate to IAM and are reported by `root_delegation_warnings`.
    """
    managed = set(managed_sids)
    problems: list[str] = []
    statements = _statements(policy)
    for stmt in statements:
        if stmt.get("Sid") not in managed or not is_attested_statement(stmt):
            continue
        for principal in _principal_values(stmt, "Principal") or []:
            for action in as_list(stmt.get("Action")):
                for other in statements:
                    if other is stmt or other.get("Effect") != "Allow" or has_attestation_condition(other):
                        continue
                    # An account principal delegates to IAM: root_delegation_warnings reports that.
                    if principal_match(other, principal) == "direct" and action_matches(other, str(action)):
                        problems.append(
                            f"statement {stmt.get('Sid')!r}: {principal} is also allowed {action} without "
                            f"attestation by statement {other.get('Sid')!r}, which would bypass attestation"
                        )
    return problems


def root_delegation_warnings(policy: Mapping[str, Any], managed_sids: Iterable[str]) -> list[str]:
    managed = set(managed_sids)
    warnings: list[str] = []
    actions = {str(a) for s in _statements(policy) if s.get("Sid") in managed for a in as_list(s.get("Action"))}
    for stmt in _statements(policy):
        if stmt.get("Effect") != "Allow" or has_attestation_condition(stmt) or stmt.get("Sid") in managed:
            continue
        roots = [p for p in _principal_values(stmt, "Principal") or [] if p.endswith(":root") or p.isdigit()]
        granted = sorted(a for a in actions if action_matches(stmt, a))
        if roots and granted:
            warnings.append(
                f"statement {stmt.get('Sid')!r} lets IAM policies of account {', '.join(roots)} grant "
                f"{', '.join(granted)}; make sure no IAM policy grants them to the enclave role without "
                "attestation"
            )
    return warnings


def validate_policy(
    policy: Mapping[str, Any], managed_sids: Iterable[str], before: Mapping[str, Any] | None = None
) -> None:
    managed = list(managed_sids)
    sids = [s.get("Sid") for s in _statements(policy) if s.get("Sid") is not None]
    for sid in managed:
        if sids.count(sid) > 1:
            raise PolicyError(f"the policy has {sids.count(sid)} statements with Sid {sid!r}")
    for stmt in _statements(policy):
        for operator in (stmt.get("Condition") or {}) if stmt.get("Sid") in managed else ():
            _split_operator(operator)
    bypasses = find_bypasses(policy, managed)
    if bypasses:
        raise PolicyError("; ".join(bypasses))
    admins_after = key_administrators(policy)
    if before is not None:
        lost = key_administrators(before) - admins_after
        if lost:
            raise PolicyError(
                f"the change would remove key administrator access (kms:PutKeyPolicy) for {sorted(lost)}; "
                "KMS's lockout safety check refuses such policies"
            )
    if not admins_after:
        raise PolicyError(
            "no principal would keep kms:PutKeyPolicy on the key (KMS's lockout safety check); "
            "keep an administrator statement in the policy"
        )
    size = len(dump_policy(policy).encode())
    if size > MAX_POLICY_BYTES:
        raise PolicyError(f"the policy would be {size} bytes; KMS key policies are limited to {MAX_POLICY_BYTES}")


@dataclass
class MergeResult:
    policy: dict[str, Any]
    changed_sids: list[str]
    warnings: list[str]

    @property
    def changed(self) -> bool:
        return bool(self.changed_sids)


def apply_statements(
    policy: Mapping[str, Any],
    specs: Sequence[StatementSpec],
    state: str = "present",
    mode: str = "replace",
) -> MergeResult:
    """Merge `specs` into `policy` by Sid; every other statement stays exactly as it was."""
    if state not in ("present", "absent"):
        raise PolicyError(f"state must be present or absent, not {state!r}")
    sids = [spec.sid for spec in specs]
    duplicates = sorted({s for s in sids if sids.count(s) > 1})
    if duplicates:
        raise PolicyError(f"statements list the same sid more than once: {duplicates}")
    new_policy = copy.deepcopy(dict(policy))
    new_policy.setdefault("Version", POLICY_VERSION)
    statements = as_list(new_policy.get("Statement"))
    changed: list[str] = []
    for spec in specs:
        indexes = [i for i, s in enumerate(statements) if isinstance(s, Mapping) and s.get("Sid") == spec.sid]
        if len(indexes) > 1:
            raise PolicyError(f"the policy has {len(indexes)} statements with Sid {spec.sid!r}; refusing to guess")
        existing = statements[indexes[0]] if indexes else None
        if existing is not None and not is_attested_statement(existing):
            # Never take over an administrator or other plain statement that happens to share the Sid.
            raise PolicyError(
                f"statement {spec.sid!r} exists and is not an attested Allow statement; refusing to "
                f"{'delete' if state == 'absent' else 'change'} it"
            )
        if state == "absent":
            if existing is not None:
                del statements[indexes[0]]
                changed.append(spec.sid)
            continue
        wanted = merge_statement(existing, spec, mode)
        if existing is None:
            statements.append(wanted)
            changed.append(spec.sid)
        elif not statements_equal(existing, wanted):
            statements[indexes[0]] = wanted
            changed.append(spec.sid)
    new_policy["Statement"] = statements
    managed = [] if state == "absent" else sids
    if changed:
        validate_policy(new_policy, managed, before=policy)
    else:
        # Nothing to write, but a bypass in the current policy is still a mistake to report.
        bypasses = find_bypasses(new_policy, managed)
        if bypasses:
            raise PolicyError("; ".join(bypasses))
    return MergeResult(
        policy=new_policy if changed else copy.deepcopy(dict(policy)),
        changed_sids=changed,
        warnings=root_delegation_warnings(new_policy, managed),
    )


def recipient_statement_filter(stmt: Mapping[str, Any]) -> bool:
    """Only attested statements may grant (what the module checks its own statements with; KMS itself lets
    any matching Allow grant a Recipient request)."""
    return is_attested_statement(stmt)
