#!/usr/bin/env bash
# Install the Autobahn testsuite (wstest, Python 2.7 only) into
# <repo>/.venv-conformance. Idempotent: does nothing when the environment is
# already installed from the current requirements-py27.txt.
#
#   tests/conformance/setup.sh            # install if needed
#   tests/conformance/setup.sh --force    # recreate the environment
#
# The Python 2.7 interpreter is taken from $PYTHON27 if set, else from pyenv
# (any 2.7.x version), else python2.7 / python2 on PATH.
# Exit 0 = ready, 2 = cannot set up (message on stderr).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
ROOT="$(cd "$HERE/../.." && pwd)"
VENV="$ROOT/.venv-conformance"
REQ="$HERE/requirements-py27.txt"
STAMP="$VENV/.conformance-installed"
VIRTUALENV_VERSION="16.7.12"   # last virtualenv that runs on Python 2.7 itself; seeds pip 20.3.4

FORCE=0
case "${1:-}" in
  --force) FORCE=1 ;;
  "") ;;
  -h|--help) sed -n '2,11p' "$0"; exit 0 ;;
  *) echo "setup.sh: unknown argument: $1" >&2; exit 2 ;;
esac

die() {
  echo "" >&2
  echo "setup.sh: ERROR: $*" >&2
  exit 2
}

is_py27() {
  [ -n "$1" ] && [ -x "$1" ] && "$1" -c 'import sys; sys.exit(0 if sys.version_info[:2] == (2, 7) else 1)' >/dev/null 2>&1
}

find_python27() {
  local cand
  local pyenv_root="${PYENV_ROOT:-}"
  if [ -z "$pyenv_root" ] && command -v pyenv >/dev/null 2>&1; then
    pyenv_root="$(pyenv root 2>/dev/null || true)"
  fi
  [ -z "$pyenv_root" ] && pyenv_root="$HOME/.pyenv"
  if [ -d "$pyenv_root/versions" ]; then
    # newest 2.7.x first
    for cand in $(ls -d "$pyenv_root"/versions/2.7* 2>/dev/null | sort -V -r); do
      if is_py27 "$cand/bin/python"; then echo "$cand/bin/python"; return 0; fi
    done
  fi
  for cand in python2.7 python2; do
    cand="$(command -v "$cand" 2>/dev/null || true)"
    if is_py27 "$cand"; then echo "$cand"; return 0; fi
  done
  return 1
}

if [ -n "${PYTHON27:-}" ]; then
  is_py27 "$PYTHON27" || die "PYTHON27=$PYTHON27 is not an executable Python 2.7 interpreter."
  PY27="$PYTHON27"
else
  PY27="$(find_python27)" || die "Python 2.7 not found.
  The Autobahn testsuite (wstest) runs only on Python 2.7. Looked at \$PYTHON27,
  pyenv versions 2.7.* (${PYENV_ROOT:-\$HOME/.pyenv}/versions), python2.7 and python2 on PATH.
  Install one (e.g. 'pyenv install 2.7.18') or point PYTHON27 at it, then re-run:
    $0"
fi

want_stamp="$( (cat "$REQ"; echo "python=$PY27") | sha256sum | cut -d' ' -f1)"

if [ "$FORCE" = 0 ] && [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$want_stamp" ] \
   && [ -x "$VENV/bin/wstest" ] \
   && "$VENV/bin/python" -c 'import autobahntestsuite, autobahn' >/dev/null 2>&1; then
  echo "setup.sh: autobahntestsuite already installed in $VENV"
  exit 0
fi

echo "setup.sh: using Python 2.7 at $PY27"
rm -rf "$VENV"

# Create the virtualenv. Python 2.7 has no venv module; use virtualenv 16.x,
# bootstrapped into a throw-away directory (nothing is installed into the
# interpreter itself).
BOOT="$(mktemp -d "${TMPDIR:-/tmp}/lbws-conformance-boot.XXXXXX")"
trap 'rm -rf "$BOOT"' EXIT
export PIP_DISABLE_PIP_VERSION_CHECK=1 PIP_NO_PYTHON_VERSION_WARNING=1 PYTHONWARNINGS=ignore
if "$PY27" -c 'import virtualenv' >/dev/null 2>&1; then
  "$PY27" -m virtualenv --no-download "$VENV" \
    || die "creating the virtualenv at $VENV with $PY27 -m virtualenv failed."
elif "$PY27" -m pip --version >/dev/null 2>&1; then
  "$PY27" -m pip install --quiet --target "$BOOT/vendor" "virtualenv==$VIRTUALENV_VERSION" \
    || die "could not download virtualenv==$VIRTUALENV_VERSION with $PY27 -m pip (is PyPI reachable?)."
  PYTHONPATH="$BOOT/vendor" "$PY27" -m virtualenv --no-download "$VENV" \
    || die "creating the virtualenv at $VENV failed."
else
  # The 2.7 interpreter has no pip: let a Python 3 virtualenv (<20.22, the last
  # line able to create Python 2 environments) build it.
  PY3="$(command -v python3 || true)"
  [ -n "$PY3" ] || die "$PY27 has no pip and no python3 is available to bootstrap virtualenv."
  "$PY3" -m pip install --quiet --target "$BOOT/vendor" "virtualenv==20.21.1" \
    || die "could not download virtualenv==20.21.1 with $PY3 -m pip."
  PYTHONPATH="$BOOT/vendor" "$PY3" -m virtualenv --python "$PY27" "$VENV" \
    || die "creating the virtualenv at $VENV failed."
fi

echo "setup.sh: installing autobahntestsuite 0.8.2 and pinned dependencies"
"$VENV/bin/python" -m pip install --quiet -r "$REQ" \
  || die "pip install -r $REQ failed (see above). wsaccel, ujson and zope.interface are
  compiled: a C compiler and the Python 2.7 headers are needed."

"$VENV/bin/wstest" --autobahnversion >/dev/null 2>&1 \
  || die "$VENV/bin/wstest does not run; see: $VENV/bin/wstest --autobahnversion"

echo "$want_stamp" > "$STAMP"
echo "setup.sh: ready: $VENV/bin/wstest ($("$VENV/bin/wstest" --autobahnversion 2>/dev/null | tr '\n' ' '))"
