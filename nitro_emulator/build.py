"""`build-enclave`, `describe-eif` and `pcr` of the emulator (reference nitro-cli-and-eif.md §5.3, §5.4, §5.10).

The EIF layout, ramdisk content and measurements are nitro-cli's; the EIF/PCR code is
`plugins/module_utils/eif.py` (the same file the Ansible modules use). Differences from nitro-cli, all for
reproducibility (same Docker image content + same blobs => byte-identical EIF):

- ramdisks are built by `cpio.write_cpio` (sorted newc with linuxkit's header fields), not by linuxkit;
  the bootstrap ramdisk is linuxkit's byte for byte, the application ramdisk is gzip-compressed (mtime 0,
  no name) with mtimes 0 (every difference, with its upstream source: nitro_emulator/README.md);
- `BuildTime` is `SOURCE_DATE_EPOCH` when set, else the image's `Created` time (nitro-cli uses "now");
- `DockerInfo` leaves out the host-local, volatile `Metadata` (LastTagTime) and `GraphDriver` keys;
- built from the stand-in blobs, `BuildMetadata` carries `"PlaceholderBlobs": true` (nitro-cli ignores it).

Progress goes to stderr, the JSON result to stdout, failures raise NitroCliError (`[ Exx ]`, exit = E number).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import json
import os
import platform
import shutil
import stat
import subprocess
import sys
import tarfile
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from ansible_collections.nitro_enclaves.fleet.plugins.module_utils import eif
from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif_provenance import blob_is_placeholder

from . import cpio, eif_writer, signing
from .errors import NitroCliError

BUILD_TOOL = "nitro-cli-emulator"
BUILD_TOOL_VERSION = "1.4.2"  # the nitro-cli release whose behaviour is emulated (cli.VERSION)
DEFAULT_BLOBS = Path(__file__).resolve().parent / "blobs"
MAX_META_FILE_SIZE = 4096
# Files Docker adds to every container and `docker export` shows; linuxkit drops or replaces them too.
EXPORT_EXCLUDE = {".dockerenv", "Dockerfile", "dev/console", "dev/pts", "dev/shm", "etc/hostname"}
EXPORT_REPLACE = {
    "etc/hosts": b"127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n",
    "etc/resolv.conf": b"",
}
ROOTFS_DIRS = ("dev", "run", "sys", "var", "proc", "tmp")
DOCKER_INFO_DROP = ("Metadata", "GraphDriver")
# Level 1: 5x faster than 6 on a Python image for ~6% more bytes.
APP_RAMDISK_GZIP_LEVEL = 1


def _progress(text: str) -> None:
    sys.stderr.write(text + "\n")
    sys.stderr.flush()


def _print_json(value: Any) -> None:
    sys.stdout.write(json.dumps(value, indent=2, ensure_ascii=False) + "\n")
    sys.stdout.flush()


def _file_error(path: str | os.PathLike[str], operation: str) -> NitroCliError:
    return NitroCliError(19, path, operation)


# ------------------------------------------------------------------------------------------------ blobs


def blobs_dir() -> Path:
    """`NITRO_CLI_BLOBS`, else the emulator's labelled stand-in blobs."""
    env = os.environ.get("NITRO_CLI_BLOBS")
    return Path(env) if env else DEFAULT_BLOBS


def kernel_name() -> str:
    """nitro-cli picks the kernel by the build host's architecture, not the image's."""
    return "Image" if platform.machine().lower() in ("aarch64", "arm64") else "bzImage"


def _require_blob(blobs: Path, name: str) -> Path:
    path = blobs / name
    if not path.is_file():
        raise NitroCliError(48, f"Required blob '{path}' is missing (NITRO_CLI_BLOBS={blobs}).")
    return path


def placeholder_blobs(blobs: Path) -> bool:
    """Whether any blob that goes into PCR1 is one of the emulator's stand-ins."""
    return any(blob_is_placeholder(_require_blob(blobs, name)) for name in (kernel_name(), "init", "nsm.ko"))


def artifacts_dir() -> Path:
    env = os.environ.get("NITRO_CLI_ARTIFACTS")
    if env:
        path = Path(env)
    elif os.environ.get("HOME"):
        path = Path(os.environ["HOME"]) / ".nitro_cli"
    else:
        raise NitroCliError(51, "Artifacts path environment variable not set (NITRO_CLI_ARTIFACTS or HOME).")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError:
        raise _file_error(path, "Create") from None
    return path


# ------------------------------------------------------------------------------------------------ docker


def _docker(args: list[str], code: int, what: str) -> str:
    docker = shutil.which("docker")
    if docker is None:
        raise NitroCliError(code, f"{what}: the docker CLI is not installed or not on PATH.")
    proc = subprocess.run([docker, *args], capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        detail = (proc.stderr or proc.stdout).strip().splitlines()[-5:]
        raise NitroCliError(code, f"{what}: {' | '.join(detail) or f'docker exited {proc.returncode}'}")
    return proc.stdout


def normalize_uri(uri: str) -> str:
    """nitro-cli appends `:latest` only when the URI has no `:` at all (so `host:5000/img` stays as is)."""
    return uri if ":" in uri else f"{uri}:latest"


def ensure_image(uri: str, docker_dir: str | None) -> dict[str, Any]:
    """Build (from docker_dir) or find/pull the image; return its `docker image inspect` object."""
    if docker_dir:
        if not (Path(docker_dir) / "Dockerfile").is_file():
            raise NitroCliError(49, f"No Dockerfile in '{docker_dir}'.")
        _progress(f"Building the Docker image {uri} from {docker_dir}...")
        # --force-rm: a failed RUN step leaves no stopped container behind.
        _docker(["build", "--quiet", "--force-rm", "--tag", uri, docker_dir], 49, "Docker image build failed")
    else:
        try:
            _docker(["image", "inspect", uri], 50, "inspect")
            _progress("Using the locally available Docker image...")
        except NitroCliError:
            _progress(f"Pulling the Docker image {uri}...")
            _docker(["pull", uri], 50, "Docker image pull failed")
    raw = _docker(["image", "inspect", uri], 50, "Docker image inspect failed")
    try:
        info = json.loads(raw)[0]
    except (ValueError, IndexError, KeyError):
        raise NitroCliError(50, f"Unexpected `docker image inspect {uri}` output.") from None
    return info


def image_command(info: dict[str, Any]) -> tuple[list[str], list[str]]:
    """(cmd, env) as nitro-cli takes them: Cmd if set (Entrypoint ignored), else Entrypoint."""
    config = info.get("Config") or {}
    cmd = config.get("Cmd") or config.get("Entrypoint")
    if not cmd:
        raise NitroCliError(
            48, "The Docker image has neither Cmd nor Entrypoint; the enclave would have nothing to run."
        )
    return list(cmd), list(config.get("Env") or [])


def image_flags(info: dict[str, Any]) -> int:
    arch = info.get("Architecture")
    if arch == "arm64":
        return eif.EIF_HDR_ARCH_ARM64
    if arch == "amd64":
        return 0
    raise NitroCliError(48, f"Unsupported Docker image architecture {arch!r} (amd64 or arm64).")


@contextlib.contextmanager
def exported_rootfs(uri: str, workdir: Path) -> Iterator[tarfile.TarFile]:
    """`docker create` + `docker export` of the image: its flattened filesystem as a tar (random access)."""
    tar_path = workdir / "rootfs.tar"
    container = _docker(["create", uri], 48, "Cannot create a container to export the image").strip()
    try:
        _docker(["export", "--output", str(tar_path), container], 48, "Cannot export the image filesystem")
    finally:
        with contextlib.suppress(NitroCliError):
            _docker(["rm", "--force", container], 48, "rm")
    try:
        with tarfile.open(tar_path, "r:") as tar:
            yield tar
    except tarfile.TarError as exc:
        raise NitroCliError(48, f"Cannot read the exported image filesystem: {exc}") from None


def rootfs_entries(tar: tarfile.TarFile, prefix: str = "rootfs") -> list[cpio.CpioEntry]:
    """cpio entries for every member of an exported image, under `prefix/`, ownership and modes kept."""
    entries: list[cpio.CpioEntry] = []
    seen: set[str] = set()
    for member in tar.getmembers():
        try:
            name = cpio.normalize_member_name(member.name)
        except eif.EifError as exc:
            raise NitroCliError(48, f"Unsafe path in the image filesystem: {exc}") from None
        if name in EXPORT_EXCLUDE or any(name.startswith(x + "/") for x in EXPORT_EXCLUDE) or name in seen:
            continue
        seen.add(name)
        full = f"{prefix}/{name}"
        perms = member.mode & 0o7777
        owner = {"uid": member.uid, "gid": member.gid}
        if name in EXPORT_REPLACE:
            entries.append(cpio.file_entry(full, EXPORT_REPLACE[name], 0o644))
        elif member.isdir():
            entries.append(cpio.dir_entry(full, perms, **owner))
        elif member.issym():
            entries.append(cpio.CpioEntry(full, stat.S_IFLNK | 0o777, data=os.fsencode(member.linkname), **owner))
        elif member.isfile() or member.islnk():
            # Hard links become independent copies: simpler ramdisk, same content for the enclave.
            target = tar.getmember(member.linkname) if member.islnk() else member

            def opener(t: tarfile.TarInfo = target) -> Any:
                handle = tar.extractfile(t)
                if handle is None:
                    raise NitroCliError(48, f"Cannot read {t.name} from the image filesystem.")
                return handle

            entries.append(cpio.CpioEntry(full, stat.S_IFREG | perms, opener=opener, size=target.size, **owner))
        elif member.ischr() or member.isblk():
            kind = stat.S_IFCHR if member.ischr() else stat.S_IFBLK
            entries.append(
                cpio.CpioEntry(full, kind | perms, rdev_major=member.devmajor, rdev_minor=member.devminor, **owner)
            )
        elif member.isfifo():
            entries.append(cpio.CpioEntry(full, stat.S_IFIFO | perms, **owner))
    for directory in ROOTFS_DIRS:
        # Directories nitro-cli's linuxkit config adds; an image's own (e.g. /tmp 1777) is kept.
        if directory not in seen:
            entries.append(cpio.dir_entry(f"{prefix}/{directory}", 0o755))
    if prefix not in seen:
        entries.append(cpio.dir_entry(prefix, 0o755))
    return entries


def lines_file(items: list[str]) -> bytes:
    return "".join(f"{item}\n" for item in items).encode("utf-8")


def bootstrap_entries(blobs: Path) -> list[cpio.CpioEntry]:
    return [
        cpio.dir_entry("dev", 0o755),
        cpio.path_entry("init", _require_blob(blobs, "init"), 0o755),
        cpio.path_entry("nsm.ko", _require_blob(blobs, "nsm.ko"), 0o755),
    ]


def docker_info_for_metadata(info: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in info.items() if k not in DOCKER_INFO_DROP}


def build_time(info: dict[str, Any]) -> str:
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    if epoch:
        try:
            return eif.rfc3339(int(epoch))
        except (ValueError, OverflowError, OSError):
            raise NitroCliError(48, f"SOURCE_DATE_EPOCH={epoch!r} is not a Unix timestamp.") from None
    created = str(info.get("Created") or "")
    try:
        # Docker prints nanoseconds; datetime keeps microseconds (enough for a stable value).
        head, _, frac = created.rstrip("Z").partition(".")
        when = dt.datetime.fromisoformat(head).replace(tzinfo=dt.UTC)
        micro = int((frac.split("+")[0] + "000000")[:6]) if frac else 0
        return eif.rfc3339(when.replace(microsecond=micro))
    except ValueError:
        return eif.rfc3339(0)


def custom_metadata(path: str | None) -> Any:
    if path is None:
        return None
    meta = Path(path)
    if not meta.is_file():
        raise NitroCliError(48, "Specified path is not a file")
    if meta.stat().st_size > MAX_META_FILE_SIZE:
        raise NitroCliError(48, f"Metadata file size exceeded limit of {MAX_META_FILE_SIZE}B")
    try:
        return json.loads(meta.read_bytes())
    except (OSError, ValueError) as exc:
        raise NitroCliError(48, f"Metadata file '{path}' is not valid JSON: {exc}") from None


# ------------------------------------------------------------------------------------------------ commands


def _signer(cert_path: str, key_location: str) -> eif_writer.Signer:
    try:
        return signing.make_signer(cert_path, key_location)
    except signing.SigningError as exc:
        raise NitroCliError(60, f"Could not read signing info: {exc}") from None


def build_enclave(args: argparse.Namespace) -> int:
    if bool(args.signing_certificate) != bool(args.private_key):
        # clap's `requires`: a usage error (exit 2), not an E code.
        missing = "--private-key" if args.signing_certificate else "--signing-certificate"
        sys.stderr.write(f"error: the following required arguments were not provided:\n  {missing} <{missing[2:]}>\n")
        return 2
    _progress("Start building the Enclave Image...")
    blobs = blobs_dir()
    cmdline_path = _require_blob(blobs, "cmdline")
    try:
        cmdline = cmdline_path.read_text().strip()
    except (OSError, UnicodeDecodeError):
        raise _file_error(cmdline_path, "Read") from None
    output = Path(args.output_file)
    try:
        output.open("wb").close()  # nitro-cli creates/truncates the output first
    except OSError:
        raise _file_error(output, "Open") from None
    kernel = _require_blob(blobs, kernel_name())
    config = _require_blob(blobs, f"{kernel_name()}.config")
    for name in ("init", "nsm.ko", "linuxkit"):
        _require_blob(blobs, name)
    artifacts = artifacts_dir()
    signer = _signer(args.signing_certificate, args.private_key) if args.signing_certificate else None
    custom = custom_metadata(getattr(args, "metadata", None))

    uri = normalize_uri(args.docker_uri)
    info = ensure_image(uri, args.docker_dir)
    cmd, env = image_command(info)
    flags = image_flags(info)
    build_info = eif.build_info_from_kernel_config(
        config.read_text(errors="replace"),
        build_time=build_time(info),
        build_tool=BUILD_TOOL,
        build_tool_version=BUILD_TOOL_VERSION,
    )
    image_id = str(info.get("Id", ""))
    metadata = eif.make_metadata(
        args.name or args.docker_uri.split(":")[0],
        getattr(args, "image_version", None) or image_id.removeprefix("sha256:"),
        build_info,
        docker_info_for_metadata(info),
        custom,
        # Recorded so the modules and roles never send this EIF to a Nitro host (eif_provenance).
        placeholder_blobs=placeholder_blobs(blobs),
    )
    with tempfile.TemporaryDirectory(prefix="build-", dir=artifacts) as tmp:
        work = Path(tmp)
        boot = cpio.write_ramdisk(
            bootstrap_entries(blobs), work / "bootstrap-initrd.img", compress=False, mtime=cpio.LINUXKIT_FILES_MTIME
        )
        with exported_rootfs(uri, work) as tar:
            entries = rootfs_entries(tar)
            entries += [cpio.file_entry("cmd", lines_file(cmd)), cpio.file_entry("env", lines_file(env))]
            try:
                app = cpio.write_ramdisk(entries, work / "customer-initrd.img", compresslevel=APP_RAMDISK_GZIP_LEVEL)
            except eif.EifError as exc:
                raise NitroCliError(48, f"Cannot build the application ramdisk: {exc}") from None
        (work / "rootfs.tar").unlink()
        try:
            pcrs = eif_writer.write_eif(
                output,
                kernel=kernel,
                cmdline=cmdline,
                ramdisks=[boot, app],
                metadata=metadata,
                flags=flags,
                signer=signer,
            )
        except eif.EifError as exc:
            raise NitroCliError(48, str(exc)) from None
        except OSError:
            raise _file_error(output, "Write") from None
    _progress("Enclave Image successfully created.")
    _print_json({"Measurements": eif.measurements_dict(pcrs)})
    return 0


def describe_eif(args: argparse.Namespace) -> int:
    try:
        described = eif.describe_eif(args.eif_path, certificate_inspector=signing.certificate_inspector)
    except eif.EifError as exc:
        raise NitroCliError(35, str(exc)) from None
    _print_json(described)
    return 0


def sign_eif(args: argparse.Namespace) -> int:
    """nitro-cli sign-eif (CLI src/lib.rs sign_eif): sign, then print the Measurements of the result."""
    if not args.eif_path:
        raise NitroCliError(1, "eif-path")
    if not (args.signing_certificate and args.private_key):
        raise NitroCliError(60, "Failed to create EifSigner")
    try:
        signer = signing.make_signer(args.signing_certificate, args.private_key)
    except signing.SigningError as exc:
        sys.stderr.write(f"Could not read signing info: {exc}\n")
        raise NitroCliError(60, "Failed to create EifSigner") from None
    try:
        pcrs = eif_writer.sign_eif_file(args.eif_path, signer)
    except (eif.EifError, signing.SigningError, OSError) as exc:
        raise NitroCliError(60, f"Failed to sign image: {exc}") from None
    _progress("Enclave Image successfully signed.")
    _print_json({"Measurements": eif.measurements_dict(pcrs)})
    return 0


def pcr(args: argparse.Namespace) -> int:
    if args.input is not None:
        try:
            value = eif.pcr_of_file(args.input)
        except OSError:
            raise _file_error(args.input, "Open") from None
        _print_json({"PCR": value})
        return 0
    from cryptography import x509
    from cryptography.hazmat.primitives import serialization

    try:
        pem = Path(args.signing_certificate).read_bytes()
    except OSError:
        raise _file_error(args.signing_certificate, "Open") from None
    try:
        der = x509.load_pem_x509_certificate(pem).public_bytes(serialization.Encoding.DER)
    except ValueError as exc:
        raise NitroCliError(57, f"Could not parse the signing certificate: {exc}") from None
    _print_json({"PCR8": eif.pcr_of_bytes(der)})
    return 0
