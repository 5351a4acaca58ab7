"""Async tasks: lifecycle, stop, clear, persistence across restarts, API verbs.

A real StateStore in a temp dir, a real EventBus, a task.Clock for times.
"""

import json
import os
import uuid

from twisted.internet import defer, reactor, task
from twisted.trial import unittest

from vdsm_twisted.api import errors
from vdsm_twisted.api.events import EventBus
from vdsm_twisted.api.jsonrpc import JsonRpcServer
from vdsm_twisted.api.registry import Api, CallContext
from vdsm_twisted.api.tasks import HostTaskApi, TaskApi
from vdsm_twisted.state.store import StateStore, Writer, encode
from vdsm_twisted.tasks.manager import (
    ABORTED, ABORTING, FAILURE, FINISHED, INTERRUPTED_MESSAGE, RECOVERING, RUNNING, STATE_KIND,
    SUCCESS, TaskExists, TaskManager, TaskStateError, UnknownTask)

CTX = CallContext(protocol="amp", peer="test")
VM = "4a1c2b7e-52f1-4a55-9f0e-1d2f3e4a5b6c"


class _Base(unittest.TestCase):
    def setUp(self):
        self.dir = self.mktemp()
        self.store = StateStore(self.dir, reactor=reactor)
        self.store.start()
        self.addCleanup(self.store.stop)
        self.clock = task.Clock()
        self.clock.advance(1000)
        self.bus = EventBus(clock=lambda: 5.0)
        self.events = []
        self.bus.add_sink(lambda method, params: self.events.append((method, params)))
        self.manager = TaskManager(self.store, self.bus, clock=self.clock)

    def records(self):
        docs, refused = self.store.load_all(STATE_KIND)
        self.assertEqual(refused, [])
        return {doc.key: doc.data for doc in docs}

    def states(self, task_id):
        """(taskState, taskResult, progress) of each event about one task."""
        out = []
        for method, params in self.events:
            if method == f"|jobs|status|{task_id}":
                self.assertIn("notify_time", params)
                s = params[task_id]
                self.assertEqual(s["taskID"], task_id)
                out.append((s["taskState"], s["taskResult"], s["progress"]))
        return out


class LifecycleTests(_Base):
    @defer.inlineCallbacks
    def test_success_with_progress_events_and_records(self):
        op = defer.Deferred()
        t = self.manager.start("migration", "migrate", lambda t: op, vm_id=VM,
                               params={"dst": "10.0.0.2:54321"})
        uuid.UUID(t.id)  # a fresh uuid4
        self.assertEqual((t.state, t.result, t.progress), (RUNNING, "", 0))
        self.assertIs(self.manager.get(t.id), t)
        self.clock.advance(3)
        t.set_progress(40)
        t.set_progress(40)  # no change: no event
        t.set_progress(72.9)
        done = t.when_done()
        self.clock.advance(2)
        op.callback("migrated")
        status = yield done
        self.assertEqual(status.vdsm(), {
            "taskID": t.id, "taskState": FINISHED, "taskResult": SUCCESS, "code": 0,
            "message": "1 jobs completed successfully", "progress": 100})
        self.assertEqual(t.outcome, "migrated")
        self.assertEqual(self.states(t.id), [
            (RUNNING, "", 0), (RUNNING, "", 40), (RUNNING, "", 72), (FINISHED, SUCCESS, 100)])
        last = self.events[-1][1][t.id]
        self.assertEqual((last["verb"], last["kind"], last["vmId"]), ("migrate", "migration", VM))
        self.assertEqual((status.created, status.updated), (1000, 1005))
        t.set_progress(10)  # ignored once finished
        self.assertEqual(len(self.states(t.id)), 4)
        yield self.manager.flush()
        rec = self.records()[t.id]
        self.assertEqual((rec["state"], rec["result"], rec["progress"], rec["vm_id"],
                          rec["params"]), (FINISHED, SUCCESS, 100, VM, {"dst": "10.0.0.2:54321"}))

    @defer.inlineCallbacks
    def test_failures_carry_the_code_and_message(self):
        api_fail = self.manager.start("migration", "migrate",
                                      lambda t: defer.fail(errors.NoSuchVM("gone")))
        bug = self.manager.start("copy", "copy", lambda t: defer.fail(OSError(28, "No space")))

        def raises(t):
            raise RuntimeError("at once")
        sync = self.manager.start("copy", "copy", raises)
        self.assertEqual(len(self.flushLoggedErrors(OSError, RuntimeError)), 2)
        s = api_fail.snapshot()
        self.assertEqual((s.state, s.result, s.code, s.message), (FINISHED, FAILURE, 1, "gone"))
        s = bug.snapshot()
        self.assertEqual((s.state, s.result, s.code), (FINISHED, FAILURE, 100))
        self.assertIn("OSError", s.message)
        self.assertIn("No space", s.message)
        self.assertEqual(sync.snapshot().message, "RuntimeError: at once")
        self.assertEqual(self.states(bug.id), [(RUNNING, "", 0), (FINISHED, FAILURE, 0)])
        yield self.manager.flush()
        self.assertEqual(self.records()[api_fail.id]["code"], 1)

    def test_bad_progress_and_bad_ids_are_refused(self):
        t = self.manager.start("copy", "copy", lambda t: defer.Deferred())
        for bad in (-1, 101, "50", True, None):
            self.assertRaises(ValueError, t.set_progress, bad)
        self.assertEqual(t.progress, 0)
        with self.assertRaises(TaskExists) as e:
            self.manager.start("copy", "copy", lambda t: None, task_id=t.id.upper())
        self.assertEqual(e.exception.code, 405)
        self.assertRaises(errors.InvalidParams, self.manager.start, "copy", "copy",
                          lambda t: None, task_id="../etc/passwd")
        for unknown in (str(uuid.uuid4()), "not-a-uuid", None):
            with self.assertRaises(UnknownTask) as e:
                self.manager.get(unknown)
            self.assertEqual((e.exception.code, e.exception.name), (401, "Task id unknown"))
        given = str(uuid.uuid4())
        self.assertEqual(self.manager.start("copy", "copy", lambda t: None, task_id=given).id,
                         given)
        return self.manager.flush()


class StopAndClearTests(_Base):
    def _cancellable(self, cancelled=None):
        """A runner like a migration: on_stop asks the operation to cancel."""
        op = defer.Deferred()
        calls = []

        def migrate_cancel(t):
            calls.append(t.id)
            self.clock.callLater(1, op.errback, cancelled or defer.CancelledError())
            return {"status": {"code": 0}}

        def run(t):
            t.on_stop = migrate_cancel
            return op
        return run, op, calls

    @defer.inlineCallbacks
    def test_stop_calls_the_stop_callback_and_ends_aborted(self):
        run, op, calls = self._cancellable()
        t = self.manager.start("migration", "migrate", run, vm_id=VM)
        t.set_progress(30)
        yield self.manager.stop(t.id)
        self.assertEqual(calls, [t.id])
        self.assertEqual(t.state, ABORTING)
        yield self.manager.stop(t.id)  # already aborting: nothing more
        self.assertEqual(calls, [t.id])
        self.clock.advance(1)
        s = t.snapshot()
        self.assertEqual((s.state, s.result, s.code, s.message),
                         (FINISHED, ABORTED, 411, "Task is aborted"))
        self.assertEqual(self.states(t.id), [
            (RUNNING, "", 0), (RUNNING, "", 30), (ABORTING, "", 30), (FINISHED, ABORTED, 30)])
        with self.assertRaises(TaskStateError) as e:
            self.manager.stop(t.id)
        self.assertEqual(e.exception.code, 410)
        yield self.manager.flush()
        self.assertEqual(self.records()[t.id]["result"], ABORTED)

    @defer.inlineCallbacks
    def test_stop_reason_and_completion_before_the_stop(self):
        run, op, _ = self._cancellable(errors.ApiError("migration cancelled by the user"))
        t = self.manager.start("migration", "migrate", run)
        yield self.manager.stop(t.id)
        self.clock.advance(1)
        self.assertEqual(t.message, "Task is aborted: migration cancelled by the user")
        # The operation completed before the cancel took: the task succeeded.
        op2 = defer.Deferred()

        def run2(t):
            t.on_stop = lambda t: None
            return op2
        t2 = self.manager.start("migration", "migrate", run2)
        yield self.manager.stop(t2.id)
        op2.callback(None)
        self.assertEqual((t2.state, t2.result), (FINISHED, SUCCESS))
        yield self.manager.flush()

    @defer.inlineCallbacks
    def test_stop_refused(self):
        t = self.manager.start("copy", "copy", lambda t: defer.Deferred())
        with self.assertRaises(TaskStateError) as e:
            self.manager.stop(t.id)  # no stop callback
        self.assertIn("cannot be stopped", e.exception.message)
        self.assertEqual(t.state, RUNNING)

        def run(t):
            t.on_stop = lambda t: defer.fail(errors.ApiError("VM is not migrating"))
            return defer.Deferred()
        t2 = self.manager.start("migration", "migrate", run)
        with self.assertRaises(errors.ApiError):
            yield self.manager.stop(t2.id)
        # The operation goes on: the task says so instead of staying "aborting".
        self.assertEqual((t2.state, t2.stop_requested), (RUNNING, False))
        self.assertEqual(self.states(t2.id), [(RUNNING, "", 0), (ABORTING, "", 0),
                                              (RUNNING, "", 0)])
        self.assertRaises(UnknownTask, self.manager.stop, str(uuid.uuid4()))
        yield self.manager.flush()

    @defer.inlineCallbacks
    def test_clear_rules(self):
        op = defer.Deferred()
        t = self.manager.start("copy", "copy", lambda t: op)
        with self.assertRaises(TaskStateError) as e:
            self.manager.clear(t.id)
        self.assertEqual(e.exception.code, 410)
        self.assertIn("running", e.exception.message)
        self.assertEqual([x.id for x in self.manager.tasks()], [t.id])
        op.callback(None)
        yield self.manager.flush()
        self.assertIn(t.id, self.records())
        n_events = len(self.events)
        yield self.manager.clear(t.id)
        self.assertEqual(self.manager.tasks(), [])
        self.assertEqual(self.records(), {})
        self.assertEqual(len(self.events), n_events)
        self.assertRaises(UnknownTask, self.manager.clear, t.id)


class RestartTests(_Base):
    def restarted(self):
        """A new agent on the same run directory."""
        self.events = []
        bus = EventBus(clock=lambda: 6.0)
        bus.add_sink(lambda method, params: self.events.append((method, params)))
        return TaskManager(self.store, bus, clock=task.Clock())

    @defer.inlineCallbacks
    def test_finished_kept_running_resumed_or_failed(self):
        m = self.manager
        done = m.start("copy", "copy", lambda t: None)
        failed = m.start("copy", "copy", lambda t: defer.fail(errors.NoSuchVM("gone")))
        resumable = m.start("migration", "migrate", lambda t: defer.Deferred(), vm_id=VM,
                            params={"dst": "h:1"})
        resumable.set_progress(55)
        gone = m.start("migration", "migrate", lambda t: defer.Deferred(), params={"dst": "x"})
        orphan = m.start("copy", "copy", lambda t: defer.Deferred())
        yield m.flush()

        m2 = self.restarted()
        reattached = defer.Deferred()
        seen = []

        def resume_migration(t):
            seen.append((t.id, t.state, t.resumed_from, t.progress, t.params))
            if t.params["dst"] == "x":
                return None  # QEMU no longer migrates: nothing to follow
            t.set_running()
            return reattached
        m2.register_resumer("migration", resume_migration)
        recovered = yield m2.recover()
        self.assertTrue(m2.recovered)
        self.assertEqual({t.id for t in recovered},
                         {done.id, failed.id, resumable.id, gone.id, orphan.id})
        self.assertEqual(sorted(seen), sorted([
            (resumable.id, RECOVERING, "upgrade", 55, {"dst": "h:1"}),
            (gone.id, RECOVERING, "upgrade", 0, {"dst": "x"})]))
        # Finished tasks come back as they were.
        self.assertEqual(m2.get(done.id).snapshot().vdsm(), done.snapshot().vdsm())
        self.assertEqual(m2.get(failed.id).snapshot().vdsm(), failed.snapshot().vdsm())
        # Nobody follows these any more: they end, the engine does not wait forever.
        for t in (gone, orphan):
            s = m2.get(t.id).snapshot()
            self.assertEqual((s.state, s.result, s.code, s.message),
                             (FINISHED, FAILURE, 100, INTERRUPTED_MESSAGE))
            self.assertEqual(self.states(t.id)[-2:], [(RECOVERING, "", s.progress),
                                                      (FINISHED, FAILURE, s.progress)])
        r = m2.get(resumable.id)
        self.assertEqual((r.state, r.vm_id), (RUNNING, VM))
        self.assertEqual(self.states(resumable.id), [(RECOVERING, "", 55), (RUNNING, "", 55)])
        reattached.callback(None)
        self.assertEqual((r.state, r.result), (FINISHED, SUCCESS))
        yield m2.flush()
        records = self.records()
        self.assertEqual(records[resumable.id]["result"], SUCCESS)
        self.assertEqual(records[orphan.id]["message"], INTERRUPTED_MESSAGE)
        # ...and a third agent still lists them until the engine clears them.
        m3 = self.restarted()
        yield m3.recover()
        self.assertEqual(len(m3.tasks()), 5)
        for t in m3.tasks():
            yield m3.clear(t.id)
        self.assertEqual(self.records(), {})

    @defer.inlineCallbacks
    def test_aborting_task_resumed_then_failing_ends_aborted(self):
        def run(t):
            t.on_stop = lambda t: None
            return defer.Deferred()
        t = self.manager.start("migration", "migrate", run)
        yield self.manager.stop(t.id)
        yield self.manager.flush()
        m2 = self.restarted()
        m2.register_resumer("migration", lambda t: defer.fail(defer.CancelledError()))
        yield m2.recover()
        self.assertEqual((m2.get(t.id).result, m2.get(t.id).code), (ABORTED, 411))
        yield m2.flush()

    @defer.inlineCallbacks
    def test_bad_records_and_other_boots(self):
        task_dir = os.path.join(self.dir, STATE_KIND)
        os.makedirs(task_dir, exist_ok=True)
        good = self.manager.start("migration", "migrate", lambda t: defer.Deferred())
        yield self.manager.flush()
        record = self.records()[good.id]
        # A well-formed document with nonsense inside: refused and removed.
        bad_id = str(uuid.uuid4())
        with open(os.path.join(task_dir, bad_id + ".json"), "wb") as f:
            f.write(encode(STATE_KIND, bad_id, dict(record, id=bad_id, state="dancing")))
        # A running task written before a reboot: nothing survived it.
        old_id = str(uuid.uuid4())
        with open(os.path.join(task_dir, old_id + ".json"), "wb") as f:
            f.write(encode(STATE_KIND, old_id, dict(record, id=old_id),
                           writer=Writer(pid=1, start_time=5, boot_id="another-boot")))
        m2 = self.restarted()
        calls = []
        m2.register_resumer("migration", lambda t: calls.append(t.id) or defer.Deferred())
        yield m2.recover()
        self.assertEqual(calls, [good.id])
        self.assertEqual(m2.get(old_id).message, INTERRUPTED_MESSAGE)
        self.assertRaises(UnknownTask, m2.get, bad_id)
        yield m2.flush()
        self.assertNotIn(bad_id, self.records())
        self.assertEqual(json.loads(json.dumps(self.records()[old_id]))["result"], FAILURE)

    @defer.inlineCallbacks
    def test_a_task_started_before_recover_wins(self):
        t = self.manager.start("copy", "copy", lambda t: defer.Deferred(), task_id=VM)
        yield self.manager.flush()
        m2 = self.restarted()
        op = defer.Deferred()
        again = m2.start("copy", "copy", lambda t: op, task_id=VM)
        recovered = yield m2.recover()
        self.assertEqual(recovered, [])
        self.assertIs(m2.get(t.id), again)
        self.assertEqual(again.state, RUNNING)
        op.callback(None)
        yield m2.flush()


class ApiTests(_Base):
    def setUp(self):
        super().setUp()
        self.api = Api([TaskApi(self.manager), HostTaskApi(self.manager)])

    def call(self, name, params=None):
        return self.api.call(name, params, CTX)

    @defer.inlineCallbacks
    def check_error(self, name, params, code, text=None):
        try:
            yield self.call(name, params)
        except errors.ApiError as e:
            self.assertEqual(e.code, code, e.message)
            if text:
                self.assertIn(text, e.message)
        else:
            self.fail(f"{name}({params}) did not fail")

    @defer.inlineCallbacks
    def test_verbs(self):
        yield self.check_error("Host.getAllTasksStatuses", {}, 99)
        yield self.check_error("Task.getStatus", {"taskID": VM}, 99)
        yield self.manager.recover()
        self.assertEqual((yield self.call("Host.getAllTasksStatuses")), {})

        op = defer.Deferred()

        def run(t):
            t.on_stop = lambda t: self.clock.callLater(0, op.errback, defer.CancelledError())
            return op
        t = self.manager.start("migration", "migrate", run, vm_id=VM)
        t.set_progress(12)
        status = yield self.call("Task.getStatus", {"taskID": t.id.upper()})
        self.assertEqual(status, {"taskID": t.id, "taskState": RUNNING, "taskResult": "",
                                  "code": 0, "message": "", "progress": 12})
        self.assertEqual((yield self.call("Host.getAllTasksStatuses", [])), {t.id: status})
        self.assertEqual((yield self.call("Host.getAllTasksInfo")),
                         {t.id: {"id": t.id, "verb": "migrate"}})
        yield self.check_error("Task.clear", {"taskID": t.id}, 410, "running")
        self.assertIs((yield self.call("Task.stop", [t.id])), True)
        self.assertEqual((yield self.call("Task.getStatus", {"taskID": t.id}))["taskState"],
                         ABORTING)
        self.clock.advance(0)
        status = yield self.call("Task.getStatus", {"taskID": t.id})
        self.assertEqual((status["taskState"], status["taskResult"], status["code"]),
                         (FINISHED, ABORTED, 411))
        yield self.check_error("Task.stop", {"taskID": t.id}, 410)
        self.assertIs((yield self.call("Task.clear", {"taskID": t.id})), True)
        yield self.check_error("Task.getStatus", {"taskID": t.id}, 401, "Task id unknown")
        self.assertEqual((yield self.call("Host.getAllTasksInfo")), {})

    @defer.inlineCallbacks
    def test_bad_params_and_unknown_ids(self):
        yield self.manager.recover()
        for name in ("Task.getStatus", "Task.stop", "Task.clear"):
            yield self.check_error(name, {}, -32602, "missing parameter 'taskID'")
            yield self.check_error(name, {"taskID": "nope"}, -32602, "uuid")
            yield self.check_error(name, {"taskID": 7}, -32602)
            yield self.check_error(name, {"taskID": VM, "extra": 1}, -32602, "unknown")
            yield self.check_error(name, {"taskID": VM}, 401, VM)
        yield self.check_error("Host.getAllTasksInfo", {"verbose": True}, -32602)

    @defer.inlineCallbacks
    def test_the_json_rpc_wire(self):
        yield self.manager.recover()
        server = JsonRpcServer(self.api, 10)
        t = self.manager.start("copy", "copy", lambda t: None)
        body = json.dumps([
            {"jsonrpc": "2.0", "id": 1, "method": "Task.getStatus", "params": {"taskID": VM}},
            {"jsonrpc": "2.0", "id": 2, "method": "Host.getAllTasksStatuses", "params": {}},
            {"jsonrpc": "2.0", "id": 3, "method": "Task.clear", "params": {"taskID": t.id}},
        ]).encode()
        answers = {r["id"]: r for r in json.loads((yield server.handle(body, CTX)))}
        self.assertEqual(answers[1]["error"], {"code": 401, "message": f"Task id unknown: {VM}"})
        self.assertEqual(answers[2]["result"][t.id]["taskResult"], SUCCESS)
        self.assertIs(answers[3]["result"], True)
        yield self.manager.flush()
