"""Write EIF v4 files in nitro-cli's layout (reference nitro-cli-and-eif.md §1.5, §1.9).

Only the emulator builds images; the reader and the PCR formulas it measures with are in
plugins/module_utils/eif.py, so what is written is measured by the very code that later reads it.
"""

from __future__ import annotations

import os
import platform
import struct
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import IO, Any

from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif import (
    CHUNK_SIZE,
    CRC_OFFSET,
    EIF_HDR_ARCH_ARM64,
    HEADER_SIZE,
    MAX_NUM_SECTIONS,
    SECTION_HEADER_SIZE,
    SECTION_STRUCT,
    SIGNATURE_MAX_SIZE,
    EifError,
    EifHeader,
    Measurer,
    SectionType,
    decode_signature_section,
    metadata_bytes,
    parse_metadata,
    pcr8_from_certificate,
    read_eif,
    use_parallel,
)

Source = bytes | bytearray | memoryview | str | os.PathLike[str]


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
    plan: Sequence[tuple[SectionType, Source]], sizes: Sequence[int], measurer: Measurer, out: IO[bytes] | None
) -> None:
    """Feed (and write, when `out` is given) section headers and data in file order."""
    seen_ramdisk = False
    for (kind, src), size in zip(plan, sizes, strict=True):
        section_header = SECTION_STRUCT.pack(kind, 0, size)
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
    sizes = [_source_size(src) for _, src in plan]
    if len(plan) + (1 if signer else 0) > MAX_NUM_SECTIONS:
        raise EifError(f"too many sections ({len(plan)}); an EIF holds at most {MAX_NUM_SECTIONS}")
    total = sum(sizes)
    threaded = use_parallel(parallel, total)
    pcrs: dict[str, str] = {}
    if signer is not None:
        # The signature section's size is in the header (and the CRC starts with the header), so the
        # PCR0 it signs must be known before writing: measure the inputs in a first pass.
        probe = Measurer(threaded)
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
        measurer = Measurer(threaded)
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


def host_eif_flags() -> int:
    """Header flags for the build host's architecture (nitro-cli picks the kernel blob the same way)."""
    return EIF_HDR_ARCH_ARM64 if platform.machine().lower() in ("aarch64", "arm64") else 0


def _copy_range(src: IO[bytes], start: int, length: int, out: IO[bytes]) -> None:
    src.seek(start)
    while length:
        chunk = src.read(min(CHUNK_SIZE, length))
        if not chunk:
            raise EifError("EIF changed size while it was signed")
        out.write(chunk)
        length -= len(chunk)


def sign_eif_file(path: str | os.PathLike[str], signer: Signer) -> dict[str, str]:
    """`nitro-cli sign-eif`: add or replace the signature section of an existing EIF (reference §3.4).

    As image-format's EifSigner::sign_image: sign PCR0; an unsigned image gets the section appended at
    the end of file in header slot `num_sections`; a signed one has its section replaced in place and the
    later sections' offsets shifted; then the CRC is recomputed over the result. Unlike the crate, the new
    file is written next to the old one and renamed over it, so a failure leaves the original intact.
    Returns the new PCRs (PCR8 included).
    """
    path = Path(path)
    image = read_eif(path)
    section = signer(image.pcrs["PCR0"])
    if len(section) > SIGNATURE_MAX_SIZE:
        raise EifError(f"signature section is {len(section)} bytes (max {SIGNATURE_MAX_SIZE})")
    header = image.header
    offsets, sizes = list(header.section_offsets), list(header.section_sizes)
    old = next((s for s in image.sections if s.type == SectionType.SIGNATURE), None)
    if old is None:
        if header.num_sections >= MAX_NUM_SECTIONS:
            raise EifError(f"no free section slot: the EIF already has {MAX_NUM_SECTIONS} sections")
        cut, resume = image.file_size, image.file_size
        offsets[header.num_sections], sizes[header.num_sections] = image.file_size, len(section)
        num = header.num_sections + 1
    else:
        cut, resume = old.offset, old.offset + SECTION_HEADER_SIZE + old.size
        delta = len(section) - old.size
        sizes[old.index] = len(section)
        for later in range(old.index + 1, header.num_sections):
            offsets[later] += delta
        num = header.num_sections
    new_header = replace(header, num_sections=num, section_offsets=tuple(offsets), section_sizes=tuple(sizes), crc32=0)
    fd, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "w+b") as out, open(path, "rb") as src:
            out.write(new_header.pack())
            _copy_range(src, HEADER_SIZE, cut - HEADER_SIZE, out)
            out.write(SECTION_STRUCT.pack(SectionType.SIGNATURE, 0, len(section)) + section)
            _copy_range(src, resume, image.file_size - resume, out)
            out.flush()
            signed = read_eif(tmp_name, check_crc=False)  # the CRC, computed by the reader (update_crc)
            out.seek(CRC_OFFSET)
            out.write(struct.pack(">I", signed.crc_computed))
        os.chmod(tmp_name, os.stat(path).st_mode & 0o7777)
        os.replace(tmp_name, path)
    except BaseException:
        Path(tmp_name).unlink(missing_ok=True)
        raise
    return {k: signed.pcrs[k] for k in ("PCR0", "PCR1", "PCR2", "PCR8") if k in signed.pcrs}
