"""
The C{Host} namespace: what this host is, how busy it is, which VMs it runs.

Parameters arrive validated against L{vdsm_twisted.api.schema}; the verbs
answer from caches (capabilities collected once, stats sampled in the
background), so none of them makes the engine wait on the system.
"""

from __future__ import annotations

from typing import Callable

from twisted.internet import defer
from zope.interface import implementer

from vdsm_twisted.api import errors
from vdsm_twisted.api.registry import IApiNamespace
from vdsm_twisted.host.caps import CapabilitiesCache
from vdsm_twisted.host.stats import HostStatsSampler


@implementer(IApiNamespace)
class HostApi:
    """Host verbs.

    C{vm_list} returns the VM driver's VMs as VDSM's full status dicts (each
    with at least C{vmId} and C{status}), or a Deferred of that list; without
    a driver there are no VMs.
    """

    namespace = "Host"

    def __init__(self, capabilities: CapabilitiesCache, sampler: HostStatsSampler,
                 vm_list: Callable[[], list] | None = None):
        self._capabilities = capabilities
        self._sampler = sampler
        self._vm_list = vm_list

    def ping2(self) -> bool:
        return True

    def getCapabilities(self) -> defer.Deferred:
        return self._capabilities.get()

    def getStats(self) -> dict:
        return self._sampler.snapshot()

    def getVMList(self, fullStatus: bool = False, vmList=(), onlyUUID: bool = False):
        for vm_id in vmList:
            if not isinstance(vm_id, str):
                raise errors.InvalidParams(
                    f"parameter 'vmList': expected VM ids (strings), got {vm_id!r}")
        d = defer.maybeDeferred(self._vm_list) if self._vm_list is not None \
            else defer.succeed([])
        d.addCallback(_select, set(vmList), fullStatus, onlyUUID)
        return d


def _select(vms: list, wanted: set, full: bool, only_uuid: bool) -> list:
    if wanted:
        vms = [vm for vm in vms if vm["vmId"] in wanted]
    if only_uuid:
        return [vm["vmId"] for vm in vms]
    if full:
        return [dict(vm) for vm in vms]
    return [{"vmId": vm["vmId"], "status": vm["status"]} for vm in vms]
