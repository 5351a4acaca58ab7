"""
Asynchronous tasks, as VDSM's engine follows them (C{Task.getStatus},
C{Host.getAllTasksStatuses}, C{Task.stop}, C{Task.clear}).

A long operation (a migration, a hibernation, an image copy) is a I{runner}:
a function of the L{Task} returning a Deferred that fires when the operation
is over.  The manager gives it an id the engine can poll, publishes every
change as a C{|jobs|status|<taskId>} event and persists it through the
L{StateStore}, so that a task outlives the agent: after an upgrade re-exec or
a crash the finished ones are still there for the engine to read and clear,
and the running ones are handed to a I{resumer} that re-attaches the
operation QEMU kept running (or, with none, they end as failed: nobody is
watching them any more, and the engine must not wait forever).

Wire vocabulary (VDSM's):

  - C{taskState}: C{running}, C{aborting} (stop requested), C{recovering}
    (loaded after a restart, not yet re-attached or ended), C{finished}.
  - C{taskResult}: C{""} until finished, then C{success}, C{cleanSuccess}
    (stopped: the operation was aborted and rolled back, code 411
    C{Task is aborted}) or C{failure} (with the error's code and message).

Errors use VDSM's task codes: 401 C{Task id unknown}, 405 for an id already
in use, 410 C{Operation is not allowed in this task state} (clearing a task
that still runs, stopping one that has finished or cannot be stopped).
"""

from __future__ import annotations

import uuid
from typing import Any, Callable

import attr
from twisted.internet import defer
from twisted.logger import Logger
from twisted.python.failure import Failure

from vdsm_twisted.api.errors import ApiError, InvalidParams
from vdsm_twisted.state.store import StateStore

#: Kind of the task records in the state store.
STATE_KIND = "task"

# taskState
RUNNING = "running"
ABORTING = "aborting"
RECOVERING = "recovering"
FINISHED = "finished"
STATES = (RUNNING, ABORTING, RECOVERING, FINISHED)

# taskResult
PENDING = ""
SUCCESS = "success"
ABORTED = "cleanSuccess"
FAILURE = "failure"
RESULTS = (PENDING, SUCCESS, ABORTED, FAILURE)

SUCCESS_MESSAGE = "1 jobs completed successfully"
ABORTED_CODE = 411
ABORTED_MESSAGE = "Task is aborted"
INTERRUPTED_MESSAGE = "interrupted by an agent restart"
_MAX_MESSAGE = 1000


class UnknownTask(ApiError):
    code, name = 401, "Task id unknown"


class TaskExists(ApiError):
    """A task with this id is already known (VDSM's AddTaskError)."""

    code, name = 405, "TaskManager error, unable to add task"


class TaskStateError(ApiError):
    code, name = 410, "Operation is not allowed in this task state"


@attr.frozen
class TaskStatus:
    """One task as it is at one moment: what the wire and the records carry."""

    id: str
    kind: str
    verb: str
    vm_id: str | None
    state: str
    result: str
    code: int
    message: str
    progress: int
    created: float
    updated: float
    params: dict = attr.ib(factory=dict, eq=False)
    stop_requested: bool = False

    def vdsm(self) -> dict:
        """C{Task.getStatus}'s answer (VDSM's five keys, plus progress)."""
        return {"taskID": self.id, "taskState": self.state, "taskResult": self.result,
                "code": self.code, "message": self.message, "progress": self.progress}

    def info(self) -> dict:
        """One entry of C{Host.getAllTasksInfo}."""
        return {"id": self.id, "verb": self.verb}

    def event(self) -> dict:
        status = self.vdsm()
        status.update(verb=self.verb, kind=self.kind)
        if self.vm_id is not None:
            status["vmId"] = self.vm_id
        return status

    def to_record(self) -> dict:
        return attr.asdict(self)

    @classmethod
    def from_record(cls, key: str, data: dict) -> "TaskStatus":
        """Rebuild a record written by L{to_record}; ValueError when it is not one."""
        def field(name, types, check=lambda v: True):
            value = data.get(name)
            if isinstance(value, bool) and bool not in types or not isinstance(value, types) \
                    or not check(value):
                raise ValueError(f"bad or missing field {name!r}: {value!r}")
            return value

        status = cls(
            id=field("id", (str,), lambda v: v == key),
            kind=field("kind", (str,), bool),
            verb=field("verb", (str,), bool),
            vm_id=field("vm_id", (str, type(None))),
            state=field("state", (str,), lambda v: v in STATES),
            result=field("result", (str,), lambda v: v in RESULTS),
            code=field("code", (int,)),
            message=field("message", (str,)),
            progress=field("progress", (int,), lambda v: 0 <= v <= 100),
            created=field("created", (int, float)),
            updated=field("updated", (int, float)),
            params=field("params", (dict,)),
            stop_requested=field("stop_requested", (bool,)),
        )
        _task_id(status.id)
        return status


def _task_id(value: Any) -> str:
    """Task ids are uuids (the engine makes them); the canonical spelling is the key."""
    try:
        if not isinstance(value, str):
            raise TypeError(type(value).__name__)
        return str(uuid.UUID(value))
    except (TypeError, ValueError) as e:
        raise InvalidParams(f"task id must be a uuid: {e}") from None


class Task:
    """A tracked operation.  Runners report through L{set_progress} and may
    register L{on_stop}; everything else is the manager's."""

    def __init__(self, manager: "TaskManager", status: TaskStatus):
        self._manager = manager
        self.id = status.id
        self.kind = status.kind
        self.verb = status.verb
        self.vm_id = status.vm_id
        self.params = dict(status.params)
        self.created = status.created
        self.state = status.state
        self.result = status.result
        self.code = status.code
        self.message = status.message
        self.progress = status.progress
        self.updated = status.updated
        self.stop_requested = status.stop_requested
        #: Called by L{TaskManager.stop} with the task (e.g. a migration's
        #: cancel); its Deferred says whether the stop was taken, the runner's
        #: Deferred still decides how the task ends.
        self.on_stop: Callable[["Task"], Any] | None = None
        #: After a restart: "upgrade" (same process, re-exec) or "crash".
        self.resumed_from: str | None = None
        #: What the runner's Deferred fired with (kept in memory only).
        self.outcome: Any = None
        self._waiters: list[defer.Deferred] = []

    def __repr__(self) -> str:
        return f"<Task {self.id} {self.kind}/{self.verb} {self.state} {self.result!r}>"

    @property
    def finished(self) -> bool:
        return self.state == FINISHED

    def snapshot(self) -> TaskStatus:
        return TaskStatus(
            id=self.id, kind=self.kind, verb=self.verb, vm_id=self.vm_id, state=self.state,
            result=self.result, code=self.code, message=self.message, progress=self.progress,
            created=self.created, updated=self.updated, params=dict(self.params),
            stop_requested=self.stop_requested)

    def set_progress(self, percent: int | float) -> None:
        """Report progress (0-100); ignored once the task has finished."""
        if isinstance(percent, bool) or not isinstance(percent, (int, float)) \
                or not 0 <= percent <= 100:
            raise ValueError(f"progress must be a number in 0..100, got {percent!r}")
        percent = int(percent)
        if self.finished or percent == self.progress:
            return
        self.progress = percent
        self._manager._changed(self)

    def set_running(self) -> None:
        """For resumers: the operation is re-attached (recovering -> running)."""
        if self.state == RECOVERING:
            self.state = RUNNING
            self._manager._changed(self)

    def when_done(self) -> defer.Deferred:
        """Fires with the final L{TaskStatus} once the task has finished."""
        if self.finished:
            return defer.succeed(self.snapshot())
        d = defer.Deferred()
        self._waiters.append(d)
        return d

    def _done(self) -> None:
        waiters, self._waiters = self._waiters, []
        status = self.snapshot()
        for d in waiters:
            d.callback(status)


Runner = Callable[[Task], Any]
Resumer = Callable[[Task], Any]


class TaskManager:
    """Runs, tracks, persists and recovers L{Task}s."""

    log = Logger()

    def __init__(self, store: StateStore, bus, clock=None):
        if clock is None:
            from twisted.internet import reactor as clock
        self._store = store
        self._bus = bus
        self._clock = clock
        self._tasks: dict[str, Task] = {}
        self._resumers: dict[str, Resumer] = {}
        self._writes: set[defer.Deferred] = set()
        #: True once L{recover} has loaded the records: before that an empty
        #: list would wrongly tell the engine its tasks are gone.
        self.recovered = False

    # -- queries
    def get(self, task_id: str) -> Task:
        try:
            return self._tasks[_task_id(task_id)]
        except (KeyError, InvalidParams):
            raise UnknownTask(f"Task id unknown: {task_id}") from None

    def tasks(self) -> list[Task]:
        return sorted(self._tasks.values(), key=lambda t: (t.created, t.id))

    # -- lifecycle
    def start(self, kind: str, verb: str, run: Runner, vm_id: str | None = None,
              task_id: str | None = None, params: dict | None = None) -> Task:
        """Track C{run(task)}; the task is running (and announced) before it is called.

        An exception raised by C{run} itself ends the task as failed; it is not
        raised here (check preconditions before starting).
        """
        if not kind or not verb:
            raise ValueError("a task needs a kind and a verb")
        task_id = _task_id(task_id) if task_id is not None else str(uuid.uuid4())
        if task_id in self._tasks:
            raise TaskExists(f"task {task_id} already exists")
        if params is not None and not isinstance(params, dict):
            raise InvalidParams("task params must be an object")
        now = self._clock.seconds()
        task = Task(self, TaskStatus(
            id=task_id, kind=kind, verb=verb, vm_id=vm_id, state=RUNNING, result=PENDING,
            code=0, message="", progress=0, created=now, updated=now, params=dict(params or {})))
        self._tasks[task_id] = task
        self.log.info("task {id}: {kind}/{verb} started (vm {vm})",
                      id=task_id, kind=kind, verb=verb, vm=vm_id)
        self._changed(task)
        self._attach(task, defer.maybeDeferred(run, task))
        return task

    def stop(self, task_id: str) -> defer.Deferred:
        """Ask the runner to abort (its C{on_stop}); the task moves to aborting."""
        task = self.get(task_id)
        if task.finished:
            raise TaskStateError(f"task {task.id} has already finished")
        if task.state == ABORTING:
            return defer.succeed(None)
        if task.on_stop is None:
            raise TaskStateError(f"task {task.id} ({task.verb}) cannot be stopped")
        previous = task.state
        task.state = ABORTING
        task.stop_requested = True
        self._changed(task)
        self.log.info("task {id}: stop requested", id=task.id)

        def refused(failure):
            # The operation goes on: say so rather than stay "aborting".
            if task.state == ABORTING:
                task.state = previous
                task.stop_requested = False
                self._changed(task)
            self.log.warn("task {id}: stop failed: {e}", id=task.id, e=failure.getErrorMessage())
            return failure

        return defer.maybeDeferred(task.on_stop, task).addCallbacks(lambda _: None, refused)

    def clear(self, task_id: str) -> defer.Deferred:
        """Forget a finished task and its record."""
        task = self.get(task_id)
        if not task.finished:
            raise TaskStateError(
                f"task {task.id} is {task.state}: stop it or wait until it finishes "
                "before clearing it")
        del self._tasks[task.id]
        self.log.info("task {id}: cleared", id=task.id)
        return self._track(self._store.remove(STATE_KIND, task.id))

    # -- restart
    def register_resumer(self, kind: str, resumer: Resumer) -> None:
        """C{resumer(task)} re-attaches a C{kind} task found running after a
        restart; it returns the Deferred of the operation's end, or None when
        there is nothing left to follow (the task then fails)."""
        self._resumers[kind] = resumer

    def recover(self) -> defer.Deferred:
        """Load the records; fires with the recovered tasks once their new
        states are written.  Tasks already known (started meanwhile) win."""
        # load_all deletes *.json.tmp.* files as leftovers of a crash: our own
        # writes in flight must have landed first.
        return self.flush().addCallback(lambda _: self._load())

    def _load(self) -> defer.Deferred:
        docs, refused = self._store.load_all(STATE_KIND)
        recovered = []
        were_running = 0
        for doc in docs:
            try:
                status = TaskStatus.from_record(doc.key, doc.data)
            except (ValueError, ApiError) as e:
                self.log.warn("task record {key} refused and removed: {e}", key=doc.key, e=str(e))
                self._track(self._store.remove(STATE_KIND, doc.key))
                continue
            if status.id in self._tasks:
                continue
            task = Task(self, status)
            self._tasks[task.id] = task
            recovered.append(task)
            if task.finished:
                continue
            were_running += 1
            task.resumed_from = "upgrade" if doc.same_process else "crash"
            task.state = RECOVERING
            self._changed(task)
            # Nothing a task followed survives a reboot: no resumer then.
            self._resume(task, self._resumers.get(task.kind) if doc.same_boot else None)
        self.recovered = True
        self.log.info("tasks recovered: {n} ({running} were running); {bad} record(s) refused",
                      n=len(recovered), running=were_running, bad=len(refused))
        return self.flush().addCallback(lambda _: recovered)

    def _resume(self, task: Task, resumer: Resumer | None) -> None:
        d = None
        if resumer is not None:
            try:
                d = resumer(task)
            except Exception:
                self.log.failure("task {id}: resuming failed", id=task.id)
                d = None
        if d is None:
            self.log.warn("task {id}: {kind}/{verb} {why}", id=task.id, kind=task.kind,
                          verb=task.verb, why=INTERRUPTED_MESSAGE)
            self._finish(task, FAILURE, 100, INTERRUPTED_MESSAGE)
            return
        self.log.info("task {id}: re-attached after {how}", id=task.id, how=task.resumed_from)
        self._attach(task, d if isinstance(d, defer.Deferred) else defer.succeed(d))

    # -- persistence
    def flush(self) -> defer.Deferred:
        """Fires once every record write issued so far has landed."""
        return defer.DeferredList(list(self._writes)).addCallback(lambda _: None)

    def persist_now(self) -> None:
        """Blocking write of every task, for the moment just before an exec."""
        for task in self._tasks.values():
            self._store.save_now(STATE_KIND, task.id, task.snapshot().to_record())

    # -- internals
    def _attach(self, task: Task, d: defer.Deferred) -> None:
        d.addCallbacks(self._succeeded, self._failed, callbackArgs=(task,), errbackArgs=(task,))
        d.addErrback(lambda f: self.log.failure("task {id}: bookkeeping failed", f, id=task.id))

    def _succeeded(self, outcome, task: Task) -> None:
        task.outcome = outcome
        task.progress = 100
        self._finish(task, SUCCESS, 0, SUCCESS_MESSAGE)

    def _failed(self, failure: Failure, task: Task) -> None:
        reason = _short(failure.getErrorMessage())
        if failure.check(defer.CancelledError) or task.stop_requested:
            message = ABORTED_MESSAGE if failure.check(defer.CancelledError) or not reason \
                else f"{ABORTED_MESSAGE}: {reason}"
            self._finish(task, ABORTED, ABORTED_CODE, message)
        elif failure.check(ApiError):
            self._finish(task, FAILURE, failure.value.code, _short(failure.value.message))
        else:
            self.log.failure("task {id}: {kind}/{verb} failed", failure,
                             id=task.id, kind=task.kind, verb=task.verb)
            self._finish(task, FAILURE, 100, _short(f"{failure.type.__name__}: {reason}"))

    def _finish(self, task: Task, result: str, code: int, message: str) -> None:
        if task.finished:
            return
        task.state = FINISHED
        task.result = result
        task.code = code
        task.message = message
        self.log.info("task {id}: finished: {result} ({code}) {message}",
                      id=task.id, result=result, code=code, message=message)
        self._changed(task)
        task._done()

    def _changed(self, task: Task) -> None:
        task.updated = self._clock.seconds()
        status = task.snapshot()
        if task.id in self._tasks:
            self._track(self._store.save(STATE_KIND, task.id, status.to_record()))
        self._bus.publish(f"|jobs|status|{task.id}", {task.id: status.event()})

    def _track(self, d: defer.Deferred) -> defer.Deferred:
        self._writes.add(d)

        def landed(result):
            self._writes.discard(d)
            if isinstance(result, Failure):
                self.log.failure("task record write failed", result)
            return None

        return d.addBoth(landed)


def _short(text: str) -> str:
    return text if len(text) <= _MAX_MESSAGE else text[:_MAX_MESSAGE - 3] + "..."
