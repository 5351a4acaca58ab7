"""
A real, tiny Linux guest for end-to-end tests: Debian's cloud kernel from
/boot and an initramfs built here (busybox-static, the ACPI button and evdev
modules, an C{/init} script), booted directly by QEMU under TCG.

Why this guest: a SeaBIOS guest without an OS ignores the ACPI power button,
so only a real kernel tests that C{VM.shutdown} ends by the guest's own
power-off, and that a guest-initiated power-off is reported as such. (Under
this host's nested KVM a Linux kernel hangs right after decompression, hence
C{<domain type="qemu">}, which the driver runs under TCG.)

What the guest does, on its serial console (C{console=ttyS0}):
 - C{GUEST-READY} once it listens to its power button (then every press of
   it prints C{GUEST-POWER-BUTTON} and powers off);
 - with C{guest.poweroff_after=N} on the kernel command line, it prints
   C{GUEST-POWEROFF} and powers itself off N seconds after being ready;
 - C{GUEST-ERROR ...} when a step of C{/init} failed.

The initramfs is built once per test process into a temporary directory
removed at exit; L{guest_files} copies the kernel and the initramfs into an
image root so the agent's path checks accept them.
"""

from __future__ import annotations

import atexit
import glob
import gzip
import io
import lzma
import os
import re
import shutil
import stat
import tempfile
from pathlib import Path

__all__ = ["guest_files", "linux_domain_xml", "build_initramfs", "find_kernel",
           "READY", "POWER_BUTTON", "POWEROFF", "ERROR"]

READY = "GUEST-READY"
POWER_BUTTON = "GUEST-POWER-BUTTON"
POWEROFF = "GUEST-POWEROFF"
ERROR = "GUEST-ERROR"

#: The modules the power button needs, in the kernel package (deps added).
MODULES = ("evdev", "button")
BUSYBOX = "/bin/busybox"

INIT = r"""#!/bin/sh
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
for m in @MODULES@; do
    insmod "/lib/modules/$m.ko" || echo "@ERROR@ insmod $m"
done
# The ACPI power button is an input device named "Power Button" (the fixed
# LNXPWRBN one, and a PNP0C0C one on some machines): its first event is a
# press.
watching=0
for ev in /sys/class/input/event*; do
    [ -e "$ev/device/name" ] || continue
    [ "$(cat "$ev/device/name")" = "Power Button" ] || continue
    dev=/dev/input/${ev##*/}
    n=0
    while [ ! -c "$dev" ] && [ $n -lt 100 ]; do sleep 0.05; n=$((n + 1)); done
    (dd if="$dev" of=/dev/null bs=24 count=1 2>/dev/null
     echo "@POWER_BUTTON@"; sync; poweroff -f) &
    watching=$((watching + 1))
done
[ $watching -gt 0 ] || echo "@ERROR@ no power button"
for arg in $(cat /proc/cmdline); do
    case "$arg" in
    guest.poweroff_after=*)
        (sleep "${arg#*=}"; echo "@POWEROFF@"; sync; poweroff -f) &
        ;;
    guest.tick=*)
        (n=0; while :; do echo "TICK $n"; n=$((n + 1)); sleep "${arg#*=}"; done) &
        ;;
    esac
done
echo "@READY@"
while :; do sleep 3600; done
"""


# -- the kernel ------------------------------------------------------------

def _version_key(version: str):
    return [int(p) if p.isdigit() else p for p in re.split(r"[.-]", version)]


def find_kernel(boot: str = "/boot") -> tuple[str, str]:
    """(kernel path, version) of the newest installed Debian cloud kernel."""
    kernels = glob.glob(os.path.join(boot, "vmlinuz-*-cloud-amd64"))
    if not kernels:
        raise RuntimeError(
            f"no {boot}/vmlinuz-*-cloud-amd64: install linux-image-cloud-amd64 "
            "(tools/install.sh does)")
    versions = sorted((os.path.basename(k)[len("vmlinuz-"):] for k in kernels),
                      key=_version_key)
    version = versions[-1]
    return os.path.join(boot, f"vmlinuz-{version}"), version


def _module_files(version: str, names=MODULES,
                  modules_root: str = "/lib/modules") -> list[tuple[str, bytes]]:
    """(module name, uncompressed .ko bytes) for C{names} and their
    dependencies per modules.dep, dependencies first."""
    base = Path(modules_root) / version
    deps: dict[str, list[str]] = {}
    by_name: dict[str, str] = {}
    for line in (base / "modules.dep").read_text().splitlines():
        path, _, rest = line.partition(":")
        deps[path] = rest.split()
        by_name[re.sub(r"\.ko(\.\w+)?$", "", os.path.basename(path))
                .replace("-", "_")] = path
    ordered: list[str] = []

    def visit(path: str) -> None:
        if path in ordered:
            return
        for dep in deps.get(path, []):
            visit(dep)
        ordered.append(path)

    for name in names:
        path = by_name.get(name.replace("-", "_"))
        if path is None:
            raise RuntimeError(f"module {name} not in {base}/modules.dep")
        visit(path)
    out = []
    for path in ordered:
        data = (base / path).read_bytes()
        if path.endswith(".ko.xz"):
            data = lzma.decompress(data)
        elif path.endswith(".ko.gz"):
            data = gzip.decompress(data)
        elif not path.endswith(".ko"):
            raise RuntimeError(f"cannot decompress {path} (busybox insmod "
                               "wants a plain .ko)")
        name = re.sub(r"\.ko(\.\w+)?$", "", os.path.basename(path))
        out.append((name, data))
    return out


# -- cpio (newc) -----------------------------------------------------------

class _Cpio:
    """A cpio "newc" archive, the format the kernel unpacks as initramfs."""

    def __init__(self):
        self.buf = io.BytesIO()
        self.ino = 1
        self.mtime = 0               # reproducible archives

    def _entry(self, name: str, mode: int, data: bytes = b"",
               rdev: tuple[int, int] = (0, 0)) -> None:
        encoded = name.encode() + b"\0"
        fields = (self.ino, mode, 0, 0, 1, self.mtime, len(data), 0, 0,
                  rdev[0], rdev[1], len(encoded), 0)
        header = b"070701" + b"".join(b"%08X" % f for f in fields)
        self.ino += 1
        self.buf.write(header + encoded)
        self.buf.write(b"\0" * (-(len(header) + len(encoded)) % 4))
        self.buf.write(data)
        self.buf.write(b"\0" * (-len(data) % 4))

    def dir(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, perm: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | perm, data)

    def symlink(self, name: str, target: str) -> None:
        self._entry(name, stat.S_IFLNK | 0o777, target.encode())

    def chardev(self, name: str, major: int, minor: int) -> None:
        self._entry(name, stat.S_IFCHR | 0o600, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return self.buf.getvalue()


def build_initramfs(version: str, busybox: str = BUSYBOX) -> bytes:
    """The gzip'd initramfs for kernel C{version} (see the module docstring)."""
    modules = _module_files(version)
    init = INIT
    for key, value in (("@MODULES@", " ".join(n for n, _ in modules)),
                       ("@READY@", READY), ("@POWER_BUTTON@", POWER_BUTTON),
                       ("@POWEROFF@", POWEROFF), ("@ERROR@", ERROR)):
        init = init.replace(key, value)
    cpio = _Cpio()
    for d in ("bin", "dev", "proc", "sys", "lib", "lib/modules"):
        cpio.dir(d)
    # The kernel opens /dev/console for init's stdio before /init mounts
    # devtmpfs: without this node init would run with no output at all.
    cpio.chardev("dev/console", 5, 1)
    with open(busybox, "rb") as f:
        cpio.file("bin/busybox", f.read(), 0o755)
    cpio.symlink("bin/sh", "busybox")
    for name, data in modules:
        cpio.file(f"lib/modules/{name}.ko", data)
    cpio.file("init", init.encode(), 0o755)
    return gzip.compress(cpio.finish(), compresslevel=6, mtime=0)


# -- the per-process cache -------------------------------------------------

_built: tuple[str, str] | None = None


def _build_once() -> tuple[str, str]:
    global _built
    if _built is None:
        kernel, version = find_kernel()
        cache = tempfile.mkdtemp(prefix="vt-guest-")
        atexit.register(shutil.rmtree, cache, True)
        initrd = os.path.join(cache, "initrd.img")
        with open(initrd, "wb") as f:
            f.write(build_initramfs(version))
        _built = (kernel, initrd)
    return _built


def guest_files(images_dir) -> tuple[str, str]:
    """Copy the guest's kernel and initramfs into C{images_dir} (an image
    root of the agent), readable by the agent's user; returns their paths."""
    kernel, initrd = _build_once()
    out = []
    for src, name in ((kernel, "guest-vmlinuz"), (initrd, "guest-initrd.img")):
        dst = os.path.join(str(images_dir), name)
        shutil.copyfile(src, dst)
        os.chmod(dst, 0o644)
        out.append(dst)
    return out[0], out[1]


def linux_domain_xml(vm_id: str, name: str, kernel: str, initrd: str,
                     cmdline_extra: str = "", memory_mib: int = 128) -> str:
    """
    A domain that boots the test guest under TCG, with ACPI (the power
    button) and its serial console in the agent's serial log
    (C{<log_dir>/<vm_id>.serial.log}).
    """
    cmdline = f"console=ttyS0 quiet {cmdline_extra}".strip()
    return f"""<domain type="qemu">
  <name>{name}</name>
  <uuid>{vm_id}</uuid>
  <memory unit="MiB">{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch="x86_64" machine="pc">hvm</type>
    <kernel>{kernel}</kernel>
    <initrd>{initrd}</initrd>
    <cmdline>{cmdline}</cmdline>
  </os>
  <features><acpi/></features>
  <on_poweroff>destroy</on_poweroff>
  <devices>
    <serial type="file">
      <source path="/var/log/libvirt/qemu/{name}.serial.log"/>
      <target port="0"/>
    </serial>
    <console type="pty"><target type="serial" port="0"/></console>
    <memballoon model="none"/>
  </devices>
</domain>"""
