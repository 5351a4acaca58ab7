"""
Live migration, source side: QEMU streams the guest to the destination
agent's QEMU directly; this agent drives and watches.

    Up ─▶ Migration Source ─▶ (destination agent: VM.migrationCreate, QEMU -incoming)
            │  QMP migrate tcp:DST:PORT, poll query-migrate (progress events)
            ├─ completed ─▶ quit QEMU ─▶ Down (exitReason 4, migration succeeded)
            └─ failed / cancelled / timed out ─▶ Up again; destination VM destroyed

There is never a second running copy: the destination resumes its guest only
once QEMU reports the incoming state complete, which happens only after the
source guest stopped for the final pass.
"""

from __future__ import annotations

import time
from typing import Any

from twisted.internet import defer
from twisted.logger import Logger

from vdsm_twisted.api import errors
from vdsm_twisted.virt import status as st

POLL_INTERVAL = 0.25


def _host_port(dst: str, default_port: int = 54321) -> tuple[str, int]:
    if not isinstance(dst, str) or not dst:
        raise errors.InvalidParams("dst must be 'host' or 'host:port' of the destination agent")
    if dst.startswith("["):  # [v6]:port
        host, _, rest = dst[1:].partition("]")
        return host, int(rest[1:]) if rest.startswith(":") else default_port
    host, sep, port = dst.rpartition(":")
    if not sep:
        return dst, default_port
    try:
        return host, int(port)
    except ValueError:
        raise errors.InvalidParams(f"dst {dst!r}: bad port") from None


def _number(params: dict, name: str, default, kind, low, high):
    """A numeric migration parameter (VDSM sends many numbers as strings)."""
    value = params.get(name)
    if value is None or value == "":
        return default
    try:
        number = kind(value)
    except (TypeError, ValueError):
        raise errors.InvalidParams(f"params.{name}: expected a number, got {value!r}") from None
    if not low <= number <= high:
        raise errors.InvalidParams(f"params.{name}: {number} is out of range {low}..{high}")
    return number


class OutgoingMigration:
    log = Logger()

    def __init__(self, vm, params: dict, connect_agent):
        self.vm = vm
        self.params = params
        self._connect_agent = connect_agent
        self.dst_host, self.dst_port = _host_port(params.get("dst"))
        self.qemu_host = params.get("dstqemu") or self.dst_host
        if not isinstance(self.qemu_host, str):
            raise errors.InvalidParams("dstqemu must be an address")
        self.downtime_ms = _number(params, "downtime", 500, int, 1, 60_000)
        bandwidth = _number(params, "maxBandwidth", 0, int, 0, 1_000_000)
        self.bandwidth = bandwidth * 1024 * 1024 if bandwidth else None  # MiB/s
        self.timeout = _number(params, "migrationTimeout",
                               _number(params, "timeout", 600, float, 1, 86400), float, 1, 86400)
        self.progress = 0
        self.state = "starting"
        self.message = "Migration in progress"
        self.cancelled = False
        self.done: defer.Deferred | None = None
        self._client = None
        #: Called with the progress percentage (the task's progress).
        self.on_progress = lambda percent: None

    def status(self) -> dict:
        code = {"failed": 12, "cancelled": 12}.get(self.state, 0)
        return {"status": {"code": code, "message": self.message}, "progress": self.progress,
                "migrationStats": {"state": self.state, "progress": self.progress}}

    def start(self) -> defer.Deferred:
        self.done = defer.ensureDeferred(self._run())
        return self.done

    def cancel(self) -> None:
        self.cancelled = True
        if self.vm.qmp is not None:
            self.vm.qmp.execute("migrate_cancel", timeout=self.vm.driver.qmp_timeout) \
                .addErrback(lambda f: None)

    def _nap(self, reactor) -> defer.Deferred:
        """Until the next poll, or sooner if QEMU reports a migration state."""
        self._wake = defer.Deferred()
        timer = reactor.callLater(POLL_INTERVAL, self.wake)
        self._wake.addBoth(lambda r: (timer.active() and timer.cancel(), r)[1])
        return self._wake

    def wake(self, status: str | None = None) -> None:
        wake, self._wake = getattr(self, "_wake", None), None
        if wake is not None and not wake.called:
            wake.callback(status)

    def _publish(self) -> None:
        self.on_progress(self.progress)
        self.vm.bus.publish(f"|virt|VM_migration_status|{self.vm.id}",
                            {self.vm.id: {"progress": self.progress, "state": self.state}})

    async def _run(self) -> None:
        vm = self.vm
        qmp_timeout = vm.driver.qmp_timeout
        created = False
        try:
            await vm._before_hook("before_vm_migrate_source")
            vm.set_status(st.MIGRATION_SOURCE)
            self._client = await self._connect_agent(self.dst_host, self.dst_port)
            answer = await self._client.call("VM.migrationCreate", {
                "vmID": vm.id, "params": {"vmId": vm.id, "xml": vm.domain.xml,
                                          **{k: v for k, v in vm.params.items()
                                             if k in ("custom", "vmName")}}}, timeout=120)
            created = True
            port = int(answer["migrationPort"])
            if self.cancelled:
                raise _Cancelled()
            params: dict[str, Any] = {"downtime-limit": self.downtime_ms}
            if self.bandwidth:
                params["max-bandwidth"] = self.bandwidth
            await vm.qmp.execute("migrate-set-parameters", params, timeout=qmp_timeout)
            # MIGRATION events wake the watcher at once (polling is the fallback).
            await vm.qmp.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": True}]}, timeout=qmp_timeout)
            await vm.qmp.execute("migrate", {"uri": f"tcp:{self.qemu_host}:{port}"},
                                 timeout=qmp_timeout)
            self.state = "active"
            started = time.monotonic()
            while True:
                info = await vm.qmp.execute("query-migrate", timeout=qmp_timeout)
                state = info.get("status")
                ram = info.get("ram") or {}
                if ram.get("total"):
                    done = ram["total"] - ram.get("remaining", ram["total"])
                    self.progress = max(self.progress, min(99, int(done * 100 / ram["total"])))
                    self._publish()
                if state == "completed":
                    break
                if state in ("failed", "cancelled"):
                    raise _Cancelled() if state == "cancelled" else \
                        RuntimeError(info.get("error-desc") or "QEMU reports the migration failed")
                if time.monotonic() - started > self.timeout:
                    self.log.warn("VM {vm}: migration did not converge within {t}s; cancelling",
                                  vm=vm.id, t=self.timeout)
                    self.message = f"Migration timed out after {self.timeout:g}s"
                    await vm.qmp.execute("migrate_cancel", timeout=qmp_timeout)
                    self.cancelled = True
                await self._nap(vm.driver.reactor)
        except Exception as e:
            failed = "cancelled" if isinstance(e, _Cancelled) or self.cancelled else "failed"
            if not (self.cancelled and self.message.startswith("Migration timed out")):
                self.message = ("Migration canceled" if failed == "cancelled"
                                else f"Migration failed: {e}")
            # The source first: it runs on, whatever becomes of the destination.
            if vm.child is not None and vm.child.running and vm.status == st.MIGRATION_SOURCE:
                try:
                    state = await vm.qmp.query_status(timeout=qmp_timeout)
                    if state == "postmigrate":  # stopped for the final pass: run again
                        await vm.qmp.cont(timeout=qmp_timeout)
                except Exception:  # noqa: BLE001
                    pass
                vm.set_status(st.UP)
            self.state = failed
            self.log.warn("VM {vm}: migration {state}: {msg}", vm=vm.id, state=failed,
                          msg=self.message)
            self._publish()
            if created and self._client is not None:
                try:
                    await self._client.call("VM.destroy", {"vmID": vm.id}, timeout=30)
                except Exception as destroy_error:  # noqa: BLE001 - logged, source survives
                    self.log.error("VM {vm}: destination copy not destroyed ({e}); its QEMU "
                                   "ends by itself when the incoming stream fails", vm=vm.id,
                                   e=str(destroy_error))
            return
        finally:
            if self._client is not None:
                self._client.close()
        self.progress, self.state, self.message = 100, "completed", "Migration done"
        self._publish()
        self.log.info("VM {vm}: migrated to {dst}", vm=vm.id, dst=self.params.get("dst"))
        vm._ending = st.ExitReason.MIGRATION_SUCCEEDED
        await vm.destroy(grace=vm.driver.destroy_grace)
        vm.run_hook("after_vm_migrate_source")


class _Cancelled(Exception):
    pass
