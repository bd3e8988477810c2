"""`nitro-cli-emulator`: nitro-cli's commands, flags, JSON and `[ Exx ]` errors on hosts without
/dev/nitro_enclaves. Roles link it as `nitro-cli` only there; real Nitro hosts run the real CLI.

Extra subcommands stand in for the host services nitro-cli relies on: `allocator` (the
nitro-enclaves-allocator service) and `vsock-proxy`.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from .errors import NitroCliError, report

VERSION = "1.4.2"

# subcommand -> "module:function"; each takes the parsed Namespace and returns an exit code.
HANDLERS: dict[str, str] = {
    "build-enclave": "build:build_enclave",
    "describe-eif": "build:describe_eif",
    "pcr": "build:pcr",
    "sign-eif": "build:sign_eif",
    "run-enclave": "runtime:run_enclave",
    "describe-enclaves": "runtime:describe_enclaves",
    "terminate-enclave": "runtime:terminate_enclave",
    "console": "runtime:console",
    "allocator apply": "allocator:allocator_apply",
    "allocator show": "allocator:allocator_show",
    # Only the proxy needs asyncio: describe-enclaves, which supervisors and gateways run every few
    # seconds on every host, starts without it.
    "vsock-proxy": "vsock_proxy:vsock_proxy",
}


def _add_build(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("build-enclave", help="Builds an enclave image and saves it to a file.")
    p.add_argument("--docker-uri", required=True, help="Docker image URI (:latest when untagged)")
    p.add_argument("--docker-dir", help="Build the image from this directory's Dockerfile first")
    p.add_argument("--output-file", required=True, help="Path of the EIF to write")
    p.add_argument("--signing-certificate", help="PEM certificate for PCR8 (needs --private-key)")
    p.add_argument("--private-key", help="EC private key PEM file or KMS key ARN that signs the EIF")
    p.add_argument("--name", help="Image name stored in the metadata section")
    p.add_argument("--version", dest="image_version", help="Image version stored in the metadata section")
    p.add_argument("--metadata", help="JSON file with custom metadata")

    p = sub.add_parser("describe-eif", help="Returns information about the enclave image.")
    p.add_argument("--eif-path", required=True)

    p = sub.add_parser("sign-eif", help="Signs an existing enclave image (adds or replaces its signature).")
    p.add_argument("--eif-path")
    p.add_argument("--signing-certificate", help="PEM certificate for PCR8")
    p.add_argument("--private-key", help="EC private key PEM file or KMS key ARN")

    p = sub.add_parser("pcr", help="Returns the PCR value of a file or a signing certificate.")
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--input")
    group.add_argument("--signing-certificate")


def _add_runtime(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("run-enclave", help="Starts a new enclave.")
    cpus = p.add_mutually_exclusive_group()
    cpus.add_argument("--cpu-ids", nargs="+", help="CPU ids to give the enclave")
    cpus.add_argument("--cpu-count", help="Number of CPUs to give the enclave")
    p.add_argument("--memory", help="Memory in MiB (M/G/T suffixes accepted)")
    p.add_argument("--eif-path")
    p.add_argument("--enclave-cid")
    p.add_argument("--debug-mode", action="store_true")
    p.add_argument("--attach-console", action="store_true")
    p.add_argument("--enclave-name")
    p.add_argument("--config", help="JSON file with the run-enclave arguments")

    p = sub.add_parser("describe-enclaves", help="Returns a list of the running enclaves.")
    p.add_argument("--metadata", action="store_true")

    p = sub.add_parser("terminate-enclave", help="Terminates an enclave.")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--enclave-id")
    which.add_argument("--enclave-name")
    which.add_argument("--all", action="store_true")

    p = sub.add_parser("console", help="Connects to the console of an enclave (debug mode only).")
    which = p.add_mutually_exclusive_group(required=True)
    which.add_argument("--enclave-id")
    which.add_argument("--enclave-name")
    p.add_argument("--disconnect-timeout")

    p = sub.add_parser("allocator", help="Emulated nitro-enclaves-allocator service.")
    actions = p.add_subparsers(dest="action", required=True)
    actions.add_parser("apply", help="Validate allocator.yaml and reserve the CPU pool and memory.")
    actions.add_parser("show", help="Print the reserved CPU pool and memory as JSON.")

    p = sub.add_parser("vsock-proxy", help="Emulated vsock-proxy: parent (CID 3) port -> TCP address.")
    # Ports and workers stay strings: vsock-proxy validates them itself ("Local port is not valid" ...).
    p.add_argument("local_port", help="Local vsock port (CID 3) to listen on")
    p.add_argument("remote_addr", help="Address of the server to be proxied")
    p.add_argument("remote_port", help="Remote TCP port")
    p.add_argument("--config", default="/etc/nitro_enclaves/vsock-proxy.yaml", help="allowlist YAML")
    p.add_argument("--num_workers", "--workers", "-w", dest="workers", default="4", help="max simultaneous connections")
    family = p.add_mutually_exclusive_group()
    family.add_argument("--ipv4", "-4", action="store_true", help="IPv4 addresses only")
    family.add_argument("--ipv6", "-6", action="store_true", help="IPv6 addresses only")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="nitro-cli", description="CLI for enclave lifetime management (emulated: no Nitro hardware)"
    )
    parser.add_argument("--version", "-V", action="version", version=f"Nitro CLI {VERSION}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="SUBCOMMAND")
    _add_build(sub)
    _add_runtime(sub)
    return parser


def _handler(args: argparse.Namespace) -> Callable[[argparse.Namespace], int]:
    key = f"{args.command} {args.action}" if args.command == "allocator" else args.command
    module_name, function = HANDLERS[key].split(":")
    module = importlib.import_module(f"{__package__}.{module_name}")
    return getattr(module, function)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    if not (sys.argv[1:] if argv is None else argv):
        parser.print_help(sys.stderr)
        return 2
    args = parser.parse_args(argv)
    from enclave_tokenizer import redaction  # vsock-proxy and the rest log through the masking

    redaction.setup("WARNING", "%(levelname)s %(name)s: %(message)s")
    try:
        return _handler(args)(args)
    except NitroCliError as error:
        return report(error)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
