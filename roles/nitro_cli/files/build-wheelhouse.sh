#!/bin/sh
# The controller's wheelhouse, from the collection's own files: the project wheel (enclave app, emulator,
# local AWS endpoint, module_utils) and the enclave's wheel (only what runs in the enclave, see
# enclave_src/enclave-files.txt) are built from SOURCE (the collection root) when their sources changed,
# and the pinned dependency wheels are copied from DEPS (a directory of wheels, e.g. `make wheelhouse`'s)
# or, without one, downloaded once (versions from SOURCE/requirements.txt). Prints "changed" or "unchanged".
#   build-wheelhouse.sh SOURCE WHEELHOUSE PYTHON [DEPS]
set -eu
src=$1 wheelhouse=$2 python=$3 deps=${4:-}
mkdir -p "$wheelhouse"
# Parallel plays (molecule scenarios) share one wheelhouse: one builder at a time.
exec 9>"$wheelhouse/.lock"
flock 9

state=unchanged
# build_wheel DIST PYPROJECT FILE...: the wheel DIST (file prefix) from only these files of SOURCE, with
# PYPROJECT as its pyproject.toml, rebuilt when their digest changed. Built from a scratch copy:
# setuptools' build/ and egg-info never land in the (installed) collection. Fixed SOURCE_DATE_EPOCH:
# the same files give the same wheel bytes.
build_wheel() {
    dist=$1 pyproject=$2
    shift 2
    sum=$(cd "$src" && find "$@" -type f ! -path '*/__pycache__/*' ! -name '*.pyc' | LC_ALL=C sort \
          | xargs sha256sum | sha256sum | cut -d' ' -f1)
    if [ "$(cat "$wheelhouse/.$dist.sha256" 2>/dev/null)" = "$sum" ] \
       && ls "$wheelhouse/$dist"-*.whl >/dev/null 2>&1; then
        return 0
    fi
    build=$(mktemp -d "${TMPDIR:-/tmp}/nitro-wheel.XXXXXX")
    (cd "$src" && tar --exclude=__pycache__ -cf - "$@") | tar -xf - -C "$build"
    cp "$src/$pyproject" "$build/pyproject.toml.new" && mv -f "$build/pyproject.toml.new" "$build/pyproject.toml"
    (cd "$build" && SOURCE_DATE_EPOCH=315532800 "$python" -m pip wheel -q --no-deps --no-build-isolation \
        --disable-pip-version-check -w "$build/out" .) || { rm -rf "$build"; exit 1; }
    rm -f "$wheelhouse/$dist"-*.whl
    mv "$build/out/$dist"-*.whl "$wheelhouse/"
    rm -rf "$build"
    echo "$sum" > "$wheelhouse/.$dist.sha256"
    state=changed
}
# The project wheel (controller, hosts, emulator) ...
build_wheel nitro_enclaves_ansible pyproject.toml \
    pyproject.toml plugins/module_utils nitro_emulator enclave_src/enclave_tokenizer
# ... and the enclave's own, from only the files enclave_src/enclave-files.txt lists (the Dockerfile
# installs this one: what is measured into the EIF).
build_wheel nitro_enclaves_tokenizer_enclave enclave_src/enclave-pyproject.toml \
    enclave_src/enclave-files.txt $(grep -v '^#' "$src/enclave_src/enclave-files.txt")
if ! ls "$wheelhouse"/cbor2-*.whl >/dev/null 2>&1; then
    if [ -n "$deps" ]; then
        find "$deps" -maxdepth 1 -name '*.whl' ! -name 'nitro_enclaves_ansible-*' ! -name 'nitro_enclaves_tokenizer_enclave-*' -exec cp -p {} "$wheelhouse/" \;
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
