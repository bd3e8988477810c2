"""`nitro-local-aws`: the local AWS endpoint used on emulated hosts and in tests.

It is moto's server with the behaviour moto lacks installed on top (see `kms.py`, `ec2.py`); boto3
clients reach it through `endpoint_url`. It binds loopback only.
"""

from __future__ import annotations

import argparse
import ipaddress
import signal
import sys
import threading
from collections.abc import Sequence

from enclave_tokenizer import redaction
from moto.server import ThreadedMotoServer

from . import extensions


def _loopback(host: str) -> str:
    if host != "localhost" and not ipaddress.ip_address(host).is_loopback:
        raise argparse.ArgumentTypeError(
            f"--host {host!r} is not a loopback address; the local endpoint only binds 127.0.0.0/8 or ::1"
        )
    return host


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nitro-local-aws", description=__doc__)
    parser.add_argument("--host", type=_loopback, default="127.0.0.1", help="loopback address (default 127.0.0.1)")
    parser.add_argument("--port", type=int, default=4566, help="TCP port (default 4566)")
    parser.add_argument(
        "--attestation-root",
        action="append",
        default=[],
        metavar="PEM",
        help="root certificate trusted for Recipient attestation documents (repeatable); "
        "default: the emulator's root on this host",
    )
    parser.add_argument(
        "--state-file",
        default=None,
        metavar="PATH",
        help="where KMS keys and SSM parameters persist across restarts (0600, atomic writes); default "
        "$NITRO_LOCAL_AWS_STATE or /var/lib/nitro-local-aws/state.json; '' keeps them in memory only",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    # moto, werkzeug (request lines) and botocore log through the masking (credentials, key material).
    redaction.setup("INFO")
    extensions.install(attestation_roots=args.attestation_root, state_file=args.state_file)
    server = ThreadedMotoServer(ip_address=args.host, port=args.port, verbose=False)
    server.start()
    print(f"nitro-local-aws listening on http://{args.host}:{args.port}", flush=True)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    stop.wait()
    server.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
