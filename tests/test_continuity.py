"""
Continuity for real: upgrade re-exec keeping VMs and the listening socket,
crash restart reattaching VMs, and the bad cases (corrupt state, reused pid,
broken new code, signals in the exec window).
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.trial import unittest

from tests import _procs, _stack
from tests._builds import PrivateBuild
from vdsm_twisted.api import errors
from tests.test_vm_lifecycle import VmTestBase, domain_xml, qemu_pids


def sleep(seconds: float) -> defer.Deferred:
    return deferLater(reactor, seconds, lambda: None)


def proc_stat(pid: int) -> dict:
    """Open fds, threads and RSS (kB) of a process."""
    with open(f"/proc/{pid}/status") as f:
        status = dict(line.split(":", 1) for line in f if ":" in line)
    return {"fds": len(os.listdir(f"/proc/{pid}/fd")),
            "threads": int(status["Threads"]),
            "rss": int(status["VmRSS"].split()[0])}


class ContinuityBase(PrivateBuild, VmTestBase):
    timeout = 400

    @defer.inlineCallbacks
    def start_vms(self, client, count: int, bridge: bool = True):
        ids = [str(uuid.uuid4()) for _ in range(count)]
        for i, vm_id in enumerate(ids):
            yield client.call("VM.create", {"vmID": vm_id, "vmParams": {"xml": domain_xml(
                vm_id, f"k{i}", bridge=self.bridge if bridge else None, vnc=False)}})
        for vm_id in ids:
            yield self.wait_status(vm_id, "Up")
        return ids

    @defer.inlineCallbacks
    def wait_log(self, text: str, timeout: float = 30.0, count: int = 1):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.stack.read_log("vdsm").count(text) >= count:
                return
            yield sleep(0.05)
        raise AssertionError(f"{text!r} not logged {count} time(s):\n"
                             + self.stack.read_log("vdsm")[-3000:])


class UpgradeTests(ContinuityBase):
    @defer.inlineCallbacks
    def test_upgrade_keeps_vms_socket_and_callers(self):
        stomp = yield self.connect("stomp")
        amp = yield self.connect("amp")
        ids = yield self.start_vms(stomp, 5)
        pids = {vm_id: qemu_pids(vm_id) for vm_id in ids}
        agent_pid = self.stack.agent.pid

        # Callers on both protocols keep calling across the upgrade.
        failures, successes, stop = [], [0], [False]

        @defer.inlineCallbacks
        def loop(client):
            while not stop[0]:
                try:
                    listed = yield client.call("Host.getVMList", timeout=30)
                    self.assertEqual(len(listed), 5)
                    yield client.call("Host.ping2", timeout=30)
                    successes[0] += 1
                except Exception as e:  # noqa: BLE001 - every failure counts
                    failures.append(repr(e))
                yield sleep(0.01)

        loops = [loop(stomp), loop(amp)]
        # Raw connection attempts during the exec window: none may be refused.
        refused = []

        def knock():
            import socket as s
            for _ in range(40):
                try:
                    s.create_connection(("127.0.0.1", self.stack.port), 2).close()
                except OSError as e:
                    refused.append(repr(e))
                time.sleep(0.025)

        knocker = reactor.callInThread  # a thread: blocking connects
        knocker(knock)
        yield sleep(0.3)
        self.install_new_build()
        os.kill(agent_pid, signal.SIGUSR2)
        yield self.wait_log("upgrade: new image adopted the listening socket")
        yield sleep(1.5)
        stop[0] = True
        yield defer.DeferredList(loops)

        self.assertEqual(failures, [])
        self.assertGreater(successes[0], 10)
        self.assertEqual(refused, [])
        self.assertEqual(self.stack.agent.poll(), None)
        self.assertEqual(self.stack.agent.pid, agent_pid)
        listed = yield stomp.call("Host.getVMList")
        self.assertEqual(sorted((v["vmId"], v["status"]) for v in listed),
                         sorted((vm_id, "Up") for vm_id in ids))
        for vm_id in ids:
            self.assertEqual(qemu_pids(vm_id), pids[vm_id])
            with open(f"/proc/{pids[vm_id][0]}/status") as f:
                self.assertIn(f"PPid:\t{agent_pid}\n", f.read())
        # Control and events work on the new image.
        self.events.clear()
        yield stomp.call("VM.pause", {"vmID": ids[0]})
        yield self.wait_status(ids[0], "Paused")
        yield amp.call("VM.cont", {"vmID": ids[0]})
        yield self.wait_status(ids[0], "Up")
        # A VM can still be destroyed, its tap goes.
        yield stomp.call("VM.destroy", {"vmID": ids[1]})
        self.assertEqual(qemu_pids(ids[1]), [])

    @defer.inlineCallbacks
    def test_upgrade_through_the_api_and_without_code_change(self):
        client = yield self.connect()
        [vm_id] = yield self.start_vms(client, 1, bridge=False)
        answer = yield client.call("Host.upgrade")
        self.assertEqual(answer["status"]["message"], "reloaded")
        yield self.wait_log("did not change: reloading instead")
        yield sleep(2.1)
        [before] = yield client.call("VM.getStats", {"vmID": vm_id})
        self.install_new_build()
        answer = yield client.call("Host.upgrade")
        self.assertEqual(answer["status"]["message"], "upgrading")
        yield self.wait_log("upgrade: new image adopted the listening socket")
        info = yield client.call("VM.getInfo", {"vmID": vm_id})
        self.assertEqual(info["status"], "Up")
        # Re-attaching is no status change, and the VM did not restart.
        [after] = yield client.call("VM.getStats", {"vmID": vm_id})
        self.assertEqual(after["statusTime"], before["statusTime"])
        self.assertGreaterEqual(int(after["elapsedTime"]), int(before["elapsedTime"]))
        self.assertGreaterEqual(int(after["elapsedTime"]), 2)
        # Nothing changed, so nothing was rewritten in the exec window.
        self.assertIn("state (0 written)", self.stack.read_log("vdsm"))
        # The package post-install step: vdsm-twisted-tool upgrade (over the API).
        self.install_new_build()
        proc = yield deferToThread(subprocess.run, [
            _procs.PYTHON, "-m", "vdsm_twisted.tool.cli", "upgrade", "--host", "localhost",
            "--port", str(self.stack.port), "--pki", str(self.stack.pki_dir)],
            env=_procs.env_for(self.code), capture_output=True, text=True, timeout=120)
        self.assertEqual(proc.returncode, 0, proc.stderr)
        self.assertEqual(proc.stdout.strip(), "upgrading")
        yield self.wait_log("upgrade: new image adopted the listening socket", count=2)

    @defer.inlineCallbacks
    def test_preflight_failure_leaves_the_old_image_serving(self):
        client = yield self.connect()
        [vm_id] = yield self.start_vms(client, 1, bridge=False)
        self.install_new_build(breaking=True)
        os.kill(self.stack.agent.pid, signal.SIGUSR2)
        yield self.wait_log("upgrade refused, the old image keeps serving")
        self.assertIn("this build is broken", self.stack.read_log("vdsm"))
        self.assertNotIn("new image adopted", self.stack.read_log("vdsm"))
        self.assertTrue((yield client.call("Host.ping2")))
        info = yield client.call("VM.getInfo", {"vmID": vm_id})
        self.assertEqual(info["status"], "Up")

    @defer.inlineCallbacks
    def test_a_new_build_crashing_at_startup_falls_back_and_keeps_the_vms(self):
        client = yield self.connect()
        ids = yield self.start_vms(client, 2)
        pids = {vm_id: qemu_pids(vm_id) for vm_id in ids}
        agent_pid = self.stack.agent.pid
        yield self.wait_log("upgrade fallback ready")
        self.install_new_build(crashing=True)
        os.kill(agent_pid, signal.SIGUSR2)
        yield self.wait_log("falling back to the previous build")
        yield self.wait_log("this is the previous build again")
        yield self.wait_log("upgrade: new image adopted the listening socket")
        self.assertIn("this build crashes at start-up", self.stack.read_log("vdsm"))
        self.assertEqual(self.stack.agent.pid, agent_pid)
        self.assertIsNone(self.stack.agent.poll())
        listed = yield client.call("Host.getVMList", timeout=60)
        self.assertEqual(sorted((v["vmId"], v["status"]) for v in listed),
                         sorted((vm_id, "Up") for vm_id in ids))
        for vm_id in ids:
            self.assertEqual(qemu_pids(vm_id), pids[vm_id])
        # The handoff was consumed by the fallback image; a fixed build upgrades normally.
        self.assertFalse((self.stack.root / "run" / "handoff.json").exists())
        target = self.code / "vdsm_twisted" / "tap.py"
        target.write_text(target.read_text().split("\n\ndef makeService(options):\n    raise")[0])
        self.install_new_build()
        answer = yield client.call("Host.upgrade", timeout=60)
        self.assertEqual(answer["status"]["message"], "upgrading")
        yield self.wait_log("upgrade: new image adopted the listening socket", count=2)
        yield self.wait_log("recovery done", count=3)
        listed = yield client.call("Host.getVMList", timeout=60)
        self.assertEqual(len(listed), 2)

    @defer.inlineCallbacks
    def test_qemu_killed_during_the_exec_window_is_down_with_its_signal(self):
        client = yield self.connect()
        ids = yield self.start_vms(client, 2, bridge=False)
        victim = qemu_pids(ids[0])[0]
        handoff = self.stack.root / "run" / "handoff.json"
        self.install_new_build()
        os.kill(self.stack.agent.pid, signal.SIGUSR2)
        # As soon as the old image wrote its handoff, before the new one adopts.
        deadline = time.monotonic() + 30
        while not handoff.exists():
            self.assertLess(time.monotonic(), deadline, "no handoff written")
            time.sleep(0.001)
        os.kill(victim, signal.SIGKILL)
        yield self.wait_log("upgrade: new image adopted the listening socket")
        # Events of the exec window went to no client (all were reconnecting):
        # the status is read back through the API.
        deadline = time.monotonic() + 30
        while True:
            try:
                [down] = yield client.call("VM.getStats", {"vmID": ids[0]}, timeout=30)
            except errors.RecoveryInProgress:  # code 99 while VMs are re-attached
                down = {"status": "recovering"}
            if down["status"] == "Down" or time.monotonic() > deadline:
                break
            yield sleep(0.1)
        self.assertEqual(down["status"], "Down")
        self.assertIn("SIGKILL", down["exitMessage"])
        self.assertEqual(down["exitCode"], 1)
        info = yield client.call("VM.getInfo", {"vmID": ids[1]})
        self.assertEqual(info["status"], "Up")

    @defer.inlineCallbacks
    def test_sighup_in_the_exec_window_does_not_kill_the_agent(self):
        client = yield self.connect()
        yield self.start_vms(client, 1, bridge=False)
        handoff = self.stack.root / "run" / "handoff.json"
        self.install_new_build()
        pid = self.stack.agent.pid
        os.kill(pid, signal.SIGUSR2)
        deadline = time.monotonic() + 30
        while not handoff.exists():
            self.assertLess(time.monotonic(), deadline, "no handoff written")
            time.sleep(0.001)
        os.kill(pid, signal.SIGHUP)
        yield self.wait_log("upgrade: new image adopted the listening socket")
        yield self.wait_log("configuration reloaded")
        self.assertIsNone(self.stack.agent.poll())
        self.assertTrue((yield client.call("Host.ping2")))

    @defer.inlineCallbacks
    def test_thirty_reexecs_leak_nothing(self):
        client = yield self.connect()
        yield self.start_vms(client, 2, bridge=True)
        pid = self.stack.agent.pid
        samples = []
        for i in range(30):
            self.install_new_build()
            os.kill(pid, signal.SIGUSR2)
            yield self.wait_log("upgrade: new image adopted the listening socket", count=i + 1)
            yield self.wait_log("recovery done", count=i + 2)
            yield client.call("Host.ping2", timeout=30)
            samples.append(proc_stat(pid))
        self.assertEqual(self.stack.agent.pid, pid)
        first, last = samples[2], samples[-1]
        self.assertLessEqual(last["fds"], first["fds"] + 2, samples)
        self.assertLessEqual(last["threads"], first["threads"] + 2, samples)
        self.assertLess(last["rss"], first["rss"] * 1.25, samples)


class CrashTests(ContinuityBase):
    def restart_agent(self):
        self.stack.agent.kill()  # kill -9
        self.stack.agent.wait()
        self.stack.start_agent()

    @defer.inlineCallbacks
    def test_kill_9_and_restart_reattaches_every_vm(self):
        client = yield self.connect()
        ids = yield self.start_vms(client, 3)
        pids = {vm_id: qemu_pids(vm_id) for vm_id in ids}
        self.restart_agent()
        yield self.wait_log("recovery done", count=2)  # the first start logged one
        listed = yield client.call("Host.getVMList", timeout=60)
        self.assertEqual(sorted((v["vmId"], v["status"]) for v in listed),
                         sorted((vm_id, "Up") for vm_id in ids))
        for vm_id in ids:
            self.assertEqual(qemu_pids(vm_id), pids[vm_id])
        # Adopted VMs are fully controllable, and their exit is still seen.
        self.events.clear()
        yield client.call("VM.pause", {"vmID": ids[0]})
        yield self.wait_status(ids[0], "Paused")
        os.kill(pids[ids[1]][0], signal.SIGKILL)
        down = yield self.wait_status(ids[1], "Down")
        self.assertEqual(down["exitReason"], 1)
        yield client.call("VM.destroy", {"vmID": ids[2]})
        self.assertEqual(qemu_pids(ids[2]), [])

    @defer.inlineCallbacks
    def test_corrupt_state_recovers_through_proc(self):
        client = yield self.connect()
        ids = yield self.start_vms(client, 2, bridge=False)
        pids = {vm_id: qemu_pids(vm_id) for vm_id in ids}
        self.stack.agent.kill()
        self.stack.agent.wait()
        state = self.stack.root / "run" / "state" / "vm" / f"{ids[0]}.json"
        state.write_bytes(state.read_bytes()[:40])  # truncated
        self.stack.start_agent()
        yield self.wait_log("recovery done", count=2)  # the first start logged one
        self.assertIn("refused", self.stack.read_log("vdsm"))
        self.assertIn("adopting QEMU", self.stack.read_log("vdsm"))
        listed = yield client.call("Host.getVMList", timeout=60)
        self.assertEqual(sorted((v["vmId"], v["status"]) for v in listed),
                         sorted((vm_id, "Up") for vm_id in ids))
        self.assertEqual(qemu_pids(ids[0]), pids[ids[0]])

    @defer.inlineCallbacks
    def test_reused_pid_is_reported_and_left_alone(self):
        client = yield self.connect()
        [vm_id] = yield self.start_vms(client, 1, bridge=False)
        self.stack.agent.kill()
        self.stack.agent.wait()
        # The VM's QEMU is gone and its pid now belongs to someone else: a
        # stranger stands in for it (same pid in the state, another process).
        [qpid] = qemu_pids(vm_id)
        os.kill(qpid, signal.SIGKILL)
        stranger = subprocess.Popen(["sleep", "60"])
        self.addCleanup(stranger.wait)
        self.addCleanup(stranger.kill)
        import json
        state = self.stack.root / "run" / "state" / "vm" / f"{vm_id}.json"
        doc = json.loads(state.read_text())
        doc["data"]["child"]["pid"] = stranger.pid
        state.write_text(json.dumps(doc))
        self.stack.start_agent()
        yield self.wait_log("recovery done", count=2)  # the first start logged one
        self.assertIn("not adopted", self.stack.read_log("vdsm"))
        self.assertIsNone(stranger.poll())
        [stats] = yield client.call("VM.getStats", {"vmID": vm_id}, timeout=60)
        self.assertEqual(stats["status"], "Down")
        self.assertEqual(stats["exitReason"], 9)


class GuestOutputTests(ContinuityBase):
    @defer.inlineCallbacks
    def test_guest_serial_output_during_the_exec_is_kept(self):
        from tests import _guest

        client = yield self.connect()
        kernel, initrd = _guest.guest_files(self.stack.images)
        vm_id = str(uuid.uuid4())
        xml = _guest.linux_domain_xml(vm_id, "ticker", kernel, initrd,
                                      cmdline_extra="guest.tick=0.05")
        yield client.call("VM.create", {"vmID": vm_id, "vmParams": {"xml": xml}})
        yield self.wait_status(vm_id, "Up")
        serial = self.stack.vmlogs / f"{vm_id}.serial.log"
        deadline = time.monotonic() + 60
        while "TICK 5" not in (serial.read_text(errors="replace") if serial.exists() else ""):
            self.assertLess(time.monotonic(), deadline, "the guest never ticked")
            yield sleep(0.1)
        self.install_new_build()
        os.kill(self.stack.agent.pid, signal.SIGUSR2)
        yield self.wait_log("upgrade: new image adopted the listening socket")
        yield sleep(1.0)
        ticks = [int(line.split()[1]) for line in serial.read_text(errors="replace").splitlines()
                 if line.startswith("TICK ")]
        # Every tick the guest printed, before, during and after the exec.
        self.assertEqual(ticks, list(range(len(ticks))))
        self.assertGreater(len(ticks), 20)
        info = yield client.call("VM.getInfo", {"vmID": vm_id})
        self.assertEqual(info["status"], "Up")
