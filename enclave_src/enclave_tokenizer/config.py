"""The enclave server's configuration and the error an operation answers with (shared by its modules)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

from . import kms, protocol, vsock


@dataclass
class ServerConfig:
    port: int = 5000
    cid: int = vsock.VMADDR_CID_ANY
    max_frame: int = protocol.DEFAULT_MAX_FRAME
    max_batch: int = 10_000
    max_connections: int = 4096
    idle_timeout: float = 300.0  # no frame started for this long -> close
    frame_timeout: float = 10.0  # a frame must complete within this of its first byte (absolute, not per byte)
    write_timeout: float = 10.0  # a client that stops reading is dropped after this
    # Sized for the deployed enclave (192-224 MiB, interpreter ~40 MiB of it): answers waiting for one
    # client past write_buffer_limit stop the server reading that client; all clients' unsent answers past
    # output_budget get such a client dropped; all unfinished (or unread, paused) input past input_budget
    # gets the connection that grew it answered `busy` and closed.
    write_buffer_limit: int = 512 << 10
    output_budget: int = 32 << 20
    input_budget: int = 32 << 20
    max_slow_ops: int = 8  # attest/provision in flight across connections; more are answered `busy`
    max_slow_frame: int = 32 << 10  # an attest/provision request is a few KiB; bounds what waiting ones hold
    kms_timeout: float = 20.0
    proxy_cid: int = vsock.PARENT_CID
    proxy_port: int = kms.DEFAULT_PROXY_PORT
    # Set in the image (TOKENIZER_KMS_KEY_ARN, measured into PCR2): the only KMS key a data key may come from.
    kms_key_arn: str = ""
    # Worker processes sharing the listener (enclave_tokenizer.workers); 0: one per CPU this process may
    # run on (the enclave's vCPUs; the emulator pins the enclave to its CPUs).
    workers: int = 0
    # µs the event loop polls before it sleeps (enclave_tokenizer.eventloop); 0: plain asyncio.
    busy_poll_us: int = 50

    @classmethod
    def from_env(cls, **overrides: Any) -> ServerConfig:
        """Defaults, then TOKENIZER_<FIELD> env vars (set in the enclave image), then explicit overrides."""
        config = cls()
        for name, default in list(vars(config).items()):
            raw = os.environ.get(f"TOKENIZER_{name.upper()}")
            if raw is not None:
                setattr(config, name, type(default)(raw))
        for name, value in overrides.items():
            if value is not None:
                setattr(config, name, value)
        return config


class RequestError(Exception):
    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


class _WithId(RequestError):
    def __init__(self, request_id: Any, code: str, message: str) -> None:
        super().__init__(code, message)
        self.request_id = request_id
