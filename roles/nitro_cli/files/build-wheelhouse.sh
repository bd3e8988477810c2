#!/bin/sh
# The controller's wheelhouse, from the collection's own files: the project wheel (enclave app, emulator,
# local AWS endpoint, module_utils) is built from SOURCE (the collection root) when those sources changed,
# and the pinned dependency wheels are copied from DEPS (a directory of wheels, e.g. `make wheelhouse`'s)
# or, without one, downloaded once (versions from SOURCE/requirements.txt). Prints "changed" or "unchanged".
#   build-wheelhouse.sh SOURCE WHEELHOUSE PYTHON [DEPS]
set -eu
src=$1 wheelhouse=$2 python=$3 deps=${4:-}
mkdir -p "$wheelhouse"
# Parallel plays (molecule scenarios) share one wheelhouse: one builder at a time.
exec 9>"$wheelhouse/.lock"
flock 9

parts="pyproject.toml plugins/module_utils nitro_emulator enclave_src/enclave_tokenizer"
sum=$(cd "$src" && find $parts -type f ! -path '*/__pycache__/*' ! -name '*.pyc' | LC_ALL=C sort \
      | xargs sha256sum | sha256sum | cut -d' ' -f1)
state=unchanged
if [ "$(cat "$wheelhouse/.project.sha256" 2>/dev/null)" != "$sum" ] \
   || ! ls "$wheelhouse"/nitro_enclaves_ansible-*.whl >/dev/null 2>&1; then
    # Built from a scratch copy: setuptools' build/ and egg-info never land in the (installed) collection.
    build=$(mktemp -d "${TMPDIR:-/tmp}/nitro-wheel.XXXXXX")
    trap 'rm -rf "$build"' EXIT
    (cd "$src" && tar --exclude=__pycache__ -cf - $parts) | tar -xf - -C "$build"
    (cd "$build" && SOURCE_DATE_EPOCH=315532800 "$python" -m pip wheel -q --no-deps --no-build-isolation \
        --disable-pip-version-check -w "$build/out" .)
    rm -f "$wheelhouse"/nitro_enclaves_ansible-*.whl
    mv "$build"/out/nitro_enclaves_ansible-*.whl "$wheelhouse/"
    echo "$sum" > "$wheelhouse/.project.sha256"
    state=changed
fi
if ! ls "$wheelhouse"/cbor2-*.whl >/dev/null 2>&1; then
    if [ -n "$deps" ]; then
        find "$deps" -maxdepth 1 -name '*.whl' ! -name 'nitro_enclaves_ansible-*' -exec cp -p {} "$wheelhouse/" \;
    else
        "$python" -m pip download -q --disable-pip-version-check -d "$wheelhouse" --only-binary=:all: \
            --python-version 3.11 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
            --platform manylinux_2_17_x86_64 -c "$src/requirements.txt" \
            cbor2 cryptography asn1crypto pyyaml aiohttp boto3 isal
    fi
    ls "$wheelhouse"/cbor2-*.whl >/dev/null 2>&1 || { echo "no dependency wheels in ${deps:-the download}" >&2; exit 1; }
    state=changed
fi
echo "$state"
