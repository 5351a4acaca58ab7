"""Host statistics: the arithmetic on fake counters, and the sampler on this machine."""

import os
import socket
import threading
import time

import pytest
from twisted.internet import task
from twisted.trial import unittest

from vdsm_twisted.host import stats
from vdsm_twisted.host.stats import CpuTimes, NicSample

NET_DEV = """\
Inter-|   Receive                                                |  Transmit
 face |bytes    packets errs drop fifo frame compressed multicast|bytes    packets errs drop fifo colls carrier compressed
    lo: {lo_rx}      29    0    0    0     0          0         0     {lo_tx}      29    0    0    0     0       0          0
  eth0: {eth_rx}    1782    3    4    0     0          0         0   {eth_tx}    1153    5    6    0     0       0          0
"""

PROC_STAT = """\
cpu  {u} 0 {s} {i} 0 0 0 0 0 0
cpu0 {u0} 0 {s0} {i0} 0 0 0 0 0 0
cpu1 {u1} 0 {s1} {i1} 0 0 0 0 0 0
intr 173584 0 0
ctxt 378957
btime 1700000000
processes 7000
"""

SELF_STAT = "4242 (my (odd) name) S 1 4242 4242 0 -1 4194304 99 0 0 0 {ut} {st} 0 0 20 0 " \
            "1 0 {start} 3133440 396 18446744073709551615 1 2 3 0 0 0 0 0 0 0 0 0 17 0 0 0\n"


def _write(path, text):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w") as f:
        f.write(text)


class FakeHost:
    """A /proc and /sys tree whose counters a test moves."""

    def __init__(self, root):
        self.proc, self.sys = os.path.join(root, "proc"), os.path.join(root, "sys")
        _write(f"{self.proc}/meminfo", "MemTotal: 8388608 kB\nMemFree: 1048576 kB\n"
               "MemAvailable: 2097152 kB\nSwapTotal: 1048576 kB\nSwapFree: 524288 kB\n")
        _write(f"{self.proc}/loadavg", "1.50 0.70 0.20 2/100 999\n")
        node = f"{self.sys}/devices/system/node"
        for n in (0, 1):
            _write(f"{node}/node{n}/cpulist", f"{n}\n")
            _write(f"{node}/node{n}/meminfo", f"Node {n} MemTotal: 4194304 kB\n"
                                              f"Node {n} MemFree: 1048576 kB\n")
        _write(f"{self.sys}/class/net/eth0/speed", "100\n")  # 100 Mb/s = 12.5 MB/s
        _write(f"{self.sys}/class/net/eth0/flags", "0x1003\n")
        _write(f"{self.sys}/class/net/lo/flags", "0x9\n")
        _write(f"{self.sys}/kernel/mm/ksm/run", "1\n")
        _write(f"{self.sys}/kernel/mm/ksm/pages_to_scan", "64\n")
        _write(f"{self.sys}/kernel/mm/ksm/pages_sharing", "512\n")
        _write(f"{self.sys}/kernel/mm/transparent_hugepage/enabled", "[always] madvise never\n")
        _write(f"{self.sys}/kernel/mm/hugepages/hugepages-2048kB/nr_hugepages", "8\n")
        _write(f"{self.sys}/kernel/mm/hugepages/hugepages-2048kB/free_hugepages", "3\n")
        self.set(cpu=(0, 0, 0, 0), ut=0, st=0, lo=(0, 0), eth=(0, 0), uptime=100)

    def set(self, cpu, ut, st, lo, eth, uptime):
        """cpu: (user0, sys0, user1, sys1) ticks; each CPU has 100 ticks/s total."""
        u0, s0, u1, s1 = cpu
        busy_total = uptime * 100
        i0, i1 = busy_total - u0 - s0, busy_total - u1 - s1
        _write(f"{self.proc}/stat", PROC_STAT.format(
            u=u0 + u1, s=s0 + s1, i=i0 + i1, u0=u0, s0=s0, i0=i0, u1=u1, s1=s1, i1=i1))
        _write(f"{self.proc}/self/stat", SELF_STAT.format(ut=ut, st=st, start=4000))
        _write(f"{self.proc}/net/dev", NET_DEV.format(lo_rx=lo[0], lo_tx=lo[1],
                                                      eth_rx=eth[0], eth_tx=eth[1]))
        _write(f"{self.proc}/uptime", f"{uptime}.25 150.00\n")


def test_parse_proc_stat():
    total, per_cpu, btime = stats.parse_proc_stat(PROC_STAT.format(
        u=3, s=4, i=10, u0=1, s0=2, i0=5, u1=2, s1=2, i1=5))
    assert total == CpuTimes(user=3, system=4, idle=10)
    assert per_cpu == {0: CpuTimes(user=1, system=2, idle=5), 1: CpuTimes(user=2, system=2, idle=5)}
    assert btime == 1700000000


def test_parse_net_dev():
    nics = stats.parse_net_dev(NET_DEV.format(lo_rx=10, lo_tx=20, eth_rx=30, eth_tx=40))
    assert nics["lo"] == NicSample(rx=10, tx=20, rx_errors=0, rx_dropped=0,
                                   tx_errors=0, tx_dropped=0)
    assert nics["eth0"] == NicSample(rx=30, tx=40, rx_errors=3, rx_dropped=4,
                                     tx_errors=5, tx_dropped=6)


def test_parse_self_stat_survives_odd_names():
    assert stats.parse_self_stat(SELF_STAT.format(ut=11, st=7, start=123)) == (11, 7, 123)


def test_small_parsers():
    assert stats.parse_loadavg("0.01 0.07 0.04 1/86 6923\n") == (0.01, 0.07, 0.04)
    assert stats.parse_thp("always [madvise] never\n") == "madvise"
    assert stats.parse_thp("") == ""


def test_cpu_usage():
    prev = CpuTimes(user=100, nice=0, system=50, idle=850)
    last = CpuTimes(user=130, nice=10, system=60, idle=890, irq=5, softirq=5)
    # delta total 100: user 40, sys 20, idle 40
    assert stats.cpu_usage(prev, last) == {"cpuUser": "40.00", "cpuSys": "20.00",
                                           "cpuIdle": "40.00"}
    assert stats.cpu_usage(last, last)["cpuIdle"] == "100.00"


@pytest.mark.parametrize("delta, seconds, speed, expected", [
    (1_250_000, 1.0, 100, 10.0),    # 10 Mb/s on 100 Mb/s
    (1_250_000, 2.0, 100, 5.0),
    (12_500_000, 1.0, 0, 10.0),     # unknown speed: rated against 1 Gb/s
    (100_000_000, 1.0, 100, 100.0),  # capped
    (-5, 1.0, 100, 0.0),            # counter reset
    (1000, 0.0, 100, 0.0),          # no interval
])
def test_nic_rate(delta, seconds, speed, expected):
    assert stats.nic_rate(1000, 1000 + delta, seconds, speed) == pytest.approx(expected)


class SamplerTests(unittest.TestCase):

    def setUp(self):
        self.host = FakeHost(self.mktemp())
        self.clock = task.Clock()
        self.clock.advance(1_000_000)
        self.vms = (3, 2)
        self.sampler = stats.HostStatsSampler(2.0, clock=self.clock, proc=self.host.proc,
                                              sys=self.host.sys,
                                              vm_counts=lambda: self.vms,
                                              mem_committed=lambda: 1024)

    def test_rates_between_the_two_latest_samples(self):
        self.sampler.startService()
        self.addCleanup(self.sampler.stopService)
        first = self.sampler.snapshot()  # one sample: CPU since boot, NIC rates 0
        self.assertEqual(first["network"]["eth0"]["rxRate"], "0.0")
        self.assertEqual(first["cpuIdle"], "100.00")

        # 2 s later: eth0 moved 2.5 MB in, 0.25 MB out on a 100 Mb/s link;
        # cpu0 was 50% user, cpu1 25% sys; this process used 20 user ticks, 10 sys.
        self.host.set(cpu=(100, 0, 0, 50), ut=20, st=10, lo=(500, 500),
                      eth=(2_500_000, 250_000), uptime=102)
        self.clock.advance(2.0)
        s = self.sampler.snapshot()
        eth = s["network"]["eth0"]
        self.assertEqual((eth["rxRate"], eth["txRate"]), ("10.0", "1.0"))
        self.assertEqual((eth["rx"], eth["tx"]), ("2500000", "250000"))
        self.assertEqual((eth["rxErrors"], eth["rxDropped"], eth["txErrors"],
                          eth["txDropped"]), ("3", "4", "5", "6"))
        self.assertEqual((eth["speed"], eth["state"], eth["sampleTime"]),
                         ("100", "up", 1_000_002.0))
        lo = s["network"]["lo"]
        self.assertEqual((lo["speed"], lo["rxRate"], lo["state"]), ("1000", "0.0", "up"))
        self.assertEqual((s["cpuUser"], s["cpuSys"], s["cpuIdle"]), ("25.00", "12.50", "62.50"))
        self.assertEqual(s["cpuStatistics"], {
            "0": {"nodeIndex": 0, "cpuUser": "50.00", "cpuSys": "0.00", "cpuIdle": "50.00"},
            "1": {"nodeIndex": 1, "cpuUser": "0.00", "cpuSys": "25.00", "cpuIdle": "75.00"}})
        self.assertEqual((s["cpuUserVdsmd"], s["cpuSysVdsmd"]), ("5.00", "2.50"))
        self.assertEqual(s["cpuLoad"], "1.50")
        self.assertEqual((s["memFree"], s["memAvailable"], s["memCommitted"], s["memUsed"]),
                         (2048, 1024, 1024, "75"))
        self.assertEqual((s["swapTotal"], s["swapFree"]), (1024, 512))
        self.assertEqual((s["ksmState"], s["ksmPages"], s["memShared"]),
                         (True, 64, 512 * os.sysconf("SC_PAGE_SIZE") // 2**20))
        self.assertEqual(s["thpState"], "always")
        self.assertEqual(s["hugepages"]["2048"]["nr_hugepages"], 8)
        self.assertEqual(s["hugepages"]["2048"]["free_hugepages"], 3)
        self.assertEqual(s["numaNodeMemFree"], {"0": {"memFree": "1024", "memPercent": 75},
                                                "1": {"memFree": "1024", "memPercent": 75}})
        self.assertEqual((s["bootTime"], s["uptime"]), (1700000000, 102))
        self.assertEqual(s["elapsedTime"], 102 - 4000 // os.sysconf("SC_CLK_TCK"))
        self.assertEqual((s["vmCount"], s["vmActive"]), (3, 2))
        self.assertEqual(s["dateTime"], time.strftime("%Y-%m-%dT%H:%M:%S GMT",
                                                      time.gmtime(1_000_002)))

        # Another 2 s with no traffic: the rate falls back to 0.
        self.clock.advance(2.0)
        self.assertEqual(self.sampler.snapshot()["network"]["eth0"]["rxRate"], "0.0")

    def test_snapshot_does_not_sample_while_running(self):
        self.sampler.startService()
        self.addCleanup(self.sampler.stopService)
        self.host.set(cpu=(0, 0, 0, 0), ut=0, st=0, lo=(0, 0), eth=(9_000_000, 0), uptime=101)
        # Not yet time for a sample: the API sees the old counters.
        self.assertEqual(self.sampler.snapshot()["network"]["eth0"]["rx"], "0")

    def test_stop_cancels_the_loop(self):
        self.sampler.startService()
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.sampler.stopService()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertFalse(self.sampler.running)

    def test_snapshot_before_start_samples_once(self):
        s = self.sampler.snapshot()
        self.assertEqual(s["cpuLoad"], "1.50")
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_a_broken_sample_is_logged_and_the_loop_goes_on(self):
        self.sampler.startService()
        self.addCleanup(self.sampler.stopService)
        _write(f"{self.host.proc}/net/dev", NET_DEV.format(lo_rx="x", lo_tx=0,
                                                           eth_rx=0, eth_tx=0))
        self.clock.advance(2.0)
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        self.host.set(cpu=(0, 0, 0, 0), ut=0, st=0, lo=(0, 0), eth=(1_250_000, 0), uptime=104)
        self.clock.advance(2.0)
        # rate over the 4 s since the last good sample: 2.5 Mb/s on 100 Mb/s
        self.assertEqual(self.sampler.snapshot()["network"]["eth0"]["rxRate"], "2.5")
        self.assertTrue(self.sampler._loop.running)


def _loopback_traffic(nbytes):
    """Send nbytes over TCP on 127.0.0.1 and wait until all are received."""
    server = socket.create_server(("127.0.0.1", 0))
    received = []

    def sink():
        conn, _ = server.accept()
        with conn:
            total = 0
            while chunk := conn.recv(1 << 16):
                total += len(chunk)
            received.append(total)

    t = threading.Thread(target=sink)
    t.start()
    try:
        with socket.create_connection(server.getsockname()) as c:
            c.sendall(b"x" * nbytes)
    finally:
        t.join(10)
        server.close()
    assert received == [nbytes]


class RealSamplerTests(unittest.TestCase):

    def test_counters_move_on_this_machine(self):
        from twisted.internet import reactor
        sampler = stats.HostStatsSampler(60.0, clock=reactor)
        sampler.sample()
        before = sampler.snapshot()
        deadline = time.process_time() + 0.15
        while time.process_time() < deadline:  # burn some CPU in this process
            pass
        _loopback_traffic(20_000_000)
        sampler.sample()
        after = sampler.snapshot()
        lo_before, lo_after = before["network"]["lo"], after["network"]["lo"]
        self.assertGreaterEqual(int(lo_after["rx"]) - int(lo_before["rx"]), 20_000_000)
        self.assertGreater(float(lo_after["rxRate"]), 0.0)
        self.assertGreater(float(lo_after["txRate"]), 0.0)
        self.assertEqual(lo_after["state"], "up")
        self.assertGreater(float(after["cpuUser"]) + float(after["cpuSys"]), 0.0)
        self.assertGreater(float(after["cpuUserVdsmd"]) + float(after["cpuSysVdsmd"]), 0.0)
        self.assertEqual(set(after["cpuStatistics"]), {str(c) for c in range(os.cpu_count())})
        self.assertGreater(after["memFree"], 0)
        self.assertTrue(0 <= after["elapsedTime"] <= after["uptime"])
        self.assertLess(abs(after["bootTime"] + after["uptime"] - time.time()), 5)


def test_set_interval_restarts_the_loop_on_the_new_period(tmp_path):
    from twisted.internet import task as _task
    from vdsm_twisted.host.stats import HostStatsSampler

    clock = _task.Clock()
    sampler = HostStatsSampler(2.0, clock=clock)
    calls = []
    sampler.sample = lambda: calls.append(clock.seconds())
    sampler.startService()
    try:
        assert calls == [0]
        sampler.set_interval(0.5)
        clock.advance(0.5)
        clock.advance(0.5)
        assert calls == [0, 0.5, 1.0]
        assert sampler.interval == 0.5
    finally:
        sampler.stopService()
    clock.advance(5)
    assert calls == [0, 0.5, 1.0]
