"""
VM and agent lifecycle hooks, VDSM style: executables in
C{<hooks_dir>/<hook_name>/} run in byte order, one after the other, passing
the domain XML along in a file named by C{$_hook_domxml}.

What differs from VDSM, and why:

  - Every script has a timeout.  A hung script must not hang a VM start
    forever; past the timeout its whole process group (each script starts in
    a new session) is killed with SIGKILL.  A timed-out C{before_*} script
    stops the operation (fail safe, like exit code 2); a timed-out C{after_*}
    script is only logged (the operation already happened, like exit code 1).
  - The environment is built from scratch: the VM's custom properties,
    C{_hook_domxml}, C{vmId} and a fixed C{PATH}.  Nothing of the agent's own
    environment (credentials, C{NOTIFY_SOCKET}, C{LD_*} ...) reaches a hook.
  - Scripts (and their directories) that are not owned by root or the agent's
    user, or that are group/world-writable, are refused with a warning: anyone
    able to write them could run code as the agent.
  - Scripts run with stdin on an empty pipe, stdout and stderr merged into
    one pipe (last L{OUTPUT_LIMIT} bytes kept and logged), cwd C{/}, default
    signal dispositions and an empty signal mask.
  - The XML file lives in a private (0700) directory, is created 0600, and
    the directory is removed when the run ends, however it ends.  Scripts may
    rewrite the file in place or replace it (write a sibling, then rename).

Exit codes (as VDSM): 0 success; 1 the script failed, the operation goes on
(logged with the output); 2 the script failed and the operation must stop
(L{HookError}).  Any other code, death by a signal, or a file that could not
be executed at all (code 127 from the launcher) is treated like 1.

Directories are read at every run, so adding or removing a hook needs no
reload.  Blocking file work (listing, the XML file) runs in a thread pool;
children are started with C{reactor.spawnProcess}, never through a shell.
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import sys
import tempfile
from typing import Iterable, Mapping

import attr
from twisted.internet import defer, error, protocol, threads
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Interface, implementer

log = Logger()

#: VDSM's hook points (VM lifecycle, then the agent's own).
HOOK_NAMES: tuple[str, ...] = (
    "before_vm_start", "after_vm_start",
    "before_vm_cont", "after_vm_cont",
    "before_vm_pause", "after_vm_pause",
    "before_vm_hibernate", "after_vm_hibernate",
    "before_vm_dehibernate", "after_vm_dehibernate",
    "before_vm_migrate_source", "after_vm_migrate_source",
    "before_vm_migrate_destination", "after_vm_migrate_destination",
    "after_vm_destroy",
    "before_vdsm_start", "after_vdsm_start",
)

#: Exit codes with a meaning (VDSM's); anything else counts as L{EXIT_FAILED}.
EXIT_OK, EXIT_FAILED, EXIT_FATAL = 0, 1, 2

#: Bytes of each script's output kept (the tail) for the log and L{HookError}.
OUTPUT_LIMIT = 64 * 1024

#: The only C{PATH} hooks get.
HOOK_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"

#: Environment names the runner sets itself; a custom property cannot override them.
RESERVED_ENV = frozenset({"_hook_domxml", "vmId", "PATH", "_VDSM_HOOK_LC_CTYPE"})

#: Environment prefixes that change how any program runs (the dynamic loader);
#: custom properties with these names are dropped.
DANGEROUS_ENV_PREFIXES = ("LD_",)

DOMXML_NAME = "domxml.xml"

# Runs in the child before the hook: a new session (its own process group, so
# a timeout kills the script and everything it started), default signal state
# (Python ignores SIGPIPE/SIGXFSZ and exec keeps ignored signals ignored),
# stderr onto the stdout pipe (one stream in true order), cwd "/".  -I -S keep
# the interpreter from reading any PYTHON* variable or site directory.  Python
# coerces a C locale by setting LC_CTYPE (PEP 538), even with -I: the marker
# variable carries the intended LC_CTYPE ("" unset, "=VALUE" set), so the hook
# sees exactly the environment we built.
_LC_CTYPE_MARKER = "_VDSM_HOOK_LC_CTYPE"
_LAUNCHER = f"""\
import os, signal, sys
os.setsid()
signal.pthread_sigmask(signal.SIG_SETMASK, ())
for s in (signal.SIGPIPE, signal.SIGXFSZ):
    signal.signal(s, signal.SIG_DFL)
os.dup2(1, 2)
os.chdir("/")
env = dict(os.environb)
wanted = env.pop(b"{_LC_CTYPE_MARKER}", b"")
env.pop(b"LC_CTYPE", None)
if wanted.startswith(b"="):
    env[b"LC_CTYPE"] = wanted[1:]
try:
    os.execve(sys.argv[1], sys.argv[1:], env)
except OSError as e:
    os.write(2, ("cannot execute %s: %s\\n" % (sys.argv[1], e.strerror)).encode())
    os._exit(127)
"""


class HookError(Exception):
    """A hook script stopped the operation: exit code 2, or a C{before_*}
    script that timed out."""

    def __init__(self, hook_name: str, script: str, exit_code: int | None, output: str,
                 timed_out: bool = False, timeout: float | None = None, reason: str | None = None):
        self.hook_name = hook_name
        self.script = script
        self.exit_code = exit_code
        self.output = output
        self.timed_out = timed_out
        self.timeout = timeout
        self.reason = reason
        super().__init__(hook_name, script, exit_code, output)

    def __str__(self) -> str:
        where = f"hook {self.hook_name}/{self.script}"
        if self.reason:
            what = f"{where}: {self.reason}"
        elif self.timed_out:
            what = f"{where} timed out after {self.timeout:g}s and was killed; operation stopped"
        else:
            what = f"{where} failed with exit code {self.exit_code}; operation stopped"
        last = _last_line(self.output)
        return f"{what}: {last}" if last else what


def _last_line(output: str, limit: int = 200) -> str:
    lines = [line.strip() for line in output.splitlines() if line.strip()]
    if not lines:
        return ""
    line = lines[-1]
    return line if len(line) <= limit else "..." + line[-limit:]


class IHookRunner(Interface):
    """Runs the scripts of one hook point (the plug point drivers call)."""

    def run(hook_name, domxml=None, env=None, vm_id=None):
        """Run every script of C{hook_name}; a Deferred firing with the final
        domain XML (None when none was given), or failing with L{HookError}."""


@attr.frozen
class ScriptResult:
    """How one script ended."""

    script: str
    exit_code: int | None  # None: killed by a signal (or status unknown)
    signal: int | None
    output: str
    timed_out: bool


@attr.frozen
class _Found:
    scripts: tuple[bytes, ...]
    skipped: tuple[tuple[str, str, bool], ...]  # (path, reason, warn)


def build_env(custom: Mapping[str, str] | None, vm_id: str | None,
              domxml_path: str | None) -> tuple[dict[str, str], list[str]]:
    """The complete environment of a hook, and the custom names dropped.

    Raises ValueError for names or values execve cannot carry."""
    env: dict[str, str] = {}
    dropped: list[str] = []
    for name, value in (custom or {}).items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ValueError(f"hook environment must map str to str, got {name!r}: {value!r}")
        if not name or "=" in name or "\0" in name or "\0" in value:
            raise ValueError(f"invalid hook environment variable {name!r}")
        if name in RESERVED_ENV or name.startswith(DANGEROUS_ENV_PREFIXES):
            dropped.append(name)
            continue
        env[name] = value
    env["PATH"] = HOOK_PATH
    if vm_id is not None:
        env["vmId"] = vm_id
    if domxml_path is not None:
        env["_hook_domxml"] = domxml_path
    return env, dropped


def _unsafe(st: os.stat_result, uids: Iterable[int]) -> str | None:
    if st.st_uid not in uids:
        return f"owned by uid {st.st_uid}, not root or the agent's user"
    if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return f"group/world-writable (mode {stat.S_IMODE(st.st_mode):04o})"
    return None


def find_scripts(hooks_dir: str, hook_name: str, uids: Iterable[int]) -> _Found:
    """The scripts to run (absolute byte paths, byte order) and what was skipped why.

    Blocking: call it from a thread."""
    uids = tuple(uids)
    skipped: list[tuple[str, str, bool]] = []
    base = os.fsencode(hooks_dir)
    directory = os.path.join(base, os.fsencode(hook_name))
    for path in (base, directory):
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return _Found((), ())
        if not stat.S_ISDIR(st.st_mode):
            skipped.append((os.fsdecode(path), "not a directory", True))
            return _Found((), tuple(skipped))
        reason = _unsafe(st, uids)
        if reason:
            skipped.append((os.fsdecode(path), f"directory {reason}", True))
            return _Found((), tuple(skipped))
    scripts: list[bytes] = []
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        try:
            st = os.stat(path)
        except OSError as e:  # a dangling symlink, a file removed meanwhile
            skipped.append((os.fsdecode(path), e.strerror or str(e), True))
            continue
        if not stat.S_ISREG(st.st_mode):
            skipped.append((os.fsdecode(path), "not a regular file", False))
            continue
        if not (st.st_mode & 0o111 and os.access(path, os.X_OK)):
            skipped.append((os.fsdecode(path), "not executable", False))
            continue
        reason = _unsafe(st, uids)
        if reason:
            skipped.append((os.fsdecode(path), reason, True))
            continue
        scripts.append(path)
    return _Found(tuple(scripts), tuple(skipped))


class _Tail:
    """The last C{limit} bytes written to it."""

    def __init__(self, limit: int = OUTPUT_LIMIT):
        self.limit = limit
        self.data = bytearray()
        self.dropped = 0

    def write(self, data: bytes) -> None:
        self.data += data
        excess = len(self.data) - self.limit
        if excess > 0:
            del self.data[:excess]
            self.dropped += excess

    def text(self) -> str:
        body = self.data.decode("utf-8", "replace")
        if self.dropped:
            return f"[... {self.dropped} bytes dropped ...]\n{body}"
        return body


def _kill_group(pid: int, leader_alive: bool) -> None:
    """SIGKILL the process group led by C{pid}; before the launcher's setsid
    ran there is no such group yet, so the leader alone is killed."""
    try:
        os.killpg(pid, signal.SIGKILL)
        return
    except ProcessLookupError:
        pass
    except OSError as e:
        log.warn("cannot kill hook process group {pid}: {e}", pid=pid, e=e)
    if leader_alive:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


class _ScriptProtocol(protocol.ProcessProtocol):
    """One script run: collects its output, enforces its timeout, reports its end."""

    def __init__(self, script: str, timeout: float, reactor, kill=_kill_group):
        self.script = script
        self.timeout = timeout
        self.output = _Tail()
        self.done: defer.Deferred[ScriptResult] = defer.Deferred(self._cancel)
        self.timed_out = False
        self._reactor = reactor
        self._kill = kill
        self._pid: int | None = None
        self._exited = False
        self._timer = None

    def connectionMade(self) -> None:
        self._pid = self.transport.pid
        self.transport.closeStdin()
        self._timer = self._reactor.callLater(self.timeout, self._expired)

    def childDataReceived(self, fd: int, data: bytes) -> None:
        self.output.write(data)

    def processExited(self, reason: Failure) -> None:
        self._exited = True

    def _expired(self) -> None:
        self._timer = None
        if not self._exited:
            self.timed_out = True
        else:
            log.warn("hook script {script} exited but left processes holding its output; "
                     "killing them", script=self.script)
        self._terminate()

    def _terminate(self) -> None:
        if self._pid is not None:
            self._kill(self._pid, not self._exited)
        # Escaped descendants may still hold the pipe: stop waiting for it.
        self.transport.loseConnection()

    def _cancel(self, d) -> None:
        self._stop_timer()
        self._terminate()

    def _stop_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def processEnded(self, reason: Failure) -> None:
        self._stop_timer()
        if self.done.called:  # cancelled
            return
        value = reason.value
        code = getattr(value, "exitCode", None)
        sig = getattr(value, "signal", None)
        if isinstance(value, error.ProcessDone):
            code, sig = 0, None
        self.done.callback(ScriptResult(self.script, code, sig, self.output.text(), self.timed_out))


@implementer(IHookRunner)
class HookRunner:
    """Runs hook scripts from C{hooks_dir}, each limited to C{timeout} seconds.

    Runs for different VMs proceed concurrently; the scripts of one run go
    one after the other.  C{tmp_dir} holds the private XML directories (the
    system temp dir if None; it must exist); C{threadpool} runs the blocking
    file work (the reactor's pool if None); C{python} runs the launcher.
    """

    def __init__(self, hooks_dir: str, timeout: float, reactor=None, tmp_dir: str | None = None,
                 threadpool=None, python: str = sys.executable):
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        if timeout <= 0:
            raise ValueError(f"hook timeout must be > 0: {timeout}")
        self.hooks_dir = hooks_dir
        self.timeout = timeout
        self.tmp_dir = tmp_dir
        self._reactor = reactor
        self._threadpool = threadpool
        self._python = python
        self._uids = frozenset({0, os.geteuid()})

    def _in_thread(self, f, *args) -> defer.Deferred:
        pool = self._threadpool or self._reactor.getThreadPool()
        return threads.deferToThreadPool(self._reactor, pool, f, *args)

    def run(self, hook_name: str, domxml: str | None = None,
            env: Mapping[str, str] | None = None,
            vm_id: str | None = None) -> defer.Deferred[str | None]:
        """Run every script of C{hook_name}.

        Fires with the domain XML as the last script left it (None when no
        C{domxml} was given); fails with L{HookError} when a script stops the
        operation, with ValueError for an unknown hook or a bad environment.
        Cancelling kills the running script's process group.
        """
        return defer.Deferred.fromCoroutine(self._run(hook_name, domxml, env, vm_id))

    async def _run(self, hook_name, domxml, env, vm_id):
        if hook_name not in HOOK_NAMES:
            raise ValueError(f"unknown hook {hook_name!r}")
        if domxml is not None and not isinstance(domxml, str):
            raise ValueError("domxml must be a str")
        build_env(env, vm_id, None)  # validate before touching the disk
        found = await self._in_thread(find_scripts, self.hooks_dir, hook_name, self._uids)
        for path, reason, warn in found.skipped:
            if warn:
                log.warn("hook {hook}: refusing to run {path}: {reason}",
                         hook=hook_name, path=path, reason=reason)
            else:
                log.debug("hook {hook}: skipping {path}: {reason}",
                          hook=hook_name, path=path, reason=reason)
        if not found.scripts:
            return domxml
        private = None
        try:
            xml_path = None
            if domxml is not None:
                private = await self._in_thread(_make_private_dir, self.tmp_dir)
                xml_path = os.path.join(private, DOMXML_NAME)
                await self._in_thread(_write_private, xml_path, domxml)
            child_env, dropped = build_env(env, vm_id, xml_path)
            if dropped:
                log.warn("hook {hook}: not passing environment variables {names}",
                         hook=hook_name, names=", ".join(sorted(dropped)))
            last = None
            for script in found.scripts:
                last = os.path.basename(os.fsdecode(script))
                result = await self._run_script(hook_name, script, child_env)
                self._judge(hook_name, vm_id, result)
            if xml_path is None:
                return None
            try:
                data = await self._in_thread(_read, xml_path)
            except OSError as e:
                raise HookError(hook_name, last, 0, "",
                                reason=f"domain XML file unreadable after the hooks ran: "
                                       f"{e.strerror or e}") from None
            try:
                return data.decode("utf-8")
            except UnicodeDecodeError as e:
                raise HookError(hook_name, last, 0, "",
                                reason=f"hooks left the domain XML not UTF-8: {e}") from None
        finally:
            if private is not None:
                try:
                    await self._in_thread(shutil.rmtree, private)
                except Exception:
                    log.failure("hook {hook}: cannot remove {path}", hook=hook_name, path=private)

    def _run_script(self, hook_name: str, script: bytes, env: dict[str, str]) -> defer.Deferred:
        name = os.path.basename(os.fsdecode(script))
        proto = _ScriptProtocol(name, self.timeout, self._reactor)
        launcher_env = dict(env)
        launcher_env[_LC_CTYPE_MARKER] = "=" + env["LC_CTYPE"] if "LC_CTYPE" in env else ""
        self._reactor.spawnProcess(
            proto, self._python,
            [self._python, "-I", "-S", "-c", _LAUNCHER, script],
            env=launcher_env, childFDs={0: "w", 1: "r", 2: "r"})
        log.debug("hook {hook}: started {script} (pid {pid})",
                  hook=hook_name, script=name, pid=proto._pid)
        return proto.done

    def _judge(self, hook_name: str, vm_id: str | None, result: ScriptResult) -> None:
        """Log the script's end; raise HookError when it stops the operation."""
        fields = dict(hook=hook_name, script=result.script, vm=vm_id or "-",
                      output=result.output)
        if result.timed_out:
            if hook_name.startswith("before_"):
                log.error("hook {hook}/{script} (vm {vm}) timed out after {timeout}s, killed; "
                          "stopping the operation. Output:\n{output}",
                          timeout=self.timeout, **fields)
                raise HookError(hook_name, result.script, None, result.output,
                                timed_out=True, timeout=self.timeout)
            log.warn("hook {hook}/{script} (vm {vm}) timed out after {timeout}s, killed. "
                     "Output:\n{output}", timeout=self.timeout, **fields)
            return
        if result.exit_code == EXIT_OK:
            if result.output:
                log.info("hook {hook}/{script} (vm {vm}) succeeded. Output:\n{output}", **fields)
            else:
                log.debug("hook {hook}/{script} (vm {vm}) succeeded", **fields)
            return
        how = (f"exit code {result.exit_code}" if result.exit_code is not None
               else f"signal {result.signal}")
        if result.exit_code == EXIT_FATAL:
            log.error("hook {hook}/{script} (vm {vm}) failed ({how}); stopping the operation. "
                      "Output:\n{output}", how=how, **fields)
            raise HookError(hook_name, result.script, result.exit_code, result.output)
        log.warn("hook {hook}/{script} (vm {vm}) failed ({how}); continuing. Output:\n{output}",
                 how=how, **fields)


def _make_private_dir(parent: str | None) -> str:
    return tempfile.mkdtemp(prefix="vdsm-hook-", dir=parent)  # mode 0700


def _write_private(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC | os.O_NOFOLLOW, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(text.encode("utf-8"))


def _read(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()
