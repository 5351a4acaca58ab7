"""
The agent's resident memory (VmRSS of its process) with 0 and with 50 running
guests.

The agent starts (privd, the agent as C{vdsm}, production logging, sampling
every 2 s); a client connects and subscribes to events; RSS is read at 0 VMs
after a few sampling passes, then 50 diskless guests are created through the
API, and once they are quiet and sampled (and C{Host.getAllVmStats},
C{Host.getVMFullList} have been answered, so the reply paths have run) RSS is
read again. Each figure is the median of several readings a second apart;
VmHWM (the peak) is shown too.

Target: <= 60 MiB with 50 VMs (VDSM: about 150 MB).

Run from the repository root as root:
    /opt/vdsm-twisted/venv/bin/python bench/agent_rss.py [--vms 50]
"""

from __future__ import annotations

import argparse
import os
import sys
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as h  # noqa: E402

INTERVAL = 2.0
TARGET_KIB = 60 * 1024
READINGS = 5


async def rss(pid: int) -> int:
    values = []
    for _ in range(READINGS):
        values.append(h.status_kib(pid, "VmRSS"))
        await h.sleep(1.0)
    return int(h.median(values))


async def measure(agent: h.Agent, vms: int) -> dict:
    from twisted.internet import defer

    client, events = await h.connect(agent)
    try:
        await h.sleep(INTERVAL)
        fresh = await rss(agent.pid)
        # What an engine does first when it adds a host.
        await client.call("Host.getCapabilities", timeout=60)
        await client.call("Host.getAllVmStats")
        await h.sleep(2 * INTERVAL)
        idle = await rss(agent.pid)
        h.progress(f"0 VMs: VmRSS {fresh / 1024:.1f} MiB before any call, {idle / 1024:.1f} MiB "
                   f"after getCapabilities; creating {vms} VMs")
        ids = [str(uuid.uuid4()) for _ in range(vms)]
        for start in range(0, vms, 10):
            batch = ids[start:start + 10]
            await defer.gatherResults([
                client.call("VM.create", {"vmID": vm_id, "vmParams": {
                    "xml": h.domain_xml(vm_id, f"bench-r{start + i}")}}, timeout=120)
                for i, vm_id in enumerate(batch)], consumeErrors=True)
            await defer.gatherResults([events.wait(vm_id, "Up", timeout=120) for vm_id in batch],
                                      consumeErrors=True)
        waited = await h.in_thread(h.wait_quiet, h.qemu_pids_of(ids))
        h.progress(f"{vms} VMs Up, quiet after {waited:.0f} s")
        await h.sleep(2 * INTERVAL)
        stats = await client.call("Host.getAllVmStats")
        assert len(stats) == vms and all("cpuUsage" in s for s in stats), "not sampled"
        await client.call("Host.getVMFullList")
        busy = await rss(agent.pid)
        hwm = h.status_kib(agent.pid, "VmHWM")
        anon = h.status_kib(agent.pid, "RssAnon")
        standby = agent.stack.serving_pid()
        standby_rss = await rss(standby) if standby not in (None, agent.pid) else None
        h.progress(f"{vms} VMs: VmRSS {busy / 1024:.1f} MiB (peak {hwm / 1024:.1f}); destroying")
        await defer.gatherResults([client.call("VM.destroy", {"vmID": vm_id}, timeout=120)
                                   for vm_id in ids], consumeErrors=True)
        return {"fresh": fresh, "idle": idle, "busy": busy, "hwm": hwm, "anon": anon,
                "standby": standby_rss}
    finally:
        await client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=50)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (privd and the vdsm user need it)")


    agent = None
    result: dict = {}
    try:
        h.progress("starting privd and the agent")
        agent = h.Agent(vm_stats_interval=INTERVAL, host_stats_interval=INTERVAL,
                        standby=os.environ.get("BENCH_STANDBY", "1") == "1").start()

        async def go():
            result.update(await measure(agent, args.vms))

        h.react(go)
    finally:
        h.progress("cleaning up")
        if agent is not None:
            agent.stop()

    print(f"agent RSS (VmRSS, median of {READINGS} readings)")
    print(f"  0 VMs, connected, before any call:  {result['fresh'] / 1024:.1f} MiB")
    print(f"  0 VMs, after Host.getCapabilities:  {result['idle'] / 1024:.1f} MiB")
    print(f"  {args.vms} VMs:                             {result['busy'] / 1024:.1f} MiB  "
          f"(anonymous {result['anon'] / 1024:.1f} MiB; "
          f"+{(result['busy'] - result['idle']) / max(1, args.vms):.0f} KiB per VM; "
          f"peak VmHWM {result['hwm'] / 1024:.1f} MiB)")
    if result.get("standby"):
        print(f"  its warm standby (a separate process, idle): {result['standby'] / 1024:.1f} MiB"
              " (not counted: [agent] standby = false removes it)")
    print("  target: <= 60 MiB with 50 VMs (VDSM: ~150 MB)")
    print(f"ratio: {result['busy'] / TARGET_KIB:.2f} (agent RSS with {args.vms} VMs / 60 MiB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
