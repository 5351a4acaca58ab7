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
from typing import Any, Callable, Iterable

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


def react(main: Callable[[], Any]) -> None:
    """Run the coroutine C{main()} under a fresh reactor until it ends (task.react,
    whose clean SystemExit is swallowed; a failure still raises)."""
    from twisted.internet import defer, task

    try:
        task.react(lambda reactor: defer.Deferred.fromCoroutine(main()))
    except SystemExit as e:
        if e.code:
            raise


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
                 log_level: str = "info", bytecode: bool = False, standby: bool = False):
        #: Keep the agent's warm standby (see vdsm_twisted.continuity.standby).
        self.standby = standby
        self.vm_stats_interval = vm_stats_interval
        self.host_stats_interval = host_stats_interval
        self.log_level = log_level
        #: Compile the code copy to .pyc first, as an installed package ships
        #: (the copy has none, and the agent runs with PYTHONDONTWRITEBYTECODE).
        self.bytecode = bytecode
        self.root: Path | None = None
        self.stack: _stack.Stack | None = None
        self._code: Path | None = None

    def start(self, peer: "Agent | None" = None) -> "Agent":
        """C{peer}: be a second host of C{peer}'s cluster (its CA and image root)."""
        self.root = Path(tempfile.mkdtemp(prefix="vt-bench-"))
        self._code = Path(tempfile.mkdtemp(prefix="vt-bench-code-"))
        _procs.code_copy(self._code)
        if self.bytecode:
            subprocess.run([sys.executable, "-m", "compileall", "-q", str(self._code)],
                           check=True, stdout=subprocess.DEVNULL)
        kw = {} if peer is None else {"pki_dir": peer.stack.pki_dir, "images": peer.stack.images}
        self.stack = _stack.make_stack(self.root, self._code, standby=self.standby, **kw)
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
        # VM calls answer code 99 until the VM side is loaded and recovered.
        self.wait_log("recovery done")
        return self

    @property
    def pid(self) -> int:
        return self.stack.agent.pid

    @property
    def code(self) -> Path:
        """The agent's private copy of the code (its "installed" package)."""
        return self._code

    def _follow_log(self) -> list[str]:
        """
        Complete lines of the agent's log so far, read incrementally: twistd
        rotates C{vdsm.log} at 1 MB (to C{vdsm.log.1}, ...), which chatty
        probes reach within seconds, so the file alone cannot be counted in.
        """
        if not hasattr(self, "_lines"):
            self._lines: list[str] = []
            self._partial = b""
            self._ino: int | None = None
            self._pos = 0
            self._counts: dict[str, tuple[int, int]] = {}
        logs = self.root / "logs"
        try:
            f = open(logs / "vdsm.log", "rb")
        except OSError:
            return self._lines
        with f:
            ino = os.fstat(f.fileno()).st_ino
            data = b""
            if self._ino is not None and ino != self._ino:
                for old in logs.glob("vdsm.log.*"):   # rotated: finish the old file
                    if old.stat().st_ino == self._ino:
                        with open(old, "rb") as g:
                            g.seek(self._pos)
                            data += g.read()
                        break
                self._pos = 0
            self._ino = ino
            f.seek(self._pos)
            new = f.read()
            self._pos += len(new)
        data = self._partial + data + new
        *lines, self._partial = data.split(b"\n")
        self._lines += [line.decode(errors="replace") for line in lines]
        return self._lines

    def log_count(self, text: str) -> int:
        """How many log lines (rotated files included) contain C{text}."""
        lines = self._follow_log()
        scanned, count = self._counts.get(text, (0, 0))
        count += sum(1 for line in lines[scanned:] if text in line)
        self._counts[text] = (len(lines), count)
        return count

    def log(self) -> str:
        return "\n".join(self._follow_log())

    def wait_log(self, text: str, count: int = 1, timeout: float = 60.0,
                 poll: float = 0.005) -> float:
        """Block until C{text} was logged C{count} times; the monotonic time seen."""
        deadline = time.monotonic() + timeout
        while True:
            if self.log_count(text) >= count:
                return time.monotonic()
            if time.monotonic() > deadline:
                raise RuntimeError(f"{text!r} not logged {count} time(s) in {timeout:g} s:\n"
                                   + self.log()[-3000:])
            if self.stack.agent.poll() is not None and not self.serving():
                raise RuntimeError("the agent exited:\n" + self.log()[-3000:])
            time.sleep(poll)

    def serving(self) -> bool:
        """Is any agent of this stack alive (the started one, or a standby that took over)?"""
        return bool(_procs.processes_mentioning(self.stack.agent_conf))

    def install_new_build(self) -> None:
        """Rewrite a module of the code copy, as a package upgrade would."""
        target = self._code / "vdsm_twisted" / "_version.py"
        target.write_text(target.read_text() + f"\n# rebuilt {time.time()}\n")
        # A new mtime even within the same clock tick.
        os.utime(target, ns=(time.time_ns(), time.time_ns() + 1000))

    def client(self, timeout: float = 60.0) -> "SyncStomp":
        return SyncStomp(self.stack.port, tls_context(self.stack.pki_dir), timeout).connect()

    def create_vms(self, count: int, prefix: str = "bench", batch: int = 10,
                   timeout: float = 300.0) -> list[str]:
        """C{count} harness guests through the API, C{batch} at a time; their ids once Up."""
        import uuid

        client = self.client()
        ids: list[str] = []
        try:
            for start in range(0, count, batch):
                new = [str(uuid.uuid4()) for _ in range(min(batch, count - start))]
                for i, vm_id in enumerate(new):
                    client.call("VM.create", {"vmID": vm_id, "vmParams": {
                        "xml": domain_xml(vm_id, f"{prefix}-{start + i}")}})
                ids += new
                self.wait_vms_up(client, ids, timeout)
        finally:
            client.close()
        return ids

    @staticmethod
    def wait_vms_up(client: "SyncStomp", ids: list[str], timeout: float = 300.0) -> None:
        deadline = time.monotonic() + timeout
        while True:
            listed = {v["vmId"]: v["status"] for v in client.call("Host.getVMList")}
            if all(listed.get(vm_id) == "Up" for vm_id in ids):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"VMs not Up after {timeout:g} s: "
                                   f"{[(i, listed.get(i)) for i in ids if listed.get(i) != 'Up']}")
            time.sleep(0.2)

    def qemu_pids(self) -> list[int]:
        """QEMUs of this stack (their QMP sockets live under our root)."""
        marker = str(self.root).encode() + b"/"
        return pids_with(lambda p: _comm(p).startswith("qemu-system") and marker in _cmdline(p))

    def stop(self) -> None:
        if self.stack is not None:
            for proc in (self.stack.agent, self.stack.privd):
                if proc is not None:
                    _procs.stop(proc)
            self.stack.stop_other_agents()
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

    def _read(self) -> dict:
        line = self.file.readline()
        if not line:
            raise QMPError("QMP connection closed")
        return json.loads(line)

    def on_event(self, event: dict) -> None:
        """An event read while waiting for a reply (dropped here)."""

    def execute(self, command: str, arguments: dict | None = None):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg).encode() + b"\n")
        self.file.flush()
        while True:
            reply = self._read()
            if "event" in reply:
                self.on_event(reply)
            elif "return" in reply:
                return reply["return"]
            elif "error" in reply:
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
            self._libvirtd_argv = ["libvirtd", "-d", "-f", str(conf), "-p", str(pidfile)]
            self._start_daemon("libvirtd", self._libvirtd_argv, pidfile, sock.exists)
            self.uri = f"qemu+unix:///system?socket={sock}"
        libvirt.registerErrorHandler(lambda *_: None, None)   # no stderr noise
        self.conn = libvirt.open(self.uri)
        return self

    # -- restart (only a libvirtd this object started)

    @property
    def pid(self) -> int:
        for name, pidfile in self.started:
            if name == "libvirtd":
                return int(pidfile.read_text().strip())
        raise RuntimeError("this libvirtd was not started by the bench: not restarting it")

    def kill(self, sig: int, timeout: float = 30.0) -> None:
        """Signal our libvirtd and wait until it is gone (its QEMUs stay)."""
        pid = self.pid
        if _comm(pid) != "libvirtd":
            raise RuntimeError(f"pid {pid} is not libvirtd")
        if self.conn is not None:
            try:
                self.conn.close()
            except Exception:
                pass
            self.conn = None
        os.kill(pid, sig)
        _procs.wait_for(lambda: not os.path.exists(f"/proc/{pid}") or _state(pid) == "Z",
                        timeout=timeout, what="libvirtd to exit")

    def launch(self) -> None:
        """Start libvirtd again, as before (C{-d}: returns once it daemonized)."""
        subprocess.run(self._libvirtd_argv, check=True, stdin=subprocess.DEVNULL,
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def reopen(self) -> None:
        """A new connection, and our domains looked up again through it."""
        import libvirt

        self.conn = libvirt.open(self.uri)
        for vm_id in list(self.domains):
            try:
                self.domains[vm_id] = self.conn.lookupByUUIDString(vm_id)
            except libvirt.libvirtError:
                self.domains.pop(vm_id)

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

        ids = list(self.domains)
        if self.conn is None and ids and any(n == "libvirtd" for n, _ in self.started):
            try:   # after a restart the bench did not finish
                self.reopen()
            except Exception:
                pass
        if self.conn is not None:
            with ThreadPoolExecutor(16) as pool:
                list(pool.map(self.destroy, list(self.domains)))
            self.conn.close()
        kill_pids(qemu_pids_of(ids))   # whatever libvirtd could not destroy
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


# -- blocking engine clients (continuity benches) ------------------------------

class RpcError(Exception):
    def __init__(self, code: int, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code


def tls_context(pki_dir: Path):
    """The engine side of the dev PKI: client certificate, CA-verified server."""
    import ssl

    ctx = ssl.create_default_context(cafile=str(pki_dir / "certs" / "cacert.pem"))
    ctx.load_cert_chain(str(pki_dir / "certs" / "clientcert.pem"),
                        str(pki_dir / "keys" / "clientkey.pem"))
    return ctx


class SyncStomp:
    """
    A blocking STOMP 1.2 / JSON-RPC client, stdlib only, no reactor: it runs
    in probe processes and bench threads where timing must not depend on a
    reactor's turns. C{connect} is one round trip (TLS handshake, then
    CONNECT -> CONNECTED).
    """

    REQUESTS = "jms.topic.vdsm_requests"

    def __init__(self, port: int, ctx, timeout: float = 30.0, host: str = "127.0.0.1"):
        self.port, self.ctx, self.timeout, self.host = port, ctx, timeout, host
        self.sock = None
        self._buf = b""
        self.reply_queue = f"bench-{os.getpid()}-{id(self)}"
        self._subscribed = False

    def connect(self) -> "SyncStomp":
        raw = socket.create_connection((self.host, self.port), self.timeout)
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        try:
            self.sock = self.ctx.wrap_socket(raw, server_hostname="localhost")
        except BaseException:
            raw.close()
            raise
        self._buf = b""
        self._subscribed = False
        self._send("CONNECT", [("accept-version", "1.2"), ("heart-beat", "0,0")])
        command, _, _ = self._frame()
        if command != "CONNECTED":
            raise ConnectionError(f"STOMP CONNECT answered {command}")
        return self

    def _send(self, command: str, headers: list, body: bytes = b"") -> None:
        head = "".join(f"{k}:{v}\n" for k, v in headers)
        if body:
            head += f"content-length:{len(body)}\n"
        self.sock.sendall(f"{command}\n{head}\n".encode() + body + b"\0")

    def _frame(self) -> tuple[str, dict, bytes]:
        while True:
            self._buf = self._buf.lstrip(b"\r\n")   # heart-beats
            end = self._buf.find(b"\0")
            if end >= 0:
                head, _, body = self._buf[:end].partition(b"\n\n")
                self._buf = self._buf[end + 1:]
                lines = head.decode().split("\n")
                headers = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
                return lines[0].strip(), headers, body
            data = self.sock.recv(65536)
            if not data:
                raise ConnectionError("connection closed by the agent")
            self._buf += data

    def call(self, method: str, params: dict | None = None):
        """One JSON-RPC call; its result, or L{RpcError}."""
        if not self._subscribed:
            self._send("SUBSCRIBE", [("destination", self.reply_queue), ("id", "r"),
                                     ("ack", "auto")])
            self._subscribed = True
        call_id = os.urandom(8).hex()
        body = json.dumps([{"jsonrpc": "2.0", "method": method, "params": params or {},
                            "id": call_id}]).encode()
        self._send("SEND", [("destination", self.REQUESTS), ("reply-to", self.reply_queue),
                            ("content-type", "application/json")], body)
        while True:
            command, headers, body = self._frame()
            if command == "ERROR":
                raise ConnectionError(f"STOMP ERROR: {headers.get('message')} {body[:200]!r}")
            if command != "MESSAGE":
                continue
            reply = json.loads(body)
            if isinstance(reply, list):
                reply = reply[0]
            if reply.get("id") != call_id:
                continue
            if "error" in reply:
                raise RpcError(reply["error"].get("code"), reply["error"].get("message"))
            return reply["result"]

    def close(self) -> None:
        if self.sock is not None:
            try:
                self.sock.close()
            except OSError:
                pass
            self.sock = None


def probe_main(port: int, pki_dir: str, mode: str) -> None:
    """
    The body of a L{Probe} process: round trips in a tight loop until stdin
    closes, then the completion times (monotonic, system-wide) as JSON.

    C{connect}: every round trip is a new TCP + TLS connection and STOMP
    CONNECT -> CONNECTED (what a client arriving during an upgrade sees).
    C{persistent}: C{Host.ping2} on one connection, reconnecting when the
    agent drops it (what a connected engine sees).
    """
    import threading

    stop = threading.Event()
    threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
    ctx = tls_context(Path(pki_dir))
    ok: list[float] = []
    failures: list[str] = []
    client = None
    while not stop.is_set():
        try:
            if mode == "connect":
                SyncStomp(port, ctx).connect().close()
            else:
                if client is None:
                    client = SyncStomp(port, ctx).connect()
                if client.call("Host.ping2") is not True:
                    raise RuntimeError("Host.ping2 did not answer true")
            ok.append(time.monotonic())
        except (OSError, ConnectionError, RpcError, RuntimeError, ValueError) as e:
            if client is not None:
                client.close()
                client = None
            if len(failures) < 1000:
                failures.append(f"{time.monotonic():.6f} {type(e).__name__}: {e}")
            time.sleep(0.001)
    if client is not None:
        client.close()
    json.dump({"ok": ok, "failures": failures}, sys.stdout)


class Probe:
    """A separate process (no GIL shared with the bench) running L{probe_main}."""

    def __init__(self, port: int, pki_dir: Path, mode: str = "connect"):
        code = ("import sys; sys.path.insert(0, sys.argv[1]); import _harness; "
                "_harness.probe_main(int(sys.argv[2]), sys.argv[3], sys.argv[4])")
        self.proc = subprocess.Popen(
            [sys.executable, "-c", code, str(Path(__file__).resolve().parent), str(port),
             str(pki_dir), mode], stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def finish(self) -> dict:
        out, _ = self.proc.communicate(timeout=60)
        return json.loads(out)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def longest_gap(times: list[float], start: float, end: float) -> tuple[float, float, float]:
    """
    The longest gap between two consecutive successes, among those gaps that
    overlap [start, end]: (gap, last success before it, first one after).
    """
    best = (0.0, start, start)
    for a, b in zip(times, times[1:]):
        if b >= start and a <= end and b - a > best[0]:
            best = (b - a, a, b)
    return best


def qemu_pid_map(vm_ids: Iterable[str]) -> dict[str, int]:
    """vm id -> pid of the QEMU running it (its C{-uuid}); missing ids are absent."""
    wanted = set(vm_ids)
    out = {}
    for pid in pids_with(lambda p: _comm(p).startswith("qemu-system")):
        args = _cmdline(pid).split(b"\0")
        try:
            vm_id = args[args.index(b"-uuid") + 1].decode()
        except (ValueError, IndexError):
            continue
        if vm_id in wanted:
            out[vm_id] = pid
    return out


def ppid(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("PPid:"):
                return int(line.split()[1])
    raise KeyError("PPid")
