"""
The warm standby for real: a second agent process (the vdsm user, twistd)
that takes over when the serving one is killed with SIGKILL, keeps every
QEMU, never refuses a connection, and is replaced across upgrades; and the
run-dir lock that keeps two agents off one run directory.
"""

from __future__ import annotations

import os
import signal
import socket
import time

from twisted.internet import defer
from twisted.internet.threads import deferToThread

from tests import _procs
from tests.test_continuity import ContinuityBase, sleep
from tests.test_vm_lifecycle import qemu_pids


class StandbyTests(ContinuityBase):
    standby = True

    @defer.inlineCallbacks
    def wait_standby(self, count: int = 1):
        """Wait for the C{count}th ready standby; returns its pid (from agent.pid)."""
        yield self.wait_log("warm and ready to take over", timeout=60, count=count)
        pid = self.stack.serving_pid()
        self.assertIsNotNone(pid)
        return pid

    def knock_while(self, done: list) -> list:
        """Connect to the port in a loop until C{done}; returns the errors seen."""
        errors = []

        def loop():
            while not done:
                try:
                    socket.create_connection(("127.0.0.1", self.stack.port), 2).close()
                except OSError as e:
                    errors.append(repr(e))
                time.sleep(0.005)
        return deferToThread(loop).addCallback(lambda _: errors)

    @defer.inlineCallbacks
    def test_kill_9_the_standby_takes_over_every_vm(self):
        client = yield self.connect()
        ids = yield self.start_vms(client, 3)
        pids = {vm_id: qemu_pids(vm_id) for vm_id in ids}
        standby = yield self.wait_standby()
        agent = self.stack.agent.pid
        self.assertNotEqual(standby, agent)
        self.assertEqual(_procs.processes_mentioning(self.stack.agent_conf)[standby], agent)

        done: list = []
        knocking = self.knock_while(done)
        yield sleep(0.2)
        self.stack.agent.kill()  # SIGKILL: no goodbye to the standby
        self.stack.agent.wait()
        yield self.wait_log("standby: took over from agent pid", timeout=30)
        yield self.wait_log("standby: every VM re-attached", timeout=30)
        done.append(True)
        refused = yield knocking
        self.assertEqual(refused, [], "connections refused while the agent was dead")

        listed = yield client.call("Host.getVMList", timeout=60)
        self.assertEqual(sorted((v["vmId"], v["status"]) for v in listed),
                         sorted((vm_id, "Up") for vm_id in ids))
        for vm_id in ids:
            self.assertEqual(qemu_pids(vm_id), pids[vm_id])
        caps = yield client.call("Host.getCapabilities", timeout=30)
        self.assertIn("kvmEnabled", caps)
        log = self.stack.read_log("vdsm")
        self.assertNotIn("Traceback", log)

        # The former standby serves and keeps a standby of its own.
        second = yield self.wait_standby(count=2)
        self.assertNotEqual(second, standby)
        self.assertEqual(_procs.processes_mentioning(self.stack.agent_conf)[second], standby)

        # Adopted VMs are controllable, and a QEMU's death is still noticed.
        self.events.clear()
        yield client.call("VM.pause", {"vmID": ids[0]})
        yield self.wait_status(ids[0], "Paused")
        os.kill(pids[ids[1]][0], signal.SIGKILL)
        yield self.wait_status(ids[1], "Down")
        yield client.call("VM.destroy", {"vmID": ids[2]})
        self.assertEqual(qemu_pids(ids[2]), [])

    @defer.inlineCallbacks
    def test_clean_stop_ends_the_standby_without_a_takeover(self):
        client = yield self.connect()
        [vm_id] = yield self.start_vms(client, 1, bridge=False)
        standby = yield self.wait_standby()
        client.close()
        self.assertIn(_procs.stop(self.stack.agent), (0, -signal.SIGTERM))
        yield deferToThread(_procs.wait_for,
                            lambda: standby not in _procs.processes_mentioning(
                                self.stack.agent_conf), 10, 0.05, "the standby to exit")
        yield sleep(0.5)
        self.assertEqual(_procs.processes_mentioning(self.stack.agent_conf), {})
        self.assertNotIn("took over", self.stack.read_log("vdsm"))
        self.assertEqual(len(qemu_pids(vm_id)), 1)  # VMs outlive a stopped agent

    @defer.inlineCallbacks
    def test_a_dead_standby_is_replaced(self):
        yield self.connect()
        first = yield self.wait_standby()
        os.kill(first, signal.SIGKILL)
        yield self.wait_log("standby exited", timeout=30)
        second = yield self.wait_standby(count=2)
        self.assertNotEqual(second, first)
        self.assertIsNone(self.stack.agent.poll())

    @defer.inlineCallbacks
    def test_upgrade_replaces_the_standby_and_the_new_one_takes_over(self):
        client = yield self.connect()
        ids = yield self.start_vms(client, 2, bridge=False)
        pids = {vm_id: qemu_pids(vm_id) for vm_id in ids}
        old = yield self.wait_standby()
        self.install_new_build()
        os.kill(self.stack.agent.pid, signal.SIGUSR2)
        yield self.wait_log("upgrade downtime", timeout=60)
        new = yield self.wait_standby(count=2)
        self.assertNotEqual(new, old)
        self.assertNotIn(old, _procs.processes_mentioning(self.stack.agent_conf))
        # The standby of the new build takes over from it.
        self.stack.agent.kill()
        self.stack.agent.wait()
        yield self.wait_log("standby: every VM re-attached", timeout=30)
        listed = yield client.call("Host.getVMList", timeout=60)
        self.assertEqual(sorted((v["vmId"], v["status"]) for v in listed),
                         sorted((vm_id, "Up") for vm_id in ids))
        for vm_id in ids:
            self.assertEqual(qemu_pids(vm_id), pids[vm_id])


class RunLockTests(ContinuityBase):
    """Without a standby: the lock's message, and that a crash frees it."""

    @defer.inlineCallbacks
    def test_busy_run_dir_names_the_holder(self):
        yield self.connect()
        log = self.stack.root / "logs" / "second.log"
        proc = _procs.twistd(self.stack.code_dir, "vdsm", ["--config", str(self.stack.agent_conf)],
                             user="vdsm", env=self.stack.env(False), log_path=log)
        code = yield deferToThread(proc.wait, 30)
        self.assertEqual(code, 1)
        out = log.with_suffix(".out").read_text()
        self.assertIn("is in use by pid", out)
        self.assertIn(str(self.stack.agent.pid), out)
        self.assertIsNone(self.stack.agent.poll())
        # The serving agent is untouched.
        client = yield self.stack.client()
        self.addCleanup(client.close)
        yield client.call("Host.ping2")

    @defer.inlineCallbacks
    def test_a_killed_agent_frees_the_lock_at_once(self):
        yield self.connect()
        self.stack.agent.kill()
        self.stack.agent.wait()
        started = time.monotonic()
        self.stack.start_agent()
        self.assertLess(time.monotonic() - started, 30)
        self.assertNotIn("in use by", self.stack.read_log("vdsm"))
