"""
systemd's readiness protocol (sd_notify) without libsystemd.

Both units are Type=notify: systemd considers the daemon started only once it
serves (READY=1), and shows reloads and stops (RELOADING=1, STOPPING=1).
Without $NOTIFY_SOCKET (a plain twistd run) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time


def _address(value: str) -> str | bytes:
    # "@name" is an abstract-namespace socket (a leading NUL on the wire).
    if value.startswith("@"):
        return b"\0" + value[1:].encode()
    return value


def notify(state: str, environ=os.environ) -> bool:
    """Send C{state} (e.g. "READY=1") to the service manager, if there is one."""
    path = environ.get("NOTIFY_SOCKET")
    if not path:
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
        try:
            sock.connect(_address(path))
            sock.sendall(state.encode())
        except OSError:
            return False
    return True


def ready(status: str = "") -> bool:
    return notify("READY=1" + (f"\nSTATUS={status}" if status else "") + f"\nMAINPID={os.getpid()}")


def reloading() -> bool:
    # systemd >= 253 wants the monotonic time with RELOADING=1 (Type=notify-reload).
    usec = int(time.clock_gettime(time.CLOCK_MONOTONIC) * 1_000_000)
    return notify(f"RELOADING=1\nMONOTONIC_USEC={usec}")


def stopping() -> bool:
    return notify("STOPPING=1")
