"""Enclave Image File (EIF) v4: read, validate and measure; the PCR formulas (build-time and runtime).

The one reader shared by the Ansible modules (on hosts: standard library only), the nitro-cli emulator
and the tests. Writing EIFs and cpio ramdisks is the emulator's business (nitro_emulator/eif_writer.py,
nitro_emulator/cpio.py): hosts only read and measure. Byte layout and measurement rules follow
nitro-cli / aws-nitro-enclaves-image-format (reference nitro-cli-and-eif.md §1-4):

- header: 548 bytes, big-endian; sections laid end to end, each a 12-byte section header + data;
- CRC32 (zlib) over header[0:544] and then every section header and data in file order;
- PCRx = SHA384(0^48 || SHA384(content_x)), lowercase hex: PCR0 = kernel|cmdline|all ramdisks,
  PCR1 = kernel|cmdline|first ramdisk, PCR2 = later ramdisks, PCR8 = DER of the signing certificate.

Everything is streamed with large buffers: an EIF of several GiB is read, measured and written in
constant memory. Malformed input raises `EifError` (never a bare traceback or a hang).
"""

from __future__ import annotations

import base64
import binascii
import datetime
import hashlib
import io
import json
import os
import queue
import re
import stat
import struct
import threading
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import IO, Any, BinaryIO

# ---------------------------------------------------------------------------------------------------------
# Constants (reference §1.2-1.4, §4.4)

EIF_MAGIC = b".eif"
CURRENT_VERSION = 4
SUPPORTED_VERSIONS = (2, 3, 4)  # v0/v1 were internal and predate the CRC
HEADER_SIZE = 548
CRC_OFFSET = 544
SECTION_HEADER_SIZE = 12
MAX_NUM_SECTIONS = 32
SIGNATURE_MAX_SIZE = 32768
EIF_HDR_ARCH_ARM64 = 0x1
DEFAULT_MEM = 1 << 30
DEFAULT_CPUS = 2
# Sections that are parsed in memory get sane caps, so a hostile size cannot make us allocate GiBs.
CMDLINE_MAX_SIZE = 1 << 20
METADATA_MAX_SIZE = 16 << 20
# nitro-cli 1.4.x (sha2 0.9) prints this Debug string; every AWS doc example shows it.
HASH_ALGORITHM = "Sha384 { ... }"
PCR_ZERO = bytes(48)
EMPTY_PCR = hashlib.sha384(PCR_ZERO + hashlib.sha384(b"").digest()).hexdigest()
METADATA_KEYS = ("ImageName", "ImageVersion", "BuildMetadata", "DockerInfo", "CustomMetadata")
BUILD_INFO_KEYS = ("BuildTime", "BuildTool", "BuildToolVersion", "OperatingSystem", "KernelVersion")
# The emulator's extra BuildMetadata key: `true` when the EIF was built from its placeholder kernel/init,
# which boot nowhere but under the emulator. nitro-cli's reader ignores unknown keys (EifBuildInfo has no
# deny_unknown_fields: aws-nitro-enclaves-image-format src/defs/mod.rs @935dc62), so the EIF stays valid.
PLACEHOLDER_BLOBS_KEY = "PlaceholderBlobs"

_HEADER_STRUCT = struct.Struct(">4sHHQQHH32Q32QII")
SECTION_STRUCT = struct.Struct(">HHQ")
CHUNK_SIZE = 1 << 20
# Below this many bytes the thread hand-off costs more than hashing in the calling thread.
PARALLEL_THRESHOLD = 16 << 20
_QUEUE_DEPTH = 8

if _HEADER_STRUCT.size != HEADER_SIZE or SECTION_STRUCT.size != SECTION_HEADER_SIZE:
    raise AssertionError("EIF header struct layouts disagree with HEADER_SIZE / SECTION_HEADER_SIZE")


class EifError(ValueError):
    """The file is not a valid EIF (or an input to the writer is invalid); the message says what."""


class EifCrcError(EifError):
    """The header CRC32 does not match the file content."""


class SectionType(IntEnum):
    INVALID = 0
    KERNEL = 1
    CMDLINE = 2
    RAMDISK = 3
    SIGNATURE = 4
    METADATA = 5


# ---------------------------------------------------------------------------------------------------------
# PCR helpers (reference §4)


def pcr_extend(register: bytes, data: bytes) -> bytes:
    """One TPM-style extend: SHA384(register || data)."""
    return hashlib.sha384(register + data).digest()


def pcr_from_digest(digest: bytes) -> str:
    """PCR of content whose SHA-384 is `digest`: SHA384(0^48 || digest), lowercase hex."""
    return pcr_extend(PCR_ZERO, digest).hex()


def pcr_of_bytes(data: bytes) -> str:
    """PCR of in-memory content, as nitro-cli measures an EIF section or `pcr --input`."""
    return pcr_from_digest(hashlib.sha384(data).digest())


def pcr_of_file(path: str | os.PathLike[str]) -> str:
    """`nitro-cli pcr --input FILE`: SHA384(0^48 || SHA384(file)), streamed."""
    with open(path, "rb") as handle:
        return pcr_from_digest(hashlib.file_digest(handle, "sha384").digest())


def pcr3_from_role_arn(role_arn: str) -> str:
    """PCR3 of an enclave on an instance whose profile role is `role_arn` (the raw ARN string is extended)."""
    return pcr_extend(PCR_ZERO, role_arn.encode("utf-8")).hex()


def pcr4_from_instance_id(instance_id: str) -> str:
    """PCR4 of an enclave on parent instance `instance_id` (the raw id string is extended)."""
    return pcr_extend(PCR_ZERO, instance_id.encode("utf-8")).hex()


def pem_to_der(pem: bytes | str) -> bytes:
    """DER bytes of the first CERTIFICATE block of a PEM text (stdlib only; no X.509 parsing)."""
    text = pem.decode("ascii", "replace") if isinstance(pem, bytes | bytearray) else pem
    match = re.search(r"-----BEGIN CERTIFICATE-----(.*?)-----END CERTIFICATE-----", text, re.S)
    if not match:
        raise EifError("signing certificate is not a PEM CERTIFICATE")
    body = "".join(match.group(1).split())
    try:
        der = base64.b64decode(body, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise EifError(f"signing certificate PEM has invalid base64: {exc}") from None
    # A DER certificate is a SEQUENCE (0x30); anything else is not a certificate.
    if not der or der[0] != 0x30:
        raise EifError("signing certificate PEM does not contain a DER SEQUENCE")
    return der


def pcr8_from_certificate(pem: bytes | str) -> str:
    """PCR8 as `nitro-cli pcr --signing-certificate`: extend over the certificate's DER."""
    return pcr_of_bytes(pem_to_der(pem))


def certificate_sha384(pem: bytes | str) -> str:
    """SHA-384 fingerprint of a PEM certificate (over its DER), lowercase hex; PCR8 is the extend of it."""
    return hashlib.sha384(pem_to_der(pem)).hexdigest()


def measurements_dict(pcrs: Mapping[str, str]) -> dict[str, str]:
    """nitro-cli's Measurements map (BTreeMap order: HashAlgorithm, PCR0, PCR1, PCR2[, PCR8])."""
    out = {"HashAlgorithm": HASH_ALGORITHM}
    for key in ("PCR0", "PCR1", "PCR2", "PCR8"):
        if key in pcrs:
            out[key] = pcrs[key]
    return out


# ---------------------------------------------------------------------------------------------------------
# Minimal CBOR for the signature section (serde_cbor encodes Vec<u8> as an array of uints, §3.1)


def _cbor_head(major: int, value: int) -> bytes:
    if value < 24:
        return bytes([(major << 5) | value])
    for info, fmt in ((24, ">B"), (25, ">H"), (26, ">I"), (27, ">Q")):
        if value < (1 << (8 * struct.calcsize(fmt))):
            return bytes([(major << 5) | info]) + struct.pack(fmt, value)
    raise EifError("CBOR value too large")


def _cbor_text(text: str) -> bytes:
    raw = text.encode("utf-8")
    return _cbor_head(3, len(raw)) + raw


def cbor_bytes(data: bytes) -> bytes:
    """A CBOR byte string (major type 2), as COSE encodes its bstr fields."""
    return _cbor_head(2, len(data)) + data


def _cbor_byte_array(data: bytes) -> bytes:
    return _cbor_head(4, len(data)) + b"".join(_cbor_head(0, b) for b in data)


def pcr_info_payload(pcr_hex: str, register_index: int = 0) -> bytes:
    """The signed payload: serde-CBOR of PcrInfo{register_index, register_value: raw PCR bytes}."""
    return (
        _cbor_head(5, 2)
        + _cbor_text("register_index")
        + _cbor_head(0, register_index)
        + _cbor_text("register_value")
        + _cbor_byte_array(bytes.fromhex(pcr_hex))
    )


@dataclass(frozen=True)
class PcrSignature:
    """One element of the signature section: PEM certificate bytes and an untagged COSE_Sign1."""

    signing_certificate: bytes
    signature: bytes


def encode_signature_section(signatures: Sequence[PcrSignature]) -> bytes:
    """Serialize the signature section exactly as serde_cbor does (reference §3.1 vectors)."""
    out = [_cbor_head(4, len(signatures))]
    for sig in signatures:
        out.append(_cbor_head(5, 2))
        out.append(_cbor_text("signing_certificate") + _cbor_byte_array(sig.signing_certificate))
        out.append(_cbor_text("signature") + _cbor_byte_array(sig.signature))
    data = b"".join(out)
    if len(data) > SIGNATURE_MAX_SIZE:
        raise EifError(f"signature section is {len(data)} bytes, more than the {SIGNATURE_MAX_SIZE} allowed")
    return data


class _CborReader:
    """Strict, bounded decoder for the CBOR subset in EIF signatures (no tags, no indefinite lengths)."""

    MAX_DEPTH = 16

    def __init__(self, data: bytes) -> None:
        self.data = data
        self.pos = 0

    def _take(self, n: int) -> bytes:
        if n > len(self.data) - self.pos:
            raise EifError("signature section: CBOR value runs past the end of the section")
        chunk = self.data[self.pos : self.pos + n]
        self.pos += n
        return chunk

    def _head(self) -> tuple[int, int]:
        first = self._take(1)[0]
        major, info = first >> 5, first & 0x1F
        if info < 24:
            return major, info
        sizes = {24: 1, 25: 2, 26: 4, 27: 8}
        if info not in sizes:
            raise EifError(f"signature section: unsupported CBOR additional info {info}")
        return major, int.from_bytes(self._take(sizes[info]), "big")

    def value(self, depth: int = 0) -> Any:
        if depth > self.MAX_DEPTH:
            raise EifError("signature section: CBOR nested too deeply")
        major, arg = self._head()
        if major == 0:
            return arg
        if major == 1:
            return -1 - arg
        if major in (2, 3):
            raw = self._take(arg)
            if major == 2:
                return raw
            try:
                return raw.decode("utf-8")
            except UnicodeDecodeError:
                raise EifError("signature section: CBOR text is not UTF-8") from None
        if major in (4, 5):
            # Every item takes at least one byte: a count larger than what is left is bogus.
            items = arg * (2 if major == 5 else 1)
            if items > len(self.data) - self.pos:
                raise EifError(f"signature section: CBOR claims {arg} items, more than the data holds")
            if major == 4:
                return [self.value(depth + 1) for _item in range(arg)]
            out: dict[Any, Any] = {}
            for _item in range(arg):
                key = self.value(depth + 1)
                if not isinstance(key, str | int):
                    raise EifError("signature section: CBOR map key must be text or integer")
                out[key] = self.value(depth + 1)
            return out
        if major == 7 and arg in (20, 21, 22):
            return {20: False, 21: True, 22: None}[arg]
        raise EifError(f"signature section: unsupported CBOR major type {major}")


def cbor_value(data: bytes) -> Any:
    """Decode one CBOR value of the subset EIF signatures use; EifError on anything else or trailing bytes."""
    reader = _CborReader(data)
    value = reader.value()
    if reader.pos != len(data):
        raise EifError(f"{len(data) - reader.pos} trailing bytes after the CBOR value")
    return value


def _byte_array(value: Any, what: str) -> bytes:
    if isinstance(value, bytes):
        return value
    if isinstance(value, list) and all(isinstance(b, int) and 0 <= b <= 255 for b in value):
        return bytes(value)
    raise EifError(f"signature section: {what} is not a byte array")


def decode_signature_section(data: bytes) -> list[PcrSignature]:
    """Parse the signature section into PcrSignature entries (at least one)."""
    reader = _CborReader(data)
    value = reader.value()
    if reader.pos != len(data):
        raise EifError(f"signature section: {len(data) - reader.pos} trailing bytes after the CBOR value")
    if not isinstance(value, list) or not value:
        raise EifError("signature section: expected a non-empty CBOR array of signatures")
    out = []
    for item in value:
        if not isinstance(item, dict) or {"signing_certificate", "signature"} - item.keys():
            raise EifError("signature section: entry lacks signing_certificate/signature")
        out.append(
            PcrSignature(
                signing_certificate=_byte_array(item["signing_certificate"], "signing_certificate"),
                signature=_byte_array(item["signature"], "signature"),
            )
        )
    return out


# ---------------------------------------------------------------------------------------------------------
# Header


@dataclass(frozen=True)
class EifHeader:
    version: int = CURRENT_VERSION
    flags: int = 0
    default_mem: int = DEFAULT_MEM
    default_cpus: int = DEFAULT_CPUS
    reserved: int = 0
    num_sections: int = 0
    section_offsets: tuple[int, ...] = (0,) * MAX_NUM_SECTIONS
    section_sizes: tuple[int, ...] = (0,) * MAX_NUM_SECTIONS
    unused: int = 0
    crc32: int = 0
    magic: bytes = EIF_MAGIC

    def pack(self) -> bytes:
        return _HEADER_STRUCT.pack(
            self.magic,
            self.version,
            self.flags,
            self.default_mem,
            self.default_cpus,
            self.reserved,
            self.num_sections,
            *self.section_offsets,
            *self.section_sizes,
            self.unused,
            self.crc32,
        )

    @classmethod
    def unpack(cls, raw: bytes) -> EifHeader:
        if len(raw) != HEADER_SIZE:
            raise EifError(f"truncated EIF header: {len(raw)} bytes, need {HEADER_SIZE}")
        fields = _HEADER_STRUCT.unpack(raw)
        return cls(
            magic=fields[0],
            version=fields[1],
            flags=fields[2],
            default_mem=fields[3],
            default_cpus=fields[4],
            reserved=fields[5],
            num_sections=fields[6],
            section_offsets=tuple(fields[7:39]),
            section_sizes=tuple(fields[39:71]),
            unused=fields[71],
            crc32=fields[72],
        )

    @property
    def arch(self) -> str:
        return "aarch64" if self.flags & EIF_HDR_ARCH_ARM64 else "x86_64"


@dataclass(frozen=True)
class EifSection:
    index: int
    type: SectionType
    offset: int  # of the 12-byte section header, as in the header's section_offsets
    size: int  # data only
    flags: int = 0

    @property
    def data_offset(self) -> int:
        return self.offset + SECTION_HEADER_SIZE


# ---------------------------------------------------------------------------------------------------------
# Streaming measurement (shared by the reader and the writer)


class _Worker:
    """A thread that feeds chunks to hashers; hashlib/zlib release the GIL on large buffers."""

    def __init__(self) -> None:
        self.jobs: queue.Queue[tuple[Callable[[bytes], object], bytes] | None] = queue.Queue(_QUEUE_DEPTH)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            job[0](job[1])

    def stop(self) -> None:
        self.jobs.put(None)
        self.thread.join()


class _Crc:
    def __init__(self) -> None:
        self.value = 0

    def update(self, data: bytes) -> None:
        self.value = zlib.crc32(data, self.value)


class Measurer:
    """Feeds PCR0/PCR1/PCR2/CRC (and optionally a whole-file SHA-384) in file order.

    PCR0 gets its own thread and PCR1+PCR2+CRC share another, so two cores hash a large ramdisk
    (which goes into both PCR0 and PCR2) about as fast as one SHA-384 pass.
    """

    def __init__(self, parallel: bool, file_digest: bool = False) -> None:
        self.pcr0 = hashlib.sha384()
        self.pcr1 = hashlib.sha384()
        self.pcr2 = hashlib.sha384()
        self.crc = _Crc()
        self.file = hashlib.sha384() if file_digest else None
        self.workers = [_Worker(), _Worker()] + ([_Worker()] if file_digest else []) if parallel else []

    def _run(self, lane: int, func: Callable[[bytes], object], data: bytes) -> None:
        if self.workers:
            self.workers[lane].jobs.put((func, data))
        else:
            func(data)

    def raw(self, data: bytes, crc: bool = True) -> None:
        """Bytes that are in the file (and the CRC unless told otherwise) but in no PCR."""
        if crc:
            self._run(1, self.crc.update, data)
        if self.file is not None:
            self._run(2, self.file.update, data)

    def section_data(self, kind: SectionType, first_ramdisk: bool, data: bytes) -> None:
        self.raw(data)
        if kind in (SectionType.KERNEL, SectionType.CMDLINE) or (kind == SectionType.RAMDISK and first_ramdisk):
            self._run(0, self.pcr0.update, data)
            self._run(1, self.pcr1.update, data)
        elif kind == SectionType.RAMDISK:
            self._run(0, self.pcr0.update, data)
            self._run(1, self.pcr2.update, data)

    def close(self) -> None:
        """Wait for the threads; must run even when reading failed half way."""
        for worker in self.workers:
            worker.stop()
        self.workers = []

    def pcrs(self) -> dict[str, str]:
        return {
            "PCR0": pcr_from_digest(self.pcr0.digest()),
            "PCR1": pcr_from_digest(self.pcr1.digest()),
            "PCR2": pcr_from_digest(self.pcr2.digest()),
        }


def use_parallel(parallel: bool | None, total: int) -> bool:
    if parallel is None:
        return total >= PARALLEL_THRESHOLD and (os.cpu_count() or 1) > 1
    return parallel


# ---------------------------------------------------------------------------------------------------------
# Metadata (reference §2)


def sorted_json(value: Any) -> Any:
    """serde_json::Value objects serialize with sorted keys (no preserve_order)."""
    if isinstance(value, Mapping):
        return {k: sorted_json(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [sorted_json(v) for v in value]
    return value


def rfc3339(when: datetime.datetime | float | int | None = None) -> str:
    """chrono's to_rfc3339 for UTC: `YYYY-MM-DDTHH:MM:SS[.fff|.ffffff]+00:00` (AutoSi fraction)."""
    if when is None:
        when = datetime.datetime.now(datetime.UTC)
    elif not isinstance(when, datetime.datetime):
        when = datetime.datetime.fromtimestamp(when, datetime.UTC)
    when = when.astimezone(datetime.UTC)
    text = when.strftime("%Y-%m-%dT%H:%M:%S")
    if when.microsecond:
        text += f".{when.microsecond // 1000:03d}" if when.microsecond % 1000 == 0 else f".{when.microsecond:06d}"
    return text + "+00:00"


def build_info_from_kernel_config(
    config_text: str, *, build_time: str, build_tool: str, build_tool_version: str
) -> dict[str, str]:
    """BuildMetadata as nitro-cli derives it: OS and kernel version from line 3 of `<kernel>.config`."""
    lines = config_text.splitlines()
    tokens = re.split(r"[ /-]", lines[2]) if len(lines) > 2 else []
    return {
        "BuildTime": build_time,
        "BuildTool": build_tool,
        "BuildToolVersion": build_tool_version,
        "OperatingSystem": tokens[1] if len(tokens) > 1 else "Unknown",
        "KernelVersion": tokens[3] if len(tokens) > 3 else "Unknown",
    }


def make_metadata(
    image_name: str,
    image_version: str,
    build_info: Mapping[str, str],
    docker_info: Any = None,
    custom_metadata: Any = None,
    *,
    placeholder_blobs: bool = False,
) -> dict[str, Any]:
    missing = [k for k in BUILD_INFO_KEYS if k not in build_info]
    if missing:
        raise EifError(f"build info lacks {', '.join(missing)}")
    build: dict[str, Any] = {k: build_info[k] for k in BUILD_INFO_KEYS}
    if placeholder_blobs:
        build[PLACEHOLDER_BLOBS_KEY] = True
    return {
        "ImageName": image_name,
        "ImageVersion": image_version,
        "BuildMetadata": build,
        "DockerInfo": docker_info,
        "CustomMetadata": custom_metadata,
    }


def metadata_bytes(metadata: Mapping[str, Any]) -> bytes:
    """Compact JSON in EifIdentityInfo field order, nested JSON values with sorted keys (like serde_json)."""
    missing = [k for k in METADATA_KEYS if k not in metadata]
    if missing:
        raise EifError(f"metadata lacks {', '.join(missing)}")
    build = metadata["BuildMetadata"]
    if not isinstance(build, Mapping) or any(not isinstance(build.get(k), str) for k in BUILD_INFO_KEYS):
        raise EifError("metadata BuildMetadata must hold the five build-info strings")
    ordered = {
        "ImageName": metadata["ImageName"],
        "ImageVersion": metadata["ImageVersion"],
        # Declared fields first, in order, then the emulator's marker (serde writes declared fields only).
        "BuildMetadata": {k: build[k] for k in (*BUILD_INFO_KEYS, PLACEHOLDER_BLOBS_KEY) if k in build},
        "DockerInfo": sorted_json(metadata["DockerInfo"]),
        "CustomMetadata": sorted_json(metadata["CustomMetadata"]),
    }
    return json.dumps(ordered, separators=(",", ":"), ensure_ascii=False).encode("utf-8")


def parse_metadata(data: bytes) -> dict[str, Any]:
    try:
        value = json.loads(data.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise EifError(f"metadata section is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise EifError("metadata section is not a JSON object")
    missing = [k for k in METADATA_KEYS if k not in value]
    if missing:
        raise EifError(f"metadata section lacks required key(s): {', '.join(missing)}")
    if not isinstance(value["ImageName"], str) or not isinstance(value["ImageVersion"], str):
        raise EifError("metadata ImageName/ImageVersion must be strings")
    build = value["BuildMetadata"]
    if not isinstance(build, dict) or any(not isinstance(build.get(k), str) for k in BUILD_INFO_KEYS):
        raise EifError("metadata BuildMetadata must hold the five build-info strings")
    return value


# ---------------------------------------------------------------------------------------------------------
# Reader (reference §1.8, but strict: the header table must describe exactly what is in the file)


@dataclass
class EifImage:
    """A parsed and measured EIF. Section data of kernel/ramdisks stays on disk; see `open_section`."""

    path: Path
    header: EifHeader
    sections: list[EifSection]
    file_size: int
    crc_computed: int
    pcrs: dict[str, str]
    cmdline: bytes = b""
    metadata: dict[str, Any] | None = None
    signature_section: bytes | None = None
    signatures: list[PcrSignature] = field(default_factory=list)
    file_sha384: str | None = None

    @property
    def crc_ok(self) -> bool:
        return self.crc_computed == self.header.crc32

    @property
    def is_signed(self) -> bool:
        return self.signature_section is not None

    @property
    def measurements(self) -> dict[str, str]:
        return measurements_dict(self.pcrs)

    def sections_of(self, kind: SectionType) -> list[EifSection]:
        return [s for s in self.sections if s.type == kind]

    @property
    def kernel(self) -> EifSection:
        return self.sections_of(SectionType.KERNEL)[0]

    @property
    def ramdisks(self) -> list[EifSection]:
        return self.sections_of(SectionType.RAMDISK)

    @property
    def customer_ramdisks(self) -> list[EifSection]:
        """The application ramdisks (everything after the bootstrap ramdisk; those are in PCR2)."""
        return self.ramdisks[1:]

    def open_section(self, section: EifSection) -> BinaryIO:
        """A read-only file object limited to the section's data."""
        return SectionFile(self.path, section.data_offset, section.size)

    def read_section(self, section: EifSection, max_size: int = 64 << 20) -> bytes:
        if section.size > max_size:
            raise EifError(f"section {section.index} is {section.size} bytes, over the {max_size} limit")
        with self.open_section(section) as handle:
            return handle.read()

    def copy_section(self, section: EifSection, dest: IO[bytes]) -> None:
        with self.open_section(section) as handle:
            while chunk := handle.read(CHUNK_SIZE):
                dest.write(chunk)

    def check_crc(self) -> None:
        if not self.crc_ok:
            raise EifCrcError(
                f"{self.path}: CRC32 mismatch: header says {self.header.crc32:#010x}, "
                f"content gives {self.crc_computed:#010x}"
            )


class SectionFile(io.RawIOBase):
    """A window [start, start+size) of a file, so consumers can never read past a section."""

    def __init__(self, path: Path, start: int, size: int) -> None:
        super().__init__()
        self._handle = open(path, "rb")  # noqa: SIM115 - closed by close()
        self._handle.seek(start)
        self._left = size

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        want = min(len(view), self._left)
        if want == 0:
            return 0
        got = self._handle.readinto(view[:want]) or 0
        if got == 0:
            raise EifError("EIF file shrank while reading a section")
        self._left -= got
        return got

    def close(self) -> None:
        self._handle.close()
        super().close()


def _read_exact(handle: BinaryIO, size: int, what: str) -> bytes:
    data = handle.read(size)
    if len(data) != size:
        raise EifError(f"truncated EIF: {what} needs {size} bytes, only {len(data)} left")
    return data


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
               (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))  # fmt: skip


def open_regular(path: str | os.PathLike[str]) -> BinaryIO:
    """Open an EIF for reading, refusing anything but a regular file (EifError) before reading a byte.

    O_NONBLOCK: opening a FIFO would otherwise wait for a writer forever; it changes nothing for files."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as exc:
        raise EifError(f"cannot open EIF {path}: {exc.strerror or exc}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        kind = next((name for test, name in _FILE_KINDS if test(mode)), "not a file")
        raise EifError(f"{path} is not a regular file ({kind}): an EIF must be one")
    os.set_blocking(fd, True)
    return os.fdopen(fd, "rb")


def read_eif(
    path: str | os.PathLike[str],
    *,
    check_crc: bool = True,
    parallel: bool | None = None,
    file_digest: bool = False,
) -> EifImage:
    """Parse, validate and measure an EIF in one streaming pass.

    check_crc: raise EifCrcError on a CRC mismatch (describe-eif passes False and reports CheckCRC).
    parallel: hash on worker threads (default: for files ≥ 16 MiB on multi-core hosts).
    file_digest: also compute the SHA-384 of the whole file (the measurements artifact's EifSha384).
    """
    path = Path(path)
    handle = open_regular(path)
    try:
        file_size = os.fstat(handle.fileno()).st_size
        measurer = Measurer(use_parallel(parallel, file_size), file_digest)
        try:
            image = _walk(path, handle, file_size, measurer)
        finally:
            measurer.close()
        image.crc_computed = measurer.crc.value
        image.pcrs.update(measurer.pcrs())
        if measurer.file is not None:
            image.file_sha384 = measurer.file.hexdigest()
    except OSError as exc:
        raise EifError(f"cannot read EIF {path}: {exc.strerror or exc}") from None
    finally:
        handle.close()
    if image.signatures:
        image.pcrs["PCR8"] = pcr8_from_certificate(image.signatures[0].signing_certificate)
    if check_crc:
        image.check_crc()
    return image


def _walk(path: Path, handle: BinaryIO, file_size: int, measurer: Measurer) -> EifImage:
    if file_size < HEADER_SIZE:
        raise EifError(f"truncated EIF header: file is {file_size} bytes, the header alone is {HEADER_SIZE}")
    raw_header = _read_exact(handle, HEADER_SIZE, "header")
    header = EifHeader.unpack(raw_header)
    if header.magic != EIF_MAGIC:
        raise EifError(f"not an EIF: magic is {header.magic!r}, expected {EIF_MAGIC!r}")
    if header.version not in SUPPORTED_VERSIONS:
        raise EifError(f"unsupported EIF version {header.version} (supported: 2, 3, 4)")
    if not 2 <= header.num_sections <= MAX_NUM_SECTIONS:
        raise EifError(f"invalid section count {header.num_sections} (must be 2..{MAX_NUM_SECTIONS})")
    measurer.raw(raw_header[:CRC_OFFSET])
    measurer.raw(raw_header[CRC_OFFSET:], crc=False)

    image = EifImage(path=path, header=header, sections=[], file_size=file_size, crc_computed=0, pcrs={})
    pos = HEADER_SIZE
    seen_ramdisk = False
    for index in range(header.num_sections):
        if header.section_offsets[index] != pos:
            raise EifError(
                f"section {index}: header table says offset {header.section_offsets[index]}, "
                f"but the previous section ends at {pos}"
            )
        if pos + SECTION_HEADER_SIZE > file_size:
            raise EifError(f"truncated EIF: section {index} header at {pos} is past the end of file ({file_size})")
        raw_section = _read_exact(handle, SECTION_HEADER_SIZE, f"section {index} header")
        kind_value, flags, size = SECTION_STRUCT.unpack(raw_section)
        if kind_value == SectionType.INVALID or kind_value > max(SectionType):
            raise EifError(f"section {index}: invalid section type {kind_value}")
        kind = SectionType(kind_value)
        if size != header.section_sizes[index]:
            raise EifError(
                f"section {index} ({kind.name.lower()}): size {size} differs from the header table's "
                f"{header.section_sizes[index]}"
            )
        if size > file_size - pos - SECTION_HEADER_SIZE:
            raise EifError(
                f"section {index} ({kind.name.lower()}) claims {size} bytes but only "
                f"{file_size - pos - SECTION_HEADER_SIZE} remain in the file"
            )
        limits = {
            SectionType.CMDLINE: CMDLINE_MAX_SIZE,
            SectionType.METADATA: METADATA_MAX_SIZE,
            SectionType.SIGNATURE: SIGNATURE_MAX_SIZE,
        }
        if kind in limits and size > limits[kind]:
            raise EifError(f"section {index} ({kind.name.lower()}) is {size} bytes, over its {limits[kind]} limit")
        measurer.raw(raw_section)
        section = EifSection(index=index, type=kind, offset=pos, size=size, flags=flags)
        image.sections.append(section)
        first_ramdisk = kind == SectionType.RAMDISK and not seen_ramdisk
        keep = kind in limits
        kept: list[bytes] = []
        left = size
        while left:
            chunk = handle.read(min(CHUNK_SIZE, left))
            if not chunk:
                raise EifError(f"truncated EIF: section {index} data ends early")
            left -= len(chunk)
            measurer.section_data(kind, first_ramdisk, chunk)
            if keep:
                kept.append(chunk)
        seen_ramdisk = seen_ramdisk or kind == SectionType.RAMDISK
        data = b"".join(kept)
        if kind == SectionType.CMDLINE:
            image.cmdline = data
        elif kind == SectionType.METADATA:
            image.metadata = parse_metadata(data)
        elif kind == SectionType.SIGNATURE:
            image.signature_section = data
            image.signatures = decode_signature_section(data)
        pos += SECTION_HEADER_SIZE + size
    if pos != file_size:
        raise EifError(f"{file_size - pos} unexpected bytes after the last section (ends at {pos})")
    _check_structure(image)
    return image


def _check_structure(image: EifImage) -> None:
    counts = {kind: len(image.sections_of(kind)) for kind in SectionType}
    problems = []
    if counts[SectionType.KERNEL] != 1:
        problems.append(f"{counts[SectionType.KERNEL]} kernel sections (need exactly 1)")
    if counts[SectionType.CMDLINE] != 1:
        problems.append(f"{counts[SectionType.CMDLINE]} cmdline sections (need exactly 1)")
    if counts[SectionType.RAMDISK] < 1:
        problems.append("no ramdisk section")
    if counts[SectionType.SIGNATURE] > 1:
        problems.append(f"{counts[SectionType.SIGNATURE]} signature sections (at most 1)")
    if counts[SectionType.METADATA] > 1:
        problems.append(f"{counts[SectionType.METADATA]} metadata sections (at most 1)")
    if image.header.version >= 4 and counts[SectionType.METADATA] == 0:
        problems.append("no metadata section (mandatory in EIF v4)")
    if counts[SectionType.KERNEL] == 1 and image.ramdisks and image.ramdisks[0].index < image.kernel.index:
        problems.append("a ramdisk precedes the kernel")
    if problems:
        raise EifError("invalid EIF structure: " + "; ".join(problems))


def measure_eif(path: str | os.PathLike[str], *, check_crc: bool = True, parallel: bool | None = None) -> dict:
    """The `Measurements` map of an EIF (as build-enclave / describe-eif print it)."""
    return read_eif(path, check_crc=check_crc, parallel=parallel).measurements


def describe_eif(
    path: str | os.PathLike[str],
    *,
    certificate_inspector: Callable[[PcrSignature, str], tuple[dict[str, Any], bool]] | None = None,
    parallel: bool | None = None,
) -> dict[str, Any]:
    """nitro-cli `describe-eif` JSON object, keys in nitro-cli's order (reference §5.4).

    X.509 parsing and COSE verification need `cryptography`, which this stdlib-only module does not
    import: for signed images pass `certificate_inspector(signature, pcr0_hex)` returning
    (SigningCertificate dict, SignatureCheck bool) and raising EifError for an invalid signature.
    Without it, a signed image's SigningCertificate and SignatureCheck keys are left out.
    """
    image = read_eif(path, check_crc=False, parallel=parallel)
    out: dict[str, Any] = {"EifVersion": image.header.version, "Measurements": image.measurements}
    out["IsSigned"] = image.is_signed
    check: bool | None = None
    if image.is_signed and certificate_inspector is not None:
        out["SigningCertificate"], check = certificate_inspector(image.signatures[0], image.pcrs["PCR0"])
    out["CheckCRC"] = image.crc_ok
    if check is not None:
        out["SignatureCheck"] = check
    if image.metadata is not None:
        out["ImageName"] = image.metadata["ImageName"]
        out["ImageVersion"] = image.metadata["ImageVersion"]
        out["Metadata"] = metadata_describe(image.metadata)
    return out


def metadata_describe(metadata: Mapping[str, Any]) -> dict[str, Any]:
    """The `Metadata` object of describe-eif/describe-enclaves: build info, DockerInfo, custom keys flattened."""
    out: dict[str, Any] = {k: metadata["BuildMetadata"][k] for k in BUILD_INFO_KEYS}
    out["DockerInfo"] = sorted_json(metadata["DockerInfo"])
    custom = metadata.get("CustomMetadata")
    if custom is not None:
        if not isinstance(custom, Mapping):
            raise EifError("CustomMetadata is not a JSON object and cannot be flattened into Metadata")
        for key in sorted(custom):
            out[key] = sorted_json(custom[key])
    return out


def ramdisk_windows(image: EifImage) -> list[tuple[int, int]]:
    """(data offset, size) of each application ramdisk: what extract_ramdisk_windows needs."""
    return [(section.data_offset, section.size) for section in image.customer_ramdisks]
