"""nitro-cli's enclave lifetime commands, emulated: run-enclave, describe-enclaves, terminate-enclave, console.

Like nitro-cli, the CLI only parses arguments and talks to enclave processes over UNIX sockets in
``$NITRO_CLI_SOCKETS_PATH``; each enclave is owned by its own detached process
(:mod:`nitro_emulator.enclave_process`). Failures inside an enclave process reach the user the way
nitro-cli shows them: that process's ``[ Exx ]`` block, then ``Failed connections: 1`` and the CLI's own
``[ E39 ]`` (exit code 39).
"""

from __future__ import annotations

import argparse
import contextlib
import errno
import json
import re
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from . import state
from .enclave_process import recv_frame, send_frame, to_json
from .errors import NitroCliError

__all__ = [
    "console",
    "describe_enclaves",
    "run_enclave",
    "terminate_enclave",
]

REPLY_TIMEOUT_S = 3.0  # ENCLAVE_PROC_WAIT_TIMEOUT_MSEC
CONNECT_TIMEOUT_S = 20.0
U32_MAX = 0xFFFFFFFF
CONFIG_CONFLICTS = {
    "cpu_ids": "--cpu-ids <cpu-ids>...",
    "cpu_count": "--cpu-count <cpu-count>",
    "memory": "--memory <memory>",
    "eif_path": "--eif-path <eif-path>",
    "enclave_cid": "--enclave-cid <enclave-cid>",
    "debug_mode": "--debug-mode",
    "enclave_name": "--enclave-name <enclave-name>",
}


class UsageError(Exception):
    """An argument problem clap reports itself (exit code 2), not an E-code."""


def _usage(message: str) -> int:
    sys.stderr.write(f"error: {message}\n\nFor more information, try '--help'.\n")
    return 2


# --------------------------------------------------------------------------------------------- parsing


def parse_memory(value: str) -> int:
    """nitro-cli parse_memory: digits, then nothing/M/m (MiB), G/g (GiB) or T/t (TiB); else E03."""
    match = re.fullmatch(r"([0-9]+)([MmGgTt]?)", value)
    if not match:
        raise NitroCliError(3, "memory", value)
    scale = {"": 1, "m": 1, "g": 1024, "t": 1024 * 1024}[match.group(2).lower()]
    return int(match.group(1)) * scale


def _parse_u32(name: str, value: str) -> int:
    if not re.fullmatch(r"[0-9]+", value) or int(value) > U32_MAX:
        raise NitroCliError(3, name, value)
    return int(value)


def parse_enclave_cid(value: str) -> int | None:
    """nitro-cli parse_enclave_cid: 0 means auto; well-known, parent and u32::MAX CIDs are refused."""
    if not re.fullmatch(r"[0-9]+", value) or int(value) >= 1 << 64:
        raise NitroCliError(3, "enclave-cid", value)
    cid = int(value)
    if cid == 0:
        sys.stderr.write("The enclave CID will be auto-generated as the provided CID is 0\n")
        return None
    if cid in (1, 2, state.PARENT_CID) or cid >= U32_MAX:
        raise NitroCliError(3)
    return cid


def run_request(args: argparse.Namespace) -> dict[str, Any]:
    """The run arguments nitro-cli's RunEnclavesArgs::new_with builds from flags or --config."""
    if args.config:
        given = [flag for key, flag in CONFIG_CONFLICTS.items() if getattr(args, key, None) not in (None, False)]
        if given:
            raise UsageError(f"the argument '--config <config>' cannot be used with '{given[0]}'")
        try:
            text = Path(args.config).read_text(encoding="utf-8")
        except OSError:
            raise NitroCliError(19, args.config, "Open") from None
        try:
            data = json.loads(text)
            if not isinstance(data, dict) or not isinstance(data.get("eif_path"), str):
                raise ValueError("eif_path")
            memory = data.get("memory_mib")
            if isinstance(memory, bool) or not isinstance(memory, int) or memory < 0:
                raise ValueError("memory_mib")
            for key in ("cpu_count", "enclave_cid"):
                value = data.get(key)
                if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
                    raise ValueError(key)
            ids = data.get("cpu_ids")
            if ids is not None and not (
                isinstance(ids, list) and all(isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in ids)
            ):
                raise ValueError("cpu_ids")
            for key in ("debug_mode", "attach_console"):
                if not isinstance(data.get(key, False), bool):
                    raise ValueError(key)
            if data.get("enclave_name") is not None and not isinstance(data["enclave_name"], str):
                raise ValueError("enclave_name")
        except ValueError:
            raise NitroCliError(17, "Invalid JSON format for config file") from None
        if data.get("cpu_count") is not None and data.get("cpu_ids") is not None:
            raise NitroCliError(2)
        if data.get("cpu_count") is None and data.get("cpu_ids") is None:
            raise NitroCliError(1)
        attach = bool(data.get("attach_console")) or bool(args.attach_console)
        return {
            "eif_path": data["eif_path"],
            "memory_mib": data["memory_mib"],
            "cpu_ids": data.get("cpu_ids"),
            "cpu_count": data.get("cpu_count"),
            # Not validated by the CLI: the driver refuses bad CIDs (E29 from the enclave process).
            "enclave_cid": data.get("enclave_cid") or None,
            "debug_mode": bool(data.get("debug_mode")) or attach,
            "attach_console": attach,
            "enclave_name": data.get("enclave_name"),
        }
    required = (("--memory <memory>", args.memory), ("--eif-path <eif-path>", args.eif_path))
    missing = [flag for flag, value in required if value is None]
    if args.cpu_ids is None and args.cpu_count is None:
        missing.insert(0, "<--cpu-ids <cpu-ids>...|--cpu-count <cpu-count>>")
    if missing:
        raise UsageError("the following required arguments were not provided:\n  " + "\n  ".join(missing))
    return {
        "eif_path": args.eif_path,
        "memory_mib": parse_memory(args.memory),
        "cpu_ids": [_parse_u32("cpu-ids", v) for v in args.cpu_ids] if args.cpu_ids is not None else None,
        "cpu_count": _parse_u32("cpu-count", args.cpu_count) if args.cpu_count is not None else None,
        "enclave_cid": parse_enclave_cid(args.enclave_cid) if args.enclave_cid is not None else None,
        "debug_mode": bool(args.debug_mode or args.attach_console),
        "attach_console": bool(args.attach_console),
        "enclave_name": args.enclave_name,
    }


# --------------------------------------------------------------------------------------------- replies


def _read_replies(sock: socket.socket, forward_stderr: bool = True) -> tuple[str, int | None]:
    """Drain one enclave process's reply stream: stderr is shown at once, stdout collected."""
    stdout: list[str] = []
    status: int | None = None
    while True:
        try:
            frame = recv_frame(sock)
        except (OSError, ValueError):
            break
        if frame is None:
            break
        if not isinstance(frame, dict):
            continue
        if "stderr" in frame and forward_stderr:
            sys.stderr.write(str(frame["stderr"]))
            sys.stderr.flush()
        if "stdout" in frame:
            stdout.append(str(frame["stdout"]))
        if "status" in frame:
            status = int(frame["status"])
    sock.close()
    return "".join(stdout), status


def _json_object(text: str) -> dict[str, Any] | None:
    try:
        value = json.loads(text)
    except ValueError:
        return None
    return value if isinstance(value, dict) else None


def _check_replies(objects: list[tuple[dict[str, Any], int]], failed: int, allowed: tuple[int, ...] = (0,)) -> None:
    """nitro-cli enclave_process_handle_all_replies: E38 for bad statuses, else E39 for lost ones."""
    if failed:
        sys.stderr.write(f"Failed connections: {failed}\n")
    bad = [obj for obj, status in objects if status not in allowed]
    if bad:
        raise NitroCliError(38, f"Failed to execute {len(bad)} enclave process commands")
    if failed:
        raise NitroCliError(39, f"Failed to connect to {failed} enclave processes")


def _sockets() -> list[Path]:
    base = state.sockets_dir()
    try:
        entries = sorted(base.iterdir())
    except OSError as exc:
        raise NitroCliError(7, f"Failed to access sockets directory: {exc}") from None
    return [path for path in entries if path.name.endswith(".sock") and not path.is_dir()]


def _connect_all() -> list[socket.socket]:
    """A connection to every enclave process; sockets nobody listens on are stale and removed."""
    conns: list[socket.socket] = []
    paths = _sockets()
    with state.locked():
        pass  # prunes the driver slots (and vsock dirs, state) of enclave processes that died
    for path in paths:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.settimeout(REPLY_TIMEOUT_S)
            sock.connect(str(path))
        except PermissionError:
            sock.close()
        except OSError:
            sock.close()
            with contextlib.suppress(OSError):
                path.unlink()
        else:
            conns.append(sock)
    return conns


def _broadcast(request: dict[str, Any], forward_stderr: bool = True) -> tuple[list[tuple[dict[str, Any], int]], int]:
    """Send `request` to every enclave process; their JSON objects with statuses, and how many failed."""
    objects: list[tuple[dict[str, Any], int]] = []
    failed = 0
    for sock in _connect_all():
        try:
            send_frame(sock, request)
        except OSError:
            sock.close()
            failed += 1
            continue
        stdout, status = _read_replies(sock, forward_stderr)
        obj = _json_object(stdout)
        if obj is None or status is None:
            failed += 1
        else:
            objects.append((obj, status))
    return objects, failed


def _describe_all() -> list[dict[str, Any]]:
    objects, _failed = _broadcast({"cmd": "describe"}, forward_stderr=False)
    return [obj for obj, status in objects if status == 0]


def _connect_single(enclave_id: str) -> socket.socket:
    path = state.socket_path(state.slot_of(enclave_id))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.settimeout(CONNECT_TIMEOUT_S)
        sock.connect(str(path))
    except OSError as exc:
        sock.close()
        raise NitroCliError(11, f"Failed to connect to specific enclave process: {exc}") from None
    sock.settimeout(None)
    return sock


def _id_by_name(name: str) -> str:
    matches = [obj["EnclaveID"] for obj in _describe_all() if obj.get("EnclaveName") == name]
    if not matches:
        raise NitroCliError(58, "No enclave matched the given name.")
    if len(matches) > 1:
        raise NitroCliError(58, "Conflicting enclave names have been found.")
    return str(matches[0])


# --------------------------------------------------------------------------------------------- commands


def _spawn_enclave_process() -> tuple[socket.socket, int]:
    cli_end, proc_end = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "nitro_emulator.enclave_process", str(proc_end.fileno())],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            pass_fds=(proc_end.fileno(),),
            start_new_session=True,  # detached like nitro-cli's daemonized enclave process
            close_fds=True,
        )
    except OSError as exc:
        cli_end.close()
        raise NitroCliError(5, f"Failed to create enclave process: {exc}") from None
    finally:
        proc_end.close()
    return cli_end, proc.pid


def run_enclave(args: argparse.Namespace) -> int:
    try:
        request = run_request(args)
    except UsageError as exc:
        return _usage(str(exc))
    _sockets()  # nitro-cli lists running enclaves for the name first: a missing sockets dir is E07
    sock, _pid = _spawn_enclave_process()
    try:
        send_frame(sock, request)
    except OSError as exc:
        sock.close()
        raise NitroCliError(39, f"Failed to send the run command: {exc}") from None
    stdout, status = _read_replies(sock)
    info = _json_object(stdout)
    objects = [(info, status if status is not None else -1)] if info is not None else []
    failed = 0 if info is not None else 1
    if info is not None:
        print(to_json(info), flush=True)
    _check_replies(objects, failed)
    if request["attach_console"] and info is not None:
        return _console_stream(str(info["EnclaveID"]), int(info["EnclaveCID"]), None)
    return 0


def describe_enclaves(args: argparse.Namespace) -> int:
    objects, failed = _broadcast({"cmd": "describe", "metadata": bool(getattr(args, "metadata", False))})
    print(to_json([obj for obj, _status in objects]), flush=True)
    _check_replies(objects, failed)
    return 0


def _terminate_one(enclave_id: str) -> int:
    sock = _connect_single(enclave_id)
    try:
        send_frame(sock, {"cmd": "terminate"})
    except OSError as exc:
        sock.close()
        raise NitroCliError(11, f"Failed to send the terminate command: {exc}") from None
    stdout, status = _read_replies(sock)
    obj = _json_object(stdout)
    if obj is not None:
        print(to_json(obj), flush=True)
    _check_replies([(obj, status if status is not None else -1)] if obj is not None else [], 0 if obj else 1)
    return 0


def terminate_enclave(args: argparse.Namespace) -> int:
    if getattr(args, "all", False):
        try:
            objects, failed = _broadcast({"cmd": "terminate"})
        except NitroCliError as error:
            if error.code == 7:  # nitro-cli reads the directory itself here: E19
                raise NitroCliError(19, state.sockets_dir(), "Open") from None
            raise
        print(to_json([obj for obj, _status in objects]), flush=True)
        _check_replies(objects, failed, allowed=(0, errno.EACCES))
        return 0
    if args.enclave_name is not None:
        return _terminate_one(_id_by_name(args.enclave_name))
    return _terminate_one(args.enclave_id)


def _console_stream(enclave_id: str, cid: int, timeout: float | None) -> int:
    sock = _connect_single(enclave_id)
    print(f"Connecting to the console for enclave {cid}...", flush=True)
    try:
        send_frame(sock, {"cmd": "console"})
        reply = recv_frame(sock)
    except (OSError, ValueError) as exc:
        sock.close()
        raise NitroCliError(44, f"Failed to connect to the enclave console: {exc}") from None
    if not isinstance(reply, dict) or not reply.get("console"):
        sock.close()
        raise NitroCliError(
            44, "The enclave was not started with the debug flag set, include '--debug-mode' in the run-enclave command"
        )
    print("Successfully connected to the console.", flush=True)
    deadline = None if timeout is None else time.monotonic() + timeout
    out = sys.stdout.buffer
    try:
        while True:
            if deadline is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                sock.settimeout(left)
            try:
                data = sock.recv(65536)
            except TimeoutError:
                break
            if not data:
                break
            out.write(data)
            out.flush()
    except (BrokenPipeError, KeyboardInterrupt):
        pass
    finally:
        sock.close()
    return 0


def console(args: argparse.Namespace) -> int:
    timeout: float | None = None
    if getattr(args, "disconnect_timeout", None) is not None:
        if not re.fullmatch(r"[0-9]+", args.disconnect_timeout):
            raise NitroCliError(3, "disconnect-timeout", args.disconnect_timeout)
        timeout = float(int(args.disconnect_timeout))
    enclave_id = _id_by_name(args.enclave_name) if args.enclave_name is not None else args.enclave_id
    sock = _connect_single(enclave_id)
    send_frame(sock, {"cmd": "describe"})
    stdout, _status = _read_replies(sock, forward_stderr=False)
    info = _json_object(stdout)
    if info is None:
        raise NitroCliError(11, "Failed to read the enclave's CID and flags")
    if info.get("Flags") != "DEBUG_MODE":
        raise NitroCliError(
            44, "The enclave was not started with the debug flag set, include '--debug-mode' in the run-enclave command"
        )
    return _console_stream(enclave_id, int(info["EnclaveCID"]), timeout)
