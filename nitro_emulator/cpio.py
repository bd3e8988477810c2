"""Deterministic newc cpio ramdisks (as linuxkit writes nitro-cli's) and their safe extraction.

The emulator builds ramdisks with it and unpacks an EIF's application ramdisks to boot them; the EIF
reader it works from is ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif.
"""

from __future__ import annotations

import contextlib
import gzip
import io
import os
import stat
import zlib
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif import (
    CHUNK_SIZE,
    EifError,
    EifImage,
    SectionFile,
    ramdisk_windows,
    read_eif,
)

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
        ino, mode, uid, gid, nlink, mtime, size, _, _, rmaj, rmin, namesize, _ = fields
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


def extract_ramdisk_windows(
    path: str | os.PathLike[str], windows: list[tuple[int, int]], dest: str | os.PathLike[str], **kwargs: Any
) -> ExtractResult:
    """Unpack ramdisks located by an earlier read_eif (e.g. in another process) without reading the whole
    file again; `path` may be ``/proc/self/fd/N`` of the very file that was measured."""
    total = ExtractResult()
    for offset, size in windows:
        with SectionFile(Path(path), offset, size) as handle:
            part = extract_ramdisk_stream(handle, dest, **kwargs)
        total.files += part.files
        total.directories += part.directories
        total.symlinks += part.symlinks
        total.bytes += part.bytes
        total.skipped.extend(part.skipped)
    return total
