"""
Live migration between two real agents on this machine (two "hosts": their
own privd, ports, run dirs; one CA and one shared image root).
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
from twisted.trial import unittest

from tests import _guest, _procs, _stack
from tests._builds import PrivateBuild
from tests.test_vm_lifecycle import qemu_pids
from vdsm_twisted.api import errors


def sleep(seconds):
    return deferLater(reactor, seconds, lambda: None)


def ticks(path: Path) -> list[int]:
    """The guest's tick numbers, from complete lines only (a line being
    written may read "TICK 1" on its way to "TICK 12")."""
    if not path.exists():
        return []
    lines = path.read_text(errors="replace").split("\n")[:-1]
    return [int(line.split()[1]) for line in lines
            if line.startswith("TICK ") and len(line.split()) > 1 and line.split()[1].isdigit()]


class MigrationBase(unittest.TestCase):
    """Two agents and helpers; no tests of its own."""

    timeout = 300

    def setUp(self):
        root_a = Path(tempfile.mkdtemp(prefix="vt-src-"))
        root_b = Path(tempfile.mkdtemp(prefix="vt-dst-"))
        for root in (root_a, root_b):
            self.addCleanup(shutil.rmtree, root, True)
        code = self.code_for_stack()
        self.src = _stack.make_stack(root_a, code)
        self.dst = _stack.make_stack(root_b, code, pki_dir=self.src.pki_dir, images=self.src.images)
        for stack in (self.src, self.dst):
            stack.start_privd()
            stack.start_agent()
            self.addCleanup(stack.stop)
        self.kernel, self.initrd = _guest.guest_files(self.src.images)
        self.events = {"src": [], "dst": []}

    def code_for_stack(self):
        return _procs.shared_code_dir()

    @defer.inlineCallbacks
    def clients(self):
        out = []
        for name, stack in (("src", self.src), ("dst", self.dst)):
            client = yield stack.client()
            self.addCleanup(client.close)
            yield client.subscribe_events(lambda m, p, n=name: self.events[n].append((m, p)))
            out.append(client)
        return out

    @defer.inlineCallbacks
    def start_guest(self, client, memory_mib=128):
        vm_id = str(uuid.uuid4())
        xml = _guest.linux_domain_xml(vm_id, "mover", self.kernel, self.initrd,
                                      cmdline_extra="guest.tick=0.05", memory_mib=memory_mib)
        yield client.call("VM.create", {"vmID": vm_id, "vmParams": {"xml": xml}})
        serial = self.src.vmlogs / f"{vm_id}.serial.log"
        deadline = time.monotonic() + 90
        while len(ticks(serial)) < 5:
            self.assertLess(time.monotonic(), deadline, "the guest never ticked")
            yield sleep(0.1)
        return vm_id

    @defer.inlineCallbacks
    def wait_for(self, predicate, what, timeout=90.0):
        deadline = time.monotonic() + timeout
        while True:
            value = yield predicate()
            if value:
                return value
            if time.monotonic() > deadline:
                raise AssertionError(f"timed out waiting for {what}\n--- src:\n"
                                     + self.src.read_log("vdsm")[-3000:] + "\n--- dst:\n"
                                     + self.dst.read_log("vdsm")[-3000:])
            yield sleep(0.1)

    def wait_migration_active(self, client, vm_id):
        @defer.inlineCallbacks
        def started():
            status = yield client.call("VM.getMigrationStatus", {"vmID": vm_id})
            return status["migrationStats"]["state"] == "active"

        return self.wait_for(started, "the migration to start")

    @defer.inlineCallbacks
    def status_of(self, client, vm_id):
        try:
            [stats] = yield client.call("VM.getStats", {"vmID": vm_id})
        except errors.NoSuchVM:
            return None
        return stats



class MigrationTests(MigrationBase):
    @defer.inlineCallbacks
    def test_live_migration_carries_the_running_guest(self):
        src, dst = yield self.clients()
        vm_id = yield self.start_guest(src)
        [src_pid] = qemu_pids(vm_id)
        answer = yield src.call("VM.migrate", {"vmID": vm_id, "params": {
            "dst": f"localhost:{self.dst.port}", "dstqemu": "127.0.0.1", "downtime": 300}})
        self.assertEqual(answer["status"]["code"], 0)

        @defer.inlineCallbacks
        def source_down():
            stats = yield self.status_of(src, vm_id)
            return stats is not None and stats["status"] == "Down" and stats

        down = yield self.wait_for(source_down, "the source to end")
        self.assertEqual(down["exitReason"], 4)
        self.assertEqual(down["exitCode"], 0)
        stats = yield self.status_of(dst, vm_id)
        self.assertEqual(stats["status"], "Up")
        self.assertNotIn(src_pid, qemu_pids(vm_id))
        self.assertEqual(len(qemu_pids(vm_id)), 1)
        # The guest's own memory came along: its tick counter goes on from
        # where it was on the source, in the destination's serial log (once
        # the source's last output has reached its log).
        src_serial = self.src.vmlogs / f"{vm_id}.serial.log"
        seen: list = []

        @defer.inlineCallbacks
        def settled():
            yield sleep(0.3)
            seen.append(ticks(src_serial))
            return len(seen) > 1 and seen[-1] == seen[-2]

        yield self.wait_for(settled, "the source's serial log to settle")
        before = seen[-1]
        dst_serial = self.dst.vmlogs / f"{vm_id}.serial.log"

        @defer.inlineCallbacks
        def ticking():
            yield sleep(0)
            return len(ticks(dst_serial)) >= 5

        yield self.wait_for(ticking, "the guest to tick on the destination")
        after = ticks(dst_serial)
        self.assertEqual(after[0], before[-1] + 1, (before[-3:], after[:3]))
        self.assertEqual(after, list(range(after[0], after[0] + len(after))))
        # Progress was reported, and the status verb answers.
        progress = [p for m, p in self.events["src"] if m == f"|virt|VM_migration_status|{vm_id}"]
        self.assertTrue(progress)
        self.assertEqual(progress[-1][vm_id]["progress"], 100)
        status = yield src.call("VM.getMigrationStatus", {"vmID": vm_id})
        self.assertEqual(status["progress"], 100)
        # The migration was an async task: listed, finished, and clearable.
        task_id = answer["taskID"]
        statuses = yield src.call("Host.getAllTasksStatuses")
        self.assertEqual((statuses[task_id]["taskState"], statuses[task_id]["taskResult"]),
                         ("finished", "success"))
        infos = yield src.call("Host.getAllTasksInfo")
        self.assertEqual(infos[task_id]["verb"], "VM.migrate")
        jobs = [p for m, p in self.events["src"] if m == f"|jobs|status|{task_id}"]
        self.assertTrue(jobs)
        yield src.call("Task.clear", {"taskID": task_id})
        with self.assertRaises(errors.ApiError) as caught:
            yield src.call("Task.getStatus", {"taskID": task_id})
        self.assertEqual(caught.exception.code, 401)
        yield src.call("VM.destroy", {"vmID": vm_id})
        yield dst.call("VM.destroy", {"vmID": vm_id})

    @defer.inlineCallbacks
    def test_cancel_midway_keeps_the_source_and_cleans_the_destination(self):
        src, dst = yield self.clients()
        vm_id = yield self.start_guest(src, memory_mib=256)
        yield src.call("VM.migrate", {"vmID": vm_id, "params": {
            "dst": f"localhost:{self.dst.port}", "dstqemu": "127.0.0.1", "maxBandwidth": 2}})

        yield self.wait_migration_active(src, vm_id)
        # Stopping its task cancels the migration (Task.stop == VM.migrateCancel).
        [task_id] = list((yield src.call("Host.getAllTasksStatuses")))
        yield src.call("Task.stop", {"taskID": task_id})

        @defer.inlineCallbacks
        def source_up_again():
            stats = yield self.status_of(src, vm_id)
            return stats["status"] == "Up"

        yield self.wait_for(source_up_again, "the source to run on")

        @defer.inlineCallbacks
        def destination_gone():
            stats = yield self.status_of(dst, vm_id)
            return stats is None or stats["status"] == "Down"

        yield self.wait_for(destination_gone, "the destination copy to go")
        self.assertEqual(len(qemu_pids(vm_id)), 1)
        status = yield src.call("VM.getMigrationStatus", {"vmID": vm_id})
        self.assertEqual(status["migrationStats"]["state"], "cancelled")
        # The guest still runs on the source.
        n = len(ticks(self.src.vmlogs / f"{vm_id}.serial.log"))
        yield sleep(0.5)
        self.assertGreater(len(ticks(self.src.vmlogs / f"{vm_id}.serial.log")), n)

    @defer.inlineCallbacks
    def test_a_migration_that_cannot_converge_times_out_and_the_source_runs_on(self):
        src, dst = yield self.clients()
        vm_id = yield self.start_guest(src, memory_mib=256)
        yield src.call("VM.migrate", {"vmID": vm_id, "params": {
            "dst": f"localhost:{self.dst.port}", "dstqemu": "127.0.0.1", "maxBandwidth": 1,
            "migrationTimeout": 2}})

        @defer.inlineCallbacks
        def ended():
            status = yield src.call("VM.getMigrationStatus", {"vmID": vm_id})
            return status["migrationStats"]["state"] in ("cancelled", "failed") and status

        status = yield self.wait_for(ended, "the migration to time out")
        self.assertIn("timed out", status["status"]["message"])
        stats = yield self.status_of(src, vm_id)
        self.assertEqual(stats["status"], "Up")

    @defer.inlineCallbacks
    def test_destination_host_dying_midway_leaves_the_source_running(self):
        src, dst = yield self.clients()
        vm_id = yield self.start_guest(src, memory_mib=256)
        yield src.call("VM.migrate", {"vmID": vm_id, "params": {
            "dst": f"localhost:{self.dst.port}", "dstqemu": "127.0.0.1", "maxBandwidth": 2}})

        yield self.wait_migration_active(src, vm_id)
        # The destination agent is killed, and its QEMU with it (a host crash).
        [src_pid] = [p for p in qemu_pids(vm_id) if str(self.src.root / "run") in
                     open(f"/proc/{p}/cmdline").read()]
        self.dst.agent.kill()
        self.dst.agent.wait()
        for pid in qemu_pids(vm_id):
            if pid != src_pid:
                os.kill(pid, signal.SIGKILL)

        @defer.inlineCallbacks
        def failed():
            status = yield src.call("VM.getMigrationStatus", {"vmID": vm_id})
            return status["migrationStats"]["state"] == "failed"

        yield self.wait_for(failed, "the migration to fail")
        stats = yield self.status_of(src, vm_id)
        self.assertEqual(stats["status"], "Up")
        self.assertEqual(qemu_pids(vm_id), [src_pid])


class MigrationAcrossUpgradeTests(PrivateBuild, MigrationBase):
    """A migration in flight when either agent upgrades: never two copies, never none."""

    @defer.inlineCallbacks
    def _migrate_slowly_and_upgrade(self, stack):
        src, dst = yield self.clients()
        vm_id = yield self.start_guest(src, memory_mib=256)
        yield src.call("VM.migrate", {"vmID": vm_id, "params": {
            "dst": f"localhost:{self.dst.port}", "dstqemu": "127.0.0.1", "maxBandwidth": 4}})

        yield self.wait_migration_active(src, vm_id)
        self.install_new_build()
        os.kill(stack.agent.pid, signal.SIGUSR2)

        @defer.inlineCallbacks
        def settled():
            s = yield self.status_of(src, vm_id)
            d = yield self.status_of(dst, vm_id)
            running = [x["status"] for x in (s, d) if x is not None and x["status"] != "Down"]
            return running in (["Up"],) and (s, d)

        s, d = yield self.wait_for(settled, "exactly one running copy", timeout=180)
        # Exactly one QEMU runs the guest, and it is the one reported Up.
        pids = qemu_pids(vm_id)
        self.assertEqual(len(pids), 1, pids)
        return vm_id

    def test_source_agent_upgrades_during_a_migration(self):
        return self._migrate_slowly_and_upgrade(self.src)

    def test_destination_agent_upgrades_during_a_migration(self):
        return self._migrate_slowly_and_upgrade(self.dst)


class HibernateTests(MigrationBase):
    @defer.inlineCallbacks
    def test_hibernate_then_restore_brings_the_guest_back_where_it_was(self):
        src, _ = yield self.clients()
        vm_id = yield self.start_guest(src)
        state_file = self.src.images / f"{vm_id}.state"
        before = ticks(self.src.vmlogs / f"{vm_id}.serial.log")
        answer = yield src.call("VM.hibernate", {"vmID": vm_id, "hiberVolHandle": str(state_file)},
                                timeout=120)
        self.assertEqual(answer["status"]["code"], 0)
        [stats] = yield src.call("VM.getStats", {"vmID": vm_id})
        self.assertEqual((stats["status"], stats["exitReason"]), ("Down", 5))
        self.assertEqual(qemu_pids(vm_id), [])
        self.assertGreater(state_file.stat().st_size, 1 << 20)
        saved = ticks(self.src.vmlogs / f"{vm_id}.serial.log")
        yield src.call("VM.destroy", {"vmID": vm_id})
        # A little later, the same VM restored (VDSM's restoreState).
        yield sleep(1.0)
        xml = _guest.linux_domain_xml(vm_id, "mover", self.kernel, self.initrd,
                                      cmdline_extra="guest.tick=0.05")
        yield src.call("VM.create", {"vmID": vm_id, "vmParams": {
            "xml": xml, "restoreState": str(state_file)}})
        serial = self.src.vmlogs / f"{vm_id}.serial.log"

        @defer.inlineCallbacks
        def ticking_again():
            yield sleep(0)
            return len(ticks(serial)) >= len(saved) + 5

        yield self.wait_for(ticking_again, "the restored guest to tick")
        after = ticks(serial)
        # The counter (guest memory) resumed from where it was saved: no restart at 0.
        self.assertEqual(after, list(range(len(after))))
        self.assertGreaterEqual(len(saved), len(before))
        [stats] = yield src.call("VM.getStats", {"vmID": vm_id})
        self.assertEqual(stats["status"], "Up")

    @defer.inlineCallbacks
    def test_hibernate_outside_the_image_roots_is_refused(self):
        src, _ = yield self.clients()
        vm_id = yield self.start_guest(src)
        with self.assertRaises(errors.InvalidParams):
            yield src.call("VM.hibernate", {"vmID": vm_id, "hiberVolHandle": "/etc/evil.state"})
        [stats] = yield src.call("VM.getStats", {"vmID": vm_id})
        self.assertEqual(stats["status"], "Up")


class MigrationParamsTests(unittest.TestCase):
    """Bad migration parameters are refused before anything starts."""

    def test_bad_params(self):
        from vdsm_twisted.virt.qemu.migration import OutgoingMigration

        class FakeVm:
            id = "x"

        for params in ({"dst": ""}, {"dst": "h:notaport"}, {"dst": "h", "downtime": "fast"},
                       {"dst": "h", "maxBandwidth": -1}, {"dst": "h", "migrationTimeout": 0},
                       {"dst": "h", "dstqemu": 5}, {"dst": 7}):
            with self.assertRaises(errors.InvalidParams, msg=params):
                OutgoingMigration(FakeVm(), params, None)
        m = OutgoingMigration(FakeVm(), {"dst": "h:1234", "downtime": "300", "maxBandwidth": "4",
                                         "migrationTimeout": "30"}, None)
        self.assertEqual((m.dst_host, m.dst_port, m.downtime_ms, m.bandwidth, m.timeout),
                         ("h", 1234, 300, 4 << 20, 30.0))
