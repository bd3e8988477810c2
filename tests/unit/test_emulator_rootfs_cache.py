"""The emulator's unpacked-image cache: a first boot unpacks into the enclave, a relaunch fills the cache."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import eif

from nitro_emulator import cpio, eif_writer, isolation

OWNER = {"uid": os.geteuid(), "gid": os.getegid()}
BUILD_INFO = dict.fromkeys(("BuildTime", "BuildTool", "BuildToolVersion", "OperatingSystem", "KernelVersion"), "test")


def image(tmp_path: Path, text: bytes) -> eif.EifImage:
    boot = cpio.write_ramdisk([cpio.file_entry("init", b"INIT", 0o755, **OWNER)], tmp_path / f"boot-{text!r}")
    app = cpio.write_ramdisk(
        [cpio.file_entry("cmd", b"/app\n", **OWNER), cpio.dir_entry("rootfs", **OWNER),
         cpio.file_entry("rootfs/app", text, 0o755, **OWNER)],
        tmp_path / f"app-{text!r}",
    )  # fmt: skip
    path = tmp_path / f"{text.decode()}.eif"
    metadata = eif.make_metadata("a", "b", BUILD_INFO)
    eif_writer.write_eif(path, kernel=b"K", cmdline="c", ramdisks=[boot, app], metadata=metadata)
    return eif.read_eif(path)


def test_first_boot_unpacks_in_the_enclave_a_relaunch_fills_the_cache(tmp_path: Path) -> None:
    base = tmp_path / "cache"
    first = image(tmp_path, b"one")
    pcr0 = first.pcrs["PCR0"]

    assert isolation.rootfs_cache(first, str(first.path), base) is None
    assert (base / f"{pcr0}.seen").exists() and not (base / pcr0).exists()
    assert base.stat().st_mode & 0o777 == 0o700

    cached = isolation.rootfs_cache(first, str(first.path), base)
    assert cached == base / pcr0
    assert (cached / "rootfs" / "app").read_bytes() == b"one"
    assert (cached / "cmd").read_text() == "/app\n"
    assert isolation.rootfs_cache(first, str(first.path), base) == cached  # later boots reuse it
    assert not list(base.glob(".unpacking-*"))


def test_only_the_newest_images_are_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(isolation, "CACHE_KEEP", 2)
    base = tmp_path / "cache"
    images = [image(tmp_path, name) for name in (b"a", b"b", b"c")]
    for index, img in enumerate(images):
        isolation.rootfs_cache(img, str(img.path), base)
        isolation.rootfs_cache(img, str(img.path), base)
        mark = base / f"{img.pcrs['PCR0']}.seen"
        # Boot order by mtime, without sleeping between boots.
        os.utime(mark, (1000 + index, 1000 + index))
        os.utime(base / img.pcrs["PCR0"], (1000 + index, 1000 + index))
    isolation.rootfs_cache(images[2], str(images[2].path), base)
    kept = {p.name for p in base.iterdir() if not p.name.startswith(".")}
    newest = [img.pcrs["PCR0"] for img in images[1:]]
    assert kept == {*newest, *(f"{pcr0}.seen" for pcr0 in newest)}
