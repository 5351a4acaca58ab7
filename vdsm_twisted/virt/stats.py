"""
Background VM statistics: one sampling pass over every running VM per
interval, into each VM's cache (VDSM's design, done asynchronously).

CPU and memory come from /proc/PID, network from the taps' counters in
/sys/class/net, disks from QMP C{query-blockstats}.  A monitor that does not
answer within the QMP timeout marks the VM C{monitorResponse: "-1"}; the API
keeps answering from the cache and never waits on a slow QEMU.
"""

from __future__ import annotations

import os
from typing import Callable, Iterable

from twisted.internet import defer
from twisted.logger import Logger

from vdsm_twisted.common.periodic import PeriodicService
from vdsm_twisted.virt import status as st
from vdsm_twisted.virt.qemu import qmp as qmplib

log = Logger()
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")


def read_cpu_ticks(pid: int, proc: str = "/proc") -> tuple[int, int] | None:
    """(utime, stime) of a process in clock ticks, all threads included."""
    try:
        with open(f"{proc}/{pid}/stat", "rb") as f:
            data = f.read()
    except OSError:
        return None
    fields = data[data.rindex(b")") + 2:].split()
    return int(fields[11]), int(fields[12])


def read_rss_bytes(pid: int, proc: str = "/proc") -> int | None:
    try:
        with open(f"{proc}/{pid}/statm", "rb") as f:
            return int(f.read().split()[1]) * PAGE_SIZE
    except (OSError, IndexError, ValueError):
        return None


def read_nic_counters(tap: str, sys: str = "/sys") -> dict[str, int] | None:
    base = f"{sys}/class/net/{tap}/statistics"
    out = {}
    try:
        for name in ("rx_bytes", "tx_bytes", "rx_packets", "tx_packets", "rx_errors",
                     "tx_errors", "rx_dropped", "tx_dropped"):
            with open(f"{base}/{name}", "rb") as f:
                out[name] = int(f.read())
    except (OSError, ValueError):
        return None
    return out


def _rate(now: float, then: float, dt: float) -> float:
    return max(0.0, (now - then) / dt) if dt > 0 else 0.0


class VmStatsSampler(PeriodicService):
    """Samples all running VMs every C{interval} seconds."""

    name = "vm-stats"

    def __init__(self, vms: Callable[[], Iterable], interval: float, qmp_timeout: float,
                 clock=None, proc: str = "/proc", sys: str = "/sys"):
        super().__init__(interval, clock)
        self._vms = vms
        self.qmp_timeout = qmp_timeout
        self.proc = proc
        self.sys = sys
        self._previous: dict[str, dict] = {}
        self._pass: defer.Deferred | None = None

    def step(self):
        return self.sample_all()

    def sample_all(self) -> defer.Deferred | None:
        """One pass; a pass still waiting on slow monitors is not stacked."""
        if self._pass is not None:
            return None
        vms = [vm for vm in self._vms() if vm.status in st.RUNNING and vm.pid]
        live = {vm.id for vm in vms}
        for gone in set(self._previous) - live:
            del self._previous[gone]
        d = defer.DeferredList([self.sample(vm) for vm in vms], consumeErrors=True)

        def done(_):
            self._pass = None

        self._pass = d
        d.addBoth(done)
        return None

    @defer.inlineCallbacks
    def sample(self, vm):
        now = self.clock.seconds()
        previous = self._previous.get(vm.id)
        current = {"time": now, "cpu": read_cpu_ticks(vm.pid, self.proc),
                   "nics": {tap: read_nic_counters(tap, self.sys) for tap in getattr(vm, "taps", ())}}
        stats: dict = {}
        dt = now - previous["time"] if previous else 0.0
        ncpu = max(1, vm.domain.vcpus)
        if current["cpu"] is not None:
            user, system = current["cpu"]
            if previous and previous["cpu"] is not None and dt > 0:
                pu, ps = previous["cpu"]
                cpu_user = _rate(user, pu, dt) / CLK_TCK * 100 / ncpu
                cpu_sys = _rate(system, ps, dt) / CLK_TCK * 100 / ncpu
            else:
                cpu_user = cpu_sys = 0.0
            stats.update({"cpuUser": f"{min(cpu_user, 100.0):.2f}",
                          "cpuSys": f"{min(cpu_sys, 100.0):.2f}",
                          "cpuUsage": str((user + system) * (10 ** 9 // CLK_TCK))})
        rss = read_rss_bytes(vm.pid, self.proc)
        if rss is not None and vm.domain.memory_kib:
            stats["memUsage"] = str(min(100, int(rss * 100 / (vm.domain.memory_kib * 1024))))
            stats["memoryStats"] = {"rss": str(rss // 1024)}
        stats["network"] = self._network(vm, current["nics"], previous, dt)
        disks = yield self._disks(vm, previous, current, dt)
        if disks is not None:
            stats["disks"] = disks
        self._previous[vm.id] = current
        vm.stats = stats

    def _network(self, vm, nics, previous, dt) -> dict:
        out = {}
        macs = [nic.mac for nic in vm.domain.nics]
        for index, (tap, counters) in enumerate(nics.items()):
            if counters is None:
                continue
            before = previous["nics"].get(tap) if previous else None
            # The tap's rx is what the guest sent (its tx), and the other way round.
            entry = {"name": tap, "macAddr": macs[index] if index < len(macs) else "",
                     "rx": str(counters["tx_bytes"]), "tx": str(counters["rx_bytes"]),
                     "rxErrors": str(counters["tx_errors"]), "txErrors": str(counters["rx_errors"]),
                     "rxDropped": str(counters["tx_dropped"]), "txDropped": str(counters["rx_dropped"]),
                     "sampleTime": self.clock.seconds()}
            if before is not None and dt > 0:
                entry["rxRate"] = f"{_rate(counters['tx_bytes'], before['tx_bytes'], dt):.1f}"
                entry["txRate"] = f"{_rate(counters['rx_bytes'], before['rx_bytes'], dt):.1f}"
            else:
                entry["rxRate"] = entry["txRate"] = "0.0"
            out[tap] = entry
        return out

    @defer.inlineCallbacks
    def _disks(self, vm, previous, current, dt):
        qmp = getattr(vm, "qmp", None)
        if qmp is None:
            vm.monitor_responsive = False
            return None
        try:
            blockstats = yield qmp.query_blockstats(timeout=self.qmp_timeout)
        except qmplib.QMPTimeout:
            if vm.monitor_responsive:
                log.warn("VM {vm}: monitor did not answer within {t}s", vm=vm.id, t=self.qmp_timeout)
            vm.monitor_responsive = False
            return None
        except qmplib.QMPFailure:
            vm.monitor_responsive = False
            return None
        vm.monitor_responsive = True
        disks = {}
        before = previous.get("blocks", {}) if previous else {}
        blocks = {}
        for entry in blockstats:
            name = entry.get("qdev") or entry.get("device") or entry.get("node-name") or "?"
            name = name.rsplit("/", 1)[-1]
            s = entry.get("stats", {})
            blocks[name] = s
            old = before.get(name)
            rd, wr = s.get("rd_bytes", 0), s.get("wr_bytes", 0)
            disk = {"readBytes": str(rd), "writtenBytes": str(wr),
                    "readOps": str(s.get("rd_operations", 0)),
                    "writeOps": str(s.get("wr_operations", 0)),
                    "readLatency": str(s.get("rd_total_time_ns", 0) // max(1, s.get("rd_operations", 0))),
                    "writeLatency": str(s.get("wr_total_time_ns", 0) // max(1, s.get("wr_operations", 0))),
                    "flushLatency": str(s.get("flush_total_time_ns", 0) // max(1, s.get("flush_operations", 0)))}
            if old is not None and dt > 0:
                disk["readRate"] = f"{_rate(rd, old.get('rd_bytes', 0), dt):.1f}"
                disk["writeRate"] = f"{_rate(wr, old.get('wr_bytes', 0), dt):.1f}"
            else:
                disk["readRate"] = disk["writeRate"] = "0.0"
            disks[name] = disk
        current["blocks"] = blocks
        return disks
