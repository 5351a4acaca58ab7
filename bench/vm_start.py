"""
VM start latency: the agent against bare QEMU and against libvirt.

  (a) agent: C{VM.create} sent through the client library (STOMP over TLS)
      until the C{|virt|VM_status|<id>} event says C{Up};
  (b) bare QEMU: the command line the agent builds for the same domain, run
      as the same user, from spawn until C{query-status} says C{running}
      after C{qmp_capabilities}, C{query-status} and C{cont} (the agent does
      the same QMP work);
  (c) libvirt: C{createXML} of the same domain XML until it returns (the
      domain is running then).

One untimed warm-up start each, then N rounds, interleaved (agent, bare,
libvirt) so that host noise hits all three alike; each VM is destroyed
before the next. Medians are compared. Targets: agent <= 1.15x bare QEMU,
agent <= 0.6x libvirt.

Run from the repository root as root:
    /opt/vdsm-twisted/venv/bin/python bench/vm_start.py [--runs N]
"""

from __future__ import annotations

import argparse
import os
import sys
import time
import uuid

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as h  # noqa: E402


async def agent_start(client, events, name: str) -> float:
    vm_id = str(uuid.uuid4())
    xml = h.domain_xml(vm_id, name)
    up = events.wait(vm_id, "Up", timeout=60)
    t0 = time.monotonic()
    result = await client.call("VM.create", {"vmID": vm_id, "vmParams": {"xml": xml}},
                               timeout=60)
    if result.get("vmId") != vm_id or result.get("status") == "Down":
        raise RuntimeError(f"VM.create answered {result}")
    t1 = await up
    await client.call("VM.destroy", {"vmID": vm_id}, timeout=60)
    return t1 - t0


def bare_start(bare: h.BareQemu, name: str) -> float:
    vm_id = str(uuid.uuid4())
    argv = bare.argv(h.domain_xml(vm_id, name), vm_id)
    try:
        return bare.start(vm_id, argv)
    finally:
        bare.destroy(vm_id)


def libvirt_start(lv: h.Libvirtd, name: str) -> float:
    import libvirt

    vm_id = str(uuid.uuid4())
    xml = h.domain_xml(vm_id, name)
    t0 = time.monotonic()
    dom = lv.create(xml, vm_id)
    elapsed = time.monotonic() - t0
    state = dom.state()[0]
    lv.destroy(vm_id)
    if state != libvirt.VIR_DOMAIN_RUNNING:
        raise RuntimeError(f"libvirt domain state {state} after createXML")
    return elapsed


async def run(runs: int, agent: h.Agent, bare: h.BareQemu, lv: h.Libvirtd) -> dict:
    client, events = await h.connect(agent)
    try:
        times: dict[str, list[float]] = {"agent": [], "bare": [], "libvirt": []}
        h.progress("warm-up")
        await agent_start(client, events, "bench-warm-agent")
        await h.in_thread(bare_start, bare, "bench-warm-bare")
        await h.in_thread(libvirt_start, lv, "bench-warm-libvirt")
        for i in range(runs):
            times["agent"].append(await agent_start(client, events, f"bench-a{i}"))
            times["bare"].append(await h.in_thread(bare_start, bare, f"bench-b{i}"))
            times["libvirt"].append(await h.in_thread(libvirt_start, lv, f"bench-l{i}"))
            h.progress(f"round {i + 1}/{runs}: " + "  ".join(
                f"{k} {v[-1] * 1000:.0f} ms" for k, v in times.items()))
        return times
    finally:
        await client.close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=10)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (privd, libvirtd and the vdsm user need it)")


    agent = bare = lv = None
    try:
        h.progress("starting privd and the agent")
        agent = h.Agent().start()
        bare = h.BareQemu()
        h.progress("starting libvirtd")
        lv = h.Libvirtd().start()
        result: dict = {}

        async def go():
            result.update(await run(args.runs, agent, bare, lv))

        h.react(go)
    finally:
        h.progress("cleaning up")
        for thing in (lv, bare, agent):
            if thing is not None:
                thing.stop()

    a, b, l = (h.median(result[k]) for k in ("agent", "bare", "libvirt"))
    print(f"VM start latency, diskless 64 MiB / 1 vCPU KVM guest, {args.runs} runs each")
    print(f"  agent   VM.create -> Up event (STOMP/TLS): {h.summary(result['agent'])}")
    print(f"  bare    spawn -> QMP running:              {h.summary(result['bare'])}")
    print(f"  libvirt createXML:                         {h.summary(result['libvirt'])}")
    print(f"  targets: agent/bare <= 1.15, agent/libvirt <= 0.6")
    print(f"ratio: {a / b:.2f} (agent/bare qemu)")
    print(f"ratio: {a / l:.2f} (agent/libvirt)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
