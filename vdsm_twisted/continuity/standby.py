"""
The warm standby: a second agent process, fully imported, that takes over the
instant the serving agent dies (crash, C{kill -9}, OOM).

A cold restart pays the interpreter, Twisted, OpenSSL and our imports
(~250 ms here) before it can even look at its VMs; the standby has paid them
already and holds a copy of the listening socket, so connections made while
the agent is dead wait in the backlog and are served, never refused.

    agent (serving) ──spawn──▶ standby: imports, writes "ready" on fd 4, waits on
        │                         fd 0 (control pipe) and a pidfd of the agent
        │  "q" on fd 0  ─────────▶ clean stop / upgrade: the standby exits
        ▼
    agent dies ─────────────────▶ pidfd readable: the standby returns from
                                  L{wait_for_takeover}, twistd goes on with
                                  L{vdsm_twisted.service.AgentService}, which
                                  takes the run-dir lock, adopts fd 3 and
                                  re-attaches every VM from the state (the
                                  crash-recovery path), then spawns its own
                                  standby.

Under systemd the agent keeps C{<run_dir>/agent.pid} (the unit's C{PIDFile=})
pointing at the ready standby: when the main process exits, systemd reads it
and makes the standby the main process instead of failing and restarting the
unit (see L{runlock.write_pid}).  The run-dir lock makes a racing cold start
refuse instead of running a second agent.

The standby runs the code it was started with: an upgrade stops it before the
exec and the new image starts a new one.
"""

from __future__ import annotations

import os
import select
import socket
import sys
import time

import attr
from twisted.application.service import Service
from twisted.internet import defer, error
from twisted.internet.protocol import ProcessProtocol
from twisted.logger import Logger

from vdsm_twisted.continuity import runlock

#: Set in the standby's environment: the pid of the agent it stands by for.
ENV = "VDSM_TWISTED_STANDBY"
#: The standby's fds (fixed by the spawn): control pipe, listening socket, ready pipe.
CONTROL_FD, LISTEN_FD, READY_FD = 0, 3, 4
STOP = b"q"

#: Imported while standing by (besides the service and its VM side), so
#: that taking over imports nothing.
WARM_MODULES = (
    "vdsm_twisted.client",
    "vdsm_twisted.client._stomp",
    "vdsm_twisted.client._amp",
    "twisted.internet.utils",
    "twisted.internet.process",
    "twisted.internet.ssl",
    "twisted.internet.epollreactor",
    "twisted.python.logfile",
)


def warm_up(extra=WARM_MODULES) -> None:
    from vdsm_twisted import service

    service.import_vm_side()
    for name in extra:
        __import__(name)


@attr.frozen
class Takeover:
    """What the standby knows when it takes over."""

    previous_pid: int
    #: Wall-clock time the agent was seen dead.
    at: float
    #: The listening socket to adopt, as a handoff names it.
    listening: dict


def _agent_gone(pidfd: int | None, timeout: float) -> bool:
    if pidfd is None:
        return True
    return bool(select.select([pidfd], [], [], timeout)[0])


def wait_for_takeover(environ=os.environ, warm=warm_up) -> Takeover | None:
    """Block (before the reactor runs) until the agent dies or stops us.

    Returns the takeover, or None when told to stop (or when the control pipe
    closed while the agent still lives: it exec'd without stopping us).
    """
    previous = int(environ.pop(ENV))
    try:
        pidfd = os.pidfd_open(previous)
    except ProcessLookupError:
        pidfd = None  # already dead
    warm()
    from vdsm_twisted.common.memory import release_free_heap

    release_free_heap()  # waiting costs what the imports keep, not what they freed
    try:
        os.write(READY_FD, b"ready\n")
        os.close(READY_FD)
    except OSError:
        pass  # the agent is gone already; we will notice below
    watched = [CONTROL_FD] + ([pidfd] if pidfd is not None else [])
    while True:
        readable = select.select(watched, [], [])[0]
        if CONTROL_FD in readable:
            data = os.read(CONTROL_FD, 64)
            if STOP in data:
                return None
            if not data:  # the agent's end closed: exit or exec?
                if not _agent_gone(pidfd, 2.0):
                    return None
                break
        elif readable:
            break
    at = time.time()
    if pidfd is not None:
        os.close(pidfd)
    # fd 0 back to /dev/null: the dead agent's pipe is no stdin for the next one.
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, CONTROL_FD)
    os.close(null)
    with socket.socket(fileno=os.dup(LISTEN_FD)) as probe:
        family = int(probe.family)
    return Takeover(previous_pid=previous, at=at,
                    listening={"fd": LISTEN_FD, "family": family, "name": "engine"})


class _StandbyProcess(ProcessProtocol):
    def __init__(self, keeper: "StandbyKeeper"):
        self.keeper = keeper
        self.ended = defer.Deferred()
        self.started = time.monotonic()
        self.ready = False

    def childDataReceived(self, fd, data):
        if fd == READY_FD and not self.ready and data.startswith(b"ready"):
            self.ready = True
            self.keeper._ready(self)

    def processEnded(self, reason):
        self.keeper._ended(self, reason)
        self.ended.callback(reason.value)


class StandbyKeeper(Service):
    """Keeps one warm standby (if enabled) while this agent serves; respawns it."""

    name = "standby"
    log = Logger()

    def __init__(self, reactor, run_dir: str, listening_fd, argv, enabled: bool = True,
                 max_backoff: float = 60.0, stop_timeout: float = 5.0):
        """C{listening_fd}: callable giving the fd to share (None until bound);
        C{argv}: callable giving the standby's command line."""
        self.reactor = reactor
        self.run_dir = run_dir
        self.listening_fd = listening_fd
        self.argv = argv
        self.enabled = enabled
        self.max_backoff = max_backoff
        self.stop_timeout = stop_timeout
        self.process: _StandbyProcess | None = None
        self._backoff = 1.0
        self._respawn = None
        self._paused = False

    def spawn(self) -> None:
        """Start a standby unless one runs, it is disabled, or we are stopping."""
        if not (self.enabled and self.running) or self._paused or self.process is not None:
            return
        fd = self.listening_fd()
        if fd is None:
            return
        env = dict(os.environ)
        env[ENV] = str(os.getpid())
        self.process = _StandbyProcess(self)
        try:
            self.reactor.spawnProcess(self.process, sys.executable, self.argv(), env=env,
                                      childFDs={CONTROL_FD: "w", 1: 1, 2: 2, LISTEN_FD: fd,
                                                READY_FD: "r"})
        except Exception as e:  # noqa: BLE001 - logged, retried with backoff
            self.process = None
            self.log.error("standby: cannot start one ({e}); retrying", e=str(e))
            self._schedule()

    def _ready(self, process: _StandbyProcess) -> None:
        pid = process.transport.pid
        self._backoff = 1.0
        try:
            runlock.write_pid(self.run_dir, pid)
        except OSError as e:
            self.log.warn("standby: cannot write {dir}/agent.pid: {e}", dir=self.run_dir, e=e)
        self.log.info("standby: pid {pid} warm and ready to take over ({s:.2f} s to start)",
                      pid=pid, s=time.monotonic() - process.started)

    def _ended(self, process: _StandbyProcess, reason) -> None:
        if process is not self.process:
            return
        self.process = None
        self._write_own_pid()
        if self.running and not self._paused:
            self.log.warn("standby exited ({why}); another in {d:g} s",
                          why=reason.getErrorMessage(), d=self._backoff)
            self._schedule()

    def _schedule(self) -> None:
        self._respawn = self.reactor.callLater(self._backoff, self._respawned)
        self._backoff = min(self._backoff * 2, self.max_backoff)

    def _respawned(self) -> None:
        self._respawn = None
        self.spawn()

    def _write_own_pid(self) -> None:
        try:
            runlock.write_pid(self.run_dir, os.getpid())
        except OSError:
            pass

    def startService(self):
        super().startService()
        self._write_own_pid()

    def pause(self) -> defer.Deferred:
        """Stop the standby and spawn none until L{resume} (an upgrade's exec window)."""
        self._paused = True
        if self._respawn is not None and self._respawn.active():
            self._respawn.cancel()
        self._respawn = None
        process = self.process
        if process is None:
            self._write_own_pid()
            return defer.succeed(None)
        transport = process.transport
        try:
            transport.writeToChild(CONTROL_FD, STOP)
            transport.closeChildFD(CONTROL_FD)
        except Exception:  # noqa: BLE001 - it may be gone already
            pass

        def kill():
            try:
                transport.signalProcess("KILL")
            except error.ProcessExitedAlready:
                pass

        killer = self.reactor.callLater(self.stop_timeout, kill)
        d = defer.Deferred()

        def ended(_):
            if killer.active():
                killer.cancel()
            d.callback(None)
        process.ended.addBoth(ended)
        return d

    def allow(self) -> None:
        """End a L{pause} without spawning (the next L{spawn} may)."""
        self._paused = False

    def resume(self) -> None:
        self.allow()
        self.spawn()

    def stopService(self):
        d = self.pause()
        super().stopService()
        return d
