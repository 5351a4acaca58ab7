"""
One agent per run directory: an exclusive C{flock} on C{<run_dir>/agent.lock}.

Two agents on one run dir would both adopt the same QEMUs and overwrite each
other's state.  The lock makes that impossible whatever starts them (a
service manager restarting a crashed agent while the warm standby takes over,
an operator starting a second copy by hand).  The kernel releases it the
instant the holder dies, so a successor never waits on a stale pid file.  The
fd crosses an upgrade's C{execv} (it is in the handoff), so the lock is never
free during an upgrade either.
"""

from __future__ import annotations

import fcntl
import os
import time

LOCK_NAME = "agent.lock"
PID_NAME = "agent.pid"


class RunDirBusy(Exception):
    """Another live agent holds the run directory."""


def holder(run_dir: str) -> str:
    """Who holds the lock, as it wrote into the lock file (for messages only)."""
    try:
        with open(os.path.join(run_dir, LOCK_NAME)) as f:
            pid = f.read(32).strip()
    except OSError:
        pid = ""
    return f"pid {pid}" if pid.isdigit() else "another process"


def acquire(run_dir: str, timeout: float = 0.0, interval: float = 0.002) -> int:
    """Take the lock (waiting up to C{timeout} for a dying holder); returns its fd.

    The fd is close-on-exec: only an upgrade hands it on, deliberately.
    """
    path = os.path.join(run_dir, LOCK_NAME)
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    deadline = time.monotonic() + timeout
    while True:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            mark(fd)
            return fd
        except BlockingIOError:
            if time.monotonic() >= deadline:
                os.close(fd)
                raise RunDirBusy(f"run directory {run_dir} is in use by {holder(run_dir)} "
                                 f"(it holds {path})") from None
            time.sleep(interval)


def mark(fd: int) -> None:
    """Write our pid into the lock file (again after twistd daemonized: a new pid)."""
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)


def write_pid(run_dir: str, pid: int) -> None:
    """Record the pid that serves next if the current agent dies (systemd's C{PIDFile=}).

    systemd reads C{PIDFile=} when the main process exits and, if it names a
    live process of the unit, makes it the main process instead of failing
    the unit: that is how a warm standby takes over without a restart.
    """
    path = os.path.join(run_dir, PID_NAME)
    tmp = f"{path}.{os.getpid()}.tmp"
    with open(tmp, "w") as f:
        f.write(f"{pid}\n")
    os.rename(tmp, path)
