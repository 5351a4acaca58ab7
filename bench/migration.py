"""
Live migration of a 512 MiB guest on loopback: the agent against two bare
QEMUs driven over QMP by hand.

  (a) agent: two stacks on this machine (source and destination agents, one
      CA, one image root, as in tests/test_migration.py). C{VM.migrate}
      sent to the source agent through the client library (STOMP/TLS) until
      both the source's C{Down} (exitReason 4, checked) and the
      destination's C{Up} events arrived;
  (b) floor: the agent's own command line (C{parse_domain} + C{build_argv},
      same user and environment) for two bare QEMUs, the destination with
      C{-incoming defer}. From spawning the destination (the agent's
      C{VM.migrationCreate} does that too) through C{migrate-incoming},
      C{migrate-set-parameters} (same downtime and bandwidth), C{migrate},
      C{query-migrate} until C{completed}, to the source QEMU gone
      (C{quit}) and the destination running (C{cont} on its MIGRATION
      C{completed} event, in its own thread, as the destination agent does).
      Three ways to see the source complete: polling every 0.25 s (the
      agent's interval), every 10 ms, and the MIGRATION event.

The guest: QEMU's own C{-S} and SeaBIOS boot a 512-byte boot sector (built
here with binutils, on a raw disk image in the shared image root) that fills
all guest RAM above 1 MiB with non-zero data (each dword holds its address),
prints C{FILLED}, then sleeps in C{hlt} and writes one byte to the serial
port per PIT tick (1 kHz). An untouched guest would migrate as zero pages,
unrealistically fast. It runs under TCG (C{<domain type="qemu">}): under
this host's nested KVM every first touch of a guest page costs ~2 ms, so
filling 512 MiB would take minutes.

Downtime: QEMU's C{query-migrate} C{downtime} is read for the floor; the
agent holds both QMP sockets and reports no downtime, so for both sides the
guest-visible gap is also measured from outside: a separate process stats
both serial logs every 1 ms; the gap is the first byte of the destination's
log minus the last byte of the source's (the guest writes every 1 ms; the
gap includes the destination's C{cont}, which QEMU's figure does not).

One untimed warm-up each, then N rounds (C{--runs}, 9), interleaved, the order
reversed every other round. Medians. Defaults: downtime-limit 100 ms,
max-bandwidth 400 MiB/s (about 1.3 s per migration; unthrottled, QEMU's own
migration time varies 0.3-1.3 s with host load and drowns the driver's cost),
drawn per round from +-10 % (see L{bandwidths}) and shared by the variants.
Target: agent / floor <= 1.1, the floor being the faster of the 10 ms poll
and the event.

Run from the repository root as root:
    /opt/vdsm-twisted/venv/bin/python bench/migration.py [--runs N]
"""

from __future__ import annotations

import argparse
import json
import os
import pwd
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _harness as h  # noqa: E402
from tests import _procs  # noqa: E402

MEMORY_MIB = 512
nan = float("nan")

# -- the guest -----------------------------------------------------------------

#: A boot sector (GNU as): RAM size from int 15h/E801, protected mode, fill,
#: then a 1 kHz PIT tick writing one byte to COM1 per tick, idle in hlt.
BOOT_SECTOR = r"""
    .code16
    .globl _start
_start:
    cli
    xor %ax, %ax
    mov %ax, %ds
    mov %ax, %ss
    mov $0x7c00, %sp
    mov $0xE801, %ax
    int $0x15
    mov %cx, mem_lo
    mov %dx, mem_hi
    in $0x92, %al
    or $2, %al
    out %al, $0x92
    lgdt gdt_ptr
    mov %cr0, %eax
    or $1, %eax
    mov %eax, %cr0
    ljmp $0x08, $pm
    .code32
pm: mov $0x10, %ax
    mov %ax, %ds
    mov %ax, %es
    mov %ax, %ss
    mov %ax, %fs
    mov %ax, %gs
    mov $0x7c00, %esp
    movzwl mem_hi, %ecx              /* 64 KiB blocks above 16 MiB */
    test %ecx, %ecx
    jz 1f
    shl $16, %ecx
    add $0x1000000, %ecx
    jmp 2f
1:  movzwl mem_lo, %ecx              /* KiB above 1 MiB */
    shl $10, %ecx
    add $0x100000, %ecx
2:  mov $0x100000, %edi
3:  mov %edi, (%edi)
    add $4, %edi
    cmp %ecx, %edi
    jb 3b
    mov $msg, %esi
    mov $0x3f8, %dx
4:  lodsb
    test %al, %al
    jz 5f
    out %al, %dx
    jmp 4b
5:  mov $0x8000, %edi                /* IDT: all spurious but vector 0x20 */
    xor %ecx, %ecx
6:  mov $spurious, %eax
    cmp $0x20, %ecx
    jne 7f
    mov $tick, %eax
7:  mov %ax, (%edi)
    movw $0x08, 2(%edi)
    movw $0x8E00, 4(%edi)
    shr $16, %eax
    mov %ax, 6(%edi)
    add $8, %edi
    inc %ecx
    cmp $256, %ecx
    jb 6b
    lidt idt_ptr
    mov $0x11, %al                   /* PICs at 0x20/0x28, only IRQ0 */
    out %al, $0x20
    out %al, $0xA0
    mov $0x20, %al
    out %al, $0x21
    mov $0x28, %al
    out %al, $0xA1
    mov $4, %al
    out %al, $0x21
    mov $2, %al
    out %al, $0xA1
    mov $1, %al
    out %al, $0x21
    out %al, $0xA1
    mov $0xFE, %al
    out %al, $0x21
    mov $0xFF, %al
    out %al, $0xA1
    mov $0x34, %al                   /* PIT 0: rate generator, ~1 kHz */
    out %al, $0x43
    mov $(1193 & 0xff), %al
    out %al, $0x40
    mov $(1193 >> 8), %al
    out %al, $0x40
8:  sti
    hlt
    jmp 8b
tick:
    push %eax
    push %edx
    incl ticks
    mov ticks, %eax
    and $0x3f, %al
    add $0x30, %al
    mov $0x3f8, %dx
    out %al, %dx
    mov $0x20, %al
    out %al, $0x20
    pop %edx
    pop %eax
    iret
spurious:
    push %eax
    mov $0x20, %al
    out %al, $0x20
    out %al, $0xA0
    pop %eax
    iret
    .align 8
gdt:
    .quad 0
    .quad 0x00CF9A000000FFFF
    .quad 0x00CF92000000FFFF
gdt_ptr:
    .word 23
    .long gdt
idt_ptr:
    .word 256*8-1
    .long 0x8000
mem_lo: .word 0
mem_hi: .word 0
ticks:  .long 0
msg:    .asciz "FILLED\n"
    .org 510
    .word 0xAA55
"""

FILLED = b"FILLED"


def build_boot_image(path: Path) -> None:
    """Assemble L{BOOT_SECTOR} into a 1 MiB raw disk at C{path} (vdsm's, 0644)."""
    for tool in ("as", "ld"):
        if shutil.which(tool) is None:
            raise RuntimeError(f"{tool} (binutils) is needed to build the guest")
    with tempfile.TemporaryDirectory(prefix="vt-bench-boot-") as tmp:
        src, obj, out = (os.path.join(tmp, n) for n in ("boot.S", "boot.o", "boot.bin"))
        with open(src, "w") as f:
            f.write(BOOT_SECTOR)
        subprocess.run(["as", "--32", "-o", obj, src], check=True)
        subprocess.run(["ld", "-m", "elf_i386", "-Ttext", "0x7c00", "--oformat", "binary",
                        "-o", out, obj], check=True)
        data = Path(out).read_bytes()
    if len(data) != 512 or data[510:] != b"\x55\xaa":
        raise RuntimeError(f"boot sector is {len(data)} bytes")
    path.write_bytes(data + b"\0" * ((1 << 20) - len(data)))
    vdsm = pwd.getpwnam("vdsm")
    os.chown(path, vdsm.pw_uid, vdsm.pw_gid)
    os.chmod(path, 0o644)


def guest_xml(vm_id: str, name: str, image: Path, memory_mib: int = MEMORY_MIB) -> str:
    return f"""<domain type="qemu">
  <name>{name}</name>
  <uuid>{vm_id}</uuid>
  <memory unit="MiB">{memory_mib}</memory>
  <vcpu>1</vcpu>
  <os><type arch="x86_64" machine="pc">hvm</type></os>
  <devices>
    <disk type="file" device="disk">
      <driver name="qemu" type="raw"/>
      <source file="{image}"/>
      <target dev="hda" bus="ide"/>
    </disk>
    <serial type="file">
      <source path="/var/log/libvirt/qemu/{name}.serial.log"/>
      <target port="0"/>
    </serial>
    <controller type="usb" model="none"/>
    <memballoon model="none"/>
  </devices>
</domain>"""


def wait_filled(serial: Path, timeout: float = 180.0) -> None:
    deadline = time.monotonic() + timeout
    while True:
        try:
            if FILLED in serial.read_bytes()[:4096]:
                return
        except FileNotFoundError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"the guest did not fill its memory in {timeout:g} s ({serial})")
        time.sleep(0.05)


# -- the outside view of the guest's pause -------------------------------------

WATCH = r"""
import json, os, sys, threading, time
src, dst = sys.argv[1], sys.argv[2]
stop = threading.Event()
threading.Thread(target=lambda: (sys.stdin.read(), stop.set()), daemon=True).start()
def size(p):
    try:
        return os.stat(p).st_size
    except OSError:
        return 0
s0, d0 = size(src), size(dst)
last_src = first_dst = None
while not stop.is_set():
    now = time.monotonic()
    s, d = size(src), size(dst)
    if s != s0:
        s0, last_src = s, now
    if first_dst is None and d != d0:
        first_dst = now
    time.sleep(0.001)
json.dump({"last_src": last_src, "first_dst": first_dst}, sys.stdout)
"""


class SerialWatch:
    """A separate process (no GIL shared with the bench) watching both serial logs."""

    def __init__(self, src: Path, dst: Path):
        self.proc = subprocess.Popen([sys.executable, "-c", WATCH, str(src), str(dst)],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE)

    def gap(self) -> float:
        """Seconds between the source's last serial byte and the destination's first."""
        out, _ = self.proc.communicate(timeout=30)
        r = json.loads(out)
        if r["last_src"] is None or r["first_dst"] is None:
            raise RuntimeError(f"serial watch saw no output: {r}")
        return r["first_dst"] - r["last_src"]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# -- the agents ----------------------------------------------------------------

class MigrationEvents(h.Events):
    """L{h.Events}, plus the first arrival of each migration state of a VM."""

    def __init__(self):
        super().__init__()
        self.migration: dict[tuple[str, str], float] = {}

    def __call__(self, method: str, params) -> None:
        if method.startswith("|virt|VM_migration_status|"):
            vm_id = method.rsplit("|", 1)[-1]
            state = params.get(vm_id, {}).get("state")
            self.migration.setdefault((vm_id, state), time.monotonic())
        super().__call__(method, params)


async def connect(agent: h.Agent):
    """A STOMP client of the library with a L{MigrationEvents} subscribed."""
    from vdsm_twisted.client import connect as _connect

    client = await _connect("localhost", agent.stack.port, str(agent.stack.pki_dir),
                            protocol="stomp", timeout=60)
    events = MigrationEvents()
    await client.subscribe_events(events)
    return client, events


async def agent_migration(src, dst, image: Path, params: dict, name: str) -> dict:
    """One migration through the agents: timings (seconds) of this run."""
    (sc, sev), (dc, dev) = src.conn, dst.conn
    vm_id = str(uuid.uuid4())
    await sc.call("VM.create", {"vmID": vm_id, "vmParams": {
        "xml": guest_xml(vm_id, name, image)}}, timeout=60)
    await sev.wait(vm_id, "Up", timeout=120)
    src_serial = src.stack.vmlogs / f"{vm_id}.serial.log"
    await h.in_thread(wait_filled, src_serial)
    watch = SerialWatch(src_serial, dst.stack.vmlogs / f"{vm_id}.serial.log")
    try:
        down = sev.wait(vm_id, "Down", timeout=300)
        up = dev.wait(vm_id, "Up", timeout=300)
        t0 = time.monotonic()
        answer = await sc.call("VM.migrate", {"vmID": vm_id, "params": {
            "dst": f"localhost:{dst.stack.port}", "dstqemu": "127.0.0.1", **params}},
            timeout=60)
        if answer["status"]["code"] != 0:
            raise RuntimeError(f"VM.migrate answered {answer}")
        t_down = await down
        t_up = await up
        await h.sleep(0.1)   # a few ticks on the destination
        gap = watch.gap()
    finally:
        watch.kill()
    [stats] = await sc.call("VM.getStats", {"vmID": vm_id})
    if (stats["status"], stats.get("exitReason")) != ("Down", 4):
        raise RuntimeError(f"source ended {stats['status']} exitReason "
                           f"{stats.get('exitReason')}, not Down/4")
    await dc.call("VM.destroy", {"vmID": vm_id}, timeout=60)
    await sc.call("VM.destroy", {"vmID": vm_id}, timeout=60)
    return {"total": max(t_down, t_up) - t0, "src_down": t_down - t0, "dst_up": t_up - t0,
            "gap": gap,
            # the destination agent's "Migration Destination" (just before migrate-incoming)
            "incoming_ready": dev.seen.get((vm_id, "Migration Destination"), nan) - t0,
            # the source agent saw "completed" (its last progress event)
            "completed": sev.migration.get((vm_id, "completed"), nan) - t0}


# -- the floor -----------------------------------------------------------------

class EventQMP(h.SyncQMP):
    """L{h.SyncQMP} keeping the events it reads, and able to wait for one."""

    def __init__(self, path: str, timeout: float = 10.0):
        super().__init__(path, timeout)
        self.events: list[dict] = []
        self.sock.settimeout(300)   # a timed-out socket file cannot be read again

    def on_event(self, event: dict) -> None:
        self.events.append(event)

    def wait_migration(self, states=("completed", "failed", "cancelled")) -> str:
        """Block until a MIGRATION event with one of C{states}; that state."""
        while True:
            while self.events:
                ev = self.events.pop(0)
                if ev["event"] == "MIGRATION" and ev["data"].get("status") in states:
                    return ev["data"]["status"]
            reply = self._read()
            if "event" in reply:
                self.on_event(reply)


class Floor:
    """Two bare QEMUs with the agent's argv, as C{vdsm}, on private paths."""

    def __init__(self, images: Path, user: str = "vdsm"):
        from vdsm_twisted.virt.qemu.driver import kvm_usable

        self.images = images
        self.user = user
        self.kvm = kvm_usable()
        self.binary = shutil.which("qemu-system-x86_64") or "qemu-system-x86_64"
        self.root = Path(tempfile.mkdtemp(prefix="vt-bench-floor-"))
        os.chmod(self.root, 0o755)
        pw = pwd.getpwnam(user)
        for side in ("src", "dst"):
            (self.root / side).mkdir()
            os.chown(self.root / side, pw.pw_uid, pw.pw_gid)
        self.procs: list[subprocess.Popen] = []

    def paths(self, side: str, vm_id: str) -> tuple[str, Path]:
        return str(self.root / side / f"{vm_id}.qmp"), self.root / side / f"{vm_id}.serial.log"

    def argv(self, side: str, xml: str, vm_id: str) -> list[str]:
        from vdsm_twisted.virt.domxml import parse_domain
        from vdsm_twisted.virt.qemu.argv import build_argv

        qmp, serial = self.paths(side, vm_id)
        return build_argv(parse_domain(xml, [str(self.images)]), kvm=self.kvm, qmp_path=qmp,
                          binary=self.binary, serial_log_path=str(serial),
                          default_listen="127.0.0.1", vnc_display_base=40, spice=False)

    def spawn(self, side: str, argv: list[str], vm_id: str) -> subprocess.Popen:
        log = open(self.root / side / f"{vm_id}.log", "ab")
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "LC_ALL": "C"}
        proc = subprocess.Popen(argv, env=env, stdin=subprocess.DEVNULL, stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, cwd="/",
                                **_procs.user_kwargs(self.user))
        log.close()
        self.procs.append(proc)
        return proc

    def migrate(self, params: dict, poll: float | None, name: str) -> dict:
        """One migration; C{poll}: query-migrate interval, or None to wait for the event."""
        vm_id = str(uuid.uuid4())
        xml = guest_xml(vm_id, name, self.images / "fill.img")
        src_qmp_path, src_serial = self.paths("src", vm_id)
        dst_qmp_path, dst_serial = self.paths("dst", vm_id)
        src_proc = self.spawn("src", self.argv("src", xml, vm_id), vm_id)
        dst_proc = None
        src = EventQMP(src_qmp_path)
        src.execute("qmp_capabilities")
        src.execute("cont")
        wait_filled(src_serial)
        port = _procs.free_port()
        dst_argv = self.argv("dst", xml, vm_id) + ["-incoming", "defer"]
        watch = SerialWatch(src_serial, dst_serial)
        dst_done: dict = {}
        try:
            t0 = time.monotonic()
            dst_proc = self.spawn("dst", dst_argv, vm_id)
            dst = EventQMP(dst_qmp_path)
            dst.execute("qmp_capabilities")
            dst.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": True}]})
            dst.execute("migrate-incoming", {"uri": f"tcp:127.0.0.1:{port}"})
            t_ready = time.monotonic()

            def resume():   # the destination agent's part: run once the state is in
                try:
                    state = dst.wait_migration()
                    if state == "completed":
                        dst.execute("cont")
                        dst_done["up"] = time.monotonic()
                    dst_done["state"] = state
                except Exception as e:  # noqa: BLE001 - reported below
                    dst_done["error"] = repr(e)

            resumer = threading.Thread(target=resume, daemon=True)
            resumer.start()
            mig = {"downtime-limit": params["downtime"]}
            if params.get("maxBandwidth"):
                mig["max-bandwidth"] = params["maxBandwidth"] * 1024 * 1024
            src.execute("migrate-set-parameters", mig)
            src.execute("migrate-set-capabilities", {"capabilities": [
                {"capability": "events", "state": True}]})
            src.execute("migrate", {"uri": f"tcp:127.0.0.1:{port}"})
            t_migrate = time.monotonic()
            if poll is None:
                state = src.wait_migration()
                info = src.execute("query-migrate")
            else:
                while True:
                    info = src.execute("query-migrate")
                    state = info.get("status")
                    if state in ("completed", "failed", "cancelled"):
                        break
                    time.sleep(poll)
            t_completed = time.monotonic()
            if state != "completed":
                raise RuntimeError(f"floor migration {state}: {info}")
            # QEMU shows "completed" a moment before it computes total-time and
            # downtime (they read 0 then): ask again, and leave that out of the time.
            for _ in range(100):
                if info.get("total-time") and "downtime" in info:
                    break
                time.sleep(0.002)
                info = src.execute("query-migrate")
            requery = time.monotonic() - t_completed
            try:
                src.execute("quit")
            except h.QMPError:
                pass
            src.close()
            src_proc.wait(30)
            t_down = time.monotonic() - requery
            resumer.join(60)
            dst.close()
            if "up" not in dst_done:
                raise RuntimeError(f"floor destination did not run: {dst_done}")
            time.sleep(0.1)
            gap = watch.gap()
        finally:
            watch.kill()
            for proc in (src_proc, dst_proc):
                if proc is not None and proc.poll() is None:
                    proc.kill()
                    proc.wait()
            for p in (src_qmp_path, dst_qmp_path, src_serial, dst_serial):
                try:
                    os.unlink(p)
                except OSError:
                    pass
        self.procs = [p for p in self.procs if p.poll() is None]
        return {"total": max(t_down, dst_done["up"]) - t0, "src_down": t_down - t0,
                "dst_up": dst_done["up"] - t0, "gap": gap, "incoming_ready": t_ready - t0,
                "migrate": t_completed - t_migrate, "completed": t_completed - t0,
                "qemu_downtime": info.get("downtime", float("nan")) / 1000.0,
                "qemu_total": info.get("total-time", float("nan")) / 1000.0,
                "mbps": (info.get("ram") or {}).get("mbps", float("nan")),
                # How long after QEMU's own end of the migration the driver noticed it.
                "noticed": (t_completed - t_migrate) - info.get("total-time", 0) / 1000.0}

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        shutil.rmtree(self.root, True)


# -- the run -------------------------------------------------------------------

VARIANTS = ("agent", "floor 0.25 s poll", "floor 10 ms poll", "floor event")
POLLS = {"floor 0.25 s poll": 0.25, "floor 10 ms poll": 0.01, "floor event": None}


def bandwidths(runs: int, center: int, jitter: float, seed: int) -> list[int]:
    """
    One max-bandwidth per round, spread evenly over center +- jitter and
    shuffled. A capped migration takes a steady time, so a fixed bandwidth
    would fix where the end falls between two polls (the same luck every
    run); spreading the duration over more than one poll interval gives
    every poller its average cost. All variants of a round share the value.
    """
    import random

    if runs == 1 or not jitter:
        return [center] * runs
    lo, hi = center * (1 - jitter), center * (1 + jitter)
    values = [round(lo + (hi - lo) * i / (runs - 1)) for i in range(runs)]
    random.Random(seed).shuffle(values)
    return values


async def run(runs: int, src: h.Agent, dst: h.Agent, floor: Floor, params: dict,
              per_round: list[int]) -> dict:
    image = src.stack.images / "fill.img"
    src.conn = await connect(src)
    dst.conn = await connect(dst)
    try:
        results: dict[str, list[dict]] = {v: [] for v in VARIANTS}

        async def one(variant: str, tag: str, params: dict) -> dict:
            if variant == "agent":
                return await agent_migration(src, dst, image, params, f"mig-{tag}")
            return await h.in_thread(floor.migrate, params, POLLS[variant], f"mig-{tag}")

        h.progress("warm-up (untimed)")
        for variant in VARIANTS:
            await one(variant, "warm", params)
        for i in range(runs):
            order = VARIANTS if i % 2 == 0 else tuple(reversed(VARIANTS))
            round_params = {**params, "maxBandwidth": per_round[i]}
            for variant in order:
                results[variant].append(await one(variant, f"{i}", round_params))
            h.progress(f"round {i + 1}/{runs} ({per_round[i]} MiB/s): " + "  ".join(
                f"{v}: {results[v][-1]['total'] * 1000:.0f} ms" for v in VARIANTS))
            a = results["agent"][-1]
            h.progress("  agent: incoming ready {:.0f}, completion seen {:.0f}, source down "
                       "{:.0f}, destination up {:.0f}, pause {:.0f} ms".format(
                           *(a[k] * 1000 for k in ("incoming_ready", "completed", "src_down",
                                                    "dst_up", "gap"))))
        return results
    finally:
        for agent in (src, dst):
            await agent.conn[0].close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--downtime", type=int, default=100, help="ms (downtime-limit)")
    parser.add_argument("--bandwidth", type=int, default=400,
                        help="MiB/s (max-bandwidth). The default is a cap the loopback "
                             "sustains under load, so QEMU's own time is steady; 10000 does "
                             "not throttle (sub-second, but as noisy as the host)")
    parser.add_argument("--jitter", type=float, default=0.1,
                        help="spread of the per-round bandwidth (fraction of --bandwidth)")
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--keep-logs", metavar="DIR",
                        help="copy both agents' logs there before cleaning up")
    args = parser.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (privd and the vdsm user need it)")


    params = {"downtime": args.downtime, "maxBandwidth": args.bandwidth}
    per_round = bandwidths(args.runs, args.bandwidth, args.jitter, args.seed)
    src = dst = floor = None
    result: dict = {}
    try:
        h.progress("starting the source and destination stacks")
        src = h.Agent().start()
        dst = h.Agent().start(peer=src)
        build_boot_image(src.stack.images / "fill.img")
        floor = Floor(src.stack.images)

        async def go():
            result.update(await run(args.runs, src, dst, floor, params, per_round))

        h.react(go)
    finally:
        h.progress("cleaning up")
        if args.keep_logs:
            for name, agent in (("src", src), ("dst", dst)):
                if agent is not None and agent.root is not None:
                    shutil.copytree(agent.root / "logs", Path(args.keep_logs) / name,
                                    dirs_exist_ok=True)
        for thing in (floor, dst, src):
            if thing is not None:
                thing.stop()

    def med(variant: str, key: str) -> float:
        return h.median(r[key] for r in result[variant])

    def ms(variant: str, key: str) -> str:
        return f"{med(variant, key) * 1000:.0f}"

    print(f"Live migration on loopback: {MEMORY_MIB} MiB TCG guest, RAM above 1 MiB filled "
          f"with non-zero data, idle (1 serial byte/ms); downtime-limit {args.downtime} ms, "
          f"max-bandwidth {args.bandwidth} MiB/s +-{args.jitter:.0%} (per round, shared by the "
          f"variants); {args.runs} interleaved runs each; medians")
    print("  agent: from VM.migrate sent to the source's Down (exitReason 4) and the "
          "destination's Up events")
    print("  floor: from the destination QEMU spawned to the source QEMU gone and the "
          "destination running")
    print("  breakdown (ms from the start): incoming ready / completion seen / source down / "
          "destination up; guest-visible pause (serial logs)")
    for v in VARIANTS:
        print(f"  {v:18s} total {h.summary([r['total'] for r in result[v]])}")
        print(f"  {'':18s} {ms(v, 'incoming_ready')} / {ms(v, 'completed')} / "
              f"{ms(v, 'src_down')} / {ms(v, 'dst_up')}; pause {ms(v, 'gap')} ms")
        if v != "agent":
            print(f"  {'':18s} QEMU: downtime {ms(v, 'qemu_downtime')} ms, total-time "
                  f"{ms(v, 'qemu_total')} ms, {med(v, 'mbps'):.0f} Mbit/s; completion seen "
                  f"{ms(v, 'noticed')} ms after QEMU's total-time")
    print("  (the agent's QEMU downtime cannot be read: it holds both QMP sockets and does "
          "not report it; compare the guest-visible pauses)")
    agent = med("agent", "total")
    best = min(("floor 10 ms poll", "floor event"), key=lambda v: med(v, "total"))
    late = [r["noticed"] * 1000 for r in result["floor 0.25 s poll"]]
    print(f"  polling every 0.25 s sees QEMU's end {h.median(late):.0f} ms late (median; mean "
          f"{sum(late) / len(late):.0f}, max {max(late):.0f}); its total "
          f"{(med('floor 0.25 s poll', 'total') - med(best, 'total')) * 1000:+.0f} ms vs {best}")
    paired = h.median(a["total"] / f["total"] for a, f in zip(result["agent"], result[best]))
    print(f"  agent / {best}, same round (same bandwidth): median {paired:.2f}")
    print(f"  target: agent / floor <= 1.1 (floor = {best}, the faster of the 10 ms poll "
          f"and the event)")
    print(f"ratio: {agent / med(best, 'total'):.2f} (agent migration wall time / QMP floor)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
