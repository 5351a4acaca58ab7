"""
A L{Domain} as a QEMU command line.

Pure: no I/O, no clock unless given, so the same domain and arguments always
give the same argv, and tests compare whole snapshots. The result is an argv
list for C{spawnProcess}; nothing is ever quoted for a shell. Free-form
values inside C{key=value,...} options have their commas doubled (QEMU's
escape); block nodes are given as JSON, which needs no escaping at all.

Decisions (the supervisor and QMP code rely on them):

 - C{-S}: QEMU starts paused ("prelaunch"), so the agent can set display
   passwords (C{set_password}/C{expire_password}), link states
   (C{set_link}) and the balloon target before the guest runs its first
   instruction, then sends C{cont}. This is what libvirt does.
 - C{-no-shutdown}: a guest power-off stops QEMU instead of ending it; the
   agent sees the C{SHUTDOWN} event, reads final stats and applies
   C{on_poweroff} (C{destroy}: C{quit}; C{restart}: C{system_reset} and
   C{cont}). C{on_reboot="destroy"} adds C{-no-reboot}, so a reboot is
   also a C{SHUTDOWN} (reason C{guest-reset}). After an agent crash a
   guest that powered off meanwhile is found in status C{shutdown}.
 - CPU: C{-cpu host} and C{-cpu max} abort on hosts whose KVM refuses MSR
   0x10a (IA32_ARCH_CAPABILITIES); C{host,migratable=on,-arch-capabilities}
   works (checked on QEMU 7.2 under KVM), so host-passthrough and
   host-model map to that under KVM (the extra flags are
   C{host_cpu_flags}), and to C{max,-arch-capabilities} under TCG, where
   C{host} does not exist. A domain without C{<cpu>} gets QEMU's default
   model.
 - VNC listens with C{password=on} and SPICE with ticketing on and no
   password: nobody can connect until the agent sets the ticket over QMP.
   VNC autoport lets QEMU pick a free display from C{vnc_display_base}
   (C{to=}); the port is then read back with C{query-vnc}. SPICE has no such
   search: an autoport SPICE needs C{graphics_ports["spice"]}.
 - NICs are C{-netdev tap,fd=N} on fds the caller has open in the child
   (privd creates the taps); vhost is not used.
 - The CD-ROM device always exists, with a stable id (its alias, else its
   target), so C{blockdev-change-medium id=...} can insert media later.
 - Accelerator: C{-accel kvm} only when the caller says KVM works
   (C{kvm=True}) and the domain is not C{type="qemu"}; libvirt's
   C{type="qemu"} means TCG, on any host.
 - ACPI: C{acpi=off} on the machine unless the domain has C{<acpi/>}
   (libvirt's rule). Without ACPI there is no power button to press, so
   C{VM.shutdown} can only end in its destroy fallback.
 - Direct kernel boot: C{-kernel}, C{-initrd}, C{-append}, each its own
   argv element (plain strings for QEMU, no option syntax to escape).
 - C{-sandbox on} with obsolete, elevateprivileges, spawn and resourcecontrol
   denied (QEMU's seccomp filter).
"""

from __future__ import annotations

import datetime
import ipaddress
import json
import subprocess
import time
from typing import Callable, Mapping, Sequence

from vdsm_twisted.virt.domxml import Disk, Domain

__all__ = ["ArgvError", "build_argv", "probe_spice", "disk_node_names",
           "disk_device_id", "device_id", "nic_device_id",
           "DEFAULT_HOST_CPU_FLAGS"]

#: Flags added to C{-cpu host} (see the module docstring).
DEFAULT_HOST_CPU_FLAGS = ("migratable=on", "-arch-capabilities")

_SANDBOX = "on,obsolete=deny,elevateprivileges=deny,spawn=deny,resourcecontrol=deny"


class ArgvError(ValueError):
    """The domain cannot be started with these arguments or this QEMU."""


def probe_spice(binary: str = "qemu-system-x86_64") -> bool:
    """
    Whether C{binary} was built with SPICE. Blocks (runs C{binary}): call it
    once at startup, in a thread.
    """
    try:
        out = subprocess.run([binary, "-spice", "help"], capture_output=True,
                             timeout=30, stdin=subprocess.DEVNULL)
    except (OSError, subprocess.TimeoutExpired):
        return False
    # It exits 1 even when it lists the options; without SPICE it says
    # "There is no option group 'spice'" on stderr.
    return b"spice options" in out.stdout


def _esc(value: str) -> str:
    """A value inside a QEMU C{key=value,...} option: commas doubled."""
    return value.replace(",", ",,")


def disk_node_names(disk: Disk) -> tuple[str, str]:
    """(format node, file node) of a disk: C{("drive-vda", "file-vda")}."""
    return f"drive-{disk.target}", f"file-{disk.target}"


def disk_device_id(disk: Disk) -> str:
    """The QEMU device id of a disk (what QMP commands address)."""
    return disk.alias or disk.target


#: The name the VM layer uses (C{changeCD} addresses the cdrom by it).
device_id = disk_device_id


def nic_device_id(domain: Domain, mac: str) -> str:
    """The QEMU device id of the NIC with this MAC."""
    for i, nic in enumerate(domain.nics):
        if nic.mac == mac:
            return nic.alias or f"net{i}"
    raise KeyError(mac)


def _cpu(domain: Domain, kvm: bool, host_flags: Sequence[str]) -> list[str]:
    cpu = domain.cpu
    if cpu.mode in ("host-passthrough", "host-model"):
        parts = ["host", *host_flags] if kvm else ["max", "-arch-capabilities"]
    elif cpu.mode == "custom":
        parts = [cpu.model]
    else:
        parts = []
    for name, enabled in cpu.features:
        parts.append(f"{name}={'on' if enabled else 'off'}")
    for timer in domain.clock.timers:
        if timer.name == "kvmclock" and timer.present is False:
            parts.append("kvmclock=off")
    if not parts:
        return []
    if not cpu.mode:
        parts.insert(0, "qemu64")
    return ["-cpu", ",".join(parts)]


def _size(kib: int) -> str:
    return f"{kib // 1024}M" if kib % 1024 == 0 else f"{kib}k"


def _memory(domain: Domain) -> list[str]:
    value = f"size={_size(domain.memory_kib)}"
    if domain.max_memory_kib is not None:
        value += (f",slots={domain.memory_slots},"
                  f"maxmem={_size(domain.max_memory_kib)}")
    argv = ["-m", value, "-overcommit", "mem-lock=off"]
    for cell in domain.numa:
        argv += ["-object", f"memory-backend-ram,id=ram-node{cell.id},"
                            f"size={_size(cell.memory_kib)}"]
        cpus = ",".join(f"cpus={r}" for r in _ranges(cell.cpus))
        argv += ["-numa", f"node,nodeid={cell.id},{cpus},"
                          f"memdev=ram-node{cell.id}"]
    return argv


def _ranges(cpus: Sequence[int]) -> list[str]:
    out: list[list[int]] = []
    for c in cpus:
        if out and out[-1][1] == c - 1:
            out[-1][1] = c
        else:
            out.append([c, c])
    return [f"{a}" if a == b else f"{a}-{b}" for a, b in out]


def _rtc(domain: Domain, now: Callable[[], float]) -> list[str]:
    clock = domain.clock
    base = clock.basis if clock.offset == "variable" else clock.offset
    if clock.offset == "variable" and clock.adjustment:
        t = now() + clock.adjustment
        if base == "utc":
            stamp = datetime.datetime.fromtimestamp(t, datetime.timezone.utc)
        else:
            stamp = datetime.datetime.fromtimestamp(t)
        base = stamp.strftime("%Y-%m-%dT%H:%M:%S")
    value = f"base={base}"
    if any(t.name == "rtc" and t.tickpolicy == "catchup"
           for t in clock.timers):
        value += ",driftfix=slew"
    return ["-rtc", value]


def _blockdev(disk: Disk) -> list[str]:
    fmt_node, file_node = disk_node_names(disk)
    ro = disk.readonly
    f: dict = {"driver": "file", "filename": disk.source_path,
               "node-name": file_node, "read-only": ro}
    cache = disk.cache
    if cache is not None:
        f["cache"] = {"direct": cache in ("none", "directsync"),
                      "no-flush": cache == "unsafe"}
    if disk.io is not None:
        f["aio"] = disk.io
    if disk.discard is not None:
        f["discard"] = disk.discard
    fmt: dict = {"driver": disk.format, "node-name": fmt_node,
                 "file": file_node, "read-only": ro}
    if disk.discard is not None:
        fmt["discard"] = disk.discard
    dumps = lambda d: json.dumps(d, separators=(",", ":"))  # noqa: E731
    return ["-blockdev", dumps(f), "-blockdev", dumps(fmt)]


def _disk_device(domain: Domain, disk: Disk) -> str:
    i = disk.index
    cd = disk.device == "cdrom"
    if disk.bus == "virtio":
        parts = ["virtio-blk-pci"]
    elif disk.bus == "ide":
        parts = ["ide-cd" if cd else "ide-hd", f"bus=ide.{i // 2}",
                 f"unit={i % 2}"]
    elif disk.bus == "sata":
        bus = f"ide.{i}" if domain.q35 else f"sata0.{i}"
        parts = ["ide-cd" if cd else "ide-hd", f"bus={bus}"]
    else:
        parts = ["scsi-cd" if cd else "scsi-hd", "bus=scsi0.0", "channel=0",
                 f"scsi-id={i}", "lun=0"]
    if disk.source_path is not None:
        parts.append(f"drive={disk_node_names(disk)[0]}")
    parts.append(f"id={disk_device_id(disk)}")
    if disk.serial:
        parts.append(f"serial={_esc(disk.serial)}")
    if disk.boot_order:
        parts.append(f"bootindex={disk.boot_order}")
    if disk.error_policy and not cd:
        parts += [f"werror={disk.error_policy}",
                  f"rerror={'report' if disk.error_policy == 'enospace' else disk.error_policy}"]
    if disk.cache in ("writethrough", "directsync") and not cd:
        parts.append("write-cache=off")
    return ",".join(parts)


_USB_MODELS = {"piix3-uhci": "piix3-usb-uhci", "ich9-ehci1": "ich9-usb-ehci1",
               "qemu-xhci": "qemu-xhci", "nec-xhci": "nec-usb-xhci"}
_NIC_MODELS = {"virtio": "virtio-net-pci", "e1000": "e1000",
               "rtl8139": "rtl8139"}
_VIDEO_MODELS = {"vga": "VGA", "qxl": "qxl-vga", "virtio": "virtio-vga",
                 "cirrus": "cirrus-vga"}
_INPUTS = {("tablet", "usb"): "usb-tablet", ("mouse", "usb"): "usb-mouse",
           ("keyboard", "usb"): "usb-kbd",
           ("tablet", "virtio"): "virtio-tablet-pci",
           ("mouse", "virtio"): "virtio-mouse-pci",
           ("keyboard", "virtio"): "virtio-keyboard-pci"}


def _controllers(domain: Domain) -> list[str]:
    argv: list[str] = []
    for c in domain.controllers:
        if c.type == "usb" and c.model != "none":
            model = c.model or ("qemu-xhci" if domain.q35 else "piix3-uhci")
            argv += ["-device", f"{_USB_MODELS[model]},id=usb"]
        elif c.type == "pci" and c.model == "pcie-root-port":
            if not domain.q35:
                raise ArgvError("pcie-root-port controllers need a q35 "
                                "machine")
            argv += ["-device", f"pcie-root-port,id=pci.{c.index},"
                                f"chassis={c.index},port={c.index},bus=pcie.0"]
        elif c.type == "sata" and not domain.q35:
            argv += ["-device", "ich9-ahci,id=sata0"]
        elif c.type == "virtio-serial":
            argv += ["-device", "virtio-serial-pci,id=virtio-serial0"]
        elif c.type == "scsi":
            argv += ["-device", "virtio-scsi-pci,id=scsi0"]
    return argv


def _graphics(domain: Domain, *, spice: bool, ports: Mapping[str, int],
              networks: Mapping[str, str], vnc_display_base: int,
              default_listen: str) -> list[str]:
    argv: list[str] = []
    for g in domain.graphics:
        listen = g.listen
        if g.listen_network is not None:
            if g.listen_network not in networks:
                raise ArgvError(f"{g.type} graphics listen on network "
                                f"{g.listen_network!r}, which has no address "
                                "on this host")
            listen = networks[g.listen_network]
        listen = listen or default_listen
        v6 = ipaddress.ip_address(listen).version == 6
        port = g.port if not g.autoport else ports.get(g.type)
        if g.type == "vnc":
            host = f"[{listen}]" if v6 else listen
            if port is not None:
                if not 5900 <= port <= 65535:
                    raise ArgvError(f"vnc port {port} is below 5900")
                display = f"{port - 5900}"
            else:
                display = f"{vnc_display_base},to={vnc_display_base + 99}"
            argv += ["-vnc", f"{host}:{display},password=on"]
        else:
            if not spice:
                raise ArgvError("spice graphics requested but this QEMU was "
                                "built without SPICE")
            if port is None:
                raise ArgvError("spice autoport needs a port allocated by "
                                "the agent (graphics_ports['spice'])")
            argv += ["-spice", f"port={port},addr={listen},"
                               "seamless-migration=on"]
    return argv


def build_argv(domain: Domain, *, kvm: bool, qmp_path: str,
               binary: str = "qemu-system-x86_64",
               serial_log_path: str | None = None,
               nic_fds: Mapping[str, int] | None = None,
               channel_paths: Mapping[str, str] | None = None,
               graphics_ports: Mapping[str, int] | None = None,
               listen_networks: Mapping[str, str] | None = None,
               vnc_display_base: int = 0,
               default_listen: str = "127.0.0.1",
               spice: bool = True,
               sandbox: bool = True,
               host_cpu_flags: Sequence[str] = DEFAULT_HOST_CPU_FLAGS,
               now: Callable[[], float] = time.time) -> list[str]:
    """
    The command line that runs C{domain}, paused (C{-S}).

    @param kvm: KVM is usable on this host; it is used unless the domain is
        C{type="qemu"}, which always gets TCG.
    @param qmp_path: the QMP UNIX socket QEMU creates (listening, no wait).
    @param serial_log_path: where the guest's serial console is written
        (appended); None discards it.
    @param nic_fds: MAC -> the tap fd number in the child, for every NIC.
    @param channel_paths: virtio channel name -> the UNIX socket path QEMU
        creates for it, for every C{unix} channel.
    @param graphics_ports: "vnc"/"spice" -> port, for autoport graphics.
    @param listen_networks: network name -> address, for C{<listen
        type="network">}.
    @param spice: whether the binary has SPICE (L{probe_spice}).
    @raise ArgvError: a resource the domain needs was not given.
    """
    nic_fds = nic_fds or {}
    channel_paths = channel_paths or {}
    d = domain
    kvm = kvm and d.domain_type != "qemu"
    machine = f"{d.machine},usb=off,dump-guest-core=off"
    if not d.acpi:
        machine += ",acpi=off"
    if any(t.name == "hpet" and t.present is False for t in d.clock.timers):
        machine += ",hpet=off"
    argv = [
        binary,
        "-name", f"guest={_esc(d.name)},debug-threads=on",
        "-S",
        "-msg", "timestamp=on",
        "-no-user-config", "-nodefaults",
        "-uuid", d.uuid,
        "-machine", machine,
        "-accel", "kvm" if kvm else "tcg",
        *_cpu(d, kvm, host_cpu_flags),
        *_memory(d),
    ]
    smp = f"{d.vcpus}"
    if d.max_vcpus:
        smp += f",maxcpus={d.max_vcpus}"
    smp += f",sockets={d.sockets},cores={d.cores},threads={d.threads}"
    argv += ["-smp", smp]
    if d.sysinfo:
        argv += ["-smbios", "type=1," + ",".join(
            f"{k}={_esc(v)}" for k, v in d.sysinfo)]
    argv += [
        "-chardev", f"socket,id=charmonitor,path={_esc(qmp_path)},"
                    "server=on,wait=off",
        "-mon", "chardev=charmonitor,id=monitor,mode=control",
        *_rtc(d, now),
    ]
    if kvm and any(t.name == "pit" and t.tickpolicy == "delay"
                   for t in d.clock.timers):
        argv += ["-global", "kvm-pit.lost_tick_policy=delay"]
    argv.append("-no-shutdown")
    if d.on_reboot == "destroy":
        argv.append("-no-reboot")
    boot = []
    if d.boot_devices:
        letters = {"hd": "c", "cdrom": "d", "network": "n", "fd": "a"}
        boot.append("order=" + "".join(letters[b] for b in d.boot_devices))
    if d.boot_menu is not None:
        boot.append(f"menu={'on' if d.boot_menu else 'off'}")
    if any(x.boot_order for x in (*d.disks, *d.nics)):
        boot.append("strict=on")
    if boot:
        argv += ["-boot", ",".join(boot)]
    if d.kernel is not None:
        argv += ["-kernel", d.kernel]
        if d.initrd is not None:
            argv += ["-initrd", d.initrd]
        if d.cmdline is not None:
            argv += ["-append", d.cmdline]

    argv += _controllers(d)
    for disk in d.disks:
        if disk.source_path is not None:
            argv += _blockdev(disk)
        argv += ["-device", _disk_device(d, disk)]
    for i, nic in enumerate(d.nics):
        if nic.mac not in nic_fds:
            raise ArgvError(f"no tap fd for the NIC with MAC {nic.mac}")
        fd = nic_fds[nic.mac]
        if not isinstance(fd, int) or isinstance(fd, bool) or fd < 3:
            raise ArgvError(f"bad tap fd {fd!r} for the NIC with MAC "
                            f"{nic.mac}")
        dev = [_NIC_MODELS[nic.model], f"netdev=hostnet{i}",
               f"id={nic.alias or f'net{i}'}", f"mac={nic.mac}"]
        if nic.boot_order:
            dev.append(f"bootindex={nic.boot_order}")
        if nic.mtu and nic.model == "virtio":
            dev.append(f"host_mtu={nic.mtu}")
        argv += ["-netdev", f"tap,fd={fd},id=hostnet{i}",
                 "-device", ",".join(dev)]
    for i, serial in enumerate(d.serial_consoles):
        if serial_log_path is not None:
            chardev = (f"file,id=charserial{i},"
                       f"path={_esc(serial_log_path)},append=on")
        else:
            chardev = f"null,id=charserial{i}"
        argv += ["-chardev", chardev, "-device",
                 f"isa-serial,chardev=charserial{i},"
                 f"id={serial.alias or f'serial{i}'}"]
    for i, ch in enumerate(d.channels):
        if ch.type == "unix":
            if ch.name not in channel_paths:
                raise ArgvError(f"no socket path for channel {ch.name!r}")
            chardev = (f"socket,id=charchannel{i},"
                       f"path={_esc(channel_paths[ch.name])},"
                       "server=on,wait=off")
        else:
            if not spice:
                raise ArgvError("spicevmc channel requested but this QEMU "
                                "was built without SPICE")
            chardev = f"spicevmc,id=charchannel{i},name=vdagent"
        argv += ["-chardev", chardev, "-device",
                 f"virtserialport,bus=virtio-serial0.0,nr={i + 1},"
                 f"chardev=charchannel{i},id={ch.alias or f'channel{i}'},"
                 f"name={ch.name}"]
    for i, inp in enumerate(d.inputs):
        model = _INPUTS.get((inp.type, inp.bus))
        if model is None:        # ps2 mouse and keyboard are built in
            continue
        dev = [model, f"id={inp.alias or f'input{i}'}"]
        if inp.bus == "usb":
            dev.append("bus=usb.0")
        argv += ["-device", ",".join(dev)]
    argv += _graphics(d, spice=spice, ports=graphics_ports or {},
                      networks=listen_networks or {},
                      vnc_display_base=vnc_display_base,
                      default_listen=default_listen)
    if d.video is not None:
        argv += ["-device",
                 f"{_VIDEO_MODELS[d.video.model]},id={d.video.alias or 'video0'}"]
    argv += ["-display", "none"]
    if d.memballoon.model == "virtio":
        argv += ["-device",
                 f"virtio-balloon-pci,id={d.memballoon.alias or 'balloon0'}"]
    for i, rng in enumerate(d.rngs):
        dev = f"virtio-rng-pci,rng=objrng{i},id={rng.alias or f'rng{i}'}"
        if rng.rate_bytes:
            dev += f",max-bytes={rng.rate_bytes},period={rng.rate_period or 1000}"
        argv += ["-object", f"rng-random,id=objrng{i},filename={rng.backend}",
                 "-device", dev]
    if d.vmcoreinfo:
        argv += ["-device", "vmcoreinfo"]
    if sandbox:
        argv += ["-sandbox", _SANDBOX]
    return argv
