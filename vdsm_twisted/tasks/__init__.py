"""
Asynchronous tasks: long operations (migration, hibernation, image copies)
that answer the engine at once and are then followed by task id.

See L{vdsm_twisted.tasks.manager}; the API verbs are in
L{vdsm_twisted.api.tasks}.
"""

from vdsm_twisted.tasks.manager import (
    ABORTED, FAILURE, SUCCESS, Task, TaskExists, TaskManager, TaskStateError, TaskStatus,
    UnknownTask)

__all__ = ["ABORTED", "FAILURE", "SUCCESS", "Task", "TaskExists", "TaskManager",
           "TaskStateError", "TaskStatus", "UnknownTask"]
