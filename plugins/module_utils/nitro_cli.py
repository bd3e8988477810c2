"""The one nitro-cli runner the modules share: locate the binary, run a subcommand with a timeout,
parse its JSON stdout, turn ``[ Exx ]`` stderr into NitroCliError, serialize launches per host, and
wait for an enclave's vsock port.

Works the same against the real nitro-cli and the project's emulator (``nitro-cli-emulator``, which
the roles link as ``nitro-cli`` on hosts without /dev/nitro_enclaves). Stdlib only.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

from .vsock import DEFAULT_VSOCK_DIR, connect, describe, emulation_dir

DEVICE = "/dev/nitro_enclaves"
DEFAULT_SOCKETS_PATH = "/run/nitro_enclaves"
PARENT_CID = 3
LOCK_NAME = ".ansible-launch.lock"
# Env overrides: NITRO_CLI_BIN names the binary to run; NITRO_EMULATED=1/0 forces the host mode
# (tests, or a container that can see a host's /dev/nitro_enclaves but must not use it).
BIN_ENV = "NITRO_CLI_BIN"
EMULATED_ENV = "NITRO_EMULATED"
# NITRO_ENCLAVES_DEVICE names another device path (tests: a stand-in file plays a Nitro host's device).
DEVICE_ENV = "NITRO_ENCLAVES_DEVICE"
EMULATOR_NAME = "nitro-cli-emulator"

_ERROR_RE = re.compile(r"\[ E(\d+) \] (.*?)(?:\n\s*\nFor more details|\n\s*\nIf you open|\Z)", re.S)


class NitroCliError(Exception):
    """nitro-cli failed. ``code`` is the E number when stderr carried ``[ Exx ]``, else None."""

    def __init__(
        self,
        message: str,
        *,
        code: int | None = None,
        rc: int | None = None,
        stderr: str = "",
        stdout: str = "",
        cmd: Sequence[str] = (),
    ) -> None:
        self.code = code
        self.rc = rc
        self.stderr = stderr
        self.stdout = stdout
        self.cmd = list(cmd)
        self.message = message
        super().__init__(str(self))

    def __str__(self) -> str:
        prefix = f"[ E{self.code:02d} ] " if self.code is not None else ""
        return f"{prefix}{self.message}"

    def as_dict(self) -> dict[str, Any]:
        return {"code": self.code, "rc": self.rc, "stderr": self.stderr, "cmd": self.cmd}


class NitroCliNotFound(NitroCliError):
    """No nitro-cli (nor, on an emulated host, the emulator) could be found."""


def parse_error(stderr: str) -> tuple[int, str] | None:
    """The first ``[ Exx ] message`` block in stderr -> (xx, message). run-enclave forwards the
    enclave process's own error (the cause) before the CLI's E39, so the first one is the one to show."""
    matches = _ERROR_RE.findall(stderr)
    if not matches:
        return None
    code, message = matches[0]
    return int(code), message.strip()


def all_errors(stderr: str) -> list[tuple[int, str]]:
    return [(int(code), message.strip()) for code, message in _ERROR_RE.findall(stderr)]


def device_path() -> str:
    """The Nitro Enclaves device this host would have: $NITRO_ENCLAVES_DEVICE, else /dev/nitro_enclaves."""
    return os.environ.get(DEVICE_ENV) or DEVICE


def is_emulated(device: str | None = None) -> bool:
    """A host without the Nitro Enclaves device runs the emulator; NITRO_EMULATED overrides."""
    forced = os.environ.get(EMULATED_ENV)
    if forced is not None and forced.strip() != "":
        return forced.strip().lower() in ("1", "true", "yes")
    return not os.path.exists(device or device_path())


def find_emulator() -> str | None:
    """`nitro-cli-emulator` on PATH, else next to this Python (the project's .venv)."""
    found = shutil.which(EMULATOR_NAME)
    if found:
        return found
    beside = os.path.join(os.path.dirname(sys.executable), EMULATOR_NAME)
    return beside if os.access(beside, os.X_OK) else None


def find_nitro_cli(explicit: str | None = None) -> str:
    """explicit path > $NITRO_CLI_BIN > `nitro-cli` on PATH > /usr/bin/nitro-cli > (emulated hosts only)
    the emulator. Raises NitroCliNotFound naming what was tried."""
    tried: list[str] = []
    for candidate in (explicit, os.environ.get(BIN_ENV)):
        if candidate:
            resolved = shutil.which(candidate) or (candidate if os.access(candidate, os.X_OK) else None)
            if resolved:
                return resolved
            tried.append(candidate)
            # An explicit choice that does not exist is an error, never silently replaced.
            raise NitroCliNotFound(f"nitro-cli not found or not executable: {candidate}", cmd=[candidate])
    found = shutil.which("nitro-cli") or ("/usr/bin/nitro-cli" if os.access("/usr/bin/nitro-cli", os.X_OK) else None)
    if found:
        return found
    tried.extend(["nitro-cli on PATH", "/usr/bin/nitro-cli"])
    if is_emulated():
        emulator = find_emulator()
        if emulator:
            return emulator
        tried.append(EMULATOR_NAME)
    raise NitroCliNotFound("nitro-cli not found (tried: " + ", ".join(tried) + ")")


class NitroCli:
    """Runs nitro-cli subcommands. ``env`` adds to (not replaces) the process environment."""

    def __init__(self, binary: str | None = None, timeout: float = 300.0, env: dict[str, str] | None = None) -> None:
        self.binary = find_nitro_cli(binary)
        self.timeout = timeout
        self.env = dict(os.environ)
        if env:
            self.env.update(env)

    # -- low level --------------------------------------------------------------------------
    def run(self, args: Sequence[str], timeout: float | None = None, parse_json: bool = True) -> Any:
        cmd = [self.binary, *args]
        limit = self.timeout if timeout is None else timeout
        try:
            proc = subprocess.run(
                cmd,
                capture_output=True,
                text=True,
                timeout=limit,
                env=self.env,
                check=False,
                stdin=subprocess.DEVNULL,
            )
        except subprocess.TimeoutExpired as exc:
            raise NitroCliError(
                f"`{' '.join(cmd)}` did not finish within {limit:g} s",
                stderr=_text(exc.stderr),
                stdout=_text(exc.stdout),
                cmd=cmd,
            ) from exc
        except OSError as exc:
            raise NitroCliError(f"cannot run {self.binary}: {exc}", cmd=cmd) from exc
        if proc.returncode != 0:
            errors = all_errors(proc.stderr)
            if errors:
                code, message = errors[0]
                # run-enclave: the enclave process's error (the cause) comes first, then the CLI's E39.
                extra = [f"[ E{c:02d} ] {m}" for c, m in errors[1:] if c != code]
                text = message + ("" if not extra else " (then " + "; ".join(extra) + ")")
            else:
                code = None
                text = (proc.stderr.strip() or proc.stdout.strip() or "no output").splitlines()[-1]
                text = f"{' '.join(args[:1])} failed with exit code {proc.returncode}: {text}"
            raise NitroCliError(text, code=code, rc=proc.returncode, stderr=proc.stderr, stdout=proc.stdout, cmd=cmd)
        if not parse_json:
            return proc.stdout
        return _json_from(proc.stdout, cmd)

    # -- subcommands --------------------------------------------------------------------------
    def version(self) -> str:
        out = self.run(["--version"], timeout=30, parse_json=False).strip()
        return out.rsplit(" ", 1)[-1] if out else ""

    def describe_enclaves(self, metadata: bool = False) -> list[dict[str, Any]]:
        result = self.run(["describe-enclaves", *(["--metadata"] if metadata else [])])
        if not isinstance(result, list):
            raise NitroCliError(f"describe-enclaves printed {type(result).__name__}, expected a JSON array")
        return result

    def enclaves_named(self, name: str) -> list[dict[str, Any]]:
        return [record for record in self.describe_enclaves() if record.get("EnclaveName") == name]

    def run_enclave(
        self,
        eif_path: str,
        memory_mib: int,
        *,
        cpu_count: int | None = None,
        cpu_ids: Sequence[int] | None = None,
        enclave_cid: int | None = None,
        enclave_name: str | None = None,
        debug_mode: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        args = ["run-enclave", "--eif-path", eif_path, "--memory", str(memory_mib)]
        if cpu_ids:
            args += ["--cpu-ids", *[str(cpu) for cpu in cpu_ids]]
        elif cpu_count is not None:
            args += ["--cpu-count", str(cpu_count)]
        else:
            raise ValueError("run_enclave needs cpu_count or cpu_ids")
        if enclave_cid is not None:
            args += ["--enclave-cid", str(enclave_cid)]
        if enclave_name:
            args += ["--enclave-name", enclave_name]
        if debug_mode:
            args.append("--debug-mode")
        result = self.run(args, timeout=timeout)
        if not isinstance(result, dict):
            raise NitroCliError("run-enclave printed no JSON object", cmd=[self.binary, *args])
        return result

    def terminate_enclave(self, enclave_id: str | None = None, name: str | None = None) -> dict[str, Any]:
        if enclave_id:
            return self.run(["terminate-enclave", "--enclave-id", enclave_id])
        if name:
            return self.run(["terminate-enclave", "--enclave-name", name])
        raise ValueError("terminate_enclave needs enclave_id or name")

    def terminate_all(self) -> list[dict[str, Any]]:
        result = self.run(["terminate-enclave", "--all"])
        # Before nitro-cli 1.4.3 --all printed objects one after another instead of an array.
        if isinstance(result, dict):
            return [result]
        return list(result or [])

    def describe_eif(self, eif_path: str) -> dict[str, Any]:
        return self.run(["describe-eif", "--eif-path", eif_path])

    def build_enclave(
        self,
        docker_uri: str,
        output_file: str,
        *,
        docker_dir: str | None = None,
        name: str | None = None,
        version: str | None = None,
        metadata_file: str | None = None,
        signing_certificate: str | None = None,
        private_key: str | None = None,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        args = ["build-enclave", "--docker-uri", docker_uri, "--output-file", output_file]
        for flag, value in (
            ("--docker-dir", docker_dir),
            ("--name", name),
            ("--version", version),
            ("--metadata", metadata_file),
            ("--signing-certificate", signing_certificate),
            ("--private-key", private_key),
        ):
            if value:
                args += [flag, value]
        return self.run(args, timeout=timeout)


def _text(data: str | bytes | None) -> str:
    if data is None:
        return ""
    return data.decode("utf-8", "replace") if isinstance(data, bytes) else data


def _json_from(stdout: str, cmd: Sequence[str]) -> Any:
    """stdout is one pretty JSON value, or (terminate --all before 1.4.3) several in a row."""
    text = stdout.strip()
    if not text:
        return None
    decoder = json.JSONDecoder()
    values: list[Any] = []
    index = 0
    try:
        while index < len(text):
            value, end = decoder.raw_decode(text, index)
            values.append(value)
            index = end
            while index < len(text) and text[index].isspace():
                index += 1
    except json.JSONDecodeError as exc:
        raise NitroCliError(
            f"could not parse the JSON printed by {' '.join(cmd[:2])}: {exc}", stdout=stdout, cmd=cmd
        ) from exc
    return values[0] if len(values) == 1 else values


# ---------------------------------------------------------------------------------------------
# Per-host launch lock: nitro-cli fails when two run-enclave calls race for the pool and names.


def default_lock_path() -> str:
    return os.path.join(os.environ.get("NITRO_CLI_SOCKETS_PATH") or DEFAULT_SOCKETS_PATH, LOCK_NAME)


@contextlib.contextmanager
def launch_lock(path: str | None = None, timeout: float = 300.0) -> Iterator[str]:
    """Hold an exclusive flock on `path` (default ``$NITRO_CLI_SOCKETS_PATH/.ansible-launch.lock``).
    Raises TimeoutError when another holder keeps it longer than `timeout` seconds."""
    lock_path = path or default_lock_path()
    directory = os.path.dirname(lock_path)
    if directory and not os.path.isdir(directory):
        # Same mode as nitro-cli's tmpfiles rule for /run/nitro_enclaves.
        os.makedirs(directory, mode=0o775, exist_ok=True)
    fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o660)
    try:
        deadline = time.monotonic() + timeout
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as exc:
                if exc.errno not in (errno.EAGAIN, errno.EACCES):
                    raise
                if time.monotonic() >= deadline:
                    raise TimeoutError(
                        f"another enclave launch on this host held {lock_path} for more than {timeout:g} s"
                    ) from exc
                time.sleep(0.1)
        yield lock_path
    finally:
        # Closing the descriptor releases the flock.
        os.close(fd)


# ---------------------------------------------------------------------------------------------
# Waiting for an enclave's vsock port (the transport rule of enclave_tokenizer/vsock.py)


def host_vsock_dir() -> str | None:
    """Emulated vsock directory for parent-side callers: $NITRO_VSOCK_DIR, else the emulator's default on an
    emulated host; None (AF_VSOCK) on a Nitro host."""
    return emulation_dir() or (DEFAULT_VSOCK_DIR if is_emulated() else None)


def vsock_connect(cid: int, port: int, timeout: float = 2.0) -> socket.socket:
    return connect(cid, port, timeout=timeout, emulated_dir=host_vsock_dir())


def wait_for_vsock(cid: int, port: int, timeout: float = 60.0, interval: float = 0.2) -> float:
    """Connect to (cid, port) until it accepts; returns the seconds waited. TimeoutError otherwise."""
    start = time.monotonic()
    last: OSError | None = None
    while True:
        try:
            vsock_connect(cid, port, timeout=min(2.0, max(timeout, 0.1))).close()
            return time.monotonic() - start
        except OSError as exc:
            last = exc
        if time.monotonic() - start >= timeout:
            where = describe(cid, port, host_vsock_dir())
            raise TimeoutError(f"nothing accepted on vsock {cid}:{port} ({where}) within {timeout:g} s: {last}")
        time.sleep(interval)
