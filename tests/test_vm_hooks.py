"""Hooks around real VMs: XML rewriting, a veto (exit 2), a warning (exit 1), a hang."""

from __future__ import annotations

import os
import pwd
import time
import uuid

from twisted.internet import defer

from tests.test_vm_lifecycle import VmTestBase, domain_xml, qemu_pids
from vdsm_twisted.api import errors


def hook(stack, name: str, script: str, body: str) -> None:
    directory = stack.root / "hooks" / name
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / script
    path.write_text("#!/bin/sh\n" + body)
    os.chmod(path, 0o755)


class VmHookTests(VmTestBase):
    @defer.inlineCallbacks
    def test_hooks_rewrite_veto_warn_hang_and_after(self):
        marks = self.stack.root / "marks"
        marks.mkdir()
        vdsm = pwd.getpwnam("vdsm")
        os.chown(marks, vdsm.pw_uid, vdsm.pw_gid)
        hook(self.stack, "before_vm_start", "10_memory",
             'sed -i \'s|<memory unit="MiB">64</memory>|<memory unit="MiB">96</memory>|\' '
             '"$_hook_domxml"\n'
             '[ "$hang" = 1 ] && sleep 60\n'
             'exit 0\n')
        hook(self.stack, "before_vm_pause", "10_veto",
             'echo "pausing $vmId is not allowed here"; exit 2\n')
        hook(self.stack, "before_vm_cont", "10_warn", 'echo "just a warning"; exit 1\n')
        hook(self.stack, "after_vm_destroy", "10_mark", f'touch "{marks}/$vmId"\n')
        client = yield self.connect()

        vm_id = str(uuid.uuid4())
        yield client.call("VM.create", {"vmID": vm_id, "vmParams": {
            "xml": domain_xml(vm_id, "hooked", vnc=False, cdrom=False)}})
        yield self.wait_status(vm_id, "Up")
        info = yield client.call("VM.getInfo", {"vmID": vm_id})
        self.assertEqual(info["memSize"], 96)  # the rewritten XML was used
        self.assertIn("size=96M", open(f"/proc/{qemu_pids(vm_id)[0]}/cmdline").read()
                      .replace("\0", " "))

        with self.assertRaises(errors.ApiError) as caught:
            yield client.call("VM.pause", {"vmID": vm_id})
        self.assertIn("before_vm_pause/10_veto failed with exit code 2", caught.exception.message)
        [stats] = yield client.call("VM.getStats", {"vmID": vm_id})
        self.assertEqual(stats["status"], "Up")
        yield client.call("VM.cont", {"vmID": vm_id})  # exit 1: logged, goes on
        self.assertIn("just a warning", self.stack.read_log("vdsm"))

        yield client.call("VM.destroy", {"vmID": vm_id})
        deadline = time.monotonic() + 20
        while not (marks / vm_id).exists():
            self.assertLess(time.monotonic(), deadline, "after_vm_destroy did not run")
            yield defer.succeed(None)
            time.sleep(0.05)

        # A before_vm_start hook that hangs past its timeout stops the start.
        hung = str(uuid.uuid4())
        started = time.monotonic()
        yield client.call("VM.create", {"vmID": hung, "vmParams": {
            "xml": domain_xml(hung, "hung", vnc=False, cdrom=False), "custom": {"hang": "1"}}})
        down = yield self.wait_status(hung, "Down", timeout=30)
        self.assertLess(time.monotonic() - started, 20)
        self.assertIn("timed out", down["exitMessage"])
        self.assertEqual(qemu_pids(hung), [])
