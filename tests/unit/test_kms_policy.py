"""kms_policy: statement building, merging by Sid, comparison, validation and the condition evaluator."""

from __future__ import annotations

import copy
import hashlib
import json

import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import kms_policy as kp
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.kms_policy import PolicyError
from hypothesis import given, settings
from hypothesis import strategies as st

ACCOUNT = "123456789012"
ROLE = f"arn:aws:iam::{ACCOUNT}:role/enclave-parent"
OTHER_ROLE = f"arn:aws:iam::{ACCOUNT}:role/other"
ADMIN = f"arn:aws:iam::{ACCOUNT}:role/key-admin"
OLD = "ab" * 48
NEW = "cd" * 48
PCR8 = "ef" * 48
ZERO = "0" * 96
P0 = kp.condition_key("PCR0")


def default_policy() -> dict:
    """moto's / KMS's default key policy: the account root may do anything (delegates to IAM)."""
    return {
        "Version": "2012-10-17",
        "Id": "key-default-1",
        "Statement": [
            {
                "Sid": "Enable IAM User Permissions",
                "Effect": "Allow",
                "Principal": {"AWS": f"arn:aws:iam::{ACCOUNT}:root"},
                "Action": "kms:*",
                "Resource": "*",
            }
        ],
    }


def fake_helpers() -> tuple:
    # The real formulas live in the EIF library; here only the plumbing is under test.
    def pcr(data: str) -> str:
        return hashlib.sha384(b"\0" * 48 + data.encode()).hexdigest()

    return pcr, pcr


def spec(**raw) -> kp.StatementSpec:
    raw.setdefault("sid", "EnclaveDecrypt")
    return kp.parse_statement_spec(raw, allow_debug=raw.pop("allow_debug", False), pcr_helpers=fake_helpers())


# ------------------------------------------------------------------ validation of single values


def test_pcr_upper_case_accepted_and_stored_lower() -> None:
    assert kp.normalize_pcr(OLD.upper(), "pcr0") == OLD
    s = spec(principals=[ROLE], pcr0=[OLD.upper()])
    assert s.conditions == {P0: [OLD]}


@pytest.mark.parametrize("bad", ["ab" * 47, "ab" * 49, "zz" * 48, "0x" + "ab" * 47, "", 123, None])
def test_pcr_must_be_96_hex(bad) -> None:
    with pytest.raises(PolicyError, match=r"96 hex|string"):
        kp.normalize_pcr(bad, "pcr0")


def test_all_zero_pcr_refused_unless_debug_allowed() -> None:
    with pytest.raises(PolicyError, match="debug"):
        spec(principals=[ROLE], pcr0=ZERO)
    assert spec(principals=[ROLE], pcr0=ZERO, allow_debug=True).conditions == {P0: [ZERO]}


@pytest.mark.parametrize(
    "principal",
    ["arn:aws:iam::123456789012:user/bob", "arn:aws:iam::123:role/x", "*", "123456789012", ""],
)
def test_principals_must_be_role_arns(principal) -> None:
    with pytest.raises(PolicyError, match="IAM role ARN"):
        spec(principals=[principal], pcr0=OLD)


def test_principals_may_be_in_other_partitions() -> None:
    arn = "arn:aws-us-gov:iam::123456789012:role/path/x"
    assert spec(principals=[arn], pcr0=OLD).principals == [arn]


@pytest.mark.parametrize("action", ["kms:Encrypt", "kms:*", "kms:PutKeyPolicy", "ReEncrypt", "s3:GetObject"])
def test_only_attestation_capable_actions(action) -> None:
    with pytest.raises(PolicyError, match="cannot be bound to attestation"):
        spec(principals=[ROLE], actions=[action], pcr0=OLD)


def test_actions_accept_short_names_and_any_case() -> None:
    s = spec(principals=[ROLE], actions=["decrypt", "kms:generatedatakey", "GenerateDataKeyPair"], pcr0=OLD)
    assert s.actions == ["kms:Decrypt", "kms:GenerateDataKey", "kms:GenerateDataKeyPair"]


@pytest.mark.parametrize("sid", ["", "a" * 129, 'quote"d', None])
def test_sid_rules(sid) -> None:
    with pytest.raises(PolicyError, match="sid"):
        kp.parse_statement_spec({"sid": sid, "principals": [ROLE], "pcr0": OLD})


def test_pcr3_and_pcr4_from_role_and_instance() -> None:
    pcr3, pcr4 = fake_helpers()
    s = spec(principals=[ROLE], pcr0=OLD, pcr3_role_arn=ROLE, pcr4_instance_id="i-1234567890abcdef0")
    assert s.conditions[kp.condition_key("PCR3")] == [pcr3(ROLE)]
    assert s.conditions[kp.condition_key("PCR4")] == [pcr4("i-1234567890abcdef0")]
    with pytest.raises(PolicyError, match="instance id"):
        spec(principals=[ROLE], pcr4_instance_id="i-xyz")
    with pytest.raises(PolicyError, match="IAM role ARN"):
        spec(principals=[ROLE], pcr3_role_arn="not-an-arn")


def test_pcr3_pcr4_use_the_eif_library() -> None:
    s = kp.parse_statement_spec(
        {
            "sid": "x",
            "principals": [ROLE],
            "pcr3_role_arn": "arn:aws:iam::123456789012:role/Webserver",
            "pcr4_instance_id": "i-1234567890abcdef0",
        }
    )
    # AWS user guide vectors (reference nitro-cli-and-eif.md §4.3).
    assert s.conditions[kp.condition_key("PCR3")] == [
        "78fce75db17cd4e0a3fb8dad3ad128ca5e77edbb2b2c7f75329dccd99aa5f6ef4fc1f1a452e315b9e98f9e312e6921e6"
    ]
    assert s.conditions[kp.condition_key("PCR4")] == [
        "08f996b5d43e047a9eb51e7f548bfee7e164fd7dc8f65541f2ac09d6545ac812719327281c401a67a10fcba87ae79ce0"
    ]


# ------------------------------------------------------------------ build / merge


def test_new_statement_shape() -> None:
    result = kp.apply_statements(default_policy(), [spec(principals=[ROLE], pcr0=[NEW, OLD], pcr8=PCR8)])
    assert result.changed_sids == ["EnclaveDecrypt"]
    stmt = result.policy["Statement"][-1]
    assert stmt == {
        "Sid": "EnclaveDecrypt",
        "Effect": "Allow",
        "Principal": {"AWS": [ROLE]},
        "Action": ["kms:Decrypt"],
        "Resource": "*",
        "Condition": {"StringEqualsIgnoreCase": {P0: [NEW, OLD], kp.condition_key("PCR8"): [PCR8]}},
    }
    # The administrator statement is untouched, byte for byte.
    assert result.policy["Statement"][0] == default_policy()["Statement"][0]
    assert result.policy["Id"] == "key-default-1"


def test_new_statement_needs_principals_and_a_condition() -> None:
    with pytest.raises(PolicyError, match="needs principals"):
        kp.apply_statements(default_policy(), [spec(pcr0=OLD)])
    with pytest.raises(PolicyError, match="no attestation condition"):
        kp.apply_statements(default_policy(), [spec(principals=[ROLE])])


def with_statement(*values: str, sid: str = "EnclaveDecrypt") -> dict:
    return kp.apply_statements(default_policy(), [spec(sid=sid, principals=[ROLE], pcr0=list(values))]).policy


def test_foreign_statements_preserved_in_order_and_content() -> None:
    policy = default_policy()
    foreign = [
        {"Sid": "Odd", "Effect": "Deny", "Principal": "*", "Action": "kms:ScheduleKeyDeletion", "Resource": "*"},
        {"Effect": "Allow", "Principal": {"AWS": OTHER_ROLE}, "Action": "kms:Encrypt", "Resource": "*"},
    ]
    policy["Statement"] += foreign
    first = kp.apply_statements(policy, [spec(principals=[ROLE], pcr0=OLD)]).policy
    second = kp.apply_statements(first, [spec(pcr0=NEW)], mode="replace").policy
    third = kp.apply_statements(second, [spec()], state="absent").policy
    for p in (first, second, third):
        assert p["Statement"][:3] == [default_policy()["Statement"][0], *foreign]
    assert third == policy


def test_add_remove_replace_modes() -> None:
    policy = with_statement(OLD)
    added = kp.apply_statements(policy, [spec(pcr0=NEW)], mode="add")
    assert added.changed_sids == ["EnclaveDecrypt"]
    assert added.policy["Statement"][-1]["Condition"][kp.ATTESTED_OPERATOR][P0] == [OLD, NEW]
    again = kp.apply_statements(added.policy, [spec(pcr0=NEW.upper())], mode="add")
    assert again.changed_sids == [] and again.policy == added.policy
    removed = kp.apply_statements(added.policy, [spec(pcr0=OLD)], mode="remove")
    assert removed.policy["Statement"][-1]["Condition"][kp.ATTESTED_OPERATOR][P0] == [NEW]
    assert kp.apply_statements(removed.policy, [spec(pcr0=OLD)], mode="remove").changed_sids == []
    replaced = kp.apply_statements(removed.policy, [spec(pcr0=OLD, pcr8=PCR8)], mode="replace")
    cond = replaced.policy["Statement"][-1]["Condition"][kp.ATTESTED_OPERATOR]
    assert cond == {P0: [OLD], kp.condition_key("PCR8"): [PCR8]}
    # replace drops keys not given; principals/actions kept when not given.
    narrowed = kp.apply_statements(replaced.policy, [spec(pcr0=OLD)], mode="replace").policy
    assert narrowed["Statement"][-1]["Condition"][kp.ATTESTED_OPERATOR] == {P0: [OLD]}
    assert narrowed["Statement"][-1]["Principal"] == {"AWS": [ROLE]}


def test_add_may_add_a_new_key() -> None:
    policy = kp.apply_statements(with_statement(OLD), [spec(pcr8=PCR8)], mode="add").policy
    assert set(policy["Statement"][-1]["Condition"][kp.ATTESTED_OPERATOR]) == {P0, kp.condition_key("PCR8")}


def test_remove_never_empties_a_key() -> None:
    with pytest.raises(PolicyError, match="widen"):
        kp.apply_statements(with_statement(OLD), [spec(pcr0=OLD)], mode="remove")
    with pytest.raises(PolicyError, match="does not exist"):
        kp.apply_statements(default_policy(), [spec(pcr0=OLD)], mode="remove")


def test_bad_mode_and_state() -> None:
    with pytest.raises(PolicyError, match="pcr_values_mode"):
        kp.apply_statements(default_policy(), [spec(principals=[ROLE], pcr0=OLD)], mode="merge")
    with pytest.raises(PolicyError, match="state"):
        kp.apply_statements(default_policy(), [spec(principals=[ROLE], pcr0=OLD)], state="gone")


def test_idempotent_and_order_insensitive() -> None:
    policy = kp.apply_statements(
        default_policy(),
        [spec(principals=[ROLE, OTHER_ROLE], actions=["kms:GenerateDataKey", "kms:Decrypt"], pcr0=[OLD, NEW])],
    ).policy
    # Shuffle every list and flip case: still no change.
    shuffled = copy.deepcopy(policy)
    stmt = shuffled["Statement"][-1]
    stmt["Principal"]["AWS"].reverse()
    stmt["Action"].reverse()
    stmt["Condition"][kp.ATTESTED_OPERATOR][P0] = [NEW.upper(), OLD]
    shuffled["Statement"].reverse()
    assert kp.policies_equal(policy, shuffled)
    again = kp.apply_statements(
        shuffled,
        [spec(principals=[OTHER_ROLE, ROLE], actions=["decrypt", "generatedatakey"], pcr0=[NEW, OLD])],
    )
    assert again.changed_sids == []
    assert again.policy == shuffled  # nothing rewritten


def test_scalar_and_list_forms_compare_equal() -> None:
    a = {"Sid": "x", "Effect": "Allow", "Principal": {"AWS": ROLE}, "Action": "kms:Decrypt", "Resource": "*"}
    b = {"Sid": "x", "Effect": "Allow", "Principal": {"AWS": [ROLE]}, "Action": ["kms:Decrypt"], "Resource": ["*"]}
    assert kp.statements_equal(a, b)
    assert not kp.statements_equal(a, {**b, "Action": ["kms:Decrypt", "kms:GenerateRandom"]})
    # Case is significant outside IgnoreCase operators.
    c1 = {**a, "Condition": {"StringEquals": {"aws:PrincipalTag/x": "A"}}}
    c2 = {**a, "Condition": {"StringEquals": {"aws:PrincipalTag/x": "a"}}}
    assert not kp.statements_equal(c1, c2)


def test_adopts_existing_attested_statement_written_by_hand() -> None:
    policy = default_policy()
    policy["Statement"].append(
        {
            "Sid": "EnclaveDecrypt",
            "Effect": "Allow",
            "Principal": {"AWS": ROLE},
            "Action": "kms:Decrypt",
            "Resource": "*",
            "Condition": {
                "StringEquals": {"kms:recipientattestation:pcr0": OLD.upper(), "kms:EncryptionContext:app": "tok"}
            },
        }
    )
    result = kp.apply_statements(policy, [spec(pcr0=NEW)], mode="add")
    cond = result.policy["Statement"][-1]["Condition"]
    # Attestation values move under StringEqualsIgnoreCase, lower case; the foreign key stays where it was.
    assert cond == {
        "StringEquals": {"kms:EncryptionContext:app": "tok"},
        "StringEqualsIgnoreCase": {P0: [OLD, NEW]},
    }


def test_absent_removes_only_the_named_statement() -> None:
    policy = kp.apply_statements(
        default_policy(), [spec(principals=[ROLE], pcr0=OLD), spec(sid="Other", principals=[ROLE], pcr0=NEW)]
    ).policy
    result = kp.apply_statements(policy, [spec()], state="absent")
    assert result.changed_sids == ["EnclaveDecrypt"]
    assert [s.get("Sid") for s in result.policy["Statement"]] == ["Enable IAM User Permissions", "Other"]
    assert kp.apply_statements(result.policy, [spec()], state="absent").changed_sids == []


def test_refuses_to_touch_a_non_attested_statement_with_the_same_sid() -> None:
    policy = default_policy()
    with pytest.raises(PolicyError, match="not an attested Allow"):
        kp.apply_statements(policy, [spec(sid="Enable IAM User Permissions", principals=[ROLE], pcr0=OLD)])
    with pytest.raises(PolicyError, match="not an attested Allow"):
        kp.apply_statements(policy, [spec(sid="Enable IAM User Permissions")], state="absent")


def test_duplicate_sids_refused() -> None:
    with pytest.raises(PolicyError, match="more than once"):
        kp.apply_statements(default_policy(), [spec(principals=[ROLE], pcr0=OLD)] * 2)
    policy = with_statement(OLD)
    policy["Statement"].append(copy.deepcopy(policy["Statement"][-1]))
    with pytest.raises(PolicyError, match="2 statements"):
        kp.apply_statements(policy, [spec(pcr0=NEW)], mode="add")


# ------------------------------------------------------------------ whole-policy rules


def test_unconditioned_allow_for_same_principal_and_action_is_a_bypass() -> None:
    policy = default_policy()
    policy["Statement"].append(
        {"Sid": "HostDecrypt", "Effect": "Allow", "Principal": {"AWS": ROLE}, "Action": "kms:Decrypt*", "Resource": "*"}
    )
    with pytest.raises(PolicyError, match="bypass attestation"):
        kp.apply_statements(policy, [spec(principals=[ROLE], pcr0=OLD)])
    # A different action for the same principal is fine (kmstool's "encrypt from instance").
    policy["Statement"][-1]["Action"] = "kms:Encrypt"
    kp.apply_statements(policy, [spec(principals=[ROLE], pcr0=OLD)])
    # A wildcard principal is a bypass too, and so is an Allow conditioned on something else.
    policy["Statement"][-1].update(
        Principal="*",
        Action="kms:Decrypt",
        Condition={"StringEquals": {"kms:ViaService": "s3.us-east-1.amazonaws.com"}},
    )
    with pytest.raises(PolicyError, match="bypass attestation"):
        kp.apply_statements(policy, [spec(principals=[ROLE], pcr0=OLD)])


def test_bypass_reported_even_without_change() -> None:
    policy = with_statement(OLD)
    policy["Statement"].append(
        {"Sid": "Sneaky", "Effect": "Allow", "Principal": {"AWS": [ROLE]}, "Action": ["kms:*"], "Resource": "*"}
    )
    with pytest.raises(PolicyError, match="Sneaky"):
        kp.apply_statements(policy, [spec(pcr0=OLD)], mode="add")


def test_account_root_delegation_is_a_warning_not_an_error() -> None:
    result = kp.apply_statements(default_policy(), [spec(principals=[ROLE], pcr0=OLD)])
    assert any("IAM policies of account" in w for w in result.warnings)


def test_keeps_key_administrators() -> None:
    policy = {
        "Version": "2012-10-17",
        "Statement": [
            {"Sid": "Admins", "Effect": "Allow", "Principal": {"AWS": ADMIN}, "Action": "kms:*", "Resource": "*"},
        ],
    }
    assert kp.key_administrators(policy) == {ADMIN}
    # Hand-edit an attested statement into the admin's place, then ask the module to change it.
    hijacked = copy.deepcopy(policy)
    hijacked["Statement"].append(
        {
            "Sid": "EnclaveDecrypt",
            "Effect": "Allow",
            "Principal": {"AWS": ROLE},
            "Action": "kms:Decrypt",
            "Resource": "*",
            "Condition": {"StringEqualsIgnoreCase": {P0: OLD}},
        }
    )
    hijacked["Statement"][0]["Condition"] = {"Bool": {"aws:MultiFactorAuthPresent": "true"}}
    with pytest.raises(PolicyError, match="kms:PutKeyPolicy"):
        kp.apply_statements(hijacked, [spec(pcr0=NEW)], mode="add")
    # validate_policy also refuses a policy that loses an admin present before.
    after = copy.deepcopy(policy)
    after["Statement"][0]["Principal"] = {"AWS": OTHER_ROLE}
    with pytest.raises(PolicyError, match="remove key administrator"):
        kp.validate_policy(after, [], before=policy)


def test_policy_size_limit() -> None:
    many = [spec(sid=f"S{i}", principals=[ROLE], pcr0=[f"{j:02x}" * 48 for j in range(1, 81)]) for i in range(4)]
    with pytest.raises(PolicyError, match="32768"):
        kp.apply_statements(default_policy(), many)
    assert len(kp.dump_policy(kp.apply_statements(default_policy(), many[:1]).policy)) < kp.MAX_POLICY_BYTES


def test_load_policy() -> None:
    assert kp.load_policy(json.dumps(default_policy())) == default_policy()
    assert kp.load_policy(None)["Statement"] == []
    with pytest.raises(PolicyError, match="not valid JSON"):
        kp.load_policy("{not json")
    with pytest.raises(PolicyError, match="JSON object"):
        kp.load_policy("[]")


# ------------------------------------------------------------------ evaluator


@pytest.mark.parametrize(
    ("operator", "values", "context_value", "expected"),
    [
        ("StringEquals", ["abc"], "abc", True),
        ("StringEquals", ["ABC"], "abc", False),
        ("StringEquals", ["x", "abc"], "abc", True),  # values OR'ed
        ("StringEqualsIgnoreCase", ["ABC"], "abc", True),
        ("StringEqualsIgnoreCase", "AbC", "aBc", True),
        ("StringNotEquals", ["x", "y"], "abc", True),  # NOR
        ("StringNotEquals", ["x", "abc"], "abc", False),
        ("StringNotEqualsIgnoreCase", ["ABC"], "abc", False),
        ("StringLike", ["a*c"], "abbbc", True),
        ("StringLike", ["a?c"], "abbc", False),
        ("StringLike", ["a.c"], "abc", False),  # regex metacharacters are literal
        ("StringLike", ["*"], "", True),
        ("StringNotLike", ["a*"], "abc", False),
    ],
)
def test_string_operators(operator, values, context_value, expected) -> None:
    assert kp.condition_operator_matches(operator, "k", values, {"k": context_value}) is expected


def test_missing_keys_ifexists_null_and_set_operators() -> None:
    assert kp.condition_operator_matches("StringEquals", "k", "v", {}) is False
    assert kp.condition_operator_matches("StringNotEquals", "k", "v", {}) is True
    assert kp.condition_operator_matches("StringEqualsIfExists", "k", "v", {}) is True
    assert kp.condition_operator_matches("StringEqualsIfExists", "k", "v", {"k": "w"}) is False
    assert kp.condition_operator_matches("Null", "k", "true", {}) is True
    assert kp.condition_operator_matches("Null", "k", "false", {"k": "v"}) is True
    assert kp.condition_operator_matches("Null", "k", "true", {"k": "v"}) is False
    ctx = {"tags": ["a", "b"]}
    assert kp.condition_operator_matches("ForAnyValue:StringEquals", "tags", ["b", "z"], ctx) is True
    assert kp.condition_operator_matches("ForAllValues:StringEquals", "tags", ["b", "z"], ctx) is False
    assert kp.condition_operator_matches("ForAllValues:StringEquals", "tags", ["a", "b", "c"], ctx) is True
    assert kp.condition_operator_matches("ForAllValues:StringEquals", "missing", ["a"], ctx) is True
    assert kp.condition_operator_matches("ForAnyValue:StringEquals", "missing", ["a"], ctx) is False
    # Single-valued operator on a multi-valued key: never a positive match.
    assert kp.condition_operator_matches("StringEquals", "tags", ["a", "b"], ctx) is False
    # Condition keys are case-insensitive.
    assert kp.condition_operator_matches("StringEquals", "KMS:RecipientAttestation:PCR0", OLD, {P0: OLD})


@pytest.mark.parametrize("operator", ["NumericEquals", "Foo:StringEquals", "NullIfExists", "IpAddress"])
def test_unsupported_operators_refused(operator) -> None:
    with pytest.raises(PolicyError, match="unsupported"):
        kp.condition_operator_matches(operator, "k", "v", {"k": "v"})


def attested_policy(*pcr0: str, extra: dict | None = None) -> dict:
    policy = with_statement(*pcr0)
    policy["Statement"][-1]["Action"] = ["kms:Decrypt", "kms:GenerateDataKey"]
    if extra:
        policy["Statement"][-1]["Condition"][kp.ATTESTED_OPERATOR].update(extra)
    return policy


def test_evaluate_attested_allow_and_deny() -> None:
    policy = attested_policy(OLD, NEW, extra={kp.condition_key("PCR8"): [PCR8]})
    ok = kp.attestation_context({0: bytes.fromhex(NEW), 8: bytes.fromhex(PCR8), 4: b"\x01" * 48})
    only_attested = kp.recipient_statement_filter
    decision = kp.evaluate(policy, "kms:Decrypt", ok, principal=ROLE, statement_filter=only_attested)
    assert decision.allowed and decision.sid == "EnclaveDecrypt"
    assert kp.evaluate(policy, "kms:GenerateDataKey", ok, principal=ROLE, statement_filter=only_attested).allowed
    # Another action, principal, PCR0, PCR8 or a missing PCR8: denied.
    assert not kp.evaluate(policy, "kms:GenerateRandom", ok, principal=ROLE, statement_filter=only_attested).allowed
    assert not kp.evaluate(policy, "kms:Decrypt", ok, principal=OTHER_ROLE, statement_filter=only_attested).allowed
    for ctx in (
        kp.attestation_context({0: "11" * 48, 8: PCR8}),
        kp.attestation_context({0: NEW, 8: "11" * 48}),
        kp.attestation_context({0: NEW}),
        kp.attestation_context({0: ZERO, 8: PCR8}),
        {},
    ):
        assert not kp.evaluate(policy, "kms:Decrypt", ctx, principal=ROLE, statement_filter=only_attested).allowed
    # principal=None: the caller is taken to match any principal (the local KMS's simplification).
    assert kp.evaluate(policy, "kms:Decrypt", ok, statement_filter=only_attested).allowed
    # Without the filter the account root's kms:* grants everything to the root principal.
    root = f"arn:aws:iam::{ACCOUNT}:root"
    assert kp.evaluate(policy, "kms:Decrypt", {}, principal=root).sid == "Enable IAM User Permissions"


def test_image_sha384_is_pcr0() -> None:
    policy = kp.apply_statements(default_policy(), [spec(principals=[ROLE], image_sha384=NEW)]).policy
    assert kp.evaluate(policy, "kms:Decrypt", kp.attestation_context({0: NEW}), principal=ROLE).allowed
    assert not kp.evaluate(policy, "kms:Decrypt", kp.attestation_context({1: NEW}), principal=ROLE).allowed


def test_explicit_deny_wins_and_unknown_operator_fails_closed() -> None:
    policy = attested_policy(NEW)
    ctx = kp.attestation_context({0: NEW})
    policy["Statement"].append(
        {"Sid": "NoDecrypt", "Effect": "Deny", "Principal": "*", "Action": "kms:Decrypt", "Resource": "*"}
    )
    decision = kp.evaluate(policy, "kms:Decrypt", ctx, principal=ROLE)
    assert not decision.allowed and decision.sid == "NoDecrypt"
    # A Deny with an operator we cannot evaluate applies (fail closed) ...
    policy["Statement"][-1]["Condition"] = {"DateGreaterThan": {"aws:CurrentTime": "2020-01-01T00:00:00Z"}}
    assert not kp.evaluate(policy, "kms:Decrypt", ctx, principal=ROLE).allowed
    # ... and an Allow with one never grants.
    policy["Statement"].pop()
    policy["Statement"][-1]["Condition"]["NumericLessThan"] = {"kms:x": "3"}
    assert not kp.evaluate(policy, "kms:Decrypt", ctx, principal=ROLE).allowed


def test_not_action_and_not_principal() -> None:
    stmt = {"Effect": "Allow", "NotPrincipal": {"AWS": ROLE}, "NotAction": "kms:Decrypt"}
    assert kp.statement_applies(stmt, OTHER_ROLE, "kms:Encrypt", {})
    assert not kp.statement_applies(stmt, ROLE, "kms:Encrypt", {})
    assert not kp.statement_applies(stmt, OTHER_ROLE, "kms:Decrypt", {})


def test_attestation_key_names() -> None:
    assert kp.canonical_attestation_key("kms:recipientattestation:imagesha384") == kp.condition_key("ImageSha384")
    assert kp.canonical_attestation_key("KMS:RECIPIENTATTESTATION:PCR31") == kp.condition_key("PCR31")
    for bad in ("kms:RecipientAttestation", "kms:RecipientAttestation:PCR32", "kms:RecipientAttestation:NitroTPMPCR0"):
        assert not kp.is_attestation_key(bad)
        with pytest.raises(PolicyError):
            kp.canonical_attestation_key(bad)


# ------------------------------------------------------------------ properties

pcr_values = st.lists(st.binary(min_size=48, max_size=48).map(bytes.hex), min_size=1, max_size=5, unique=True)


@settings(max_examples=60, deadline=None)
@given(old=pcr_values, new=pcr_values, data=st.data())
def test_rotation_properties(old, new, data) -> None:
    old = [v for v in old if set(v) != {"0"}] or [OLD]
    new = [v for v in new if set(v) != {"0"} and v not in old] or [NEW]
    start = with_statement(*old)
    added = kp.apply_statements(start, [spec(pcr0=[v.upper() for v in new])], mode="add")
    # add is idempotent and order/case-insensitive
    shuffled = data.draw(st.permutations(new))
    assert kp.apply_statements(added.policy, [spec(pcr0=shuffled)], mode="add").changed_sids == []
    # every old and new value is granted after phase 1; after phase 2 only the new ones
    for value in old + new:
        ctx = kp.attestation_context({0: value})
        assert kp.evaluate(added.policy, "kms:Decrypt", ctx, principal=ROLE).allowed
    removed = kp.apply_statements(added.policy, [spec(pcr0=old)], mode="remove").policy
    for value in old:
        assert not kp.evaluate(removed, "kms:Decrypt", kp.attestation_context({0: value}), principal=ROLE).allowed
    for value in new:
        assert kp.evaluate(removed, "kms:Decrypt", kp.attestation_context({0: value}), principal=ROLE).allowed
    # replace with the new values gives the same statement as add + remove
    replaced = kp.apply_statements(start, [spec(pcr0=new)], mode="replace").policy
    assert kp.policies_equal(replaced, removed)
    # foreign statements never change
    assert removed["Statement"][0] == start["Statement"][0]


# ------------------------------------------------------------------ AWS semantics of the account root


def test_account_root_delegates_to_iam_and_any_allow_grants_an_attested_call() -> None:
    policy = attested_policy(OLD)  # root kms:* + the role's attested Decrypt
    ok = kp.attestation_context({0: bytes.fromhex(OLD)})
    # The role has no IAM permissions: only the attested statement can grant it, and only with attestation.
    assert kp.evaluate(policy, "kms:Decrypt", ok, principal=ROLE, iam_allows=lambda a: False).sid == "EnclaveDecrypt"
    assert not kp.evaluate(policy, "kms:Decrypt", {}, principal=ROLE, iam_allows=lambda a: False).allowed
    # A principal of the account whose IAM policies allow Decrypt is granted by the root statement,
    # with or without attestation (as in AWS: any matching Allow grants).
    admin = f"arn:aws:iam::{ACCOUNT}:user/admin"
    for ctx in (ok, {}):
        decision = kp.evaluate(policy, "kms:Decrypt", ctx, principal=admin, iam_allows=lambda a: True)
        assert decision.sid == "Enable IAM User Permissions"
    only_admin = kp.evaluate(policy, "kms:Decrypt", {}, principal=admin, iam_allows=lambda a: a == "kms:PutKeyPolicy")
    assert not only_admin.allowed
    assert kp.evaluate(
        policy, "kms:PutKeyPolicy", {}, principal=admin, iam_allows=lambda a: a == "kms:PutKeyPolicy"
    ).allowed
    # Another account's principal is not named by this account's root.
    stranger = "arn:aws:iam::999999999999:role/x"
    assert not kp.evaluate(policy, "kms:Decrypt", ok, principal=stranger, iam_allows=lambda a: True).allowed


def test_deny_naming_the_account_applies_to_its_principals() -> None:
    policy = attested_policy(OLD)
    policy["Statement"].append(
        {"Sid": "NoDecrypt", "Effect": "Deny", "Principal": {"AWS": ACCOUNT}, "Action": "kms:Decrypt", "Resource": "*"}
    )
    ok = kp.attestation_context({0: bytes.fromhex(OLD)})
    decision = kp.evaluate(policy, "kms:Decrypt", ok, principal=ROLE, iam_allows=lambda a: True)
    assert not decision.allowed and decision.sid == "NoDecrypt"


@pytest.mark.parametrize("condition", [["StringEquals"], "x", 3, {"StringEquals": "x"}, {"Foo": {"k": "v"}}])
def test_malformed_stored_conditions_never_raise(condition) -> None:
    allow = {"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*", "Condition": condition}
    deny = {**allow, "Effect": "Deny"}
    assert not kp.evaluate({"Statement": [allow]}, "kms:Decrypt", {}, principal=ROLE).allowed
    assert not kp.evaluate({"Statement": [deny, {**allow, "Condition": {}}]}, "kms:Decrypt", {}, principal=ROLE).allowed
    for junk in ({"Statement": "x"}, {"Statement": [1, None]}, {"Statement": {"Effect": "Allow", "Action": 5}}):
        assert not kp.evaluate(junk, "kms:Decrypt", {}, principal=ROLE).allowed


def test_bool_and_arn_operators() -> None:
    ctx = {"aws:SecureTransport": "true", "aws:PrincipalArn": ROLE}
    assert kp.conditions_match({"Bool": {"aws:SecureTransport": True}}, ctx)
    assert not kp.conditions_match({"Bool": {"aws:SecureTransport": "false"}}, ctx)
    assert kp.conditions_match({"ArnLike": {"aws:PrincipalArn": "arn:aws:iam::*:role/enclave-*"}}, ctx)


# ------------------------------------------------------------------ the grammar KMS enforces on PutKeyPolicy

ANY = '{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*"}]}'


@pytest.mark.parametrize(
    ("document", "reason"),
    [
        ("{not json", "not valid JSON"),
        ("[]", "JSON object"),
        ('{"Statement": []}', "no Statement"),
        ('{"Version": "2020-01-01", "Statement": [{}]}', "Version"),
        ('{"Statement": [{"Effect": "Maybe", "Principal": "*", "Action": "kms:*", "Resource": "*"}]}', "Effect"),
        ('{"Statement": [{"Effect": "Allow", "Action": "kms:*", "Resource": "*"}]}', "Principal"),
        ('{"Statement": [{"Effect": "Allow", "Principal": "*", "Resource": "*"}]}', "Action"),
        ('{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*"}]}', "Resource"),
        (ANY.replace("}]}", ', "Condition": ["x"]}]}'), "map of condition operators"),
        (ANY.replace("}]}", ', "Condition": {"Foo": {"a": "b"}}}]}'), "not a condition operator"),
        (ANY.replace("}]}", ', "Condition": {"StringEquals": "b"}}]}'), "must map condition keys"),
        (
            '{"Statement": [{"Effect": "Allow", "Principal": {"AWS": "bob"}, "Action": "kms:*", "Resource": "*"}]}',
            "not an account id",
        ),
        (
            '{"Statement": [{"Effect": "Allow", "Principal": "*", "Action": "kms:*", "Resource": "*", "Extra": 1}]}',
            "unknown element",
        ),
    ],
)
def test_key_policy_grammar(document, reason) -> None:
    from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import kms_policy_document

    with pytest.raises(PolicyError, match=reason):
        kms_policy_document.parse_key_policy(document)


def test_key_policy_grammar_accepts_what_the_project_writes() -> None:
    from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import kms_policy_document

    policy = attested_policy(OLD, NEW)
    assert kms_policy_document.parse_key_policy(kp.dump_policy(policy)) == policy
