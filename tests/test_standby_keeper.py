"""StandbyKeeper's logic with a fake process reactor and a task.Clock."""

from __future__ import annotations

import os
import tempfile

from twisted.internet import error, task
from twisted.python.failure import Failure
from twisted.trial import unittest

from vdsm_twisted.continuity import standby


class FakeTransport:
    def __init__(self, pid: int):
        self.pid = pid
        self.written: list[tuple[int, bytes]] = []
        self.closed: list[int] = []
        self.signals: list[str] = []

    def writeToChild(self, fd, data):
        self.written.append((fd, data))

    def closeChildFD(self, fd):
        self.closed.append(fd)

    def signalProcess(self, sig):
        self.signals.append(sig)


class FakeReactor(task.Clock):
    def __init__(self):
        super().__init__()
        self.spawned: list[dict] = []
        self.fail_spawn = False

    def spawnProcess(self, proto, executable, args, env, childFDs):
        if self.fail_spawn:
            raise OSError("no more processes")
        transport = FakeTransport(1000 + len(self.spawned))
        proto.makeConnection(transport)
        self.spawned.append({"proto": proto, "args": args, "env": env, "fds": childFDs})
        return transport


class StandbyKeeperTests(unittest.TestCase):
    def setUp(self):
        self.run_dir = tempfile.mkdtemp()
        self.reactor = FakeReactor()
        self.fd = 7
        self.keeper = standby.StandbyKeeper(self.reactor, self.run_dir, lambda: self.fd,
                                            lambda: ["python", "-c", "twistd", "vdsm"])
        self.keeper.startService()

    def pid_file(self) -> int:
        with open(os.path.join(self.run_dir, "agent.pid")) as f:
            return int(f.read())

    def end(self, spawned: dict, exit_code: int = 1):
        spawned["proto"].processEnded(Failure(error.ProcessTerminated(exit_code)))

    def test_spawn_shares_the_socket_and_names_the_agent(self):
        self.keeper.spawn()
        [spawned] = self.reactor.spawned
        self.assertEqual(spawned["fds"], {0: "w", 1: 1, 2: 2, 3: 7, 4: "r"})
        self.assertEqual(spawned["env"][standby.ENV], str(os.getpid()))
        self.keeper.spawn()  # one standby at a time
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_pid_file_names_the_standby_only_once_it_is_ready(self):
        self.assertEqual(self.pid_file(), os.getpid())
        self.keeper.spawn()
        [spawned] = self.reactor.spawned
        self.assertEqual(self.pid_file(), os.getpid())
        spawned["proto"].childDataReceived(4, b"ready\n")
        self.assertEqual(self.pid_file(), 1000)
        self.end(spawned)
        self.assertEqual(self.pid_file(), os.getpid())

    def test_no_socket_yet_no_standby(self):
        self.fd = None
        self.keeper.spawn()
        self.assertEqual(self.reactor.spawned, [])

    def test_disabled_keeper_spawns_nothing(self):
        self.keeper.enabled = False
        self.keeper.spawn()
        self.assertEqual(self.reactor.spawned, [])

    def test_a_dying_standby_is_respawned_with_backoff(self):
        self.keeper.spawn()
        self.end(self.reactor.spawned[-1])
        self.reactor.advance(0.9)
        self.assertEqual(len(self.reactor.spawned), 1)
        self.reactor.advance(0.2)
        self.assertEqual(len(self.reactor.spawned), 2)
        self.end(self.reactor.spawned[-1])
        self.reactor.advance(1.5)
        self.assertEqual(len(self.reactor.spawned), 2)  # 2 s now
        self.reactor.advance(0.6)
        self.assertEqual(len(self.reactor.spawned), 3)
        # Ready resets the backoff.
        self.reactor.spawned[-1]["proto"].childDataReceived(4, b"ready\n")
        self.end(self.reactor.spawned[-1])
        self.reactor.advance(1.01)
        self.assertEqual(len(self.reactor.spawned), 4)

    def test_a_failing_spawn_is_retried(self):
        self.reactor.fail_spawn = True
        self.keeper.spawn()
        self.assertIsNone(self.keeper.process)
        self.reactor.fail_spawn = False
        self.reactor.advance(1.0)
        self.assertEqual(len(self.reactor.spawned), 1)

    def test_pause_tells_it_to_quit_and_kills_it_if_it_does_not(self):
        self.keeper.spawn()
        [spawned] = self.reactor.spawned
        transport = spawned["proto"].transport
        d = self.keeper.pause()
        self.assertEqual(transport.written, [(0, standby.STOP)])
        self.assertEqual(transport.closed, [0])
        self.assertNoResult(d)
        self.reactor.advance(5.0)
        self.assertEqual(transport.signals, ["KILL"])
        self.end(spawned)
        self.successResultOf(d)
        self.reactor.advance(100)
        self.assertEqual(len(self.reactor.spawned), 1)  # paused: no respawn
        self.keeper.resume()
        self.assertEqual(len(self.reactor.spawned), 2)

    def test_stop_service_ends_the_standby_and_spawns_no_other(self):
        self.keeper.spawn()
        [spawned] = self.reactor.spawned
        d = self.keeper.stopService()
        self.end(spawned, 0)
        self.successResultOf(d)
        self.assertEqual(spawned["proto"].transport.signals, [])
        self.keeper.spawn()
        self.reactor.advance(100)
        self.assertEqual(len(self.reactor.spawned), 1)


_WAITER = """
import attr, json, os, socket, sys
listen_fd, ready_fd = int(sys.argv[1]), int(sys.argv[2])
os.dup2(listen_fd, 3)
os.dup2(ready_fd, 4)
from vdsm_twisted.continuity import standby
result = standby.wait_for_takeover(warm=lambda: None)
print(json.dumps(result and attr.asdict(result)), flush=True)
"""


class WaitForTakeoverTests(unittest.TestCase):
    """The standby's side, in a real process with a real 'agent' (a sleep)."""

    def setUp(self):
        import socket
        import subprocess
        import sys

        from tests import _procs

        self.agent = subprocess.Popen(["sleep", "60"])
        self.addCleanup(self.agent.wait)
        self.addCleanup(lambda: self.agent.poll() is None and self.agent.kill())
        self.sock = socket.create_server(("127.0.0.1", 0))
        self.addCleanup(self.sock.close)
        ready_r, ready_w = os.pipe()
        self.ready = os.fdopen(ready_r, "rb")
        self.addCleanup(self.ready.close)
        env = _procs.env_for(_procs.REPO, **{standby.ENV: str(self.agent.pid)})
        self.waiter = subprocess.Popen(
            [sys.executable, "-c", _WAITER, str(self.sock.fileno()), str(ready_w)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env,
            pass_fds=(self.sock.fileno(), ready_w))
        os.close(ready_w)
        self.addCleanup(lambda: self.waiter.poll() is None and self.waiter.kill())
        self.assertEqual(self.ready.readline(), b"ready\n")

    def result(self):
        import json

        out = self.waiter.stdout.read()
        self.waiter.stdout.close()
        if not self.waiter.stdin.closed:
            self.waiter.stdin.close()
        self.assertEqual(self.waiter.wait(20), 0)
        return json.loads(out)

    def test_stop_byte_means_no_takeover(self):
        self.waiter.stdin.write(standby.STOP)
        self.waiter.stdin.flush()
        self.assertIsNone(self.result())

    def test_closed_pipe_with_the_agent_alive_means_no_takeover(self):
        # An agent that exec'd (its pipe end is close-on-exec) is still alive.
        self.waiter.stdin.close()
        self.assertIsNone(self.result())

    def test_the_agent_dying_means_takeover_with_the_socket(self):
        self.agent.kill()
        self.agent.wait()
        result = self.result()
        self.assertEqual(result["previous_pid"], self.agent.pid)
        self.assertEqual(result["listening"], {"fd": 3, "family": 2, "name": "engine"})

