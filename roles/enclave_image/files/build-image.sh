#!/bin/sh
# Build the enclave's Docker image from the app and the wheelhouse, and create the EIF build directory.
# Prints the image id, then "changed" or "unchanged": Docker's layer cache gives an unchanged context
# the same image id. A remote build host gets both as one archive (APP_DIR = context.tar, WHEELHOUSE = -).
#   build-image.sh TAG APP_DIR|CONTEXT_TAR WHEELHOUSE|- BUILD_DIR [--build-arg=KEY=VALUE ...]
set -eu
tag=$1 app=$2 wheelhouse=$3 build_dir=$4
shift 4

mkdir -p "$build_dir"
before=$(docker image inspect --format '{{.Id}}' "$tag" 2>/dev/null || true)

# A scratch context per run: concurrent runs never share one.
context=$(mktemp -d "${TMPDIR:-/tmp}/enclave-context.XXXXXX")
trap 'rm -rf "$context"' EXIT
if [ "$wheelhouse" = - ]; then
    tar -xf "$app" -C "$context"
else
    mkdir "$context/wheels"
    cp -R "$app/." "$context/"
    # Not the project wheel (emulator, parent-side tools): the enclave installs its own, and an edit
    # outside the enclave's files must leave Docker's COPY layer cached.
    find "$wheelhouse" -maxdepth 1 -name '*.whl' ! -name 'nitro_enclaves_ansible-*' -exec cp -t "$context/wheels/" {} +
fi
find "$context" -name __pycache__ -prune -exec rm -rf {} +

after=$(docker build --quiet --force-rm --tag "$tag" "$@" "$context")
echo "$after"
if [ "$after" = "$before" ]; then echo unchanged; else echo changed; fi
