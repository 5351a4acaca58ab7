"""
Hook runner: real scripts in a real hooks directory, run as real child processes.
"""

from __future__ import annotations

import os
import pwd
import shutil
import signal
import tempfile
import time

from twisted.internet import defer, error, reactor, task
from twisted.internet.testing import StringTransport
from twisted.logger import formatEvent, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial import unittest

from vdsm_twisted.hooks import HOOK_NAMES, HookError, HookRunner, IHookRunner
from vdsm_twisted.hooks import runner as hr

XML = "<domain type='kvm'><name>vm1</name><uuid>u-1</uuid></domain>"
VM_ID = "8b8d5dc2-3c1e-4d4f-9a38-0a0b0c0d0e0f"


def _sleep(seconds: float) -> defer.Deferred:
    return task.deferLater(reactor, seconds, lambda: None)


def _live_members(pgid: int) -> list[int]:
    """Pids of processes (not zombies) in process group C{pgid}."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/stat", "rb") as f:
                data = f.read()
        except OSError:
            continue
        fields = data[data.rindex(b")") + 2:].split()
        if fields[0] != b"Z" and int(fields[2]) == pgid:
            found.append(int(name))
    return found


def _alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return False
    return data[data.rindex(b")") + 2:].split()[0] != b"Z"


class HookTestBase(unittest.TestCase):
    timeout_s = 30.0

    def setUp(self):
        self.hooks = tempfile.mkdtemp(prefix="hooks-")
        self.addCleanup(shutil.rmtree, self.hooks, True)
        self.tmp = tempfile.mkdtemp(prefix="hooks-tmp-")
        self.addCleanup(shutil.rmtree, self.tmp, True)
        self.out = tempfile.mkdtemp(prefix="hooks-out-")
        self.addCleanup(shutil.rmtree, self.out, True)
        self.runner = HookRunner(self.hooks, self.timeout_s, tmp_dir=self.tmp)
        self.events: list[dict] = []
        globalLogPublisher.addObserver(self._observe)
        self.addCleanup(globalLogPublisher.removeObserver, self._observe)

    def _observe(self, event):
        if event.get("log_namespace") == hr.__name__:
            self.events.append(event)

    def logged(self) -> str:
        return "\n".join(formatEvent(e) for e in self.events)

    def script(self, hook: str, name: str, body: str, mode: int = 0o755,
               shebang: str = "#!/bin/sh\n") -> str:
        directory = os.path.join(self.hooks, hook)
        os.makedirs(directory, exist_ok=True)
        os.chmod(directory, 0o755)
        path = os.path.join(directory, name)
        with open(path, "w") as f:
            f.write(shebang + body)
        os.chmod(path, mode)
        return path

    def read_out(self, name: str) -> str:
        with open(os.path.join(self.out, name)) as f:
            return f.read()

    def assertNoTempLeft(self):
        self.assertEqual(os.listdir(self.tmp), [])

    def assertGroupGone(self, pgid: int, deadline: float = 5.0):
        """Polls (the group may take a moment to be reaped by init)."""
        end = time.monotonic() + deadline
        while _live_members(pgid) and time.monotonic() < end:
            time.sleep(0.05)
        self.assertEqual(_live_members(pgid), [])


class RunTests(HookTestBase):

    def test_hook_names(self):
        self.assertEqual(len(HOOK_NAMES), 17)
        self.assertIn("after_vm_destroy", HOOK_NAMES)
        self.assertNotIn("before_vm_destroy", HOOK_NAMES)
        self.assertIn("before_vdsm_start", HOOK_NAMES)
        self.assertTrue(IHookRunner.providedBy(self.runner))

    @defer.inlineCallbacks
    def test_byte_order(self):
        names = ["10_b", "02_a", "b_z", "B_upper", "a", "1"]
        for name in names:
            self.script("before_vm_start", name, f'echo {name} >> "$OUT"\n')
        xml = yield self.runner.run("before_vm_start", XML,
                                    env={"OUT": os.path.join(self.out, "order")}, vm_id=VM_ID)
        self.assertEqual(xml, XML)
        self.assertEqual(self.read_out("order").split(),
                         ["02_a", "1", "10_b", "B_upper", "a", "b_z"])
        self.assertNoTempLeft()

    @defer.inlineCallbacks
    def test_xml_rewrite_chain(self):
        # 1: in-place rewrite through sed -i (which replaces the file by rename).
        self.script("before_vm_start", "10_rename", 'sed -i "s/vm1/vm2/" "$_hook_domxml"\n'
                    'stat -c "%a %U" "$_hook_domxml" > "$OUT/perm"\n'
                    'dirname "$_hook_domxml" > "$OUT/dir"\n')
        # 2: sees the edit (else stops everything), appends.
        self.script("before_vm_start", "20_append",
                    'grep -q "<name>vm2</name>" "$_hook_domxml" || exit 2\n'
                    'printf "<!-- seen by 20 -->" >> "$_hook_domxml"\n')
        xml = yield self.runner.run("before_vm_start", XML, env={"OUT": self.out}, vm_id=VM_ID)
        self.assertEqual(xml, XML.replace("vm1", "vm2") + "<!-- seen by 20 -->")
        private = self.read_out("dir").strip()
        self.assertEqual(os.path.dirname(private), self.tmp)
        self.assertFalse(os.path.exists(private))
        self.assertNoTempLeft()

    @defer.inlineCallbacks
    def test_xml_file_private(self):
        self.script("before_vm_start", "10", 'stat -c "%a" "$_hook_domxml" > "$OUT/perm"\n'
                    'stat -c "%a" "$(dirname "$_hook_domxml")" > "$OUT/dirperm"\n')
        yield self.runner.run("before_vm_start", XML, env={"OUT": self.out})
        self.assertEqual(self.read_out("perm").strip(), "600")
        self.assertEqual(self.read_out("dirperm").strip(), "700")
        self.assertNoTempLeft()

    @defer.inlineCallbacks
    def test_environment_is_built_from_scratch(self):
        marker = "VDSM_TWISTED_HOOK_TEST_MARKER"
        os.environ[marker] = "leaked"
        self.addCleanup(os.environ.pop, marker, None)
        self.script("before_vm_start", "10_env", 'env > "$OUT/env"\npwd > "$OUT/pwd"\n'
                    'cat > "$OUT/stdin"\n')
        yield self.runner.run(
            "before_vm_start", XML, vm_id=VM_ID,
            env={"OUT": self.out, "sap_agent": "true", "spaced": "a b=c", "LC_CTYPE": "C",
                 "PATH": "/evil", "LD_PRELOAD": "/evil.so", "vmId": "other"})
        env = dict(line.split("=", 1) for line in self.read_out("env").splitlines())
        self.assertNotIn(marker, env)
        self.assertNotIn("LD_PRELOAD", env)
        self.assertEqual(env["sap_agent"], "true")
        self.assertEqual(env["spaced"], "a b=c")
        self.assertEqual(env["LC_CTYPE"], "C")  # not the launcher's coerced C.UTF-8
        self.assertEqual(env["vmId"], VM_ID)
        self.assertEqual(env["PATH"], hr.HOOK_PATH)
        self.assertTrue(env["_hook_domxml"].startswith(self.tmp + "/"))
        # Only what we set, plus what /bin/sh itself adds.
        self.assertLessEqual(set(env) - {"PWD", "OLDPWD", "SHLVL", "_"},
                             {"OUT", "sap_agent", "spaced", "LC_CTYPE", "vmId", "PATH",
                              "_hook_domxml"})
        self.assertEqual(self.read_out("pwd").strip(), "/")
        self.assertEqual(self.read_out("stdin"), "")
        self.assertIn("LD_PRELOAD", self.logged())

    @defer.inlineCallbacks
    def test_no_domxml(self):
        self.script("before_vdsm_start", "10", 'env > "$OUT/env"\n')
        result = yield self.runner.run("before_vdsm_start", env={"OUT": self.out})
        self.assertIsNone(result)
        env = dict(line.split("=", 1) for line in self.read_out("env").splitlines())
        self.assertNotIn("_hook_domxml", env)
        self.assertNotIn("vmId", env)
        self.assertEqual(set(env) - {"PWD", "OLDPWD", "SHLVL", "_"}, {"OUT", "PATH"})
        self.assertEqual(os.listdir(self.tmp), [])

    @defer.inlineCallbacks
    def test_failures_that_continue(self):
        self.script("before_vm_start", "10_one", 'echo "one went wrong" >&2\nexit 1\n')
        self.script("before_vm_start", "20_three", 'echo "three here"\nexit 3\n')
        self.script("before_vm_start", "30_noexec", "just text, no interpreter\n", shebang="")
        self.script("before_vm_start", "40_last", 'touch "$OUT/last"\n')
        xml = yield self.runner.run("before_vm_start", XML, env={"OUT": self.out})
        self.assertEqual(xml, XML)
        self.assertTrue(os.path.exists(os.path.join(self.out, "last")))
        log = self.logged()
        self.assertIn("before_vm_start/10_one", log)
        self.assertIn("one went wrong", log)
        self.assertIn("exit code 3", log)
        self.assertIn("three here", log)
        self.assertIn("cannot execute", log)
        self.assertNoTempLeft()

    @defer.inlineCallbacks
    def test_exit_2_stops(self):
        self.script("before_vm_start", "10_ok", 'echo fine\n')
        self.script("before_vm_start", "20_veto", 'echo "to stdout"\necho "no memory for it" >&2\n'
                    'exit 2\n')
        self.script("before_vm_start", "30_never", 'touch "$OUT/never"\n')
        err = yield self.assertFailure(
            self.runner.run("before_vm_start", XML, env={"OUT": self.out}, vm_id=VM_ID),
            HookError)
        self.assertEqual((err.hook_name, err.script, err.exit_code, err.timed_out),
                         ("before_vm_start", "20_veto", 2, False))
        self.assertEqual(err.output, "to stdout\nno memory for it\n")
        self.assertEqual(str(err), "hook before_vm_start/20_veto failed with exit code 2; "
                                   "operation stopped: no memory for it")
        self.assertFalse(os.path.exists(os.path.join(self.out, "never")))
        self.assertIn("no memory for it", self.logged())
        self.assertNoTempLeft()

    @defer.inlineCallbacks
    def test_output_bounded(self):
        self.script("after_vm_start", "10_chatty",
                    'head -c 300000 /dev/zero | tr "\\0" x\necho\necho THE-END\nexit 2\n')
        err = yield self.assertFailure(self.runner.run("after_vm_start", XML), HookError)
        self.assertTrue(err.output.endswith("x\nTHE-END\n"))
        self.assertIn("bytes dropped", err.output)
        self.assertLess(len(err.output), hr.OUTPUT_LIMIT + 100)

    @defer.inlineCallbacks
    def test_missing_dirs_mean_no_hooks(self):
        self.assertEqual((yield self.runner.run("before_vm_start", XML)), XML)
        self.assertIsNone((yield self.runner.run("after_vdsm_start")))
        gone = HookRunner(os.path.join(self.hooks, "nope"), 5, tmp_dir=self.tmp)
        self.assertEqual((yield gone.run("after_vm_destroy", XML, vm_id=VM_ID)), XML)
        self.assertNoTempLeft()

    @defer.inlineCallbacks
    def test_skips_what_must_not_run(self):
        hook = "before_vm_cont"
        ran = 'echo "$(basename "$0")" >> "$OUT/ran"\n'
        self.script(hook, "10_good", ran)
        self.script(hook, "20_not_executable", ran, mode=0o644)
        self.script(hook, "30_world_writable", ran, mode=0o757)
        self.script(hook, "40_group_writable", ran, mode=0o775)
        foreign = self.script(hook, "50_foreign", ran)
        nobody = pwd.getpwnam("nobody")
        os.chown(foreign, nobody.pw_uid, nobody.pw_gid)
        os.mkdir(os.path.join(self.hooks, hook, "60_directory"), 0o755)
        os.symlink("/nonexistent", os.path.join(self.hooks, hook, "70_dangling"))
        self.script(hook, "80_good_too", ran)
        yield self.runner.run(hook, XML, env={"OUT": self.out})
        self.assertEqual(self.read_out("ran").split(), ["10_good", "80_good_too"])
        warnings = [formatEvent(e) for e in self.events if e["log_level"].name == "warn"]
        joined = "\n".join(warnings)
        for name in ("30_world_writable", "40_group_writable", "50_foreign", "70_dangling"):
            self.assertIn(name, joined)
        self.assertNotIn("20_not_executable", joined)
        self.assertNotIn("60_directory", joined)

    @defer.inlineCallbacks
    def test_unsafe_directory_refused(self):
        self.script("before_vm_pause", "10", 'touch "$OUT/ran"\n')
        os.chmod(os.path.join(self.hooks, "before_vm_pause"), 0o777)
        xml = yield self.runner.run("before_vm_pause", XML, env={"OUT": self.out})
        self.assertEqual(xml, XML)
        self.assertFalse(os.path.exists(os.path.join(self.out, "ran")))
        self.assertIn("world-writable", self.logged())

    @defer.inlineCallbacks
    def test_concurrent_runs(self):
        # Each run's script waits for the other's: serialized runs would deadlock
        # until the barrier's own limit, then stop with exit 2.
        self.script("before_vm_start", "10_barrier",
                    'touch "$OUT/$vmId"\n'
                    'i=0\n'
                    'while [ ! -e "$OUT/$OTHER" ]; do\n'
                    '  i=$((i+1)); [ $i -gt 300 ] && exit 2; sleep 0.05\n'
                    'done\n'
                    'printf "<!-- $vmId -->" >> "$_hook_domxml"\n')
        a = self.runner.run("before_vm_start", XML, env={"OUT": self.out, "OTHER": "b"},
                            vm_id="a")
        b = self.runner.run("before_vm_start", XML, env={"OUT": self.out, "OTHER": "a"},
                            vm_id="b")
        results = yield defer.gatherResults([a, b], consumeErrors=True)
        self.assertEqual(results, [XML + "<!-- a -->", XML + "<!-- b -->"])
        self.assertNoTempLeft()

    @defer.inlineCallbacks
    def test_bad_arguments(self):
        yield self.assertFailure(self.runner.run("before_vm_explode", XML), ValueError)
        yield self.assertFailure(self.runner.run("before_vm_start", XML, env={"A=B": "x"}),
                                 ValueError)
        yield self.assertFailure(self.runner.run("before_vm_start", XML, env={"A": "x\0y"}),
                                 ValueError)
        yield self.assertFailure(self.runner.run("before_vm_start", XML, env={"A": 1}),
                                 ValueError)
        self.assertRaises(ValueError, HookRunner, self.hooks, 0)


class TimeoutTests(HookTestBase):
    # Short, yet long enough for a script to start on a loaded machine.
    timeout_s = 3.0

    HANG = ('cat /proc/$$/stat > "$OUT/stat"\n'
            'sleep 60 &\n'
            'echo $! > "$OUT/child"\n'
            'echo "hanging now"\n'
            'sleep 60\n')

    def group_of_hung_script(self) -> tuple[int, int]:
        """(pid == pgid of the script, pid of its background child), and check
        the script led its own session."""
        with open(os.path.join(self.out, "stat"), "rb") as f:
            data = f.read()
        pid = int(data.split()[0])
        fields = data[data.rindex(b")") + 2:].split()
        pgrp, session = int(fields[2]), int(fields[3])
        self.assertEqual((pgrp, session), (pid, pid))
        self.assertNotEqual(pgrp, os.getpgrp())
        return pid, int(self.read_out("child"))

    @defer.inlineCallbacks
    def test_before_hook_timeout_stops(self):
        self.script("before_vm_migrate_source", "10_hang", self.HANG)
        self.script("before_vm_migrate_source", "20_never", 'touch "$OUT/never"\n')
        started = time.monotonic()
        err = yield self.assertFailure(
            self.runner.run("before_vm_migrate_source", XML, env={"OUT": self.out}), HookError)
        self.assertLess(time.monotonic() - started, self.timeout_s + 10)
        self.assertTrue(err.timed_out)
        self.assertIsNone(err.exit_code)
        self.assertEqual(err.script, "10_hang")
        self.assertIn("timed out after 3s", str(err))
        self.assertIn("hanging now", err.output)
        pgid, child = self.group_of_hung_script()
        self.assertGroupGone(pgid)
        self.assertFalse(_alive(child))
        self.assertFalse(os.path.exists(os.path.join(self.out, "never")))
        self.assertNoTempLeft()

    @defer.inlineCallbacks
    def test_after_hook_timeout_continues(self):
        self.script("after_vm_migrate_source", "10_hang", self.HANG)
        self.script("after_vm_migrate_source", "20_next", 'touch "$OUT/next"\n')
        xml = yield self.runner.run("after_vm_migrate_source", XML, env={"OUT": self.out})
        self.assertEqual(xml, XML)
        self.assertTrue(os.path.exists(os.path.join(self.out, "next")))
        pgid, child = self.group_of_hung_script()
        self.assertGroupGone(pgid)
        self.assertFalse(_alive(child))
        self.assertIn("after_vm_migrate_source/10_hang", self.logged())
        self.assertIn("timed out", self.logged())
        self.assertNoTempLeft()

    @defer.inlineCallbacks
    def test_leftover_holding_output_is_killed(self):
        # The script exits 0 at once but its child keeps the output pipe open.
        self.script("before_vm_start", "10_leaky", 'sleep 60 &\necho $! > "$OUT/child"\n'
                    'cat /proc/$$/stat > "$OUT/stat"\n')
        xml = yield self.runner.run("before_vm_start", XML, env={"OUT": self.out})
        self.assertEqual(xml, XML)
        self.assertFalse(_alive(int(self.read_out("child"))))
        self.assertIn("left processes", self.logged())

    @defer.inlineCallbacks
    def test_cancel_kills_and_cleans(self):
        self.runner.timeout = 30
        self.script("before_vm_start", "10_hang", self.HANG)
        d = self.runner.run("before_vm_start", XML, env={"OUT": self.out})
        for _ in range(100):
            if os.path.exists(os.path.join(self.out, "child")):
                break
            yield _sleep(0.05)
        d.cancel()
        yield self.assertFailure(d, defer.CancelledError)
        pgid, child = self.group_of_hung_script()
        self.assertGroupGone(pgid)
        self.assertFalse(_alive(child))
        self.assertNoTempLeft()


class UnitTests(unittest.TestCase):
    """Deterministic: the protocol's timeout with a Clock, messages, helpers."""

    def test_tail(self):
        tail = hr._Tail(10)
        tail.write(b"0123456789")
        self.assertEqual(tail.text(), "0123456789")
        tail.write(b"abc")
        self.assertEqual(tail.text(), "[... 3 bytes dropped ...]\n3456789abc")

    def test_error_messages(self):
        self.assertEqual(str(HookError("before_vm_start", "50_x", None, "", timed_out=True,
                                       timeout=2.5)),
                         "hook before_vm_start/50_x timed out after 2.5s and was killed; "
                         "operation stopped")
        self.assertEqual(str(HookError("after_vm_pause", "a", 2, "x\nreason\n\n")),
                         "hook after_vm_pause/a failed with exit code 2; operation stopped: reason")

    def test_build_env(self):
        env, dropped = hr.build_env({"x": "1", "LD_LIBRARY_PATH": "/l", "_hook_domxml": "/e"},
                                    "vm", "/p")
        self.assertEqual(env, {"x": "1", "PATH": hr.HOOK_PATH, "vmId": "vm", "_hook_domxml": "/p"})
        self.assertEqual(sorted(dropped), ["LD_LIBRARY_PATH", "_hook_domxml"])

    def _protocol(self):
        clock = task.Clock()
        killed = []
        proto = hr._ScriptProtocol("10_x", 3.0, clock, kill=lambda pid, alive: killed.append(
            (pid, alive)))
        transport = StringTransport()
        transport.pid = 4242
        transport.closeStdin = lambda: None
        proto.makeConnection(transport)
        return clock, killed, proto, transport

    def test_timeout_kills_group(self):
        clock, killed, proto, transport = self._protocol()
        results = []
        proto.done.addCallback(results.append)
        proto.childDataReceived(1, b"partial")
        clock.advance(2.9)
        self.assertEqual(killed, [])
        clock.advance(0.2)
        self.assertEqual(killed, [(4242, True)])
        self.assertTrue(transport.disconnecting)
        proto.processExited(Failure(error.ProcessTerminated(signal=signal.SIGKILL)))
        proto.processEnded(Failure(error.ProcessTerminated(signal=signal.SIGKILL)))
        self.assertEqual(results, [hr.ScriptResult("10_x", None, signal.SIGKILL, "partial", True)])
        self.assertEqual(clock.getDelayedCalls(), [])

    def test_exit_in_time(self):
        clock, killed, proto, transport = self._protocol()
        results = []
        proto.done.addCallback(results.append)
        proto.processExited(Failure(error.ProcessTerminated(exitCode=1)))
        proto.processEnded(Failure(error.ProcessTerminated(exitCode=1)))
        self.assertEqual(results, [hr.ScriptResult("10_x", 1, None, "", False)])
        self.assertEqual(clock.getDelayedCalls(), [])
        self.assertEqual(killed, [])

    def test_judge(self):
        runner = HookRunner("/nonexistent", 3.0, reactor=task.Clock())
        ok = hr.ScriptResult("s", 0, None, "", False)
        hung = hr.ScriptResult("s", None, signal.SIGKILL, "", True)
        runner._judge("after_vm_start", None, ok)
        runner._judge("after_vm_start", None, hung)
        runner._judge("after_vm_start", None, hr.ScriptResult("s", 1, None, "", False))
        runner._judge("after_vm_start", None, hr.ScriptResult("s", None, 11, "", False))
        self.assertRaises(HookError, runner._judge, "before_vm_start", None, hung)
        self.assertRaises(HookError, runner._judge, "after_vm_start", None,
                          hr.ScriptResult("s", 2, None, "", False))
