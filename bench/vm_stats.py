"""
VM statistics with 50 running guests: the agent's cached C{Host.getAllVmStats}
against libvirt's live C{getAllDomainStats()}, and the agent's idle CPU.

  1. 50 diskless guests under the agent ([sampling] vm_stats_interval and
     host_stats_interval 2 s); after the sampler has filled every VM's cache,
     20 C{Host.getAllVmStats} calls through the client library (STOMP/TLS),
     one after another: latency of each.
  2. The agent's CPU while idle: utime+stime of its process over 30 s, the
     client connected but silent.
  3. The agent's guests destroyed, the same 50 guests under libvirtd; 20
     C{conn.getAllDomainStats()} calls (all stats groups, libvirt-python's
     default), and for reference 20 with the groups VDSM asks for.

Targets: agent >= 10x faster than libvirt (median latency ratio); idle CPU
<= 2 % of one core.

Run from the repository root as root:
    /opt/vdsm-twisted/venv/bin/python bench/vm_stats.py [--vms 50] [--calls 20] [--idle 30]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as h  # noqa: E402

INTERVAL = 2.0


async def agent_part(agent: h.Agent, vms: int, calls: int, idle: float) -> dict:
    from twisted.internet import defer

    client, events = await h.connect(agent)
    try:
        ids = [str(uuid.uuid4()) for _ in range(vms)]
        h.progress(f"agent: creating {vms} VMs")
        for start in range(0, vms, 10):
            batch = ids[start:start + 10]
            await defer.gatherResults([
                client.call("VM.create", {"vmID": vm_id, "vmParams": {
                    "xml": h.domain_xml(vm_id, f"bench-s{start + i}")}}, timeout=120)
                for i, vm_id in enumerate(batch)], consumeErrors=True)
            await defer.gatherResults([events.wait(vm_id, "Up", timeout=120) for vm_id in batch],
                                      consumeErrors=True)
        waited = await h.in_thread(h.wait_quiet, h.qemu_pids_of(ids))
        h.progress(f"agent: all Up, guests quiet after {waited:.0f} s; "
                   "waiting for the sampler to cover them")
        deadline = time.monotonic() + 6 * INTERVAL
        while True:
            stats = await client.call("Host.getAllVmStats")
            sampled = [s for s in stats if "cpuUsage" in s]
            if len(stats) == vms and len(sampled) == vms:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"{len(sampled)}/{len(stats)} VMs sampled after "
                                   f"{6 * INTERVAL}s")
            await h.sleep(0.5)
        await h.sleep(INTERVAL)   # a second pass: rates too
        latencies = []
        size = 0
        for _ in range(calls):
            t0 = time.monotonic()
            stats = await client.call("Host.getAllVmStats")
            latencies.append(time.monotonic() - t0)
            assert len(stats) == vms, len(stats)
            size = len(repr(stats))
        h.progress(f"agent: getAllVmStats {h.summary(latencies)}; idle CPU over {idle:g} s")
        # Idle: no calls, just the connection (heartbeats) and the samplers.
        await h.sleep(1.0)
        c0, t0 = h.cpu_seconds(agent.pid), time.monotonic()
        await h.sleep(idle)
        c1, t1 = h.cpu_seconds(agent.pid), time.monotonic()
        cpu = (c1 - c0) / (t1 - t0)
        h.progress(f"agent: idle CPU {cpu * 100:.2f} % of one core; destroying the VMs")
        await defer.gatherResults([client.call("VM.destroy", {"vmID": vm_id}, timeout=120)
                                   for vm_id in ids], consumeErrors=True)
        return {"latencies": latencies, "cpu": cpu, "size": size}
    finally:
        await client.close()


def libvirt_part(lv: h.Libvirtd, vms: int, calls: int) -> dict:
    import libvirt

    ids = [str(uuid.uuid4()) for _ in range(vms)]
    h.progress(f"libvirt: creating {vms} domains")
    with ThreadPoolExecutor(8) as pool:
        list(pool.map(lambda p: lv.create(h.domain_xml(p[1], f"bench-ls{p[0]}"), p[1]),
                      enumerate(ids)))
    waited = h.wait_quiet(h.qemu_pids_of(ids))
    h.progress(f"libvirt: guests quiet after {waited:.0f} s")

    def timed(stats: int) -> list[float]:
        t0 = time.monotonic()
        lv.conn.getAllDomainStats(stats)     # untimed warm-up, as the agent's first pass
        h.progress(f"libvirt: first getAllDomainStats({stats}) took "
                   f"{time.monotonic() - t0:.2f} s")
        out = []
        for _ in range(calls):
            t0 = time.monotonic()
            result = lv.conn.getAllDomainStats(stats)
            out.append(time.monotonic() - t0)
            assert len(result) >= vms, len(result)
        return out

    default = timed(0)
    vdsm_groups = (libvirt.VIR_DOMAIN_STATS_STATE | libvirt.VIR_DOMAIN_STATS_CPU_TOTAL
                   | libvirt.VIR_DOMAIN_STATS_BALLOON | libvirt.VIR_DOMAIN_STATS_VCPU
                   | libvirt.VIR_DOMAIN_STATS_INTERFACE | libvirt.VIR_DOMAIN_STATS_BLOCK)
    vdsm = timed(vdsm_groups)
    h.progress(f"libvirt: getAllDomainStats() {h.summary(default)}; destroying")
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lv.destroy, ids))
    return {"default": default, "vdsm": vdsm}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=50)
    parser.add_argument("--calls", type=int, default=20)
    parser.add_argument("--idle", type=float, default=30.0)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (privd, libvirtd and the vdsm user need it)")


    agent = lv = None
    result: dict = {}
    try:
        h.progress("starting privd and the agent")
        agent = h.Agent(vm_stats_interval=INTERVAL, host_stats_interval=INTERVAL).start()
        h.progress("starting libvirtd")
        lv = h.Libvirtd().start()

        async def both():
            result["agent"] = await agent_part(agent, args.vms, args.calls, args.idle)
            result["libvirt"] = await h.in_thread(libvirt_part, lv, args.vms, args.calls)

        h.react(both)
    finally:
        h.progress("cleaning up")
        for thing in (lv, agent):
            if thing is not None:
                thing.stop()

    ours = h.median(result["agent"]["latencies"])
    theirs = h.median(result["libvirt"]["default"])
    vdsm_groups = h.median(result["libvirt"]["vdsm"])
    cpu = result["agent"]["cpu"]
    print(f"VM stats, {args.vms} running diskless guests, {args.calls} calls each")
    print(f"  agent   Host.getAllVmStats (STOMP/TLS, cached):  "
          f"{h.summary(result['agent']['latencies'])}")
    print(f"  libvirt getAllDomainStats() (all groups):       "
          f"{h.summary(result['libvirt']['default'])}")
    print(f"  libvirt getAllDomainStats(VDSM's groups):       "
          f"{h.summary(result['libvirt']['vdsm'])}  (reference)")
    print(f"  agent idle CPU, {args.idle:g} s, sampling every {INTERVAL:g} s: "
          f"{cpu * 100:.2f} % of one core")
    print(f"  targets: libvirt/agent >= 10, idle CPU <= 2 % of one core")
    print(f"  (VDSM's groups: libvirt/agent = {vdsm_groups / ours:.1f})")
    print(f"ratio: {theirs / ours:.1f} (libvirt getAllDomainStats / agent getAllVmStats latency)")
    print(f"ratio: {cpu * 100 / 2:.2f} (agent idle CPU / 2% of one core)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
