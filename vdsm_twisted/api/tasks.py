"""
The C{Task} namespace and the task verbs of C{Host}, over a L{TaskManager}.

Results are what VDSM's JSON-RPC bridge puts on the wire: the engine's
client wraps them itself under C{taskStatus}, C{allTasksStatus} and
C{allTasksInfo}, so they are sent unwrapped (C{Task.getStatus} answers the
status object, C{Host.getAllTasksStatuses} the C{{taskId: status}} map).

Until the manager has loaded its records after a restart every verb answers
code 99: an empty list then would tell the engine its tasks were lost.
"""

from __future__ import annotations

from twisted.internet import defer
from zope.interface import implementer

from vdsm_twisted.api import errors
from vdsm_twisted.api.registry import IApiNamespace
from vdsm_twisted.tasks.manager import TaskManager


def _ready(manager: TaskManager) -> TaskManager:
    if not manager.recovered:
        raise errors.RecoveryInProgress("Recovering from crash or Initializing: "
                                        "tasks are not loaded yet")
    return manager


@implementer(IApiNamespace)
class TaskApi:
    namespace = "Task"

    def __init__(self, manager: TaskManager):
        self.manager = manager

    def getStatus(self, taskID: str) -> dict:
        return _ready(self.manager).get(taskID).snapshot().vdsm()

    def stop(self, taskID: str) -> defer.Deferred:
        return _ready(self.manager).stop(taskID).addCallback(lambda _: True)

    def clear(self, taskID: str) -> defer.Deferred:
        return _ready(self.manager).clear(taskID).addCallback(lambda _: True)


@implementer(IApiNamespace)
class HostTaskApi:
    """The C{Host} verbs about tasks (the rest of C{Host} lives elsewhere)."""

    namespace = "Host"

    def __init__(self, manager: TaskManager):
        self.manager = manager

    def getAllTasksStatuses(self) -> dict:
        return {t.id: t.snapshot().vdsm() for t in _ready(self.manager).tasks()}

    def getAllTasksInfo(self) -> dict:
        return {t.id: t.snapshot().info() for t in _ready(self.manager).tasks()}
