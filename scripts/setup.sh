#!/usr/bin/env bash
# Create .venv with mterelay installed (editable) and its test extras; install redis-server when tests need it.
# Run by run.sh and test.sh so both commands work on a fresh Debian machine; exits non-zero when anything fails.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

apt_install() {
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@" >/dev/null
}

if ! python3 -c 'import venv, ensurepip' 2>/dev/null; then
    apt_install python3-venv
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
fi
stamp=.venv/.mterelay-installed
if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
    if ! .venv/bin/pip install -q --disable-pip-version-check -e '.[test]' >.venv/pip.log 2>&1; then
        cat .venv/pip.log >&2
        echo "setup: pip install failed (log above)" >&2
        exit 1
    fi
    .venv/bin/python -c 'import mterelay'
    touch "$stamp"
fi
if [ "${MTERELAY_NEED_REDIS:-0}" = 1 ] && ! command -v redis-server >/dev/null; then
    apt_install redis-server
    # The tests start their own redis-server on a free port; the packaged one is not needed.
    (systemctl disable --now redis-server >/dev/null 2>&1 || service redis-server stop >/dev/null 2>&1) || true
fi
