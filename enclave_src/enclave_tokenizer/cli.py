"""`enclave-tokenizer`: talk to the enclave from the parent (JSON on stdout, errors on stderr).

    enclave-tokenizer [--config F] [--cid N | --name NAME] [--port P] COMMAND
      tokenize [PAN ...] [--mode opaque|fpe|reversible]   (no PAN arguments: one PAN per stdin line;
                                                            prefer stdin, argv is visible in ps)
      detokenize [TOKEN ...] --capability-file F
      health
      attest [--nonce HEX] [--verify] [--measurements F] [--root PEM] [--allow-debug] [--output F]
      provision                                          (one-shot, from the config's kms_* keys)
      gateway                                            (run the HTTP gateway service)

Exit codes: 0 ok, 1 the enclave answered with an error / attestation failed, 2 usage or config,
3 enclave unavailable.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from . import parent, redaction
from .client import Client, EnclaveUnavailable, TokenizerError
from .parent import ConfigError, GatewayConfig


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="enclave-tokenizer", description="Parent-side tools for the enclave tokenizer"
    )
    parser.add_argument(
        "--config", help=f"gateway config YAML (default ${parent.CONFIG_ENV}, else {parent.DEFAULT_CONFIG} if present)"
    )
    parser.add_argument("--cid", type=int, help="enclave CID (default: from config, or discovered by --name)")
    parser.add_argument("--name", help="enclave name to look up with nitro-cli describe-enclaves")
    parser.add_argument("--port", type=int, help="enclave vsock port (default 5000)")
    parser.add_argument("--timeout", type=float, help="per-request timeout, seconds")
    sub = parser.add_subparsers(dest="command", required=True)
    tok = sub.add_parser("tokenize", help="tokenize PANs (arguments or stdin lines)")
    tok.add_argument("pans", nargs="*")
    tok.add_argument("--mode", default="opaque", choices=["opaque", "fpe", "reversible"])
    detok = sub.add_parser("detokenize", help="recover PANs of reversible tokens")
    detok.add_argument("tokens", nargs="*")
    detok.add_argument("--capability-file", required=True, type=Path)
    sub.add_parser("health", help="the enclave app's health answer")
    att = sub.add_parser("attest", help="fetch (and verify) an attestation document with a fresh nonce")
    att.add_argument("--nonce", help="hex nonce (default: 32 random bytes)")
    att.add_argument("--verify", action="store_true", help="verify chain, signature, nonce and PCRs")
    att.add_argument("--measurements", help="<eif>.measurements.json (default: config measurements_file)")
    att.add_argument("--root", help="root CA PEM (default: config attestation_root_pem, else AWS root)")
    att.add_argument("--allow-debug", action="store_true")
    att.add_argument("--output", type=Path, help="also write the raw document here")
    sub.add_parser("provision", help="provision the enclave's data key now")
    gw = sub.add_parser("gateway", help="run the HTTP gateway")
    gw.add_argument("--config", dest="gateway_config", help="gateway config YAML")
    gw.add_argument("--metrics", action=argparse.BooleanOptionalAction, help="serve GET /metrics (default: config)")
    return parser


def _config(args: argparse.Namespace) -> GatewayConfig:
    path = args.config or parent.default_config()
    overrides: dict[str, Any] = {"enclave_cid": args.cid, "enclave_name": args.name, "enclave_port": args.port}
    overrides["request_timeout"] = args.timeout
    if getattr(args, "measurements", None):
        overrides["measurements_file"] = args.measurements
    if getattr(args, "root", None):
        overrides["attestation_root_pem"] = args.root
    if getattr(args, "allow_debug", False):
        overrides["allow_debug"] = True
    return GatewayConfig.load(path, **overrides)


def _cid(config: GatewayConfig) -> int:
    if config.enclave_cid is not None:
        return config.enclave_cid
    assert config.enclave_name
    entry = asyncio.run(parent.describe_enclave(config.nitro_cli, config.enclave_name))
    if entry is None or not isinstance(entry.get("EnclaveCID"), int):
        raise EnclaveUnavailable(f"no running enclave named {config.enclave_name}")
    return entry["EnclaveCID"]


def _lines(items: list[str]) -> list[str]:
    return items or [line.strip() for line in sys.stdin if line.strip()]


def _run(args: argparse.Namespace, config: GatewayConfig) -> tuple[int, Any]:
    with parent.sync_client(config, _cid(config)) as client:
        return _command(args, config, client)


def _command(args: argparse.Namespace, config: GatewayConfig, client: Client) -> tuple[int, Any]:
    if args.command == "tokenize":
        pans = _lines(args.pans)
        if len(pans) == 1:
            return 0, client.tokenize(pans[0], args.mode)
        result = client.tokenize_batch(pans, args.mode)
        return (1 if result["errors"] else 0), result
    if args.command == "detokenize":
        capability = args.capability_file.read_text(encoding="utf-8").strip()
        tokens = _lines(args.tokens)
        if len(tokens) == 1:
            return 0, client.detokenize(tokens[0], capability)
        result = client.detokenize_batch(tokens, capability)
        return (1 if result["errors"] else 0), result
    if args.command == "health":
        health = client.health()
        return (0 if health.get("provisioned") else 1), health
    if args.command == "provision":
        return 0, client.provision(parent.provision_request(config))
    # attest
    nonce = bytes.fromhex(args.nonce) if args.nonce else parent.fresh_nonce()
    document = client.attest(nonce)
    if args.output:
        args.output.write_bytes(document)
    if not args.verify:
        import base64

        return 0, {"document": base64.b64encode(document).decode(), "nonce": nonce.hex()}
    from .attestation import AttestationError

    try:
        return 0, parent.verify_document(document, nonce, config)
    except AttestationError as exc:
        return 1, {"valid": False, "check": exc.check, "error": exc.message}


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if args.command != "gateway":  # the gateway sets up its own logging (its configured level)
        redaction.setup("WARNING", "%(levelname)s %(name)s: %(message)s")
    if args.command == "gateway":
        from . import gateway

        path = args.gateway_config or args.config
        metrics = [] if args.metrics is None else ["--metrics" if args.metrics else "--no-metrics"]
        return gateway.main((["--config", path] if path else []) + metrics)
    parent.adopt_emulated_vsock()  # an emulated host's enclave, without NITRO_VSOCK_DIR in the shell
    try:
        config = _config(args)
        code, output = _run(args, config)
    except ConfigError as exc:
        print(f"enclave-tokenizer: {exc}", file=sys.stderr)
        return 2
    except EnclaveUnavailable as exc:
        print(f"enclave-tokenizer: {exc.message}", file=sys.stderr)
        return 3
    except TokenizerError as exc:
        print(json.dumps({"error": {"code": exc.code, "message": exc.message}}, indent=2))
        return 1
    except (OSError, ValueError) as exc:
        print(f"enclave-tokenizer: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 2
    print(json.dumps(output, indent=2))
    return code


if __name__ == "__main__":
    raise SystemExit(main())
