#!/bin/sh
# Install the project's tools into a venv from a wheelhouse archive, only when the archive changed,
# and (emulated hosts) link the emulator as nitro-cli. The venv records the SHA-256 of the archive it
# was installed from; a failed install leaves the old record (or none), so the next run installs
# again. Prints "changed", "unchanged" or, in check mode, "would change".
#   install-tools.sh ARCHIVE VENV PROJECT_WHEEL EXTRAS PYTHON CHECK_MODE [NITRO_CLI_LINK]
set -eu
archive=$1 venv=$2 wheel=$3 extras=$4 python=$5 check_mode=$6 link=${7:-}
record="$venv/.wheelhouse.sha256"
wheels="$(dirname "$archive")/wheels"
emulator="$venv/bin/nitro-cli-emulator"

link_ok() { [ -z "$link" ] || [ "$(readlink "$link" 2>/dev/null)" = "$emulator" ]; }

# In check mode the archive may not have been copied yet.
sum=$(sha256sum "$archive" 2>/dev/null | cut -d' ' -f1)
current=no
if [ -n "$sum" ] && [ -x "$venv/bin/python" ] && [ -f "$record" ] && [ "$(cat "$record")" = "$sum" ]; then
    current=yes
fi
if [ "$current" = yes ] && link_ok; then
    echo unchanged
    exit 0
fi
if [ "$check_mode" = True ]; then
    echo "would change"
    exit 0
fi

if [ "$current" = no ]; then
    # Unpack next to the old wheels and swap, so an interrupted unpack never leaves a half wheelhouse.
    rm -rf "$wheels.new"
    mkdir -p "$wheels.new"
    tar -xf "$archive" -C "$wheels.new"
    rm -rf "$wheels"
    mv "$wheels.new" "$wheels"

    [ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-index --find-links "$wheels" "${wheels}/${wheel}[${extras}]"
    # The project wheel keeps its version between builds: reinstall it (not its dependencies) every time.
    "$venv/bin/pip" install --quiet --disable-pip-version-check --no-index --no-deps --force-reinstall "$wheels/$wheel"

    echo "$sum" > "$record.tmp"
    mv "$record.tmp" "$record"
fi
[ -z "$link" ] || ln -sfn "$emulator" "$link"
echo changed
