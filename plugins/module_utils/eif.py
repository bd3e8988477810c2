"""Enclave Image File (EIF) v4: read, measure, write; deterministic cpio ramdisks; runtime PCR helpers.

The one implementation shared by the Ansible modules (on hosts: standard library only), the nitro-cli
emulator and the tests. Byte layout and measurement rules follow nitro-cli / aws-nitro-enclaves-image-format
(reference nitro-cli-and-eif.md §1-4):

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
import contextlib
import datetime
import gzip
import hashlib
import io
import json
import os
import platform
import queue
import re
import stat
import struct
import tempfile
import threading
import zlib
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import IO, Any, BinaryIO, Union

# Reading gzip ramdisks (an emulated boot inflates the whole application ramdisk): ISA-L inflates about
# 2x faster than zlib when the `isal` package is there (emulated hosts install it). Writing always uses
# zlib: the EIF's bytes, and so its PCRs, must not depend on which library a build host has.
try:
    from isal import igzip as _inflating_gzip
    from isal import isal_zlib as _isal_zlib

    _INFLATE_ERRORS: tuple[type[BaseException], ...] = (EOFError, OSError, zlib.error, _isal_zlib.error)
except ImportError:  # zlib it is
    _inflating_gzip = gzip  # type: ignore[assignment]
    _INFLATE_ERRORS = (EOFError, OSError, zlib.error)

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
_SECTION_STRUCT = struct.Struct(">HHQ")
CHUNK_SIZE = 1 << 20
# Below this many bytes the thread hand-off costs more than hashing in the calling thread.
PARALLEL_THRESHOLD = 16 << 20
_QUEUE_DEPTH = 8

if _HEADER_STRUCT.size != HEADER_SIZE or _SECTION_STRUCT.size != SECTION_HEADER_SIZE:
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


class _Measurer:
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


def _use_parallel(parallel: bool | None, total: int) -> bool:
    if parallel is None:
        return total >= PARALLEL_THRESHOLD and (os.cpu_count() or 1) > 1
    return parallel


# ---------------------------------------------------------------------------------------------------------
# Metadata (reference §2)


def _sorted_json(value: Any) -> Any:
    """serde_json::Value objects serialize with sorted keys (no preserve_order)."""
    if isinstance(value, Mapping):
        return {k: _sorted_json(value[k]) for k in sorted(value)}
    if isinstance(value, list | tuple):
        return [_sorted_json(v) for v in value]
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
        "DockerInfo": _sorted_json(metadata["DockerInfo"]),
        "CustomMetadata": _sorted_json(metadata["CustomMetadata"]),
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
        return _SectionFile(self.path, section.data_offset, section.size)

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


class _SectionFile(io.RawIOBase):
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
        measurer = _Measurer(_use_parallel(parallel, file_size), file_digest)
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


def _walk(path: Path, handle: BinaryIO, file_size: int, measurer: _Measurer) -> EifImage:
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
        kind_value, flags, size = _SECTION_STRUCT.unpack(raw_section)
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
    out["DockerInfo"] = _sorted_json(metadata["DockerInfo"])
    custom = metadata.get("CustomMetadata")
    if custom is not None:
        if not isinstance(custom, Mapping):
            raise EifError("CustomMetadata is not a JSON object and cannot be flattened into Metadata")
        for key in sorted(custom):
            out[key] = _sorted_json(custom[key])
    return out


# ---------------------------------------------------------------------------------------------------------
# Writer (reference §1.5, §1.9)

# Union, not |: module_utils are linted for the older Pythons a managed host may have.
Source = Union[bytes, bytearray, memoryview, str, "os.PathLike[str]"]


def _source_size(source: Source) -> int:
    if isinstance(source, bytes | bytearray | memoryview):
        return len(source)
    try:
        return os.stat(source).st_size
    except OSError as exc:
        raise EifError(f"cannot read {source}: {exc.strerror or exc}") from None


def _source_chunks(source: Source, size: int) -> Iterator[bytes]:
    if isinstance(source, bytes | bytearray | memoryview):
        view = memoryview(source)
        for start in range(0, len(view), CHUNK_SIZE):
            yield bytes(view[start : start + CHUNK_SIZE])
        return
    left = size
    with open(source, "rb") as handle:
        while left:
            chunk = handle.read(min(CHUNK_SIZE, left))
            if not chunk:
                break
            left -= len(chunk)
            yield chunk
        if left or handle.read(1):
            raise EifError(f"{source} changed size while the EIF was written")


Signer = Callable[[str], bytes]


def _stream_sections(
    plan: Sequence[tuple[SectionType, Source]], sizes: Sequence[int], measurer: _Measurer, out: IO[bytes] | None
) -> None:
    """Feed (and write, when `out` is given) section headers and data in file order."""
    seen_ramdisk = False
    for (kind, src), size in zip(plan, sizes, strict=True):
        section_header = _SECTION_STRUCT.pack(kind, 0, size)
        if out is not None:
            out.write(section_header)
        measurer.raw(section_header)
        first = kind == SectionType.RAMDISK and not seen_ramdisk
        for chunk in _source_chunks(src, size):
            if out is not None:
                out.write(chunk)
            measurer.section_data(kind, first, chunk)
        seen_ramdisk = seen_ramdisk or kind == SectionType.RAMDISK


def write_eif(
    dest: str | os.PathLike[str],
    *,
    kernel: Source,
    cmdline: str | bytes,
    ramdisks: Sequence[Source],
    metadata: Mapping[str, Any] | bytes,
    flags: int = 0,
    signer: Signer | None = None,
    parallel: bool | None = None,
) -> dict[str, str]:
    """Write an EIF v4 in nitro-cli's layout: kernel, cmdline, metadata, ramdisks..., [signature].

    kernel / ramdisks: bytes or a path (streamed). metadata: the identity dict (serialized like nitro-cli)
    or ready JSON bytes. signer(pcr0_hex) returns the signature section bytes (e.g. from
    `encode_signature_section`). The file is written next to `dest` and renamed into place.
    Returns the PCRs (PCR0, PCR1, PCR2 and PCR8 when signed).
    """
    dest = Path(dest)
    cmdline_bytes = cmdline.encode("utf-8") if isinstance(cmdline, str) else bytes(cmdline)
    if b"\0" in cmdline_bytes:
        raise EifError("cmdline contains a NUL byte")
    if not ramdisks:
        raise EifError("an EIF needs at least one ramdisk")
    meta = bytes(metadata) if isinstance(metadata, bytes | bytearray) else metadata_bytes(metadata)
    parse_metadata(meta)
    plan: list[tuple[SectionType, Source]] = [
        (SectionType.KERNEL, kernel),
        (SectionType.CMDLINE, cmdline_bytes),
        (SectionType.METADATA, meta),
        *((SectionType.RAMDISK, r) for r in ramdisks),
    ]
    sizes = [_source_size(src) for _kind, src in plan]
    if len(plan) + (1 if signer else 0) > MAX_NUM_SECTIONS:
        raise EifError(f"too many sections ({len(plan)}); an EIF holds at most {MAX_NUM_SECTIONS}")
    total = sum(sizes)
    use_parallel = _use_parallel(parallel, total)
    pcrs: dict[str, str] = {}
    if signer is not None:
        # The signature section's size is in the header (and the CRC starts with the header), so the
        # PCR0 it signs must be known before writing: measure the inputs in a first pass.
        probe = _Measurer(use_parallel)
        try:
            _stream_sections(plan, sizes, probe, None)
        finally:
            probe.close()
        signature = signer(probe.pcrs()["PCR0"])
        if len(signature) > SIGNATURE_MAX_SIZE:
            raise EifError(f"signature section is {len(signature)} bytes (max {SIGNATURE_MAX_SIZE})")
        signatures = decode_signature_section(signature)
        pcrs["PCR8"] = pcr8_from_certificate(signatures[0].signing_certificate)
        plan.append((SectionType.SIGNATURE, signature))
        sizes.append(len(signature))

    offsets, pos = [], HEADER_SIZE
    for size in sizes:
        offsets.append(pos)
        pos += SECTION_HEADER_SIZE + size
    pad = MAX_NUM_SECTIONS - len(plan)
    header = EifHeader(
        flags=flags,
        num_sections=len(plan),
        section_offsets=tuple(offsets) + (0,) * pad,
        section_sizes=tuple(sizes) + (0,) * pad,
    )
    raw_header = header.pack()
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
    try:
        measurer = _Measurer(use_parallel)
        try:
            with os.fdopen(fd, "wb") as out:
                out.write(raw_header)
                measurer.raw(raw_header[:CRC_OFFSET])
                _stream_sections(plan, sizes, measurer, out)
                measurer.close()
                out.seek(CRC_OFFSET)
                out.write(struct.pack(">I", measurer.crc.value))
        finally:
            measurer.close()
        os.chmod(tmp_name, 0o644)
        os.replace(tmp_name, dest)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    pcrs.update(measurer.pcrs())
    return {k: pcrs[k] for k in ("PCR0", "PCR1", "PCR2", "PCR8") if k in pcrs}


# ---------------------------------------------------------------------------------------------------------
# Deterministic newc cpio ramdisks


@dataclass(frozen=True)
class CpioEntry:
    """One archive member. `name` is relative ("rootfs/usr/bin/python3"), `mode` includes the type bits.

    Regular files: `data` (bytes) or `opener` (returns a binary file) with `size`. Symlinks: `data` is the
    target. uid/gid are kept as given (they are part of the image); mtimes are always normalized.
    """

    name: str
    mode: int
    data: bytes = b""
    opener: Callable[[], IO[bytes]] | None = None
    size: int | None = None
    uid: int = 0
    gid: int = 0
    rdev_major: int = 0
    rdev_minor: int = 0

    @property
    def file_size(self) -> int:
        if self.opener is not None:
            if self.size is None:
                raise EifError(f"cpio entry {self.name}: opener given without size")
            return self.size
        return len(self.data)


def dir_entry(name: str, mode: int = 0o755, uid: int = 0, gid: int = 0) -> CpioEntry:
    return CpioEntry(name=name, mode=stat.S_IFDIR | (mode & 0o7777), uid=uid, gid=gid)


def file_entry(name: str, data: bytes, mode: int = 0o644, uid: int = 0, gid: int = 0) -> CpioEntry:
    return CpioEntry(name=name, mode=stat.S_IFREG | (mode & 0o7777), data=data, uid=uid, gid=gid)


def path_entry(name: str, path: str | os.PathLike[str], mode: int | None = None) -> CpioEntry:
    """A regular file read from disk when the archive is written (root-owned in the archive)."""
    st = os.stat(path)
    return CpioEntry(
        name=name,
        mode=stat.S_IFREG | ((st.st_mode if mode is None else mode) & 0o7777),
        opener=lambda: open(path, "rb"),
        size=st.st_size,
    )


def normalize_member_name(name: str) -> str:
    """Relative POSIX name without `.`/empty components; rejects `..`, NUL and empty names."""
    if "\0" in name:
        raise EifError(f"archive member name contains NUL: {name!r}")
    parts = [p for p in name.split("/") if p not in ("", ".")]
    if not parts:
        raise EifError(f"empty archive member name: {name!r}")
    if ".." in parts:
        raise EifError(f"archive member escapes the root: {name!r}")
    return "/".join(parts)


def _fsencode(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


def _complete_tree(entries: Iterable[CpioEntry]) -> list[CpioEntry]:
    """Normalize names, reject duplicates, add missing parent directories, sort bytewise."""
    by_name: dict[str, CpioEntry] = {}
    for entry in entries:
        name = normalize_member_name(entry.name)
        if name in by_name:
            raise EifError(f"duplicate archive member {name!r}")
        by_name[name] = entry if name == entry.name else _replace_name(entry, name)
    for name in list(by_name):
        parent = name.rpartition("/")[0]
        while parent and parent not in by_name:
            by_name[parent] = dir_entry(parent)
            parent = parent.rpartition("/")[0]
        if parent and not stat.S_ISDIR(by_name[parent].mode):
            raise EifError(f"archive member {name!r} is below non-directory {parent!r}")
    return [by_name[n] for n in sorted(by_name, key=_fsencode)]


def _replace_name(entry: CpioEntry, name: str) -> CpioEntry:
    from dataclasses import replace

    return replace(entry, name=name)


# newc as linuxkit's cpio writer (surma/gocpio writer.go, vendored in linuxkit @3bf33c3a1) writes it, which
# nitro-cli's ramdisks come from: lowercase hex, inodes from 721 (the trailer takes the next one), device
# 3/1 on every member, the archive padded to 512 bytes after the trailer (nitro_emulator/README.md).
CPIO_FIRST_INODE = 721
CPIO_DEVICE = (3, 1)
CPIO_END_ALIGN = 512
# linuxkit's mtime for the members of a config's `files:` (moby/build/dir.go defaultModTime: 2017-04-18
# 16:30:00 UTC): nitro-cli's bootstrap ramdisk (dev, init, nsm.ko) has it on every member.
LINUXKIT_FILES_MTIME = 1492533000


def _newc_header(ino: int, entry: CpioEntry, *, nlink: int, mtime: int, size: int, namesize: int) -> bytes:
    values = (ino, entry.mode, entry.uid, entry.gid, nlink, mtime, size, *CPIO_DEVICE)
    values += (entry.rdev_major, entry.rdev_minor, namesize, 0)
    if any(v < 0 or v > 0xFFFFFFFF for v in values):
        raise EifError(f"cpio entry {entry.name}: a field does not fit newc's 32 bits")
    return b"070701" + "".join(f"{v:08x}" for v in values).encode("ascii")


def _pad4(length: int) -> bytes:
    return b"\0" * (-length % 4)


def write_cpio(entries: Iterable[CpioEntry], out: IO[bytes], *, mtime: int = 0) -> int:
    """Write a deterministic newc archive: sorted members, fixed mtime, gocpio's fields. Returns bytes written."""
    written = 0
    pending: list[bytes] = []
    pending_size = 0

    def emit(data: bytes) -> None:
        # Batch the many small headers: GzipFile compresses every write() call separately.
        nonlocal written, pending_size
        pending.append(data)
        pending_size += len(data)
        written += len(data)
        if pending_size >= CHUNK_SIZE:
            out.write(b"".join(pending))
            pending.clear()
            pending_size = 0

    ino = CPIO_FIRST_INODE - 1
    for ino, entry in enumerate(_complete_tree(entries), start=CPIO_FIRST_INODE):
        name = _fsencode(entry.name) + b"\0"
        size = entry.file_size if stat.S_ISREG(entry.mode) or stat.S_ISLNK(entry.mode) else 0
        nlink = 2 if stat.S_ISDIR(entry.mode) else 1
        head = _newc_header(ino, entry, nlink=nlink, mtime=mtime, size=size, namesize=len(name)) + name
        emit(head + _pad4(len(head)))
        if not size:
            continue
        if entry.opener is None:
            emit(entry.data)
        else:
            left = size
            with entry.opener() as handle:
                while left:
                    chunk = handle.read(min(CHUNK_SIZE, left))
                    if not chunk:
                        raise EifError(f"cpio entry {entry.name}: source is shorter than {size} bytes")
                    left -= len(chunk)
                    emit(chunk)
        emit(_pad4(size))
    trailer = CpioEntry(name="TRAILER!!!", mode=0)
    name = b"TRAILER!!!\0"
    head = _newc_header(ino + 1, trailer, nlink=1, mtime=0, size=0, namesize=len(name)) + name
    emit(head + _pad4(len(head)))
    emit(b"\0" * (-written % CPIO_END_ALIGN))
    out.write(b"".join(pending))
    return written


def write_ramdisk(
    entries: Iterable[CpioEntry],
    dest: str | os.PathLike[str],
    *,
    compress: bool = True,
    compresslevel: int = 6,
    mtime: int = 0,
) -> Path:
    """A ramdisk file: newc cpio, gzip-compressed with no name and mtime 0 unless `compress=False`.

    Byte-identical for identical input on every host using the same zlib (gzip output is a function
    of the zlib implementation; `compress=False` gives nitro-cli's uncompressed `initrd-nogz` form).
    """
    dest = Path(dest)
    with open(dest, "wb", buffering=CHUNK_SIZE) as raw:
        if compress:
            with gzip.GzipFile(filename="", mode="wb", fileobj=raw, compresslevel=compresslevel, mtime=0) as gz:
                write_cpio(entries, gz, mtime=mtime)
        else:
            write_cpio(entries, raw, mtime=mtime)
    return dest


# ---------------------------------------------------------------------------------------------------------
# cpio reading / safe extraction

MAX_NAME_SIZE = 4096


@dataclass(frozen=True)
class CpioMember:
    name: str  # normalized relative name
    mode: int
    uid: int
    gid: int
    nlink: int
    mtime: int
    size: int
    ino: int
    rdev_major: int
    rdev_minor: int


@dataclass
class ExtractResult:
    files: int = 0
    directories: int = 0
    symlinks: int = 0
    bytes: int = 0
    skipped: list[str] = field(default_factory=list)  # device nodes, fifos, sockets (never created)


class _Stream:
    """Reads from a file object while tracking the offset (for newc 4-byte alignment)."""

    def __init__(self, handle: IO[bytes]) -> None:
        self.handle = handle
        self.pos = 0

    def read(self, size: int) -> bytes:
        try:
            data = self.handle.read(size)
        except _INFLATE_ERRORS as exc:  # truncated or corrupt gzip
            raise EifError(f"ramdisk is corrupt: {exc}") from None
        self.pos += len(data)
        return data

    def exact(self, size: int, what: str) -> bytes:
        data = b""
        while len(data) < size:
            chunk = self.read(size - len(data))
            if not chunk:
                raise EifError(f"truncated cpio archive: {what}")
            data += chunk
        return data

    def align(self) -> None:
        self.exact(-self.pos % 4, "padding")


def iter_cpio(handle: IO[bytes]) -> Iterator[tuple[CpioMember, Callable[[int], bytes]]]:
    """Iterate newc members (several concatenated archives allowed, as the kernel does).

    Yields (member, read) where read(n) returns up to n bytes of that member's data; unread data
    is skipped when iteration continues.
    """
    stream = _Stream(handle)
    while True:
        # Members start 4-byte aligned; the kernel skips zero words between concatenated archives.
        word = stream.read(4)
        if word == b"\0\0\0\0":
            continue
        if word.strip(b"\0") == b"":
            return  # end of stream (possibly after a partial zero word)
        if len(word) < 4:
            raise EifError("truncated cpio archive: header")
        magic = word + stream.exact(2, "header")
        if magic not in (b"070701", b"070702"):
            raise EifError(f"not a newc cpio archive (magic {magic!r})")
        fields_raw = stream.exact(104, "header")
        try:
            fields = [int(fields_raw[i : i + 8], 16) for i in range(0, 104, 8)]
        except ValueError:
            raise EifError("cpio header has non-hex fields") from None
        ino, mode, uid, gid, nlink, mtime, size, _devmajor, _devminor, rmaj, rmin, namesize, _check = fields
        if not 1 <= namesize <= MAX_NAME_SIZE:
            raise EifError(f"cpio name size {namesize} is out of range")
        raw_name = stream.exact(namesize, "name")
        stream.align()
        if raw_name[-1:] != b"\0":
            raise EifError("cpio name is not NUL-terminated")
        text = raw_name[:-1].decode("utf-8", "surrogateescape")
        if text == "TRAILER!!!":
            stream.align()
            continue
        left = size

        def read(n: int, _name: str = text) -> bytes:
            nonlocal left
            if left <= 0:
                return b""
            chunk = stream.read(min(n, left))
            if not chunk:
                raise EifError(f"truncated cpio archive: data of {_name!r}")
            left -= len(chunk)
            return chunk

        member = CpioMember(normalize_member_name(text), mode, uid, gid, nlink, mtime, size, ino, rmaj, rmin)
        yield member, read
        while left:
            read(CHUNK_SIZE)
        stream.align()


def open_ramdisk(handle: IO[bytes]) -> IO[bytes]:
    """Transparently gunzip a gzip ramdisk; raw cpio passes through."""
    peek = handle.read(2)
    rest: IO[bytes] = _Prefixed(peek, handle)
    if peek == b"\x1f\x8b":
        return _inflating_gzip.GzipFile(fileobj=rest, mode="rb")  # type: ignore[return-value]
    return rest


class _Prefixed(io.RawIOBase):
    def __init__(self, prefix: bytes, handle: IO[bytes]) -> None:
        super().__init__()
        self.prefix = prefix
        self.handle = handle

    def readable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        view = memoryview(buffer).cast("B")
        if self.prefix:
            n = min(len(view), len(self.prefix))
            view[:n] = self.prefix[:n]
            self.prefix = self.prefix[n:]
            return n
        return self.handle.readinto(view)  # type: ignore[attr-defined]


_NOFOLLOW_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)


def _open_parent(root_fd: int, parts: list[str]) -> int:
    """Walk to the parent directory of a member with O_NOFOLLOW: a symlink in the path cannot redirect us."""
    fd = os.dup(root_fd)
    try:
        for part in parts[:-1]:
            try:
                nxt = os.open(part, _NOFOLLOW_DIR, dir_fd=fd)
            except FileNotFoundError:
                os.mkdir(part, 0o755, dir_fd=fd)
                nxt = os.open(part, _NOFOLLOW_DIR, dir_fd=fd)
            except (NotADirectoryError, OSError) as exc:
                raise EifError(f"unsafe path: component {part!r} is not a plain directory ({exc})") from None
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def extract_cpio(
    handle: IO[bytes],
    dest: str | os.PathLike[str],
    *,
    strip_prefix: str | None = None,
    preserve_owner: bool | None = None,
    max_bytes: int | None = None,
) -> ExtractResult:
    """Safely unpack a newc stream into `dest` (created if missing).

    Never writes outside `dest` (`..` names are refused, paths are walked without following symlinks);
    device nodes, fifos and sockets are skipped and listed. strip_prefix: only members under that
    directory are extracted, relative to it (e.g. "rootfs"). preserve_owner defaults to "if root".
    max_bytes bounds the total file data (a guard against decompression bombs).
    """
    dest = Path(dest)
    dest.mkdir(parents=True, exist_ok=True)
    owner = os.geteuid() == 0 if preserve_owner is None else preserve_owner
    prefix = normalize_member_name(strip_prefix) if strip_prefix else None
    result = ExtractResult()
    hardlinks: dict[int, list[str]] = {}
    dir_modes: dict[str, int] = {}
    root_fd = os.open(dest, _NOFOLLOW_DIR)
    try:
        for member, read in iter_cpio(handle):
            name = member.name
            if prefix is not None:
                if name == prefix or not name.startswith(prefix + "/"):
                    continue
                name = name[len(prefix) + 1 :]
            parts = name.split("/")
            kind = stat.S_IFMT(member.mode)
            if kind not in (stat.S_IFREG, stat.S_IFDIR, stat.S_IFLNK):
                result.skipped.append(member.name)
                continue
            parent = _open_parent(root_fd, parts)
            try:
                leaf = parts[-1]
                _remove_existing(parent, leaf, keep_dir=kind == stat.S_IFDIR)
                if kind == stat.S_IFDIR:
                    with contextlib.suppress(FileExistsError):
                        os.mkdir(leaf, 0o700, dir_fd=parent)
                    result.directories += 1
                elif kind == stat.S_IFLNK:
                    target = b""
                    while chunk := read(CHUNK_SIZE):
                        target += chunk
                        if len(target) > MAX_NAME_SIZE:
                            raise EifError(f"symlink target of {member.name!r} is too long")
                    os.symlink(target, leaf, dir_fd=parent)
                    result.symlinks += 1
                else:
                    written = _write_member(parent, leaf, read, result, max_bytes)
                    if member.nlink > 1:
                        _hardlink_fixup(root_fd, hardlinks.setdefault(member.ino, []), name, written)
                    result.files += 1
                if kind == stat.S_IFDIR:
                    # Applied last: a read-only directory must still receive its children.
                    dir_modes[name] = member.mode & 0o7777
                elif kind == stat.S_IFREG:
                    os.chmod(leaf, member.mode & 0o7777, dir_fd=parent)
                if owner:
                    os.chown(leaf, member.uid, member.gid, dir_fd=parent, follow_symlinks=False)
            finally:
                os.close(parent)
        for name in sorted(dir_modes, key=_fsencode, reverse=True):
            parts = name.split("/")
            parent = _open_parent(root_fd, parts)
            try:
                os.chmod(parts[-1], dir_modes[name], dir_fd=parent, follow_symlinks=False)
            finally:
                os.close(parent)
    finally:
        os.close(root_fd)
    return result


def _remove_existing(parent: int, leaf: str, keep_dir: bool) -> None:
    try:
        st = os.lstat(leaf, dir_fd=parent)
    except FileNotFoundError:
        return
    if stat.S_ISDIR(st.st_mode):
        if keep_dir:
            return
        raise EifError(f"archive replaces directory {leaf!r} with a non-directory")
    os.unlink(leaf, dir_fd=parent)


def _write_member(
    parent: int, leaf: str, read: Callable[[int], bytes], result: ExtractResult, max_bytes: int | None
) -> int:
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | getattr(os, "O_CLOEXEC", 0)
    fd = os.open(leaf, flags, 0o600, dir_fd=parent)
    written = 0
    with os.fdopen(fd, "wb") as out:
        while chunk := read(CHUNK_SIZE):
            result.bytes += len(chunk)
            written += len(chunk)
            if max_bytes is not None and result.bytes > max_bytes:
                raise EifError(f"ramdisk expands beyond the {max_bytes}-byte limit")
            out.write(chunk)
    return written


def _hardlink_fixup(root_fd: int, names: list[str], name: str, written: int) -> None:
    """newc stores a hard-linked file's data once, in its last link: copy it to the earlier empty links."""
    names.append(name)
    if not written:
        return
    source = names[-1]
    for other in names[:-1]:
        src_parent = _open_parent(root_fd, source.split("/"))
        dst_parent = _open_parent(root_fd, other.split("/"))
        try:
            os.unlink(other.split("/")[-1], dir_fd=dst_parent)
            os.link(
                source.split("/")[-1],
                other.split("/")[-1],
                src_dir_fd=src_parent,
                dst_dir_fd=dst_parent,
                follow_symlinks=False,
            )
        finally:
            os.close(src_parent)
            os.close(dst_parent)
    names.clear()


def extract_ramdisk_stream(handle: IO[bytes], dest: str | os.PathLike[str], **kwargs: Any) -> ExtractResult:
    """`extract_cpio` on a raw or gzip-compressed ramdisk stream."""
    return extract_cpio(open_ramdisk(handle), dest, **kwargs)


def extract_customer_ramdisks(
    image: EifImage | str | os.PathLike[str], dest: str | os.PathLike[str], **kwargs: Any
) -> ExtractResult:
    """Unpack every application ramdisk (ramdisk[1:], the PCR2 ones) of an EIF into `dest`.

    nitro-cli's customer ramdisk holds `cmd`, `env` and the image filesystem under `rootfs/`.
    """
    if not isinstance(image, EifImage):
        image = read_eif(image)
    if not image.customer_ramdisks:
        raise EifError(f"{image.path} has no application ramdisk (only {len(image.ramdisks)} ramdisk)")
    return extract_ramdisk_windows(image.path, ramdisk_windows(image), dest, **kwargs)


def ramdisk_windows(image: EifImage) -> list[tuple[int, int]]:
    """(data offset, size) of each application ramdisk: what extract_ramdisk_windows needs."""
    return [(section.data_offset, section.size) for section in image.customer_ramdisks]


def extract_ramdisk_windows(
    path: str | os.PathLike[str], windows: list[tuple[int, int]], dest: str | os.PathLike[str], **kwargs: Any
) -> ExtractResult:
    """Unpack ramdisks located by an earlier read_eif (e.g. in another process) without reading the whole
    file again; `path` may be ``/proc/self/fd/N`` of the very file that was measured."""
    total = ExtractResult()
    for offset, size in windows:
        with _SectionFile(Path(path), offset, size) as handle:
            part = extract_ramdisk_stream(handle, dest, **kwargs)
        total.files += part.files
        total.directories += part.directories
        total.symlinks += part.symlinks
        total.bytes += part.bytes
        total.skipped.extend(part.skipped)
    return total


def host_eif_flags() -> int:
    """Header flags for the build host's architecture (nitro-cli picks the kernel blob the same way)."""
    return EIF_HDR_ARCH_ARM64 if platform.machine().lower() in ("aarch64", "arm64") else 0
