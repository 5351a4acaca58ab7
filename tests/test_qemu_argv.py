"""
Tests for L{vdsm_twisted.virt.qemu.argv}: whole-argv snapshots of the sample
domains, the error cases, and real QEMU runs (KVM when /dev/kvm opens, and
TCG) of the generated command lines, checked over QMP.
"""

import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from vdsm_twisted.virt.domxml import parse_domain
from vdsm_twisted.virt.qemu.argv import (
    ArgvError, build_argv, device_id, disk_device_id, disk_node_names,
    nic_device_id,
    probe_spice)

DATA = Path(__file__).parent / "data" / "domxml"
UUID = "0b9c0d3b-5b5f-4c57-9f3c-2cb2d5f0cc2a"
QMP = "/run/vdsm/qemu/vm.qmp"
SANDBOX = ["-sandbox", "on,obsolete=deny,elevateprivileges=deny,spawn=deny,"
                       "resourcecontrol=deny"]
HEAD = ["-S", "-msg", "timestamp=on", "-no-user-config", "-nodefaults"]
MONITOR = ["-chardev", f"socket,id=charmonitor,path={QMP},server=on,wait=off",
           "-mon", "chardev=charmonitor,id=monitor,mode=control"]


@pytest.fixture
def root(tmp_path):
    r = tmp_path / "images"
    (r / "sd1" / "images" / "img1").mkdir(parents=True)
    (r / "sd1" / "images" / "img2").mkdir(parents=True)
    for f in ("sd1/images/img1/vol1", "sd1/images/img2/vol2", "desk.img"):
        (r / f).write_bytes(b"\0" * 512)
    return r


def load(name, root=None):
    text = (DATA / f"{name}.xml").read_text()
    if root is not None:
        text = text.replace("@ROOT@", str(root))
    return parse_domain(text, [str(root)] if root else [])


def domain(devices="", extra="", os_="<os><type>hvm</type></os>", roots=()):
    return parse_domain(
        f'<domain type="kvm"><name>t</name><uuid>{UUID}</uuid>'
        f'<memory unit="MiB">64</memory>{os_}{extra}'
        f'<devices><memballoon model="none"/>{devices}</devices></domain>',
        [str(r) for r in roots])


# -- snapshots -------------------------------------------------------------

def test_minimal_kvm():
    assert build_argv(load("minimal"), kvm=True, qmp_path=QMP) == [
        "qemu-system-x86_64",
        "-name", "guest=tiny,debug-threads=on", *HEAD,
        "-uuid", UUID,
        "-machine", "pc,usb=off,dump-guest-core=off,acpi=off",
        "-accel", "kvm",
        "-m", "size=64M", "-overcommit", "mem-lock=off",
        "-smp", "1,sockets=1,cores=1,threads=1",
        *MONITOR,
        "-rtc", "base=utc",
        "-no-shutdown",
        "-display", "none",
        *SANDBOX,
    ]


def test_minimal_tcg_options():
    argv = build_argv(load("minimal"), kvm=False, qmp_path=QMP,
                      binary="/usr/bin/qemu-kvm", sandbox=False)
    assert argv[0] == "/usr/bin/qemu-kvm"
    assert argv[argv.index("-accel") + 1] == "tcg"
    assert "-sandbox" not in argv


def test_ovirt_full(root):
    d = load("ovirt_full", root)
    argv = build_argv(
        d, kvm=True, qmp_path=QMP, serial_log_path="/var/log/vdsm/vm,1.log",
        nic_fds={"56:6f:1a:2b:00:01": 31},
        channel_paths={"ovirt-guest-agent.0": "/run/vdsm/ch/ovirt.sock",
                       "org.qemu.guest_agent.0": "/run/vdsm/ch/qga.sock"},
        listen_networks={"vdsm-ovirtmgmt": "192.0.2.10"},
        vnc_display_base=10)
    r = str(root)
    assert argv == [
        "qemu-system-x86_64",
        "-name", "guest=web01,debug-threads=on", *HEAD,
        "-uuid", "3f1a2b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b",
        "-machine", "pc-i440fx-7.2,usb=off,dump-guest-core=off,hpet=off",
        "-accel", "kvm",
        "-cpu", "Nehalem,vmx=off,x2apic=on",
        "-m", "size=2048M,slots=16,maxmem=8192M",
        "-overcommit", "mem-lock=off",
        "-object", "memory-backend-ram,id=ram-node0,size=2048M",
        "-numa", "node,nodeid=0,cpus=0-15,memdev=ram-node0",
        "-smp", "2,maxcpus=16,sockets=16,cores=1,threads=1",
        "-smbios", "type=1,manufacturer=oVirt,product=RHEL,, for testing,"
                   "version=8.6-1.el8,serial=30373237-3132-5a43-3334-"
                   "323030334c4b,uuid=3f1a2b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b,"
                   "family=oVirt",
        *MONITOR,
        "-rtc", "base=utc,driftfix=slew",
        "-global", "kvm-pit.lost_tick_policy=delay",
        "-no-shutdown",
        "-boot", "menu=on,strict=on",
        "-device", "piix3-usb-uhci,id=usb",
        "-device", "virtio-serial-pci,id=virtio-serial0",
        "-device", "virtio-scsi-pci,id=scsi0",
        "-device", "ide-cd,bus=ide.1,unit=0,id=ua-cdrom,bootindex=2",
        "-blockdev", '{"driver":"file","filename":"' + r + '/sd1/images/img1/'
                     'vol1","node-name":"file-vda","read-only":false,"cache":'
                     '{"direct":true,"no-flush":false},"aio":"native"}',
        "-blockdev", '{"driver":"qcow2","node-name":"drive-vda","file":'
                     '"file-vda","read-only":false}',
        "-device", "virtio-blk-pci,drive=drive-vda,id=ua-disk0,"
                   "serial=img1-serial,bootindex=1,werror=stop,rerror=stop",
        "-blockdev", '{"driver":"file","filename":"' + r + '/sd1/images/img2/'
                     'vol2","node-name":"file-sda","read-only":false,"cache":'
                     '{"direct":false,"no-flush":false},"discard":"unmap"}',
        "-blockdev", '{"driver":"raw","node-name":"drive-sda","file":'
                     '"file-sda","read-only":false,"discard":"unmap"}',
        "-device", "scsi-hd,bus=scsi0.0,channel=0,scsi-id=0,lun=0,"
                   "drive=drive-sda,id=ua-disk1,write-cache=off",
        "-netdev", "tap,fd=31,id=hostnet0",
        "-device", "virtio-net-pci,netdev=hostnet0,id=ua-nic0,"
                   "mac=56:6f:1a:2b:00:01,bootindex=3,host_mtu=1500",
        "-chardev", "file,id=charserial0,path=/var/log/vdsm/vm,,1.log,"
                    "append=on",
        "-device", "isa-serial,chardev=charserial0,id=serial0",
        "-chardev", "socket,id=charchannel0,path=/run/vdsm/ch/ovirt.sock,"
                    "server=on,wait=off",
        "-device", "virtserialport,bus=virtio-serial0.0,nr=1,"
                   "chardev=charchannel0,id=channel0,name=ovirt-guest-agent.0",
        "-chardev", "socket,id=charchannel1,path=/run/vdsm/ch/qga.sock,"
                    "server=on,wait=off",
        "-device", "virtserialport,bus=virtio-serial0.0,nr=2,"
                   "chardev=charchannel1,id=channel1,"
                   "name=org.qemu.guest_agent.0",
        "-device", "usb-tablet,id=input0,bus=usb.0",
        "-vnc", "192.0.2.10:10,to=109,password=on",
        "-device", "VGA,id=ua-video",
        "-display", "none",
        "-device", "virtio-balloon-pci,id=ua-balloon",
        "-object", "rng-random,id=objrng0,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=objrng0,id=ua-rng",
        "-device", "vmcoreinfo",
        *SANDBOX,
    ]
    # Never a password on the command line, even oVirt's placeholder.
    assert not any("*****" in a for a in argv)
    assert nic_device_id(d, "56:6f:1a:2b:00:01") == "ua-nic0"
    assert [disk_device_id(x) for x in d.disks] == [
        "ua-cdrom", "ua-disk0", "ua-disk1"]
    assert disk_node_names(d.disks[1]) == ("drive-vda", "file-vda")
    assert device_id(d.disks[0]) == "ua-cdrom"


def test_q35_spice(root):
    d = load("q35_spice", root)
    argv = build_argv(d, kvm=True, qmp_path=QMP,
                      nic_fds={"52:54:00:aa:bb:cc": 40},
                      graphics_ports={"spice": 5930})
    r = str(root)
    assert argv == [
        "qemu-system-x86_64",
        "-name", "guest=desk,,top,debug-threads=on", *HEAD,
        "-uuid", "6a0f7ab1-2c3d-4e5f-9a8b-7c6d5e4f3a21",
        "-machine", "q35,usb=off,dump-guest-core=off",
        "-accel", "kvm",
        "-cpu", "host,migratable=on,-arch-capabilities,kvmclock=off",
        "-m", "size=1024M", "-overcommit", "mem-lock=off",
        "-smp", "4,sockets=1,cores=2,threads=2",
        *MONITOR,
        "-rtc", "base=localtime",
        "-no-shutdown", "-no-reboot",
        "-boot", "order=dc",
        "-device", "pcie-root-port,id=pci.1,chassis=1,port=1,bus=pcie.0",
        "-device", "pcie-root-port,id=pci.2,chassis=2,port=2,bus=pcie.0",
        "-device", "virtio-serial-pci,id=virtio-serial0",
        "-device", "qemu-xhci,id=usb",
        "-device", "ide-cd,bus=ide.0,id=sda",
        "-blockdev", '{"driver":"file","filename":"' + r + '/desk.img",'
                     '"node-name":"file-sdb","read-only":false}',
        "-blockdev", '{"driver":"raw","node-name":"drive-sdb","file":'
                     '"file-sdb","read-only":false}',
        "-device", "ide-hd,bus=ide.1,drive=drive-sdb,id=sdb",
        "-netdev", "tap,fd=40,id=hostnet0",
        "-device", "e1000,netdev=hostnet0,id=net0,mac=52:54:00:aa:bb:cc",
        "-chardev", "spicevmc,id=charchannel0,name=vdagent",
        "-device", "virtserialport,bus=virtio-serial0.0,nr=1,"
                   "chardev=charchannel0,id=channel0,name=com.redhat.spice.0",
        "-device", "virtio-keyboard-pci,id=input0",
        "-device", "usb-tablet,id=input1,bus=usb.0",
        "-spice", "port=5930,addr=::1,seamless-migration=on",
        "-device", "qxl-vga,id=video0",
        "-display", "none",
        "-object", "rng-random,id=objrng0,filename=/dev/urandom",
        "-device", "virtio-rng-pci,rng=objrng0,id=rng0,max-bytes=1024,"
                   "period=2000",
        *SANDBOX,
    ]


# -- pieces ----------------------------------------------------------------

def opt(argv, name):
    return argv[argv.index(name) + 1]


@pytest.mark.parametrize("cpu, kvm, expected", [
    ("<cpu mode='host-passthrough'/>", True,
     "host,migratable=on,-arch-capabilities"),
    ("<cpu mode='host-model'/>", True, "host,migratable=on,-arch-capabilities"),
    ("<cpu mode='host-passthrough'/>", False, "max,-arch-capabilities"),
    ("<cpu mode='custom'><model>Skylake-Client</model>"
     "<feature policy='forbid' name='hle'/></cpu>", True,
     "Skylake-Client,hle=off"),
    ("<cpu><feature policy='require' name='x2apic'/></cpu>", False,
     "qemu64,x2apic=on"),
    ("<clock><timer name='kvmclock' present='no'/></clock>", True,
     "qemu64,kvmclock=off"),
])
def test_cpu(cpu, kvm, expected):
    assert opt(build_argv(domain(extra=cpu), kvm=kvm, qmp_path=QMP),
               "-cpu") == expected


def test_no_cpu_element_uses_qemu_default():
    assert "-cpu" not in build_argv(domain(), kvm=True, qmp_path=QMP)


def test_host_cpu_flags_configurable():
    argv = build_argv(domain(extra="<cpu mode='host-passthrough'/>"),
                      kvm=True, qmp_path=QMP, host_cpu_flags=())
    assert opt(argv, "-cpu") == "host"


def test_variable_clock_uses_now():
    d = domain(extra="<clock offset='variable' adjustment='3600' "
                     "basis='utc'/>")
    argv = build_argv(d, kvm=True, qmp_path=QMP, now=lambda: 1700000000.0)
    assert opt(argv, "-rtc") == "base=2023-11-14T23:13:20"


def test_pit_policy_only_under_kvm():
    d = domain(extra="<clock><timer name='pit' tickpolicy='delay'/></clock>")
    assert "-global" in build_argv(d, kvm=True, qmp_path=QMP)
    assert "-global" not in build_argv(d, kvm=False, qmp_path=QMP)


def test_odd_memory_size():
    d = parse_domain(f"<domain><name>t</name><uuid>{UUID}</uuid><memory "
                     "unit='KiB'>65537</memory></domain>", [])
    assert opt(build_argv(d, kvm=True, qmp_path=QMP), "-m") == "size=65537k"


def test_serial_without_log_is_null():
    d = domain("<serial type='pty'/>")
    argv = build_argv(d, kvm=True, qmp_path=QMP)
    i = argv.index("null,id=charserial0")
    assert argv[i + 2] == "isa-serial,chardev=charserial0,id=serial0"


def test_comma_in_qmp_path_escaped():
    argv = build_argv(domain(), kvm=True, qmp_path="/run/a,b/q.sock")
    assert "socket,id=charmonitor,path=/run/a,,b/q.sock,server=on,wait=off" \
        in argv


def test_vnc_password_never_on_argv():
    d = domain("<graphics type='vnc' port='5907' autoport='no' "
               "passwd='s3cret' listen='::'/>")
    argv = build_argv(d, kvm=True, qmp_path=QMP)
    assert opt(argv, "-vnc") == "[::]:7,password=on"
    assert not any("s3cret" in a for a in argv)


def test_spice_password_never_on_argv():
    d = domain("<graphics type='spice' port='5950' autoport='no' "
               "passwd='s3cret'/>")
    argv = build_argv(d, kvm=True, qmp_path=QMP)
    assert opt(argv, "-spice") == "port=5950,addr=127.0.0.1,seamless-migration=on"
    assert not any("s3cret" in a for a in argv)


def test_usb_controller_models():
    d = domain("<controller type='usb' model='ich9-ehci1'/>"
               "<input type='mouse' bus='usb'/>")
    argv = build_argv(d, kvm=True, qmp_path=QMP)
    assert argv[argv.index("ich9-usb-ehci1,id=usb") + 2] == \
        "usb-mouse,id=input0,bus=usb.0"


def test_sata_on_pc_gets_ahci(tmp_path):
    (tmp_path / "d.img").write_bytes(b"x")
    d = domain(f"<disk type='file'><source file='{tmp_path}/d.img'/>"
               "<target dev='sdc' bus='sata'/></disk>", roots=[tmp_path])
    argv = build_argv(d, kvm=True, qmp_path=QMP)
    assert "ich9-ahci,id=sata0" in argv
    assert "ide-hd,bus=sata0.2,drive=drive-sdc,id=sdc" in argv


def test_readonly_disk(tmp_path):
    (tmp_path / "d.img").write_bytes(b"x")
    d = domain(f"<disk type='file'><source file='{tmp_path}/d.img'/>"
               "<target dev='vdb'/><readonly/></disk>", roots=[tmp_path])
    argv = build_argv(d, kvm=True, qmp_path=QMP)
    nodes = [json.loads(a) for a in argv if a.startswith('{"driver"')]
    assert [n["read-only"] for n in nodes] == [True, True]


@pytest.mark.parametrize("devices, kwargs, message", [
    ("<interface type='bridge'><mac address='52:54:00:00:00:01'/>"
     "<source bridge='br0'/></interface>", {},
     "no tap fd for the NIC with MAC 52:54:00:00:00:01"),
    ("<interface type='bridge'><mac address='52:54:00:00:00:01'/>"
     "<source bridge='br0'/></interface>",
     {"nic_fds": {"52:54:00:00:00:01": 1}},
     "bad tap fd 1 for the NIC with MAC 52:54:00:00:00:01"),
    ("<graphics type='spice' port='5901' autoport='no'/>", {"spice": False},
     "spice graphics requested but this QEMU was built without SPICE"),
    ("<graphics type='spice'/>", {},
     "spice autoport needs a port allocated by the agent "
     "(graphics_ports['spice'])"),
    ("<graphics type='vnc'><listen type='network' network='ovirtmgmt'/>"
     "</graphics>", {},
     "vnc graphics listen on network 'ovirtmgmt', which has no address on "
     "this host"),
    ("<graphics type='vnc' port='5000' autoport='no'/>", {},
     "vnc port 5000 is below 5900"),
    ("<channel type='unix'><target type='virtio' "
     "name='org.qemu.guest_agent.0'/></channel>", {},
     "no socket path for channel 'org.qemu.guest_agent.0'"),
    ("<controller type='pci' index='1' model='pcie-root-port'/>", {},
     "pcie-root-port controllers need a q35 machine"),
])
def test_argv_errors(devices, kwargs, message):
    with pytest.raises(ArgvError) as e:
        build_argv(domain(devices), kvm=True, qmp_path=QMP, **kwargs)
    assert str(e.value) == message


def test_probe_spice():
    assert probe_spice() is True   # Debian's QEMU is built with SPICE
    assert probe_spice("/nonexistent/qemu") is False


# -- real QEMU -------------------------------------------------------------

def _kvm_usable():
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
        return True
    except OSError:
        return False


ACCELS = ["tcg"] + (["kvm"] if _kvm_usable() else [])


class Qmp:
    """A tiny blocking QMP client: enough to drive a test."""

    def __init__(self, path, proc, deadline):
        while True:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                s.connect(path)
                break
            except OSError:
                s.close()
                if proc.poll() is not None:
                    pytest.fail(f"qemu exited: {proc.stderr.read().decode()}")
                assert time.monotonic() < deadline, "QMP never answered"
                time.sleep(0.02)
        s.settimeout(10)
        self.sock = s
        self.file = s.makefile("rw", encoding="utf-8")
        assert "QMP" in json.loads(self.file.readline())
        self.events = []

    def __call__(self, command, **arguments):
        msg = {"execute": command}
        if arguments:
            msg["arguments"] = arguments
        self.file.write(json.dumps(msg) + "\n")
        self.file.flush()
        while True:
            reply = json.loads(self.file.readline())
            if "event" in reply:
                self.events.append(reply)
                continue
            if "error" in reply:
                raise AssertionError(f"{command}: {reply['error']}")
            return reply["return"]

    def close(self):
        self.file.close()
        self.sock.close()


def run_qemu(argv, qmp_path, check):
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    qmp = None
    try:
        deadline = time.monotonic() + 15
        qmp = Qmp(qmp_path, proc, deadline)
        qmp("qmp_capabilities")
        assert qmp("query-status")["status"] == "prelaunch"   # -S
        check(qmp)
        qmp("cont")
        assert qmp("query-status")["status"] == "running"
        qmp("quit")
        assert proc.wait(15) == 0, proc.stderr.read().decode()
    finally:
        if qmp is not None:
            qmp.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    assert proc.returncode is not None


@pytest.mark.parametrize("accel", ACCELS)
def test_real_qemu_diskless(tmp_path, accel):
    d = domain(extra="<cpu mode='host-passthrough'/><features><acpi/>"
                     "</features>")
    qmp_path = str(tmp_path / "qmp.sock")
    argv = build_argv(d, kvm=accel == "kvm", qmp_path=qmp_path)

    def check(qmp):
        assert qmp("query-block") == []
        assert qmp("query-name") == {"name": "t"}
        assert qmp("query-uuid") == {"UUID": UUID}
        assert len(qmp("query-cpus-fast")) == 1
    run_qemu(argv, qmp_path, check)


@pytest.mark.parametrize("accel", ACCELS)
def test_real_qemu_disks(tmp_path, accel):
    images = tmp_path / "images"
    images.mkdir()
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2",
                    str(images / "disk.qcow2"), "16M"], check=True)
    (images / "cd.iso").write_bytes(b"\0" * 2048 * 16)
    (images / "other.iso").write_bytes(b"\0" * 2048 * 16)
    d = domain(
        f"""
        <disk type="file" device="disk">
          <driver name="qemu" type="qcow2" error_policy="stop"/>
          <source file="{images}/disk.qcow2"/>
          <target dev="vda" bus="virtio"/><serial>abc123</serial>
          <alias name="ua-disk0"/><boot order="1"/>
        </disk>
        <disk type="file" device="cdrom">
          <driver name="qemu" type="raw"/>
          <source file="{images}/cd.iso"/>
          <target dev="hdc" bus="ide"/><readonly/>
        </disk>
        <disk type="file" device="cdrom">
          <target dev="hdd" bus="ide"/><alias name="ua-cd2"/>
        </disk>
        <serial type="pty"/>
        <graphics type="vnc" passwd="s3cret"/>
        <input type="tablet" bus="usb"/>
        <video><model type="vga"/></video>
        <rng model="virtio"><backend model="random">/dev/urandom</backend>
        </rng>
        """,
        extra="<vcpu>2</vcpu><cpu><topology sockets='1' cores='2' "
              "threads='1'/></cpu><features><acpi/></features>",
        roots=[images])
    qmp_path = str(tmp_path / "qmp.sock")
    log = tmp_path / "serial.log"
    argv = build_argv(d, kvm=accel == "kvm", qmp_path=qmp_path,
                      serial_log_path=str(log), vnc_display_base=60)
    assert not any("s3cret" in a for a in argv)

    def check(qmp):
        blocks = {b["qdev"]: b for b in qmp("query-block")}
        vda = blocks["/machine/peripheral/ua-disk0/virtio-backend"]
        assert vda["inserted"]["node-name"] == "drive-vda"
        assert vda["inserted"]["image"]["filename"] == \
            f"{images}/disk.qcow2"
        assert vda["inserted"]["drv"] == "qcow2"
        assert not vda["inserted"]["ro"]
        hdc = blocks["hdc"]
        assert hdc["inserted"]["ro"] and hdc["inserted"]["file"] == \
            f"{images}/cd.iso"
        assert "inserted" not in blocks["ua-cd2"]     # an empty drive
        # The empty cdrom takes a medium later through its stable id.
        qmp("blockdev-change-medium", id="ua-cd2",
            filename=f"{images}/other.iso", format="raw", **{
                "read-only-mode": "read-only"})
        cd2 = {b["qdev"]: b for b in qmp("query-block")}["ua-cd2"]
        assert cd2["inserted"]["file"] == f"{images}/other.iso"
        vnc = qmp("query-vnc")
        assert vnc["enabled"] and vnc["auth"] == "vnc"   # password required
        assert 5960 <= int(vnc["service"]) <= 6059
        qmp("set_password", protocol="vnc", password="s3cret")
        assert len(qmp("query-cpus-fast")) == 2
    run_qemu(argv, qmp_path, check)
    assert log.exists()


# -- direct kernel boot, ACPI, domain type ---------------------------------

def test_direct_kernel_boot(tmp_path):
    (tmp_path / "vmlinuz").write_bytes(b"k")
    (tmp_path / "initrd,1.img").write_bytes(b"i")
    d = domain(os_=f"<os><type>hvm</type><boot dev='hd'/>"
                   f"<kernel>{tmp_path}/vmlinuz</kernel>"
                   f"<initrd>{tmp_path}/initrd,1.img</initrd>"
                   "<cmdline>console=ttyS0 a=b,c  quiet</cmdline></os>",
               roots=[tmp_path])
    argv = build_argv(d, kvm=True, qmp_path=QMP)
    i = argv.index("-kernel")
    # Plain strings for QEMU: nothing to escape, not even commas.
    assert argv[i - 3:i + 6] == [
        "-no-shutdown", "-boot", "order=c",
        "-kernel", f"{tmp_path}/vmlinuz",
        "-initrd", f"{tmp_path}/initrd,1.img",
        "-append", "console=ttyS0 a=b,c  quiet"]


def test_kernel_without_initrd_or_cmdline(tmp_path):
    (tmp_path / "vmlinuz").write_bytes(b"k")
    d = domain(os_=f"<os><type>hvm</type><kernel>{tmp_path}/vmlinuz</kernel>"
                   "</os>", roots=[tmp_path])
    argv = build_argv(d, kvm=True, qmp_path=QMP)
    assert opt(argv, "-kernel") == f"{tmp_path}/vmlinuz"
    assert "-initrd" not in argv and "-append" not in argv
    assert "-kernel" not in build_argv(domain(), kvm=True, qmp_path=QMP)


def test_acpi_only_with_the_feature():
    assert opt(build_argv(domain(), kvm=True, qmp_path=QMP), "-machine") == \
        "pc,usb=off,dump-guest-core=off,acpi=off"
    d = domain(extra="<features><acpi/><apic/></features>")
    assert opt(build_argv(d, kvm=True, qmp_path=QMP), "-machine") == \
        "pc,usb=off,dump-guest-core=off"


def qemu_type_domain(extra=""):
    return parse_domain(
        f'<domain type="qemu"><name>t</name><uuid>{UUID}</uuid>'
        f'<memory unit="MiB">64</memory>{extra}</domain>', [])


def test_domain_type_qemu_forces_tcg():
    """libvirt's type="qemu" is TCG even where KVM works."""
    d = qemu_type_domain("<cpu mode='host-passthrough'/><clock><timer "
                         "name='pit' tickpolicy='delay'/></clock>")
    for kvm in (True, False):
        argv = build_argv(d, kvm=kvm, qmp_path=QMP)
        assert opt(argv, "-accel") == "tcg"
        assert opt(argv, "-cpu") == "max,-arch-capabilities"
        assert "-global" not in argv
    kvm_type = domain(extra="<cpu mode='host-passthrough'/>")
    assert opt(build_argv(kvm_type, kvm=True, qmp_path=QMP), "-accel") == "kvm"
    assert opt(build_argv(kvm_type, kvm=False, qmp_path=QMP),
               "-accel") == "tcg"


def test_real_qemu_direct_kernel_boot(tmp_path):
    """
    The test guest (tests/_guest.py) boots from -kernel/-initrd/-append,
    under TCG although kvm=True (type="qemu"), and powers off through ACPI:
    QEMU (-no-shutdown) reports a guest SHUTDOWN and stops.
    """
    from tests import _guest
    kernel, initrd = _guest.guest_files(tmp_path)
    d = parse_domain(_guest.linux_domain_xml(
        UUID, "t", kernel, initrd, "guest.poweroff_after=0"), [str(tmp_path)])
    qmp_path = str(tmp_path / "qmp.sock")
    log = tmp_path / "serial.log"
    argv = build_argv(d, kvm=True, qmp_path=qmp_path,
                      serial_log_path=str(log))
    assert opt(argv, "-accel") == "tcg"
    proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    qmp = None
    try:
        qmp = Qmp(qmp_path, proc, time.monotonic() + 15)
        qmp("qmp_capabilities")
        qmp("cont")
        deadline = time.monotonic() + 30
        while qmp("query-status")["status"] != "shutdown":
            assert time.monotonic() < deadline, log.read_text()
            time.sleep(0.1)
        [event] = [e for e in qmp.events if e["event"] == "SHUTDOWN"]
        assert event["data"] == {"guest": True, "reason": "guest-shutdown"}
        text = log.read_text()
        assert _guest.READY in text and _guest.POWEROFF in text, text
        assert _guest.ERROR not in text, text
        qmp("quit")
        assert proc.wait(15) == 0
    finally:
        if qmp is not None:
            qmp.close()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
