#!/usr/bin/env bash
# Run the relay on a working default: when no upstream is given (neither UPSTREAM nor --upstream), a demo upstream
# (python -m mterelay.demo) on 127.0.0.1:${DEMO_UPSTREAM_PORT:-8081} with /demo/* as a pass-through route; when
# CLIENT_ID_SECRET is unset, a random one kept in .run/client-id-secret (gitignored). Any other setting comes from the
# environment or the arguments, e.g.
#   PORT=3000 bash scripts/run.sh --debug
# With a --config file there are no defaults: the environment outranks the file, so exporting them would override it.
# The relay runs in the caller's directory, so that relative paths (--config, key files) are the caller's. Stopping
# this script (Ctrl-C, or a TERM or HUP to its pid) stops the relay, waits for its drain, then stops the demo upstream;
# the script exits with the relay's status (2: a configuration error).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
bash "$root/scripts/setup.sh"
python=$root/.venv/bin/python
relay=("$root/.venv/bin/twistd" --nodaemon --pidfile= mterelay)

# The arguments as twistd's getopt reads them against the plugin's own options (--upstream X, --upstream=X, a unique
# prefix such as --po for --port; --upstream-timeout is another option), so that no default overrides or contradicts
# them. Sets arg_<option> for each option given, arg_listen to the --listen values, and arg_direct=1 when twistd
# should run the arguments as they are: --config, --help, --version, or arguments it will refuse itself.
# When it fails (mterelay does not import), twistd is left to report why.
parsed=$("$python" - "$@" 2>/dev/null <<'EOF'
import getopt
import shlex
import sys

from mterelay.tap import Options

options = Options(environ={})
try:
    given, rest = getopt.getopt(sys.argv[1:], options.shortOpt, options.longOpt)
except getopt.GetoptError:
    given, rest = None, []
names = {"-c": "config"}
found = {}
listen = []
for option, value in given or ():
    name = names.get(option, option.lstrip("-")).replace("-", "_")
    if name == "listen":
        listen.append(value)
    else:
        found[name] = value
direct = given is None or bool(rest) or bool({"config", "help", "version"} & found.keys())
print(f"arg_direct={int(direct)}")
print(f"arg_listen={shlex.quote(','.join(listen))}")
for name in ("upstream", "port", "client_id_secret"):
    if name in found:
        print(f"arg_{name}={shlex.quote(found[name])}")
EOF
) || parsed=arg_direct=1
eval "$parsed"

if [ "$arg_direct" = 1 ]; then
    # Nothing of ours to stop: exec, so signals and the exit status are the relay's own.
    exec "${relay[@]}" "$@"
fi

if [ -z "${arg_client_id_secret+set}" ] && [ -z "${CLIENT_ID_SECRET:-}" ]; then
    mkdir -p "$root/.run"
    if [ ! -s "$root/.run/client-id-secret" ]; then
        (umask 077 && "$python" -c 'import secrets; print(secrets.token_urlsafe(32))' > "$root/.run/client-id-secret")
    fi
    CLIENT_ID_SECRET=$(cat "$root/.run/client-id-secret")
    export CLIENT_ID_SECRET
fi

demo_pid=
relay_pid=
relay_stopped=
signalled=

fail() {
    echo "run.sh: error: $*" >&2
    exit 1
}

accepts() {  # whether something accepts TCP connections on 127.0.0.1:$1
    (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null
}

# One TERM, twistd's graceful stop (a second one during its drain would only be logged).
stop_relay() {
    if [ -n "$relay_pid" ] && [ -z "$relay_stopped" ]; then
        relay_stopped=1
        kill -TERM "$relay_pid" 2>/dev/null || true
    fi
    return 0
}

# Background jobs of a non-interactive shell ignore SIGINT, so twistd would not see a Ctrl-C: on any stop signal, stop
# it here. The main line below notices `signalled` when the relay is not started yet.
on_signal() {
    signalled=$1
    stop_relay
}

# The relay first, through its drain (in-flight /demo/* requests still need the demo), then the demo.
stop_all() {
    if [ -n "$relay_pid" ]; then
        stop_relay
        while kill -0 "$relay_pid" 2>/dev/null; do
            wait "$relay_pid" 2>/dev/null || true
        done
    fi
    if [ -n "$demo_pid" ]; then
        kill -TERM "$demo_pid" 2>/dev/null || true
        while kill -0 "$demo_pid" 2>/dev/null; do
            wait "$demo_pid" 2>/dev/null || true
        done
    fi
}

trap 'on_signal 129' HUP
trap 'on_signal 130' INT
trap 'on_signal 143' TERM
trap stop_all EXIT

if [ -z "${arg_upstream+set}" ] && [ -z "${UPSTREAM:-}" ]; then
    demo_port=${DEMO_UPSTREAM_PORT:-8081}
    if ! [[ $demo_port =~ ^[0-9]{1,5}$ ]] || [ "$demo_port" -lt 1 ] || [ "$demo_port" -gt 65535 ]; then
        fail "DEMO_UPSTREAM_PORT=$demo_port is not a port number"
    fi
    # Whatever listens there would be sent /demo/* in the demo's place.
    if accepts "$demo_port"; then
        fail "port $demo_port is in use, so the demo upstream cannot listen there;" \
            "set DEMO_UPSTREAM_PORT to a free port, or UPSTREAM"
    fi
    # From the repository: the caller's directory must not shadow the mterelay package of `python -m`. A subshell
    # resets the INT trap to the default, not to the ignoring of a background job: ignore it again (and a closed
    # terminal's HUP), so that a Ctrl-C stops the demo only after the relay's drain, through stop_all.
    (trap '' HUP INT && cd "$root" && exec "$python" -m mterelay.demo upstream --port "$demo_port") &
    demo_pid=$!
    # Ready when it accepts connections while alive (not a server that took the port meanwhile), within 10 s.
    tries=0
    until accepts "$demo_port" && kill -0 "$demo_pid" 2>/dev/null; do
        [ -z "$signalled" ] || exit "$signalled"
        if ! kill -0 "$demo_pid" 2>/dev/null; then
            demo_pid=
            fail "the demo upstream did not start on port $demo_port (see its error above)"
        fi
        if [ "$tries" -ge 100 ]; then
            fail "the demo upstream does not accept connections on port $demo_port after 10 s"
        fi
        tries=$((tries + 1))
        sleep 0.1
    done
    export UPSTREAM="http://127.0.0.1:$demo_port"
    export PASS_THROUGH_ROUTES="${PASS_THROUGH_ROUTES:-/demo/*}"
fi

# The relay listens on the port only when one is given or no --listen/LISTEN is (src/mterelay/config.py).
port=${arg_port:-${PORT:-}}
listen=${arg_listen:-${LISTEN:-}}
upstream=${arg_upstream:-${UPSTREAM:-}}
if [ -z "$port" ] && [ -n "$listen" ]; then
    echo "mterelay on $listen, upstream $upstream"
else
    echo "mterelay on port ${port:-8080}, upstream $upstream; try: curl http://127.0.0.1:${port:-8080}/api/mte-echo/hi"
fi

[ -z "$signalled" ] || exit "$signalled"
# The relay ignores INT (as a background job would) and HUP: closing the terminal sends the whole group a HUP,
# which would kill twistd at once; the HUP trap above stops it through its drain instead.
(trap '' HUP INT && exec "${relay[@]}" "$@") &
relay_pid=$!
# A signal that came before relay_pid was set found nothing to stop.
[ -z "$signalled" ] || stop_relay
# `wait` returns early when a trapped signal arrives: wait again until the relay is gone, for its exit status.
while :; do
    status=0
    wait "$relay_pid" || status=$?
    kill -0 "$relay_pid" 2>/dev/null || break
done
relay_pid=
exit "$status"
