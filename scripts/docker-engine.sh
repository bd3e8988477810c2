#!/usr/bin/env bash
# Make a Docker engine reachable: use one that answers, else (root on Debian/Ubuntu) install
# docker.io and start dockerd, via systemd when it is PID 1, else in the background.
set -euo pipefail

DOCKERD_LOG=${DOCKERD_LOG:-/var/log/dockerd-nitro-ansible.log}

engine_answers() { docker info >/dev/null 2>&1; }

if command -v docker >/dev/null 2>&1 && engine_answers; then
  exit 0
fi

if [ "$(id -u)" != 0 ]; then
  echo "docker-engine: no reachable Docker engine and not root; install and start Docker (or set DOCKER_HOST)." >&2
  exit 1
fi

if ! command -v dockerd >/dev/null 2>&1; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "docker-engine: no reachable Docker engine, no dockerd, and no apt-get to install docker.io; install Docker." >&2
    exit 1
  fi
  echo "docker-engine: provisioning Docker (apt-get install docker.io)..."
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq docker.io >/dev/null
fi

if [ "$(ps -o comm= -p 1 2>/dev/null)" = systemd ]; then
  systemctl start docker
else
  if ! pgrep -x dockerd >/dev/null 2>&1; then
    echo "docker-engine: starting dockerd in the background (log: $DOCKERD_LOG)"
    nohup dockerd >"$DOCKERD_LOG" 2>&1 &
  fi
fi

for _ in $(seq 1 60); do
  engine_answers && exit 0
  sleep 1
done
echo "docker-engine: dockerd did not answer within 60 s; see $DOCKERD_LOG" >&2
exit 1
