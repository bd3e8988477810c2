#!/bin/sh
# A digest of everything a controller-side image + EIF build reads, without building anything: the
# tag and build arguments, the wheels the image installs (not the project wheel: the Dockerfile installs
# the enclave's own), the base image's id, nitro-cli and its blobs, and the files (names, sizes, times)
# of the enclave's distribution (ROOT/enclave_src/enclave-files.txt, the one list of them), of the build
# context and of the code that builds and measures the EIF (the other PATHs). An edit anywhere else
# (emulator runtime, allocator, other module_utils) keeps the digest. Same digest and an untouched EIF:
# the measurements cached at the last build are the EIF's (see tasks/build.yml).
#   build-fingerprint.sh KEY WHEELHOUSE BASE_IMAGE NITRO_CLI ROOT PATH...
set -eu
key=$1 wheelhouse=$2 base=$3 nitro_cli=$4 root=$5
shift 5
manifest=$root/enclave_src/enclave-files.txt
{
    printf '%s\n' "$key" "${NITRO_CLI_BLOBS:-}"
    # A missing file (a stale manifest) is an error here, as it is in build-wheelhouse.sh.
    (cd "$root" && grep -v '^#' enclave_src/enclave-files.txt | xargs stat -c '%n %s %Y' enclave_src/enclave-files.txt)
    find "$@" ${NITRO_CLI_BLOBS:+"$NITRO_CLI_BLOBS"} -name __pycache__ -prune -o -type f -printf '%p %s %T@\n' \
        | LC_ALL=C sort
    find "$wheelhouse" -maxdepth 1 -name '*.whl' ! -name 'nitro_enclaves_ansible-*' -printf '%P %s %T@\n' \
        | LC_ALL=C sort
    stat -L -c '%n %s %Y' "$nitro_cli" 2>&1 || true
    docker image inspect --format '{{.Id}}' "$base" 2>&1 || true
} | sha256sum | cut -d' ' -f1
