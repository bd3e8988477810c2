"""The per-enclave "enclave process" (nitro-cli §5.12): a detached daemon that owns one enclave.

``run-enclave`` starts ``python -m nitro_emulator.enclave_process FD`` in a new session with FD one end
of a socket pair. The process reads the run arguments from it, validates and reserves resources in the
emulated driver table (under its lock), boots the enclave (:mod:`nitro_emulator.isolation`), serves the
NSM for it, reports progress/JSON/errors back over the pair and then listens on
``<sockets dir>/<slot>.sock`` for describe/terminate/console requests. It cleans everything up (driver
slot, sockets, NSM, vsock directory, cgroup, state) when the enclave exits, on terminate and on SIGTERM;
if it is killed outright the enclave dies with it (PDEATHSIG) and the next command prunes the leftovers.

Wire format (CLI <-> enclave process): frames of a u64 little-endian length and a JSON value, like
nitro-cli's u64 + CBOR frames. Replies are a stream of ``{"stdout": str}``, ``{"stderr": str}`` and
``{"status": int}`` frames, ended by closing the connection.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import secrets
import select
import signal
import socket
import struct
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.enclave_spec import MIN_MEMORY_MIB, eif_memory_mib
from enclave_tokenizer import protocol

from . import state
from .errors import NitroCliError

MAX_FRAME = 16 << 20
BOOT_TIMEOUT_S = 90.0  # nitro-cli's heartbeat timeout for images up to 6 GiB
FIRST_AUTO_CID = 16
MAX_CID = 0xFFFFFFFF
DEBUG_FLAG = 1
READ_ONLY_COMMANDS = frozenset({"describe"})
SO_PEERCRED_FORMAT = "3i"

# Driver ioctl failure texts (nitro-cli resource_manager.rs do_ioctl); all surface as E29.
VCPU_ALREADY_USED = "The provided vCPU is already used"
NO_CPUS_AVAILABLE = "The enclave cannot be created because no CPUs are available in the pool"
NO_VCPUS_ADDED = "The enclave cannot start because no vCPUs have been added"
FULL_CORES = "The enclave cannot start because full CPU cores have not been set"
MEMORY_MIN = "The enclave's memory size is lower than the minimum supported"
INVALID_CID = "The provided enclave CID is invalid, being a well-known CID or the parent VM CID"
CID_IN_USE = "The provided enclave CID is already used by another enclave"  # emulator: unique CIDs


# --------------------------------------------------------------------------------------------- framing


# nitro-cli's socket framing: a little-endian u64 length, then the JSON body.
_HEADER = struct.Struct("<Q")


def send_frame(sock: socket.socket, value: Any) -> None:
    sock.sendall(protocol.frame(json.dumps(value).encode("utf-8"), _HEADER))


def recv_frame(sock: socket.socket) -> Any:
    """The next frame, or None at a clean end of stream. Raises ValueError on garbage."""
    try:
        payload = protocol.recv_frame(sock, MAX_FRAME, _HEADER)
    except protocol.ProtocolError as exc:
        raise ValueError(f"frame too large: {exc.message}") from None
    except EOFError:
        raise ValueError("truncated frame") from None
    return None if payload is None else json.loads(payload)


class Channel:
    """Reply stream to one CLI connection; tolerant of a CLI that went away."""

    def __init__(self, sock: socket.socket) -> None:
        self.sock = sock
        self.lock = threading.Lock()

    def _send(self, value: dict[str, Any]) -> None:
        with self.lock, contextlib.suppress(OSError):
            send_frame(self.sock, value)

    def stdout(self, text: str) -> None:
        self._send({"stdout": text if text.endswith("\n") else text + "\n"})

    def stderr(self, text: str) -> None:
        self._send({"stderr": text if text.endswith("\n") else text + "\n"})

    def status(self, code: int) -> None:
        self._send({"status": code})

    def close(self) -> None:
        with contextlib.suppress(OSError):
            self.sock.shutdown(socket.SHUT_RDWR)
        self.sock.close()


def to_json(value: Any) -> str:
    """serde_json::to_string_pretty layout."""
    return json.dumps(value, indent=2, ensure_ascii=False)


# --------------------------------------------------------------------------------------------- launch


@dataclass
class RunRequest:
    eif_path: str
    memory_mib: int
    cpu_ids: list[int] | None
    cpu_count: int | None
    enclave_cid: int | None
    debug_mode: bool
    enclave_name: str | None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> RunRequest:
        return cls(
            eif_path=str(data["eif_path"]),
            memory_mib=int(data["memory_mib"]),
            cpu_ids=[int(c) for c in data["cpu_ids"]] if data.get("cpu_ids") is not None else None,
            cpu_count=int(data["cpu_count"]) if data.get("cpu_count") is not None else None,
            enclave_cid=int(data["enclave_cid"]) if data.get("enclave_cid") is not None else None,
            debug_mode=bool(data.get("debug_mode")),
            enclave_name=data.get("enclave_name"),
        )


def default_name(eif_path: str) -> str:
    """nitro-cli: the EIF file name with every trailing `.eif` removed."""
    name = Path(eif_path).name
    while name.endswith(".eif"):
        name = name[: -len(".eif")]
    return name


def unique_name(wanted: str, taken: set[str]) -> str:
    if wanted not in taken:
        return wanted
    index = 1
    while f"{wanted}_{index}" in taken:
        index += 1
    return f"{wanted}_{index}"


def check_cpu_request(request: RunRequest, pool: list[int]) -> None:
    """nitro-cli cpu_info.rs: duplicates (E20), ids outside the pool (E21), count above the pool (E22)."""
    if request.cpu_ids is not None:
        ids = request.cpu_ids
        unique = sorted(set(ids))
        if len(unique) < len(ids):
            duplicates = "".join(str(cpu) for cpu in unique if ids.count(cpu) > 1)
            raise NitroCliError(20, "cpu-ids", duplicates)
        for cpu in unique:
            if cpu not in pool:
                raise NitroCliError(21, "cpu-ids", cpu)
    elif request.cpu_count is not None and request.cpu_count > len(pool):
        raise NitroCliError(22, "cpu-count", request.cpu_count)


def check_memory_request(memory_mib: int, eif_size: int) -> None:
    """nitro-cli resource_manager.rs: memory must be non-zero and at least 4x the EIF size (E26)."""
    if memory_mib == 0:
        raise NitroCliError(26, "memory", 0)
    if 4 * eif_size > memory_mib << 20:
        raise NitroCliError(26, "memory", memory_mib, eif_memory_mib(eif_size))


def pick_cpus(request: RunRequest, cores: list[list[int]], pool: list[int], used: set[int]) -> list[int]:
    """The driver's vCPU assignment (§6): explicit ids must be free; a count takes free siblings of cores
    already held first, else the lowest free core; every touched core must end up complete."""
    core_of = {cpu: tuple(core) for core in cores for cpu in core}
    chosen: list[int] = []
    if request.cpu_ids is not None:
        for cpu in request.cpu_ids:
            if cpu in used:
                raise NitroCliError(29, VCPU_ALREADY_USED)
            chosen.append(cpu)
    else:
        for _ in range(request.cpu_count or 0):
            held = [cpu for core in {core_of.get(c, (c,)) for c in chosen} for cpu in core]
            sibling = [cpu for cpu in sorted(held) if cpu not in chosen and cpu not in used]
            if sibling:
                chosen.append(sibling[0])
                continue
            free = [core for core in cores if not any(cpu in used or cpu in chosen for cpu in core)]
            if not free:
                raise NitroCliError(29, NO_CPUS_AVAILABLE)
            chosen.append(min(free[0]))
    if not chosen:
        raise NitroCliError(29, NO_VCPUS_ADDED)
    for cpu in chosen:
        if any(sibling not in chosen for sibling in core_of.get(cpu, (cpu,)) if sibling in pool):
            raise NitroCliError(29, FULL_CORES)
    return chosen


def pick_cid(requested: int | None, used: set[int]) -> int:
    if requested:
        if requested in (1, 2, state.PARENT_CID) or requested >= MAX_CID:
            raise NitroCliError(29, INVALID_CID)
        if requested in used:
            raise NitroCliError(29, CID_IN_USE)
        return requested
    cid = FIRST_AUTO_CID
    while cid in used or (state.vsock_dir() / str(cid)).exists():
        cid += 1
    return cid


class Enclave:
    """The enclave this process owns."""

    def __init__(self, chan: Channel, request: RunRequest) -> None:
        self.chan = chan
        self.request = request
        self.slot: state.Slot | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        self.nsm: Any = None
        self.cgroup: Path | None = None
        self.listener: socket.socket | None = None
        self.measurements: dict[str, str] = {}
        self.metadata: dict[str, Any] | None = None
        self.state = "RUNNING"
        self.finished = threading.Event()  # the enclave's init has exited
        self.cleaned = threading.Event()  # every resource is released
        self.console_path: Path | None = None
        self.inflight: set[threading.Thread] = set()
        # The measured EIF, held open until the enclave has unpacked it (see launch).
        self.eif_fd: int | None = None
        self.eif_windows: list[tuple[int, int]] = []

    # ---- launch

    def launch(self) -> None:
        from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.eif import (
            EifError,
            metadata_describe,
            ramdisk_windows,
            read_eif,
        )

        request = self.request
        eif_path = os.path.abspath(request.eif_path)
        try:
            self.eif_fd = os.open(eif_path, os.O_RDONLY | os.O_CLOEXEC)
            eif_size = os.fstat(self.eif_fd).st_size
        except OSError:
            raise NitroCliError(19, eif_path, "Open") from None
        # nitro-cli checks a signed EIF's COSE signature and certificate dates before measuring it (E59).
        from .signing import verify_before_run

        verify_before_run(eif_path)
        try:
            image = read_eif(eif_path)
            # The enclave is unpacked from this descriptor (no second pass over the file), so it must be
            # the file just measured: an EIF renamed over meanwhile (a rollout's copy) is refused.
            if not os.path.samestat(os.fstat(self.eif_fd), os.stat(eif_path)):
                raise EifError(f"{eif_path} was replaced while it was read; run the enclave again")
            self.eif_windows = ramdisk_windows(image)
            self.measurements = image.measurements
            if image.metadata is not None:
                self.metadata = {
                    "ImageName": image.metadata["ImageName"],
                    "ImageVersion": image.metadata["ImageVersion"],
                    "Metadata": metadata_describe(image.metadata),
                }
        except EifError as exc:
            raise NitroCliError(35, exc) from None
        from .allocator import load_pool, round_to_pages

        with state.locked() as table:
            pool = load_pool()
            check_cpu_request(request, pool["cpu_pool"])
            check_memory_request(request.memory_mib, eif_size)
            name = unique_name(request.enclave_name or default_name(eif_path), table.names())
            self.chan.stderr("Start allocating memory...")
            allocated = round_to_pages(request.memory_mib)
            if allocated > pool["memory_mib"] - table.used_memory_mib():
                raise NitroCliError(27, "memory", request.memory_mib)
            cpus = pick_cpus(request, pool["cores"], pool["cpu_pool"], table.used_cpus())
            if allocated < MIN_MEMORY_MIB:  # NE_MIN_ENCLAVE_MEM_SIZE
                raise NitroCliError(29, MEMORY_MIN)
            cid = pick_cid(request.enclave_cid, table.used_cids())
            slot_uid = f"{secrets.randbits(60) | 1 << 56:x}"
            while slot_uid in table.slots:
                slot_uid = f"{secrets.randbits(60) | 1 << 56:x}"
            self.slot = state.Slot(
                slot_uid=slot_uid,
                enclave_id=f"{state.instance_id()}-enc{slot_uid}",
                enclave_name=name,
                pid=os.getpid(),
                pid_start=state.process_start_time(os.getpid()) or "",
                cid=cid,
                cpu_ids=cpus,
                memory_mib=allocated,
                flags=DEBUG_FLAG if request.debug_mode else 0,
                state_dir=str(state.sockets_dir() / f"{slot_uid}.d"),
                extra={"eif_path": eif_path},
            )
            table.add(self.slot)
        try:
            self._boot(image)
        except BaseException:
            self.cleanup()
            raise

    def _boot(self, image: Any) -> None:
        from . import isolation
        from .nsm import start_nsm_server

        slot = self.slot
        assert slot is not None
        state_dir = Path(slot.state_dir)
        state_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        (state_dir / "root").mkdir(mode=0o755, exist_ok=True)
        vsock = state.ensure_dir(state.vsock_dir(), 0o755)
        # Parent-side listeners (any host user) live in CID 3's directory, like /tmp.
        parent_dir = state.ensure_dir(vsock / str(state.PARENT_CID), 0o1777)
        with contextlib.suppress(OSError):
            os.chmod(parent_dir, 0o1777)  # noqa: S103 - any parent user may listen, like /tmp
        cid_dir = vsock / str(slot.cid)
        if cid_dir.exists():
            import shutil

            shutil.rmtree(cid_dir, ignore_errors=True)
        cid_dir.mkdir(mode=0o755)

        pcrs = {int(key[3:]): bytes.fromhex(value) for key, value in image.pcrs.items() if key.startswith("PCR")}
        pcrs.update(state.host_pcrs())  # PCR3 = the instance's role, PCR4 = its id, as a real NSM fills them
        nsm_socket = state_dir / "nsm.sock"
        self.nsm = start_nsm_server(
            nsm_socket, pcrs, slot.enclave_id, home=state.emulator_home(), debug=bool(slot.flags & DEBUG_FLAG)
        )

        if slot.flags & DEBUG_FLAG:
            self.console_path = state_dir / "console.log"
            console_fd = os.open(self.console_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        else:
            # Production enclaves have no console: their output goes nowhere, as on Nitro.
            console_fd = os.open(os.devnull, os.O_WRONLY | os.O_CLOEXEC)
        self.cgroup = isolation.create_cgroup(f"nitro-enclave-{slot.slot_uid}", slot.memory_mib)
        if self.cgroup is not None:
            with state.locked(prune=False) as table:
                if slot.slot_uid in table.slots:
                    table.slots[slot.slot_uid].extra["cgroup"] = str(self.cgroup)
                    table.save()
        ready_r, ready_w = os.pipe()
        spec = {
            "eif_path": slot.extra["eif_path"],
            "workdir": str(state_dir / "root"),
            "memory_mib": slot.memory_mib,
            "cid": slot.cid,
            "vsock_dir": str(vsock),
            "nsm_socket": str(nsm_socket),
            "ready_fd": ready_w,
            "enclave_id": slot.enclave_id,
            "hostname": "enclave",
            "eif_fd": self.eif_fd,
            "ramdisks": self.eif_windows,
            "rootfs_cache": str(cache)
            if (cache := isolation.rootfs_cache(image, f"/proc/self/fd/{self.eif_fd}", state.rootfs_cache_dir()))
            else None,
        }
        spec_path = state_dir / "spec.json"
        spec_path.write_text(json.dumps(spec), encoding="utf-8")
        try:
            self.proc = subprocess.Popen(
                isolation.command(spec_path),
                stdin=subprocess.DEVNULL,
                stdout=console_fd,
                stderr=console_fd,
                pass_fds=(ready_w, self.eif_fd),
                preexec_fn=isolation.preexec(self.cgroup, isolation.host_cpus(slot.cpu_ids), slot.memory_mib),  # noqa: PLW1509 - PDEATHSIG/cgroup/affinity must be set between fork and exec
                close_fds=True,
            )
        except OSError as exc:
            raise NitroCliError(5, f"Failed to start the enclave: {exc}") from None
        finally:
            os.close(ready_w)
            os.close(console_fd)
            self._close_eif()
        self.chan.stderr(
            f"Started enclave with enclave-cid: {slot.cid}, memory: {slot.memory_mib} MiB, "
            f"cpu-ids: [{', '.join(str(cpu) for cpu in slot.cpu_ids)}]"
        )
        self._wait_heartbeat(ready_r)

    def _wait_heartbeat(self, ready_r: int) -> None:
        from .isolation import HEARTBEAT

        try:
            readable, _, _ = select.select([ready_r], [], [], BOOT_TIMEOUT_S)
            data = os.read(ready_r, 4096) if readable else None
        finally:
            os.close(ready_r)
        if data == HEARTBEAT:
            return
        if data is None:
            reason = "timed out"
        elif data.startswith(b"E"):
            reason = data[1:].decode("utf-8", "replace")
        else:
            reason = "the enclave exited before signalling it had booted"
        raise NitroCliError(36, f"Waiting on enclave to boot failed with error {reason}")

    def run_info(self) -> dict[str, Any]:
        slot = self.slot
        assert slot is not None
        return {
            "EnclaveName": slot.enclave_name,
            "EnclaveID": slot.enclave_id,
            "ProcessID": os.getpid(),
            "EnclaveCID": slot.cid,
            "NumberOfCPUs": len(slot.cpu_ids),
            "CPUIDs": slot.cpu_ids,
            "MemoryMiB": slot.memory_mib,
        }

    def describe_info(self, metadata: bool) -> dict[str, Any]:
        slot = self.slot
        assert slot is not None
        info = self.run_info()
        info["State"] = self.state
        info["Flags"] = "DEBUG_MODE" if slot.flags & DEBUG_FLAG else "NONE"
        info["Measurements"] = self.measurements
        if metadata and self.metadata is not None:
            info.update(self.metadata)
        return info

    # ---- serving

    def listen(self) -> None:
        slot = self.slot
        assert slot is not None
        path = state.socket_path(slot.slot_uid)
        with contextlib.suppress(FileNotFoundError):
            path.unlink()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.bind(str(path))
        # nitro-cli's mode: others may describe, only the owner and root may act (checked per request).
        os.chmod(path, 0o766)  # noqa: S103
        sock.listen(16)
        self.listener = sock
        threading.Thread(target=self._accept_loop, name="enclave-accept", daemon=True).start()

    def _accept_loop(self) -> None:
        listener = self.listener
        assert listener is not None
        while not self.cleaned.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            thread = threading.Thread(target=self._serve, args=(conn,), name="enclave-conn", daemon=True)
            self.inflight.add(thread)
            thread.start()

    def _serve(self, conn: socket.socket) -> None:
        chan = Channel(conn)
        try:
            conn.settimeout(10)
            request = recv_frame(conn)
            conn.settimeout(None)
            if not isinstance(request, dict):
                return
            command = request.get("cmd")
            uid = struct.unpack(SO_PEERCRED_FORMAT, conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12))[1]
            if command not in READ_ONLY_COMMANDS and uid not in (0, os.getuid()):
                chan.status(errno.EACCES)
                return
            if command == "describe":
                chan.stdout(to_json(self.describe_info(bool(request.get("metadata")))))
                chan.status(0)
            elif command == "terminate":
                self.terminate()
                slot = self.slot
                assert slot is not None
                chan.stderr(f"Successfully terminated enclave {slot.enclave_id}.")
                result = {"EnclaveName": slot.enclave_name, "EnclaveID": slot.enclave_id, "Terminated": True}
                chan.stdout(to_json(result))
                chan.status(0)
            elif command == "console":
                self._stream_console(conn)
            else:
                chan.status(errno.EINVAL)
        except (OSError, ValueError):
            return
        finally:
            chan.close()
            self.inflight.discard(threading.current_thread())

    def _stream_console(self, conn: socket.socket) -> None:
        if self.console_path is None:
            send_frame(conn, {"status": 44})
            return
        send_frame(conn, {"console": True})
        with open(self.console_path, "rb") as console:
            while True:
                data = console.read(65536)
                if data:
                    conn.sendall(data)
                elif self.finished.is_set():
                    return
                else:
                    time.sleep(0.05)

    def terminate(self) -> None:
        """Kill the enclave and wait until every resource is released (what terminate-enclave reports)."""
        self.state = "TERMINATING"
        self.kill()
        self.cleaned.wait(timeout=60)

    def kill(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            # SIGKILL to `unshare` kills PID 1 of the enclave (--kill-child), which ends the namespace.
            with contextlib.suppress(ProcessLookupError):
                proc.kill()

    def wait(self) -> None:
        proc = self.proc
        assert proc is not None
        proc.wait()
        self.finished.set()

    def _close_eif(self) -> None:
        if self.eif_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self.eif_fd)
            self.eif_fd = None

    def cleanup(self) -> None:
        from . import isolation

        self.finished.set()
        self._close_eif()
        if self.listener is not None:
            with contextlib.suppress(OSError):
                self.listener.close()
        if self.nsm is not None:
            with contextlib.suppress(Exception):
                self.nsm.close()
        self.kill()
        if self.proc is not None:
            with contextlib.suppress(Exception):
                self.proc.wait(timeout=30)
        isolation.remove_cgroup(self.cgroup)
        if self.slot is not None:
            state.remove_slot_files(self.slot)
            with state.locked(prune=False) as table:
                table.remove(self.slot.slot_uid)
        self.cleaned.set()


def serve(fd: int) -> int:
    chan_sock = socket.socket(fileno=fd)
    chan = Channel(chan_sock)
    try:
        request = RunRequest.from_dict(recv_frame(chan_sock))
    except (OSError, ValueError, TypeError, KeyError) as exc:
        chan.stderr(NitroCliError(17, f"Invalid run arguments: {exc}").render())
        chan.status(errno.EINVAL)
        chan.close()
        return 1
    enclave = Enclave(chan, request)
    try:
        enclave.launch()
    except NitroCliError as error:
        chan.stderr(error.render())
        chan.status(errno.EINVAL)
        chan.close()
        return error.code
    except Exception as exc:  # report anything else like nitro-cli reports an unexpected failure
        chan.stderr(NitroCliError(0, f"{type(exc).__name__}: {exc}").render())
        chan.status(errno.EINVAL)
        chan.close()
        return 1

    def on_signal(signum: int, _frame: Any) -> None:
        enclave.state = "TERMINATING"
        enclave.kill()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    enclave.listen()
    chan.stdout(to_json(enclave.run_info()))
    chan.status(0)
    chan.close()
    enclave.wait()
    enclave.cleanup()
    # Let a terminate request in flight send its reply; console streams end on their own.
    deadline = time.monotonic() + 5
    for thread in list(enclave.inflight):
        thread.join(timeout=max(0.0, deadline - time.monotonic()))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    return serve(int(args[0]))


if __name__ == "__main__":
    sys.exit(main())
