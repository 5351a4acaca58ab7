"""
Upgrade = re-exec in place (seed 001; DESIGN.md "State, reload, upgrade, crash").

    request ─▶ code unchanged? ─▶ reload (SIGHUP path)
       │
       ▼
    preflight subprocess (still serving) ─▶ refused: the old image serves on
       │
       ▼
    stop accepting ─▶ drain calls (deadline) ─▶ cancel outgoing migrations
       │
       ▼
    close clients ─▶ block HUP/TERM/USR1/USR2/CHLD ─▶ save state + handoff ─▶ execv (same pid,
                                                        through the launcher of the running build)

The new image finds the handoff, adopts the listening socket (connections
wait in its backlog meanwhile), re-adopts every child through its inherited
pidfd and pipe, closes the fds it did not claim, then unblocks the signals
(see L{vdsm_twisted.service.AgentService}).
"""

from __future__ import annotations

import os
import signal
import sys
import time
from typing import Any

from twisted.internet import defer, threads, utils
from twisted.logger import Logger

from vdsm_twisted.common import sdnotify
from vdsm_twisted.continuity import codeid, handoff
from vdsm_twisted.continuity.codeid import installed_code_digest

#: Set by the launcher when it fell back: the PYTHONPATH of the normal install.
ORIG_PYTHONPATH = "VDSM_TWISTED_ORIG_PYTHONPATH"

#: Signals held pending from the save to the end of the new image's adoption.
BLOCKED = {signal.SIGHUP, signal.SIGTERM, signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD}


class UpgradeInProgress(Exception):
    """A second upgrade request while one runs."""


TWISTD = ("import sys; from twisted.scripts.twistd import run; "
          "sys.argv[0] = 'twistd'; run()")


def twistd_command(args: list[str]) -> list[str]:
    """A full command line running twistd with C{args} in this interpreter."""
    return [sys.executable, "-c", TWISTD, *args]


def twistd_args(orig_argv: list[str]) -> list[str]:
    """twistd's own arguments out of the interpreter's command line."""
    argv = list(orig_argv[1:])
    while argv and argv[0].startswith("-") and argv[0] not in ("-c", "-m"):
        argv.pop(0)  # interpreter options (-u, -O, ...)
    if argv and argv[0] in ("-c", "-m"):
        return argv[2:]
    if argv and os.path.basename(argv[0]) == "launcher.py" and "--" in argv:
        return argv[argv.index("--") + 1:]  # an earlier upgrade's launcher
    return argv[1:]  # a script (the twistd console script)


def exec_argv(orig_argv: list[str]) -> list[str]:
    """twistd arguments for the next image: in the foreground, no pid file.

    The pid does not change across exec, so an existing pid file stays right;
    a new one would collide with ourselves ("another twistd is running").
    """
    argv = twistd_args(orig_argv)
    try:
        start = argv.index("vdsm")
    except ValueError:
        raise ValueError(f"cannot find the twistd plugin name in {orig_argv!r}") from None
    head, tail = argv[:start], argv[start:]
    cleaned, skip = [], False
    for arg in head:
        if skip:
            skip = False
            continue
        if arg in ("-n", "--nodaemon") or arg.startswith("--pidfile="):
            continue
        if arg == "--pidfile":
            skip = True
            continue
        cleaned.append(arg)
    return cleaned + ["--nodaemon", "--pidfile="] + tail


class Upgrader:
    log = Logger()

    def __init__(self, agent: Any, reactor: Any, drain_timeout: float = 10.0,
                 preflight_timeout: float = 60.0):
        self.agent = agent
        self.reactor = reactor
        self.drain_timeout = drain_timeout
        self.preflight_timeout = preflight_timeout
        self.installed = codeid.package_dirs()
        self.started_digest = installed_code_digest(self.installed)
        #: The code this image runs, copied aside: the launcher and the fallback.
        self.snapshot: str | None = None
        #: Seconds the new image has to confirm before the launcher falls back.
        self.confirm_timeout = 60.0
        self.in_progress = False
        #: When accepting stopped (wall clock), for the new image's downtime line.
        self.paused_time: float | None = None
        #: Replaced in tests; the real thing never returns.
        self.execv = os.execv

    @defer.inlineCallbacks
    def request(self, reason: str, own_calls: int = 0):
        """Upgrade (or reload, when the code did not change); fires with what happened.

        C{own_calls}: API calls of the requester itself, not waited for.
        """
        if self.in_progress:
            raise UpgradeInProgress("an upgrade is already in progress")
        if self.agent.driver is None:
            raise UpgradeInProgress("the agent is still starting (loading its VM driver); "
                                    "try again in a moment")
        self.in_progress = True
        try:
            digest = yield threads.deferToThread(installed_code_digest, self.installed)
            if digest == self.started_digest:
                self.log.info("upgrade requested ({reason}) but the installed code did not "
                              "change: reloading instead", reason=reason)
                self.agent.reload()
                self.in_progress = False
                return "reloaded"
            # The preflight runs while the old image still serves everyone.
            self.log.info("upgrade requested ({reason}): preflight of the installed code",
                          reason=reason)
            ok, why = yield self.preflight()
            if not ok:
                self.log.error("upgrade refused, the old image keeps serving: {why}", why=why)
                self.in_progress = False
                return "refused: " + why
            self.log.info("upgrade: draining")
            self.agent.listener.pause_accepting()
            self.paused_time = time.time()
            drained = self.agent.api.idle(allowed=own_calls)
            drained.addTimeout(self.drain_timeout, self.reactor)
            try:
                yield drained
            except defer.TimeoutError:
                self.log.warn("upgrade: {n} call(s) still running after {t}s; going on",
                              n=self.agent.api.in_flight - own_calls, t=self.drain_timeout)
            # A migration in flight fails cleanly (the source runs on) rather
            # than crossing the exec half-driven.
            migrations = self.agent.driver.outgoing_migrations()
            if migrations:
                self.log.info("upgrade: cancelling {n} outgoing migration(s)", n=len(migrations))
                for migration in migrations:
                    migration.cancel()
                ended = defer.DeferredList([m.done for m in migrations], consumeErrors=True)
                ended.addTimeout(self.drain_timeout, self.reactor)
                try:
                    yield ended
                except defer.TimeoutError:
                    self.log.warn("upgrade: migrations did not end within {t}s",
                                  t=self.drain_timeout)
        except Exception:
            self.agent.listener.resume_accepting()
            self.in_progress = False
            raise
        # Answer the caller first; the exec happens on a later turn.
        self.reactor.callLater(0, self._exec)
        return "upgrading"

    @defer.inlineCallbacks
    def preflight(self):
        args = ["-m", "vdsm_twisted.continuity.preflight"]
        if self.agent.config_path:
            args += ["--config", self.agent.config_path]
        args.append(self.agent.store.directory)
        env = dict(os.environ)
        if ORIG_PYTHONPATH in env:  # we run a fallback snapshot: test the installed code
            env["PYTHONPATH"] = env.pop(ORIG_PYTHONPATH)
        d = utils.getProcessOutputAndValue(sys.executable, args, env=env, reactor=self.reactor)
        d.addTimeout(self.preflight_timeout, self.reactor)
        try:
            out, err, code = yield d
        except defer.TimeoutError:
            return False, f"preflight did not finish within {self.preflight_timeout}s"
        if code != 0:
            text = (err or out).decode("utf-8", "replace").strip().splitlines()
            return False, text[-1] if text else f"preflight exited with {code}"
        return True, ""

    @defer.inlineCallbacks
    def _exec(self):
        """Point of no return (unless exec itself fails).

        From here on, HUP/TERM/USR1/USR2 are recorded rather than acted on and
        handed to the new image; once only this thread is left they are
        blocked, so one arriving in the last instant stays pending across the
        exec (a signal mask and pending set survive execve).
        """
        sdnotify.reloading()
        recorded: list[int] = []
        previous = {sig: signal.signal(sig, lambda s, _f: recorded.append(s))
                    for sig in BLOCKED - {signal.SIGCHLD}}
        pool = getattr(self.reactor, "threadpool", None)
        steps: list[str] = []
        mark = time.monotonic()

        def step(name: str) -> None:
            nonlocal mark
            now = time.monotonic()
            steps.append(f"{name} {(now - mark) * 1000:.0f}")
            mark = now
        try:
            # Clients are dropped (TLS state cannot cross an exec); they reconnect.
            yield self.agent.listener.close_connections(timeout=1.0)
            step("clients")
            # The standby runs the old code: it goes; the new image starts its own.
            yield self.agent.standby.pause()
            step("standby")
            self.agent.driver.release_monitors()
            self.agent.store.stop()
            if pool is not None:
                pool.stop()  # no thread may take a signal meant for the next image
            step("monitors+threads")
            signal.pthread_sigmask(signal.SIG_BLOCK, BLOCKED)
            children, written = self.agent.driver.prepare_handoff()
            self.agent.tasks.persist_now()
            step(f"state ({written} written)")
            path = os.path.join(self.agent.config["agent", "run_dir"], "handoff.json")
            handoff.write(path, self.agent.listener.handoff(), children,
                          {"reason": "upgrade", "signals": recorded, "exec_time": time.time(),
                           "paused_time": self.paused_time, "lock_fd": self.agent.lock_fd},
                          keep=[self.agent.lock_fd])
            args = exec_argv(sys.orig_argv)
            if self.snapshot is not None:
                launcher = os.path.join(self.snapshot, "vdsm_twisted", "continuity", "launcher.py")
                argv = [sys.executable, launcher, "--handoff", path, "--fallback", self.snapshot,
                        "--confirm-timeout", str(self.confirm_timeout), "--", *args]
            else:
                argv = twistd_command(args)
            os.environ[handoff.ENV] = path
            os.environ[codeid.INSTALLED_ENV] = os.pathsep.join(self.installed)
            if ORIG_PYTHONPATH in os.environ:  # running a fallback snapshot: back to normal
                os.environ["PYTHONPATH"] = os.environ.pop(ORIG_PYTHONPATH)
            step("handoff")
            self.log.info("upgrade: exec {argv} (ms spent: {steps})", argv=" ".join(argv),
                          steps=", ".join(steps))
            self.execv(sys.executable, argv)
        except Exception:
            self.log.failure("upgrade: exec failed; the old image keeps serving")
            os.environ.pop(handoff.ENV, None)
            self.agent.store.start()
            if pool is not None and not pool.started:
                pool.start()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, BLOCKED)
            for sig in recorded:
                os.kill(os.getpid(), sig)
            self.agent.listener.resume_accepting()
            self.agent.standby.resume()
            self.in_progress = False
            sdnotify.ready()
