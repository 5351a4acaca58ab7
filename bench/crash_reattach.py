"""
Crash reattach: the agent after C{kill -9} against libvirtd after a restart,
20 running guests each.

  (a) agent, warm standby (the product's default): 20 diskless guests;
      C{kill -9} the serving agent and time from the kill to every VM
      re-attached and controllable, seen from outside through fresh TLS
      connections: C{Host.getVMList} (code 99 until recovery is done) lists
      all 20 C{Up}, then a C{VM.getStats}.  No restart is needed: the standby
      takes over.  Each round kills whichever agent serves (the previous
      round's standby) once its own standby is ready.
  (a') agent, cold restart (C{standby = false} behaviour): the standby is
      killed first, then the agent, and it is started again with the same
      config (C{Stack.start_agent()}); time from that restart, as libvirtd.
      Every QEMU must be the same process afterwards.
  (b) libvirtd: the same 20 guests as libvirt domains under a private
      libvirtd; kill it (SIGTERM, as C{systemctl restart} does, and SIGKILL,
      like the agent's crash) and start it again; time from the restart until
      a fresh connection's C{listAllDomains()} lists all 20 running; also
      until every domain answers a QMP C{query-status} through libvirt
      (C{qemuMonitorCommand}: the monitor really re-attached).

The two hosts run one after the other, so each has only its own 20 guests.
Target: agent / libvirtd (SIGTERM restart) <= 0.5; the ratio printed last is
the warm-standby agent's (kill to all Up) against libvirtd's restart (restart
to all listed, its stop not counted: that favours libvirtd).

Run from the repository root as root:
    /opt/vdsm-twisted/venv/bin/python bench/crash_reattach.py [--runs 5] [--vms 20]
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as h  # noqa: E402


def wait_all_up(agent: h.Agent, ids: list[str], t0: float, seen: dict) -> int:
    """Poll with fresh connections until every VM is listed Up; returns how many 99s."""
    deadline = t0 + 120
    codes_99 = 0
    client = None
    while True:
        if time.monotonic() > deadline:
            raise RuntimeError("the agent did not list every VM Up in 120 s")
        try:
            if client is None:
                client = h.SyncStomp(agent.stack.port, h.tls_context(agent.stack.pki_dir),
                                     timeout=30).connect()
                seen.setdefault("connected", time.monotonic())
            listed = {v["vmId"]: v["status"] for v in client.call("Host.getVMList")}
            if all(listed.get(vm_id) == "Up" for vm_id in ids):
                seen["listed"] = time.monotonic()
                break
        except h.RpcError as e:
            if e.code != 99:
                raise
            codes_99 += 1
        except (OSError, ConnectionError):
            if client is not None:
                client.close()
                client = None
        time.sleep(0.002)
    # Controllable: a call that needs the VM's monitor.
    stats = client.call("VM.getStats", {"vmID": ids[0]})
    client.close()
    if stats[0]["status"] != "Up":
        raise RuntimeError(f"VM.getStats after recovery: {stats[0]['status']}")
    return codes_99


def standby_round(agent: h.Agent, ids: list[str], qemu: dict[str, int], serving: int,
                  n_ready: int) -> tuple[dict, int]:
    """kill -9 the serving agent once its standby is ready; the standby's pid is next."""
    agent.wait_log("warm and ready to take over", count=n_ready, timeout=120)
    standby = agent.stack.serving_pid()
    if standby is None or standby == serving:
        raise RuntimeError("no standby pid in agent.pid")
    n_taken = agent.log_count("standby: every VM re-attached")
    time.sleep(1.0)  # the standby's own start-up is over
    seen: dict[str, float] = {}
    t0 = time.monotonic()
    os.kill(serving, signal.SIGKILL)
    codes_99 = wait_all_up(agent, ids, t0, seen)
    logged = agent.wait_log("standby: every VM re-attached", count=n_taken + 1, timeout=60)
    if agent.stack.agent.poll() is None and agent.stack.agent.pid == serving:
        agent.stack.agent.wait()
    if h.qemu_pid_map(ids) != qemu:
        raise RuntimeError("QEMU pids changed across the takeover")
    return ({"listed": seen["listed"] - t0, "log": logged - t0,
             "connected": seen["connected"] - t0, "codes_99": codes_99}, standby)


def agent_round(agent: h.Agent, ids: list[str], qemu: dict[str, int], n_rec: int) -> dict:
    """kill -9 (standby first), restart, wait for all VMs Up; n_rec: 'recovery done' lines so far."""
    standby = agent.stack.serving_pid()
    if standby is not None and standby != agent.stack.agent.pid:
        os.kill(standby, signal.SIGKILL)  # a cold restart, as without a standby
    old = agent.stack.agent
    old.kill()
    old.wait()
    seen: dict[str, float] = {}

    def watch_log():
        try:
            seen["log"] = agent.wait_log("recovery done", count=n_rec + 1, timeout=120,
                                         poll=0.002)
        except RuntimeError as e:
            seen["log_error"] = str(e)

    t0 = time.monotonic()
    agent.stack.start_agent(wait=False)
    watcher = threading.Thread(target=watch_log, daemon=True)
    watcher.start()
    codes_99 = wait_all_up(agent, ids, t0, seen)
    watcher.join(130)
    if "log" not in seen:
        raise RuntimeError(seen.get("log_error", "no 'recovery done' line"))
    if h.qemu_pid_map(ids) != qemu:
        raise RuntimeError("QEMU pids changed across the crash restart")
    return {"listed": seen["listed"] - t0, "log": seen["log"] - t0,
            "connected": seen["connected"] - t0, "codes_99": codes_99}


def libvirt_round(lv: h.Libvirtd, ids: list[str], sig: int, qemu: dict[str, int]) -> dict:
    import libvirt
    import libvirt_qemu

    t_kill = time.monotonic()
    lv.kill(sig)
    stopped = time.monotonic() - t_kill
    t0 = time.monotonic()
    lv.launch()
    launched = time.monotonic() - t0
    deadline = t0 + 120
    out = {"stop": stopped, "launch": launched}
    wanted = set(ids)
    while "listed" not in out:
        if time.monotonic() > deadline:
            raise RuntimeError("libvirtd did not list every domain running in 120 s")
        try:
            conn = libvirt.open(lv.uri)
        except libvirt.libvirtError:
            time.sleep(0.005)
            continue
        try:
            running = {d.UUIDString() for d in conn.listAllDomains(
                libvirt.VIR_CONNECT_LIST_DOMAINS_RUNNING)}
            if wanted <= running:
                out["listed"] = time.monotonic() - t0
                doms = [conn.lookupByUUIDString(vm_id) for vm_id in ids]
                for dom in doms:
                    libvirt_qemu.qemuMonitorCommand(dom, '{"execute":"query-status"}', 0)
                out["qmp"] = time.monotonic() - t0
        except libvirt.libvirtError:
            time.sleep(0.005)
        finally:
            conn.close()
    if h.qemu_pid_map(ids) != qemu:
        raise RuntimeError("QEMU pids changed across the libvirtd restart")
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--vms", type=int, default=20)
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (privd, libvirtd and the vdsm user need it)")

    agent = lv = None
    res: dict[str, list[dict]] = {"standby": [], "agent": [], "SIGTERM": [], "SIGKILL": []}
    try:
        h.progress("starting privd and the agent (code copy precompiled, as a package ships)")
        agent = h.Agent(bytecode=True, standby=True).start()
        agent.wait_log("recovery done")
        h.progress(f"agent: creating {args.vms} VMs")
        ids = agent.create_vms(args.vms, prefix="bench-c")
        waited = h.wait_quiet(h.qemu_pids_of(ids), timeout=180)
        h.progress(f"agent: guests quiet after {waited:.0f} s")
        qemu = h.qemu_pid_map(ids)
        serving = agent.stack.agent.pid
        for i in range(args.runs):
            r, serving = standby_round(agent, ids, qemu, serving, n_ready=i + 1)
            res["standby"].append(r)
            h.progress(f"standby round {i + 1}/{args.runs}: all Up {r['listed'] * 1000:.0f} ms "
                       f"after the kill (port answering {r['connected'] * 1000:.0f} ms, "
                       f"'every VM re-attached' {r['log'] * 1000:.0f} ms, {r['codes_99']} x 99)")
        # Cold restarts from here: the started agent is the one that serves.
        agent.wait_log("warm and ready to take over", count=args.runs + 1, timeout=120)
        os.kill(agent.stack.serving_pid(), signal.SIGKILL)  # the last standby
        time.sleep(0.5)
        h.kill_pids([serving])
        time.sleep(0.5)
        n_rec = agent.log_count("recovery done") + 1
        agent.stack.start_agent(wait=False)
        agent.wait_log("recovery done", count=n_rec, timeout=120)
        for i in range(args.runs):
            agent.wait_log("warm and ready to take over", count=args.runs + 2 + i, timeout=120)
            time.sleep(1.0)
            r = agent_round(agent, ids, qemu, n_rec)
            n_rec += 1
            res["agent"].append(r)
            h.progress(f"agent round {i + 1}/{args.runs}: all Up after "
                       f"{r['listed'] * 1000:.0f} ms (port answering {r['connected'] * 1000:.0f}"
                       f" ms, 'recovery done' {r['log'] * 1000:.0f} ms, {r['codes_99']} x 99)")
            time.sleep(1.0)
        h.progress("agent: destroying its VMs")
        client = agent.client()
        try:
            for vm_id in ids:
                client.call("VM.destroy", {"vmID": vm_id})
        finally:
            client.close()
        agent.stop()
        agent = None

        h.progress("starting libvirtd")
        lv = h.Libvirtd().start()
        lv.pid   # noqa: B018 - refuses a libvirtd the bench did not start
        ids = [str(uuid.uuid4()) for _ in range(args.vms)]
        h.progress(f"libvirt: creating {args.vms} domains")
        with ThreadPoolExecutor(8) as pool:
            list(pool.map(lambda p: lv.create(h.domain_xml(p[1], f"bench-lc{p[0]}"), p[1]),
                          enumerate(ids)))
        waited = h.wait_quiet(h.qemu_pids_of(ids), timeout=180)
        h.progress(f"libvirt: guests quiet after {waited:.0f} s")
        qemu = h.qemu_pid_map(ids)
        for i in range(args.runs):
            for sig in (signal.SIGTERM, signal.SIGKILL):
                r = libvirt_round(lv, ids, sig, qemu)
                res[sig.name].append(r)
                h.progress(f"libvirtd {sig.name} round {i + 1}/{args.runs}: all listed running "
                           f"after {r['listed'] * 1000:.0f} ms, QMP answered "
                           f"{r['qmp'] * 1000:.0f} ms (stop took {r['stop'] * 1000:.0f} ms)")
                time.sleep(1.0)
        lv.reopen()
    finally:
        h.progress("cleaning up")
        for thing in (lv, agent):
            if thing is not None:
                thing.stop()

    ms = lambda rs, k: h.median(r[k] for r in rs) * 1000   # noqa: E731
    w, a, t, k = res["standby"], res["agent"], res["SIGTERM"], res["SIGKILL"]
    print(f"Crash reattach, {args.vms} diskless 64 MiB / 1 vCPU KVM guests, {args.runs} rounds "
          "each (medians)")
    print(f"  agent kill -9, warm standby takes over: all {args.vms} Up in Host.getVMList "
          f"{ms(w, 'listed'):.0f} ms after the kill ('every VM re-attached' logged "
          f"{ms(w, 'log'):.0f} ms; port answering {ms(w, 'connected'):.0f} ms)  min "
          f"{min(r['listed'] for r in w) * 1000:.0f} max {max(r['listed'] for r in w) * 1000:.0f}")
    print(f"  agent kill -9 + cold restart (no standby), from the restart: all {args.vms} Up in Host.getVMList {ms(a, 'listed'):.0f} ms"
          f"  ('recovery done' logged {ms(a, 'log'):.0f} ms; port answering "
          f"{ms(a, 'connected'):.0f} ms)  min {min(r['listed'] for r in a) * 1000:.0f} "
          f"max {max(r['listed'] for r in a) * 1000:.0f}")
    for name, rs in (("SIGTERM", t), ("SIGKILL", k)):
        print(f"  libvirtd {name} + restart: all {args.vms} running in listAllDomains "
              f"{ms(rs, 'listed'):.0f} ms, every domain's QMP answering {ms(rs, 'qmp'):.0f} ms"
              f"  (libvirtd -d returned {ms(rs, 'launch'):.0f} ms; stopping took "
              f"{ms(rs, 'stop'):.0f} ms, not counted)")
    print("  target: agent / libvirtd <= 0.5")
    print(f"  cold restart / libvirtd restart: {ms(a, 'listed') / ms(t, 'listed'):.2f}; "
          f"standby / libvirtd SIGKILL restart: {ms(w, 'listed') / ms(k, 'listed'):.2f}")
    print(f"ratio: {ms(w, 'listed') / ms(t, 'listed'):.2f} (agent kill -9 to all Up, warm "
          "standby / libvirtd restart to all listed)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
