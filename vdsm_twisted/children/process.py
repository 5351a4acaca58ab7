"""
Children the agent owns directly (QEMU, dnsmasq): spawn, watch, signal, adopt.

Twisted's C{spawnProcess} keeps a child's state inside the reactor, which an
upgrade re-exec cannot carry across.  A L{Child} is instead nothing but file
descriptors and numbers (seed 001): its pid, a pidfd (exit notification and
signals immune to pid reuse) and the read end of its stdout/stderr pipe.  The
same record is rebuilt from those fds after an C{execv} of the agent, or from
/proc after a crash, so one code path serves a fresh start and an adoption.

Exit is noticed when the pidfd becomes readable; the status comes from
C{waitid(P_PIDFD)} while the process is our child (always, across re-exec),
and is reported as unknown after a crash (the child was reparented).
"""

from __future__ import annotations

import fcntl
import os
import signal
import time
from typing import Mapping, Sequence

import attr
from twisted.internet import defer
from twisted.internet.interfaces import IReadDescriptor
from twisted.logger import Logger
from zope.interface import implementer

log = Logger()


def boot_id() -> str:
    with open("/proc/sys/kernel/random/boot_id") as f:
        return f.read().strip()


def start_time(pid: int) -> int | None:
    """Clock ticks since boot at which C{pid} started (/proc/PID/stat field 22)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    # The command name may hold spaces or parentheses: split after the last ')'.
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[19])


def seconds_since(start_ticks: int) -> float:
    """How long ago a process started, from its /proc start time (ticks since boot)."""
    return time.clock_gettime(time.CLOCK_BOOTTIME) - start_ticks / os.sysconf("SC_CLK_TCK")


@attr.frozen
class Identity:
    """What proves a pid is still the process we started (pid reuse check)."""

    pid: int
    start_time: int
    exe: str
    boot_id: str

    @classmethod
    def of(cls, pid: int) -> "Identity":
        started = start_time(pid)
        if started is None:
            raise ProcessLookupError(pid)
        return cls(pid=pid, start_time=started, exe=os.readlink(f"/proc/{pid}/exe"),
                   boot_id=boot_id())

    def matches_running(self) -> bool:
        try:
            return Identity.of(self.pid) == self
        except OSError:
            return False


@attr.frozen
class ExitStatus:
    """How a child ended: an exit code, a signal, or unknown (adopted after a crash)."""

    code: int | None = None
    signal: int | None = None
    core_dumped: bool = False

    @property
    def known(self) -> bool:
        return self.code is not None or self.signal is not None

    def describe(self) -> str:
        if self.signal is not None:
            name = signal.Signals(self.signal).name if self.signal in signal.Signals._value2member_map_ else str(self.signal)
            return f"killed by {name}" + (" (core dumped)" if self.core_dumped else "")
        if self.code is not None:
            return f"exited with code {self.code}"
        return "exited (status unknown: not our child)"


@implementer(IReadDescriptor)
class _FdReader:
    """Minimal reactor reader for a raw fd (pidfd or pipe)."""

    def __init__(self, fd: int, on_readable, name: str):
        self._fd = fd
        self._on_readable = on_readable
        self._name = name

    def fileno(self) -> int:
        return self._fd

    def doRead(self):
        return self._on_readable()

    def connectionLost(self, reason):
        pass

    def logPrefix(self) -> str:
        return self._name


class Child:
    """One owned process.  C{exited} fires once with its L{ExitStatus}."""

    def __init__(self, reactor, identity: Identity, pidfd: int, output_fd: int | None,
                 log_path: str | None, name: str = "child"):
        self._reactor = reactor
        self.identity = identity
        self.pid = identity.pid
        self.pidfd = pidfd
        self.output_fd = output_fd
        self.log_path = log_path
        self.name = name
        self.exited: defer.Deferred = defer.Deferred()
        self.status: ExitStatus | None = None
        self._log_file = open(log_path, "ab", buffering=0) if log_path else None
        self._pid_reader = _FdReader(pidfd, self._pidfd_readable, f"{name}-pidfd")
        reactor.addReader(self._pid_reader)
        self._out_reader = None
        if output_fd is not None:
            os.set_blocking(output_fd, False)
            self._out_reader = _FdReader(output_fd, self._output_readable, f"{name}-output")
            reactor.addReader(self._out_reader)

    # -- state for re-exec / crash recovery
    def kept_fds(self) -> list[int]:
        """The fds an upgrade re-exec must keep open for this child."""
        return [fd for fd in (self.pidfd, self.output_fd) if fd is not None]

    def to_state(self) -> dict:
        return {"pid": self.pid, "start_time": self.identity.start_time,
                "exe": self.identity.exe, "boot_id": self.identity.boot_id,
                "pidfd": self.pidfd, "output_fd": self.output_fd,
                "log_path": self.log_path, "name": self.name}

    @classmethod
    def adopt(cls, reactor, state: Mapping, inherited: bool) -> "Child":
        """Rebuild a child from saved state.

        C{inherited}: the fds in C{state} are open in this process (re-exec);
        otherwise (crash restart) a new pidfd is opened and output goes only
        to the log QEMU writes itself.  Raises L{IdentityMismatch} when the pid
        now belongs to another process.
        """
        identity = Identity(pid=state["pid"], start_time=state["start_time"],
                            exe=state["exe"], boot_id=state["boot_id"])
        if inherited:
            return cls(reactor, identity, state["pidfd"], state.get("output_fd"),
                       state.get("log_path"), state.get("name", "child"))
        pidfd = os.pidfd_open(identity.pid)
        # Check after opening: the pidfd pins the process we verify.
        if not identity.matches_running():
            os.close(pidfd)
            raise IdentityMismatch(f"pid {identity.pid} is no longer {identity.exe} "
                                   f"started at {identity.start_time}")
        return cls(reactor, identity, pidfd, None, state.get("log_path"),
                   state.get("name", "child"))

    # -- control
    def send_signal(self, sig: int) -> bool:
        """Signal through the pidfd; False once the process is gone."""
        if self.status is not None:
            return False
        try:
            signal.pidfd_send_signal(self.pidfd, sig)
            return True
        except ProcessLookupError:
            return False

    @property
    def running(self) -> bool:
        return self.status is None

    # -- reactor callbacks
    def _output_readable(self):
        try:
            data = os.read(self.output_fd, 65536)
        except BlockingIOError:
            return None
        except OSError as e:
            log.warn("{name} output read failed: {err}", name=self.name, err=e)
            data = b""
        if not data:
            self._close_output()
            return None
        if self._log_file is not None:
            try:
                self._log_file.write(data)
            except OSError as e:
                log.warn("{name} log write failed: {err}", name=self.name, err=e)
        return None

    def _close_output(self):
        if self._out_reader is not None:
            self._reactor.removeReader(self._out_reader)
            self._out_reader = None
            os.close(self.output_fd)
            self.output_fd = None

    def _drain_output(self):
        while self.output_fd is not None:
            try:
                data = os.read(self.output_fd, 65536)
            except (BlockingIOError, OSError):
                break
            if not data:
                break
            if self._log_file is not None:
                self._log_file.write(data)
        self._close_output()

    def _pidfd_readable(self):
        status = self._reap()
        if status is None:
            return None  # spurious wakeup
        self._reactor.removeReader(self._pid_reader)
        self._drain_output()
        os.close(self.pidfd)
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None
        self.status = status
        log.info("{name} (pid {pid}) {how}", name=self.name, pid=self.pid, how=status.describe())
        self.exited.callback(status)
        return None

    def _reap(self) -> ExitStatus | None:
        try:
            info = os.waitid(os.P_PIDFD, self.pidfd, os.WEXITED | os.WNOHANG)
        except ChildProcessError:
            # Not our child (adopted after a crash): the exit is all we learn.
            return ExitStatus()
        if info is None:
            return None
        if info.si_code == os.CLD_EXITED:
            return ExitStatus(code=info.si_status)
        return ExitStatus(signal=info.si_status, core_dumped=info.si_code == os.CLD_DUMPED)

    def close(self):
        """Stop watching without touching the process (agent shutdown)."""
        if self.status is not None:
            return
        self._reactor.removeReader(self._pid_reader)
        if self._out_reader is not None:
            self._reactor.removeReader(self._out_reader)
            self._out_reader = None
        if self._log_file is not None:
            self._log_file.close()
            self._log_file = None


class IdentityMismatch(Exception):
    """A saved pid now belongs to a different process: never adopt it."""


def seal_stray_fds() -> list[int]:
    """Mark every inheritable fd above stdio close-on-exec; returns them.

    Python opens everything with CLOEXEC; what is left inheritable came from
    whoever started us (or a re-exec) and must not leak into QEMU.
    """
    sealed = []
    for name in os.listdir("/proc/self/fd"):
        fd = int(name)
        if fd <= 2:
            continue
        try:
            if os.get_inheritable(fd):
                os.set_inheritable(fd, False)
                sealed.append(fd)
        except OSError:
            pass  # the listdir fd itself, already closed
    return sealed


def spawn(reactor, argv: Sequence[str], *, env: Mapping[str, str] | None = None,
          pass_fds: Mapping[int, int] | None = None, log_path: str | None = None,
          name: str = "child", new_session: bool = True) -> Child:
    """Start C{argv} as an owned L{Child}.

    C{pass_fds} maps a child fd number to one of our fds (e.g. a tap). The
    child's stdout and stderr share one pipe whose output is appended to
    C{log_path}; stdin is /dev/null.  C{new_session} keeps the child out of
    the agent's process group, so a signal to the agent's group spares it.
    """
    pass_fds = dict(pass_fds or {})
    if any(child_fd <= 2 for child_fd in pass_fds):
        raise ValueError("fds 0-2 are the child's stdio")
    seal_stray_fds()
    read_end, write_end = os.pipe2(os.O_CLOEXEC)
    devnull = os.open(os.devnull, os.O_RDONLY | os.O_CLOEXEC)
    # Park every source above all targets first, so no dup2 clobbers a source;
    # dup2 onto the target then clears CLOEXEC there and only there.
    floor = max([10, *pass_fds]) + 1
    sources = [devnull, write_end, *pass_fds.values()]
    parked = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, floor) for fd in sources]
    actions = [(os.POSIX_SPAWN_DUP2, parked[0], 0),
               (os.POSIX_SPAWN_DUP2, parked[1], 1),
               (os.POSIX_SPAWN_DUP2, parked[1], 2)]
    for child_fd, tmp in zip(pass_fds, parked[2:]):
        actions.append((os.POSIX_SPAWN_DUP2, tmp, child_fd))
    try:
        pid = os.posix_spawn(argv[0], list(argv), dict(env if env is not None else os.environ),
                             file_actions=actions, setsid=new_session)
    except OSError:
        os.close(read_end)
        raise
    finally:
        for fd in (write_end, devnull, *parked):
            os.close(fd)
    pidfd = os.pidfd_open(pid)
    try:
        identity = Identity.of(pid)
    except OSError:
        # Exited (or failed to exec) already: a zombie still has its /proc entry,
        # so this only happens if something else reaped it.
        identity = Identity(pid=pid, start_time=0, exe=argv[0], boot_id=boot_id())
    return Child(reactor, identity, pidfd, read_end, log_path, name)
