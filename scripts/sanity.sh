#!/usr/bin/env bash
# ansible-test sanity (every test that runs offline) over the collection's plugins.
#
# ansible-test only runs inside .../ansible_collections/<namespace>/<name>. Two layouts are handled:
#  - the repository IS the collection (galaxy.yml or plugins/modules): it runs there, through a
#    symlink at a collection path when the checkout is not at one (ANSIBLE_TEST_CONTENT_ROOT);
#  - today's layout (plugins/modules/, plugins/module_utils/): a throwaway collection tree is built under /tmp with
#    library -> plugins/modules, module_utils -> plugins/module_utils, plugins/doc_fragments as is,
#    and the short import names rewritten to the collection's.
# Dependencies (amazon.aws) are linked from the venv's ansible package into the same collection root,
# where ansible-test's import test looks for them.
#
#   scripts/sanity.sh             run sanity; extra arguments go to ansible-test (e.g. --test pylint)
#   scripts/sanity.sh tree DIR    only build the tree under DIR and print the collection's path
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
BIN=${NITRO_SANITY_BIN:-$ROOT/.venv/bin}
NAMESPACE=nitro_enclaves
NAME=fleet
if [[ -f $ROOT/galaxy.yml ]]; then
  NAMESPACE=$("$BIN/python" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["namespace"])' "$ROOT/galaxy.yml")
  NAME=$("$BIN/python" -c 'import sys, yaml; print(yaml.safe_load(open(sys.argv[1]))["name"])' "$ROOT/galaxy.yml")
fi
FQ="ansible_collections.$NAMESPACE.$NAME.plugins.module_utils"
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
  if [[ -f $ROOT/galaxy.yml || -d $ROOT/plugins/modules ]]; then
    case $ROOT in
      */ansible_collections/"$NAMESPACE"/"$NAME") coll=$ROOT; base=${ROOT%/ansible_collections/*} ;;
      *) mkdir -p "$(dirname "$coll")" && ln -sfn "$ROOT" "$coll" ;;
    esac
  else
    mkdir -p "$coll/plugins/modules" "$coll/plugins/module_utils" "$coll/meta"
    cp "$ROOT"/library/*.py "$coll/plugins/modules/"
    cp "$ROOT"/module_utils/*.py "$coll/plugins/module_utils/"
    [[ -d $ROOT/plugins/doc_fragments ]] && cp -r "$ROOT/plugins/doc_fragments" "$coll/plugins/"
    # The ignore file (tests/sanity/ignore-<ansible version>.txt) names collection paths already.
    [[ -d $ROOT/tests/sanity ]] && mkdir -p "$coll/tests" && cp -r "$ROOT/tests/sanity" "$coll/tests/"
    find "$coll" -name __pycache__ -prune -exec rm -rf {} +
    # One import name, as in the collection: ansible.module_utils.<ours> and ansible_collections.nitro_enclaves.fleet.plugins.module_utils.<x>.
    local ours
    ours=$(cd "$ROOT/module_utils" && ls ./*.py | sed 's|^\./||; s|\.py$||' | grep -v '^__init__$' | paste -sd'|')
    sed -i -E \
      -e "s/(from|import) ansible\.module_utils\.($ours)\b/\1 $FQ.\2/" \
      -e "s/from ansible\.module_utils import ($ours)\b/from $FQ import \1/" \
      -e "s/\bnitro_module_utils\b/$FQ/g" \
      "$coll"/plugins/modules/*.py "$coll"/plugins/module_utils/*.py
    printf 'requires_ansible: ">=2.19.0"\n' >"$coll/meta/runtime.yml"
    # The version validate-modules and pylint check version_added and deprecations against.
    local version
    version=$(sed -n 's/^version = "\(.*\)"$/\1/p' "$ROOT/pyproject.toml")
    printf 'namespace: %s\nname: %s\nversion: %s\nreadme: README.md\nauthors: [nitro-enclaves-ansible authors]\n' \
      "$NAMESPACE" "$NAME" "$version" >"$coll/galaxy.yml"
  fi
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
