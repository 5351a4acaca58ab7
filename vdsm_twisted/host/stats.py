"""
Host usage for C{Host.getStats}: a background sampler and the arithmetic.

VDSM computes usage in the API call; here a L{HostStatsSampler} reads the
kernel's counters every few seconds (small /proc and /sys files: cheap enough
for the reactor thread) and the API only turns the two latest samples into
VDSM's C{Host.getStats} shape, so the call never waits.

Shapes follow VDSM: percentages are strings with two decimals (NIC rates
with one), memory sizes are integers in MiB, NIC byte counters are strings.
"""

from __future__ import annotations

import os
import re
import time
from typing import Callable

import attr
from twisted.logger import Logger

from vdsm_twisted.common.periodic import PeriodicService
from vdsm_twisted.host.caps import parse_cpulist, parse_meminfo

log = Logger()

_CLK_TCK = os.sysconf("SC_CLK_TCK")
_PAGE_SIZE = os.sysconf("SC_PAGE_SIZE")
_MiB = 1024 * 1024
#: VDSM rates a NIC of unknown speed (loopback, virtio) against 1 Gb/s.
DEFAULT_NIC_SPEED = 1000
_IFF_UP = 0x1


@attr.frozen
class CpuTimes:
    """One C{cpu} line of C{/proc/stat}, in clock ticks."""

    user: int = 0
    nice: int = 0
    system: int = 0
    idle: int = 0
    iowait: int = 0
    irq: int = 0
    softirq: int = 0
    steal: int = 0

    @property
    def total(self) -> int:
        return (self.user + self.nice + self.system + self.idle + self.iowait
                + self.irq + self.softirq + self.steal)


@attr.frozen
class NicSample:
    rx: int
    tx: int
    rx_errors: int
    rx_dropped: int
    tx_errors: int
    tx_dropped: int
    speed: int = 0  # Mb/s, 0 when the driver does not say
    up: bool = False


@attr.frozen
class HostSample:
    """Everything read at one instant; L{compute} works on two of these."""

    time: float  # clock.seconds() when taken
    cpu: CpuTimes
    cpus: dict  # {cpu index: CpuTimes}
    boot_time: int
    uptime: float
    meminfo: dict  # kB
    loadavg: tuple
    self_ticks: tuple  # (utime, stime, starttime) of this process, in ticks
    nics: dict  # {name: NicSample}
    node_mem: dict = attr.Factory(dict)  # {node: meminfo kB}
    ksm: dict = attr.Factory(dict)  # {"run": int, "pages_to_scan": int, ...}
    thp: str = ""
    hugepages: dict = attr.Factory(dict)  # {size kB: {counter: int}}


# -- pure parsers ----------------------------------------------------------

def parse_proc_stat(text: str) -> tuple[CpuTimes, dict[int, CpuTimes], int]:
    """C{/proc/stat} -> (all CPUs, per CPU, boot time in epoch seconds)."""
    total, per_cpu, btime = CpuTimes(), {}, 0
    for line in text.splitlines():
        fields = line.split()
        if not fields:
            continue
        if fields[0].startswith("cpu"):
            times = CpuTimes(*(int(v) for v in fields[1:9]))
            if fields[0] == "cpu":
                total = times
            else:
                per_cpu[int(fields[0][3:])] = times
        elif fields[0] == "btime":
            btime = int(fields[1])
    return total, per_cpu, btime


def parse_net_dev(text: str) -> dict[str, NicSample]:
    """C{/proc/net/dev} -> byte, error and drop counters per interface."""
    nics = {}
    for line in text.splitlines()[2:]:
        name, sep, rest = line.partition(":")
        if not sep:
            continue
        v = [int(x) for x in rest.split()]
        # receive: bytes packets errs drop fifo frame compressed multicast
        # transmit: bytes packets errs drop fifo colls carrier compressed
        nics[name.strip()] = NicSample(rx=v[0], rx_errors=v[2], rx_dropped=v[3],
                                       tx=v[8], tx_errors=v[10], tx_dropped=v[11])
    return nics


def parse_self_stat(text: str) -> tuple[int, int, int]:
    """C{/proc/<pid>/stat} -> (utime, stime, starttime) in ticks.

    The command name may hold spaces and parentheses: fields are counted
    after its last C{")"}.
    """
    fields = text[text.rindex(")") + 2:].split()
    # fields[0] is field 3 (state); utime/stime are 14/15, starttime 22.
    return int(fields[11]), int(fields[12]), int(fields[19])


def parse_loadavg(text: str) -> tuple[float, float, float]:
    a, b, c = text.split()[:3]
    return float(a), float(b), float(c)


def parse_thp(text: str) -> str:
    """C{"always [madvise] never"} -> C{"madvise"}."""
    m = re.search(r"\[(\w+)\]", text)
    return m.group(1) if m else ""


# -- arithmetic ------------------------------------------------------------

def _pct(part: float, whole: float) -> float:
    return 100.0 * part / whole if whole > 0 else 0.0


def cpu_usage(prev: CpuTimes, last: CpuTimes) -> dict[str, str]:
    """VDSM's C{cpuUser}/C{cpuSys}/C{cpuIdle} between two readings."""
    total = last.total - prev.total
    user = (last.user + last.nice) - (prev.user + prev.nice)
    system = ((last.system + last.irq + last.softirq + last.steal)
              - (prev.system + prev.irq + prev.softirq + prev.steal))
    idle = (last.idle + last.iowait) - (prev.idle + prev.iowait)
    if total <= 0:
        return {"cpuUser": "0.00", "cpuSys": "0.00", "cpuIdle": "100.00"}
    return {"cpuUser": f"{_pct(user, total):.2f}",
            "cpuSys": f"{_pct(system, total):.2f}",
            "cpuIdle": f"{_pct(idle, total):.2f}"}


def nic_rate(prev_bytes: int, last_bytes: int, seconds: float, speed_mbps: int) -> float:
    """Percent of the link's speed used, capped at 100 (VDSM's C{rxRate})."""
    if seconds <= 0:
        return 0.0
    delta = max(0, last_bytes - prev_bytes)  # a counter reset is no traffic
    bits_per_second = delta * 8 / seconds
    return min(100.0, _pct(bits_per_second, (speed_mbps or DEFAULT_NIC_SPEED) * 1e6))


def compute(prev: HostSample | None, last: HostSample, *,
            vm_count: int = 0, vm_active: int = 0,
            mem_committed: int = 0, numa_map: dict[int, int] | None = None) -> dict:
    """C{Host.getStats} from two samples.

    With no previous sample CPU use is the average since boot and NIC rates
    are 0.  C{mem_committed} is the memory promised to VMs, in MiB.
    """
    numa_map = numa_map or {}
    base_cpu = prev.cpu if prev is not None else CpuTimes()
    stats: dict = dict(cpu_usage(base_cpu, last.cpu))

    cpu_stats = {}
    for index, times in sorted(last.cpus.items()):
        before = prev.cpus.get(index, CpuTimes()) if prev is not None else CpuTimes()
        cpu_stats[str(index)] = {"nodeIndex": numa_map.get(index, 0),
                                 **cpu_usage(before, times)}
    stats["cpuStatistics"] = cpu_stats

    # This process's share of the whole host's CPU time.
    ticks = last.cpu.total - base_cpu.total
    prev_self = prev.self_ticks if prev is not None else (0, 0, 0)
    stats["cpuUserVdsmd"] = f"{_pct(last.self_ticks[0] - prev_self[0], ticks):.2f}"
    stats["cpuSysVdsmd"] = f"{_pct(last.self_ticks[1] - prev_self[1], ticks):.2f}"
    stats["cpuLoad"] = f"{last.loadavg[0]:.2f}"

    mem = last.meminfo
    total_mib = mem.get("MemTotal", 0) // 1024
    free_kib = mem.get("MemAvailable",
                       mem.get("MemFree", 0) + mem.get("Buffers", 0) + mem.get("Cached", 0))
    free_mib = free_kib // 1024
    stats["memFree"] = free_mib
    stats["memAvailable"] = max(0, free_mib - mem_committed)
    stats["memCommitted"] = mem_committed
    stats["memUsed"] = str(int(round(100 - _pct(free_mib, total_mib)))) if total_mib else "0"
    stats["swapTotal"] = mem.get("SwapTotal", 0) // 1024
    stats["swapFree"] = mem.get("SwapFree", 0) // 1024
    stats["memShared"] = last.ksm.get("pages_sharing", 0) * _PAGE_SIZE // _MiB
    stats["ksmState"] = bool(last.ksm.get("run", 0))
    stats["ksmPages"] = last.ksm.get("pages_to_scan", 0)
    stats["thpState"] = last.thp
    stats["hugepages"] = {size: dict(counters) for size, counters in last.hugepages.items()}

    stats["numaNodeMemFree"] = {
        node: {"memFree": str(info.get("MemFree", 0) // 1024),
               "memPercent": int(round(100 - _pct(info.get("MemFree", 0),
                                                  info.get("MemTotal", 0))))
               if info.get("MemTotal") else 0}
        for node, info in sorted(last.node_mem.items())
    }

    interval = last.time - prev.time if prev is not None else 0.0
    network = {}
    for name, nic in sorted(last.nics.items()):
        before = prev.nics.get(name) if prev is not None else None
        rx_rate = tx_rate = 0.0
        if before is not None:
            rx_rate = nic_rate(before.rx, nic.rx, interval, nic.speed)
            tx_rate = nic_rate(before.tx, nic.tx, interval, nic.speed)
        network[name] = {
            "name": name,
            "rxRate": f"{rx_rate:.1f}", "txRate": f"{tx_rate:.1f}",
            "rx": str(nic.rx), "tx": str(nic.tx),
            "rxDropped": str(nic.rx_dropped), "txDropped": str(nic.tx_dropped),
            "rxErrors": str(nic.rx_errors), "txErrors": str(nic.tx_errors),
            "speed": str(nic.speed or DEFAULT_NIC_SPEED),
            "state": "up" if nic.up else "down",
            "sampleTime": last.time,
        }
    stats["network"] = network

    stats["bootTime"] = last.boot_time
    stats["uptime"] = int(last.uptime)
    # The agent's own uptime: from its process start, so it survives re-exec.
    stats["elapsedTime"] = max(0, int(last.uptime - last.self_ticks[2] / _CLK_TCK))
    stats["vmCount"] = vm_count
    stats["vmActive"] = vm_active
    stats["dateTime"] = time.strftime("%Y-%m-%dT%H:%M:%S GMT", time.gmtime(last.time))
    return stats


# -- reading the system ----------------------------------------------------

def _read(path: str, default: str = "") -> str:
    try:
        with open(path, encoding="ascii", errors="replace") as f:
            return f.read()
    except OSError:
        return default


def _int(path: str, default: int = 0) -> int:
    try:
        return int(_read(path).strip())
    except ValueError:
        return default


def numa_cpu_map(sys: str = "/sys") -> dict[int, int]:
    """{cpu: NUMA node} from sysfs (empty without NUMA support)."""
    base = os.path.join(sys, "devices", "system", "node")
    mapping = {}
    for name in _listdir(base):
        if re.fullmatch(r"node\d+", name):
            for cpu in parse_cpulist(_read(os.path.join(base, name, "cpulist"))):
                mapping[cpu] = int(name[4:])
    return mapping


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def read_sample(now: float, proc: str = "/proc", sys: str = "/sys") -> HostSample:
    """Read every counter once (a few small files)."""
    cpu, cpus, btime = parse_proc_stat(_read(os.path.join(proc, "stat")))
    net = os.path.join(sys, "class", "net")
    nics = {}
    for name, counters in parse_net_dev(_read(os.path.join(proc, "net", "dev"))).items():
        speed = _int(os.path.join(net, name, "speed"), 0)
        flags = _read(os.path.join(net, name, "flags")).strip()
        up = bool(int(flags, 16) & _IFF_UP) if flags else False
        nics[name] = attr.evolve(counters, speed=max(speed, 0), up=up)
    nodes = os.path.join(sys, "devices", "system", "node")
    node_mem = {name[4:]: parse_meminfo(_read(os.path.join(nodes, name, "meminfo")))
                for name in _listdir(nodes) if re.fullmatch(r"node\d+", name)}
    ksm_dir = os.path.join(sys, "kernel", "mm", "ksm")
    ksm = {key: _int(os.path.join(ksm_dir, key)) for key in
           ("run", "pages_to_scan", "pages_sharing")
           if os.path.exists(os.path.join(ksm_dir, key))}
    hp_dir = os.path.join(sys, "kernel", "mm", "hugepages")
    hugepages = {}
    for entry in _listdir(hp_dir):
        m = re.fullmatch(r"hugepages-(\d+)kB", entry)
        if m:
            hugepages[m.group(1)] = {
                key: _int(os.path.join(hp_dir, entry, key))
                for key in ("nr_hugepages", "free_hugepages", "resv_hugepages",
                            "surplus_hugepages", "nr_overcommit_hugepages")}
    uptime_text = _read(os.path.join(proc, "uptime")).split()
    return HostSample(
        time=now, cpu=cpu, cpus=cpus, boot_time=btime,
        uptime=float(uptime_text[0]) if uptime_text else 0.0,
        meminfo=parse_meminfo(_read(os.path.join(proc, "meminfo"))),
        loadavg=parse_loadavg(_read(os.path.join(proc, "loadavg"), "0 0 0")),
        self_ticks=parse_self_stat(_read(os.path.join(proc, "self", "stat"))),
        nics=nics, node_mem=node_mem, ksm=ksm,
        thp=parse_thp(_read(os.path.join(sys, "kernel", "mm", "transparent_hugepage",
                                         "enabled"))),
        hugepages=hugepages,
    )


class HostStatsSampler(PeriodicService):
    """Samples host counters every C{interval} seconds; L{snapshot} reads them.

    A failed sample is logged and the loop goes on: stats are never worth
    stopping the agent for.
    """

    def __init__(self, interval: float, clock=None, proc: str = "/proc", sys: str = "/sys",
                 vm_counts: Callable[[], tuple[int, int]] | None = None,
                 mem_committed: Callable[[], int] | None = None):
        super().__init__(interval, clock)
        self.proc = proc
        self.sys = sys
        self.vm_counts = vm_counts
        self.mem_committed = mem_committed
        self._numa_map = numa_cpu_map(sys)
        self._prev: HostSample | None = None
        self._last: HostSample | None = None

    def step(self) -> None:
        self.sample()

    def sample(self) -> None:
        """Take one sample now (the loop's body; tests call it too)."""
        try:
            sample = read_sample(self.clock.seconds(), self.proc, self.sys)
        except Exception:
            log.failure("reading host statistics failed")
            return
        self._prev, self._last = self._last, sample

    def snapshot(self) -> dict:
        """The latest usage in VDSM's C{Host.getStats} shape."""
        if self._last is None:
            self.sample()
            if self._last is None:
                raise RuntimeError("host statistics unavailable")
        vm_count, vm_active = self.vm_counts() if self.vm_counts is not None else (0, 0)
        committed = self.mem_committed() if self.mem_committed is not None else 0
        return compute(self._prev, self._last, vm_count=vm_count, vm_active=vm_active,
                       mem_committed=committed, numa_map=self._numa_map)
