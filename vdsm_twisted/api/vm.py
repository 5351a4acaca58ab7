"""
The C{VM} namespace and the VM-related C{Host} verbs, over an L{IVmDriver}.

Verbs only translate between VDSM's parameters/results and the driver; they
never wait on QEMU for reads (stats come from the sampler's cache).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer
from zope.interface import implementer

from vdsm_twisted.api import errors
from vdsm_twisted.api.registry import IApiNamespace
from vdsm_twisted.virt import domxml


def _seconds(value: Any, name: str, default: float) -> float:
    if value is None or value == "":
        return default
    try:
        seconds = float(value)
    except (TypeError, ValueError):
        raise errors.InvalidParams(f"parameter {name!r}: expected a number of seconds") from None
    if not 0 <= seconds <= 86400:
        raise errors.InvalidParams(f"parameter {name!r}: out of range 0..86400")
    return seconds


@implementer(IApiNamespace)
class VmApi:
    namespace = "VM"

    def __init__(self, driver):
        self.driver = driver

    def create(self, vmID: str, vmParams: dict) -> dict:
        params = dict(vmParams)
        if "vmId" in params and params["vmId"] != vmID:
            raise errors.InvalidParams("vmParams.vmId differs from vmID")
        return self.driver.create(vmID, params)

    @defer.inlineCallbacks
    def destroy(self, vmID: str, gracefulAttempts: int = 1):
        grace = None if gracefulAttempts > 0 else 0.0
        yield self.driver.destroy(vmID, grace)
        return {"status": {"code": 0, "message": "Machine destroyed"}}

    def shutdown(self, vmID, delay=None, message=None, reboot=False, timeout=None, force=False):
        vm = self.driver.get(vmID)
        seconds = _seconds(timeout, "timeout", self.driver.shutdown_timeout)
        if message:
            vm.log.info("VM {vm}: shutdown requested: {msg}", vm=vmID, msg=str(message)[:200])
        vm.shutdown(seconds, reboot=reboot)
        return {"status": {"code": 0, "message": "Machine shutting down"}}

    def reset(self, vmID):
        return self.driver.get(vmID).reset()

    def pause(self, vmID):
        return self.driver.get(vmID).pause()

    def cont(self, vmID):
        return self.driver.get(vmID).cont()

    def getInfo(self, vmID):
        return self.driver.get(vmID).definition()

    def getStats(self, vmID):
        return [self.driver.get(vmID).get_stats()]

    def setTicket(self, vmID, password, ttl, existingConnAction="disconnect", params=None):
        actions = {"keep": "keep", "disconnect": "disconnect", "fail": "fail"}
        if existingConnAction not in actions:
            raise errors.InvalidParams("existingConnAction must be keep, disconnect or fail")
        if not 0 <= ttl <= 10 * 365 * 86400:
            raise errors.InvalidParams("ttl out of range")
        return self.driver.get(vmID).set_ticket(password, ttl, actions[existingConnAction])

    @defer.inlineCallbacks
    def hibernate(self, vmID, hiberVolHandle):
        path = hiberVolHandle.get("path") if isinstance(hiberVolHandle, dict) else hiberVolHandle
        if not isinstance(path, str) or not path:
            raise errors.InvalidParams("hiberVolHandle must be a path or {\"path\": ...}")
        yield self.driver.hibernate(vmID, path)
        return {"status": {"code": 0, "message": "Hibernation process done"}}

    def migrate(self, vmID, params):
        return self.driver.migrate(vmID, params)

    def migrationCreate(self, vmID, params, incomingLimit=None):
        return self.driver.migration_create(vmID, params)

    def migrateCancel(self, vmID):
        return self.driver.migrate_cancel(vmID)

    def getMigrationStatus(self, vmID):
        return self.driver.migration_status(vmID)

    def changeCD(self, vmID, driveSpec):
        vm = self.driver.get(vmID)
        path = driveSpec.get("path") if isinstance(driveSpec, dict) else driveSpec
        if not isinstance(path, str):
            raise errors.InvalidParams("driveSpec must be a path or {\"path\": ...}")
        if path:
            try:
                path = domxml.resolve_image_path(path, self.driver.image_roots, "driveSpec")
            except domxml.DomainXMLError as e:
                raise errors.InvalidParams(str(e)) from None
        return vm.change_cd(path or None)


@implementer(IApiNamespace)
class HostVmApi:
    """The C{Host} verbs about VMs (the rest of C{Host} is L{HostApi})."""

    namespace = "Host"

    def __init__(self, driver):
        self.driver = driver

    def _select(self, vm_list):
        if not vm_list:
            return self.driver.list()
        if not all(isinstance(v, str) for v in vm_list):
            raise errors.InvalidParams("vmList must hold VM ids")
        return [vm for vm in self.driver.list() if vm.id in set(vm_list)]

    def getVMFullList(self, vmList=()):
        return [vm.definition() for vm in self._select(vmList)]

    def getAllVmStats(self):
        return [vm.get_stats() for vm in self.driver.list()]

    def dumpxmls(self, vmList):
        return {vm.id: vm.domain.xml for vm in self._select(vmList) if vmList}

    def vm_list(self):
        """For L{HostApi}'s getVMList."""
        return [vm.definition() for vm in self.driver.list()]
