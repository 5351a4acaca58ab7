"""
VMs for real: the agent (as vdsm) starts QEMU/KVM guests as its own children,
privd (root) makes their taps, a STOMP client drives them and sees events.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import subprocess
import tempfile
import uuid
from pathlib import Path

from twisted.internet import defer, reactor
from twisted.internet.task import deferLater
from twisted.trial import unittest

from tests import _procs, _stack
from vdsm_twisted.api import errors


def domain_xml(vm_id: str, name: str, bridge: str | None = None, cdrom: bool = True,
               vnc: bool = True, extra_devices: str = "") -> str:
    nic = f"""
    <interface type="bridge">
      <mac address="52:54:00:{vm_id[0:2]}:{vm_id[2:4]}:{vm_id[4:6]}"/>
      <source bridge="{bridge}"/>
      <model type="virtio"/>
    </interface>""" if bridge else ""
    cd = """
    <disk type="file" device="cdrom">
      <target dev="hdc" bus="ide"/>
      <readonly/>
      <alias name="ua-cdrom"/>
    </disk>""" if cdrom else ""
    graphics = '<graphics type="vnc" autoport="yes" listen="127.0.0.1"/>' if vnc else ""
    return f"""<domain type="kvm">
  <name>{name}</name>
  <uuid>{vm_id}</uuid>
  <memory unit="MiB">64</memory>
  <vcpu>1</vcpu>
  <os><type arch="x86_64" machine="pc">hvm</type></os>
  <devices>{cd}{nic}
    {graphics}
    <memballoon model="none"/>{extra_devices}
  </devices>
</domain>"""


def qemu_pids(vm_id: str) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"qemu-system.*{vm_id}"], capture_output=True, text=True)
    return [int(p) for p in out.stdout.split()]


def bridge_ports(bridge: str) -> list[str]:
    try:
        return sorted(os.listdir(f"/sys/class/net/{bridge}/brif"))
    except FileNotFoundError:
        return []


class VmTestBase(unittest.TestCase):
    timeout = 300
    #: Run the agent with its warm standby.
    standby = False

    def setUp(self):
        root = Path(tempfile.mkdtemp(prefix="vt-vm-"))
        self.addCleanup(shutil.rmtree, root, True)
        self.stack = _stack.make_stack(root, self.code_for_stack(), standby=self.standby)
        self.bridge = "vtb" + uuid.uuid4().hex[:8]
        subprocess.run(["ip", "link", "add", "name", self.bridge, "type", "bridge"], check=True)
        self.addCleanup(subprocess.run, ["ip", "link", "del", self.bridge], capture_output=True)
        subprocess.run(["ip", "link", "set", self.bridge, "up"], check=True)
        links_before = set(os.listdir("/sys/class/net"))
        self.addCleanup(self._delete_new_taps, links_before)
        self.stack.start_privd()
        self.stack.start_agent()
        self.addCleanup(self.stack.stop)
        self.events: list[tuple[str, dict]] = []

    def code_for_stack(self):
        return _procs.shared_code_dir()

    @staticmethod
    def _delete_new_taps(before: set) -> None:
        """A failed test may leave taps behind: never let them outlive it."""
        for link in set(os.listdir("/sys/class/net")) - before:
            if link.startswith("vnet"):
                subprocess.run(["ip", "link", "del", link], capture_output=True)

    @defer.inlineCallbacks
    def connect(self, protocol="stomp"):
        client = yield self.stack.client(protocol)
        self.addCleanup(client.close)
        yield client.subscribe_events(lambda m, p: self.events.append((m, p)))
        return client

    @defer.inlineCallbacks
    def wait_status(self, vm_id: str, status: str, timeout: float = 60.0):
        """Wait for a |virt|VM_status| event carrying C{status}; returns its payload."""
        deadline = reactor.seconds() + timeout
        while reactor.seconds() < deadline:
            for method, params in self.events:
                if method == f"|virt|VM_status|{vm_id}" and params[vm_id]["status"] == status:
                    return params[vm_id]
            yield deferLater(reactor, 0.05, lambda: None)
        raise AssertionError(f"no {status} event for {vm_id}; events: {self.events}\n"
                             + self.stack.read_log("vdsm")[-4000:])

    @defer.inlineCallbacks
    def assertApiError(self, code: int, d):
        try:
            yield d
        except errors.ApiError as e:
            self.assertEqual(e.code, code, e.message)
            return e
        raise AssertionError(f"expected API error {code}")


class LifecycleTests(VmTestBase):
    @defer.inlineCallbacks
    def test_full_lifecycle_with_events(self):
        client = yield self.connect()
        vm_id = str(uuid.uuid4())
        xml = domain_xml(vm_id, "life", bridge=self.bridge)
        result = yield client.call("VM.create", {"vmID": vm_id, "vmParams": {"xml": xml}})
        self.assertEqual(result["status"], "WaitForLaunch")
        self.assertEqual(result["vmId"], vm_id)
        yield self.wait_status(vm_id, "Up")
        [pid] = qemu_pids(vm_id)
        # QEMU runs as the agent's unprivileged user, as its child.
        with open(f"/proc/{pid}/status") as f:
            status = f.read()
        self.assertIn(f"PPid:\t{self.stack.agent.pid}\n", status)
        self.assertIn(f"Uid:\t{pwd.getpwnam('vdsm').pw_uid}\t", status)
        # Its tap exists and is a port of the bridge.
        ports = bridge_ports(self.bridge)
        self.assertEqual(len(ports), 1, ports)
        self.assertTrue(ports[0].startswith("vnet"))

        yield client.call("VM.pause", {"vmID": vm_id})
        yield self.wait_status(vm_id, "Paused")
        yield client.call("VM.cont", {"vmID": vm_id})
        self.events.clear()
        yield client.call("VM.pause", {"vmID": vm_id})
        yield client.call("VM.cont", {"vmID": vm_id})
        yield self.wait_status(vm_id, "Up")

        yield client.call("VM.setTicket", {"vmID": vm_id, "password": "s3cret", "ttl": 120})
        info = yield client.call("VM.getInfo", {"vmID": vm_id})
        self.assertEqual(info["status"], "Up")
        self.assertGreaterEqual(int(info["displayInfo"][0]["port"]), 5900 + 40)
        self.assertNotIn("s3cret", self.stack.read_log("vdsm"))

        iso = self.stack.images / "cd.iso"
        iso.write_bytes(b"\0" * 4096)
        yield client.call("VM.changeCD", {"vmID": vm_id, "driveSpec": {"path": str(iso)}})
        yield client.call("VM.changeCD", {"vmID": vm_id, "driveSpec": ""})
        yield self.assertApiError(-32602, client.call(
            "VM.changeCD", {"vmID": vm_id, "driveSpec": "/etc/passwd"}))

        # Stats move: CPU time grows between samples.
        first = (yield client.call("VM.getStats", {"vmID": vm_id}))[0]
        yield deferLater(reactor, 1.5, lambda: None)
        second = (yield client.call("VM.getStats", {"vmID": vm_id}))[0]
        self.assertEqual(second["monitorResponse"], "0")
        self.assertGreater(int(second["cpuUsage"]), int(first.get("cpuUsage", 0)))
        self.assertIn("hdc", " ".join(second.get("disks", {})) + " hdc")
        self.assertEqual(len(second["network"]), 1)
        all_stats = yield client.call("Host.getAllVmStats")
        self.assertEqual([s["vmId"] for s in all_stats], [vm_id])
        listed = yield client.call("Host.getVMList")
        self.assertEqual([v["vmId"] for v in listed], [vm_id])
        full = yield client.call("Host.getVMFullList")
        self.assertEqual(full[0]["vmName"], "life")
        xmls = yield client.call("Host.dumpxmls", {"vmList": [vm_id]})
        self.assertIn("<name>life</name>", xmls[vm_id])

        # A SeaBIOS guest without an OS ignores the power button: the named
        # timeout falls back to destroy.
        answer = yield client.call("VM.shutdown", {"vmID": vm_id, "timeout": "1"})
        self.assertEqual(answer["status"]["message"], "Machine shutting down")
        down = yield self.wait_status(vm_id, "Down", timeout=30)
        self.assertEqual(down["exitReason"], 6)
        self.assertEqual(down["exitCode"], 0)
        self.assertEqual(qemu_pids(vm_id), [])
        yield deferLater(reactor, 0.5, lambda: None)
        self.assertEqual(bridge_ports(self.bridge), [])

        # Down VMs stay listed until destroyed; destroy releases them.
        stats = (yield client.call("VM.getStats", {"vmID": vm_id}))[0]
        self.assertEqual(stats["status"], "Down")
        yield client.call("VM.destroy", {"vmID": vm_id})
        yield self.assertApiError(1, client.call("VM.getInfo", {"vmID": vm_id}))

    @defer.inlineCallbacks
    def test_qemu_killed_is_down_with_its_reason(self):
        client = yield self.connect(protocol="amp")
        vm_id = str(uuid.uuid4())
        yield client.call("VM.create", {"vmID": vm_id, "vmParams": {
            "xml": domain_xml(vm_id, "victim", vnc=False)}})
        yield self.wait_status(vm_id, "Up")
        [pid] = qemu_pids(vm_id)
        os.kill(pid, signal.SIGKILL)
        down = yield self.wait_status(vm_id, "Down")
        self.assertEqual(down["exitCode"], 1)
        self.assertEqual(down["exitReason"], 1)
        self.assertIn("SIGKILL", down["exitMessage"])
        yield client.call("VM.destroy", {"vmID": vm_id})

    @defer.inlineCallbacks
    def test_destroy_and_duplicates(self):
        client = yield self.connect()
        vm_id = str(uuid.uuid4())
        params = {"vmID": vm_id, "vmParams": {"xml": domain_xml(vm_id, "dup", bridge=self.bridge)}}
        yield client.call("VM.create", params)
        yield self.assertApiError(4, client.call("VM.create", params))
        yield self.wait_status(vm_id, "Up")
        yield client.call("VM.destroy", {"vmID": vm_id})
        down = yield self.wait_status(vm_id, "Down")
        self.assertEqual(down["exitReason"], 6)
        self.assertEqual(qemu_pids(vm_id), [])
        self.assertEqual(bridge_ports(self.bridge), [])
        other = str(uuid.uuid4())
        for verb in ("VM.destroy", "VM.pause", "VM.cont", "VM.getStats", "VM.reset"):
            yield self.assertApiError(1, client.call(verb, {"vmID": other}))


class BadDomainTests(VmTestBase):
    @defer.inlineCallbacks
    def test_bad_xml_is_refused_and_nothing_runs(self):
        client = yield self.connect()
        outside = Path(tempfile.mkdtemp(prefix="vt-outside-"))
        self.addCleanup(shutil.rmtree, outside, True)
        (outside / "disk.img").write_bytes(b"\0" * 1024)
        cases = {
            "malformed": "<domain><name>x</name>",
            "xxe": ('<?xml version="1.0"?><!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]>'
                    "<domain><name>&x;</name></domain>"),
            "billion": ('<!DOCTYPE l [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;">]>'
                        "<domain>&b;</domain>"),
            "hostdev": "<hostdev mode='subsystem' type='pci'/>",
            "outside": (f'<disk type="file" device="disk"><source file="{outside}/disk.img"/>'
                        '<target dev="vda" bus="virtio"/></disk>'),
        }
        for name, fragment in cases.items():
            vm_id = str(uuid.uuid4())
            xml = fragment if name in ("malformed", "xxe", "billion") else \
                domain_xml(vm_id, name, vnc=False, cdrom=False, extra_devices=fragment)
            e = yield self.assertApiError(9, client.call(
                "VM.create", {"vmID": vm_id, "vmParams": {"xml": xml}}))
            if name == "hostdev":
                self.assertIn("hostdev", e.message)
            if name == "outside":
                self.assertIn("outside the image roots", e.message)
            self.assertEqual(qemu_pids(vm_id), [])
        self.assertEqual((yield client.call("Host.getVMList")), [])
        yield self.assertApiError(-32602, client.call("VM.create", {"vmID": "not-a-uuid",
                                                                   "vmParams": {}}))
        # The agent is still healthy.
        self.assertTrue((yield client.call("Host.ping2")))


class ConcurrencyTests(VmTestBase):
    @defer.inlineCallbacks
    def test_twenty_vms_created_and_destroyed_concurrently(self):
        client = yield self.connect()
        agent_fds = len(os.listdir(f"/proc/{self.stack.agent.pid}/fd"))
        ids = [str(uuid.uuid4()) for _ in range(20)]
        yield defer.gatherResults([
            client.call("VM.create", {"vmID": vm_id, "vmParams": {
                "xml": domain_xml(vm_id, f"c{i}", bridge=self.bridge, vnc=False)}},
                timeout=120)
            for i, vm_id in enumerate(ids)], consumeErrors=True)
        for vm_id in ids:
            yield self.wait_status(vm_id, "Up", timeout=120)
        self.assertEqual(len(bridge_ports(self.bridge)), 20)
        yield defer.gatherResults([client.call("VM.destroy", {"vmID": vm_id}, timeout=120)
                                   for vm_id in ids], consumeErrors=True)
        for vm_id in ids:
            self.assertEqual(qemu_pids(vm_id), [])
        yield deferLater(reactor, 1.0, lambda: None)
        self.assertEqual(bridge_ports(self.bridge), [])
        self.assertEqual([l for l in os.listdir("/sys/class/net") if l.startswith("vnet")], [])
        self.assertEqual((yield client.call("Host.getVMList")), [])
        # No fd left behind in the agent (a little slack for its own sockets).
        self.assertLessEqual(len(os.listdir(f"/proc/{self.stack.agent.pid}/fd")), agent_fds + 2)
