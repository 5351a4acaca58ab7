"""
The qemu driver: VMs as the agent's own QEMU children (no libvirtd).

It owns the registry of VMs, turns C{VM.create}'s domain XML into a launch,
keeps each VM's state document current in the run directory, and gives the
API one place to find a VM by id.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import socket
from typing import Any, Sequence

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from vdsm_twisted.api import errors
from vdsm_twisted.virt import domxml
from vdsm_twisted.virt import status as st
from vdsm_twisted.virt.interfaces import IVmDriver
from vdsm_twisted.virt.qemu.argv import probe_spice
from vdsm_twisted.virt.qemu.vm import QemuVm

STATE_KIND = "vm"


def kvm_usable(path: str = "/dev/kvm") -> bool:
    try:
        fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


@implementer(IVmDriver)
class QemuDriver(Service):
    log = Logger()
    name = "qemu-driver"

    def __init__(self, reactor, config, bus, privd, store):
        self.reactor = reactor
        self.bus = bus
        self.privd = privd
        self.store = store
        self.vms: dict[str, QemuVm] = {}
        self.vms_dir = os.path.join(config["agent", "run_dir"], "vms")
        self.spice_available = False
        self.configure(config)

    def configure(self, config) -> None:
        """(Re)apply the [vm] settings; running VMs keep what they started with."""
        self.log_dir = config["vm", "log_dir"]
        self.image_roots: Sequence[str] = config["vm", "image_roots"]
        self.max_xml_size = config["vm", "max_xml_size"]
        binary = config["vm", "qemu_binary"]
        self.qemu_binary = shutil.which(binary) or binary
        accel = config["vm", "accel"]
        self.kvm = kvm_usable() if accel == "auto" else accel == "kvm"
        self.tap_prefix = config["vm", "tap_prefix"]
        self.destroy_grace = config["vm", "destroy_grace_timeout"]
        self.sigterm_timeout = config["vm", "sigterm_timeout"]
        self.shutdown_timeout = config["vm", "shutdown_timeout"]
        self.qmp_timeout = config["vm", "qmp_timeout"]
        self.qmp_connect_timeout = config["vm", "qmp_connect_timeout"]
        self.vnc_display_base = config["vm", "vnc_display_base"]
        # Consoles listen where the engine API listens (oVirt's display network).
        self.display_address = config["addresses", "management_ip"]
        if self.display_address in ("", "::"):
            self.display_address = "0.0.0.0"

    # -- Service
    def startService(self):
        super().startService()
        os.makedirs(self.vms_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.log_dir, mode=0o750, exist_ok=True)
        # Whether this QEMU has SPICE: asked once, off the reactor thread.
        self.spice_available = False
        d = threads.deferToThread(probe_spice, self.qemu_binary)
        d.addCallback(lambda ok: setattr(self, "spice_available", bool(ok)))
        d.addErrback(lambda f: self.log.warn("cannot probe QEMU for SPICE: {e}",
                                             e=f.getErrorMessage()))

    @staticmethod
    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("", 0))
            return s.getsockname()[1]

    def stopService(self):
        # VMs outlive the agent (KillMode=process): stop watching, touch nothing.
        super().stopService()
        for vm in self.vms.values():
            if vm.child is not None:
                vm.child.close()
            if vm.qmp is not None:
                vm.qmp.close()

    # -- helpers for the VMs
    def child_env(self) -> dict:
        return {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}

    def tap_name(self, vm_id: str, index: int) -> str:
        digest = hashlib.sha1(vm_id.encode()).hexdigest()[:15 - len(self.tap_prefix) - 2]
        return f"{self.tap_prefix}{digest}{index:02d}"[:15]

    @staticmethod
    def cdrom_device_id(disk) -> str:
        from vdsm_twisted.virt.qemu.argv import device_id

        return device_id(disk)

    def persist(self, vm: QemuVm) -> None:
        if vm.is_down:
            return
        d = self.store.save(STATE_KIND, vm.id, vm.to_state())
        d.addErrback(lambda f: self.log.failure("VM {vm}: state not saved", f, vm=vm.id))

    def forget_state(self, vm: QemuVm) -> None:
        d = self.store.remove(STATE_KIND, vm.id)
        d.addErrback(lambda f: self.log.failure("VM {vm}: state not removed", f, vm=vm.id))

    # -- IVmDriver
    def get(self, vm_id: str) -> QemuVm:
        vm = self.vms.get(vm_id)
        if vm is None:
            raise errors.NoSuchVM(f"Virtual machine does not exist: {{'vmId': '{vm_id}'}}")
        return vm

    def list(self) -> list[QemuVm]:
        return list(self.vms.values())

    def create(self, vm_id: str, params: dict) -> dict:
        """Validate and register a VM, start it in the background, answer WaitForLaunch."""
        if vm_id in self.vms:
            raise errors.VMExists(f"Virtual machine already exists: {vm_id}")
        xml = params.get("xml")
        if not isinstance(xml, str) or not xml.strip():
            raise errors.CannotCreateVM("vmParams.xml (libvirt domain XML) is required")
        try:
            domain = domxml.parse_domain(xml, self.image_roots, max_size=self.max_xml_size)
        except domxml.DomainXMLError as e:
            raise errors.CannotCreateVM(f"Error creating the requested VM: {e}") from None
        if domain.uuid != vm_id:
            raise errors.CannotCreateVM(
                f"vmID {vm_id} does not match the domain's uuid {domain.uuid}")
        vm = QemuVm(self, vm_id, domain, params)
        self.vms[vm_id] = vm
        self.log.info("VM {vm} ({name}): created", vm=vm_id, name=domain.name)
        self.persist(vm)
        vm.launch()
        return vm.definition()

    @defer.inlineCallbacks
    def destroy(self, vm_id: str, grace: float | None = None):
        vm = self.get(vm_id)
        yield vm.destroy(grace)
        # Destroy releases the VM (VDSM): its Down status went out as an event.
        if self.vms.get(vm_id) is vm:
            del self.vms[vm_id]
        self.forget_state(vm)
