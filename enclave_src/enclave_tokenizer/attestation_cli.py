"""``nitro-attest verify DOC``: verify a Nitro attestation document and print its content as JSON.

``nitro-attest verify DOC [--root PEM] [--at ISO8601] [--pcr N=HEX ...] [--measurements JSON]
[--nonce HEX] [--allow-debug]``; DOC is raw CBOR, base64 text (detected) or ``-`` for stdin.

Exit codes: 0 valid; 1 the document failed a check (stdout JSON has ``valid: false`` and ``check``,
stderr names the check); 2 usage or input error (unreadable file, bad --pcr/--at/--root value).
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import re
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

from ansible_collections.nitro_enclaves.fleet.plugins.module_utils.pcr import is_pcr_hex
from cryptography.utils import CryptographyDeprecationWarning

from . import redaction
from .attestation import (
    MAX_DOCUMENT_LEN,
    AttestationError,
    decode_document_text,
    pcr8_of_certificate,
    pcrs_from_measurements,
    verify_attestation_document,
)

EXIT_INVALID = 1
EXIT_USAGE = 2
# base64 of a maximal document plus generous whitespace; anything bigger is refused before decoding.
MAX_INPUT = MAX_DOCUMENT_LEN * 2
MAX_ROOT_LEN = 1 << 20  # a root certificate PEM is under 1 KiB


class _UsageError(Exception):
    pass


def _parse_pcr(spec: str) -> tuple[int, str]:
    match = re.fullmatch(r"(?:PCR)?(\d{1,2})=(.*)", spec.strip())
    if not match or int(match.group(1)) > 31 or not is_pcr_hex(match.group(2)):
        raise argparse.ArgumentTypeError(f"expected N=HEX with N in 0..31 and 96 hex characters, got {spec[:120]!r}")
    return int(match.group(1)), match.group(2).lower()


def _parse_hex(value: str) -> bytes:
    try:
        return bytes.fromhex(value)
    except ValueError:
        raise argparse.ArgumentTypeError("expected hexadecimal") from None


def _parse_time(value: str) -> dt.datetime:
    text = value.strip()
    if re.fullmatch(r"\d+(\.\d+)?", text):  # Unix seconds, as in `openssl verify -attime`
        try:
            return dt.datetime.fromtimestamp(float(text), dt.UTC)
        except (OverflowError, OSError, ValueError):
            raise argparse.ArgumentTypeError(f"time out of range: {value[:80]!r}") from None
    try:
        parsed = dt.datetime.fromisoformat(text.replace("Z", "+00:00").replace("z", "+00:00"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an ISO 8601 time: {value[:80]!r}") from None
    return parsed.replace(tzinfo=dt.UTC) if parsed.tzinfo is None else parsed


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="nitro-attest", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    verify = sub.add_parser("verify", help="verify an attestation document")
    verify.add_argument("document", metavar="DOC", help="file with raw CBOR or base64 text, or - for stdin")
    verify.add_argument(
        "--root",
        action="append",
        type=Path,
        metavar="PEM",
        help="trust anchor PEM file (repeatable); default: the pinned AWS Nitro Enclaves Root G1",
    )
    verify.add_argument("--at", type=_parse_time, metavar="ISO8601", help="verification time (default now)")
    verify.add_argument(
        "--pcr", action="append", type=_parse_pcr, default=[], metavar="N=HEX", help="expected PCR value"
    )
    verify.add_argument(
        "--measurements",
        type=Path,
        metavar="JSON",
        help="EIF measurements artifact (<eif>.measurements.json); its PCRs are expected, --pcr adds to them",
    )
    verify.add_argument(
        "--signing-certificate",
        type=Path,
        action="append",
        default=[],
        metavar="PEM",
        help="EIF signing certificate: expect its PCR8 (repeatable: any of them, e.g. during a rotation)",
    )
    verify.add_argument("--nonce", type=_parse_hex, metavar="HEX", help="expected nonce")
    verify.add_argument("--allow-debug", action="store_true", help="accept debug-mode documents (PCR0-2 zero)")
    return parser


def _read_limited(source: str | Path, limit: int, what: str, hint: str = "") -> bytes:
    """At most ``limit`` bytes of ``source`` ("-": stdin); a larger input is refused, never truncated."""
    try:
        if source == "-":
            data = sys.stdin.buffer.read(limit + 1)
        else:
            with open(source, "rb") as fh:
                data = fh.read(limit + 1)
    except OSError as exc:
        raise _UsageError(f"cannot read {what}: {exc.strerror}") from None
    if len(data) > limit:
        raise _UsageError(f"{what} is larger than {limit} bytes{hint}")
    return data


def _read_input(source: str) -> bytes:
    return _read_limited(source, MAX_INPUT, source)


def _read_roots(paths: Sequence[Path] | None) -> list[bytes] | None:
    if not paths:
        return None
    return [_read_limited(path, MAX_ROOT_LEN, f"root {path}", ": not a PEM certificate") for path in paths]


def _verify(args: argparse.Namespace) -> int:
    try:
        roots = _read_roots(args.root)
        raw = _read_input(args.document)
    except _UsageError as exc:
        print(f"nitro-attest: {exc}", file=sys.stderr)
        return EXIT_USAGE
    expected: dict[int, str] = {}
    if args.measurements is not None:
        try:
            expected.update(pcrs_from_measurements(args.measurements))
        except AttestationError as exc:
            print(f"nitro-attest: {args.measurements}: {exc.message}", file=sys.stderr)
            return EXIT_USAGE
    signers: list[str] = []
    for cert in args.signing_certificate:
        try:
            signers.append(pcr8_of_certificate(cert))
        except AttestationError as exc:
            print(f"nitro-attest: {cert}: {exc.message}", file=sys.stderr)
            return EXIT_USAGE
    for index, value in args.pcr:
        if expected.get(index, value) != value:
            print(f"nitro-attest: PCR{index} given twice with different values", file=sys.stderr)
            return EXIT_USAGE
        expected[index] = value
    try:
        result = verify_attestation_document(
            decode_document_text(raw),
            root_pem=roots,
            at=args.at,
            expected_pcrs=expected,
            signer_pcr8=signers,
            nonce=args.nonce,
            allow_debug=args.allow_debug,
        )
    except AttestationError as exc:
        if exc.check == "input":
            print(f"nitro-attest: {exc.message}", file=sys.stderr)
            return EXIT_USAGE
        print(json.dumps({"valid": False, "check": exc.check, "reason": exc.message}, indent=2))
        print(f"nitro-attest: invalid document: {exc.check}: {exc.message}", file=sys.stderr)
        return EXIT_INVALID
    print(json.dumps(result.to_json_dict(), indent=2))
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    # Hostile certificates (e.g. a negative serial) make cryptography warn before the verifier refuses
    # them with a named check; the warning text would only be noise on stderr.
    warnings.filterwarnings("ignore", category=CryptographyDeprecationWarning)
    redaction.setup("WARNING", "%(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if args.command == "verify":
        return _verify(args)
    return EXIT_USAGE  # argparse enforces a known subcommand; kept for type completeness


if __name__ == "__main__":
    sys.exit(main())
