"""
The agent's service tree: what runs, in which order, and how it reloads.

    AgentService (MultiService)
      ├── HostStatsSampler     background host sampling into a cache
      ├── vm side (MultiService, filled once its modules are imported)
      │     ├── PrivdClient      AMP to privd, reconnecting with backoff
      │     ├── QemuDriver       VMs as our own QEMU children (state in run_dir)
      │     └── VmStatsSampler   background VM sampling into each VM's cache
      ├── EngineListenerService  mutual TLS on one port: STOMP/JSON-RPC and AMP
      └── StandbyKeeper        a warm standby agent, ready to take over on a crash

Start-up imports only what serving needs: the listener adopts or binds its
socket and answers (Host calls at once, VM and task calls code 99) while the
VM side's modules (the driver, lxml, the privd client...) are imported, one
per reactor turn; then the VM side is built and every VM re-attached.  After an upgrade
exec that is what keeps the downtime near the interpreter's and Twisted's own
import time.

One agent per run dir (L{runlock}); it is taken before anything else, or
inherited across an upgrade exec.

READY=1 goes to systemd once the listener is bound; SIGHUP reloads.
"""

from __future__ import annotations

import importlib
import os
import signal
import sys
import time

from twisted.application.service import MultiService
from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

from vdsm_twisted import config as agent_config
from vdsm_twisted.api.admin import HostAdminApi
from vdsm_twisted.api.events import EventBus
from vdsm_twisted.api.host import HostApi
from vdsm_twisted.api.registry import Api
from vdsm_twisted.common import logging as vlogging
from vdsm_twisted.common import memory as vmemory
from vdsm_twisted.common import sdnotify
from vdsm_twisted.common.slicing import run_sliced
from vdsm_twisted.common.config import Config, ConfigError
from vdsm_twisted.continuity import codeid, handoff, runlock
from vdsm_twisted.continuity.standby import StandbyKeeper, Takeover
from vdsm_twisted.continuity.upgrade import BLOCKED, Upgrader, exec_argv, twistd_command
from vdsm_twisted.host.caps import CapabilitiesCache
from vdsm_twisted.host.stats import HostStatsSampler
from vdsm_twisted.protocols.listener import EngineListenerService
from vdsm_twisted.state.store import StateStore

#: Imported after the listener serves, one per reactor turn (I/O is handled in
#: between), leaves first so that no single step is long.
VM_SIDE_MODULES = (
    "twisted.application.internet",
    "vdsm_twisted.privdclient",
    "lxml.etree",
    "vdsm_twisted.virt.domxml",
    "vdsm_twisted.virt.qemu.argv",
    "vdsm_twisted.virt.qemu.qmp",
    "vdsm_twisted.children.process",
    "vdsm_twisted.hooks",
    "vdsm_twisted.virt.qemu.vm",
    "vdsm_twisted.virt.qemu.migration",
    "vdsm_twisted.virt.qemu.driver",
    "vdsm_twisted.virt.stats",
    "vdsm_twisted.tasks.manager",
    "vdsm_twisted.api.vm",
    "vdsm_twisted.api.tasks",
)


def import_vm_side() -> None:
    for name in VM_SIDE_MODULES:
        importlib.import_module(name)


def import_stepwise(reactor, names) -> defer.Deferred:
    """Import C{names} one per reactor turn; fires when all are imported."""
    return run_sliced(reactor, (importlib.import_module(name) for name in names
                                if name not in sys.modules), budget=0)


class AgentService(MultiService):
    log = Logger()

    def __init__(self, config: Config, config_path: str | None = None, reactor=None,
                 takeover: Takeover | None = None):
        """C{takeover}: set when this process was the standby of an agent that died."""
        super().__init__()
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self.config = config
        self.config_path = config_path
        vlogging.set_level(config["agent", "log_level"])

        self.bus = EventBus()
        self.capabilities = CapabilitiesCache(config["agent", "host_uuid_file"], reactor=reactor)
        self.sampler = HostStatsSampler(config["sampling", "host_stats_interval"], clock=reactor)
        self.sampler.setServiceParent(self)
        self.store = StateStore(os.path.join(config["agent", "run_dir"], "state"), reactor=reactor)
        #: Built by L{_build_vm_side} once its modules are imported.
        self.vm_side = MultiService()
        self.vm_side.setServiceParent(self)
        self.privd = self.driver = self.tasks = self.vm_sampler = None
        self._host_vms = None
        self.upgrader = Upgrader(self, reactor,
                                 drain_timeout=config["agent", "upgrade_drain_timeout"])
        self.upgrader.confirm_timeout = config["agent", "upgrade_confirm_timeout"]
        self.api = Api([HostApi(self.capabilities, self.sampler, vm_list=self._vm_list),
                        HostAdminApi(self.upgrader)])
        self.listener = EngineListenerService(config, self.api, self.bus, reactor=reactor)
        self.listener.setServiceParent(self)
        self._previous_signals: dict[int, object] = {}
        # After an upgrade re-exec: what the previous image handed over.
        self.handoff_path = os.environ.pop(handoff.ENV, None)
        self.handoff = handoff.take(self.handoff_path)
        if os.environ.get("VDSM_TWISTED_FELL_BACK"):
            self.log.error("upgrade: the new build failed to start ({why}); this is the "
                           "previous build again", why=os.environ.pop("VDSM_TWISTED_FELL_BACK"))
        if self.handoff is not None:
            self.listener.adopt = self.handoff["listening"][0]
        self.takeover = takeover
        if takeover is not None:
            self.listener.adopt = takeover.listening
        run_dir = config["agent", "run_dir"]
        os.makedirs(run_dir, exist_ok=True)
        if self.handoff is not None and self.handoff.get("lock_fd") is not None:
            self.lock_fd = self.handoff["lock_fd"]
        else:
            # A predecessor that just died (crash restart, takeover) frees it at once.
            self.lock_fd = runlock.acquire(run_dir, timeout=5.0)
        self.standby = StandbyKeeper(
            reactor, run_dir, self._listening_fd,
            lambda: twistd_command(exec_argv(sys.orig_argv)),
            enabled=config["agent", "standby"])
        self.standby.setServiceParent(self)

    def _vm_list(self) -> list:
        return self._host_vms.vm_list() if self._host_vms is not None else []

    def _build_vm_side(self) -> None:
        """The driver and everything VMs need (their modules are imported by now)."""
        from vdsm_twisted.api.tasks import HostTaskApi, TaskApi
        from vdsm_twisted.api.vm import HostVmApi, VmApi
        from vdsm_twisted.privdclient import PrivdClient
        from vdsm_twisted.tasks.manager import TaskManager
        from vdsm_twisted.virt.qemu.driver import QemuDriver
        from vdsm_twisted.virt.stats import VmStatsSampler

        config, reactor = self.config, self._reactor
        self.privd = PrivdClient(config["privd", "socket"],
                                 call_timeout=config["privd", "call_timeout"],
                                 max_delay=config["privd", "reconnect_max_delay"],
                                 reactor=reactor)
        self.privd.setServiceParent(self.vm_side)
        self.driver = QemuDriver(reactor, config, self.bus, self.privd, self.store)
        self.driver.setServiceParent(self.vm_side)
        self.tasks = TaskManager(self.store, self.bus, clock=reactor)
        self.driver.tasks = self.tasks
        self.vm_sampler = VmStatsSampler(self.driver.list, config["sampling", "vm_stats_interval"],
                                         config["vm", "qmp_timeout"], clock=reactor)
        self.vm_sampler.setServiceParent(self.vm_side)
        self._host_vms = HostVmApi(self.driver)
        self.api.add([self._host_vms, VmApi(self.driver), TaskApi(self.tasks),
                      HostTaskApi(self.tasks)])

    def _load_vm_side(self) -> defer.Deferred:
        loaded = import_stepwise(self._reactor, VM_SIDE_MODULES)
        loaded.addCallback(lambda _: self._build_vm_side())
        loaded.addErrback(self._no_vm_side)
        loaded.addCallback(lambda _: self._vdsm_hook("before_vdsm_start"))
        loaded.addCallback(lambda _: self._recover())
        return loaded

    def _no_vm_side(self, failure: Failure):
        # Serving Host calls alone, VM calls 99 forever, is no agent: stop (and
        # be restarted, or fall back to the previous build after an upgrade).
        self.log.failure("cannot load the VM driver; stopping", failure)
        self._reactor.callLater(0, self._reactor.stop)
        return failure

    def startService(self):
        runlock.mark(self.lock_fd)  # twistd may have daemonized since makeService
        self.store.start()
        self.api.recovering = True
        super().startService()
        for signum, handler in ((signal.SIGHUP, self.reload),
                                (signal.SIGUSR2, self._upgrade_signal)):
            self._previous_signals[signum] = signal.signal(
                signum, lambda *_, h=handler: self._reactor.callFromThread(h))
        d = defer.maybeDeferred(lambda: self.listener.listening)
        d.addCallback(self._serving)
        d.addErrback(self._failed_to_listen)
        # Accepting starts as soon as startService returns; the VM side is
        # loaded meanwhile and VMs re-attached (VM calls answer code 99 until then).
        recovered = self._load_vm_side()
        settled = defer.gatherResults([recovered, d], consumeErrors=True)
        if self.handoff is not None:
            # Serving and every VM re-attached: the upgrade is confirmed.
            settled.addCallback(lambda _: handoff.confirm(self.handoff_path))
        settled.addCallback(lambda _: self._vdsm_hook("after_vdsm_start"))
        # A standby only once this agent is whole (it would recover the same VMs).
        settled.addCallback(lambda _: self.standby.spawn())
        # The fallback for a later upgrade, once start-up no longer needs the CPU.
        settled.addCallback(lambda _: self._snapshot_code())
        settled.addErrback(lambda f: self.log.failure("agent start-up failed", f))

    def _snapshot_code(self) -> None:
        snap = threads.deferToThread(codeid.snapshot,
                                     os.path.join(self.config["agent", "run_dir"], "code"))
        snap.addCallback(self._snapshot_taken)
        snap.addErrback(lambda f: self.log.warn(
            "no snapshot of the running code ({e}): an upgrade will have no fallback",
            e=f.getErrorMessage()))
        # Start-up is over (the snapshot was its last job): give its freed heap back.
        snap.addBoth(lambda _: vmemory.release_free_heap())

    def _snapshot_taken(self, path: str) -> None:
        self.upgrader.snapshot = path
        self.log.info("upgrade fallback ready: the running code is kept in {path}", path=path)

    def _recover(self) -> defer.Deferred:
        """Re-attach VMs (and then tasks); after an upgrade, settle the inherited fds."""
        recovered = self.driver.recover(self.handoff["children"] if self.handoff else None,
                                        claimed=self._children_claimed)
        # Tasks after the VMs: a task's resumer may need its VM.
        recovered.addBoth(lambda r: self.tasks.recover().addBoth(lambda _: r))
        recovered.addBoth(self._recovered)
        return recovered

    def _children_claimed(self) -> None:
        """Every VM was looked at: inherited fds nobody claimed can go, signals come in."""
        if self.handoff is not None:
            claimed = self.driver.claimed_fds | {fd["fd"] for fd in self.handoff["listening"]}
            claimed.add(self.lock_fd)
            closed = handoff.close_unclaimed(self.handoff, claimed)
            self.log.info("upgrade: new image adopted the listening socket and {n} child(ren); "
                          "closed {closed} unclaimed inherited fd(s)",
                          n=len(self.handoff["children"]), closed=len(closed))
            # Signals of the exec window reach our handlers now: the ones the
            # old image recorded, then the ones pending since it blocked them.
            for signum in self.handoff.get("signals", []):
                self.log.info("upgrade: signal {sig} arrived during the exec; handling it",
                              sig=signal.Signals(signum).name)
                os.kill(os.getpid(), signum)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, BLOCKED)

    def _recovered(self, result):
        self.api.recovering = False
        if self.takeover is not None:
            self.log.info("standby: every VM re-attached {ms:.0f} ms after agent pid {pid} died",
                          ms=(time.time() - self.takeover.at) * 1000,
                          pid=self.takeover.previous_pid)
        if isinstance(result, Failure):
            self.log.failure("VM recovery failed", result)

    def _upgrade_signal(self):
        d = defer.maybeDeferred(self.upgrader.request, "SIGUSR2")
        d.addErrback(lambda f: self.log.error("upgrade: {e}", e=f.getErrorMessage()))

    def _vdsm_hook(self, name: str) -> None:
        d = self.driver.hooks.run(name)
        d.addErrback(lambda f: self.log.warn("{hook} hook failed: {e}", hook=name,
                                             e=f.getErrorMessage()))

    def _listening_fd(self) -> int | None:
        listening = self.listener.handoff()
        return listening[0]["fd"] if listening else None

    def _serving(self, _):
        if self.takeover is not None:
            self.log.info("standby: took over from agent pid {pid}; serving {ms:.0f} ms after "
                          "it died", pid=self.takeover.previous_pid,
                          ms=(time.time() - self.takeover.at) * 1000)
        if self.handoff is not None and "exec_time" in self.handoff:
            now = time.time()
            self.log.info("upgrade downtime: {ms:.0f} ms from exec to serving again",
                          ms=(now - self.handoff["exec_time"]) * 1000)
            if self.handoff.get("paused_time"):
                self.log.info("upgrade: not accepting for {total:.0f} ms ({before:.0f} ms "
                              "draining and saving before the exec)",
                              total=(now - self.handoff["paused_time"]) * 1000,
                              before=(self.handoff["exec_time"]
                                      - self.handoff["paused_time"]) * 1000)
        self.log.info("vdsm-twisted agent serving on port {port} (config: {source})",
                      port=self.listener.port, source=self.config.source)
        sdnotify.ready(f"serving on port {self.listener.port}")

    def _failed_to_listen(self, failure):
        self.log.failure("cannot listen for the engine API; stopping", failure)
        self._reactor.stop()

    def stopService(self):
        sdnotify.stopping()
        for signum, previous in self._previous_signals.items():
            signal.signal(signum, previous)
        self._previous_signals = {}
        d = defer.maybeDeferred(super().stopService)
        d.addBoth(lambda r: (self.store.stop(), r)[1])
        return d

    def reload(self) -> bool:
        """SIGHUP: re-read the config; a config that does not parse changes nothing."""
        sdnotify.reloading()
        try:
            try:
                new = agent_config.load(self.config_path)
            except ConfigError as e:
                self.log.error("reload refused, keeping the running configuration: {error}",
                               error=str(e))
                return False
            try:
                self.listener.reload_tls(new)
            except Exception as e:
                self.log.error("reload refused, TLS material unusable: {error}", error=str(e))
                return False
            vlogging.set_level(new["agent", "log_level"])
            self.sampler.set_interval(new["sampling", "host_stats_interval"])
            if self.driver is not None:  # else it is built from the new config
                self.vm_sampler.set_interval(new["sampling", "vm_stats_interval"])
                self.driver.configure(new)
            self.standby.enabled = new["agent", "standby"]
            if self.standby.enabled:
                if not self.api.recovering:  # else it comes once this agent is whole
                    self.standby.spawn()
            else:
                self.standby.pause().addCallback(lambda _: self.standby.allow())
            self.capabilities.refresh()
            self.config = new
            self.log.info("configuration reloaded from {source}", source=new.source)
            return True
        finally:
            sdnotify.ready()
