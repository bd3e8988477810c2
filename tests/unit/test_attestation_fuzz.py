"""Property tests over the attestation verifier (enclave_tokenizer/attestation.py) and `nitro-attest verify`.

Any input is either the untouched real (or emulator-signed) document, which verifies, or is refused with
an AttestationError carrying a named check and a short message; never another exception, never a
traceback or multi-line output from the CLI, never unbounded time or memory. Inputs: random CBOR shapes
(as the envelope and as the payload of a structurally valid COSE_Sign1), raw CBOR heads with hostile
lengths, truncations / bit flips / splices of the real AWS vector and of an emulator document, and their
base64 / URL-safe / hex text forms. Counts per surface are printed in the terminal summary (fuzz_counts).
"""

from __future__ import annotations

import base64
import contextlib
import datetime as dt
import io
import json
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any
from unittest import mock

import cbor2
import fuzz_counts
import pytest
from enclave_tokenizer import attestation_cli
from enclave_tokenizer.attestation import (
    PROTECTED_ES384,
    AttestationError,
    AttestationResult,
    decode_document_text,
    verify_attestation_document,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nitro_emulator.nsm import build_attestation_document, emulator_root_pem

VECTORS = Path(__file__).resolve().parent / "attestation_vectors"
EXPECTED = json.loads((VECTORS / "nitro_debug_nullfields_uid2.expected.json").read_text())
REAL_B64 = "".join((VECTORS / "nitro_debug_nullfields_uid2.b64").read_text().split())
REAL_DOC = base64.b64decode(REAL_B64)
REAL_AT = dt.datetime(2021, 4, 26, 4, 9, 13, 100000, tzinfo=dt.UTC)
REAL_AT_TEXT = "2021-04-26T04:09:13.100Z"
REAL_PAYLOAD = dict(cbor2.loads(cbor2.loads(REAL_DOC)[2]))
REAL_SIGNATURE = cbor2.loads(REAL_DOC)[3]
SAME_AS_REAL = (REAL_DOC, b"\xd2" + REAL_DOC)  # untagged, or with the COSE_Sign1 tag 18 (d2)
EMU_PCRS = {0: b"\x10" * 48, 1: b"\x11" * 48, 2: b"\x12" * 48}
EMU_NONCE = b"n" * 16

CHECKS = {"input", "format", "alg", "field", "root", "not_yet_valid", "expired", "chain", "signature", "debug",
          "pcr", "nonce"}  # fmt: skip
MAX_MESSAGE = 1200  # a clear message is short; an echo of hostile input would not be
MAX_SECONDS = 5.0  # per input; real documents verify in milliseconds
RSS_MARGIN_KIB = 64 * 1024

# Fuzzed certificates with a non-positive serial make cryptography warn before the verifier refuses them.
pytestmark = pytest.mark.filterwarnings("ignore::cryptography.utils.CryptographyDeprecationWarning")


def fuzz(examples: int) -> settings:
    """Fixed seed (derandomize, no example database), no per-example deadline (timed by hand instead)."""
    return settings(
        max_examples=examples,
        deadline=None,
        derandomize=True,
        database=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large, HealthCheck.filter_too_much],
    )


def _rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc/self/status")


_STATE: dict[str, Any] = {}


@pytest.fixture(scope="module", autouse=True)
def rss_baseline() -> None:
    """RSS before this module's first fuzz example, for the bound checked by the last test."""
    _STATE.setdefault("rss_before", _rss_kib())


@pytest.fixture(scope="module")
def emulator(tmp_path_factory: pytest.TempPathFactory) -> tuple[bytes, bytes]:
    """(document, root PEM) of one emulator-signed document (valid now, with a nonce and a public key)."""
    home = tmp_path_factory.mktemp("emulator-home")
    doc = build_attestation_document(EMU_PCRS, "i-0123456789abcdef0-enc0123456789abcdef", nonce=EMU_NONCE,
                                     public_key=b"k" * 64, home=home)  # fmt: skip
    return doc, emulator_root_pem(home)


@pytest.fixture(scope="module")
def scratch(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("cli-inputs")


def verify_real(document: bytes) -> AttestationResult:
    return verify_attestation_document(document, at=REAL_AT, allow_debug=True)


def refused_or_verified(surface: str, call: Callable[[], Any], *, may_verify: bool = False) -> Any:
    """Run one verification: a clean AttestationError (returned) or, only if allowed, a result.

    Any other exception propagates and fails the property (hypothesis shrinks it and shows the input)."""
    fuzz_counts.tried(surface)
    start = time.monotonic()
    try:
        result = call()
    except AttestationError as exc:
        result = exc
        assert exc.check in CHECKS, exc.check
        assert isinstance(exc.message, str) and exc.message.strip(), repr(exc.message)
        assert len(exc.message) < MAX_MESSAGE, exc.message[:200]
        assert "\n" not in exc.message, exc.message[:200]
    else:
        assert may_verify, f"verified an input that must be refused: {result!r}"[:400]
        assert isinstance(result, AttestationResult)
    elapsed = time.monotonic() - start
    assert elapsed < MAX_SECONDS, f"{surface}: one input took {elapsed:.1f}s"
    fuzz_counts.clean(surface)
    return result


# --------------------------------------------------------------------------- strategies

# Tags cbor2 gives a meaning to (datetimes, bignums, decimals, shared references, regex, MIME, UUID, sets,
# IP addresses, ...), COSE_Sign1 (18) and a few it does not know.
TAGS = st.one_of(
    st.sampled_from([0, 1, 2, 3, 4, 5, 18, 24, 25, 28, 29, 30, 32, 35, 36, 37, 52, 54, 55799, 256, 258, 260, 261]),
    st.integers(0, 2**64 - 1),
)
HASHABLE_LEAF = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(-(2**70), 2**70),
    st.floats(allow_nan=True, allow_infinity=True),
    st.binary(max_size=64),
    st.text(max_size=16),
    st.sampled_from(["module_id", "digest", "timestamp", "pcrs", "certificate", "cabundle", "nonce", "SHA384"]),
)
LEAF = st.one_of(HASHABLE_LEAF, st.binary(min_size=48, max_size=48), st.just(REAL_SIGNATURE))
CBOR_VALUE = st.recursive(
    LEAF,
    lambda inner: st.one_of(
        st.lists(inner, max_size=5),
        st.dictionaries(HASHABLE_LEAF, inner, max_size=5),
        st.builds(cbor2.CBORTag, TAGS, inner),
    ),
    max_leaves=16,
)


@st.composite
def cbor_heads(draw: st.DrawFn) -> bytes:
    """Raw CBOR item heads, including the lengths an encoder never writes: 8-byte, huge, indefinite, break."""
    out = bytearray()
    for _ in range(draw(st.integers(1, 12))):
        major = draw(st.integers(0, 7))
        info = draw(st.one_of(st.integers(0, 31), st.sampled_from([24, 25, 26, 27, 31])))
        out.append(major << 5 | info)
        if 24 <= info <= 27:
            size = 1 << (info - 24)
            out += draw(st.one_of(st.binary(min_size=size, max_size=size), st.just(b"\xff" * size)))
        out += draw(st.binary(max_size=6))
    return bytes(out)


def cose(payload: bytes, *, tag: bool = False, signature: bytes = REAL_SIGNATURE) -> bytes:
    """A structurally valid COSE_Sign1 (ES384 protected header, 96-byte signature) around any payload."""
    items = [PROTECTED_ES384, {}, payload, signature]
    return cbor2.dumps(cbor2.CBORTag(18, items) if tag else items)


# In-place changes (flip, set) keep the CBOR framing, so most reach the certificate and signature checks.
KINDS = ("flip", "flip", "flip", "flip", "set", "set", "truncate", "insert", "delete", "duplicate")


@st.composite
def mutated(draw: st.DrawFn, original: bytes) -> bytes:
    """Truncation, bit flips, byte overwrites, insertions, deletions or a duplicated span of ``original``."""
    data = bytearray(original)
    rng = draw(st.randoms(use_true_random=False))  # uniform positions; hypothesis' integers favour the ends
    for _ in range(draw(st.integers(1, 3))):
        if not data:
            break
        pos = draw(st.one_of(st.integers(0, len(data) - 1), st.just(rng.randrange(len(data)))))
        kind = draw(st.sampled_from(KINDS))
        if kind == "truncate":
            del data[pos:]
        elif kind == "flip":
            data[pos] ^= 1 << draw(st.integers(0, 7))
        elif kind == "set":
            data[pos] = draw(st.sampled_from([0x00, 0xFF, 0x1B, 0x5B, 0x9B, 0x9F, 0xBF, 0xD8]))
        elif kind == "insert":
            data[pos:pos] = draw(st.binary(min_size=1, max_size=9))
        elif kind == "delete":
            del data[pos : pos + draw(st.integers(1, 64))]
        else:
            end = pos + draw(st.integers(1, 64))
            data[pos:pos] = data[pos:end]
    return bytes(data)


def text_form(document: bytes, form: str) -> bytes:
    if form == "raw":
        return document
    if form == "base64":
        return base64.b64encode(document)
    if form == "base64-wrapped":
        text = base64.b64encode(document).decode()
        return "\n".join(text[i : i + 76] for i in range(0, len(text), 76)).encode() + b"\n"
    if form == "urlsafe":
        return base64.urlsafe_b64encode(document).rstrip(b"=")
    return document.hex().encode()  # hex is not an accepted form: it must be refused, not misread


FORMS = st.sampled_from(["raw", "base64", "base64-wrapped", "urlsafe", "hex"])


def decode_and_verify(data: bytes | str, verify: Callable[[bytes], AttestationResult]) -> Callable[[], Any]:
    return lambda: verify(decode_document_text(data))


# --------------------------------------------------------------------------- the library


@fuzz(300)
@given(value=CBOR_VALUE, tag=st.booleans())
def test_random_cbor_as_the_envelope(value: Any, tag: bool) -> None:
    data = cbor2.dumps(cbor2.CBORTag(18, value) if tag else value)
    refused_or_verified("attestation envelope (random CBOR)", lambda: verify_real(data))


@fuzz(150)
@given(items=st.lists(CBOR_VALUE, min_size=4, max_size=4), keep=st.sets(st.integers(0, 3)), tag=st.booleans())
def test_four_item_envelopes_mixing_valid_and_random_items(items: list[Any], keep: set[int], tag: bool) -> None:
    valid = [PROTECTED_ES384, {}, cbor2.dumps(REAL_PAYLOAD), REAL_SIGNATURE]
    mixed = [valid[i] if i in keep else item for i, item in enumerate(items)]
    data = cbor2.dumps(cbor2.CBORTag(18, mixed) if tag else mixed)
    # Keeping all four real items rebuilds the real document (tagged or not): the only one that verifies.
    result = refused_or_verified("attestation envelope (4 items)", lambda: verify_real(data),
                                 may_verify=mixed == valid)  # fmt: skip
    assert isinstance(result, AttestationError) or mixed == valid


@fuzz(250)
@given(prefix=st.sampled_from([b"", b"\x84", b"\xd2\x84", b"\x84\x44\xa1\x01\x38\x22\xa0"]), heads=cbor_heads())
def test_raw_cbor_heads_as_the_document(prefix: bytes, heads: bytes) -> None:
    data = prefix + heads
    refused_or_verified("attestation raw CBOR heads", lambda: verify_real(data))
    refused_or_verified("attestation raw CBOR heads", lambda: verify_real(cose(heads)))


@fuzz(300)
@given(value=CBOR_VALUE, tag=st.booleans())
def test_random_cbor_as_the_payload_of_a_valid_envelope(value: Any, tag: bool) -> None:
    data = cose(cbor2.dumps(value), tag=tag)
    refused_or_verified("attestation payload (random CBOR)", lambda: verify_real(data))


@fuzz(300)
@given(
    overrides=st.dictionaries(
        st.sampled_from([*REAL_PAYLOAD, "zz", ""]), st.one_of(CBOR_VALUE, st.lists(LEAF, max_size=20)), max_size=4
    ),
    drop=st.sets(st.sampled_from(list(REAL_PAYLOAD)), max_size=2),
)
def test_real_payload_with_random_fields(overrides: dict[str, Any], drop: set[str]) -> None:
    payload = {k: v for k, v in REAL_PAYLOAD.items() if k not in drop}
    payload.update(overrides)
    data = cose(cbor2.dumps(payload))
    # Only the byte-identical real document carries a valid signature.
    result = refused_or_verified("attestation payload (real fields replaced)", lambda: verify_real(data),
                                 may_verify=data == REAL_DOC)  # fmt: skip
    if data != REAL_DOC:
        assert isinstance(result, AttestationError)


@fuzz(400)
@given(data=st.data(), form=FORMS)
def test_mutated_real_vector(data: st.DataObject, form: str) -> None:
    document = data.draw(st.one_of(mutated(REAL_DOC), st.just(REAL_DOC)), label="document")
    text = text_form(document, form)
    if data.draw(st.booleans(), label="mutate text form"):
        text = data.draw(mutated(text), label="text")
    result = refused_or_verified("attestation real vector (mutated)", decode_and_verify(text, verify_real),
                                 may_verify=True)  # fmt: skip
    if isinstance(result, AttestationResult):
        assert decode_document_text(text) in SAME_AS_REAL, "a document other than the real one verified"
        assert {str(i): v.hex() for i, v in result.pcrs.items()} == EXPECTED["pcrs"]
    else:
        assert document != REAL_DOC or form == "hex" or text != text_form(document, form)


@fuzz(250)
@given(data=st.data(), form=FORMS)
def test_mutated_emulator_document(emulator: tuple[bytes, bytes], data: st.DataObject, form: str) -> None:
    original, root = emulator

    def verify(document: bytes) -> AttestationResult:
        return verify_attestation_document(document, root_pem=root, nonce=EMU_NONCE, expected_pcrs=EMU_PCRS)

    document = data.draw(st.one_of(mutated(original), st.just(original)), label="document")
    text = text_form(document, form)
    result = refused_or_verified("attestation emulator document (mutated)", decode_and_verify(text, verify),
                                 may_verify=True)  # fmt: skip
    if isinstance(result, AttestationResult):
        assert decode_document_text(text) in (original, b"\xd2" + original), "another document verified"
        assert result.nonce == EMU_NONCE and result.pcrs[0] == EMU_PCRS[0]
    else:
        assert document != original or form == "hex"


@fuzz(200)
@given(text=st.one_of(st.text(max_size=200), st.text("ABCDEFabcdef0123456789+/-_= \n\t", max_size=400)))
def test_random_text_documents(text: str) -> None:
    refused_or_verified("attestation text input", decode_and_verify(text, verify_real))


# --------------------------------------------------------------------------- the CLI, in-process


def run_cli(argv: list[str], stdin: bytes | None = None) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    fake_stdin = mock.Mock(buffer=io.BytesIO(stdin or b""))
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err), mock.patch.object(sys, "stdin", fake_stdin):
        code = attestation_cli.main(argv)
    return code, out.getvalue(), err.getvalue()


@contextlib.contextmanager
def document_file(directory: Path, data: bytes) -> Iterator[str]:
    path = directory / "doc"
    path.write_bytes(data)
    try:
        yield str(path)
    finally:
        path.unlink()


OPTIONS = {
    "at the vector's time": ["--at", REAL_AT_TEXT],
    "expected PCR4": ["--at", REAL_AT_TEXT, "--pcr", f"4={EXPECTED['pcrs']['4']}"],
    "expected nonce": ["--at", REAL_AT_TEXT, "--nonce", "00ff"],
    "default time (now)": [],
}
PASSING_OPTIONS = ("at the vector's time", "expected PCR4")


@fuzz(250)
@given(data=st.data(), form=FORMS, via_stdin=st.booleans(), option=st.sampled_from(sorted(OPTIONS)))
def test_cli_on_mutated_and_random_documents(
    scratch: Path, data: st.DataObject, form: str, via_stdin: bool, option: str
) -> None:
    document = data.draw(
        st.one_of(
            st.just(REAL_DOC),
            mutated(REAL_DOC),
            CBOR_VALUE.map(cbor2.dumps),
            CBOR_VALUE.map(lambda v: cose(cbor2.dumps(v))),
            cbor_heads(),
        ),
        label="document",
    )
    raw = text_form(document, form)
    should_verify = document == REAL_DOC and form != "hex" and option in PASSING_OPTIONS
    surface = "nitro-attest verify (in-process)"
    fuzz_counts.tried(surface)
    start = time.monotonic()
    with contextlib.ExitStack() as stack:
        source = "-" if via_stdin else stack.enter_context(document_file(scratch, raw))
        code, out, err = run_cli(["verify", source, "--allow-debug", *OPTIONS[option]], raw if via_stdin else None)
    assert time.monotonic() - start < MAX_SECONDS
    assert "Traceback" not in err and "Traceback" not in out, err
    if should_verify:
        assert code == 0, err
        assert json.loads(out)["pcrs"] == EXPECTED["pcrs"] and err == ""
    else:
        assert code in (1, 2), (code, err)
        lines = err.splitlines()
        assert len(lines) == 1 and lines[0].startswith("nitro-attest: "), err[:400]
        assert len(lines[0]) < MAX_MESSAGE, lines[0][:200]
        if code == 1:
            verdict = json.loads(out)
            assert verdict["valid"] is False and verdict["check"] in CHECKS - {"input"}
            assert f"invalid document: {verdict['check']}: " in lines[0]
        else:
            assert out == ""
    fuzz_counts.clean(surface)


# --------------------------------------------------------------------------- after the fuzzing (keep last)


def test_after_fuzzing_real_vector_verifies_and_memory_is_bounded() -> None:
    fuzz_counts.tried("attestation after fuzzing")
    result = verify_attestation_document(
        REAL_DOC, at=REAL_AT, allow_debug=True, expected_pcrs={int(i): v for i, v in EXPECTED["pcrs"].items()}
    )
    assert {str(i): v.hex() for i, v in result.pcrs.items()} == EXPECTED["pcrs"]
    assert result.module_id == EXPECTED["module_id"] and result.timestamp_ms == EXPECTED["timestamp_ms"]
    code, out, err = run_cli(["verify", "-", "--at", REAL_AT_TEXT, "--allow-debug"], REAL_B64.encode())
    assert code == 0 and json.loads(out)["pcrs"] == EXPECTED["pcrs"], err
    grown = _rss_kib() - _STATE["rss_before"]
    assert grown < RSS_MARGIN_KIB, f"RSS grew by {grown} KiB over the fuzz run"
    fuzz_counts.clean("attestation after fuzzing")
