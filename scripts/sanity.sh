#!/usr/bin/env bash
# ansible-test sanity (every test that runs offline) over the collection's plugins.
#
# ansible-test only runs inside .../ansible_collections/<namespace>/<name>: the repository is the
# collection, so it runs there, through a symlink at a collection path when the checkout is not at one
# (ANSIBLE_TEST_CONTENT_ROOT).
#
# Dependencies (amazon.aws) are linked from the venv's ansible package into the same collection root,
# where ansible-test's import test looks for them.
#
#   scripts/sanity.sh             run sanity; extra arguments go to ansible-test (e.g. --test pylint)
#   scripts/sanity.sh tree DIR    only link the collection under DIR and print the collection's path
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${NITRO_SANITY_BIN:-$ROOT/.venv/bin}
NAMESPACE=$("$BIN/python" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["namespace"])' "$ROOT/galaxy.yml")
NAME=$("$BIN/python" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["name"])' "$ROOT/galaxy.yml")
SITE=$("$BIN/python" -c 'import ansible_collections, os; print(os.path.dirname(ansible_collections.__path__[0]))')

link_dependencies() {  # $1: the collection root (the directory holding ansible_collections/)
  local ns
  for ns in amazon; do
    [[ -e $1/ansible_collections/$ns ]] || ln -s "$SITE/ansible_collections/$ns" "$1/ansible_collections/$ns"
  done
}

# Prints the collection directory ansible-test runs in.
build_tree() {  # $1: an empty or new directory
  local base=$1 coll
  coll=$base/ansible_collections/$NAMESPACE/$NAME
  case $ROOT in
    */ansible_collections/"$NAMESPACE"/"$NAME") coll=$ROOT; base=${ROOT%/ansible_collections/*} ;;
    *) mkdir -p "$(dirname "$coll")" && ln -sfn "$ROOT" "$coll" ;;
  esac
  link_dependencies "$base"
  echo "$coll"
}

if [[ ${1:-} == tree ]]; then
  build_tree "$2"
  exit 0
fi

# ansible-test installs each test's pinned requirements (ansible-core's own sanity.*.txt) into
# virtualenvs it caches under ~/.ansible/test/venv; its pip bootstrap comes from this stand-in.
GET_PIP_VERSION=$("$BIN/python" -c 'from ansible_test._internal.python_requirements import get_venv_packages as g
from ansible_test._internal.host_configs import NativePythonConfig as P
print(g(P(version="3.11"))["pip"])')
GET_PIP=~/.ansible/test/cache/get_pip_${GET_PIP_VERSION//./_}.py
[[ -f $GET_PIP ]] || { mkdir -p "$(dirname "$GET_PIP")" && cp "$ROOT/scripts/ansible_test_get_pip.py" "$GET_PIP"; }

WORK=$(mktemp -d /tmp/nitro-sanity.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
COLL=$(build_tree "$WORK")
cd "$COLL"
export ANSIBLE_TEST_CONTENT_ROOT=$COLL PATH=$BIN:$PATH
unset ANSIBLE_CONFIG  # the repository's ansible.cfg (plugins/modules/, roles/) is not the collection's
# Targets: the plugins (the repository's other Python is not Ansible content). --local: this venv,
# which requirements.txt gives everything the offline tests need.
"$BIN/ansible-test" sanity --local --python 3.11 --color no "$@" plugins/
