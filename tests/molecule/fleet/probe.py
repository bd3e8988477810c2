"""Polls every gateway's /healthz until a stop file appears; reports how many were down at once.

Bounded: at most --max-seconds, one round every --interval seconds, loopback addresses only.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import time
import urllib.error
import urllib.request
from pathlib import Path


def healthy(listen: str, timeout: float) -> bool:
    try:
        with urllib.request.urlopen(f"http://{listen}/healthz", timeout=timeout) as response:
            return response.status == 200
    except (urllib.error.URLError, OSError):
        return False


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("gateways", help="comma-separated host:port list (loopback only)")
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--stop-file", type=Path, required=True)
    parser.add_argument("--interval", type=float, default=0.5)
    parser.add_argument("--max-seconds", type=float, default=1500)
    args = parser.parse_args()
    gateways = args.gateways.split(",")
    for listen in gateways:
        host = listen.rsplit(":", 1)[0]
        if not ipaddress.ip_address(host).is_loopback:
            raise SystemExit(f"refusing to probe {listen}: not a loopback address")
    args.stop_file.unlink(missing_ok=True)
    rounds = 0
    max_down = 0
    down_rounds: dict[str, int] = dict.fromkeys(gateways, 0)
    last: dict[str, bool] = {}
    deadline = time.monotonic() + args.max_seconds
    while not args.stop_file.exists() and time.monotonic() < deadline:
        last = {listen: healthy(listen, timeout=2.0) for listen in gateways}
        down = [listen for listen, ok in last.items() if not ok]
        for listen in down:
            down_rounds[listen] += 1
        max_down = max(max_down, len(down))
        rounds += 1
        time.sleep(args.interval)
    report = {
        "rounds": rounds,
        "max_unavailable_at_once": max_down,
        "unavailable_rounds": down_rounds,
        "all_ok_at_end": bool(last) and all(last.values()),
    }
    args.out.write_text(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
