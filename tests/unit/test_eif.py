"""plugins/module_utils/eif.py: reference vectors, every parser edge, write→read properties, cpio ramdisks."""

from __future__ import annotations

import contextlib
import datetime
import gzip
import hashlib
import io
import json
import os
import random
import stat
import struct
import subprocess
import sys
import tempfile
import zlib
from pathlib import Path

import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import eif
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from nitro_emulator import cpio, eif_writer

# Reference nitro-cli-and-eif.md §1.10 worked example.
EXAMPLE_META = (
    b'{"ImageName":"t","ImageVersion":"1.0","BuildMetadata":{"BuildTime":"1970-01-01T00:00:00+00:00",'
    b'"BuildTool":"x","BuildToolVersion":"0","OperatingSystem":"Linux","KernelVersion":"4.14.256"},'
    b'"DockerInfo":null,"CustomMetadata":null}'
)
BUILD_INFO = {
    "BuildTime": "1970-01-01T00:00:00+00:00",
    "BuildTool": "x",
    "BuildToolVersion": "0",
    "OperatingSystem": "Linux",
    "KernelVersion": "4.14.256",
}
EXAMPLE_PCRS = {
    "PCR0": "61fd2b06210a933b3db5e15c5752e394894bb097f7f1d96ad1f55a7525d0d7aa2c63b235f44420b12d8376cc392bdefb",
    "PCR1": "a6d35ce3e7ba80048a2b23da9b15063726a7cea90e16e9d6934e92a15aa1896fd54de706310e2fbc585d9c37db9c1805",
    "PCR2": "5f699ae4300525c628f5c96fc521729dd6ca1a2c07cb07b69e7ae9e3fa935cfd7cc83b3e26d89201a486d9db2405c562",
}


def _write_example(path: Path, **kwargs: object) -> dict[str, str]:
    return eif_writer.write_eif(
        path,
        kernel=b"KERNEL",
        cmdline="console=ttyS0",
        ramdisks=[b"RAMDISK0", b"RAMDISK1"],
        metadata=eif.make_metadata("t", "1.0", BUILD_INFO),
        **kwargs,
    )


@pytest.fixture
def example(tmp_path: Path) -> Path:
    path = tmp_path / "example.eif"
    _write_example(path)
    return path


def _independent_pcr(content: bytes) -> str:
    return hashlib.sha384(b"\0" * 48 + hashlib.sha384(content).digest()).hexdigest()


# ---------------------------------------------------------------------------------------------- vectors


def test_worked_example_bytes_crc_and_pcrs(tmp_path: Path) -> None:
    path = tmp_path / "t.eif"
    assert eif.metadata_bytes(eif.make_metadata("t", "1.0", BUILD_INFO)) == EXAMPLE_META
    assert _write_example(path) == EXAMPLE_PCRS
    data = path.read_bytes()
    assert len(data) == 871
    assert hashlib.sha256(data).hexdigest() == "e344a9eb73f6643359796415ea5c9ec8e99dc4e4c76b716cade6a2e196d21b56"
    assert struct.unpack(">I", data[544:548])[0] == 0xC9D6082C
    image = eif.read_eif(path)
    assert image.header.section_offsets[:6] == (548, 566, 591, 831, 851, 0)
    assert image.header.section_sizes[:6] == (6, 13, 228, 8, 8, 0)
    assert image.header.num_sections == 5
    assert image.crc_ok and image.crc_computed == 0xC9D6082C
    assert image.pcrs == EXAMPLE_PCRS
    assert image.cmdline == b"console=ttyS0"
    assert [s.type for s in image.sections] == [
        eif.SectionType.KERNEL,
        eif.SectionType.CMDLINE,
        eif.SectionType.METADATA,
        eif.SectionType.RAMDISK,
        eif.SectionType.RAMDISK,
    ]


def test_runtime_pcr_doc_vectors() -> None:
    assert eif.pcr3_from_role_arn("arn:aws:iam::123456789012:role/Webserver") == (
        "78fce75db17cd4e0a3fb8dad3ad128ca5e77edbb2b2c7f75329dccd99aa5f6ef4fc1f1a452e315b9e98f9e312e6921e6"
    )
    assert eif.pcr4_from_instance_id("i-1234567890abcdef0") == (
        "08f996b5d43e047a9eb51e7f548bfee7e164fd7dc8f65541f2ac09d6545ac812719327281c401a67a10fcba87ae79ce0"
    )


def test_single_ramdisk_pcr2_is_extend_of_empty(tmp_path: Path) -> None:
    path = tmp_path / "one.eif"
    pcrs = eif_writer.write_eif(
        path, kernel=b"K", cmdline="c", ramdisks=[b"R"], metadata=eif.make_metadata("a", "b", BUILD_INFO)
    )
    assert (
        pcrs["PCR2"]
        == eif.EMPTY_PCR
        == ("21b9efbc184807662e966d34f390821309eeac6802309798826296bf3e8bec7c10edb30948c90ba67310f7b964fc500a")
    )
    assert pcrs["PCR0"] == pcrs["PCR1"] == _independent_pcr(b"KcR")


def test_cbor_vectors() -> None:
    payload = eif.pcr_info_payload(bytes(range(48)).hex())
    assert payload.hex() == (
        "a26e72656769737465725f696e646578006e72656769737465725f76616c75659830000102030405060708090a0b0c0d"
        "0e0f101112131415161718181819181a181b181c181d181e181f1820182118221823182418251826182718281829182a"
        "182b182c182d182e182f"
    )
    cert = b"-----BEGIN CERTIFICATE-----\nMIIB\n-----END CERTIFICATE-----\n"
    cose = bytes.fromhex("d28444a101382 2a04040".replace(" ", ""))
    section = eif.encode_signature_section([eif.PcrSignature(cert, cose)])
    assert section.hex().startswith("81a2737369676e696e675f6365727469666963617465983b182d182d")
    assert section.hex().endswith("697369676e61747572658a18d21884184418a1011838182218a018401840")
    assert eif.decode_signature_section(section) == [eif.PcrSignature(cert, cose)]


def test_measurements_order_and_hash_algorithm(example: Path) -> None:
    measurements = eif.measure_eif(example)
    assert list(measurements) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2"]
    assert measurements["HashAlgorithm"] == "Sha384 { ... }"


def test_pcr_of_file_and_bytes(tmp_path: Path) -> None:
    blob = os.urandom(3 << 20)
    (tmp_path / "f").write_bytes(blob)
    assert eif.pcr_of_file(tmp_path / "f") == eif.pcr_of_bytes(blob) == _independent_pcr(blob)


def test_rfc3339_and_build_info() -> None:
    epoch = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)
    assert eif.rfc3339(0) == "1970-01-01T00:00:00+00:00"
    assert eif.rfc3339(epoch.replace(microsecond=410000)) == "1970-01-01T00:00:00.410+00:00"
    assert eif.rfc3339(epoch.replace(microsecond=410516)) == "1970-01-01T00:00:00.410516+00:00"
    config = (
        "#\n# Automatically generated file; DO NOT EDIT.\n"
        "# Linux/x86_64 4.14.256-209.484.amzn2.x86_64 Kernel Configuration\n"
    )
    info = eif.build_info_from_kernel_config(config, build_time="T", build_tool="nitro-cli", build_tool_version="1")
    assert info == {
        "BuildTime": "T",
        "BuildTool": "nitro-cli",
        "BuildToolVersion": "1",
        "OperatingSystem": "Linux",
        "KernelVersion": "4.14.256",
    }
    short = eif.build_info_from_kernel_config("x\ny\n", build_time="T", build_tool="a", build_tool_version="b")
    assert short["OperatingSystem"] == short["KernelVersion"] == "Unknown"


def test_describe_eif_shape_and_custom_metadata(tmp_path: Path) -> None:
    path = tmp_path / "d.eif"
    docker_info = {"Id": "sha256:ab", "Config": {"Env": ["A=1"], "Cmd": ["x"]}, "Architecture": "amd64"}
    meta = eif.make_metadata("img", "v1", BUILD_INFO, docker_info, {"zeta": 1, "alpha": {"b": 2, "a": 1}})
    eif_writer.write_eif(path, kernel=b"K", cmdline="c", ramdisks=[b"R0", b"R1"], metadata=meta)
    # Nested JSON values are stored with sorted keys (serde_json without preserve_order).
    stored = eif.read_eif(path).metadata
    assert list(stored["DockerInfo"]) == ["Architecture", "Config", "Id"]
    described = eif.describe_eif(path)
    assert list(described) == [
        "EifVersion",
        "Measurements",
        "IsSigned",
        "CheckCRC",
        "ImageName",
        "ImageVersion",
        "Metadata",
    ]
    assert described["EifVersion"] == 4 and described["IsSigned"] is False and described["CheckCRC"] is True
    assert list(described["Metadata"]) == [*eif.BUILD_INFO_KEYS, "DockerInfo", "alpha", "zeta"]
    assert described["Metadata"]["alpha"] == {"a": 1, "b": 2}
    json.dumps(described)  # serializable as is


def test_describe_rejects_non_object_custom_metadata(tmp_path: Path) -> None:
    path = tmp_path / "d.eif"
    eif_writer.write_eif(
        path, kernel=b"K", cmdline="c", ramdisks=[b"R"], metadata=eif.make_metadata("a", "b", BUILD_INFO, None, [1])
    )
    with pytest.raises(eif.EifError, match="CustomMetadata"):
        eif.describe_eif(path)


# ---------------------------------------------------------------------------------------------- signing


def _self_signed(tmp_path: Path) -> tuple[bytes, object]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "eif-test")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .sign(key, hashes.SHA384())
    )
    return cert.public_bytes(serialization.Encoding.PEM), cert


def test_signed_image_has_pcr8_of_certificate_der(tmp_path: Path) -> None:
    from cryptography.hazmat.primitives import serialization

    pem, cert = _self_signed(tmp_path)
    signed_pcr0: list[str] = []

    def signer(pcr0: str) -> bytes:
        signed_pcr0.append(pcr0)
        return eif.encode_signature_section([eif.PcrSignature(pem, b"\xd2\x84" + eif.pcr_info_payload(pcr0))])

    path = tmp_path / "s.eif"
    pcrs = _write_example(path, signer=signer)
    der = cert.public_bytes(serialization.Encoding.DER)
    assert pcrs["PCR8"] == _independent_pcr(der) == eif.pcr8_from_certificate(pem)
    assert signed_pcr0 == [EXAMPLE_PCRS["PCR0"]]
    image = eif.read_eif(path)
    assert image.is_signed and image.pcrs == pcrs
    assert {k: image.pcrs[k] for k in EXAMPLE_PCRS} == EXAMPLE_PCRS  # signature is not measured
    assert image.sections[-1].type == eif.SectionType.SIGNATURE
    assert image.header.num_sections == 6
    assert list(image.measurements) == ["HashAlgorithm", "PCR0", "PCR1", "PCR2", "PCR8"]
    seen: list[str] = []

    def inspector(sig: eif.PcrSignature, pcr0: str) -> tuple[dict, bool]:
        seen.append(pcr0)
        return {"Algorithm": "x"}, sig.signing_certificate == pem

    described = eif.describe_eif(path, certificate_inspector=inspector)
    assert list(described)[:6] == [
        "EifVersion",
        "Measurements",
        "IsSigned",
        "SigningCertificate",
        "CheckCRC",
        "SignatureCheck",
    ]
    assert described["SignatureCheck"] is True and seen == [EXAMPLE_PCRS["PCR0"]]


def test_bad_pem_is_eif_error() -> None:
    with pytest.raises(eif.EifError, match="PEM"):
        eif.pem_to_der(b"not a certificate")
    with pytest.raises(eif.EifError, match="base64"):
        eif.pem_to_der("-----BEGIN CERTIFICATE-----\n!!!!\n-----END CERTIFICATE-----\n")
    with pytest.raises(eif.EifError, match="SEQUENCE"):
        eif.pem_to_der("-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n")


@pytest.mark.parametrize(
    ("data", "message"),
    [
        (b"", "runs past"),
        (b"\x80", "non-empty CBOR array"),
        (b"\x9b\xff\xff\xff\xff\xff\xff\xff\xff", "more than the data holds"),
        (b"\x81\xa1\x61a\x01", "lacks signing_certificate"),
        (b"\x81\xa2\x73signing_certificate\x01\x69signature\x40", "not a byte array"),
        (b"\x81\xa2\x73signing_certificate\x40\x69signature\x40\x00", "trailing"),
        (b"\xc0\x00", "major type 6"),
        (b"\x9f", "additional info 31"),
        (b"\x81" * 40 + b"\x00", "nested too deeply"),
    ],
)
def test_signature_section_decode_errors(data: bytes, message: str) -> None:
    with pytest.raises(eif.EifError, match=message):
        eif.decode_signature_section(data)


# ---------------------------------------------------------------------------------------------- parser edges


def _mutate(path: Path, offset: int, new: bytes, fix_crc: bool = True) -> None:
    data = bytearray(path.read_bytes())
    data[offset : offset + len(new)] = new
    if fix_crc:
        _fix_crc(data)
    path.write_bytes(bytes(data))


def _fix_crc(data: bytearray) -> None:
    """Recompute the CRC the way the format defines it (independently of the library)."""
    crc = zlib.crc32(bytes(data[:544]))
    crc = zlib.crc32(bytes(data[548:]), crc)
    data[544:548] = struct.pack(">I", crc)


def _header_field(index: int) -> int:
    """Offset of section_offsets[index] (sizes start 256 bytes later)."""
    return 0x1C + 8 * index


@pytest.mark.parametrize(
    ("mutation", "message"),
    [
        ((0, b"XEIF"), "magic"),
        ((4, b"\x00\x05"), "unsupported EIF version 5"),
        ((4, b"\x00\x01"), "unsupported EIF version 1"),
        ((0x1A, b"\x00\x00"), "invalid section count 0"),
        ((0x1A, b"\x00\x21"), "invalid section count 33"),
        ((0x1A, b"\xff\xff"), "invalid section count 65535"),
        ((0x1A, b"\x00\x04"), "unexpected bytes after the last section"),
        ((0x1A, b"\x00\x06"), "section 5: header table says offset 0"),
        ((_header_field(1), struct.pack(">Q", 567)), "section 1: header table says offset 567"),
        ((0x11C + 8, struct.pack(">Q", 14)), "differs from the header table"),
        ((548, b"\x00\x00"), "invalid section type 0"),
        ((548, b"\x00\x06"), "invalid section type 6"),
        ((548, b"\x00\x03"), "0 kernel sections"),
        ((566, b"\x00\x01"), "2 kernel sections"),
        ((591, b"\x00\x03"), "no metadata section"),
        ((591 + 12, b"["), "not valid JSON"),
        ((591 + 12 + 2, b"Imagename"), "lacks required key"),
        ((831, b"\x00\x02"), "2 cmdline sections"),
        ((851, b"\x00\x04"), "signature section"),
    ],
)
def test_corrupt_headers_raise_clear_errors(example: Path, mutation: tuple[int, bytes], message: str) -> None:
    _mutate(example, *mutation)
    with pytest.raises(eif.EifError, match=message):
        eif.read_eif(example)


def test_ramdisk_before_kernel(example: Path) -> None:
    _mutate(example, 548, b"\x00\x03", fix_crc=False)
    _mutate(example, 831, b"\x00\x01")
    with pytest.raises(eif.EifError, match="ramdisk precedes the kernel"):
        eif.read_eif(example)


def test_section_size_past_eof(example: Path) -> None:
    data = bytearray(example.read_bytes())
    huge = struct.pack(">Q", 2**64 - 1)
    data[0x11C + 8 * 4 : 0x11C + 8 * 5] = huge
    data[851 + 4 : 851 + 12] = huge
    _fix_crc(data)
    example.write_bytes(bytes(data))
    with pytest.raises(eif.EifError, match=r"section 4 \(ramdisk\) claims 18446744073709551615 bytes but only 8"):
        eif.read_eif(example)


def test_oversized_cmdline_and_signature_sections_rejected(example: Path) -> None:
    data = bytearray(example.read_bytes())
    size = struct.pack(">Q", eif.CMDLINE_MAX_SIZE + 1)
    data[0x11C + 8 : 0x11C + 16] = size
    data[566 + 4 : 566 + 12] = size
    data += b"\0" * (eif.CMDLINE_MAX_SIZE + 1 - 13)
    example.write_bytes(bytes(data))
    with pytest.raises(eif.EifError, match="over its 1048576 limit"):
        eif.read_eif(example)


@pytest.mark.parametrize("length", [0, 1, 547, 548, 555, 560, 570, 600, 870])
def test_truncated_files(example: Path, length: int) -> None:
    example.write_bytes(example.read_bytes()[:length])
    with pytest.raises(eif.EifError, match=r"truncated|claims|header table"):
        eif.read_eif(example)


def test_trailing_bytes(example: Path) -> None:
    with example.open("ab") as handle:
        handle.write(b"x")
    with pytest.raises(eif.EifError, match="1 unexpected bytes after the last section"):
        eif.read_eif(example)


def test_bad_crc_raises_or_reports(example: Path) -> None:
    _mutate(example, 548 + 12, b"k", fix_crc=False)  # kernel byte changed, CRC not updated
    with pytest.raises(eif.EifCrcError, match="CRC32 mismatch"):
        eif.read_eif(example)
    image = eif.read_eif(example, check_crc=False)
    assert not image.crc_ok
    assert eif.describe_eif(example)["CheckCRC"] is False
    # The CRC covers the `unused` header field too.
    _mutate(example, 548 + 12, b"K", fix_crc=False)
    assert eif.read_eif(example).crc_ok
    _mutate(example, 0x21C, b"\x00\x00\x00\x01", fix_crc=False)
    assert not eif.read_eif(example, check_crc=False).crc_ok


def test_unreadable_paths(tmp_path: Path) -> None:
    with pytest.raises(eif.EifError, match="cannot open"):
        eif.read_eif(tmp_path / "missing.eif")
    with pytest.raises(eif.EifError, match=r"is not a regular file \(a directory\)"):
        eif.read_eif(tmp_path)
    with pytest.raises(eif.EifError, match=r"/dev/zero is not a regular file \(a character device\)"):
        eif.read_eif("/dev/zero")


def test_fifo_is_not_read(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # Opening a FIFO for reading blocks until a writer appears: hold one open so the test cannot hang.
    writer = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        with pytest.raises(eif.EifError, match="not a regular file"):
            eif.read_eif(fifo)
    finally:
        os.close(writer)


def test_fifo_without_writer_is_refused_at_once(tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    # No writer: a plain open() would block forever. In a child process, so a regression fails, not hangs.
    code = (
        "from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import eif\n"
        f"try:\n    eif.read_eif({str(fifo)!r})\n"
        "except eif.EifError as e:\n    print(e)"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, check=True)
    assert "is not a regular file (a FIFO)" in done.stdout


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzz_mutations_never_escape_eif_error(tmp_path: Path, data: st.DataObject) -> None:
    base = bytearray(_example_bytes())
    for _ in range(data.draw(st.integers(1, 4))):
        pos = data.draw(st.integers(0, len(base) - 1))
        base[pos] = data.draw(st.integers(0, 255))
    if data.draw(st.booleans()):
        base = base[: data.draw(st.integers(0, len(base)))]
    if len(base) >= 548 and data.draw(st.booleans()):
        _fix_crc(base)
    path = tmp_path / "fuzz.eif"
    path.write_bytes(bytes(base))
    with contextlib.suppress(eif.EifError):
        eif.read_eif(path, check_crc=data.draw(st.booleans()))


_EXAMPLE_CACHE: list[bytes] = []


def _example_bytes() -> bytes:
    if not _EXAMPLE_CACHE:
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "e.eif"
            _write_example(path)
            _EXAMPLE_CACHE.append(path.read_bytes())
    return _EXAMPLE_CACHE[0]


# ---------------------------------------------------------------------------------------------- writer


def test_writer_rejects_bad_inputs(tmp_path: Path) -> None:
    meta = eif.make_metadata("a", "b", BUILD_INFO)
    with pytest.raises(eif.EifError, match="NUL"):
        eif_writer.write_eif(tmp_path / "x", kernel=b"K", cmdline="a\0b", ramdisks=[b"R"], metadata=meta)
    with pytest.raises(eif.EifError, match="at least one ramdisk"):
        eif_writer.write_eif(tmp_path / "x", kernel=b"K", cmdline="c", ramdisks=[], metadata=meta)
    with pytest.raises(eif.EifError, match="too many sections"):
        eif_writer.write_eif(tmp_path / "x", kernel=b"K", cmdline="c", ramdisks=[b"R"] * 30, metadata=meta)
    with pytest.raises(eif.EifError, match="lacks"):
        eif_writer.write_eif(tmp_path / "x", kernel=b"K", cmdline="c", ramdisks=[b"R"], metadata={"ImageName": "a"})
    with pytest.raises(eif.EifError, match="cannot read"):
        eif_writer.write_eif(tmp_path / "x", kernel=tmp_path / "nope", cmdline="c", ramdisks=[b"R"], metadata=meta)
    assert not (tmp_path / "x").exists()
    assert list(tmp_path.iterdir()) == []  # no temp file left behind


def test_writer_streams_path_sources_and_parallel_matches_serial(tmp_path: Path) -> None:
    kernel = os.urandom(3 << 20)
    rd0 = os.urandom(1 << 20)
    rd1 = os.urandom((5 << 20) + 7)
    rd2 = os.urandom(11)
    for name, blob in (("k", kernel), ("r0", rd0), ("r1", rd1)):
        (tmp_path / name).write_bytes(blob)
    meta = eif.make_metadata("a", "b", BUILD_INFO)
    expected = {
        "PCR0": _independent_pcr(kernel + b"cmd" + rd0 + rd1 + rd2),
        "PCR1": _independent_pcr(kernel + b"cmd" + rd0),
        "PCR2": _independent_pcr(rd1 + rd2),
    }
    results = []
    for parallel in (False, True):
        out = tmp_path / f"p{parallel}.eif"
        pcrs = eif_writer.write_eif(
            out,
            kernel=tmp_path / "k",
            cmdline=b"cmd",
            ramdisks=[tmp_path / "r0", str(tmp_path / "r1"), rd2],
            metadata=meta,
            parallel=parallel,
        )
        assert pcrs == expected
        for read_parallel in (False, True):
            image = eif.read_eif(out, parallel=read_parallel, file_digest=True)
            assert image.pcrs == expected
            assert image.file_sha384 == hashlib.sha384(out.read_bytes()).hexdigest()
        results.append(out.read_bytes())
    assert results[0] == results[1]


section_blobs = st.binary(min_size=0, max_size=300)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    kernel=section_blobs,
    cmdline=st.text(st.characters(blacklist_characters="\0", blacklist_categories=("Cs",)), max_size=50),
    ramdisks=st.lists(section_blobs, min_size=1, max_size=5),
    name=st.text(max_size=20),
    custom=st.none() | st.dictionaries(st.text(max_size=5), st.integers() | st.text(max_size=5), max_size=4),
    flags=st.sampled_from([0, 1]),
)
def test_write_read_roundtrip(
    tmp_path: Path, kernel: bytes, cmdline: str, ramdisks: list[bytes], name: str, custom: dict | None, flags: int
) -> None:
    path = tmp_path / "rt.eif"
    meta = eif.make_metadata(name, "1", BUILD_INFO, {"b": [1, {"d": 1, "c": 2}]}, custom)
    pcrs = eif_writer.write_eif(path, kernel=kernel, cmdline=cmdline, ramdisks=ramdisks, metadata=meta, flags=flags)
    image = eif.read_eif(path)
    boot = kernel + cmdline.encode() + ramdisks[0]
    assert (
        pcrs
        == image.pcrs
        == {
            "PCR0": _independent_pcr(boot + b"".join(ramdisks[1:])),
            "PCR1": _independent_pcr(boot),
            "PCR2": _independent_pcr(b"".join(ramdisks[1:])),
        }
    )
    assert image.header.flags == flags and image.header.arch == ("aarch64" if flags else "x86_64")
    assert image.cmdline == cmdline.encode()
    assert image.metadata["ImageName"] == name and image.metadata["CustomMetadata"] == custom
    assert [image.read_section(s) for s in image.ramdisks] == ramdisks
    assert image.read_section(image.kernel) == kernel
    assert image.file_size == path.stat().st_size == 548 + sum(12 + s.size for s in image.sections)


def test_read_section_limit(example: Path) -> None:
    image = eif.read_eif(example)
    with pytest.raises(eif.EifError, match="over the 3 limit"):
        image.read_section(image.kernel, max_size=3)
    sink = io.BytesIO()
    image.copy_section(image.ramdisks[1], sink)
    assert sink.getvalue() == b"RAMDISK1"


# ---------------------------------------------------------------------------------------------- cpio


def _entries() -> list[cpio.CpioEntry]:
    return [
        cpio.file_entry("rootfs/etc/hostname", b"enclave\n"),
        cpio.CpioEntry("rootfs/bin/sh", stat.S_IFLNK | 0o777, data=b"dash"),
        cpio.file_entry("cmd", b"/bin/app\n"),
        cpio.dir_entry("rootfs/tmp", 0o1777),
        cpio.file_entry("rootfs/bin/app", b"#!/bin/sh\necho hi\n" * 100, 0o755, uid=1000, gid=1000),
        cpio.CpioEntry("rootfs/dev/null", stat.S_IFCHR | 0o666, rdev_major=1, rdev_minor=3),
        cpio.file_entry("env", b"PATH=/bin\n"),
    ]


def _cpio_bytes(entries: list[cpio.CpioEntry], mtime: int = 0) -> bytes:
    out = io.BytesIO()
    cpio.write_cpio(entries, out, mtime=mtime)
    return out.getvalue()


def _parse_newc(data: bytes) -> list[tuple[str, dict[str, int], bytes]]:
    """An independent newc reader (plain slicing) to check the writer's layout."""
    names = ["ino", "mode", "uid", "gid", "nlink", "mtime", "filesize", "devmajor", "devminor"]
    names += ["rdevmajor", "rdevminor", "namesize", "check"]
    pos, out = 0, []
    while True:
        assert data[pos : pos + 6] == b"070701"
        fields = {n: int(data[pos + 6 + 8 * i : pos + 14 + 8 * i], 16) for i, n in enumerate(names)}
        name = data[pos + 110 : pos + 110 + fields["namesize"] - 1].decode()
        pos += 110 + fields["namesize"]
        pos += -pos % 4
        body = data[pos : pos + fields["filesize"]]
        pos += fields["filesize"]
        pos += -pos % 4
        out.append((name, fields, body))
        if name == "TRAILER!!!":
            # gocpio pads the archive to 512 bytes after the trailer.
            assert len(data) % 512 == 0
            assert data[pos:] == b"\0" * (len(data) - pos)
            assert len(data) - pos < 512
            return out


def test_cpio_layout_is_sorted_complete_and_normalized() -> None:
    members = _parse_newc(_cpio_bytes(_entries()))
    names = [m[0] for m in members]
    assert names == [
        "cmd",
        "env",
        "rootfs",
        "rootfs/bin",
        "rootfs/bin/app",
        "rootfs/bin/sh",
        "rootfs/dev",
        "rootfs/dev/null",
        "rootfs/etc",
        "rootfs/etc/hostname",
        "rootfs/tmp",
        "TRAILER!!!",
    ]
    by_name = {m[0]: m for m in members}
    # linuxkit's gocpio numbering and device fields (the trailer takes the next inode).
    assert [m[1]["ino"] for m in members] == list(range(721, 721 + len(members)))
    assert {(m[1]["devmajor"], m[1]["devminor"]) for m in members} == {(3, 1)}
    assert all(m[1]["nlink"] == (2 if stat.S_ISDIR(m[1]["mode"]) else 1) for m in members)
    assert all(m[1]["mtime"] == 0 for m in members)
    assert by_name["rootfs"][1]["mode"] == stat.S_IFDIR | 0o755  # synthesized parent
    assert by_name["rootfs/tmp"][1]["mode"] == stat.S_IFDIR | 0o1777
    assert by_name["rootfs/bin/app"][1]["uid"] == 1000
    assert by_name["rootfs/bin/sh"][2] == b"dash"
    assert by_name["rootfs/dev/null"][1]["rdevminor"] == 3
    assert by_name["cmd"][2] == b"/bin/app\n"


def test_cpio_is_deterministic(tmp_path: Path) -> None:
    entries = _entries()
    assert _cpio_bytes(entries) == _cpio_bytes(list(reversed(entries)))
    assert _cpio_bytes(entries, mtime=5) != _cpio_bytes(entries)
    a = cpio.write_ramdisk(entries, tmp_path / "a.gz")
    b = cpio.write_ramdisk(list(reversed(entries)), tmp_path / "b.gz")
    assert a.read_bytes() == b.read_bytes()
    raw = a.read_bytes()
    assert raw[:4] == b"\x1f\x8b\x08\x00" and raw[4:8] == b"\0\0\0\0"  # no name, mtime 0
    assert gzip.decompress(raw) == _cpio_bytes(entries)
    plain = cpio.write_ramdisk(entries, tmp_path / "c.cpio", compress=False)
    assert plain.read_bytes() == _cpio_bytes(entries)


def test_cpio_streams_file_sources(tmp_path: Path) -> None:
    blob = os.urandom((2 << 20) + 3)
    (tmp_path / "big").write_bytes(blob)
    data = _cpio_bytes([cpio.path_entry("big", tmp_path / "big", 0o600)])
    assert _parse_newc(data)[0][2] == blob
    short = cpio.CpioEntry("x", stat.S_IFREG | 0o644, opener=lambda: io.BytesIO(b"ab"), size=3)
    with pytest.raises(eif.EifError, match="shorter"):
        _cpio_bytes([short])


@pytest.mark.parametrize(
    ("entries", "message"),
    [
        ([cpio.file_entry("a", b""), cpio.file_entry("./a", b"")], "duplicate"),
        ([cpio.file_entry("../etc/passwd", b"")], "escapes"),
        ([cpio.file_entry("a/../../b", b"")], "escapes"),
        ([cpio.file_entry("/", b"")], "empty"),
        ([cpio.file_entry("a\0b", b"")], "NUL"),
        ([cpio.file_entry("f", b""), cpio.file_entry("f/g", b"")], "below non-directory"),
        ([cpio.CpioEntry("x", stat.S_IFREG, uid=2**32)], "32 bits"),
    ],
)
def test_cpio_rejects_bad_entries(entries: list[cpio.CpioEntry], message: str) -> None:
    with pytest.raises(eif.EifError, match=message):
        _cpio_bytes(entries)


def test_extract_roundtrip(tmp_path: Path) -> None:
    ramdisk = cpio.write_ramdisk(_entries(), tmp_path / "r.gz")
    dest = tmp_path / "out"
    with ramdisk.open("rb") as handle:
        result = cpio.extract_ramdisk_stream(handle, dest, preserve_owner=False)
    assert result.skipped == ["rootfs/dev/null"]
    assert (result.files, result.symlinks) == (4, 1)
    assert (dest / "cmd").read_bytes() == b"/bin/app\n"
    assert os.readlink(dest / "rootfs/bin/sh") == "dash"
    assert stat.S_IMODE((dest / "rootfs/bin/app").stat().st_mode) == 0o755
    assert stat.S_IMODE((dest / "rootfs/tmp").stat().st_mode) == 0o1777
    assert not (dest / "rootfs/dev/null").exists()
    # strip_prefix: just the image filesystem
    root = tmp_path / "root"
    with ramdisk.open("rb") as handle:
        cpio.extract_ramdisk_stream(handle, root, strip_prefix="rootfs", preserve_owner=False)
    assert sorted(p.name for p in root.iterdir()) == ["bin", "dev", "etc", "tmp"]


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_extract_preserves_owner_as_root(tmp_path: Path) -> None:
    data = _cpio_bytes(_entries())
    cpio.extract_cpio(io.BytesIO(data), tmp_path / "o")
    assert (tmp_path / "o/rootfs/bin/app").stat().st_uid == 1000


def _raw_member(name: bytes, mode: int, body: bytes = b"", ino: int = 1, nlink: int = 1) -> bytes:
    fields = [ino, mode, 0, 0, nlink, 0, len(body), 0, 0, 0, 0, len(name) + 1, 0]
    head = b"070701" + b"".join(b"%08X" % f for f in fields) + name + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + body + b"\0" * (-len(body) % 4)


TRAILER = _raw_member(b"TRAILER!!!", 0, ino=0)


def test_extract_refuses_traversal_and_symlink_escape(tmp_path: Path) -> None:
    outside = tmp_path / "outside"
    outside.mkdir()
    dest = tmp_path / "dest"
    evil = _raw_member(b"../outside/x", stat.S_IFREG | 0o644, b"pwned") + TRAILER
    with pytest.raises(eif.EifError, match="escapes"):
        cpio.extract_cpio(io.BytesIO(evil), dest)
    link_then_write = (
        _raw_member(b"link", stat.S_IFLNK | 0o777, str(outside).encode())
        + _raw_member(b"link/x", stat.S_IFREG | 0o644, b"pwned", ino=2)
        + TRAILER
    )
    with pytest.raises(eif.EifError, match="unsafe path"):
        cpio.extract_cpio(io.BytesIO(link_then_write), dest)
    # A symlink replacing a file and then written "through": the file write must not follow it.
    overwrite = (
        _raw_member(b"f", stat.S_IFLNK | 0o777, str(outside / "y").encode())
        + _raw_member(b"f", stat.S_IFREG | 0o644, b"data", ino=2)
        + TRAILER
    )
    cpio.extract_cpio(io.BytesIO(overwrite), dest)
    assert list(outside.iterdir()) == []
    assert (dest / "f").read_bytes() == b"data" and not (dest / "f").is_symlink()


def test_extract_handles_hardlinks_padding_and_concatenation(tmp_path: Path) -> None:
    archive = (
        _raw_member(b"a", stat.S_IFREG | 0o644, b"", ino=7, nlink=2)
        + _raw_member(b"b", stat.S_IFREG | 0o644, b"shared", ino=7, nlink=2)
        + TRAILER
        + b"\0" * 512
        + _raw_member(b"c", stat.S_IFREG | 0o600, b"second archive", ino=1)
        + TRAILER
        + b"\0\0"
    )
    dest = tmp_path / "d"
    cpio.extract_cpio(io.BytesIO(archive), dest, preserve_owner=False)
    assert (dest / "a").read_bytes() == (dest / "b").read_bytes() == b"shared"
    assert (dest / "a").stat().st_ino == (dest / "b").stat().st_ino
    assert (dest / "c").read_bytes() == b"second archive"


@pytest.mark.parametrize(
    ("archive", "message"),
    [
        (b"070707" + b"0" * 200, "not a newc"),
        (b"0707", "truncated cpio archive: header"),
        (b"070701" + b"Z" * 104, "non-hex"),
        (_raw_member(b"a", stat.S_IFREG | 0o644, b"0123456789")[:-8], "truncated cpio archive: data"),
        (b"070701" + b"0" * 88 + b"00FFFFFF" + b"0" * 8, "name size"),
        (_raw_member(b"..", stat.S_IFDIR | 0o755) + TRAILER, "escapes"),
    ],
)
def test_extract_malformed_cpio(tmp_path: Path, archive: bytes, message: str) -> None:
    with pytest.raises(eif.EifError, match=message):
        cpio.extract_cpio(io.BytesIO(archive), tmp_path / "d")


@pytest.mark.parametrize("reader", ["isal", "zlib"])
def test_extract_bad_gzip_and_size_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, reader: str) -> None:
    if reader == "zlib":  # a host without the isal package
        monkeypatch.setattr(cpio, "_inflating_gzip", gzip)
        monkeypatch.setattr(cpio, "_INFLATE_ERRORS", (EOFError, OSError, zlib.error))
    else:
        assert cpio._inflating_gzip is not gzip  # the dev venv and emulated hosts have isal
    gz = gzip.compress(_cpio_bytes(_entries()), mtime=0)
    assert cpio.extract_ramdisk_stream(io.BytesIO(gz), tmp_path / "ok").files == 4
    with pytest.raises(eif.EifError, match="corrupt"):
        cpio.extract_ramdisk_stream(io.BytesIO(gz[: len(gz) // 2]), tmp_path / "a")
    with pytest.raises(eif.EifError, match="corrupt"):
        cpio.extract_ramdisk_stream(io.BytesIO(gz[:20] + b"\xff" * 50 + gz[70:]), tmp_path / "b")
    with pytest.raises(eif.EifError, match="beyond the 100-byte limit"):
        cpio.extract_ramdisk_stream(io.BytesIO(gz), tmp_path / "c", max_bytes=100)


def test_extract_customer_ramdisks_from_eif(tmp_path: Path) -> None:
    boot = cpio.write_ramdisk([cpio.file_entry("init", b"INIT", 0o755)], tmp_path / "boot", compress=False)
    app = cpio.write_ramdisk(_entries(), tmp_path / "app.gz")
    path = tmp_path / "img.eif"
    eif_writer.write_eif(
        path, kernel=b"K", cmdline="c", ramdisks=[boot, app], metadata=eif.make_metadata("a", "b", BUILD_INFO)
    )
    image = eif.read_eif(path)
    assert image.customer_ramdisks == image.ramdisks[1:]
    result = cpio.extract_customer_ramdisks(image, tmp_path / "x", preserve_owner=False)
    assert result.files == 4
    assert (tmp_path / "x/env").read_bytes() == b"PATH=/bin\n"
    assert not (tmp_path / "x/init").exists()  # bootstrap ramdisk is not the application's
    single = tmp_path / "single.eif"
    eif_writer.write_eif(
        single, kernel=b"K", cmdline="c", ramdisks=[boot], metadata=eif.make_metadata("a", "b", BUILD_INFO)
    )
    with pytest.raises(eif.EifError, match="no application ramdisk"):
        cpio.extract_customer_ramdisks(single, tmp_path / "y")


member_name = st.lists(st.sampled_from(["a", "b", "bin", "é", "x.y", "long-name_1"]), min_size=1, max_size=3).map(
    "/".join
)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    files=st.dictionaries(member_name, st.binary(max_size=600), min_size=1, max_size=8),
    mode=st.sampled_from([0o644, 0o600, 0o755]),
    seed=st.randoms(use_true_random=False),
)
def test_ramdisk_determinism_and_roundtrip_property(
    tmp_path: Path, files: dict, mode: int, seed: random.Random
) -> None:
    # Drop names that are a parent of another name (a path cannot be both a file and a directory).
    names = [n for n in files if not any(o.startswith(n + "/") for o in files)]
    entries = [cpio.file_entry(n, files[n], mode) for n in names]
    shuffled = list(entries)
    seed.shuffle(shuffled)
    first = _cpio_bytes(entries)
    assert _cpio_bytes(shuffled) == first
    assert gzip.compress(first, mtime=0) == gzip.compress(_cpio_bytes(shuffled), mtime=0)
    dest = tmp_path / f"x{abs(hash(first))}"
    result = cpio.extract_cpio(io.BytesIO(first), dest, preserve_owner=False)
    assert result.files == len(names)
    for name in names:
        assert (dest / name).read_bytes() == files[name]
        assert stat.S_IMODE((dest / name).stat().st_mode) == mode


def _gocpio_member(ino: int, mode: int, mtime: int, name: bytes, body: bytes = b"", nlink: int = 1) -> bytes:
    """One member as surma/gocpio's WriteHeader/Write emit it (vendored in linuxkit, writer.go)."""
    fields = [ino, mode, 0, 0, nlink, mtime, len(body), 3, 1, 0, 0, len(name) + 1, 0]
    head = b"070701" + b"".join(b"%08x" % f for f in fields) + name + b"\0"
    head += b"\0" * (-len(head) % 4)
    return head + body + b"\0" * (-len(body) % 4)


def test_bootstrap_ramdisk_is_what_linuxkit_writes_for_nitro_cli(tmp_path: Path) -> None:
    """nitro-cli's bootstrap config (yaml_generator.rs: dev 0755, init 0755, nsm.ko 0755) through linuxkit:
    `files:` members with defaultModTime, gocpio header fields, trailer, padding to 512, no gzip."""
    from nitro_emulator.build import bootstrap_entries

    blobs = tmp_path / "blobs"
    blobs.mkdir()
    (blobs / "init").write_bytes(b"\x7fELF init" * 7)
    (blobs / "nsm.ko").write_bytes(b"\x7fELF nsm")
    when = 1492533000  # 2017-04-18T16:30:00Z
    expected = (
        _gocpio_member(721, stat.S_IFDIR | 0o755, when, b"dev", nlink=2)
        + _gocpio_member(722, stat.S_IFREG | 0o755, when, b"init", (blobs / "init").read_bytes())
        + _gocpio_member(723, stat.S_IFREG | 0o755, when, b"nsm.ko", (blobs / "nsm.ko").read_bytes())
        + _gocpio_member(724, 0, 0, b"TRAILER!!!")
    )
    expected += b"\0" * (-len(expected) % 512)
    ramdisk = cpio.write_ramdisk(
        bootstrap_entries(blobs), tmp_path / "boot", compress=False, mtime=cpio.LINUXKIT_FILES_MTIME
    )
    assert ramdisk.read_bytes() == expected
