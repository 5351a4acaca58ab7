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
from typing import Any, Callable, Mapping, Sequence

import attr

from twisted.application.service import Service
from twisted.internet import defer, threads
from twisted.logger import Logger
from zope.interface import implementer

from vdsm_twisted.api import errors
from vdsm_twisted.children import scan
from vdsm_twisted.children.process import Child, Identity, IdentityMismatch
from vdsm_twisted.common.slicing import run_sliced
from vdsm_twisted.virt import domxml
from vdsm_twisted.virt import status as st
from vdsm_twisted.virt.interfaces import IVmDriver
from vdsm_twisted.hooks import HookError, HookRunner
from vdsm_twisted.virt.qemu.argv import probe_spice
from vdsm_twisted.virt.qemu.migration import OutgoingMigration
from vdsm_twisted.virt.qemu.vm import QemuVm

STATE_KIND = "vm"
#: The fd number a restored QEMU reads its saved state from.
RESTORE_FD = 99


def hook_env(params: dict) -> dict[str, str]:
    """The VM's custom properties, as hook scripts receive them (VDSM)."""
    custom = params.get("custom") or {}
    if not isinstance(custom, dict):
        return {}
    return {str(k): str(v) for k, v in custom.items()
            if isinstance(k, str) and "=" not in k and "\0" not in k and "\0" not in str(v)}


def _looks_like_uuid(name: str) -> bool:
    return len(name) == 36 and name.count("-") == 4


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
        #: Inherited fds taken over by adopted children (after an upgrade re-exec).
        self.claimed_fds: set[int] = set()
        #: The agent's TaskManager (long operations are tasks), when wired.
        self.tasks = None
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
        self.pki_dir = config["tls", "pki_dir"]
        self.hooks = HookRunner(config["hooks", "dir"], config["hooks", "timeout"], self.reactor,
                                tmp_dir=os.path.join(config["agent", "run_dir"], "hooks"))
        self.migration_address = config["addresses", "management_ip"] or "0.0.0.0"
        if self.migration_address == "::":
            self.migration_address = "[::]"
        # Consoles listen where the engine API listens (oVirt's display network).
        self.display_address = config["addresses", "management_ip"]
        if self.display_address in ("", "::"):
            self.display_address = "0.0.0.0"

    # -- Service
    def startService(self):
        super().startService()
        os.makedirs(self.vms_dir, mode=0o700, exist_ok=True)
        os.makedirs(self.hooks.tmp_dir, mode=0o700, exist_ok=True)
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
        restore_fd = None
        restore = params.get("restoreState")
        if restore:
            path = restore.get("path") if isinstance(restore, dict) else restore
            if not isinstance(path, str):
                raise errors.InvalidParams("restoreState must be a path or {\"path\": ...}")
            try:
                path = domxml.resolve_image_path(path, self.image_roots, "restoreState")
                restore_fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except (domxml.DomainXMLError, OSError) as e:
                raise errors.CannotCreateVM(f"cannot restore: {e}") from None
        vm = QemuVm(self, vm_id, domain, params)
        self.vms[vm_id] = vm
        self.log.info("VM {vm} ({name}): created", vm=vm_id, name=domain.name)
        # The XML also lives beside the QMP socket: if the state document is
        # ever lost, a QEMU found in /proc can still be understood.
        os.makedirs(vm.dir, mode=0o700, exist_ok=True)
        with open(os.path.join(vm.dir, "domain.xml"), "w") as f:
            f.write(domain.xml)
        self.persist(vm)
        answer = vm.definition()  # WaitForLaunch: the launch goes on in the background
        if restore_fd is None:
            vm.launch()
        else:
            vm.launch(incoming=f"fd:{RESTORE_FD}", incoming_fds={RESTORE_FD: restore_fd})
            vm.incoming_ready.addBoth(lambda r: (os.close(restore_fd), r)[1])
            vm.incoming_ready.addErrback(lambda f: None)  # the VM's Down status tells
        return answer

    def hibernate(self, vm_id: str, path: str):
        """Save the VM's state to C{path} (tracked as a task when tasks are on)."""
        try:
            path = domxml.resolve_image_path(path, self.image_roots, "hiberVolHandle",
                                             must_exist=False)
        except domxml.DomainXMLError as e:
            raise errors.InvalidParams(str(e)) from None
        vm = self.get(vm_id)
        if self.tasks is None:
            return vm.hibernate(path)
        task = self.tasks.start("hibernate", "VM.hibernate", lambda _task: vm.hibernate(path),
                                vm_id=vm_id, params={"path": path})
        return task.when_done()

    # -- live migration
    def _connect_agent(self, host: str, port: int):
        """A client of another agent, with this host's certificate (same CA)."""
        from vdsm_twisted.client import connect

        return connect(host, port, self.pki_dir, protocol="amp", reactor=self.reactor,
                       timeout=30)

    def migrate(self, vm_id: str, params: dict) -> dict:
        vm = self.get(vm_id)
        if vm.status != st.UP:
            raise errors.ApiError(f"VM {vm_id} cannot migrate while {vm.status}")
        if vm.migration is not None and vm.migration.state in ("starting", "active"):
            raise errors.ApiError(f"VM {vm_id} is already migrating")
        migration = OutgoingMigration(vm, params, self._connect_agent)  # validates params
        vm.migration = migration

        @defer.inlineCallbacks
        def run(task):
            task.on_stop = lambda _task: migration.cancel()
            migration.on_progress = task.set_progress
            yield migration.start()
            if migration.state != "completed":
                raise errors.ApiError(migration.message)
            return migration.status()

        if self.tasks is None:
            migration.start().addErrback(
                lambda f: self.log.failure("VM {vm}: migration crashed", f, vm=vm_id))
            return {"status": {"code": 0, "message": "Migration in progress"}, "progress": 0}
        task = self.tasks.start("migration", "VM.migrate", run, vm_id=vm_id,
                                params={"dst": params.get("dst")})
        return {"status": {"code": 0, "message": "Migration in progress"}, "progress": 0,
                "taskID": task.id}

    def migration_status(self, vm_id: str) -> dict:
        vm = self.get(vm_id)
        if vm.migration is None:
            return {"status": {"code": 0, "message": "No migration"}, "progress": 0}
        return vm.migration.status()

    def migrate_cancel(self, vm_id: str) -> dict:
        vm = self.get(vm_id)
        if vm.migration is None or vm.migration.state not in ("starting", "active"):
            raise errors.ApiError(f"VM {vm_id} is not migrating")
        vm.migration.cancel()
        return {"status": {"code": 0, "message": "Migration cancellation requested"}}

    def outgoing_migrations(self) -> list:
        return [vm.migration for vm in self.vms.values()
                if vm.migration is not None and vm.migration.state in ("starting", "active")]

    @defer.inlineCallbacks
    def migration_create(self, vm_id: str, params: dict):
        """Destination side: a QEMU waiting for the guest's state on a TCP port."""
        if vm_id in self.vms:
            raise errors.VMExists(f"Virtual machine already exists: {vm_id}")
        xml = params.get("xml")
        if not isinstance(xml, str):
            raise errors.CannotCreateVM("migrationCreate: params.xml is required")
        try:
            xml = yield self.hooks.run("before_vm_migrate_destination", xml,
                                       hook_env(params), vm_id)
        except HookError as e:
            raise errors.CannotCreateVM(str(e)) from None
        try:
            domain = domxml.parse_domain(xml, self.image_roots, max_size=self.max_xml_size)
        except domxml.DomainXMLError as e:
            raise errors.CannotCreateVM(f"Error creating the requested VM: {e}") from None
        if domain.uuid != vm_id:
            raise errors.CannotCreateVM(f"vmID {vm_id} does not match the domain's uuid")
        vm = QemuVm(self, vm_id, domain, {k: v for k, v in params.items() if k != "xml"})
        self.vms[vm_id] = vm
        os.makedirs(vm.dir, mode=0o700, exist_ok=True)
        with open(os.path.join(vm.dir, "domain.xml"), "w") as f:
            f.write(domain.xml)
        port = self.free_port()
        listen = self.migration_address
        vm.launch(incoming=f"tcp:{listen}:{port}")
        yield vm.incoming_ready
        self.log.info("VM {vm}: waiting for its state on port {port}", vm=vm_id, port=port)
        return {"migrationPort": port, "params": vm.definition()}

    # -- recovery: crash restart and upgrade re-exec
    def recover(self, inherited: Mapping[str, dict] | None = None,
                claimed: Callable[[], None] | None = None) -> defer.Deferred:
        """Re-attach every VM that kept running while this agent was away.

        C{inherited}: vm id -> child state whose fds are open in this process
        (an upgrade re-exec); otherwise children are found through the state
        documents (pid + start time + exe), or, where a document is missing or
        corrupt, through /proc (our uuid and run directory on the command line).
        VMs are taken a slice per reactor turn (the API keeps answering);
        C{claimed} is called once every VM was looked at (every inherited fd
        that will be used is claimed), before their monitors have answered.
        """
        inherited = dict(inherited or {})
        docs, refused = self.store.load_all(STATE_KIND)
        by_id = {doc.key: doc for doc in docs}
        ids = set(by_id) | {os.path.basename(path)[:-len(".json")] for path, _ in refused}
        if os.path.isdir(self.vms_dir):
            ids |= {name for name in os.listdir(self.vms_dir) if _looks_like_uuid(name)}
        ids |= set(inherited)
        adoptions: list[defer.Deferred] = []
        found: dict | None = None

        def one(vm_id):
            nonlocal found
            doc = by_id.get(vm_id)
            if doc is None or vm_id in inherited:
                pass
            elif not doc.data.get("active") or not doc.data.get("child"):
                self._discard(vm_id)
                return
            if doc is None and vm_id not in inherited:
                if found is None:
                    found = scan.find_qemus(self.vms_dir)
                if vm_id not in found:
                    self._discard(vm_id)
                    return
            try:
                d = self._recover_one(vm_id, doc, inherited.get(vm_id),
                                      found.get(vm_id) if found else None)
            except Exception:
                self.log.failure("VM {vm}: recovery failed; left alone", vm=vm_id)
                return
            if d is not None:
                adoptions.append(d)

        looked = run_sliced(self.reactor, (one(vm_id) for vm_id in sorted(ids)))
        if claimed is not None:
            looked.addCallback(lambda _: claimed())
        looked.addCallback(lambda _: defer.DeferredList(adoptions, consumeErrors=True))
        return looked.addCallback(
            lambda _: self.log.info("recovery done: {n} VM(s) re-attached",
                                    n=sum(1 for vm in self.vms.values() if not vm.is_down)))

    def prepare_handoff(self) -> tuple[dict[str, dict], int]:
        """Just before an exec: every running child's state, saved synchronously;
        and how many state documents had changed (were written)."""
        children, written = {}, 0
        for vm in self.vms.values():
            if vm.child is not None and vm.child.running:
                children[vm.id] = vm.child.to_state()
                written += self.store.save_now(STATE_KIND, vm.id, vm.to_state())
        return children, written

    def release_monitors(self) -> None:
        for vm in self.vms.values():
            if vm.qmp is not None:
                vm.qmp.transport.abortConnection()

    def _discard(self, vm_id: str) -> None:
        """Nothing runs for this id any more: drop its leftovers."""
        self.store.remove(STATE_KIND, vm_id)
        shutil.rmtree(os.path.join(self.vms_dir, vm_id), ignore_errors=True)

    def _recover_one(self, vm_id, doc, inherited_child, found):
        data = doc.data if doc is not None else {}
        xml = data.get("xml")
        if xml is None:
            try:
                with open(os.path.join(self.vms_dir, vm_id, "domain.xml")) as f:
                    xml = f.read()
            except OSError:
                self.log.error("VM {vm}: QEMU {pid} runs but its definition is lost; left alone",
                               vm=vm_id, pid=found.pid if found else "?")
                return None
        domain = domxml.parse_domain(xml, self.image_roots, max_size=self.max_xml_size)
        vm = QemuVm(self, vm_id, domain, data.get("params") or {})
        taps = data.get("taps")
        if taps is None:
            taps = [nic.target_dev or self.tap_name(vm_id, i) for i, nic in enumerate(domain.nics)]
        try:
            if inherited_child is not None:
                self.claimed_fds.update(fd for fd in (inherited_child.get("pidfd"),
                                                      inherited_child.get("output_fd"))
                                        if fd is not None)
                child = Child.adopt(self.reactor, inherited_child, inherited=True)
            elif data.get("child"):
                child = Child.adopt(self.reactor, data["child"], inherited=False)
            else:
                identity = Identity.of(found.pid)
                self.log.warn("VM {vm}: state lost; adopting QEMU {pid} found in /proc",
                              vm=vm_id, pid=found.pid)
                child = Child.adopt(self.reactor, {**attr.asdict(identity), "log_path": vm.log_path,
                                                   "name": f"qemu-{domain.name}"}, inherited=False)
        except IdentityMismatch as e:
            self.log.error("VM {vm}: not adopted, {why}", vm=vm_id, why=str(e))
            vm.taps = list(taps)
            self.vms[vm_id] = vm
            vm._cleanup_taps()
            vm.set_down(st.ExitReason.DOMAIN_MISSING,
                        f"QEMU gone while the agent was away; {e}")
            self._discard(vm_id)
            return None
        except ProcessLookupError:
            self.log.warn("VM {vm}: QEMU exited while the agent was away", vm=vm_id)
            vm.taps = list(taps)
            self.vms[vm_id] = vm
            vm._cleanup_taps()
            vm.set_down(st.ExitReason.DOMAIN_MISSING, "QEMU exited while the agent was away")
            self._discard(vm_id)
            return None
        self.vms[vm_id] = vm
        return vm.adopt(child, data.get("status", st.UP), taps, data.get("cdrom_path"),
                        status_time=data.get("status_time"))

    @defer.inlineCallbacks
    def destroy(self, vm_id: str, grace: float | None = None):
        vm = self.get(vm_id)
        yield vm.destroy(grace)
        # Destroy releases the VM (VDSM): its Down status went out as an event.
        if self.vms.get(vm_id) is vm:
            del self.vms[vm_id]
        self.forget_state(vm)
        yield vm.run_hook("after_vm_destroy")
