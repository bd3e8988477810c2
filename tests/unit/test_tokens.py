"""Token derivation: known-answer vectors, Luhn, normalization, FPE and reversible properties.

Known-answer vectors (derived once with this implementation and cross-checked below by an independent
re-derivation with stdlib hmac + cryptography's HKDF/AES-SIV, so they pin the documented construction):
data key = bytes 0x00..0x1f (32 bytes), HKDF-SHA256 salt b"enclave-tokenizer/v1", infos
b"opaque-token/hmac-sha256", b"fpe-token/hmac-sha256", b"reversible-token/aes-256-siv" (64-byte key),
b"key-check-value" (first 4 bytes hex = key check "bd853e8f").
"""

from __future__ import annotations

import base64
import hashlib
import hmac

import pytest
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESSIV
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from enclave_tokenizer import tokens
from enclave_tokenizer.tokens import TokenError, Tokenizer, luhn_check_digit, luhn_valid, normalize_pan
from hypothesis import given, settings
from hypothesis import strategies as st

KEY = bytes(range(32))
# pan, opaque, fpe, reversible
VECTORS = [
    (
        "4111111111111111",
        "c57c42af4e717c08959485561629195a",
        "4111118904261111",
        "rv1.9pS9w5xOtoCv77Tkp6NGTFJORYzb5_qP6ojWarWmccs",
    ),
    (
        "5500000000000004",
        "20ecb8b1cd46d1bda80d7d45658ea653",
        "5500002634040004",
        "rv1.k6UvyBYuc8Qt4m_jf7dOXXPFbWrcl08vuFii19n261w",
    ),
    (
        "340000000000009",
        "381356784de554282dfa150a49ffbee3",
        "340000854370009",
        "rv1.9tBh59yfyyenLg0heRKiAIDF7h-UpbaswskCF7ALHw",
    ),
    (
        "4111111111119",
        "575e4dced8cfed65005da2f43eae1af0",
        "4111115851119",
        "rv1.X1RYtW7B3SXynKGyaukRYizuz8tR037Jf-3z3zM",
    ),
    (
        "4444333322221111455",
        "9de9e5212e0985cc5b234ee9913994cb",
        "4444338588027531455",
        "rv1.jww5WFF8hNSIFRd87hQFOZwa5NTI7_V4GQiQux566W7vHTM",
    ),
]


@pytest.fixture(scope="module")
def tk() -> Tokenizer:
    return Tokenizer.from_data_key(KEY)


def _hkdf(info: bytes, length: int) -> bytes:
    return HKDF(hashes.SHA256(), length, b"enclave-tokenizer/v1", info).derive(KEY)


@pytest.mark.parametrize(("pan", "opaque", "fpe", "reversible"), VECTORS)
def test_known_answer_vectors(tk: Tokenizer, pan: str, opaque: str, fpe: str, reversible: str) -> None:
    assert tk.tokenize(pan) == (opaque, pan[-4:])
    assert tk.tokenize(pan, "fpe") == (fpe, pan[-4:])
    assert tk.tokenize(pan, "reversible") == (reversible, pan[-4:])
    assert tk.detokenize(reversible) == pan
    assert tk.key_check == "bd853e8f"


@pytest.mark.parametrize(("pan", "opaque", "fpe", "reversible"), VECTORS)
def test_vectors_rederived_independently(pan: str, opaque: str, fpe: str, reversible: str) -> None:
    mac = hmac.new(_hkdf(b"opaque-token/hmac-sha256", 32), pan.encode(), hashlib.sha256).digest()
    assert mac[:16].hex() == opaque
    fmac = hmac.new(_hkdf(b"fpe-token/hmac-sha256", 32), pan.encode(), hashlib.sha256).digest()
    m = len(pan) - 10
    middle = str(int.from_bytes(fmac[:16], "big") % 10**m).zfill(m)
    candidate = pan[:6] + middle + pan[-4:]
    if luhn_valid(candidate):
        candidate = pan[:6] + middle[:-1] + str((int(middle[-1]) + 1) % 10) + pan[-4:]
    assert candidate == fpe
    siv = AESSIV(_hkdf(b"reversible-token/aes-256-siv", 64)).encrypt(pan.encode(), [b"enclave-tokenizer/v1/pan"])
    assert "rv1." + base64.urlsafe_b64encode(siv).rstrip(b"=").decode() == reversible


def test_keyed_and_deterministic() -> None:
    a, b = Tokenizer.from_data_key(KEY), Tokenizer.from_data_key(bytes(32))
    pan = "4111111111111111"
    assert a.opaque(pan) == Tokenizer.from_data_key(KEY).opaque(pan)
    assert a.opaque(pan) != b.opaque(pan)
    assert a.fpe(pan) != b.fpe(pan)
    # Unkeyed SHA-256 (the seed's design) must not be what we produce.
    assert a.opaque(pan) != hashlib.sha256(pan.encode()).hexdigest()[:32]
    assert len(a.opaque(pan)) * 4 >= 128
    with pytest.raises(ValueError):
        Tokenizer.from_data_key(b"short")


def test_repr_hides_keys(tk: Tokenizer) -> None:
    assert repr(tk) == "Tokenizer(key_check=bd853e8f)"
    assert KEY.hex() not in repr(tk)


@pytest.mark.parametrize(
    ("digits", "valid"),
    [
        ("4111111111111111", True),
        ("4111111111111112", False),
        ("79927398713", True),  # the classic Luhn example
        ("79927398710", False),
        ("0", True),
        ("18", True),
        ("378282246310005", True),
    ],
)
def test_luhn(digits: str, valid: bool) -> None:
    assert luhn_valid(digits) is valid


@given(st.text(alphabet="0123456789", min_size=1, max_size=30))
def test_luhn_check_digit_makes_valid(partial: str) -> None:
    assert luhn_valid(partial + luhn_check_digit(partial))
    # Exactly one check digit works.
    assert sum(luhn_valid(partial + str(d)) for d in range(10)) == 1


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ("4111 1111 1111 1111", "4111111111111111"),
        ("4111-1111-1111-1111", "4111111111111111"),
        (" 4111-1111 1111-1111 ", "4111111111111111"),
        ("4111111111119", "4111111111119"),
    ],
)
def test_normalize(raw: str, expected: str) -> None:
    assert normalize_pan(raw) == expected


@pytest.mark.parametrize(
    "raw",
    [
        "",
        "4111111111111112",  # Luhn
        "41111111113",  # 11 digits
        "41111111111111111113",  # 20 digits
        "4111x11111111111",
        "4111.1111.1111.1111",
        "٤١١١١١١١١١١١١١١١",  # Arabic-Indic digits are digits to str.isdigit, not PANs
        "4111\t1111 1111 1111",
        None,
        4111111111111111,
        ["4111111111111111"],
    ],
)
def test_normalize_rejects_without_echo(raw: object) -> None:
    with pytest.raises(TokenError) as info:
        normalize_pan(raw)
    assert info.value.code == "invalid_pan"
    assert "4111" not in info.value.message and "1111" not in info.value.message


def _pans() -> st.SearchStrategy[str]:
    def finish(body: str) -> str:
        return body + luhn_check_digit(body)

    return st.text(alphabet="0123456789", min_size=11, max_size=18).map(finish)


@settings(max_examples=300)
@given(_pans(), st.lists(st.sampled_from([" ", "-", ""]), min_size=0, max_size=25))
def test_normalization_property(pan: str, seps: list[str]) -> None:
    decorated = "".join(c + (seps[i] if i < len(seps) else "") for i, c in enumerate(pan))
    assert normalize_pan(decorated) == pan
    assert normalize_pan(pan) == pan


@settings(max_examples=500)
@given(_pans())
def test_fpe_properties(pan: str) -> None:
    tk = Tokenizer.from_data_key(KEY)
    token = tk.fpe(pan)
    assert len(token) == len(pan) and token.isdigit()
    assert token[:6] == pan[:6] and token[-4:] == pan[-4:]
    assert not luhn_valid(token)  # deliberately invalid: never mistaken for (or equal to) a PAN
    assert token != pan
    assert tk.fpe(pan) == token


@settings(max_examples=300)
@given(_pans())
def test_reversible_roundtrip(pan: str) -> None:
    tk = Tokenizer.from_data_key(KEY)
    token = tk.reversible(pan)
    assert token.startswith("rv1.") and pan not in token
    assert tk.detokenize(token) == pan
    assert tk.reversible(pan) == token


def test_detokenize_rejects(tk: Tokenizer) -> None:
    good = tk.reversible("4111111111111111")
    flipped = good[:-2] + ("A" if good[-2] != "A" else "B") + good[-1]
    other_key = Tokenizer.from_data_key(bytes(32)).reversible("4111111111111111")
    for bad in [
        flipped,
        other_key,
        "rv1.",
        "rv1.!!!",
        "c57c42af4e717c08959485561629195a",
        42,
        None,
        "rv1." + "A" * 200,
    ]:
        with pytest.raises(TokenError) as info:
            tk.detokenize(bad)
        assert info.value.code == "invalid_token"


def test_unknown_mode(tk: Tokenizer) -> None:
    with pytest.raises(TokenError):
        tk.tokenize("4111111111111111", "plain")


def test_capability() -> None:
    digest = tokens.capability_digest("s3cret")
    assert digest == hashlib.sha256(b"s3cret").hexdigest()
    assert tokens.capability_matches("s3cret", digest)
    assert not tokens.capability_matches("s3cret!", digest)
    assert not tokens.capability_matches("s3cret", None)
    assert not tokens.capability_matches(None, digest)
    assert not tokens.capability_matches("", tokens.capability_digest(""))


def test_fast_hmac_matches_stdlib() -> None:
    for key in (KEY, bytes(32), b"\xff" * 32):
        mac = tokens._Hmac256(key)
        for msg in (b"", b"4111111111111111", b"x" * 200):
            assert mac.digest(msg) == hmac.digest(key, msg, "sha256")


def _luhn_reference(digits: str) -> int:
    """The textbook Luhn sum (per digit, from the right), independent of tokens' byte-level version."""
    total = 0
    for offset, char in enumerate(reversed(digits)):
        digit = int(char)
        if offset % 2:
            digit = digit * 2 - 9 if digit > 4 else digit * 2
        total += digit
    return total % 10


@given(st.text(alphabet="0123456789", min_size=0, max_size=40))
def test_luhn_sum_matches_reference(digits: str) -> None:
    assert tokens.luhn_sum(digits) == _luhn_reference(digits)


_BATCH_ITEM = st.one_of(
    _pans(),
    st.text(alphabet="0123456789 -", max_size=24),
    st.text(max_size=20),
    st.integers(),
    st.none(),
    st.lists(st.integers(), max_size=2),
)


@settings(max_examples=200)
@given(st.lists(_BATCH_ITEM, max_size=12), st.sampled_from(tokens.MODES))
def test_tokenize_many_matches_one_by_one(tk: Tokenizer, items: list[object], mode: str) -> None:
    """The batch fast path gives byte-identical tokens and the same errors as normalize + tokenize per item."""
    expected_tokens, expected_last, expected_errors = [], [], []
    for index, raw in enumerate(items):
        try:
            pan = normalize_pan(raw)
        except TokenError as exc:
            expected_tokens.append(None)
            expected_last.append(None)
            expected_errors.append({"index": index, "code": exc.code, "message": exc.message})
            continue
        token, last = tk.tokenize(pan, mode)
        expected_tokens.append(token)
        expected_last.append(last)
    assert tk.tokenize_many(items, mode) == (expected_tokens, expected_last, expected_errors)


def test_tokenize_many_vectors(tk: Tokenizer) -> None:
    pans = [v[0] for v in VECTORS]
    assert tk.tokenize_many(pans)[0] == [v[1] for v in VECTORS]
    assert tk.tokenize_many(pans, "fpe")[0] == [v[2] for v in VECTORS]
    with pytest.raises(TokenError):
        tk.tokenize_many(pans, "plain")


@settings(max_examples=200)
@given(st.integers(min_value=11, max_value=20), st.data())
def test_uniform_batches_match_one_by_one(tk: Tokenizer, length: int, data: st.DataObject) -> None:
    """Batches of digit strings of one length take the whole-batch path (Luhn over the concatenation):
    tokens, last fours and errors as item by item, odd and even lengths, Luhn failures anywhere."""
    digits = st.text(alphabet="0123456789", min_size=length - 1, max_size=length - 1)
    bodies = data.draw(st.lists(digits, min_size=1, max_size=20))
    valid = data.draw(st.lists(st.booleans(), min_size=len(bodies), max_size=len(bodies)))
    items = []
    for body, ok in zip(bodies, valid, strict=True):
        check = int(luhn_check_digit(body))
        items.append(body + str(check if ok else (check + 1) % 10))
    expected = ([], [], [])
    for index, raw in enumerate(items):
        try:
            pan = normalize_pan(raw)
        except TokenError as exc:
            expected[0].append(None)
            expected[1].append(None)
            expected[2].append({"index": index, "code": exc.code, "message": exc.message})
            continue
        expected[0].append(tk.opaque(pan))
        expected[1].append(pan[-4:])
    assert tk.tokenize_many(items) == expected


def test_fast_hmac_same_with_either_sha256(monkeypatch: pytest.MonkeyPatch) -> None:
    """The built-in SHA-256 (cheap copies) and hashlib's OpenSSL one give the same tokens."""
    key = bytes(range(32))
    fast = tokens._Hmac256(key)
    monkeypatch.setattr(tokens, "_SHA256", hashlib.sha256)
    openssl = tokens._Hmac256(key)
    pans = [f"4111111111{i:06d}" for i in range(50)]
    assert fast.opaque_many(pans) == openssl.opaque_many(pans)
    assert fast.digest(b"4111111111111111") == openssl.digest(b"4111111111111111")
