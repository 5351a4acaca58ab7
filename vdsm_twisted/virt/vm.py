"""
What every driver's VM shares: identity, status, exit information, events and
the dictionaries the engine reads (VDSM's shapes, PROTOCOL.md).
"""

from __future__ import annotations

import time
from typing import Any

from twisted.logger import Logger

from vdsm_twisted.api.events import EventBus, vdsm_time_ms
from vdsm_twisted.virt import status as st


class VmBase:
    log = Logger()

    def __init__(self, vm_id: str, domain: Any, params: dict, bus: EventBus):
        self.id = vm_id
        self.domain = domain
        #: vmParams as the engine sent them (the xml is kept in the domain).
        self.params = {k: v for k, v in params.items() if k != "xml"}
        self.bus = bus
        self.status = st.WAIT_FOR_LAUNCH
        self.status_time = vdsm_time_ms()
        self.started_at = time.monotonic()
        self.exit_code: int | None = None
        self.exit_message: str | None = None
        self.exit_reason: int | None = None
        self.pid: int | None = None
        #: Filled by the stats sampler; the API reads it and never waits.
        self.stats: dict = {}
        self.monitor_responsive = True

    # -- status
    def set_status(self, new: str) -> None:
        if new == self.status:
            return
        self.log.info("VM {vm} ({name}): {old} -> {new}", vm=self.id, name=self.domain.name,
                      old=self.status, new=new)
        self.status = new
        self.status_time = vdsm_time_ms()
        self.status_changed()
        self.bus.publish(f"|virt|VM_status|{self.id}", {self.id: self.status_event()})

    def status_changed(self) -> None:
        """Hook for drivers: persist state on every change."""

    def set_down(self, reason: int, message: str | None = None, code: int | None = None) -> None:
        self.exit_reason = reason
        self.exit_message = message or st.ExitReason.MESSAGES.get(reason, "")
        if code is None:
            code = 0 if reason in (st.ExitReason.SUCCESS, st.ExitReason.ADMIN_SHUTDOWN,
                                   st.ExitReason.USER_SHUTDOWN, st.ExitReason.MIGRATION_SUCCEEDED,
                                   st.ExitReason.SAVE_STATE_SUCCEEDED) else 1
        self.exit_code = code
        self.set_status(st.DOWN)

    @property
    def is_down(self) -> bool:
        return self.status == st.DOWN

    # -- the engine's views
    def status_event(self) -> dict:
        event = {"status": self.status, "statusTime": str(self.status_time), "vmId": self.id}
        if self.is_down:
            event.update(self.exit_info())
        return event

    def exit_info(self) -> dict:
        return {"exitCode": self.exit_code, "exitMessage": self.exit_message,
                "exitReason": self.exit_reason}

    def elapsed(self) -> int:
        return int(time.monotonic() - self.started_at)

    def display_info(self) -> list[dict]:
        return []

    def definition(self) -> dict:
        """The VM as the engine defined it, with its live status (getVMFullList)."""
        d = self.domain
        info = dict(self.params)
        info.update({
            "vmId": self.id, "vmName": d.name, "status": self.status,
            "memSize": d.memory_kib // 1024, "smp": str(d.vcpus),
            "vmType": "kvm", "kvmEnable": "true", "xml": d.xml,
            "pid": str(self.pid or 0), "elapsedTime": str(self.elapsed()),
            "statusTime": str(self.status_time), "displayInfo": self.display_info(),
        })
        if self.is_down:
            info.update(self.exit_info())
        return info

    def get_stats(self) -> dict:
        """Stats from the sampler's cache plus the live status (getStats)."""
        stats = {"vmId": self.id, "vmName": self.domain.name, "status": self.status,
                 "statusTime": str(self.status_time), "elapsedTime": str(self.elapsed()),
                 "pid": str(self.pid or 0), "vcpuCount": str(self.domain.vcpus),
                 "displayInfo": self.display_info(),
                 "monitorResponse": "0" if self.monitor_responsive else "-1"}
        if self.is_down:
            stats.update(self.exit_info())
            return stats
        stats.update(self.stats)
        return stats
