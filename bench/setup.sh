#!/usr/bin/env bash
# Install what bench/run.py needs on a fresh Debian machine (run as root).
# Idempotent: re-running only re-checks. nginx and HAProxy are installed as
# binaries only; the benchmark starts its own instances with generated
# configs, so the packaged system services must not be started.
set -euo pipefail

repo=$(cd "$(dirname "$0")/.." && pwd)
export DEBIAN_FRONTEND=noninteractive

# Package install scripts start their services unless policy-rc.d says no;
# add a temporary one where the machine has none.
if [ ! -e /usr/sbin/policy-rc.d ]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
fi

# Run a command silently; show its output only when it fails.
quiet() {
    local out
    if ! out=$("$@" 2>&1); then
        printf '%s\n' "$out" >&2
        return 1
    fi
}

has_candidate() {
    apt-cache policy "$1" 2>/dev/null | grep -q 'Candidate: [0-9]'
}

quiet apt-get update
packages=(haproxy wrk)
if has_candidate nginx-light; then packages+=(nginx-light); else packages+=(nginx); fi
command -v node >/dev/null || packages+=(nodejs)
command -v npm >/dev/null || packages+=(npm)
command -v python3 >/dev/null || packages+=(python3)
python3 -c 'import venv, ensurepip' 2>/dev/null || packages+=(python3-venv)
quiet apt-get install -y --no-install-recommends "${packages[@]}"

# --no-save: never rewrite the tests package files, only fill node_modules.
quiet npm install --prefix "$repo/tests/node" --no-save --no-audit --no-fund

[ -x "$repo/.venv/bin/python" ] || quiet python3 -m venv "$repo/.venv"
quiet "$repo/.venv/bin/python" -m pip install --disable-pip-version-check matplotlib psutil py-spy
