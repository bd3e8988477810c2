#!/bin/sh
# A digest of everything a controller-side image + EIF build reads, without building anything: the
# tag and build arguments, the wheels, the base image's id, nitro-cli and its blobs, and the files
# (names, sizes, times) of the app and of the code that builds and measures the EIF. Same digest and an
# untouched EIF: the measurements cached at the last build are the EIF's (see tasks/build.yml).
#   build-fingerprint.sh KEY WHEELHOUSE BASE_IMAGE NITRO_CLI DIR...
set -eu
key=$1 wheelhouse=$2 base=$3 nitro_cli=$4
shift 4
{
    printf '%s\n' "$key" "${NITRO_CLI_BLOBS:-}"
    find "$@" ${NITRO_CLI_BLOBS:+"$NITRO_CLI_BLOBS"} -name __pycache__ -prune -o -type f -printf '%p %s %T@\n' \
        | LC_ALL=C sort
    find "$wheelhouse" -maxdepth 1 -name '*.whl' -printf '%P %s %T@\n' | LC_ALL=C sort
    stat -L -c '%n %s %Y' "$nitro_cli" 2>&1 || true
    docker image inspect --format '{{.Id}}' "$base" 2>&1 || true
} | sha256sum | cut -d' ' -f1
