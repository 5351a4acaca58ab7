"""
Shared pieces of the benchmarks: the agent stack, a private libvirtd, bare
QEMU with the agent's own command line, and the guest they all run.

Every bench is a script run from the repository root; it imports this module
from its own directory. Whatever a helper starts, its C{stop()} ends, by pid:
a libvirtd or virtlogd that was already running is used, never stopped.
"""

from __future__ import annotations

import json
import os
import pwd
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable, Iterable

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests import _procs, _stack  # noqa: E402

CLK_TCK = os.sysconf("SC_CLK_TCK")


# -- output -----------------------------------------------------------------

def progress(message: str) -> None:
    """Progress goes to stderr, so stdout holds only results (ratios last)."""
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def median(values: Iterable[float]) -> float:
    return statistics.median(list(values))


def summary(values: list[float], scale: float = 1000.0, unit: str = "ms") -> str:
    v = sorted(values)
    return (f"median {median(v) * scale:.1f} {unit}  min {v[0] * scale:.1f}  "
            f"max {v[-1] * scale:.1f}  (n={len(v)})")


# -- the guest --------------------------------------------------------------

def domain_xml(vm_id: str, name: str) -> str:
    """
    A diskless 64 MiB, 1 vCPU KVM guest without NIC, display, balloon or USB.

    USB is off explicitly: libvirt adds a UHCI controller to a pc machine
    unless told not to, and the agent does not; a running UHCI costs each
    guest several % of a core, which would make the two hosts unequal.
    """
    return f"""<domain type="kvm">
  <name>{name}</name>
  <uuid>{vm_id}</uuid>
  <memory unit="MiB">64</memory>
  <vcpu>1</vcpu>
  <os><type arch="x86_64" machine="pc">hvm</type></os>
  <devices>
    <controller type="usb" model="none"/>
    <memballoon model="none"/>
  </devices>
</domain>"""


# -- processes --------------------------------------------------------------

def _cmdline(pid: int) -> bytes:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            return f.read()
    except OSError:
        return b""


def _comm(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/comm") as f:
            return f.read().strip()
    except OSError:
        return ""


def pids_with(predicate: Callable[[int], bool]) -> list[int]:
    return [int(p) for p in os.listdir("/proc") if p.isdigit() and predicate(int(p))]


def kill_pids(pids: Iterable[int], timeout: float = 5.0) -> None:
    """SIGTERM these pids, SIGKILL the ones still there after C{timeout}."""
    pids = list(pids)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGTERM)
        except ProcessLookupError:
            pass
    deadline = time.monotonic() + timeout
    while pids and time.monotonic() < deadline:
        pids = [p for p in pids if os.path.exists(f"/proc/{p}") and _state(p) != "Z"]
        time.sleep(0.05)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


def _state(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
        return data[data.rindex(b")") + 2:].split()[0].decode()
    except (OSError, ValueError, IndexError):
        return "Z"


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        data = f.read()
    fields = data[data.rindex(b")") + 2:].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def qemu_pids_of(vm_ids: Iterable[str]) -> list[int]:
    """QEMU processes (whoever started them) running any of these UUIDs."""
    wanted = [b"-uuid\0" + v.encode() + b"\0" for v in vm_ids]
    return pids_with(lambda p: _comm(p).startswith("qemu-system")
                     and any(w in _cmdline(p) for w in wanted))


def wait_quiet(pids: list[int], per_vm: float = 0.015, timeout: float = 120.0) -> float:
    """
    Wait until these guests stop booting: SeaBIOS without a boot device burns
    a few CPU seconds per guest (more where real mode is emulated), which
    would skew any measurement taken meanwhile. Returns the seconds waited.
    """
    def total() -> float:
        out = 0.0
        for pid in pids:
            try:
                out += cpu_seconds(pid)
            except OSError:
                pass
        return out

    t_start = time.monotonic()
    before, t0 = total(), t_start
    while time.monotonic() - t_start < timeout:
        time.sleep(1.0)
        now, t1 = total(), time.monotonic()
        rate = (now - before) / (t1 - t0)
        if rate <= max(0.05, per_vm * len(pids)):
            return t1 - t_start
        before, t0 = now, t1
    progress(f"guests still busy after {timeout:g} s; measuring anyway")
    return time.monotonic() - t_start


def status_kib(pid: int, key: str) -> int:
    """A C{kB} field of /proc/PID/status (VmRSS, VmHWM, ...)."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


# -- the agent --------------------------------------------------------------

class Agent:
    """
    privd (root) and the agent (as C{vdsm}) on private paths and a free port,
    from L{tests._stack}, with production logging (info) and the given
    sampling intervals.
    """

    def __init__(self, vm_stats_interval: float = 2.0, host_stats_interval: float = 2.0,
                 log_level: str = "info"):
        self.vm_stats_interval = vm_stats_interval
        self.host_stats_interval = host_stats_interval
        self.log_level = log_level
        self.root: Path | None = None
        self.stack: _stack.Stack | None = None
        self._code: Path | None = None

    def start(self) -> "Agent":
        self.root = Path(tempfile.mkdtemp(prefix="vt-bench-"))
        self._code = Path(tempfile.mkdtemp(prefix="vt-bench-code-"))
        _procs.code_copy(self._code)
        self.stack = _stack.make_stack(self.root, self._code)
        conf = self.stack.agent_conf
        text = conf.read_text()
        text = text.replace("log_level = debug", f"log_level = {self.log_level}")
        text = text.replace("host_stats_interval = 0.5",
                            f"host_stats_interval = {self.host_stats_interval}")
        text = text.replace("vm_stats_interval = 0.5",
                            f"vm_stats_interval = {self.vm_stats_interval}")
        conf.write_text(text)
        self.stack.start_privd()
        self.stack.start_agent()
        return self

    @property
    def pid(self) -> int:
        return self.stack.agent.pid

    def qemu_pids(self) -> list[int]:
        """QEMUs of this stack (their QMP sockets live under our root)."""
        marker = str(self.root).encode() + b"/"
        return pids_with(lambda p: _comm(p).startswith("qemu-system") and marker in _cmdline(p))

    def stop(self) -> None:
        if self.stack is not None:
            for proc in (self.stack.agent, self.stack.privd):
                if proc is not None:
                    _procs.stop(proc)
            # VMs outlive the agent by design: end any the bench did not destroy.
            kill_pids(self.qemu_pids())
            if self.stack.notify_socket is not None:
                self.stack.notify_socket.close()
        for path in (self.root, self._code):
            if path is not None:
                shutil.rmtree(path, True)


# -- bare QEMU --------------------------------------------------------------

class QMPError(Exception):
    pass


class SyncQMP:
    """A blocking QMP client: just enough to negotiate and run commands."""

    def __init__(self, path: str, timeout: float = 10.0, poll: float = 0.001):
        deadline = time.monotonic() + timeout
        while True:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                sock.connect(path)
                break
            except (FileNotFoundError, ConnectionRefusedError):
                sock.close()
                if time.monotonic() > deadline:
                    raise QMPError(f"no QMP socket at {path} after {timeout}s")
                time.sleep(poll)
        sock.settimeout(timeout)
        self.sock = sock
        self.file = sock.makefile("rwb")
        greeting = json.loads(self.file.readline())
        if "QMP" not in greeting:
            raise QMPError(f"not a QMP greeting: {greeting}")

    def execute(self, command: str, arguments: dict | None = None):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            line = self.file.readline()
            if not line:
                raise QMPError("QMP connection closed")
            reply = json.loads(line)
            if "return" in reply:
                return reply["return"]
            if "error" in reply:
                raise QMPError(f"{command}: {reply['error']}")

    def close(self) -> None:
        self.file.close()
        self.sock.close()


class BareQemu:
    """
    QEMU started the way the agent starts it (same argv, same user, same
    environment, paused with C{-S}), driven to "running" over QMP.
    """

    def __init__(self, user: str = "vdsm"):
        from vdsm_twisted.virt.qemu.driver import kvm_usable

        self.user = user
        self.kvm = kvm_usable()
        self.binary = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
        self.root = Path(tempfile.mkdtemp(prefix="vt-bench-bare-"))
        os.chmod(self.root, 0o755)
        pw = pwd.getpwnam(user)
        os.chown(self.root, pw.pw_uid, pw.pw_gid)
        self.procs: dict[str, subprocess.Popen] = {}

    def argv(self, xml: str, vm_id: str) -> list[str]:
        from vdsm_twisted.virt.domxml import parse_domain
        from vdsm_twisted.virt.qemu.argv import build_argv

        domain = parse_domain(xml, [str(self.root)])
        return build_argv(domain, kvm=self.kvm, qmp_path=str(self.root / f"{vm_id}.qmp"),
                          binary=self.binary,
                          serial_log_path=str(self.root / f"{vm_id}.serial.log"),
                          default_listen="127.0.0.1", vnc_display_base=40, spice=False)

    def start(self, vm_id: str, argv: list[str]) -> float:
        """Spawn, negotiate QMP, C{cont}; seconds until C{query-status} is running."""
        log = open(self.root / f"{vm_id}.log", "ab")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
        qmp_path = str(self.root / f"{vm_id}.qmp")
        t0 = time.monotonic()
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd="/",
                                **_procs.user_kwargs(self.user))
        log.close()
        self.procs[vm_id] = proc
        qmp = SyncQMP(qmp_path)
        try:
            qmp.execute("qmp_capabilities")
            state = qmp.execute("query-status")["status"]
            if state in ("prelaunch", "paused"):
                qmp.execute("cont")
            state = qmp.execute("query-status")["status"]
            elapsed = time.monotonic() - t0
        finally:
            qmp.close()
        if state != "running":
            raise QMPError(f"bare QEMU is {state!r}, not running")
        return elapsed

    def destroy(self, vm_id: str) -> None:
        proc = self.procs.pop(vm_id)
        try:
            qmp = SyncQMP(str(self.root / f"{vm_id}.qmp"), timeout=2)
            qmp.execute("qmp_capabilities")
            qmp.execute("quit")
            qmp.close()
        except (OSError, QMPError, ValueError):
            pass
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()

    def stop(self) -> None:
        for vm_id in list(self.procs):
            proc = self.procs.pop(vm_id)
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.root, True)


# -- libvirt ----------------------------------------------------------------

def _running(comm: str) -> list[int]:
    return pids_with(lambda p: _comm(p) == comm)


class Libvirtd:
    """
    A libvirtd (system mode, as root) for the comparison.

    If none runs, one is started on a private socket directory (and a
    virtlogd if none runs) and stopped afterwards; an existing one is used
    through C{qemu:///system} and left alone. Domains created through
    L{create} are destroyed in L{stop} whatever happened.
    """

    def __init__(self):
        self.root = Path(tempfile.mkdtemp(prefix="vt-bench-libvirt-"))
        self.uri = "qemu:///system"
        self.started: list[tuple[str, Path]] = []   # (name, pidfile) of daemons we started
        self.conn = None
        self.domains: dict[str, object] = {}

    def _start_daemon(self, name: str, argv: list[str], pidfile: Path,
                      ready: Callable[[], bool]) -> None:
        subprocess.run(argv, check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.started.append((name, pidfile))
        _procs.wait_for(lambda: pidfile.exists() and pidfile.read_text().strip() and ready(),
                        timeout=20, what=f"{name} to start")

    def start(self) -> "Libvirtd":
        import libvirt

        if not _running("virtlogd"):
            pidfile = self.root / "virtlogd.pid"
            self._start_daemon("virtlogd", ["virtlogd", "-d", "-p", str(pidfile)], pidfile,
                               lambda: os.path.exists("/run/libvirt/virtlogd-sock"))
        if _running("libvirtd"):
            progress("using the libvirtd already running (qemu:///system); it is left running")
        else:
            sockdir = self.root / "sock"
            sockdir.mkdir()
            conf = self.root / "libvirtd.conf"
            conf.write_text(f'unix_sock_dir = "{sockdir}"\n'
                            'unix_sock_rw_perms = "0700"\n'
                            'auth_unix_rw = "none"\nauth_unix_ro = "none"\n'
                            f'log_outputs = "3:file:{self.root}/libvirtd.log"\n')
            pidfile = self.root / "libvirtd.pid"
            sock = sockdir / "libvirt-sock"
            self._start_daemon("libvirtd", ["libvirtd", "-d", "-f", str(conf), "-p", str(pidfile)],
                               pidfile, sock.exists)
            self.uri = f"qemu+unix:///system?socket={sock}"
        libvirt.registerErrorHandler(lambda *_: None, None)   # no stderr noise
        self.conn = libvirt.open(self.uri)
        return self

    def create(self, xml: str, vm_id: str):
        dom = self.conn.createXML(xml, 0)
        self.domains[vm_id] = dom
        return dom

    def destroy(self, vm_id: str) -> None:
        dom = self.domains.pop(vm_id)
        try:
            dom.destroy()
        except Exception:   # already gone
            pass

    def stop(self) -> None:
        from concurrent.futures import ThreadPoolExecutor

        if self.conn is not None:
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(self.destroy, list(self.domains)))
            self.conn.close()
        for name, pidfile in reversed(self.started):
            try:
                pid = int(pidfile.read_text().strip())
            except (OSError, ValueError):
                continue
            if _comm(pid) == name:
                kill_pids([pid], timeout=10)
        shutil.rmtree(self.root, True)


# -- the agent's API from Twisted --------------------------------------------

class Events:
    """VM status events with their arrival time; waiters per (vm, status)."""

    def __init__(self):
        self.seen: dict[tuple[str, str], float] = {}
        self.waiters: dict[tuple[str, str], list] = {}

    def __call__(self, method: str, params) -> None:
        now = time.monotonic()
        if not method.startswith("|virt|VM_status|"):
            return
        vm_id = method.rsplit("|", 1)[-1]
        status = params.get(vm_id, {}).get("status")
        key = (vm_id, status)
        self.seen.setdefault(key, now)
        for d in self.waiters.pop(key, []):
            d.callback(now)

    def wait(self, vm_id: str, status: str, timeout: float = 60.0):
        """A Deferred firing with the monotonic time the event arrived."""
        from twisted.internet import defer, reactor

        key = (vm_id, status)
        if key in self.seen:
            return defer.succeed(self.seen[key])
        d = defer.Deferred()
        self.waiters.setdefault(key, []).append(d)
        d.addTimeout(timeout, reactor)
        return d


async def connect(agent: Agent):
    """A STOMP client of the library, subscribed to events: (client, events)."""
    from vdsm_twisted.client import connect as _connect

    client = await _connect("localhost", agent.stack.port, str(agent.stack.pki_dir),
                            protocol="stomp", timeout=60)
    events = Events()
    await client.subscribe_events(events)
    return client, events


def in_thread(fn, *args):
    from twisted.internet import threads

    return threads.deferToThread(fn, *args)


def sleep(seconds: float):
    from twisted.internet import reactor
    from twisted.internet.task import deferLater

    return deferLater(reactor, seconds, lambda: None)
