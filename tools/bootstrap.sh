#!/usr/bin/env bash
# The first command of a fresh machine: install what is missing, make a dev PKI,
# start privd as root and the agent as the unprivileged "vdsm" user on their
# embedded defaults (no --config), and show the agent answering over mutual TLS.
# Run as root. Stop both with: tools/bootstrap.sh stop
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VDSM_TWISTED_VENV:-/opt/vdsm-twisted/venv}
PKI=/etc/pki/vdsm          # the agent's embedded default ([tls] pki_dir)
RUN=/run/vdsm-twisted      # the agent's embedded default ([agent] run_dir)
LOGS=/var/log/vdsm-twisted

stop_daemon() {  # pidfile
    local pid
    pid=$(cat "$1" 2>/dev/null) || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid"
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
    rm -f "$1"
}

stop_agent() {
    stop_daemon "$RUN/vdsm.pid"    # twistd's pid file: the agent it started
    stop_daemon "$RUN/agent.lock"  # whoever serves now (a standby that took over)
}

if [ "${1:-}" = stop ]; then
    stop_agent
    stop_daemon /run/vdsm-twisted-privd.pid
    exit 0
fi

tools/install.sh

if [ ! -f "$PKI/certs/cacert.pem" ]; then
    echo "bootstrap: creating a development PKI in $PKI"
    "$VENV/bin/vdsm-twisted-tool" pki --dir "$PKI" --group vdsm
fi
install -d -o vdsm -g vdsm -m 0755 "$RUN"
install -d -o vdsm -g vdsm -m 0750 "$LOGS"

stop_agent
stop_daemon /run/vdsm-twisted-privd.pid

"$VENV/bin/twistd" --pidfile /run/vdsm-twisted-privd.pid --logfile "$LOGS/privd.log" privd
runuser -u vdsm -- "$VENV/bin/twistd" --pidfile "$RUN/vdsm.pid" --logfile "$LOGS/vdsm.log" vdsm

for _ in $(seq 100); do
    "$VENV/bin/python" -c "import socket; socket.create_connection(('127.0.0.1', 54321), 0.2).close()" \
        2>/dev/null && break
    sleep 0.1
done
echo "bootstrap: privd and the agent are running (logs in $LOGS); asking the agent:"
"$VENV/bin/vdsm-twisted-client" --pki "$PKI" Host getCapabilities
