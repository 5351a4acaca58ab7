"""
What this host is: the answer to C{Host.getCapabilities}.

Key names and value shapes follow VDSM's, so the engine can read them: many
numbers are strings there (C{memSize}, C{cpuCores}, ...), and so they are
here.  Every value is read from the running system; the parsers take text or
a root directory so they can be tested on other machines' files.

L{collect} blocks (it runs C{qemu-system-x86_64 --version}, resolves the
FQDN, imports libvirt): L{CapabilitiesCache} runs it once in a thread.
"""

from __future__ import annotations

import fcntl
import os
import platform
import re
import socket
import subprocess
import uuid as _uuid
from typing import Callable

from twisted.internet import defer, threads
from twisted.logger import Logger
from twisted.python.failure import Failure

import vdsm_twisted

log = Logger()

#: Engine cluster levels this agent speaks (VDSM 4.50's list).
CLUSTER_LEVELS = ["4.2", "4.3", "4.4", "4.5", "4.6", "4.7"]

#: _IO(KVMIO, 0x00): answers the KVM API version, which has been 12 forever.
_KVM_GET_API_VERSION = 0xAE00
_KVM_API_VERSION = 12

_QEMU_VERSION = re.compile(r"version\s+(\S+)(?:\s+\((.*?)\))?")


# -- small readers ---------------------------------------------------------

def _read(path: str, default: str | None = None) -> str | None:
    try:
        with open(path, encoding="utf-8", errors="replace") as f:
            return f.read()
    except OSError:
        return default


def _read_int(path: str, default: int | None = None) -> int | None:
    text = _read(path)
    try:
        return int(text.strip()) if text is not None else default
    except ValueError:
        return default


# -- pure parsers ----------------------------------------------------------

def parse_cpulist(text: str) -> list[int]:
    """C{"0-3,8,10-11"} (the kernel's cpulist format) -> C{[0,1,2,3,8,10,11]}."""
    cpus: list[int] = []
    for part in text.strip().split(","):
        part = part.strip()
        if not part:
            continue
        if "-" in part:
            lo, hi = part.split("-", 1)
            cpus.extend(range(int(lo), int(hi) + 1))
        else:
            cpus.append(int(part))
    return cpus


def parse_cpuinfo(text: str) -> list[dict[str, str]]:
    """C{/proc/cpuinfo} -> one C{{field: value}} per logical CPU."""
    processors: list[dict[str, str]] = []
    current: dict[str, str] = {}
    for line in text.splitlines():
        if not line.strip():
            if current:
                processors.append(current)
                current = {}
            continue
        key, sep, value = line.partition(":")
        if sep:
            current[key.strip()] = value.strip()
    if current:
        processors.append(current)
    return processors


def parse_meminfo(text: str) -> dict[str, int]:
    """C{/proc/meminfo} (or a NUMA node's meminfo) -> values in kB.

    Node files prefix every line with C{"Node N "}; that prefix is dropped.
    """
    values: dict[str, int] = {}
    for line in text.splitlines():
        key, sep, rest = line.partition(":")
        if not sep:
            continue
        key = re.sub(r"^Node \d+ ", "", key.strip())
        fields = rest.split()
        if fields:
            try:
                values[key] = int(fields[0])
            except ValueError:
                pass
    return values


def parse_os_release(text: str) -> dict[str, str]:
    """C{/etc/os-release} -> VDSM's C{operatingSystem} shape."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition("=")
        if sep and not key.startswith("#"):
            fields[key.strip()] = value.strip().strip('"').strip("'")
    return {
        "name": fields.get("NAME", ""),
        "version": fields.get("VERSION_ID", ""),
        "release": fields.get("VERSION_CODENAME", ""),
        "pretty_name": fields.get("PRETTY_NAME", ""),
    }


def parse_qemu_version(text: str) -> dict[str, str] | None:
    """C{"QEMU emulator version 7.2.22 (Debian 1:7.2+dfsg-7)"} -> version/release."""
    first = text.strip().splitlines()[0] if text.strip() else ""
    m = _QEMU_VERSION.search(first)
    if m is None:
        return None
    return {"version": m.group(1), "release": m.group(2) or ""}


def kernel_package(release: str) -> dict[str, str]:
    """C{uname -r} (C{"6.1.0-18-amd64"}) -> C{{"version": "6.1.0", "release": "18-amd64"}}."""
    version, _, rel = release.partition("-")
    return {"version": version, "release": rel}


def libvirt_package(version: int) -> dict[str, str]:
    """libvirt's packed version (C{major*1e6 + minor*1e3 + micro}) -> VDSM's shape."""
    major, rest = divmod(version, 1_000_000)
    minor, micro = divmod(rest, 1_000)
    return {"version": f"{major}.{minor}.{micro}", "release": ""}


def machine_id_uuid(text: str) -> str:
    """C{/etc/machine-id} (32 hex digits) -> a uuid string."""
    return str(_uuid.UUID(hex=text.strip()))


# -- sysfs walkers (take the root so tests can give a fake tree) -----------

def cpu_topology(sys: str = "/sys") -> dict:
    """Sockets, cores and threads of the online CPUs, from sysfs topology."""
    base = os.path.join(sys, "devices", "system", "cpu")
    online_text = _read(os.path.join(base, "online"))
    if online_text is not None:
        online = parse_cpulist(online_text)
    else:
        online = sorted(int(n[3:]) for n in os.listdir(base) if re.fullmatch(r"cpu\d+", n))
    sockets, cores = set(), set()
    for cpu in online:
        topo = os.path.join(base, f"cpu{cpu}", "topology")
        package = _read_int(os.path.join(topo, "physical_package_id"), 0)
        core = _read_int(os.path.join(topo, "core_id"), cpu)
        sockets.add(package)
        cores.add((package, core))
    return {
        "sockets": len(sockets),
        "cores": len(cores),
        "threads": len(online),
        "online": online,
    }


def numa_nodes(sys: str = "/sys") -> tuple[dict, dict]:
    """C{(numaNodes, numaNodeDistance)} in VDSM's shape, from sysfs."""
    base = os.path.join(sys, "devices", "system", "node")
    nodes: dict[str, dict] = {}
    distances: dict[str, list[int]] = {}
    try:
        names = os.listdir(base)
    except OSError:
        return nodes, distances
    for name in sorted((n for n in names if re.fullmatch(r"node\d+", n)),
                       key=lambda n: int(n[4:])):
        node_id = name[4:]
        path = os.path.join(base, name)
        meminfo = parse_meminfo(_read(os.path.join(path, "meminfo"), ""))
        hugepages = {}
        hp_dir = os.path.join(path, "hugepages")
        for entry in sorted(_listdir(hp_dir)):
            m = re.fullmatch(r"hugepages-(\d+)kB", entry)
            if m:
                total = _read_int(os.path.join(hp_dir, entry, "nr_hugepages"), 0)
                hugepages[m.group(1)] = {"totalPages": str(total)}
        nodes[node_id] = {
            "cpus": parse_cpulist(_read(os.path.join(path, "cpulist"), "")),
            "totalMemory": str(meminfo.get("MemTotal", 0) // 1024),
            "hugepages": hugepages,
        }
        distances[node_id] = [int(d) for d in _read(os.path.join(path, "distance"), "").split()]
    return nodes, distances


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path)
    except OSError:
        return []


def net_devices(sys: str = "/sys", proc: str = "/proc") -> dict[str, dict]:
    """C{nics}, C{bridges}, C{bondings}, C{vlans} summaries from C{/sys/class/net}.

    A NIC is an interface backed by a device (C{device} link); loopback, taps
    and other virtual interfaces are not NICs, as in VDSM.
    """
    base = os.path.join(sys, "class", "net")
    result: dict[str, dict] = {"nics": {}, "bridges": {}, "bondings": {}, "vlans": {}}
    for name in sorted(_listdir(base)):
        path = os.path.join(base, name)
        uevent = dict(line.split("=", 1) for line in
                      _read(os.path.join(path, "uevent"), "").splitlines() if "=" in line)
        mtu = str(_read_int(os.path.join(path, "mtu"), 0))
        hwaddr = (_read(os.path.join(path, "address"), "") or "").strip()
        if os.path.isdir(os.path.join(path, "bridge")):
            stp = _read_int(os.path.join(path, "bridge", "stp_state"), 0)
            result["bridges"][name] = {
                "ports": sorted(_listdir(os.path.join(path, "brif"))),
                "mtu": mtu, "hwaddr": hwaddr, "stp": "on" if stp else "off",
            }
        elif os.path.isdir(os.path.join(path, "bonding")):
            slaves = (_read(os.path.join(path, "bonding", "slaves"), "") or "").split()
            mode = (_read(os.path.join(path, "bonding", "mode"), "") or "").split()
            result["bondings"][name] = {
                "slaves": slaves, "mtu": mtu, "hwaddr": hwaddr,
                "opts": {"mode": mode[-1]} if mode else {},
            }
        elif uevent.get("DEVTYPE") == "vlan":
            lower = [n[len("lower_"):] for n in _listdir(path) if n.startswith("lower_")]
            vlan = {"iface": lower[0] if lower else "", "mtu": mtu}
            vlan_id = _vlan_id(name, proc)
            if vlan_id is not None:
                vlan["vlanid"] = vlan_id
            result["vlans"][name] = vlan
        elif os.path.exists(os.path.join(path, "device")):
            speed = _read_int(os.path.join(path, "speed"), 0)
            result["nics"][name] = {
                "hwaddr": hwaddr, "mtu": mtu,
                "speed": speed if speed and speed > 0 else 0,
            }
    return result


def _vlan_id(name: str, proc: str) -> int | None:
    # /proc/net/vlan/<dev> is root-only; its first line ends with "VID: <n>".
    text = _read(os.path.join(proc, "net", "vlan", name))
    m = re.search(r"VID:\s*(\d+)", text or "")
    return int(m.group(1)) if m else None


# -- probes that touch the system -----------------------------------------

def kvm_enabled(device: str = "/dev/kvm") -> bool:
    """True when this process can open C{/dev/kvm} read-write and KVM answers.

    We ask KVM itself (C{KVM_GET_API_VERSION}) rather than look for vmx/svm in
    the CPU flags: KVM also runs without them (e.g. the PVM backend), and the
    flags say nothing about whether this unprivileged process may use it.
    """
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        log.info("KVM unavailable: {device}: {error}", device=device, error=e.strerror)
        return False
    try:
        return fcntl.ioctl(fd, _KVM_GET_API_VERSION) == _KVM_API_VERSION
    except OSError as e:
        log.info("KVM unavailable: {device} ioctl: {error}", device=device, error=e.strerror)
        return False
    finally:
        os.close(fd)


def host_uuid(host_uuid_file: str, sys: str = "/sys",
              machine_id_file: str = "/etc/machine-id") -> str:
    """The host's uuid: the configured file, else DMI, else the machine id."""
    for path in (host_uuid_file, os.path.join(sys, "class", "dmi", "id", "product_uuid")):
        text = _read(path)
        if text and text.strip():
            return text.strip()
    text = _read(machine_id_file)
    if text and text.strip():
        return machine_id_uuid(text)
    raise RuntimeError(f"no host uuid: {host_uuid_file}, DMI and {machine_id_file} "
                       f"are all missing")


def _command_version(argv: list[str]) -> dict[str, str] | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        log.warn("cannot get version of {cmd}: {error}", cmd=argv[0], error=e)
        return None
    return parse_qemu_version(out)


def packages(qemu: str = "qemu-system-x86_64", qemu_img: str = "qemu-img") -> dict:
    """VDSM's C{packages2}: versions of QEMU, qemu-img, libvirt and the kernel."""
    result = {"kernel": kernel_package(platform.release())}
    for name, argv in (("qemu-kvm", [qemu, "--version"]), ("qemu-img", [qemu_img, "--version"])):
        version = _command_version(argv)
        if version is not None:
            result[name] = version
    # Asked of the installed tools, not of libvirt-python: importing it maps
    # libvirt.so and ~40 libraries (~12 MB RSS) into an agent that never calls it.
    for argv in (["libvirtd", "--version"], ["virsh", "--version"]):
        version = _libvirt_version(argv)
        if version is not None:
            result["libvirt"] = version
            break
    else:
        log.info("libvirt version unknown (neither libvirtd nor virsh answers)")
    return result


_DOTTED = re.compile(r"(\d+)\.(\d+)\.(\d+)")


def _libvirt_version(argv: list[str]) -> dict[str, str] | None:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=30,
                             stdin=subprocess.DEVNULL, check=True).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = _DOTTED.search(out)
    if m is None:
        return None
    major, minor, micro = (int(g) for g in m.groups())
    return libvirt_package(major * 1_000_000 + minor * 1_000 + micro)


def selinux_mode(sys: str = "/sys") -> str:
    """VDSM's C{selinux.mode}: "1" enforcing, "0" permissive, "-1" disabled."""
    value = _read_int(os.path.join(sys, "fs", "selinux", "enforce"))
    return "-1" if value is None else str(value)


# -- the whole answer ------------------------------------------------------

def collect(host_uuid_file: str, proc: str = "/proc", sys: str = "/sys", *,
            etc: str = "/etc", dev: str = "/dev",
            qemu: str = "qemu-system-x86_64", qemu_img: str = "qemu-img") -> dict:
    """Gather C{Host.getCapabilities}.  Blocking: run it in a thread."""
    cpus = parse_cpuinfo(_read(os.path.join(proc, "cpuinfo"), ""))
    first = cpus[0] if cpus else {}
    flags = first.get("flags", "").split()
    topology = cpu_topology(sys)
    meminfo = parse_meminfo(_read(os.path.join(proc, "meminfo"), ""))
    nodes, distances = numa_nodes(sys)
    net = net_devices(sys, proc)
    numa_balancing = _read_int(os.path.join(proc, "sys", "kernel", "numa_balancing"))
    rng = [name for name in ("random", "hwrng") if os.path.exists(os.path.join(dev, name))]
    version = vdsm_twisted.__version__
    return {
        "cpuModel": first.get("model name", ""),
        "cpuFlags": ",".join(flags),
        "cpuVendor": first.get("vendor_id", ""),
        "cpuSockets": str(topology["sockets"]),
        "cpuCores": str(topology["cores"]),
        "cpuThreads": str(topology["threads"]),
        "onlineCpus": ",".join(str(c) for c in topology["online"]),
        "cpuSpeed": first.get("cpu MHz", "0"),
        "memSize": str(meminfo.get("MemTotal", 0) // 1024),
        "numaNodes": nodes,
        "numaNodeDistance": distances,
        "autoNumaBalancing": 2 if numa_balancing is None else min(numa_balancing, 1),
        "kvmEnabled": "true" if kvm_enabled(os.path.join(dev, "kvm")) else "false",
        "vmTypes": ["kvm"],
        "rngSources": rng,
        "packages2": packages(qemu, qemu_img),
        "kernelArgs": (_read(os.path.join(proc, "cmdline"), "") or "").strip(),
        "operatingSystem": parse_os_release(_read(os.path.join(etc, "os-release"), "")),
        "selinux": {"mode": selinux_mode(sys)},
        "uuid": host_uuid(host_uuid_file, sys, os.path.join(etc, "machine-id")),
        "hostname": socket.getfqdn(),
        "software_version": version,
        "software_revision": "0",
        "version_name": "vdsm-twisted",
        "clusterLevels": list(CLUSTER_LEVELS),
        "supportedENGINEs": list(CLUSTER_LEVELS),
        # oVirt logical networks are configured by Host.setupNetworks; none yet.
        "networks": {},
        "bridges": net["bridges"],
        "nics": net["nics"],
        "bondings": net["bondings"],
        "vlans": net["vlans"],
    }


class CapabilitiesCache:
    """Collects the capabilities once, in a thread, and keeps them.

    Concurrent callers during the first collection share it.  L{refresh}
    (SIGHUP) drops the cache; a collection already running when it is called
    still answers its callers but is not kept.
    """

    def __init__(self, host_uuid_file: str, reactor=None, *,
                 collector: Callable[..., dict] = collect, **collect_kwargs):
        if reactor is None:
            from twisted.internet import reactor
        self._reactor = reactor
        self._collector = collector
        self._args = (host_uuid_file,)
        self._kwargs = collect_kwargs
        self._cached: dict | None = None
        self._waiting: list[defer.Deferred] | None = None
        self._generation = 0

    def get(self) -> defer.Deferred:
        """The capabilities (a fresh copy of the top level each time)."""
        if self._cached is not None:
            return defer.succeed(dict(self._cached))
        d: defer.Deferred = defer.Deferred()
        if self._waiting is not None:
            self._waiting.append(d)
            return d
        waiting = self._waiting = [d]
        work = threads.deferToThreadPool(self._reactor, self._reactor.getThreadPool(),
                                         self._collector, *self._args, **self._kwargs)
        work.addBoth(self._collected, waiting, self._generation)
        return d

    def refresh(self) -> None:
        """Forget the cached answer; the next L{get} collects again."""
        self._generation += 1
        self._cached = None
        self._waiting = None

    def _collected(self, result, waiting, generation):
        if generation == self._generation:
            self._waiting = None
        if isinstance(result, Failure):
            log.failure("collecting host capabilities failed", result)
            for d in waiting:
                d.errback(result)
            return None
        if generation == self._generation:
            self._cached = result
        for d in waiting:
            d.callback(dict(result))
        return None
