"""
One VM of the qemu driver: a QEMU child the agent owns, its QMP monitor and
its taps, driven through VDSM's lifecycle.

    WaitForLaunch ─▶ Powering up ─▶ Up ⇄ Paused
                                     │
                      Powering down ─┴─▶ Down (exitCode, exitMessage, exitReason)

The child's exit (seen through its pidfd) is the only way to Down once QEMU
runs: whatever asked for it (destroy, shutdown, the guest, a crash) only
decides which exit reason is reported.
"""

from __future__ import annotations

import os
import signal
import time
from typing import Any

from twisted.internet import defer
from twisted.internet.task import deferLater
from twisted.logger import Logger

from vdsm_twisted.api import errors
from vdsm_twisted.children.process import Child, ExitStatus, seconds_since, spawn
from vdsm_twisted.virt import status as st
from vdsm_twisted.virt.qemu import qmp as qmplib
from vdsm_twisted.virt.qemu.argv import build_argv
from vdsm_twisted.virt.vm import VmBase

#: The first fd number handed to QEMU for taps (0-2 are stdio).
FIRST_TAP_FD = 3


def _tail(path: str | None, size: int = 2048) -> str:
    if not path:
        return ""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            f.seek(max(0, f.tell() - size))
            return f.read().decode("utf-8", "replace").strip()
    except OSError:
        return ""


class QemuVm(VmBase):
    log = Logger()

    def __init__(self, driver, vm_id: str, domain: Any, params: dict):
        super().__init__(vm_id, domain, params, driver.bus)
        self.driver = driver
        self.dir = os.path.join(driver.vms_dir, vm_id)
        self.qmp_path = os.path.join(self.dir, "qmp.sock")
        self.log_path = os.path.join(driver.log_dir, f"{vm_id}.log")
        self.serial_log_path = os.path.join(driver.log_dir, f"{vm_id}.serial.log")
        self.child: Child | None = None
        self.qmp: qmplib.QMPProtocol | None = None
        self.taps: list[str] = []
        #: What the agent asked for, to name the exit reason when QEMU goes.
        self._ending: int | None = None
        self._guest_shutdown = False
        self._shutdown_timer = None
        self._stopping: defer.Deferred | None = None
        self.cdrom_path: str | None = next(
            (disk.source_path for disk in domain.disks if disk.device == "cdrom"), None)
        self.ticket_set = False
        #: The outgoing migration, while there is one (L{OutgoingMigration}).
        self.migration = None

    # -- persistence
    def status_changed(self) -> None:
        self.driver.persist(self)

    def to_state(self) -> dict:
        return {"vm_id": self.id, "xml": self.domain.xml, "params": self.params,
                "status": self.status, "status_time": self.status_time,
                "active": not self.is_down,
                "child": self.child.to_state() if self.child is not None and self.child.running else None,
                "qmp_path": self.qmp_path, "log_path": self.log_path, "taps": list(self.taps),
                "cdrom_path": self.cdrom_path}

    # -- adoption (crash restart or upgrade re-exec)
    @defer.inlineCallbacks
    def adopt(self, child: Child, status: str, taps: list[str], cdrom_path: str | None,
              status_time: int | None = None):
        """Take over a QEMU that kept running while the agent was away.

        Its statusTime and elapsedTime carry on (from the state and from the
        process's start time): re-attaching is no status change.
        """
        self.child = child
        self.pid = child.pid
        if status_time is not None:
            self.status_time = status_time
        if child.identity.start_time:
            self.started_at = time.monotonic() - seconds_since(child.identity.start_time)
        self.taps = list(taps)
        self.cdrom_path = cdrom_path
        self.status = status if status in st.RUNNING else st.POWERING_UP
        child.exited.addCallback(self._exited)
        if not child.running:
            return
        try:
            yield self._attach_monitor()
            self.display_ports = {}
            yield self._read_display_ports()
            state = yield self.qmp.query_status(timeout=self.driver.qmp_timeout)
        except Exception as e:
            # The process is ours and alive; without a monitor it is still
            # reported (monitorResponse -1) and can be destroyed by signals.
            self.monitor_responsive = False
            self.log.error("VM {vm}: adopted, but its monitor is unusable: {err}",
                           vm=self.id, err=_describe(e))
            return
        if status in (st.MIGRATION_DESTINATION, st.RESTORING_STATE) or state == "inmigrate":
            # Receiving a guest: it may have finished while nobody watched.
            self.status = status if status in (st.MIGRATION_DESTINATION, st.RESTORING_STATE) \
                else st.MIGRATION_DESTINATION
            info = yield self.qmp.execute("query-migrate", timeout=self.driver.qmp_timeout)
            self._migration_event(info.get("status") or "active")
            self.log.info("VM {vm} ({name}): adopted QEMU {pid} receiving its state",
                          vm=self.id, name=self.domain.name, pid=child.pid)
            return
        if status == st.MIGRATION_SOURCE and state == "running":
            # Nobody drives this migration any more: cancel it; the source runs
            # on and the destination, seeing it fail, ends its copy.
            info = yield self.qmp.execute("query-migrate", timeout=self.driver.qmp_timeout)
            if info.get("status") in ("setup", "active", "pre-switchover", "device"):
                self.log.warn("VM {vm}: cancelling the migration the previous agent started",
                              vm=self.id)
                yield self.qmp.execute("migrate_cancel", timeout=self.driver.qmp_timeout)
        if state == "prelaunch":
            # The agent went away between spawn and cont: finish the launch.
            yield self.qmp.cont(timeout=self.driver.qmp_timeout)
            state = "running"
        if state == "running":
            self.set_status(st.UP)
        elif state == "postmigrate":
            # It migrated away (or was saved) while nobody watched: it is done here.
            self._ending = st.ExitReason.MIGRATION_SUCCEEDED
            self._terminate()
        elif state in ("paused", "suspended", "io-error"):
            self.set_status(st.PAUSED)
        elif state == "shutdown":
            # Powered off (-no-shutdown) while nobody watched: finish it.
            self._guest_shutdown = True
            self._ending = st.ExitReason.USER_SHUTDOWN
            self._terminate()
        self.log.info("VM {vm} ({name}): adopted QEMU {pid}, {state}", vm=self.id,
                      name=self.domain.name, pid=child.pid, state=state)

    # -- launch
    @defer.inlineCallbacks
    def launch(self, incoming: str | None = None, incoming_fds: dict[int, int] | None = None):
        """Start QEMU; the VM ends Up, or Down with the reason it could not start.

        C{incoming}: a migration URI (C{tcp:ADDR:PORT}, C{fd:N}) to receive the
        guest's state from instead of booting it; L{incoming_ready} fires once
        QEMU listens, and the VM runs once the state has fully arrived.
        C{incoming_fds}: extra fds for QEMU (child fd -> our fd), e.g. a saved image.
        """
        self.incoming = incoming
        self.incoming_ready = defer.Deferred()
        tap_fds: list[int] = []
        try:
            os.makedirs(self.dir, mode=0o700, exist_ok=True)
            if incoming is None or incoming.startswith("fd:"):
                yield self._before_start_hook(
                    "before_vm_start" if incoming is None else "before_vm_dehibernate")
            nic_fds = {}
            for index, nic in enumerate(self.domain.nics):
                name = nic.target_dev or self.driver.tap_name(self.id, index)
                tap = yield self.driver.privd.create_tap(name, os.getuid(), bridge=nic.bridge)
                self.taps.append(tap.name)
                tap_fds.append(tap.fd)
                nic_fds[nic.mac] = FIRST_TAP_FD + index
            if self._ending is not None:
                raise _Aborted()
            argv = build_argv(
                self.domain, binary=self.driver.qemu_binary, kvm=self.driver.kvm,
                qmp_path=self.qmp_path, serial_log_path=self.serial_log_path, nic_fds=nic_fds,
                channel_paths={c.name: os.path.join(self.dir, f"ch{i}.sock")
                               for i, c in enumerate(self.domain.channels) if c.type == "unix"},
                graphics_ports={g.type: self.driver.free_port() for g in self.domain.graphics
                                if g.type == "spice" and g.autoport},
                listen_networks={g.listen_network: self.driver.display_address
                                 for g in self.domain.graphics if g.listen_network},
                default_listen=self.driver.display_address,
                vnc_display_base=self.driver.vnc_display_base,
                spice=self.driver.spice_available)
            if incoming is not None:
                argv += ["-incoming", "defer"]
            pass_fds = {FIRST_TAP_FD + i: fd for i, fd in enumerate(tap_fds)}
            pass_fds.update(incoming_fds or {})
            self.child = spawn(self.driver.reactor, argv, pass_fds=pass_fds,
                               log_path=self.log_path, name=f"qemu-{self.domain.name}",
                               env=self.driver.child_env())
        except _Aborted:
            self._cleanup_taps()
            self.set_down(st.ExitReason.DESTROYED_ON_STARTUP)
            self.incoming_ready.errback(errors.CannotCreateVM("destroyed while starting"))
            return
        except Exception as e:
            self.log.failure("VM {vm}: cannot start", vm=self.id)
            self._cleanup_taps()
            self.set_down(st.ExitReason.START_FAILED, f"failed to start: {_describe(e)}")
            self.incoming_ready.errback(errors.CannotCreateVM(f"failed to start: {_describe(e)}"))
            return
        finally:
            for fd in tap_fds:
                os.close(fd)  # QEMU holds its own copies now
        self.pid = self.child.pid
        self.child.exited.addCallback(self._exited)
        self.set_status(st.POWERING_UP)
        try:
            yield self._attach_monitor()
            if self._ending is not None:
                return
            yield self._set_initial_ticket()
            yield self._read_display_ports()
            yield self._apply_link_states()
            if incoming is not None:
                self.set_status(st.RESTORING_STATE if incoming.startswith("fd:")
                                else st.MIGRATION_DESTINATION)
                yield self.qmp.execute("migrate-set-capabilities", {"capabilities": [
                    {"capability": "events", "state": True}]}, timeout=self.driver.qmp_timeout)
                yield self.qmp.execute("migrate-incoming", {"uri": incoming},
                                       timeout=self.driver.qmp_timeout)
                self.incoming_ready.callback(None)
                return  # the MIGRATION event "completed" resumes the guest
            state = yield self.qmp.query_status(timeout=self.driver.qmp_timeout)
            if state in ("prelaunch", "paused"):
                yield self.qmp.cont(timeout=self.driver.qmp_timeout)
                state = "running"
            if state == "running" and self.status == st.POWERING_UP:
                self.set_status(st.UP)
                self.run_hook("after_vm_start")
        except Exception as e:
            if not self.incoming_ready.called:
                self.incoming_ready.errback(errors.CannotCreateVM(f"failed to start: {_describe(e)}"))
            if self.child.running and self._ending is None:
                self.log.error("VM {vm}: monitor setup failed ({err}); destroying",
                               vm=self.id, err=_describe(e))
                self._ending = st.ExitReason.START_FAILED
                self._start_failure = f"failed to start: {_describe(e)}"
                self._terminate()

    @defer.inlineCallbacks
    def _attach_monitor(self):
        connecting = qmplib.connect_qmp(self.driver.reactor, self.qmp_path,
                                        timeout=self.driver.qmp_connect_timeout,
                                        event_handler=self._qmp_event)

        def gave_up(status):
            # QEMU is gone: stop knocking on its socket.
            if not connecting.called:
                connecting.cancel()
            return status

        self.child.exited.addCallback(gave_up)
        self.qmp = yield connecting
        self.qmp.when_closed().addCallback(self._qmp_closed)

    def _qmp_closed(self, _):
        self.qmp = None

    @defer.inlineCallbacks
    def _read_display_ports(self):
        """Autoport graphics: learn the port QEMU picked, for displayInfo."""
        self.display_ports = {}
        for graphics in self.domain.graphics:
            if graphics.type == "vnc":
                info = yield self.qmp.execute("query-vnc", timeout=self.driver.qmp_timeout)
                if info.get("enabled") and info.get("service"):
                    self.display_ports["vnc"] = int(info["service"])
            elif graphics.type == "spice":
                info = yield self.qmp.execute("query-spice", timeout=self.driver.qmp_timeout)
                if info.get("enabled") and info.get("port"):
                    self.display_ports["spice"] = int(info["port"])

    @defer.inlineCallbacks
    def _apply_link_states(self):
        from vdsm_twisted.virt.qemu.argv import nic_device_id

        for nic in self.domain.nics:
            if nic.link_state == "down":
                yield self.qmp.execute("set_link", {"name": nic_device_id(self.domain, nic.mac),
                                                    "up": False}, timeout=self.driver.qmp_timeout)

    @defer.inlineCallbacks
    def _set_initial_ticket(self):
        for graphics in self.domain.graphics:
            if graphics.passwd:
                yield self.qmp.set_password(graphics.type, graphics.passwd,
                                            timeout=self.driver.qmp_timeout)

    # -- hooks
    def hook_env(self) -> dict[str, str]:
        from vdsm_twisted.virt.qemu.driver import hook_env

        return hook_env(self.params)

    @defer.inlineCallbacks
    def _before_start_hook(self, name: str):
        """A before-hook may rewrite the domain XML: the result is validated again."""
        from vdsm_twisted.virt import domxml

        xml = yield self.driver.hooks.run(name, self.domain.xml, self.hook_env(), self.id)
        if xml is not None and xml != self.domain.xml:
            try:
                domain = domxml.parse_domain(xml, self.driver.image_roots,
                                             max_size=self.driver.max_xml_size)
            except domxml.DomainXMLError as e:
                raise errors.CannotCreateVM(f"{name} hook produced an invalid domain: {e}")
            if domain.uuid != self.id:
                raise errors.CannotCreateVM(f"{name} hook changed the VM's uuid")
            self.log.info("VM {vm}: {hook} hook rewrote the domain XML", vm=self.id, hook=name)
            self.domain = domain

    def run_hook(self, name: str) -> defer.Deferred:
        """An after-hook: its failure is logged, never raised (the deed is done)."""
        d = self.driver.hooks.run(name, self.domain.xml, self.hook_env(), self.id)
        d.addErrback(lambda f: self.log.warn("VM {vm}: {hook} hook failed: {e}", vm=self.id,
                                             hook=name, e=f.getErrorMessage()))
        return d

    @defer.inlineCallbacks
    def _before_hook(self, name: str):
        """A before-hook of a verb: exit 2 (or a timeout) refuses the verb."""
        from vdsm_twisted.hooks import HookError

        try:
            yield self.driver.hooks.run(name, self.domain.xml, self.hook_env(), self.id)
        except HookError as e:
            raise errors.ApiError(str(e)) from None

    # -- QMP events
    def _qmp_event(self, name: str, data: dict, timestamp) -> None:
        if name == "STOP" and self.status in (st.UP, st.POWERING_UP):
            self.set_status(st.PAUSED)
        elif name == "RESUME" and self.status in (st.PAUSED, st.POWERING_UP):
            self.set_status(st.UP)
        elif name == "SHUTDOWN":
            # QEMU runs with -no-shutdown: it stopped and waits for our verdict.
            self._guest_shutdown = bool(data.get("guest"))
            if data.get("reason") == "guest-reset":
                return  # a reboot with -no-reboot (on_reboot=destroy): QEMU exits itself
            if self._guest_shutdown and self._ending is None:
                if self.domain.on_poweroff == "restart":
                    self._restart_guest()
                    return
                self._ending = st.ExitReason.USER_SHUTDOWN
            if self._guest_shutdown and self.child is not None and self.child.running:
                self._terminate()
        elif name == "POWERDOWN" and self.status == st.UP:
            self.set_status(st.POWERING_DOWN)
        elif name == "MIGRATION":
            self._migration_event(data.get("status"))

    def _migration_event(self, status: str | None) -> None:
        """Incoming side: the state arrived (run the guest) or not (end it);
        outgoing side: wake the migration's watcher."""
        if self.migration is not None and self.status == st.MIGRATION_SOURCE:
            self.migration.wake(status)
            return
        if self.status not in (st.MIGRATION_DESTINATION, st.RESTORING_STATE):
            return
        if status == "completed":
            after = ("after_vm_dehibernate" if self.status == st.RESTORING_STATE
                     else "after_vm_migrate_destination")
            d = self.qmp.cont(timeout=self.driver.qmp_timeout)
            d.addCallback(lambda _: (self.set_status(st.UP), self.run_hook(after)))
            d.addErrback(lambda f: self.log.error("VM {vm}: cannot resume after the incoming "
                                                  "state: {e}", vm=self.id, e=f.getErrorMessage()))
        elif status in ("failed", "cancelled"):
            self.log.warn("VM {vm}: incoming state {status}; destroying", vm=self.id, status=status)
            self._ending = st.ExitReason.MIGRATION_FAILED
            self._terminate(grace=0)

    # -- exit
    def _exited(self, status: ExitStatus) -> None:
        if self._shutdown_timer is not None and self._shutdown_timer.active():
            self._shutdown_timer.cancel()
        self._cleanup_taps()
        self.driver.forget_state(self)
        self.pid = None
        if self._ending == st.ExitReason.START_FAILED:
            self.set_down(st.ExitReason.START_FAILED,
                          getattr(self, "_start_failure", "failed to start"))
        elif self._ending is not None:
            self.set_down(self._ending)
        elif self._guest_shutdown and status.code == 0:
            self.set_down(st.ExitReason.USER_SHUTDOWN)
        elif status.code == 0:
            self.set_down(st.ExitReason.SUCCESS)
        else:
            tail = _tail(self.log_path, 600)
            message = f"QEMU {status.describe()}" + (f": {tail.splitlines()[-1]}" if tail else "")
            self.set_down(st.ExitReason.GENERIC_ERROR, message)
        if self.qmp is not None:
            self.qmp.close()

    def _restart_guest(self) -> None:
        """on_poweroff=restart: reset and run again instead of ending."""
        self._guest_shutdown = False
        d = self.qmp.system_reset(timeout=self.driver.qmp_timeout)
        d.addCallback(lambda _: self.qmp.cont(timeout=self.driver.qmp_timeout))
        d.addErrback(lambda f: self.log.warn("VM {vm}: restart after power-off failed: {e}",
                                             vm=self.id, e=f.getErrorMessage()))

    def _cleanup_taps(self) -> None:
        taps, self.taps = self.taps, []
        for name in taps:
            d = self.driver.privd.delete_tap(name)
            d.addErrback(lambda f, n=name: self.log.warn(
                "VM {vm}: tap {tap} not deleted: {err}", vm=self.id, tap=n, err=f.getErrorMessage()))

    # -- control (the verbs)
    def _require_running(self) -> None:
        if self.is_down or self.child is None:
            raise errors.ApiError(f"VM {self.id} is not running ({self.status})")
        if self.qmp is None:
            raise errors.GeneralError(f"VM {self.id}: no monitor connection")

    def destroy(self, grace: float | None = None) -> defer.Deferred:
        """Graceful quit, then SIGTERM, then SIGKILL; fires once QEMU is gone."""
        if self._ending is None:
            self._ending = st.ExitReason.ADMIN_SHUTDOWN
        if self.child is None or not self.child.running:
            if not self.is_down:
                self.set_down(self._ending)
            return defer.succeed(None)
        return self._terminate(grace)

    def _terminate(self, grace: float | None = None) -> defer.Deferred:
        if self._stopping is None:
            self._stopping = defer.ensureDeferred(self._escalate(
                self.driver.destroy_grace if grace is None else grace))
        return self._stopping

    async def _escalate(self, grace: float) -> None:
        reactor = self.driver.reactor
        exited = self.child.exited

        def waiter(timeout):
            d = defer.Deferred()
            timer = reactor.callLater(timeout, lambda: d.called or d.callback(False))
            exited.addBoth(lambda r: (timer.active() and timer.cancel(),
                                      d.called or d.callback(True), r)[-1])
            return d

        if self.qmp is not None and grace > 0:
            try:
                await self.qmp.quit(timeout=min(grace, self.driver.qmp_timeout))
            except qmplib.QMPFailure:
                pass
            if await waiter(grace):
                return
        for sig, wait in ((signal.SIGTERM, self.driver.sigterm_timeout), (signal.SIGKILL, 30.0)):
            if not self.child.running:
                return
            self.log.info("VM {vm}: sending {sig} to QEMU {pid}", vm=self.id,
                          sig=signal.Signals(sig).name, pid=self.child.pid)
            self.child.send_signal(sig)
            if await waiter(wait):
                return
        self.log.error("VM {vm}: QEMU {pid} survived SIGKILL", vm=self.id, pid=self.child.pid)

    def shutdown(self, timeout: float, reboot: bool = False) -> None:
        """ACPI power button; destroy if the guest is still running after C{timeout}."""
        self._require_running()
        if reboot:
            self.qmp.system_reset(timeout=self.driver.qmp_timeout)
            return
        self._ending = st.ExitReason.ADMIN_SHUTDOWN
        if self.status == st.UP:
            self.set_status(st.POWERING_DOWN)
        d = self.qmp.system_powerdown(timeout=self.driver.qmp_timeout)
        d.addErrback(lambda f: self.log.warn("VM {vm}: powerdown failed: {e}", vm=self.id,
                                             e=f.getErrorMessage()))
        if self._shutdown_timer is None or not self._shutdown_timer.active():
            self._shutdown_timer = self.driver.reactor.callLater(timeout, self._shutdown_expired,
                                                                 timeout)

    def _shutdown_expired(self, timeout: float) -> None:
        if self.child is not None and self.child.running:
            self.log.info("VM {vm}: guest ignored the power button for {t}s; destroying",
                          vm=self.id, t=timeout)
            self._terminate()

    @defer.inlineCallbacks
    def pause(self):
        self._require_running()
        yield self._before_hook("before_vm_pause")
        yield self.qmp.stop(timeout=self.driver.qmp_timeout)
        if self.status in (st.UP, st.POWERING_UP):
            self.set_status(st.PAUSED)
        self.run_hook("after_vm_pause")

    @defer.inlineCallbacks
    def cont(self):
        self._require_running()
        yield self._before_hook("before_vm_cont")
        yield self.qmp.cont(timeout=self.driver.qmp_timeout)
        if self.status == st.PAUSED:
            self.set_status(st.UP)
        self.run_hook("after_vm_cont")

    @defer.inlineCallbacks
    def reset(self):
        self._require_running()
        yield self.qmp.system_reset(timeout=self.driver.qmp_timeout)

    @defer.inlineCallbacks
    def set_ticket(self, password: str, ttl: int, connected: str):
        self._require_running()
        if not self.domain.graphics:
            raise errors.ApiError(f"VM {self.id} has no graphics device")
        protocol = self.domain.graphics[0].type
        yield self.qmp.set_password(protocol, password, connected=connected,
                                    timeout=self.driver.qmp_timeout)
        expiry = f"+{ttl}" if ttl > 0 else "never"
        yield self.qmp.expire_password(protocol, expiry, timeout=self.driver.qmp_timeout)
        self.ticket_set = True

    @defer.inlineCallbacks
    def change_cd(self, path: str | None):
        self._require_running()
        cdrom = next((d for d in self.domain.disks if d.device == "cdrom"), None)
        if cdrom is None:
            raise errors.ApiError(f"VM {self.id} has no CD-ROM drive")
        device_id = self.driver.cdrom_device_id(cdrom)
        if path:
            yield self.qmp.change_medium(device_id, path, format="raw",
                                         timeout=self.driver.qmp_timeout)
        else:
            yield self.qmp.eject(device_id, force=True, timeout=self.driver.qmp_timeout)
        self.cdrom_path = path or None
        self.driver.persist(self)

    @defer.inlineCallbacks
    def hibernate(self, path: str):
        """Save memory and device state to C{path}, then end the VM (exitReason 5).

        The guest is paused first (a consistent, smaller image, as libvirt's
        save does); QEMU writes the state through an fd we open and hand it
        over QMP (C{getfd} + C{migrate fd:}), so no path is opened by QEMU.
        """
        self._require_running()
        if self.status not in (st.UP, st.PAUSED):
            raise errors.ApiError(f"VM {self.id} cannot hibernate while {self.status}")
        timeout = self.driver.qmp_timeout
        was = self.status
        yield self._before_hook("before_vm_hibernate")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            yield self.qmp.execute("getfd", {"fdname": "hibernate"}, timeout=timeout, fd=fd)
        finally:
            os.close(fd)  # QEMU answered: it holds its own copy
        self.set_status(st.SAVING_STATE)
        try:
            yield self.qmp.stop(timeout=timeout)
            yield self.qmp.execute("migrate", {"uri": "fd:hibernate"}, timeout=timeout)
            while True:
                info = yield self.qmp.execute("query-migrate", timeout=timeout)
                if info.get("status") == "completed":
                    break
                if info.get("status") in ("failed", "cancelled"):
                    raise errors.GeneralError(
                        f"saving the state failed: {info.get('error-desc', info.get('status'))}")
                yield deferLater(self.driver.reactor, 0.1, lambda: None)
        except Exception:
            self.log.failure("VM {vm}: hibernation failed; the VM goes on", vm=self.id)
            if self.child is not None and self.child.running:
                if was == st.UP:
                    yield self.qmp.cont(timeout=timeout)
                self.set_status(was)
            raise
        self.log.info("VM {vm}: state saved to {path}", vm=self.id, path=path)
        self._ending = st.ExitReason.SAVE_STATE_SUCCEEDED
        yield self.destroy(grace=self.driver.destroy_grace)
        self.run_hook("after_vm_hibernate")

    # -- views
    def display_info(self) -> list[dict]:
        ports = getattr(self, "display_ports", {})
        return [{"type": g.type, "port": str(ports.get(g.type, g.port or -1)), "tlsPort": "-1",
                 "ipAddress": g.listen or self.driver.display_address}
                for g in self.domain.graphics]


class _Aborted(Exception):
    """Destroyed while still launching."""


def _describe(e: BaseException) -> str:
    text = str(e)
    return f"{type(e).__name__}: {text}" if text else type(e).__name__
