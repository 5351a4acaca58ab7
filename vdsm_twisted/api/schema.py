"""
The one definition of the API: every method, its parameters and their types.

Both protocols (STOMP/JSON-RPC and AMP), parameter validation and the
generated reference (C{docs/API.md}) read this table; implementations are
bound to it by name in L{vdsm_twisted.api.registry}.
"""

from __future__ import annotations

import uuid as _uuid
from typing import Any, Callable

import attr

from vdsm_twisted.api.errors import InvalidParams

_MISSING = object()


@attr.frozen
class Type:
    """A parameter type: a name for the docs and a checker for the wire."""

    name: str
    check: Callable[[Any], Any]

    def validate(self, param: str, value: Any) -> Any:
        try:
            return self.check(value)
        except (TypeError, ValueError) as e:
            raise InvalidParams(f"parameter {param!r}: expected {self.name}: {e}") from None


def _instance(*types: type, name: str) -> Type:
    def check(value):
        # bool is an int in Python; the wire distinguishes them.
        if isinstance(value, bool) and bool not in types:
            raise TypeError(f"got {type(value).__name__}")
        if not isinstance(value, types):
            raise TypeError(f"got {type(value).__name__}")
        return value
    return Type(name, check)


def _uuid_check(value):
    if not isinstance(value, str):
        raise TypeError(f"got {type(value).__name__}")
    return str(_uuid.UUID(value))


STRING = _instance(str, name="string")
INT = _instance(int, name="int")
NUMBER = _instance(int, float, name="number")
BOOL = _instance(bool, name="bool")
DICT = _instance(dict, name="object")
LIST = _instance(list, name="array")
UUID = Type("uuid", _uuid_check)
ANY = Type("any", lambda value: value)


@attr.frozen
class Param:
    name: str
    type: Type
    doc: str
    default: Any = _MISSING

    @property
    def required(self) -> bool:
        return self.default is _MISSING


@attr.frozen
class Method:
    """One API verb as VDSM names it (C{Namespace.verb})."""

    namespace: str
    verb: str
    doc: str
    params: tuple[Param, ...] = ()
    returns: str = "true"
    #: Safe to retry after a reconnect: the client library does so silently.
    idempotent: bool = False
    #: Answered while VM recovery is still running (others get code 99).
    during_recovery: bool = False

    @property
    def name(self) -> str:
        return f"{self.namespace}.{self.verb}"

    def bind_params(self, params: Any) -> dict[str, Any]:
        """Validate wire params (an object, an array, or null) into kwargs."""
        if params is None:
            params = {}
        if isinstance(params, list):
            if len(params) > len(self.params):
                raise InvalidParams(
                    f"{self.name} takes at most {len(self.params)} parameters, "
                    f"got {len(params)}")
            params = {p.name: v for p, v in zip(self.params, params)}
        if not isinstance(params, dict):
            raise InvalidParams("params must be an object or an array")
        known = {p.name for p in self.params}
        unknown = sorted(set(params) - known)
        if unknown:
            raise InvalidParams(f"{self.name}: unknown parameter(s) {', '.join(unknown)}")
        bound = {}
        for p in self.params:
            if p.name in params:
                bound[p.name] = p.type.validate(p.name, params[p.name])
            elif p.required:
                raise InvalidParams(f"{self.name}: missing parameter {p.name!r}")
            else:
                bound[p.name] = p.default
        return bound


def _m(namespace, verb, doc, *params, **kw) -> Method:
    return Method(namespace, verb, doc, tuple(params), **kw)


VM_ID = Param("vmID", UUID, "The VM's uuid.")

METHODS: tuple[Method, ...] = (
    _m("Host", "ping2", "Liveness check: answers true as soon as the agent serves.",
       idempotent=True, during_recovery=True),
    _m("Host", "getCapabilities",
       "What this host is: CPU model, flags and topology, memory, NUMA nodes, "
       "KVM availability, QEMU and libvirt versions, kernel, hostname, host uuid.",
       returns="object", idempotent=True, during_recovery=True),
    _m("Host", "getStats",
       "Host usage: CPU and memory use, load, uptime, per-NIC rx/tx rates "
       "(from the background sampler).",
       returns="object", idempotent=True, during_recovery=True),
    _m("Host", "getVMList",
       "The VMs this agent runs.",
       Param("fullStatus", BOOL, "Return full VM definitions rather than ids.", False),
       Param("vmList", LIST, "Restrict to these VM ids.", []),
       Param("onlyUUID", BOOL, "Return bare uuids (VDSM's flag).", False),
       returns="array", idempotent=True),
    _m("Host", "getVMFullList",
       "Full definitions (with live status) of the VMs this agent runs.",
       Param("vmList", LIST, "Restrict to these VM ids.", []),
       returns="array", idempotent=True),
    _m("Host", "getAllVmStats",
       "Statistics of every VM, from the background sampler's cache (never waits on QEMU).",
       returns="array", idempotent=True),
    _m("Host", "dumpxmls", "The domain XML of each requested VM.",
       Param("vmList", LIST, "VM ids."),
       returns="object {vmId: xml}", idempotent=True),

    _m("Host", "upgrade",
       "Re-exec the agent in place on the installed code, keeping every VM and the "
       "listening socket (a reload when the code did not change). Answered before "
       "the exec; clients are dropped and reconnect.",
       returns="object {status}"),

    _m("VM", "create",
       "Define and start a VM from libvirt domain XML (vmParams.xml). Answers at once "
       "with status WaitForLaunch; |virt|VM_status| events follow (Up, or Down with "
       "the reason it could not start).",
       VM_ID, Param("vmParams", DICT, "VM parameters; \"xml\" holds the domain XML."),
       returns="object (the VM definition)"),
    _m("VM", "destroy",
       "Stop the VM (QMP quit, then SIGTERM, then SIGKILL) and release it.",
       VM_ID, Param("gracefulAttempts", INT, "0 skips the graceful quit.", 1)),
    _m("VM", "shutdown",
       "Press the ACPI power button; destroy the VM if it still runs after timeout seconds.",
       VM_ID,
       Param("delay", ANY, "Accepted for VDSM compatibility (seconds, may be a string).", None),
       Param("message", ANY, "Message for the guest's users (logged).", None),
       Param("reboot", BOOL, "Reset instead of powering off.", False),
       Param("timeout", ANY, "Seconds before the fallback destroy (default: "
             "[vm] shutdown_timeout).", None),
       Param("force", BOOL, "Accepted for VDSM compatibility.", False)),
    _m("VM", "reset", "Hard reset (QMP system_reset).", VM_ID),
    _m("VM", "pause", "Pause the guest's vCPUs.", VM_ID),
    _m("VM", "cont", "Resume a paused guest.", VM_ID),
    _m("VM", "getInfo", "The VM's definition and live status.", VM_ID,
       returns="object", idempotent=True),
    _m("VM", "getStats", "The VM's statistics (cached by the sampler).", VM_ID,
       returns="array (one stats object)", idempotent=True),
    _m("VM", "setTicket", "Set the graphics console password and its lifetime.",
       VM_ID, Param("password", STRING, "The new password."),
       Param("ttl", INT, "Seconds it stays valid; 0 = no expiry."),
       Param("existingConnAction", STRING, "keep, disconnect or fail.", "disconnect"),
       Param("params", DICT, "Accepted for VDSM compatibility.", {})),
    _m("VM", "hibernate",
       "Pause the guest, save its memory and device state to a file inside the image "
       "roots, and end the VM (exitReason 5). VM.create with vmParams.restoreState = "
       "that path brings it back where it was.",
       VM_ID, Param("hiberVolHandle", ANY, "The state file's path, or {\"path\": ...}.")),
    _m("VM", "migrate",
       "Live-migrate the VM to another agent: params dst (\"host:port\" of the destination "
       "agent), dstqemu (address for QEMU's stream; default dst's host), downtime (ms), "
       "maxBandwidth (MiB/s), migrationTimeout (s: cancel if not converged). Answers at "
       "once; |virt|VM_migration_status| events report progress.",
       VM_ID, Param("params", DICT, "Migration parameters (see above).")),
    _m("VM", "migrationCreate",
       "Destination side of a migration: start QEMU waiting for the guest's state; "
       "answers with the port it listens on (migrationPort).",
       VM_ID, Param("params", DICT, "The VM definition; \"xml\" holds the domain XML."),
       Param("incomingLimit", ANY, "Accepted for VDSM compatibility.", None),
       returns="object {migrationPort, params}"),
    _m("VM", "migrateCancel", "Cancel the VM's outgoing migration; the source keeps running.",
       VM_ID),
    _m("VM", "getMigrationStatus", "Progress of the VM's outgoing migration.", VM_ID,
       returns="object {status, progress}", idempotent=True),
    _m("VM", "changeCD", "Insert a CD-ROM image (a path inside the image roots) or eject "
       "with an empty path.",
       VM_ID, Param("driveSpec", ANY, "A path, or {\"path\": ...}; \"\" ejects.")),

    # Async tasks (vdsm_twisted/api/tasks.py).  Results go unwrapped, as
    # VDSM's bridge sends them: the engine's client wraps them itself under
    # taskStatus / allTasksStatus / allTasksInfo.
    _m("Task", "getStatus",
       "State of one asynchronous task (a migration, a hibernation, an image copy): "
       "taskState is running, aborting, recovering (found running after an agent "
       "restart) or finished; taskResult is \"\" until finished, then success, "
       "cleanSuccess (stopped: aborted and rolled back, code 411) or failure (with the "
       "error's code and message). Unknown ids answer code 401.",
       Param("taskID", UUID, "The task's uuid."),
       returns="object {taskID, taskState, taskResult, code, message, progress}",
       idempotent=True),
    _m("Task", "stop",
       "Abort a running task: the operation is asked to stop (a migration is cancelled) "
       "and the task moves to aborting; it ends cleanSuccess once aborted, or success "
       "if the operation completed first. A finished task, or one that cannot be "
       "stopped, answers code 410.",
       Param("taskID", UUID, "The task's uuid.")),
    _m("Task", "clear",
       "Forget a finished task and its record. A task that has not finished answers "
       "code 410 (stop it or wait for it).",
       Param("taskID", UUID, "The task's uuid.")),
    _m("Host", "getAllTasksStatuses",
       "Status of every task this agent knows (finished ones stay until cleared, "
       "also across agent restarts).",
       returns="object {taskId: status as in Task.getStatus}", idempotent=True),
    _m("Host", "getAllTasksInfo",
       "What every known task is.",
       returns="object {taskId: {id, verb}}", idempotent=True),
)


def by_name() -> dict[str, Method]:
    return {m.name: m for m in METHODS}


def render_markdown(methods: tuple[Method, ...] = METHODS) -> str:
    """The API reference, generated from the table (docs/API.md)."""
    out = ["# vdsm-twisted API", "",
           "Generated from `vdsm_twisted/api/schema.py` "
           "(`vdsm-twisted-tool api-doc`); do not edit by hand.", "",
           "Every method is served over STOMP + JSON-RPC 2.0 (VDSM's wire) and "
           "over AMP (`Call` command) on the same TLS port.", ""]
    for namespace in sorted({m.namespace for m in methods}):
        out += [f"## {namespace}", ""]
        for m in sorted((m for m in methods if m.namespace == namespace), key=lambda m: m.verb):
            flags = []
            if m.idempotent:
                flags.append("idempotent (retried by the client library)")
            if m.during_recovery:
                flags.append("answered during recovery")
            out += [f"### `{m.name}`", "", m.doc, ""]
            if m.params:
                out += ["| parameter | type | required | default | meaning |",
                        "|---|---|---|---|---|"]
                for p in m.params:
                    default = "" if p.required else f"`{p.default!r}`"
                    out.append(f"| `{p.name}` | {p.type.name} | "
                               f"{'yes' if p.required else 'no'} | {default} | {p.doc} |")
                out.append("")
            out += [f"Returns: {m.returns}." + (f" ({'; '.join(flags)})" if flags else ""), ""]
    return "\n".join(out).rstrip() + "\n"
