#!/usr/bin/env bash
# Installs everything vdsm-twisted needs on a fresh Debian 12 machine (idempotent):
# Debian packages, a virtualenv with the pinned Python dependencies and the
# project itself, the unprivileged "vdsm" user, and /dev/kvm access for it.
# Run as root.
set -euo pipefail
cd "$(dirname "$0")/.."

VENV=${VDSM_TWISTED_VENV:-/opt/vdsm-twisted/venv}
APT_PACKAGES=(python3 python3-venv python3-dev gcc pkg-config libvirt-dev
              qemu-system-x86 qemu-utils iproute2 nftables dnsmasq-base
              libvirt-daemon-system busybox-static linux-image-cloud-amd64)

if [ "$(id -u)" != 0 ]; then
    echo "install.sh: run as root (it installs packages and creates the vdsm user)" >&2
    exit 1
fi

missing=()
for pkg in "${APT_PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
done
if [ ${#missing[@]} -gt 0 ]; then
    echo "install.sh: installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# Debian's own Python (world-readable), so the unprivileged user can run it.
if [ ! -x "$VENV/bin/python" ]; then
    mkdir -p "$(dirname "$VENV")"
    /usr/bin/python3 -m venv "$VENV"
fi
"$VENV/bin/python" -m pip install -q --disable-pip-version-check \
    -r requirements.txt -r requirements-test.txt
"$VENV/bin/python" -m pip install -q --disable-pip-version-check --no-deps --force-reinstall .
# Twisted caches plugin discovery; refresh it while we are root.
"$VENV/bin/python" -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))" 2>/dev/null || true

getent group kvm >/dev/null || groupadd --system kvm
getent group vdsm >/dev/null || groupadd --system vdsm
if ! id vdsm >/dev/null 2>&1; then
    useradd --system -g vdsm -G kvm --no-create-home --home-dir /var/lib/vdsm-twisted \
        --shell /usr/sbin/nologin vdsm
fi
id -nG vdsm | grep -qw kvm || usermod -a -G kvm vdsm
# No udev here to apply qemu's rule: give the kvm group /dev/kvm as udev would.
if [ -e /dev/kvm ]; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
fi
for mod in tun bridge; do modprobe "$mod" 2>/dev/null || true; done
echo "install.sh: ready ($("$VENV/bin/python" -c 'import vdsm_twisted; print("vdsm-twisted", vdsm_twisted.__version__)'))"
