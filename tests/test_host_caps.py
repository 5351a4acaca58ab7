"""Host capabilities: parsers on other machines' files, and this machine for real."""

import json
import os
import platform
import re
import subprocess
import threading

import pytest
from twisted.internet import defer
from twisted.trial import unittest

from tests import _procs
from vdsm_twisted.host import caps

CPUINFO_2S = """\
processor\t: {n}
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6130 CPU @ 2.10GHz
cpu MHz\t\t: 2100.000
physical id\t: {pkg}
core id\t\t: {core}
flags\t\t: fpu vme vmx sse2 avx512f

"""


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


@pytest.fixture
def fake_host(tmp_path):
    """A two-socket, two-core, two-thread, two-node host with a bridge, a bond, a vlan."""
    proc, sys, etc, dev = (str(tmp_path / d) for d in ("proc", "sys", "etc", "dev"))
    os.makedirs(dev)
    text = ""
    cpu = os.path.join(sys, "devices/system/cpu")
    for n in range(8):
        pkg, core = n // 4, (n // 2) % 2
        text += CPUINFO_2S.format(n=n, pkg=pkg, core=core)
        _write(f"{cpu}/cpu{n}/topology/physical_package_id", f"{pkg}\n")
        _write(f"{cpu}/cpu{n}/topology/core_id", f"{core}\n")
    _write(f"{cpu}/online", "0-7\n")
    _write(f"{proc}/cpuinfo", text)
    _write(f"{proc}/meminfo", "MemTotal:       16384000 kB\nMemFree:  100 kB\n")
    _write(f"{proc}/sys/kernel/numa_balancing", "1\n")
    _write(f"{proc}/cmdline", "root=/dev/sda1 quiet\n")
    node = os.path.join(sys, "devices/system/node")
    for n, (cpus, dist) in enumerate((("0-3", "10 21"), ("4-7", "21 10"))):
        _write(f"{node}/node{n}/cpulist", cpus + "\n")
        _write(f"{node}/node{n}/distance", dist + "\n")
        _write(f"{node}/node{n}/meminfo",
               f"Node {n} MemTotal:        8192000 kB\nNode {n} MemFree:  1024 kB\n")
        _write(f"{node}/node{n}/hugepages/hugepages-2048kB/nr_hugepages", "16\n")
    _write(f"{node}/possible", "0-1\n")  # not a node directory: ignored
    net = os.path.join(sys, "class/net")
    _write(f"{net}/lo/mtu", "65536\n")
    _write(f"{net}/eth0/mtu", "9000\n")
    _write(f"{net}/eth0/address", "52:54:00:12:34:56\n")
    _write(f"{net}/eth0/speed", "10000\n")
    os.makedirs(f"{net}/eth0/device")
    _write(f"{net}/eth1/speed", "-1\n")
    os.makedirs(f"{net}/eth1/device")
    _write(f"{net}/br0/mtu", "1500\n")
    _write(f"{net}/br0/bridge/stp_state", "1\n")
    os.makedirs(f"{net}/br0/brif/eth0")
    os.makedirs(f"{net}/br0/brif/vnet0")
    _write(f"{net}/bond0/bonding/slaves", "eth2 eth3\n")
    _write(f"{net}/bond0/bonding/mode", "active-backup 1\n")
    _write(f"{net}/eth0.10/uevent", "DEVTYPE=vlan\nINTERFACE=eth0.10\n")
    os.makedirs(f"{net}/eth0.10/lower_eth0")
    _write(f"{proc}/net/vlan/eth0.10", "eth0.10  VID: 10\t REORDER_HDR: 1\n")
    _write(f"{etc}/os-release", 'NAME="Fedora Linux"\nVERSION_ID=40\n'
                                'VERSION_CODENAME=""\nPRETTY_NAME="Fedora Linux 40"\n')
    _write(f"{etc}/machine-id", "0123456789abcdef0123456789abcdef\n")
    return dict(proc=proc, sys=sys, etc=etc, dev=dev)


def test_parse_cpulist():
    assert caps.parse_cpulist("0-3,8,10-11\n") == [0, 1, 2, 3, 8, 10, 11]
    assert caps.parse_cpulist("5") == [5]
    assert caps.parse_cpulist("\n") == []


def test_parse_meminfo_strips_node_prefix():
    assert caps.parse_meminfo("Node 1 MemTotal:  2048 kB\nHugePages_Total:  4\n") == {
        "MemTotal": 2048, "HugePages_Total": 4}


def test_parse_cpuinfo():
    cpus = caps.parse_cpuinfo(CPUINFO_2S.format(n=0, pkg=0, core=0)
                              + CPUINFO_2S.format(n=1, pkg=1, core=0))
    assert [c["processor"] for c in cpus] == ["0", "1"]
    assert cpus[1]["physical id"] == "1"
    assert cpus[0]["flags"] == "fpu vme vmx sse2 avx512f"


def test_versions():
    assert caps.parse_qemu_version(
        "QEMU emulator version 8.2.0 (qemu-kvm-8.2.0-11.el9)\nCopyright ...\n") == {
        "version": "8.2.0", "release": "qemu-kvm-8.2.0-11.el9"}
    assert caps.parse_qemu_version("qemu-img version 7.2.0\n") == {
        "version": "7.2.0", "release": ""}
    assert caps.parse_qemu_version("") is None
    assert caps.kernel_package("6.1.0-18-amd64") == {"version": "6.1.0", "release": "18-amd64"}
    assert caps.libvirt_package(9_010_002) == {"version": "9.10.2", "release": ""}


def test_collect_fake_host(fake_host, tmp_path):
    c = caps.collect(str(tmp_path / "no-such-id"), fake_host["proc"], fake_host["sys"],
                     etc=fake_host["etc"], dev=fake_host["dev"])
    assert c["cpuModel"] == "Intel(R) Xeon(R) Gold 6130 CPU @ 2.10GHz"
    assert c["cpuFlags"] == "fpu,vme,vmx,sse2,avx512f"
    assert (c["cpuSockets"], c["cpuCores"], c["cpuThreads"]) == ("2", "4", "8")
    assert c["onlineCpus"] == "0,1,2,3,4,5,6,7"
    assert c["cpuSpeed"] == "2100.000"
    assert c["memSize"] == "16000"
    assert c["numaNodes"] == {
        "0": {"cpus": [0, 1, 2, 3], "totalMemory": "8000",
              "hugepages": {"2048": {"totalPages": "16"}}},
        "1": {"cpus": [4, 5, 6, 7], "totalMemory": "8000",
              "hugepages": {"2048": {"totalPages": "16"}}}}
    assert c["numaNodeDistance"] == {"0": [10, 21], "1": [21, 10]}
    assert c["autoNumaBalancing"] == 1
    assert c["kvmEnabled"] == "false"  # no /dev/kvm in the fake /dev
    assert c["rngSources"] == []
    assert c["kernelArgs"] == "root=/dev/sda1 quiet"
    assert c["operatingSystem"] == {"name": "Fedora Linux", "version": "40", "release": "",
                                    "pretty_name": "Fedora Linux 40"}
    assert c["uuid"] == "01234567-89ab-cdef-0123-456789abcdef"
    assert c["selinux"] == {"mode": "-1"}
    assert c["nics"] == {"eth0": {"hwaddr": "52:54:00:12:34:56", "mtu": "9000", "speed": 10000},
                         "eth1": {"hwaddr": "", "mtu": "0", "speed": 0}}
    assert c["bridges"] == {"br0": {"ports": ["eth0", "vnet0"], "mtu": "1500",
                                    "hwaddr": "", "stp": "on"}}
    assert c["bondings"]["bond0"]["slaves"] == ["eth2", "eth3"]
    assert c["bondings"]["bond0"]["opts"] == {"mode": "1"}
    assert c["vlans"] == {"eth0.10": {"iface": "eth0", "mtu": "0", "vlanid": 10}}
    assert c["networks"] == {}
    assert c["vmTypes"] == ["kvm"]
    assert c["clusterLevels"] == c["supportedENGINEs"] == ["4.2", "4.3", "4.4", "4.5",
                                                           "4.6", "4.7"]


def test_host_uuid_precedence(fake_host, tmp_path):
    id_file = tmp_path / "vdsm.id"
    id_file.write_text("  11111111-2222-3333-4444-555555555555\n")
    machine_id = os.path.join(fake_host["etc"], "machine-id")
    assert caps.host_uuid(str(id_file), fake_host["sys"], machine_id) == \
        "11111111-2222-3333-4444-555555555555"
    _write(os.path.join(fake_host["sys"], "class/dmi/id/product_uuid"),
           "AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE\n")
    missing = str(tmp_path / "missing")
    assert caps.host_uuid(missing, fake_host["sys"], machine_id) == \
        "AAAAAAAA-BBBB-CCCC-DDDD-EEEEEEEEEEEE"
    assert caps.host_uuid(missing, str(tmp_path / "nosys"), machine_id) == \
        "01234567-89ab-cdef-0123-456789abcdef"
    with pytest.raises(RuntimeError):
        caps.host_uuid(missing, str(tmp_path / "nosys"), missing)


def test_kvm_enabled_asks_kvm(tmp_path):
    assert caps.kvm_enabled("/dev/kvm") is True  # root, and DESIGN.md: /dev/kvm works here
    assert caps.kvm_enabled("/dev/null") is False  # openable, but not KVM
    assert caps.kvm_enabled(str(tmp_path / "kvm")) is False


@pytest.mark.parametrize("user, expected", [("vdsm", "True"), ("nobody", "False")])
def test_kvm_enabled_is_per_process(code_dir, user, expected):
    """The agent's user (group kvm) may use KVM; a user outside the group may not."""
    probe = "from vdsm_twisted.host.caps import kvm_enabled; print(kvm_enabled())"
    out = subprocess.run([_procs.PYTHON, "-c", probe], capture_output=True, text=True,
                         check=True, cwd="/", env=_procs.env_for(code_dir),
                         **_procs.user_kwargs(user)).stdout
    assert out.strip() == expected


def test_collect_this_machine(tmp_path):
    """Every value matches what the system says through another door."""
    c = caps.collect(str(tmp_path / "none"))
    json.dumps(c)  # the wire must carry it
    assert int(c["cpuThreads"]) == len(os.sched_getaffinity(0)) or \
        int(c["cpuThreads"]) == os.cpu_count()
    with open("/proc/meminfo") as f:
        total_kb = int(re.search(r"MemTotal:\s+(\d+)", f.read()).group(1))
    assert c["memSize"] == str(total_kb // 1024)
    with open("/etc/machine-id") as f:
        machine_id = f.read().strip()
    if not os.path.exists("/sys/class/dmi/id/product_uuid"):
        assert c["uuid"].replace("-", "") == machine_id
    assert c["kvmEnabled"] == "true"
    qemu = subprocess.run(["qemu-system-x86_64", "--version"], capture_output=True,
                          text=True).stdout
    assert c["packages2"]["qemu-kvm"]["version"] in qemu
    import libvirt
    major, minor = divmod(libvirt.getVersion() // 1000, 1000)
    assert c["packages2"]["libvirt"]["version"].startswith(f"{major}.{minor}.")
    assert c["packages2"]["kernel"] == caps.kernel_package(platform.release())
    assert "lo" not in c["nics"]
    assert set(c["nics"]) <= set(os.listdir("/sys/class/net"))
    assert c["cpuFlags"] and " " not in c["cpuFlags"]
    assert sum(len(n["cpus"]) for n in c["numaNodes"].values()) == int(c["cpuThreads"])


class CapabilitiesCacheTests(unittest.TestCase):

    def setUp(self):
        self.calls = []
        self.gate = threading.Event()
        self.gate.set()

    def collector(self, host_uuid_file, **kwargs):
        self.gate.wait(10)
        self.calls.append((host_uuid_file, kwargs, threading.current_thread().name))
        if kwargs.get("fail"):
            raise OSError("boom")
        return {"uuid": "u", "n": len(self.calls)}

    @defer.inlineCallbacks
    def test_collects_once_in_a_thread(self):
        cache = caps.CapabilitiesCache("/id", collector=self.collector, proc="/p")
        self.gate.clear()
        first, second = cache.get(), cache.get()  # concurrent: one collection
        self.gate.set()
        results = yield defer.gatherResults([first, second])
        self.assertEqual(results, [{"uuid": "u", "n": 1}] * 2)
        third = yield cache.get()
        self.assertEqual(third, {"uuid": "u", "n": 1})
        self.assertEqual(len(self.calls), 1)
        self.assertEqual(self.calls[0][:2], ("/id", {"proc": "/p"}))
        self.assertNotEqual(self.calls[0][2], threading.current_thread().name)
        third["uuid"] = "changed by a caller"
        self.assertEqual((yield cache.get())["uuid"], "u")

    @defer.inlineCallbacks
    def test_refresh_collects_again(self):
        cache = caps.CapabilitiesCache("/id", collector=self.collector)
        self.assertEqual((yield cache.get())["n"], 1)
        cache.refresh()
        self.assertEqual((yield cache.get())["n"], 2)
        self.assertEqual((yield cache.get())["n"], 2)

    @defer.inlineCallbacks
    def test_refresh_during_collection_is_not_kept(self):
        cache = caps.CapabilitiesCache("/id", collector=self.collector)
        self.gate.clear()
        stale = cache.get()
        cache.refresh()
        self.gate.set()
        self.assertEqual((yield stale)["n"], 1)
        self.assertEqual((yield cache.get())["n"], 2)

    @defer.inlineCallbacks
    def test_failure_is_not_cached(self):
        cache = caps.CapabilitiesCache("/id", collector=self.collector, fail=True)
        with self.assertRaises(OSError):
            yield cache.get()
        self.assertEqual(len(self.flushLoggedErrors(OSError)), 1)
        with self.assertRaises(OSError):
            yield cache.get()
        self.flushLoggedErrors(OSError)
        self.assertEqual(len(self.calls), 2)

    @defer.inlineCallbacks
    def test_real_collection(self):
        cache = caps.CapabilitiesCache("/nonexistent/vdsm.id")
        c = yield cache.get()
        self.assertEqual(c["kvmEnabled"], "true")
        self.assertIn("qemu-kvm", c["packages2"])
