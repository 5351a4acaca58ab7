"""
A real Linux guest (tests/_guest.py) driven through the real stack: the ACPI
power button shuts it down before VM.shutdown's destroy fallback, and a
power-off from inside the guest is reported as the guest's own.
"""

from __future__ import annotations

import shutil
import subprocess
import tempfile
import time
import uuid
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from tests import _guest, _procs, _stack


def qemu_pids(vm_id: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*{vm_id}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


class GuestOsTests(unittest.TestCase):
    timeout = 120

    def setUp(self):
        root = Path(tempfile.mkdtemp(prefix="vt-guest-os-"))
        self.addCleanup(shutil.rmtree, root, True)
        self.stack = _stack.make_stack(root, _procs.shared_code_dir())
        self.kernel, self.initrd = _guest.guest_files(self.stack.images)
        self.stack.start_privd()
        self.stack.start_agent()
        self.addCleanup(self.stack.stop)
        self.events: list[tuple[str, dict]] = []

    @defer.inlineCallbacks
    def connect(self):
        client = yield self.stack.client()
        self.addCleanup(client.close)
        yield client.subscribe_events(lambda m, p: self.events.append((m, p)))
        return client

    def serial(self, vm_id: str) -> str:
        try:
            return (self.stack.vmlogs / f"{vm_id}.serial.log").read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def statuses(self, vm_id: str) -> list[dict]:
        return [p[vm_id] for m, p in self.events if m == f"|virt|VM_status|{vm_id}"]

    @defer.inlineCallbacks
    def wait_for(self, what: str, predicate, vm_id: str, timeout: float):
        deadline = reactor.seconds() + timeout
        while reactor.seconds() < deadline:
            found = predicate()
            if found:
                return found
            yield deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"{what}: not within {timeout}s; statuses {self.statuses(vm_id)}\n"
                             f"serial:\n{self.serial(vm_id)[-2000:]}\n"
                             f"agent:\n{self.stack.read_log('vdsm')[-3000:]}")

    def wait_status(self, vm_id: str, status: str, timeout: float = 30.0):
        return self.wait_for(f"status {status}", lambda: next(
            (s for s in self.statuses(vm_id) if s["status"] == status), None), vm_id, timeout)

    def wait_serial(self, vm_id: str, marker: str, timeout: float = 30.0):
        return self.wait_for(f"{marker} on the serial console",
                             lambda: marker in self.serial(vm_id), vm_id, timeout)

    @defer.inlineCallbacks
    def boot(self, client, name: str, cmdline_extra: str = ""):
        vm_id = str(uuid.uuid4())
        xml = _guest.linux_domain_xml(vm_id, name, self.kernel, self.initrd, cmdline_extra)
        result = yield client.call("VM.create", {"vmID": vm_id, "vmParams": {"xml": xml}})
        self.assertEqual(result["vmId"], vm_id)
        # Generous: TCG is CPU-bound, and a loaded host slows the boot (~2.5 s idle).
        yield self.wait_status(vm_id, "Up", timeout=60)
        yield self.wait_serial(vm_id, _guest.READY, timeout=60)
        return vm_id

    @defer.inlineCallbacks
    def test_acpi_shutdown_by_the_guest(self):
        client = yield self.connect()
        vm_id = yield self.boot(client, "acpi")
        # type="qemu": TCG although this host may have KVM.
        [pid] = qemu_pids(vm_id)
        with open(f"/proc/{pid}/cmdline", "rb") as f:
            argv = f.read().split(b"\0")
        self.assertEqual(argv[argv.index(b"-accel") + 1], b"tcg")
        self.assertNotIn(b"acpi=off", argv[argv.index(b"-machine") + 1])

        fallback = 60
        started = time.monotonic()
        answer = yield client.call("VM.shutdown", {"vmID": vm_id, "timeout": str(fallback)})
        self.assertEqual(answer["status"]["message"], "Machine shutting down")
        down = yield self.wait_status(vm_id, "Down", timeout=fallback / 2)
        elapsed = time.monotonic() - started
        # The guest powered itself off on the button, long before the fallback.
        self.assertLess(elapsed, fallback / 4)
        self.assertEqual((down["exitReason"], down["exitCode"]), (6, 0))
        self.assertEqual(down["exitMessage"], "Admin shut down from the engine")
        self.assertIn("Powering down", [s["status"] for s in self.statuses(vm_id)])
        serial = self.serial(vm_id)
        self.assertIn(_guest.POWER_BUTTON, serial)
        self.assertNotIn(_guest.ERROR, serial)
        log = self.stack.read_log("vdsm")
        for escalation in ("sending SIGTERM", "sending SIGKILL", "ignored the power button"):
            self.assertNotIn(escalation, log)
        self.assertEqual(qemu_pids(vm_id), [])
        yield client.call("VM.destroy", {"vmID": vm_id})

    @defer.inlineCallbacks
    def test_poweroff_from_inside_the_guest(self):
        client = yield self.connect()
        vm_id = yield self.boot(client, "selfoff", "guest.poweroff_after=3")
        down = yield self.wait_status(vm_id, "Down", timeout=30)
        self.assertEqual((down["exitReason"], down["exitCode"]), (7, 0))
        self.assertEqual(down["exitMessage"], "User shut down from within the guest")
        serial = self.serial(vm_id)
        self.assertIn(_guest.POWEROFF, serial)
        self.assertNotIn(_guest.POWER_BUTTON, serial)
        self.assertNotIn(_guest.ERROR, serial)
        self.assertNotIn("sending SIGTERM", self.stack.read_log("vdsm"))
        self.assertEqual(qemu_pids(vm_id), [])
        yield client.call("VM.destroy", {"vmID": vm_id})
