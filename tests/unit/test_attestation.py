"""Attestation verifier: the real AWS vector, every mutation with its reason, emulator documents, fuzzing."""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import json
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import cbor2
import pytest
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from enclave_tokenizer.attestation import (
    AWS_NITRO_ROOT_G1_SHA256,
    AttestationError,
    AttestationResult,
    aws_root_pem,
    decode_document_text,
    pcrs_from_measurements,
    verify_attestation_document,
)
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from nitro_emulator.nsm import NsmSigner, build_attestation_document, emulator_root_pem

VECTORS = Path(__file__).resolve().parent / "attestation_vectors"
EXPECTED = json.loads((VECTORS / "nitro_debug_nullfields_uid2.expected.json").read_text())
REAL_DOC = base64.b64decode("".join((VECTORS / "nitro_debug_nullfields_uid2.b64").read_text().split()))
REAL_AT = dt.datetime(2021, 4, 26, 4, 9, 13, 100000, tzinfo=dt.UTC)
PCR4 = bytes.fromhex(EXPECTED["pcrs"]["4"])
MODULE_ID = "i-0123456789abcdef0-enc0123456789abcdef"
# Fuzzed certificates with a non-positive serial make cryptography warn before the verifier refuses them.
pytestmark = pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")
PCRS = {0: b"\x10" * 48, 1: b"\x11" * 48, 2: b"\x12" * 48, 4: hashlib.sha384(bytes(48) + b"i-0123").digest()}


def verify_real(doc: bytes = REAL_DOC, **kw: Any) -> AttestationResult:
    kw.setdefault("at", REAL_AT)
    kw.setdefault("allow_debug", True)
    return verify_attestation_document(doc, **kw)


def failed_check(fn: Callable[[], Any]) -> str:
    with pytest.raises(AttestationError) as info:
        fn()
    return info.value.check


def envelope(doc: bytes) -> list[Any]:
    return list(cbor2.loads(doc))


def payload_of(doc: bytes) -> dict[str, Any]:
    return dict(cbor2.loads(envelope(doc)[2]))


def with_payload(doc: bytes, payload: dict[str, Any]) -> bytes:
    """Same envelope and signature, payload re-encoded (so the signature no longer matches)."""
    items = envelope(doc)
    items[2] = cbor2.dumps(payload)
    return cbor2.dumps(items)


@pytest.fixture(scope="module")
def emu_home(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("emulator-home")


@pytest.fixture(scope="module")
def emu_root(emu_home: Path) -> bytes:
    return emulator_root_pem(emu_home)


@pytest.fixture(scope="module")
def signer(emu_home: Path) -> NsmSigner:
    return NsmSigner(emu_home)


def emu_fields(**override: Any) -> dict[str, Any]:
    fields: dict[str, Any] = {
        "module_id": MODULE_ID,
        "digest": "SHA384",
        "timestamp": int(dt.datetime.now(dt.UTC).timestamp() * 1000),
        "pcrs": {i: PCRS.get(i, bytes(48)) for i in range(16)},
        "certificate": None,
        "cabundle": None,
        "public_key": None,
        "user_data": None,
        "nonce": None,
    }
    fields.update(override)
    return fields


# --------------------------------------------------------------------------- the real AWS document


def test_shipped_root_is_the_pinned_aws_root() -> None:
    cert = x509.load_pem_x509_certificate(aws_root_pem())
    assert hashlib.sha256(cert.public_bytes(Encoding.DER)).hexdigest() == AWS_NITRO_ROOT_G1_SHA256
    assert cert.subject.rfc4514_string() == "CN=aws.nitro-enclaves,OU=AWS,O=Amazon,C=US"
    # The vector's cabundle[0] is that very certificate.
    assert payload_of(REAL_DOC)["cabundle"][0] == cert.public_bytes(Encoding.DER)


def test_real_document_verifies_at_its_timestamp_with_aws_root() -> None:
    result = verify_real()
    assert result.module_id == EXPECTED["module_id"]
    assert result.timestamp_ms == EXPECTED["timestamp_ms"]
    assert result.timestamp == REAL_AT
    assert result.digest == "SHA384"
    assert {str(i): v.hex() for i, v in result.pcrs.items()} == EXPECTED["pcrs"]
    assert result.certificate_subject == (
        "CN=i-0fd25f30661854f2b-enc01790c5d9eab829d.us-west-1.aws,OU=AWS,O=Amazon,L=Seattle,ST=Washington,C=US"
    )
    assert result.public_key is None and result.user_data is None and result.nonce is None
    assert result.debug is True
    out = result.to_json_dict()
    assert out["valid"] is True and out["timestamp"] == "2021-04-26T04:09:13.100Z"
    assert out["pcrs"]["4"] == EXPECTED["pcrs"]["4"] and out["nonce"] is None


def test_real_document_expected_pcrs_match_upper_or_lower_hex_and_bytes() -> None:
    verify_real(expected_pcrs={4: EXPECTED["pcrs"]["4"].upper(), 0: bytes(48)})
    verify_real(expected_pcrs={4: PCR4})


def test_real_document_is_debug_and_rejected_without_the_flag() -> None:
    assert failed_check(lambda: verify_real(allow_debug=False)) == "debug"


@pytest.mark.parametrize(
    ("delta", "check"),
    [
        (dt.timedelta(hours=4), "expired"),
        (dt.timedelta(hours=3, seconds=1), "expired"),
        (dt.timedelta(hours=-1), "not_yet_valid"),
        (dt.timedelta(days=-800), "not_yet_valid"),  # before the root's own validity
    ],
)
def test_real_document_outside_leaf_validity(delta: dt.timedelta, check: str) -> None:
    assert failed_check(lambda: verify_real(at=REAL_AT + delta)) == check


def test_real_document_at_now_is_expired() -> None:
    assert failed_check(lambda: verify_attestation_document(REAL_DOC, allow_debug=True)) == "expired"


def test_naive_datetime_is_utc() -> None:
    verify_real(at=REAL_AT.replace(tzinfo=None))


def test_tagged_form_is_accepted_other_tags_are_not() -> None:
    verify_real(b"\xd2" + REAL_DOC)
    assert failed_check(lambda: verify_real(b"\xd1" + REAL_DOC)) == "format"
    assert failed_check(lambda: verify_real(cbor2.dumps(cbor2.CBORTag(98, envelope(REAL_DOC))))) == "format"


def test_flipped_signature_byte() -> None:
    items = envelope(REAL_DOC)
    for position in (0, 47, 48, 95):
        sig = bytearray(items[3])
        sig[position] ^= 0x01
        mutated = cbor2.dumps([items[0], items[1], items[2], bytes(sig)])
        assert failed_check(lambda m=mutated: verify_real(m)) == "signature"


def test_flipped_payload_byte_in_signed_fields() -> None:
    raw = bytearray(REAL_DOC)
    payload_start = REAL_DOC.index(envelope(REAL_DOC)[2])
    # PCR4 value, module_id text and the timestamp are signed but not part of any certificate.
    for needle in (PCR4[:8], b"i-0fd25f30661854f2b-enc", b"\x1b\x00\x00\x01\x79"):
        offset = REAL_DOC.index(needle, payload_start) + len(needle) - 1
        mutated = bytearray(raw)
        mutated[offset] ^= 0x01
        assert failed_check(lambda m=bytes(mutated): verify_real(m)) == "signature"


def test_flipped_byte_inside_bundle_certificate_breaks_chain() -> None:
    payload = payload_of(REAL_DOC)
    cert = bytearray(payload["cabundle"][2])
    cert[-10] ^= 0x01  # inside its signature value: still parses, no longer verifies
    payload["cabundle"] = [*payload["cabundle"][:2], bytes(cert), payload["cabundle"][3]]
    assert failed_check(lambda: verify_real(with_payload(REAL_DOC, payload))) == "chain"


@pytest.mark.parametrize("count", [0, 1, 2, 3])
def test_truncated_array(count: int) -> None:
    items = envelope(REAL_DOC)[:count]
    assert failed_check(lambda: verify_real(cbor2.dumps(items))) == "format"


def test_extra_array_items_and_trailing_bytes() -> None:
    items = envelope(REAL_DOC)
    assert failed_check(lambda: verify_real(cbor2.dumps([*items, b""]))) == "format"
    assert failed_check(lambda: verify_real(cbor2.dumps([*items, None]))) == "format"
    assert failed_check(lambda: verify_real(REAL_DOC + b"\x00")) == "format"
    assert failed_check(lambda: verify_real(REAL_DOC[:-1])) == "format"


@pytest.mark.parametrize(
    "protected",
    [
        cbor2.dumps({1: -7}),  # ES256
        cbor2.dumps({1: -36}),  # ES512
        cbor2.dumps({1: -35, 4: b"kid"}),
        cbor2.dumps({}),
        b"",
        b"\xa1\x01\x39\x00\x22",  # {1: -35} with a non-minimal integer: same value, different bytes
    ],
)
def test_wrong_alg(protected: bytes) -> None:
    items = envelope(REAL_DOC)
    mutated = cbor2.dumps([protected, items[1], items[2], items[3]])
    assert failed_check(lambda: verify_real(mutated)) == "alg"


def test_alg_in_unprotected_header_is_refused() -> None:
    items = envelope(REAL_DOC)
    assert failed_check(lambda: verify_real(cbor2.dumps([items[0], {1: -35}, items[2], items[3]]))) == "alg"


def test_envelope_item_types() -> None:
    items = envelope(REAL_DOC)
    for index, value in ((0, {1: -35}), (1, []), (2, "text"), (3, 5)):
        mutated = list(items)
        mutated[index] = value
        assert failed_check(lambda m=mutated: verify_real(cbor2.dumps(m))) == "format"
    short_sig = [*items[:3], items[3][:64]]
    assert failed_check(lambda: verify_real(cbor2.dumps(short_sig))) == "format"


def test_bundle_certificates_swapped() -> None:
    payload = payload_of(REAL_DOC)
    bundle = payload["cabundle"]
    payload["cabundle"] = [bundle[0], bundle[2], bundle[1], bundle[3]]
    assert failed_check(lambda: verify_real(with_payload(REAL_DOC, payload))) == "chain"


def test_leaf_swapped_for_a_bundle_ca() -> None:
    payload = payload_of(REAL_DOC)
    payload["certificate"] = payload["cabundle"][3]
    assert failed_check(lambda: verify_real(with_payload(REAL_DOC, payload))) == "chain"


@pytest.mark.parametrize("missing", [1, 2, 3])
def test_certificate_missing_from_bundle(missing: int) -> None:
    payload = payload_of(REAL_DOC)
    payload["cabundle"] = [c for i, c in enumerate(payload["cabundle"]) if i != missing]
    assert failed_check(lambda: verify_real(with_payload(REAL_DOC, payload))) == "chain"


def test_root_missing_from_bundle_or_replaced(emu_root: bytes) -> None:
    payload = payload_of(REAL_DOC)
    payload["cabundle"] = payload["cabundle"][1:]  # starts at the regional intermediate
    assert failed_check(lambda: verify_real(with_payload(REAL_DOC, payload))) == "root"
    payload = payload_of(REAL_DOC)
    other = x509.load_pem_x509_certificate(emu_root).public_bytes(Encoding.DER)
    payload["cabundle"] = [other, *payload["cabundle"][1:]]
    assert failed_check(lambda: verify_real(with_payload(REAL_DOC, payload))) == "root"


def test_wrong_root(emu_root: bytes) -> None:
    assert failed_check(lambda: verify_real(root_pem=emu_root)) == "root"


def test_bad_root_argument_is_an_input_error() -> None:
    assert failed_check(lambda: verify_real(root_pem=b"not a pem")) == "input"
    assert failed_check(lambda: verify_real(root_pem="caf\u00e9")) == "input"
    assert failed_check(lambda: verify_real(root_pem=[42])) == "input"  # type: ignore[list-item]
    assert failed_check(lambda: verify_real(expected_pcrs={0: "zz"})) == "input"
    assert failed_check(lambda: verify_real(expected_pcrs={40: bytes(48)})) == "input"
    assert failed_check(lambda: verify_real(expected_pcrs={0: bytes(32)})) == "input"


def test_pcr_mismatch() -> None:
    assert failed_check(lambda: verify_real(expected_pcrs={4: bytes(48)})) == "pcr"
    assert failed_check(lambda: verify_real(expected_pcrs={0: b"\x01" * 48})) == "pcr"
    assert failed_check(lambda: verify_real(expected_pcrs={16: bytes(48)})) == "pcr"  # not in the doc


def test_nonce_expected_but_document_has_none() -> None:
    assert failed_check(lambda: verify_real(nonce=b"\x00" * 20)) == "nonce"


@pytest.mark.parametrize(
    ("mutate", "check"),
    [
        (lambda p: p.pop("module_id"), "field"),
        (lambda p: p.pop("cabundle"), "field"),
        (lambda p: p.pop("pcrs"), "field"),
        (lambda p: p.update(module_id=""), "field"),
        (lambda p: p.update(module_id=b"bytes"), "field"),
        (lambda p: p.update(module_id="x" * 300), "field"),
        (lambda p: p.update(digest="SHA256"), "field"),
        (lambda p: p.update(timestamp=0), "field"),
        (lambda p: p.update(timestamp=-5), "field"),
        (lambda p: p.update(timestamp=2**64), "field"),
        (lambda p: p.update(timestamp=1.5), "field"),
        (lambda p: p.update(timestamp=True), "field"),
        (lambda p: p.update(pcrs={}), "field"),
        (lambda p: p.update(pcrs={i: bytes(48) for i in range(33)}), "field"),
        (lambda p: p["pcrs"].update({32: bytes(48)}), "field"),
        (lambda p: p["pcrs"].update({-1: bytes(48)}), "field"),
        (lambda p: p["pcrs"].update({"5": bytes(48)}), "field"),
        (lambda p: p["pcrs"].update({5: bytes(32)}), "field"),
        (lambda p: p["pcrs"].update({5: bytes(64)}), "field"),
        (lambda p: p["pcrs"].pop(0), "field"),
        (lambda p: p.update(certificate=b""), "field"),
        (lambda p: p.update(certificate=b"\x30" * 1025), "field"),
        (lambda p: p.update(certificate=b"\x30\x03\x02\x01\x00"), "field"),
        (lambda p: p.update(cabundle=[]), "field"),
        (lambda p: p.update(cabundle=p["cabundle"][0]), "field"),
        (lambda p: p.update(cabundle=[*p["cabundle"], "text"]), "field"),
        (lambda p: p.update(cabundle=[p["cabundle"][0]] * 17), "field"),
        (lambda p: p.update(public_key=b"k" * 1025), "field"),
        (lambda p: p.update(user_data=b"u" * 1025), "field"),
        (lambda p: p.update(nonce=b"n" * 1025), "field"),
        (lambda p: p.update(nonce="text"), "field"),
        (lambda p: p.update(extra=b""), "field"),
        (lambda p: p.update({1: b""}), "field"),
    ],
)
def test_malformed_fields_in_real_document(mutate: Callable[[dict[str, Any]], Any], check: str) -> None:
    payload = payload_of(REAL_DOC)
    payload["pcrs"] = dict(payload["pcrs"])
    mutate(payload)
    assert failed_check(lambda: verify_real(with_payload(REAL_DOC, payload))) == check


def test_payload_not_a_map_or_not_cbor() -> None:
    items = envelope(REAL_DOC)
    for payload in (cbor2.dumps([1, 2]), b"\xff\xff", cbor2.dumps({"a": 1}) + b"\x00", b"", b"x" * 16385):
        mutated = cbor2.dumps([items[0], items[1], payload, items[3]])
        assert failed_check(lambda m=mutated: verify_real(m)) in {"format", "field"}


def test_non_document_inputs() -> None:
    for junk in (b"", b"\x00", b"\x84", b"\xa0", b"hello", cbor2.dumps("text"), b"\x9f" * 5000, b"\x84" * 10**6):
        assert failed_check(lambda j=junk: verify_real(j)) == "format"
    assert failed_check(lambda: verify_real("a string")) == "format"  # type: ignore[arg-type]


def test_base64_detection() -> None:
    text = base64.b64encode(REAL_DOC)
    assert decode_document_text(REAL_DOC) == REAL_DOC
    assert decode_document_text(text) == REAL_DOC
    assert decode_document_text(text.decode()) == REAL_DOC
    assert decode_document_text(b"  " + text[:60] + b"\n" + text[60:] + b"\n") == REAL_DOC
    assert decode_document_text(base64.urlsafe_b64encode(REAL_DOC).rstrip(b"=")) == REAL_DOC
    with pytest.raises(AttestationError) as info:
        decode_document_text(b"not base64 !!")
    assert info.value.check == "format"


# --------------------------------------------------------------------------- emulator documents


def test_emulator_document_verifies_with_emulator_root_only(emu_home: Path, emu_root: bytes) -> None:
    doc = build_attestation_document(PCRS, MODULE_ID, nonce=b"n" * 32, user_data=b"u", home=emu_home)
    result = verify_attestation_document(
        doc, root_pem=emu_root, nonce=b"n" * 32, expected_pcrs={i: v.hex() for i, v in PCRS.items()}
    )
    assert result.module_id == MODULE_ID and result.user_data == b"u" and not result.debug
    assert result.public_key is None
    assert failed_check(lambda: verify_attestation_document(doc)) == "root"  # default: AWS root
    assert failed_check(lambda: verify_attestation_document(doc, root_pem=aws_root_pem())) == "root"
    # Several anchors: the document's own root among them is enough.
    verify_attestation_document(doc, root_pem=[aws_root_pem(), emu_root])


def test_emulator_document_from_another_host_fails(tmp_path: Path, emu_root: bytes) -> None:
    doc = build_attestation_document(PCRS, MODULE_ID, home=tmp_path / "other-host")
    assert failed_check(lambda: verify_attestation_document(doc, root_pem=emu_root)) == "root"


def test_emulator_document_time_window(emu_home: Path, emu_root: bytes) -> None:
    doc = build_attestation_document(PCRS, MODULE_ID, home=emu_home)
    now = dt.datetime.now(dt.UTC)
    verify_attestation_document(doc, root_pem=emu_root, at=now + dt.timedelta(hours=2, minutes=50))
    assert failed_check(
        lambda: verify_attestation_document(doc, root_pem=emu_root, at=now + dt.timedelta(hours=4))
    ) == ("expired")
    assert failed_check(
        lambda: verify_attestation_document(doc, root_pem=emu_root, at=now - dt.timedelta(hours=1))
    ) == ("not_yet_valid")


def test_emulator_debug_document(emu_home: Path, emu_root: bytes) -> None:
    doc = build_attestation_document(PCRS, MODULE_ID, debug=True, home=emu_home)
    assert failed_check(lambda: verify_attestation_document(doc, root_pem=emu_root)) == "debug"
    result = verify_attestation_document(doc, root_pem=emu_root, allow_debug=True)
    assert result.pcrs[0] == result.pcrs[1] == result.pcrs[2] == bytes(48)
    assert result.pcrs[4] == PCRS[4]  # debug mode leaves PCR4 as measured, like Nitro
    # Expecting the release PCR0 against a debug document fails on the PCR itself.
    check = failed_check(
        lambda: verify_attestation_document(doc, root_pem=emu_root, allow_debug=True, expected_pcrs={0: PCRS[0]})
    )
    assert check == "pcr"


def test_emulator_nonce_mismatch(emu_home: Path, emu_root: bytes) -> None:
    doc = build_attestation_document(PCRS, MODULE_ID, nonce=b"fresh-nonce", home=emu_home)
    assert failed_check(lambda: verify_attestation_document(doc, root_pem=emu_root, nonce=b"other-nonce")) == "nonce"
    assert failed_check(lambda: verify_attestation_document(doc, root_pem=emu_root, nonce=b"fresh-nonc")) == "nonce"


@pytest.mark.parametrize("name", ["public_key", "user_data", "nonce"])
def test_validly_signed_oversize_optional_fields_are_refused(name: str, signer: NsmSigner, emu_root: bytes) -> None:
    ok = signer.sign_payload(emu_fields(**{name: b"x" * 1024}))
    assert getattr(verify_attestation_document(ok, root_pem=emu_root), name) == b"x" * 1024
    bad = signer.sign_payload(emu_fields(**{name: b"x" * 1025}))
    assert failed_check(lambda: verify_attestation_document(bad, root_pem=emu_root)) == "field"


@pytest.mark.parametrize(
    "override",
    [
        {"digest": "SHA512"},
        {"pcrs": {0: bytes(48), 1: bytes(48)}},  # PCR2 missing
        {"pcrs": {**{i: b"\x01" * 48 for i in range(16)}, 3: b"\x01" * 32}},
        {"timestamp": 0},
        {"cabundle": []},
        {"surprise": 1},
    ],
)
def test_validly_signed_malformed_payloads_are_refused(
    override: dict[str, Any], signer: NsmSigner, emu_root: bytes
) -> None:
    doc = signer.sign_payload(emu_fields(**override))
    assert failed_check(lambda: verify_attestation_document(doc, root_pem=emu_root)) == "field"


def test_validly_signed_incomplete_document_is_refused(signer: NsmSigner, emu_root: bytes) -> None:
    # The CVE-2025-64186 class: a correctly signed document that lacks required fields.
    for name in ("module_id", "digest", "timestamp", "pcrs"):
        fields = emu_fields()
        fields.pop(name)
        doc = signer.sign_payload(fields)
        assert failed_check(lambda d=doc: verify_attestation_document(d, root_pem=emu_root)) == "field"


def test_emulator_leaf_without_bundle_chain(signer: NsmSigner, emu_root: bytes) -> None:
    good = payload_of(signer.sign_payload(emu_fields()))
    bad = signer.sign_payload(emu_fields(certificate=good["certificate"]))  # leaf of another document
    assert failed_check(lambda: verify_attestation_document(bad, root_pem=emu_root)) == "signature"
    only_root = signer.sign_payload(emu_fields(cabundle=good["cabundle"][:1]))
    assert failed_check(lambda: verify_attestation_document(only_root, root_pem=emu_root)) == "chain"


# --------------------------------------------------------------------------- fuzzing


def _mutations(doc: bytes, rng: random.Random, count: int) -> list[bytes]:
    out = []
    for _ in range(count):
        data = bytearray(doc)
        kind = rng.randrange(6)
        pos = rng.randrange(len(data))
        if kind == 0:
            data[pos] ^= 1 << rng.randrange(8)
        elif kind == 1:
            data[pos] = (data[pos] + rng.randrange(1, 256)) % 256
        elif kind == 2:
            del data[pos:]
        elif kind == 3:
            data[pos:pos] = rng.randbytes(rng.randrange(1, 9))
        elif kind == 4:
            del data[pos : pos + rng.randrange(1, 64)]
        else:
            for _ in range(rng.randrange(2, 6)):
                data[rng.randrange(len(data))] = rng.randrange(256)
        if bytes(data) != doc:
            out.append(bytes(data))
    return out


def test_fuzz_real_document_byte_mutations() -> None:
    rng = random.Random(20210426)
    checks: dict[str, int] = {}
    mutations = _mutations(REAL_DOC, rng, 2000)
    assert len(mutations) >= 1990
    for mutated in mutations:
        with pytest.raises(AttestationError) as info:
            verify_real(mutated)
        checks[info.value.check] = checks.get(info.value.check, 0) + 1
    # The run must reach the deep checks, not only the CBOR parser.
    assert {"format", "signature", "chain"} <= set(checks), checks


def test_fuzz_emulator_document_byte_mutations(emu_home: Path, emu_root: bytes) -> None:
    doc = build_attestation_document(PCRS, MODULE_ID, nonce=b"n" * 16, public_key=b"k" * 64, home=emu_home)
    for mutated in _mutations(doc, random.Random(7), 600):
        with pytest.raises(AttestationError):
            verify_attestation_document(mutated, root_pem=emu_root, nonce=b"n" * 16)


_cbor_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**70), max_value=2**70),
    st.floats(allow_nan=True),
    st.binary(max_size=80),
    st.text(max_size=20),
)
_cbor_value = st.recursive(
    _cbor_leaf,
    lambda children: st.one_of(
        st.lists(children, max_size=5),
        st.dictionaries(st.one_of(st.text(max_size=10), st.integers(-3, 40)), children, max_size=5),
    ),
    max_leaves=20,
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    st.dictionaries(
        st.sampled_from(["module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle", "nonce", "zz"]),
        _cbor_value,
        max_size=8,
    )
)
def test_fuzz_structured_payloads_with_valid_envelope(overrides: dict[str, Any]) -> None:
    payload = payload_of(REAL_DOC)
    payload.update(overrides)
    mutated = with_payload(REAL_DOC, payload)
    assume(mutated != REAL_DOC)  # cbor2 re-encodes the untouched payload byte for byte
    with pytest.raises(AttestationError):
        verify_real(mutated)


@settings(max_examples=300, deadline=None)
@given(st.lists(_cbor_value, min_size=0, max_size=6), st.booleans())
def test_fuzz_structured_envelopes(items: list[Any], tag: bool) -> None:
    data = cbor2.dumps(cbor2.CBORTag(18, items) if tag else items)
    with pytest.raises(AttestationError):
        verify_real(data)


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=600))
def test_fuzz_random_bytes(data: bytes) -> None:
    with pytest.raises(AttestationError):
        verify_real(data)
    try:
        decoded = decode_document_text(data)
    except AttestationError:
        return
    with pytest.raises(AttestationError):
        verify_real(decoded)


# --------------------------------------------------------------------------- measurements artifact


def _artifact(pcrs: dict[int, bytes]) -> dict[str, Any]:
    measurements: dict[str, str] = {"HashAlgorithm": "Sha384 { ... }"}
    measurements.update({f"PCR{i}": v.hex().upper() for i, v in pcrs.items()})
    return {"Measurements": measurements, "ImageDigest": "sha256:00", "EifPath": "/x.eif"}


def test_pcrs_from_measurements_object_text_and_path(tmp_path: Path) -> None:
    artifact = _artifact({i: PCRS[i] for i in (0, 1, 2)})
    expected = {i: PCRS[i].hex() for i in (0, 1, 2)}
    assert pcrs_from_measurements(artifact) == expected
    assert pcrs_from_measurements(json.dumps(artifact)) == expected
    path = tmp_path / "app.eif.measurements.json"
    path.write_text(json.dumps(artifact))
    assert pcrs_from_measurements(path) == expected
    # The enclave's run configuration carries the same values under `measurements`.
    run_config = {"eif_path": "/x.eif", "memory_mib": 256, "measurements": artifact["Measurements"]}
    assert pcrs_from_measurements(run_config) == expected


@pytest.mark.parametrize(
    "bad",
    [
        {},
        {"Measurements": []},
        {"Measurements": {"PCR1": "00" * 48}},  # no PCR0
        {"Measurements": {"PCR0": "00" * 47}},
        {"Measurements": {"PCR0": "zz" * 48}},
        {"Measurements": {"PCR0": "00" * 48, "PCR40": "00" * 48}},
    ],
)
def test_pcrs_from_bad_measurements(bad: dict[str, Any]) -> None:
    with pytest.raises(AttestationError) as info:
        pcrs_from_measurements(bad)
    assert info.value.check == "input"


def test_emulator_document_against_its_measurements_artifact(emu_home: Path, emu_root: bytes) -> None:
    artifact = _artifact({i: PCRS[i] for i in (0, 1, 2)})
    hex_pcrs = {i: PCRS[i].hex() for i in (0, 1, 2)}  # the builder takes the artifact's hex too
    doc = build_attestation_document(hex_pcrs, MODULE_ID, home=emu_home)
    verify_attestation_document(doc, root_pem=emu_root, expected_pcrs=pcrs_from_measurements(artifact))
    other = _artifact({0: b"\x99" * 48, 1: PCRS[1], 2: PCRS[2]})
    check = failed_check(
        lambda: verify_attestation_document(doc, root_pem=emu_root, expected_pcrs=pcrs_from_measurements(other))
    )
    assert check == "pcr"


# --------------------------------------------------------------------------- independent oracle


def _openssl_verify(doc: bytes, root_pem: bytes, at: dt.datetime, tmp_path: Path) -> bool:
    """`openssl verify -attime` over the document's chain, as the vectors README suggests."""
    import subprocess

    payload = payload_of(doc)
    pem = [x509.load_der_x509_certificate(c).public_bytes(Encoding.PEM) for c in payload["cabundle"][1:]]
    (tmp_path / "intermediates.pem").write_bytes(b"".join(pem))
    (tmp_path / "leaf.pem").write_bytes(
        x509.load_der_x509_certificate(payload["certificate"]).public_bytes(Encoding.PEM)
    )
    (tmp_path / "root.pem").write_bytes(root_pem)
    argv = ["openssl", "verify", "-attime", str(int(at.timestamp())), "-CAfile", str(tmp_path / "root.pem")]
    argv += ["-untrusted", str(tmp_path / "intermediates.pem"), str(tmp_path / "leaf.pem")]
    proc = subprocess.run(
        argv,
        capture_output=True,
        text=True,
        check=False,
    )
    return proc.returncode == 0


def test_openssl_agrees_on_real_and_emulator_chains(tmp_path: Path, emu_home: Path, emu_root: bytes) -> None:
    assert _openssl_verify(REAL_DOC, aws_root_pem(), REAL_AT, tmp_path)
    assert not _openssl_verify(REAL_DOC, aws_root_pem(), REAL_AT + dt.timedelta(hours=4), tmp_path)
    assert not _openssl_verify(REAL_DOC, emu_root, REAL_AT, tmp_path)
    doc = build_attestation_document(PCRS, MODULE_ID, home=emu_home)
    now = dt.datetime.now(dt.UTC)
    assert _openssl_verify(doc, emu_root, now, tmp_path)  # the emulator chain is standard X.509
    assert not _openssl_verify(doc, emu_root, now + dt.timedelta(hours=4), tmp_path)
    assert not _openssl_verify(doc, aws_root_pem(), now, tmp_path)
