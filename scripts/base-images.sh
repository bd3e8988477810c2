#!/usr/bin/env bash
# Build the project's base images locally (no registry can be reached): debootstrap Debian
# bookworm and `docker import`. Each image carries a content key label; a matching image is reused.
#   nitro-ansible/python:3.11-bookworm  runtime for the enclave app (python3 + pip for wheelhouse installs)
#   nitro-ansible/systemd:bookworm      molecule host: systemd as PID 1, python3 for Ansible
set -euo pipefail

MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
SUITE=bookworm
HERE=$(cd "$(dirname "$0")" && pwd)
CACHE_DIR=${NITRO_ANSIBLE_CACHE:-/var/cache/nitro-ansible}
LABEL=org.nitro-ansible.content-key

declare -A PACKAGES=(
  [nitro-ansible/python:3.11-bookworm]="python3,python3-pip,ca-certificates"
  [nitro-ansible/systemd:bookworm]="systemd,systemd-sysv,dbus,python3,python3-pip,python3-venv,python3-apt,iproute2,procps,util-linux,kmod,ca-certificates,sudo"
)

"$HERE/docker-engine.sh"
command -v debootstrap >/dev/null 2>&1 || {
  [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1 || {
    echo "base-images: debootstrap is missing; install it (apt-get install debootstrap)." >&2; exit 1; }
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
}
mkdir -p "$CACHE_DIR"

build_one() {
  local image=$1 include=$2 key rootfs debs
  # One deb cache per image: concurrent debootstraps must not share one.
  debs="$CACHE_DIR/debs-${image//[\/:]/_}"; mkdir -p "$debs"
  key=$(printf '%s\n%s\n%s\n' "$SUITE" "$include" "$(sha256sum "$0" | cut -d' ' -f1)" | sha256sum | cut -c1-16)
  if [ "$(docker image inspect -f "{{ index .Config.Labels \"$LABEL\" }}" "$image" 2>/dev/null)" = "$key" ]; then
    echo "base-images: $image is current (key $key)"
    return 0
  fi
  echo "base-images: building $image (debootstrap $SUITE, key $key)..."
  rootfs=$(mktemp -d "$CACHE_DIR/rootfs.XXXXXX")
  debootstrap --variant=minbase --cache-dir="$debs" --include="$include" \
    "$SUITE" "$rootfs" "$MIRROR" >"$rootfs.log" 2>&1 || { tail -20 "$rootfs.log" >&2; return 1; }
  # Images stay small and reproducible: no apt lists or downloaded .debs (debootstrap leaves them in
  # the rootfs too), no machine-id (systemd creates one at boot).
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin "$rootfs"/var/cache/apt/archives/*.deb
  : >"$rootfs/etc/machine-id"
  tar -C "$rootfs" -c . | docker import \
    --change "LABEL $LABEL=$key" \
    --change 'ENV LANG=C.UTF-8' \
    --change 'CMD ["/bin/bash"]' - "$image" >/dev/null
  rm -rf "$rootfs" "$rootfs.log"
  echo "base-images: built $image"
}

pids=()
for image in "${!PACKAGES[@]}"; do
  build_one "$image" "${PACKAGES[$image]}" &
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
exit $status
