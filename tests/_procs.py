"""Helpers to run the project's code in real child processes."""

from __future__ import annotations

import os
import pwd
import select
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PYTHON = sys.executable


def code_copy(dest: Path) -> Path:
    """Copy the packages (and the twistd plugins) to C{dest}, world-readable."""
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc", "dropin.cache")
    for name in ("vdsm_twisted", "privd", "tests"):
        shutil.copytree(REPO / name, dest / name, ignore=ignore)
    shutil.copytree(REPO / "twisted" / "plugins", dest / "twisted" / "plugins", ignore=ignore)
    for path in [dest, *dest.rglob("*")]:
        os.chmod(path, 0o755 if path.is_dir() else 0o644)
    p = dest
    while str(p) not in ("/", "/tmp"):
        os.chmod(p, os.stat(p).st_mode | 0o011)
        p = p.parent
    return dest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def env_for(code_dir: Path, **extra: str) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("NOTIFY_SOCKET",)}
    env["PYTHONPATH"] = str(code_dir)
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def user_kwargs(user: str | None) -> dict:
    """subprocess kwargs that run the child as C{user} (with its groups)."""
    if user is None:
        return {}
    pw = pwd.getpwnam(user)
    groups = os.getgrouplist(pw.pw_name, pw.pw_gid)
    return {"user": pw.pw_uid, "group": pw.pw_gid, "extra_groups": groups}


def twistd(code_dir: Path, plugin: str, args: list[str], user: str | None = None,
           cwd: str | None = None, env: dict | None = None, log_path: Path | None = None):
    """Start C{twistd -n PLUGIN ARGS} as a real process (optionally as C{user})."""
    cmd = [
        PYTHON, "-c", "import sys; from twisted.scripts.twistd import run; sys.argv[0] = 'twistd'; run()",
        "--nodaemon", "--pidfile=", *(["--logfile", str(log_path)] if log_path else []), plugin, *args]
    out = open(log_path.with_suffix(".out"), "wb") if log_path else subprocess.DEVNULL
    return subprocess.Popen(cmd, env=env or env_for(code_dir), cwd=cwd or "/",
                            stdout=out, stderr=subprocess.STDOUT, **user_kwargs(user))


def stop(proc: subprocess.Popen, timeout: float = 10.0) -> int:
    """SIGTERM, then SIGKILL after C{timeout}; returns the exit status."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    return proc.returncode


def processes_mentioning(marker) -> dict[int, int]:
    """Live processes whose command line mentions C{marker}: {pid: parent pid}."""
    found = {}
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                if str(marker).encode() not in f.read():
                    continue
            with open(f"/proc/{name}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if fields[0] != "Z":
            found[int(name)] = int(fields[1])
    return found


def stop_pid(pid: int, timeout: float = 10.0) -> None:
    """SIGTERM a process that is not our child, SIGKILL after C{timeout}."""
    try:
        fd = os.pidfd_open(pid)
    except ProcessLookupError:
        return
    try:
        signal.pidfd_send_signal(fd, signal.SIGTERM)
        if not select.select([fd], [], [], timeout)[0]:
            signal.pidfd_send_signal(fd, signal.SIGKILL)
            select.select([fd], [], [], timeout)
    except ProcessLookupError:
        pass
    finally:
        os.close(fd)


def wait_for(predicate, timeout: float = 15.0, interval: float = 0.05, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


_SHARED_CODE: Path | None = None


def shared_code_dir() -> Path:
    """One world-readable copy of the code per test process (for trial tests)."""
    global _SHARED_CODE
    if _SHARED_CODE is None:
        import atexit
        import tempfile

        base = Path(tempfile.mkdtemp(prefix="vdsm-twisted-code-"))
        atexit.register(shutil.rmtree, base, True)
        _SHARED_CODE = code_copy(base)
    return _SHARED_CODE
