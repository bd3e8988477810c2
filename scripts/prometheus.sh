#!/usr/bin/env bash
# Debian's prometheus package for the monitoring tests: the server (tests/integration/test_prometheus.py
# scrapes an emulated host) and promtool (alert rules checked and unit-tested). Idempotent: nothing
# happens when both are on PATH. The tests start their own server on a loopback port; the package's
# own service is not used (it is disabled when systemd runs, so no second Prometheus listens on :9090).
set -euo pipefail

if command -v prometheus >/dev/null 2>&1 && command -v promtool >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ] || ! command -v apt-get >/dev/null 2>&1; then
  echo "prometheus: prometheus/promtool missing; install Debian's prometheus package (apt-get install prometheus)." >&2
  exit 1
fi
echo "prometheus: apt-get install prometheus..."
export DEBIAN_FRONTEND=noninteractive
apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || {
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends prometheus >/dev/null
}
if [ "$(ps -o comm= -p 1 2>/dev/null)" = systemd ]; then
  systemctl disable --now prometheus.service >/dev/null 2>&1 || true
fi
