#!/usr/bin/env bash
# Runs the whole test suite (as root: tests start privd as root and the agent
# as the unprivileged vdsm user). Installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VDSM_TWISTED_VENV:-/opt/vdsm-twisted/venv}
tools/install.sh
exec "$VENV/bin/python" -m pytest tests -q -p no:cacheprovider "$@"
