"""Owned children: real processes spawned, watched through pidfds, adopted."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from vdsm_twisted.children.process import (
    Child, ExitStatus, Identity, IdentityMismatch, spawn)


def open_fds() -> dict[int, str]:
    fds = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            fds[int(name)] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return fds


class SpawnTests(unittest.TestCase):
    def assertClosed(self, child, pidfd, output_fd):
        """Once exited, the child holds no fd of ours any more."""
        self.assertIsNone(child.output_fd)
        fds = open_fds()
        self.assertNotEqual(fds.get(pidfd), "anon_inode:[pidfd]")
        self.assertFalse(fds.get(output_fd, "").startswith("pipe:"), fds.get(output_fd))

    @defer.inlineCallbacks
    def test_exit_code_and_output_reach_the_log(self):
        log = self.mktemp()
        child = spawn(reactor, ["/bin/sh", "-c", "echo out; echo err >&2; exit 3"],
                      log_path=log, name="sh")
        pidfd, output_fd = child.pidfd, child.output_fd
        status = yield child.exited
        self.assertClosed(child, pidfd, output_fd)
        self.assertEqual(status, ExitStatus(code=3))
        self.assertEqual(status.describe(), "exited with code 3")
        with open(log, "rb") as f:
            self.assertEqual(sorted(f.read().split()), [b"err", b"out"])
        self.assertFalse(child.running)
        self.assertFalse(child.send_signal(signal.SIGTERM))

    @defer.inlineCallbacks
    def test_killed_by_signal(self):
        child = spawn(reactor, ["/bin/sleep", "30"], log_path=None, name="sleep")
        self.assertTrue(child.running)
        self.assertTrue(child.send_signal(signal.SIGKILL))
        pidfd, output_fd = child.pidfd, child.output_fd
        status = yield child.exited
        self.assertClosed(child, pidfd, output_fd)
        self.assertEqual(status.signal, signal.SIGKILL)
        self.assertEqual(status.describe(), "killed by SIGKILL")

    @defer.inlineCallbacks
    def test_passed_fds_land_on_their_numbers_and_nothing_else_leaks(self):
        a, b = socket.socketpair()
        self.addCleanup(a.close)
        self.addCleanup(b.close)
        # The child writes to fd 3 (our socket) and lists its fds.
        script = ("import os; os.write(3, b'hello'); "
                  "print(sorted(int(x) for x in os.listdir('/proc/self/fd')))")
        log = self.mktemp()
        child = spawn(reactor, [sys.executable, "-c", script], pass_fds={3: b.fileno()},
                      log_path=log)
        status = yield child.exited
        self.assertEqual(status.code, 0)
        self.assertEqual(a.recv(10), b"hello")
        with open(log) as f:
            fds = eval(f.read().strip())  # a list of ints printed by the child
        # stdio, fd 3, and the fd listdir itself opened: no pipe end, no pidfd.
        self.assertEqual(fds[:4], [0, 1, 2, 3])
        self.assertEqual(len(fds), 5)

    @defer.inlineCallbacks
    def test_new_session(self):
        child = spawn(reactor, ["/bin/sleep", "30"], log_path=None)
        self.assertEqual(os.getsid(child.pid), child.pid)
        child.send_signal(signal.SIGTERM)
        status = yield child.exited
        self.assertEqual(status.signal, signal.SIGTERM)

    def test_stdio_numbers_refused(self):
        self.assertRaises(ValueError, spawn, reactor, ["/bin/true"], pass_fds={1: 0})


class AdoptTests(unittest.TestCase):
    @defer.inlineCallbacks
    def test_adopt_a_process_that_is_not_our_child(self):
        # A process whose parent is gone (as QEMU after an agent crash).
        out = subprocess.run(["/bin/sh", "-c", "setsid /bin/sleep 30 >/dev/null 2>&1 & echo $!"],
                             capture_output=True, text=True, check=True).stdout
        pid = int(out)
        self.addCleanup(lambda: os.kill(pid, signal.SIGKILL) if os.path.exists(f"/proc/{pid}") else None)
        identity = Identity.of(pid)
        state = {"pid": pid, "start_time": identity.start_time, "exe": identity.exe,
                 "boot_id": identity.boot_id, "log_path": None, "name": "adopted"}
        child = Child.adopt(reactor, state, inherited=False)
        self.assertTrue(child.running)
        self.assertTrue(child.send_signal(signal.SIGKILL))
        status = yield child.exited
        self.assertFalse(status.known)
        self.assertIn("status unknown", status.describe())

    def test_pid_reuse_is_refused(self):
        proc = subprocess.Popen(["/bin/sleep", "30"])
        self.addCleanup(proc.wait)
        self.addCleanup(proc.kill)
        identity = Identity.of(proc.pid)
        state = {"pid": proc.pid, "start_time": identity.start_time + 1, "exe": identity.exe,
                 "boot_id": identity.boot_id}
        self.assertRaises(IdentityMismatch, Child.adopt, reactor, state, inherited=False)
        state = {"pid": proc.pid, "start_time": identity.start_time, "exe": "/usr/bin/qemu",
                 "boot_id": identity.boot_id}
        self.assertRaises(IdentityMismatch, Child.adopt, reactor, state, inherited=False)

    def test_gone_pid(self):
        proc = subprocess.Popen(["/bin/true"])
        proc.wait()
        state = {"pid": proc.pid, "start_time": 1, "exe": "/bin/true", "boot_id": "x"}
        self.assertRaises(ProcessLookupError, Child.adopt, reactor, state, inherited=False)


def test_real_execv_keeps_the_child_its_pipe_output_and_exit_status(tmp_path):
    """Output the child wrote while its parent exec'd is in the log, in order;
    the exit status after the exec is the real one."""
    import json as _json

    from tests import _procs as procs

    log = tmp_path / "ticker.log"
    out = subprocess.run([sys.executable, "-m", "tests._reexec_child", str(log)],
                         cwd=str(procs.REPO), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    result = _json.loads(out.stdout.strip().splitlines()[-1])
    assert result["signal"] == signal.SIGKILL
    ticks = [int(x) for x in log.read_text().split()]
    assert ticks == list(range(len(ticks)))
    assert len(ticks) > 60  # ~0.6 s of ticks at 5 ms, the exec in the middle
