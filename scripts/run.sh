#!/usr/bin/env bash
# Run the relay on a working default: when UPSTREAM is unset, a demo upstream (python -m mterelay.demo) on
# 127.0.0.1:${DEMO_UPSTREAM_PORT:-8081} with /demo/* as a pass-through route; when CLIENT_ID_SECRET is unset, a random
# one kept in .run/client-id-secret (gitignored). Any other setting comes from the environment or the arguments, e.g.
#   PORT=3000 bash scripts/run.sh --debug
# With a --config file there are no defaults: the environment outranks the file, so exporting them would override it.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
bash scripts/setup.sh

relay=(.venv/bin/twistd --nodaemon --pidfile= mterelay)

for arg in "$@"; do
    case $arg in
        # -c and --config, also as -cFILE or --config=FILE, and any prefix of it that getopt takes (--con, --conf...)
        -c* | --con*) exec "${relay[@]}" "$@" ;;
    esac
done

if [ -z "${CLIENT_ID_SECRET:-}" ]; then
    mkdir -p .run
    if [ ! -s .run/client-id-secret ]; then
        (umask 077 && .venv/bin/python -c 'import secrets; print(secrets.token_urlsafe(32))' > .run/client-id-secret)
    fi
    CLIENT_ID_SECRET=$(cat .run/client-id-secret)
    export CLIENT_ID_SECRET
fi

if [ -z "${UPSTREAM:-}" ]; then
    demo_port=${DEMO_UPSTREAM_PORT:-8081}
    .venv/bin/python -m mterelay.demo upstream --port "$demo_port" &
    demo_pid=$!
    trap 'kill "$demo_pid" 2>/dev/null || true' EXIT
    export UPSTREAM="http://127.0.0.1:$demo_port"
    export PASS_THROUGH_ROUTES="${PASS_THROUGH_ROUTES:-/demo/*}"
fi

echo "mterelay on port ${PORT:-8080}, upstream $UPSTREAM; try: curl http://127.0.0.1:${PORT:-8080}/api/mte-echo/hi"
# Not exec: the EXIT trap stops the demo upstream when the relay ends.
"${relay[@]}" "$@"
