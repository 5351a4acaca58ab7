"""
Finding our QEMU processes in /proc when the state files cannot be trusted.

A QEMU of ours is recognised by two tags on its command line: C{-uuid <id>}
and a QMP socket path inside our run directory (C{<vms_dir>/<id>/qmp.sock}).
Either alone could be a stranger's; both together are ours.
"""

from __future__ import annotations

import os
import re

import attr

_QMP_PATH = re.compile(r"path=([^,]+/qmp\.sock)(?:,|$)")


@attr.frozen
class FoundQemu:
    pid: int
    vm_id: str
    qmp_path: str


def _cmdline(pid: int, proc: str) -> list[str] | None:
    try:
        with open(f"{proc}/{pid}/cmdline", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    return [a.decode("utf-8", "replace") for a in raw.split(b"\0") if a]


def find_qemus(vms_dir: str, proc: str = "/proc") -> dict[str, FoundQemu]:
    """Every running QEMU tagged with our run directory, by VM id."""
    vms_dir = os.path.realpath(vms_dir)
    found: dict[str, FoundQemu] = {}
    for name in os.listdir(proc):
        if not name.isdigit():
            continue
        argv = _cmdline(int(name), proc)
        if not argv or "qemu-system" not in os.path.basename(argv[0]):
            continue
        try:
            vm_id = argv[argv.index("-uuid") + 1]
        except (ValueError, IndexError):
            continue
        expected = os.path.join(vms_dir, vm_id, "qmp.sock")
        for arg in argv:
            match = _QMP_PATH.search(arg)
            if match and os.path.normpath(match.group(1)) == expected:
                found[vm_id] = FoundQemu(pid=int(name), vm_id=vm_id, qmp_path=expected)
                break
    return found
