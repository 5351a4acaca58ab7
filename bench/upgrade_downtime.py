"""
Upgrade downtime: SIGUSR2 re-exec in place with 0, 20 and 100 running VMs.

For each VM count, N upgrades (a new build "installed" in the agent's private
code copy, then SIGUSR2), each measured three ways:

  (a) the agent's own figure: its C{upgrade downtime: N ms from exec to
      serving again} log line (the handoff's exec time to the listener being
      adopted and the service tree started);
  (b) from outside, new connections: a separate process opening a TLS
      connection and completing STOMP CONNECT -> CONNECTED in a tight loop;
      the downtime is the longest gap between two successful round trips
      spanning the upgrade (the listener stops accepting when the drain
      starts, so this includes drain + preflight + exec + start-up;
      connections wait in the backlog meanwhile, none may fail);
  (c) from outside, a connected client: C{Host.ping2} in a loop on one
      connection, reconnecting when the agent drops it at the exec.

Plus signal -> exec (drain, preflight subprocess, save), read from the handoff
file. After every upgrade each VM must still be Up (C{Host.getVMList}) with
the same QEMU pid, a child of the same agent pid.

Then a breakdown of the new image's start-up (exec -> interpreter -> twistd
plugins -> AgentService.__init__ -> listener adopted -> serving -> reactor
running), from a trace C{sitecustomize} put in the code copy for a few extra
upgrades at 0 VMs, and C{python -X importtime} of the agent's imports.

Target: 150 ms at 100 VMs. Run from the repository root as root:
    /opt/vdsm-twisted/venv/bin/python bench/upgrade_downtime.py [--runs 5] [--vms 0,20,100]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as h  # noqa: E402

TARGET_MS = 150.0
TRACE_ENV = "VT_BENCH_TRACE"

#: Put into the agent's code copy (first on its PYTHONPATH) for the breakdown
#: only; active in an image started by an upgrade exec (the handoff variable).
TRACE_SITECUSTOMIZE = r'''
import os, sys, time
_T0 = time.time()
_DIR = os.environ.get("VT_BENCH_TRACE")
_HANDOFF = os.environ.get("VDSM_TWISTED_HANDOFF")
if _DIR and _HANDOFF:
    import importlib.abc, importlib.util, json

    _events = [("interpreter started (sitecustomize)", _T0)]
    try:
        with open(_HANDOFF) as f:
            _events.insert(0, ("exec", json.load(f)["data"]["exec_time"]))
    except Exception as e:
        _events.append(("no exec time: %r" % (e,), _T0))

    def _mark(name):
        _events.append((name, time.time()))

    def _dump():
        path = os.path.join(_DIR, "trace-%d-%f.json" % (os.getpid(), time.time()))
        with open(path + ".tmp", "w") as f:
            json.dump(_events, f)
        os.rename(path + ".tmp", path)

    def _wrap(cls, meth, before=None, after=None):
        orig = getattr(cls, meth)
        def wrapper(self, *a, **kw):
            if before:
                _mark(before)
            try:
                return orig(self, *a, **kw)
            finally:
                if after:
                    _mark(after)
        setattr(cls, meth, wrapper)

    def _patch(name, module):
        if name == "twisted.application.app":
            _wrap(module.ApplicationRunner, "run", before="twistd options parsed, plugins loaded")
        elif name == "vdsm_twisted.protocols.listener":
            _wrap(module.EngineListenerService, "startService",
                  before="listener startService (the services before it started)",
                  after="listener adopted")
        elif name == "vdsm_twisted.virt.qemu.driver":
            _wrap(module.QemuDriver, "recover", before="driver.recover start",
                  after="driver.recover returned (children adopted, QMP pending)")
        elif name == "vdsm_twisted.service":
            svc = module.AgentService
            _wrap(svc, "__init__", before="AgentService.__init__ start",
                  after="AgentService.__init__ end")
            _wrap(svc, "startService", before="startService")
            orig = svc._serving
            def _serving(self, result):
                _mark("serving (the agent's figure)")
                def running():
                    _mark("reactor running (accepting)")
                    _dump()
                self._reactor.callWhenRunning(running)
                return orig(self, result)
            svc._serving = _serving

    _WATCH = {"twisted.scripts.twistd", "twisted.application.app", "twisted.plugin",
              "vdsm_twisted.tap", "vdsm_twisted.service", "vdsm_twisted.protocols.listener",
              "OpenSSL", "twisted.internet.reactor", "vdsm_twisted.virt.qemu.driver"}
    _seen = set()

    class _Finder(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path, target=None):
            if name not in _WATCH or name in _seen:
                return None
            _seen.add(name)
            _mark("import %s start" % name)
            sys.meta_path.remove(self)
            try:
                spec = importlib.util.find_spec(name)
            finally:
                sys.meta_path.insert(0, self)
            if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
                return spec
            orig = spec.loader.exec_module
            def exec_module(module, _orig=orig, _name=name):
                _orig(module)
                _mark("import %s end" % _name)
                _patch(_name, module)
            spec.loader.exec_module = exec_module
            return spec

    sys.meta_path.insert(0, _Finder())
'''


class HandoffWatch:
    """Reads the handoff file as soon as the old image wrote it: its exec time."""

    def __init__(self, path: Path):
        self.path = path
        self.exec_time: float | None = None
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self):
        while not self._stop.is_set():
            try:
                doc = json.loads(self.path.read_bytes())
                self.exec_time = doc["data"]["exec_time"]
                return
            except (OSError, ValueError, KeyError):
                time.sleep(0.002)

    def stop(self) -> float | None:
        self._stop.set()
        self._thread.join()
        return self.exec_time


def wait_booted(pids: list[int], boot_cpu: float = 2.4, timeout: float = 240.0) -> float:
    """
    Wait until every guest has burnt its SeaBIOS boot (~2.5 CPU s each here).

    C{wait_quiet} cannot tell at 100 guests: idle or booting, they share the
    saturated cores alike, so the total rate says nothing; CPU time used does.
    """
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        used = [h.cpu_seconds(p) for p in pids]
        if min(used) >= boot_cpu:
            break
        time.sleep(1.0)
    else:
        h.progress(f"some guests have not used {boot_cpu} CPU s after {timeout:g} s; going on")
    return time.monotonic() - t0


def wall_to_mono(t: float) -> float:
    return t - (time.time() - time.monotonic())


def one_upgrade(agent: h.Agent, ids: list[str], qemu: dict[str, int], n_done: int) -> dict:
    """One measured upgrade; n_done: upgrades the agent went through before."""
    probes = [h.Probe(agent.stack.port, agent.stack.pki_dir, "connect"),
              h.Probe(agent.stack.port, agent.stack.pki_dir, "persistent")]
    try:
        time.sleep(0.5)   # both probes running steadily
        watch = HandoffWatch(agent.root / "run" / "handoff.json")
        agent.install_new_build()
        t_sig = time.monotonic()
        os.kill(agent.pid, signal.SIGUSR2)
        agent.wait_log("upgrade downtime:", count=n_done + 1, timeout=60)
        t_rec = agent.wait_log("recovery done", count=n_done + 2, timeout=60)
        exec_wall = watch.stop()
        time.sleep(0.3)
        results = [p.finish() for p in probes]
    finally:
        for p in probes:
            p.kill()
    own = float(re.findall(r"upgrade downtime: (\d+) ms", agent.log())[n_done])
    out = {"agent": own / 1000, "t_sig": t_sig}
    closed = re.findall(r"not accepting for (\d+) ms \((\d+) ms", agent.log())
    if len(closed) > n_done:  # the agent's own figure of the whole closed window
        out["closed"] = float(closed[n_done][0]) / 1000
        out["pre_exec"] = float(closed[n_done][1]) / 1000
    if exec_wall is not None:
        out["sig_exec"] = wall_to_mono(exec_wall) - t_sig
        out["exec_rec"] = t_rec - wall_to_mono(exec_wall)
    for name, r in zip(("connect", "persistent"), results):
        gap, before, after = h.longest_gap(r["ok"], t_sig, t_rec)
        rt = [b - a for a, b in zip(r["ok"], r["ok"][1:]) if b < t_sig]
        out[name] = gap
        out[name + "_rt"] = h.median(rt) if rt else float("nan")
        out[name + "_fail"] = [f for f in r["failures"]
                               if before <= float(f.split()[0]) <= after]
        if not r["ok"] or r["ok"][-1] < t_rec:
            raise RuntimeError(f"{name} probe: no success after the upgrade: "
                               f"{r['failures'][-3:]}")
    # Every VM still Up, same QEMU, still our child.
    client = agent.client()
    try:
        listed = {v["vmId"]: v["status"] for v in client.call("Host.getVMList")}
    finally:
        client.close()
    bad = [vm_id for vm_id in ids if listed.get(vm_id) != "Up"]
    now = h.qemu_pid_map(ids)
    if bad or len(listed) != len(ids):
        raise RuntimeError(f"after the upgrade: {len(listed)} VMs listed, not Up: {bad}")
    if now != qemu:
        raise RuntimeError("QEMU pids changed across the upgrade")
    strangers = [p for p in now.values() if h.ppid(p) != agent.pid]
    if strangers or agent.stack.agent.poll() is not None:
        raise RuntimeError(f"QEMUs no longer children of the agent: {strangers}")
    return out


def importtime(code: Path) -> tuple[dict[str, float], list[tuple[str, float]]]:
    """C{-X importtime} of the agent's imports (median of 3 runs): self ms per
    top-level package, and the heaviest imports below the first two levels."""
    env = {**os.environ, "PYTHONPATH": str(code), "PYTHONDONTWRITEBYTECODE": "1"}
    env.pop(TRACE_ENV, None)
    groups, cumul = [], []
    for _ in range(3):
        proc = subprocess.run([sys.executable, "-X", "importtime", "-c",
                               "import vdsm_twisted.service, twisted.scripts.twistd"],
                              env=env, capture_output=True, text=True, cwd="/", check=True)
        per: dict[str, float] = {"TOTAL": 0.0}
        cum: dict[str, float] = {}
        for line in proc.stderr.splitlines():
            m = re.match(r"import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)", line)
            if not m:
                continue
            name, depth = m.group(4), len(m.group(3)) // 2
            top = name.split(".")[0]
            per[top] = per.get(top, 0.0) + int(m.group(1)) / 1000
            per["TOTAL"] += int(m.group(1)) / 1000
            cum[f"{'  ' * depth}{name}"] = int(m.group(2)) / 1000
        groups.append(per)
        cumul.append(cum)
    med = {k: h.median(g.get(k, 0.0) for g in groups) for k in set().union(*groups)}
    heavy = {k: h.median(c.get(k, 0.0) for c in cumul) for k in cumul[0]}
    top = sorted((kv for kv in heavy.items() if kv[1] >= 8.0), key=lambda kv: -kv[1])[:16]
    return med, top


def breakdown(agent: h.Agent, trace_dir: Path, runs: int, n_done: int):
    """Traced upgrades: each one's events (name, wall time), the exec first."""
    site = agent.code / "sitecustomize.py"
    site.write_text(TRACE_SITECUSTOMIZE)
    os.chmod(site, 0o644)
    try:
        for i in range(runs):
            for old in trace_dir.glob("trace-*.json"):
                old.unlink()
            agent.install_new_build()
            os.kill(agent.pid, signal.SIGUSR2)
            agent.wait_log("upgrade downtime:", count=n_done + i + 1, timeout=120)
            agent.wait_log("recovery done", count=n_done + i + 2, timeout=120)
            h._procs.wait_for(lambda: list(trace_dir.glob("trace-*.json")), timeout=10,
                              what="the trace")
            yield json.loads(next(trace_dir.glob("trace-*.json")).read_text())
            time.sleep(1.0)
    finally:
        site.unlink()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--vms", default="0,20,100")
    parser.add_argument("--trace-runs", type=int, default=5,
                        help="traced upgrades for the breakdown (0: none)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (privd and the vdsm user need it)")
    counts = [int(c) for c in args.vms.split(",")]

    agent = None
    trace_dir = Path(tempfile.mkdtemp(prefix="vt-bench-trace-"))
    os.chmod(trace_dir, 0o777)
    os.environ[TRACE_ENV] = str(trace_dir)   # inherited by the agent; inert without the trace
    results: dict[int, list[dict]] = {}
    quiet: dict[int, tuple[float, float]] = {}
    traces: dict[int, list] = {}
    imports: list = []
    try:
        h.progress("starting privd and the agent (code copy precompiled, as a package ships)")
        agent = h.Agent(bytecode=True).start()
        agent.wait_log("recovery done")
        time.sleep(1.0)   # the agent snapshots its code (the upgrade fallback) in a thread
        n_done = 0
        h.progress("warm-up upgrade")
        one_upgrade(agent, [], {}, n_done)
        n_done += 1
        time.sleep(1.0)
        ids: list[str] = []
        for count in counts:
            if count > len(ids):
                h.progress(f"creating {count - len(ids)} VMs")
                ids += agent.create_vms(count - len(ids), prefix=f"bench-u{count}")
                pids = h.qemu_pids_of(ids)
                waited = h.wait_quiet(pids, timeout=240)
                waited += wait_booted(pids)
                c0, t0 = sum(map(h.cpu_seconds, pids)), time.monotonic()
                time.sleep(2.0)
                rate = (sum(map(h.cpu_seconds, pids)) - c0) / (time.monotonic() - t0)
                quiet[count] = (waited, rate)
                h.progress(f"{count} VMs Up; guests quiet (booted) after {waited:.0f} s; "
                           f"idle, they use {rate * 100:.0f} % of a core together")
            qemu = h.qemu_pid_map(ids)
            if len(qemu) != len(ids):
                raise RuntimeError(f"{len(qemu)} QEMUs for {len(ids)} VMs")
            results[count] = []
            for i in range(args.runs):
                r = one_upgrade(agent, ids, qemu, n_done)
                n_done += 1
                results[count].append(r)
                h.progress(f"{count} VMs, upgrade {i + 1}/{args.runs}: agent "
                           f"{r['agent'] * 1000:.0f} ms, outside new conn "
                           f"{r['connect'] * 1000:.0f} ms, connected client "
                           f"{r['persistent'] * 1000:.0f} ms, signal->exec "
                           f"{r.get('sig_exec', float('nan')) * 1000:.0f} ms")
                time.sleep(1.0)
            if args.trace_runs and count in (counts[0], counts[-1]):
                runs = args.trace_runs if count == counts[0] else min(args.trace_runs, 3)
                h.progress(f"breakdown: {runs} traced upgrades at {count} VMs")
                traces[count] = []
                for trace in breakdown(agent, trace_dir, runs, n_done):
                    traces[count].append(trace)
                    n_done += 1
            if not imports:
                h.progress("breakdown: -X importtime of the agent's imports")
                imports = importtime(agent.code)
        if ids:
            h.progress(f"destroying {len(ids)} VMs")
            client = agent.client()
            try:
                for vm_id in ids:
                    client.call("VM.destroy", {"vmID": vm_id})
            finally:
                client.close()
    finally:
        h.progress("cleaning up")
        if agent is not None:
            agent.stop()
        shutil.rmtree(trace_dir, True)

    ms = lambda v: f"{v * 1000:.0f} ms"   # noqa: E731
    print(f"Upgrade downtime (SIGUSR2 re-exec, same pid), diskless 64 MiB / 1 vCPU KVM guests, "
          f"{args.runs} upgrades per VM count (+1 warm-up)")
    print("  agent  = its log line 'upgrade downtime' (exec -> serving again)")
    print("  new    = longest gap between new-connection round trips (TLS + STOMP CONNECT)")
    print("  conn   = longest gap between Host.ping2 answers of a connected client (reconnects)")
    print("  sig>ex = SIGUSR2 -> exec (drain, preflight subprocess, save): the listener does not")
    print("           accept meanwhile, so 'new' includes it")
    print("  closed = the agent's own figure of the whole time it did not accept (drain and")
    print("           save before the exec + exec -> serving), and the part before the exec")
    for count, rs in results.items():
        med = {k: h.median(r[k] for r in rs if k in r) for k in
               ("agent", "connect", "persistent", "sig_exec", "exec_rec", "connect_rt",
                "persistent_rt")}
        if all("closed" in r for r in rs):
            print(f"  {count:3d} VMs: closed median {ms(h.median(r['closed'] for r in rs))} "
                  f"(of which before the exec {ms(h.median(r['pre_exec'] for r in rs))})")
        fails = sum(len(r["connect_fail"]) for r in rs)
        print(f"  {count:3d} VMs: agent median {ms(med['agent'])} "
              f"(min {ms(min(r['agent'] for r in rs))}, max {ms(max(r['agent'] for r in rs))})"
              f"  new {ms(med['connect'])}  conn {ms(med['persistent'])}  "
              f"sig>ex {ms(med['sig_exec'])}  exec>recovery done {ms(med['exec_rec'])}"
              f"   [round trip new {med['connect_rt'] * 1000:.1f} ms,"
              f" ping2 {med['persistent_rt'] * 1000:.1f} ms; new-connection failures {fails}]")
        kinds = sorted({f.split(" ", 1)[1][:90] for r in rs for f in r["connect_fail"]})
        if kinds:
            print(f"           new-connection failures seen: {'; '.join(kinds[:3])}")
        if count in quiet:
            waited, rate = quiet[count]
            print(f"           guests went quiet {waited:.0f} s after start; idle, all {count} "
                  f"together use {rate * 100:.0f} % of one core (host: {os.cpu_count()} cores)")
    for count, ts in traces.items():
        print(f"Breakdown of the new image's start-up at {count} VMs ({len(ts)} traced upgrades;"
              " ms since exec, medians; the tracing itself adds ~10-30 ms):")
        names = [name for name, _ in ts[0]]
        base = [dict(t)["exec"] for t in ts]
        prev = 0.0
        for name in names:
            if name == "exec":
                continue
            at = h.median(dict(t).get(name, float("nan")) - b for t, b in zip(ts, base))
            print(f"  {at * 1000:7.1f}  (+{(at - prev) * 1000:6.1f})  {name}")
            prev = at
    if imports:
        groups, heavy = imports
        print(f"python -X importtime -c 'import vdsm_twisted.service, twisted.scripts.twistd' "
              f"(median of 3): total {groups['TOTAL']:.0f} ms; self time by package:")
        print("  " + ", ".join(f"{k} {v:.1f}" for k, v in sorted(
            groups.items(), key=lambda kv: -kv[1]) if k != "TOTAL" and v >= 1.0))
        print("  heaviest imports (cumulative ms):")
        for name, t in heavy:
            print(f"  {t:6.1f}  {name}")
    last = max(results)
    agent_ms = h.median(r["agent"] for r in results[last]) * 1000
    new_ms = h.median(r["connect"] for r in results[last]) * 1000
    print(f"outside view at {last} VMs: new connections wait {new_ms:.0f} ms "
          f"({new_ms / TARGET_MS:.2f} x the target)")
    print(f"ratio: {agent_ms / TARGET_MS:.2f} (upgrade downtime at {last} VMs / {TARGET_MS:.0f} ms)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
