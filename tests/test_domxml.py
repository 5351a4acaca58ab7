"""
Tests for L{vdsm_twisted.virt.domxml}: the supported subset, the refusals
(each with its exact message) and the input-safety checks.
"""

import re
import time
from pathlib import Path

import pytest

from vdsm_twisted.virt.domxml import (
    Channel, Controller, Cpu, Disk, DomainXMLError, Graphics, Input,
    Memballoon, Nic, NumaCell, Rng, Serial, Timer, Video, parse_domain)

DATA = Path(__file__).parent / "data" / "domxml"
UUID = "0b9c0d3b-5b5f-4c57-9f3c-2cb2d5f0cc2a"


@pytest.fixture
def root(tmp_path):
    """An image root holding the files the samples name."""
    r = tmp_path / "images"
    (r / "sd1" / "images" / "img1").mkdir(parents=True)
    (r / "sd1" / "images" / "img2").mkdir(parents=True)
    for f in ("sd1/images/img1/vol1", "sd1/images/img2/vol2", "desk.img",
              "disk.img", "cd.iso"):
        (r / f).write_bytes(b"\0" * 512)
    return r


def sample(name, root=None):
    text = (DATA / f"{name}.xml").read_text()
    return text.replace("@ROOT@", str(root)) if root else text


def parse(xml, root=None, **kw):
    return parse_domain(xml, [str(root)] if root else [], **kw)


def refused(xml, root=None, **kw) -> str:
    with pytest.raises(DomainXMLError) as e:
        parse(xml, root, **kw)
    return str(e.value)


def domain(devices="", extra="", os_="<os><type>hvm</type></os>",
           attrs='type="kvm"'):
    """A minimal domain with these devices and top-level elements."""
    return (f'<domain {attrs}><name>t</name><uuid>{UUID}</uuid>'
            f'<memory unit="MiB">64</memory>{os_}{extra}'
            f'<devices>{devices}</devices></domain>')


def disk_xml(path, target="vda", bus="virtio", device="disk", extra=""):
    src = f'<source file="{path}"/>' if path is not None else ""
    return (f'<disk type="file" device="{device}">{src}'
            f'<target dev="{target}" bus="{bus}"/>{extra}</disk>')


# -- samples ---------------------------------------------------------------

def test_minimal():
    d = parse(sample("minimal"))
    assert (d.uuid, d.name, d.memory_kib, d.current_memory_kib) == (
        UUID, "tiny", 65536, 65536)
    assert (d.vcpus, d.max_vcpus, d.sockets, d.cores, d.threads) == (
        1, None, 1, 1, 1)
    assert (d.machine, d.arch, d.cpu) == ("pc", "x86_64", Cpu())
    assert d.disks == d.nics == d.graphics == d.controllers == ()
    assert d.memballoon == Memballoon(model="none")
    assert (d.on_poweroff, d.on_reboot, d.on_crash) == (
        "destroy", "restart", "destroy")
    assert d.metadata_xml is None and dict(d.custom) == {}
    assert d.xml == sample("minimal")


def test_ovirt_full(root):
    xml = sample("ovirt_full", root)
    d = parse(xml, root)
    assert d.uuid == "3f1a2b4c-5d6e-4f70-8a9b-0c1d2e3f4a5b"  # normalized
    assert (d.memory_kib, d.current_memory_kib, d.max_memory_kib,
            d.memory_slots) == (2097152, 1048576, 8388608, 16)
    assert (d.vcpus, d.max_vcpus, d.sockets, d.cores, d.threads) == (
        2, 16, 16, 1, 1)
    assert d.machine == "pc-i440fx-7.2"
    assert d.cpu == Cpu(mode="custom", model="Nehalem",
                        features=(("vmx", False), ("x2apic", True)))
    assert d.numa == (NumaCell(id=0, cpus=tuple(range(16)),
                               memory_kib=2097152),)
    assert (d.acpi, d.apic, d.vmcoreinfo, d.boot_menu) == (
        True, False, True, True)
    assert d.clock.offset == "variable" and d.clock.timers == (
        Timer(name="rtc", tickpolicy="catchup"),
        Timer(name="pit", tickpolicy="delay"),
        Timer(name="hpet", present=False))
    assert dict(d.sysinfo)["product"] == "RHEL, for testing"
    assert d.disks == (
        Disk(device="cdrom", source_path=None, format="raw", bus="ide",
             target="hdc", readonly=True, boot_order=2, alias="ua-cdrom",
             error_policy="report"),
        Disk(device="disk",
             source_path=str(root / "sd1/images/img1/vol1"),
             format="qcow2", bus="virtio", target="vda", serial="img1-serial",
             boot_order=1, alias="ua-disk0", cache="none", io="native",
             error_policy="stop"),
        Disk(device="disk", source_path=str(root / "sd1/images/img2/vol2"),
             format="raw", bus="scsi", target="sda", alias="ua-disk1",
             cache="writethrough", discard="unmap"),
    )
    assert d.nics == (Nic(mac="56:6f:1a:2b:00:01", bridge="ovirtmgmt",
                          alias="ua-nic0", boot_order=3, mtu=1500),)
    g = d.graphics[0]
    assert g == Graphics(type="vnc", listen_network="vdsm-ovirtmgmt",
                         autoport=True, passwd="*****",
                         passwd_valid_to="1970-01-01T00:00:01",
                         keymap="en-us")
    assert "*****" not in repr(g)
    assert d.serial_consoles == (Serial(type="pty"),)
    assert d.channels == (Channel(type="unix", name="ovirt-guest-agent.0"),
                          Channel(type="unix", name="org.qemu.guest_agent.0"))
    assert [c.type for c in d.controllers] == [
        "usb", "virtio-serial", "scsi", "ide", "pci"]
    assert not any(c.implicit for c in d.controllers)
    assert d.inputs == (Input(type="tablet", bus="usb"),
                        Input(type="mouse", bus="ps2"))
    assert d.video == Video(model="vga", alias="ua-video")
    assert d.memballoon == Memballoon(model="virtio", stats_period=5,
                                      alias="ua-balloon")
    assert d.rngs == (Rng(alias="ua-rng"),)
    assert dict(d.custom) == {"sap_agent": "false", "hugepages": "0"}
    assert d.metadata_xml.startswith("<metadata")
    assert "<ovirt-vm:clusterVersion>4.7</ovirt-vm:clusterVersion>" in \
        d.metadata_xml
    assert d.xml == xml
    hash(d)  # frozen records are hashable


def test_q35_spice(root):
    d = parse(sample("q35_spice", root), root)
    assert d.q35 and d.name == "desk,top"
    assert d.cpu == Cpu(mode="host-passthrough")
    assert (d.sockets, d.cores, d.threads) == (1, 2, 2)
    assert d.boot_devices == ("cdrom", "hd")
    assert d.on_reboot == "destroy"
    assert d.disks[0] == Disk(device="cdrom", source_path=None, format="raw",
                              bus="sata", target="sda", readonly=True)
    assert d.graphics == (Graphics(type="spice", listen="::1"),)
    assert d.channels == (Channel(type="spicevmc", name="com.redhat.spice.0"),)
    # Controllers that devices need are added, marked implicit.
    assert [c for c in d.controllers if c.implicit] == [
        Controller(type="sata", implicit=True),
        Controller(type="virtio-serial", implicit=True),
        Controller(type="usb", model="qemu-xhci", implicit=True)]
    assert d.rngs == (Rng(rate_bytes=1024, rate_period=2000),)
    assert d.clock.offset == "localtime"


def test_bytes_and_declaration():
    xml = '<?xml version="1.0" encoding="UTF-8"?>' + domain()
    assert parse(xml).name == "t"
    assert parse(xml.encode()).name == "t"


def test_units():
    d = parse(domain().replace('<memory unit="MiB">64</memory>',
                               '<memory unit="G">2</memory>'
                               '<currentMemory unit="b">1000</currentMemory>'))
    assert (d.memory_kib, d.current_memory_kib) == (2 * 1024 * 1024, 1)


def test_generated_mac():
    xml = domain('<interface type="bridge"><source bridge="br0"/>'
                 '</interface>')
    macs = {parse(xml).nics[0].mac for _ in range(5)}
    assert len(macs) > 1
    for mac in macs:
        assert re.fullmatch(r"([0-9a-f]{2}:){5}[0-9a-f]{2}", mac)
        first = int(mac[:2], 16)
        assert first & 2 and not first & 1   # locally administered, unicast


def test_comments_ignored():
    d = parse(domain("<!-- a comment --><memballoon model='none'/>"))
    assert d.memballoon.model == "none"


# -- input safety ----------------------------------------------------------

DTD_REFUSED = "domain XML must not contain <!DOCTYPE: DTDs and entities are refused"


def test_xxe():
    assert refused(sample("xxe")) == DTD_REFUSED
    assert refused(sample("xxe").encode()) == DTD_REFUSED


def test_xxe_utf16():
    """The pre-scan cannot be dodged with another encoding."""
    xml = sample("xxe").replace('<?xml version="1.0"?>',
                                '<?xml version="1.0" encoding="UTF-16"?>')
    assert refused(xml.encode("utf-16")) == "domain XML is not valid UTF-8"


def test_billion_laughs():
    start = time.monotonic()
    assert refused(sample("billion_laughs")) == DTD_REFUSED
    assert time.monotonic() - start < 1


def test_doctype():
    assert refused(sample("doctype")) == DTD_REFUSED


def test_entity_declaration_without_doctype_word():
    assert refused(domain(extra="<x><!ENTITY a 'b'></x>")) == (
        "domain XML must not contain <!ENTITY: DTDs and entities are refused")


def test_undeclared_entity():
    msg = refused(domain().replace("<name>t</name>", "<name>&xxe;</name>"))
    assert msg.startswith("malformed domain XML: Entity 'xxe' not defined")


def test_processing_instruction():
    assert refused(sample("processing_instruction")) == (
        "domain XML must not contain processing instructions "
        "(found <?xml-stylesheet>)")
    assert refused(domain(extra="<?evil x?>")) == (
        "domain XML must not contain processing instructions (found <?evil>)")


def test_oversized():
    xml = domain(extra="<description>" + "x" * (1 << 20) + "</description>")
    size = len(xml)
    assert refused(xml) == (f"domain XML is {size} bytes, larger than the "
                            "limit of 1048576")
    assert refused(domain(), max_size=100) == (
        f"domain XML is {len(domain())} bytes, larger than the limit of 100")


def test_malformed():
    assert refused(sample("malformed")) == (
        "malformed domain XML: Opening and ending tag mismatch: domain line "
        "1 and domian, line 5, column 10 (<string>, line 5)")
    assert refused("") == (
        "malformed domain XML: Document is empty, line 1, column 1 "
        "(<string>, line 1)")
    assert refused(b"\xff\xfe") == "domain XML is not valid UTF-8"


def test_wrong_root():
    assert refused("<network/>") == (
        "unsupported element /network: the root must be <domain>")


# -- refusals --------------------------------------------------------------

@pytest.mark.parametrize("devices, message", [
    ('<hostdev mode="subsystem" type="pci"/>',
     "unsupported element /domain/devices/hostdev"),
    ('<filesystem type="mount"/>',
     "unsupported element /domain/devices/filesystem"),
    ('<smartcard mode="passthrough"/>',
     "unsupported element /domain/devices/smartcard"),
    ('<redirdev bus="usb" type="spicevmc"/>',
     "unsupported element /domain/devices/redirdev"),
    ('<watchdog model="i6300esb" action="reset"/>',
     "unsupported element /domain/devices/watchdog"),
    ('<sound model="ich6"/>', "unsupported element /domain/devices/sound"),
    ('<tpm model="tpm-crb"/>', "unsupported element /domain/devices/tpm"),
    ('<disk type="network" device="disk"><source protocol="rbd"/></disk>',
     "unsupported value 'network' for /domain/devices/disk/@type"),
    ('<disk type="file" device="floppy"/>',
     "unsupported value 'floppy' for /domain/devices/disk/@device"),
    ('<disk type="file"><source file="/x"/><target dev="vda"/><iotune/>'
     '</disk>', "unsupported element /domain/devices/disk/iotune"),
    ('<disk type="file"><driver name="qemu" type="vmdk"/></disk>',
     "unsupported value 'vmdk' for /domain/devices/disk/driver/@type"),
    ('<disk type="file"><driver name="qemu" iothread="1"/></disk>',
     "unsupported attribute /domain/devices/disk/driver/@iothread"),
    ('<interface type="direct"><source dev="eth0" mode="bridge"/>'
     '</interface>',
     "unsupported value 'direct' for /domain/devices/interface/@type"),
    ('<interface type="user"/>',
     "unsupported value 'user' for /domain/devices/interface/@type"),
    ('<interface type="bridge"><source bridge="br0"/>'
     '<filterref filter="vdsm-no-mac-spoofing"/></interface>',
     "unsupported element /domain/devices/interface/filterref"),
    ('<interface type="bridge"><source bridge="br0"/><bandwidth>'
     '<inbound average="1000"/></bandwidth></interface>',
     "unsupported element /domain/devices/interface/bandwidth/inbound"),
    ('<interface type="bridge"><source bridge="br0"/>'
     '<model type="ne2k_pci"/></interface>',
     "unsupported value 'ne2k_pci' for /domain/devices/interface/model/@type"),
    ('<graphics type="sdl"/>',
     "unsupported value 'sdl' for /domain/devices/graphics/@type"),
    ('<graphics type="spice" tlsPort="-1" autoport="yes"/>',
     "unsupported attribute /domain/devices/graphics/@tlsPort"),
    ('<graphics type="spice"><channel name="main" mode="secure"/></graphics>',
     "unsupported element /domain/devices/graphics/channel"),
    ('<graphics type="vnc" listen="vnc.example.com"/>',
     "invalid value 'vnc.example.com' for /domain/devices/graphics/@listen: "
     "an IP address is needed"),
    ('<graphics type="vnc"/><graphics type="vnc"/>',
     "unsupported: more than one vnc /domain/devices/graphics"),
    ('<serial type="unix"><source mode="bind" path="/tmp/s"/></serial>',
     "unsupported value 'unix' for /domain/devices/serial/@type"),
    ('<serial type="pty"><target port="1"/></serial>',
     "invalid value '1' for /domain/devices/serial/target/@port: must be in "
     "[0, 0]"),
    ('<serial type="pty"/><serial type="file"/>',
     "unsupported: more than one /domain/devices/serial"),
    ('<console type="pty"><target type="virtio"/></console>',
     "unsupported value 'virtio' for /domain/devices/console/target/@type"),
    ('<channel type="pty"><target type="virtio" name="x"/></channel>',
     "unsupported value 'pty' for /domain/devices/channel/@type"),
    ('<channel type="unix"><target type="guestfwd" name="x"/></channel>',
     "unsupported value 'guestfwd' for /domain/devices/channel/target/@type"),
    ('<channel type="spicevmc"><target type="virtio"/></channel>',
     "invalid /domain/devices/channel: spicevmc needs spice graphics"),
    ('<controller type="fdc"/>',
     "unsupported value 'fdc' for /domain/devices/controller/@type"),
    ('<controller type="scsi" model="lsilogic"/>',
     "unsupported value 'lsilogic' for /domain/devices/controller/@model "
     "(controller type 'scsi')"),
    ('<controller type="pci" model="pci-bridge" index="1"/>',
     "unsupported value 'pci-bridge' for /domain/devices/controller/@model "
     "(controller type 'pci')"),
    ('<controller type="usb" model="none"/><input type="tablet"/>',
     "invalid: a usb device needs a usb controller, and "
     "/domain/devices/controller[@type='usb'] has model 'none'"),
    ('<input type="passthrough" bus="virtio"/>',
     "unsupported value 'passthrough' for /domain/devices/input/@type"),
    ('<input type="tablet" bus="ps2"/>',
     "unsupported value 'ps2' for /domain/devices/input/@bus (tablet)"),
    ('<video><model type="bochs"/></video>',
     "unsupported value 'bochs' for /domain/devices/video/model/@type"),
    ('<video><model type="vga"/></video><video><model type="qxl"/></video>',
     "unsupported: more than one /domain/devices/video"),
    ('<memballoon model="xen"/>',
     "unsupported value 'xen' for /domain/devices/memballoon/@model"),
    ('<rng model="virtio"><backend model="random">/dev/random</backend></rng>',
     "unsupported value '/dev/random' for /domain/devices/rng/backend: only "
     "/dev/urandom"),
    ('<rng model="virtio"><backend model="egd" type="tcp"/></rng>',
     "unsupported attribute /domain/devices/rng/backend/@type"),
    ('<emulator>/usr/bin/qemu</emulator><emulator/>',
     "duplicate element /domain/devices/emulator"),
    ('<disk type="file"><address type="pci"><zpci uid="1"/></address></disk>',
     "missing attribute /domain/devices/disk/source/@file"),
])
def test_unsupported_devices(devices, message):
    assert refused(domain(devices)) == message


@pytest.mark.parametrize("extra, message", [
    ("<numatune><memory mode='strict' nodeset='0'/></numatune>",
     "unsupported element /domain/numatune"),
    ("<iothreads>1</iothreads>", "unsupported element /domain/iothreads"),
    ("<cputune><shares>1020</shares></cputune>",
     "unsupported element /domain/cputune"),
    ("<memoryBacking><hugepages/></memoryBacking>",
     "unsupported element /domain/memoryBacking"),
    ("<pm><suspend-to-mem enabled='no'/></pm>",
     "unsupported element /domain/pm"),
    ("<seclabel type='dynamic'/>", "unsupported element /domain/seclabel"),
    ("<features><hyperv><relaxed state='on'/></hyperv></features>",
     "unsupported element /domain/features/hyperv"),
    ("<features><acpi foo='1'/></features>",
     "unsupported attribute /domain/features/acpi/@foo"),
    ("<cpu mode='maximum'/>",
     "unsupported value 'maximum' for /domain/cpu/@mode"),
    ("<cpu mode='custom'/>", "missing element /domain/cpu/model"),
    ("<cpu><model>Bad,Model</model></cpu>",
     "invalid value 'Bad,Model' for /domain/cpu/model"),
    ("<cpu><cache mode='passthrough'/></cpu>",
     "unsupported element /domain/cpu/cache"),
    ("<vcpu cpuset='0-1'>2</vcpu>", "unsupported attribute /domain/vcpu/@cpuset"),
    ("<vcpu>2</vcpu><cpu><topology sockets='1' cores='1' threads='1'/></cpu>",
     "invalid /domain/cpu/topology: 1 sockets x 1 cores x 1 threads is not "
     "2 vcpus"),
    ("<vcpu>0</vcpu>",
     "invalid value '0' for /domain/vcpu: must be in [1, 1024]"),
    ("<cpu><numa><cell id='0' cpus='0' memory='1024'/></numa></cpu>",
     "invalid /domain/cpu/numa: the cells' memory does not add up to "
     "/domain/memory"),
    ("<vcpu>2</vcpu><cpu><numa><cell id='0' cpus='0-2' memory='65536'/>"
     "</numa></cpu>",
     "invalid value for /domain/cpu/numa/cell/@cpus: vcpus out of range or in "
     "two cells"),
    ("<clock offset='timezone'/>",
     "unsupported value 'timezone' for /domain/clock/@offset"),
    ("<clock><timer name='tsc' frequency='1'/></clock>",
     "unsupported attribute /domain/clock/timer/@frequency"),
    ("<clock><timer name='hypervclock'/></clock>",
     "unsupported value 'hypervclock' for /domain/clock/timer/@name"),
    ("<clock><timer name='rtc' tickpolicy='merge'/></clock>",
     "unsupported value 'merge' for /domain/clock/timer/@tickpolicy "
     "(timer rtc)"),
    ("<on_crash>preserve</on_crash>",
     "unsupported value 'preserve' for /domain/on_crash"),
    ("<on_reboot>rename-restart</on_reboot>",
     "unsupported value 'rename-restart' for /domain/on_reboot"),
    ("<sysinfo type='smbios'><bios><entry name='vendor'>x</entry></bios>"
     "</sysinfo>", "unsupported element /domain/sysinfo/bios"),
    ("<sysinfo type='smbios'><system><entry name='asset'>x</entry></system>"
     "</sysinfo>",
     "unsupported value 'asset' for /domain/sysinfo/system/entry/@name"),
    ("<currentMemory unit='MiB'>128</currentMemory>",
     "invalid /domain/currentMemory: larger than /domain/memory"),
    ("<maxMemory unit='MiB'>128</maxMemory>",
     "missing attribute /domain/maxMemory/@slots"),
    ("<memory>1</memory>", "duplicate element /domain/memory"),
    ("<foo:bar xmlns:foo='urn:x'/>", "unsupported element /domain/{urn:x}bar"),
])
def test_unsupported_domain(extra, message):
    assert refused(domain(extra=extra)) == message


@pytest.mark.parametrize("os_, message", [
    ("<os><type arch='i686'>hvm</type></os>",
     "unsupported value 'i686' for /domain/os/type/@arch"),
    ("<os><type>xen</type></os>", "unsupported value 'xen' for /domain/os/type"),
    ("<os><type machine='pc,accel=tcg'>hvm</type></os>",
     "invalid value 'pc,accel=tcg' for /domain/os/type/@machine"),
    ("<os><type>hvm</type><loader readonly='yes'>/x.fd</loader></os>",
     "unsupported element /domain/os/loader"),
    ("<os><type>hvm</type><dtb>/boot/x.dtb</dtb></os>",
     "unsupported element /domain/os/dtb"),
    ("<os><type>hvm</type><initarg>x</initarg></os>",
     "unsupported element /domain/os/initarg"),
    ("<os><type>hvm</type><boot dev='usb'/></os>",
     "unsupported value 'usb' for /domain/os/boot/@dev"),
    ("<os><type>hvm</type><smbios mode='host'/></os>",
     "unsupported value 'host' for /domain/os/smbios/@mode"),
])
def test_unsupported_os(os_, message):
    assert refused(domain(os_=os_)) == message


@pytest.mark.parametrize("xml, message", [
    (domain().replace("<name>t</name>", ""), "missing element /domain/name"),
    (domain().replace("<name>t</name>", "<name>a/b</name>"),
     "invalid value 'a/b' for /domain/name"),
    (domain().replace(f"<uuid>{UUID}</uuid>", ""),
     "missing element /domain/uuid"),
    (domain().replace(UUID, "not-a-uuid"),
     "invalid value 'not-a-uuid' for /domain/uuid"),
    (domain().replace('<memory unit="MiB">64</memory>', ""),
     "missing element /domain/memory"),
    (domain().replace('unit="MiB"', 'unit="furlong"'),
     "unsupported value 'furlong' for /domain/memory/@unit"),
    (domain().replace(">64<", ">lots<"),
     "invalid value 'lots' for /domain/memory: expected an integer"),
    (domain(attrs='type="xen"'), "unsupported value 'xen' for /domain/@type"),
])
def test_invalid_domain(xml, message):
    assert refused(xml) == message


# -- disks and paths -------------------------------------------------------

def test_disk_inside_root(root):
    d = parse(domain(disk_xml(root / "disk.img")), root)
    assert d.disks == (Disk(device="disk", source_path=str(root / "disk.img"),
                            format="raw", bus="virtio", target="vda"),)


def test_disk_outside_root(root, tmp_path):
    outside = tmp_path / "outside.img"
    outside.write_bytes(b"x")
    assert refused(domain(disk_xml(outside)), root) == (
        f"disk source '{outside}' at /domain/devices/disk/source/@file is "
        "outside the image roots")
    assert refused(domain(disk_xml("/etc/passwd")), root) == (
        "disk source '/etc/passwd' at /domain/devices/disk/source/@file is "
        "outside the image roots")


def test_disk_is_root_itself(root):
    assert refused(domain(disk_xml(root)), root).endswith(
        "is outside the image roots")


def test_symlink_escaping(root, tmp_path):
    target = tmp_path / "secret.img"
    target.write_bytes(b"x")
    link = root / "link.img"
    link.symlink_to(target)
    assert refused(domain(disk_xml(link)), root) == (
        f"disk source '{link}' at /domain/devices/disk/source/@file is "
        "outside the image roots")
    # A directory symlink escaping is caught the same way.
    (root / "dirlink").symlink_to(tmp_path)
    path = root / "dirlink" / "secret.img"
    assert refused(domain(disk_xml(path)), root).endswith(
        "is outside the image roots")


def test_symlink_inside_is_resolved(root):
    (root / "alias.img").symlink_to(root / "disk.img")
    d = parse(domain(disk_xml(root / "alias.img")), root)
    assert d.disks[0].source_path == str(root / "disk.img")


def test_roots_are_resolved(root, tmp_path):
    """A root given through a symlink still contains its files."""
    (tmp_path / "rootlink").symlink_to(root)
    d = parse_domain(domain(disk_xml(root / "disk.img")),
                     [str(tmp_path / "rootlink")])
    assert d.disks[0].source_path == str(root / "disk.img")


def test_dotdot_traversal(root):
    path = f"{root}/sd1/../../../../../../etc/passwd"
    assert refused(domain(disk_xml(path)), root) == (
        f"disk source '{path}' at /domain/devices/disk/source/@file is "
        "outside the image roots")
    # ".." that stays inside is fine.
    d = parse(domain(disk_xml(f"{root}/sd1/../disk.img")), root)
    assert d.disks[0].source_path == str(root / "disk.img")


def test_prefix_sibling_is_outside(root, tmp_path):
    """/x/images-evil is not inside /x/images (no prefix matching)."""
    evil = tmp_path / "images-evil"
    evil.mkdir()
    (evil / "d.img").write_bytes(b"x")
    assert refused(domain(disk_xml(evil / "d.img")), root).endswith(
        "is outside the image roots")


def test_nonexistent_disk(root):
    path = root / "missing.img"
    assert refused(domain(disk_xml(path)), root) == (
        f"disk source '{path}' at /domain/devices/disk/source/@file does not "
        "exist or is not a regular file")
    assert refused(domain(disk_xml(root / "sd1")), root).endswith(
        "does not exist or is not a regular file")
    # A cdrom with media must exist too; an empty one needs no file.
    assert refused(domain(disk_xml(path, "hdc", "ide", "cdrom")),
                   root).endswith("does not exist or is not a regular file")
    d = parse(domain(disk_xml(None, "hdc", "ide", "cdrom")), root)
    assert d.disks[0].source_path is None and d.disks[0].readonly


def test_relative_path(root):
    assert refused(domain(disk_xml("disk.img")), root) == (
        "invalid value 'disk.img' for /domain/devices/disk/source/@file: not "
        "an absolute path")


def test_no_roots_refuses_every_disk(root):
    assert refused(domain(disk_xml(root / "disk.img"))).endswith(
        "is outside the image roots")


@pytest.mark.parametrize("devices, message", [
    (disk_xml("@R@/disk.img", target="xvda"),
     "invalid value 'xvda' for /domain/devices/disk/target/@dev"),
    (disk_xml("@R@/disk.img", target="sda", bus="virtio"),
     "invalid value 'sda' for /domain/devices/disk/target/@dev: bus 'virtio' "
     "disks are named vd*"),
    (disk_xml("@R@/disk.img", target="hde", bus="ide"),
     "invalid value 'hde' for /domain/devices/disk/target/@dev: IDE has 4 "
     "units (hda-hdd)"),
    (disk_xml("@R@/disk.img", target="sdg", bus="sata"),
     "invalid value 'sdg' for /domain/devices/disk/target/@dev: SATA has 6 "
     "ports (sda-sdf)"),
    (disk_xml("@R@/disk.img", target="vda", bus="usb"),
     "unsupported value 'usb' for /domain/devices/disk/target/@bus"),
    (disk_xml("@R@/cd.iso", target="vdb", device="cdrom"),
     "unsupported value 'virtio' for /domain/devices/disk/target/@bus: a "
     "cdrom needs ide, sata or scsi"),
    (disk_xml("@R@/disk.img", target="hda", bus="ide", extra="<readonly/>"),
     "unsupported /domain/devices/disk/readonly: read-only ide disks are not "
     "supported by QEMU"),
    (disk_xml("@R@/disk.img") + disk_xml("@R@/cd.iso"),
     "invalid /domain/devices/disk: duplicate target/@dev"),
    (disk_xml("@R@/disk.img", extra="<shareable/>"),
     "unsupported element /domain/devices/disk/shareable"),
    (disk_xml("@R@/disk.img", extra="<serial>a,b</serial>"),
     "invalid value 'a,b' for /domain/devices/disk/serial"),
    (disk_xml("@R@/disk.img", extra="<alias name='1bad'/>"),
     "invalid value '1bad' for /domain/devices/disk/alias/@name: an id is a "
     "letter then letters, digits, '_', '.', '-'"),
    (disk_xml("@R@/disk.img", extra="<driver name='qemu' io='native'/>"),
     "invalid /domain/devices/disk/driver: io='native' needs cache='none' or "
     "'directsync'"),
    (disk_xml("@R@/disk.img", extra="<boot order='1'/>")
     + disk_xml("@R@/cd.iso", "hdc", "ide", "cdrom", "<boot order='1'/>"),
     "invalid /domain/devices: duplicate boot/@order"),
    (disk_xml("@R@/disk.img", extra="<alias name='ua-x'/>")
     + disk_xml("@R@/cd.iso", "hdc", "ide", "cdrom", "<alias name='ua-x'/>"),
     "invalid /domain/devices: duplicate alias/@name"),
    (disk_xml("@R@/disk.img", extra="<source file='@R@/cd.iso'/>"),
     "duplicate element /domain/devices/disk/source"),
])
def test_invalid_disks(root, devices, message):
    assert refused(domain(devices.replace("@R@", str(root))), root) == message


def test_ide_on_q35(root):
    xml = domain(disk_xml(None, "hdc", "ide", "cdrom"),
                 os_="<os><type machine='pc-q35-7.2'>hvm</type></os>")
    assert refused(xml, root) == (
        "unsupported value 'ide' for /domain/devices/disk/target/@bus: q35 "
        "machines have no IDE (use sata)")


def test_mixed_boot_orders(root):
    xml = domain(disk_xml(root / "disk.img", extra="<boot order='1'/>"),
                 os_="<os><type>hvm</type><boot dev='hd'/></os>")
    assert refused(xml, root) == (
        "invalid: /domain/os/boot and per-device boot/@order cannot be mixed")


@pytest.mark.parametrize("mac, message", [
    ("52:54:00:12:34", "invalid value '52:54:00:12:34' for "
     "/domain/devices/interface/mac/@address"),
    ("01:00:5e:00:00:01", "invalid value '01:00:5e:00:00:01' for "
     "/domain/devices/interface/mac/@address: a multicast address"),
    ("52-54-00-12-34-56", "invalid value '52-54-00-12-34-56' for "
     "/domain/devices/interface/mac/@address"),
])
def test_invalid_mac(mac, message):
    xml = domain(f'<interface type="bridge"><mac address="{mac}"/>'
                 '<source bridge="br0"/></interface>')
    assert refused(xml) == message


@pytest.mark.parametrize("nic, message", [
    ('<interface type="bridge"/>',
     "missing element /domain/devices/interface/source"),
    ('<interface type="bridge"><source bridge="br0;rm -rf"/></interface>',
     "invalid value 'br0;rm -rf' for /domain/devices/interface/source/@bridge"),
    ('<interface type="bridge"><source bridge="averyveryverylongname"/>'
     '</interface>', "invalid value 'averyveryverylongname' for "
     "/domain/devices/interface/source/@bridge"),
    ('<interface type="bridge"><source bridge="br0"/><target dev="a/b"/>'
     '</interface>',
     "invalid value 'a/b' for /domain/devices/interface/target/@dev"),
    ('<interface type="bridge"><source bridge="br0"/><mac address="52:54:00:'
     '00:00:01"/></interface><interface type="bridge"><source bridge="br0"/>'
     '<mac address="52:54:00:00:00:01"/></interface>',
     "invalid /domain/devices/interface: duplicate mac/@address"),
])
def test_invalid_nics(nic, message):
    assert refused(domain(nic)) == message


def test_nic_defaults():
    d = parse(domain('<interface type="bridge"><mac address="52:54:00:00:00:'
                     '0A"/><source bridge="br0"/><target dev="vnet0"/>'
                     '<link state="down"/></interface>'))
    assert d.nics == (Nic(mac="52:54:00:00:00:0a", bridge="br0",
                          target_dev="vnet0", link_state="down"),)


def test_graphics_fixed_port():
    d = parse(domain('<graphics type="vnc" port="5905" autoport="no" '
                     'passwd="s3cret"><listen type="address" '
                     'address="0.0.0.0"/></graphics>'))
    assert d.graphics == (Graphics(type="vnc", port=5905, autoport=False,
                                   listen="0.0.0.0", passwd="s3cret"),)
    assert "s3cret" not in repr(d)


def test_console_creates_serial():
    d = parse(domain('<console type="pty"><target type="serial" port="0"/>'
                     '</console>'))
    assert d.serial_consoles == (Serial(type="pty"),)


def test_custom_properties_anywhere_in_ovirt_vm():
    md = ('<metadata><ovirt-vm:vm xmlns:ovirt-vm="http://ovirt.org/vm/1.0">'
          '<ovirt-vm:custom><ovirt-vm:viodiskcache>writeback'
          '</ovirt-vm:viodiskcache></ovirt-vm:custom></ovirt-vm:vm>'
          '<other xmlns="urn:other"><custom><a>b</a></custom></other>'
          '</metadata>')
    d = parse(domain(extra=md))
    assert dict(d.custom) == {"viodiskcache": "writeback"}
    with pytest.raises(TypeError):
        d.custom["x"] = "y"


def test_resolve_image_path(root, tmp_path):
    """The public check the VM verbs use for later paths (changeCD)."""
    from vdsm_twisted.virt.domxml import resolve_image_path
    roots = [str(root)]
    assert resolve_image_path(f"{root}/sd1/../disk.img", roots, "driveSpec") \
        == str(root / "disk.img")
    with pytest.raises(DomainXMLError) as e:
        resolve_image_path("/etc/passwd", roots, "driveSpec")
    assert str(e.value) == ("disk source '/etc/passwd' at driveSpec is "
                            "outside the image roots")
    with pytest.raises(DomainXMLError) as e:
        resolve_image_path(f"{root}/a\0b", roots, "driveSpec")
    assert str(e.value) == f"invalid value '{root}/a\\x00b' for driveSpec"
    with pytest.raises(DomainXMLError) as e:
        resolve_image_path(f"{root}/none.iso", roots, "driveSpec")
    assert str(e.value).endswith("does not exist or is not a regular file")
    assert resolve_image_path(f"{root}/none.iso", roots, "x",
                              must_exist=False) == str(root / "none.iso")


# -- direct kernel boot, ACPI, domain type ---------------------------------

def kernel_os(root, kernel="vmlinuz", initrd="initrd.img", cmdline=None,
              extra=""):
    parts = ["<os><type arch='x86_64' machine='pc'>hvm</type>"]
    if kernel is not None:
        parts.append(f"<kernel>{root}/{kernel}</kernel>")
    if initrd is not None:
        parts.append(f"<initrd>{root}/{initrd}</initrd>")
    if cmdline is not None:
        parts.append(f"<cmdline>{cmdline}</cmdline>")
    return "".join(parts) + extra + "</os>"


@pytest.fixture
def boot_root(root):
    (root / "vmlinuz").write_bytes(b"kernel")
    (root / "initrd.img").write_bytes(b"initrd")
    return root


def test_direct_kernel_boot(boot_root):
    d = parse(domain(os_=kernel_os(boot_root, cmdline="console=ttyS0 "
                                   "guest.x=1 root=/dev/vda1")), boot_root)
    assert (d.kernel, d.initrd, d.cmdline) == (
        str(boot_root / "vmlinuz"), str(boot_root / "initrd.img"),
        "console=ttyS0 guest.x=1 root=/dev/vda1")


def test_kernel_alone_and_with_boot_devices(boot_root):
    d = parse(domain(os_=kernel_os(boot_root, initrd=None,
                                   extra="<boot dev='hd'/>")), boot_root)
    assert (d.kernel, d.initrd, d.cmdline) == (
        str(boot_root / "vmlinuz"), None, None)
    assert d.boot_devices == ("hd",)
    assert parse(domain()).kernel is None


def test_kernel_paths_are_resolved(boot_root):
    (boot_root / "sd1" / "k").symlink_to(boot_root / "vmlinuz")
    d = parse(domain(os_=kernel_os(boot_root, kernel="sd1/images/../k",
                                   initrd=None)), boot_root)
    assert d.kernel == str(boot_root / "vmlinuz")


def test_empty_cmdline_is_none(boot_root):
    d = parse(domain(os_=kernel_os(boot_root, cmdline="")), boot_root)
    assert d.cmdline is None


def test_kernel_outside_roots(boot_root, tmp_path):
    (tmp_path / "evil").write_bytes(b"x")
    msg = refused(domain(os_=kernel_os(tmp_path, kernel="evil",
                                       initrd=None)), boot_root)
    assert msg == (f"disk source '{tmp_path}/evil' at /domain/os/kernel is "
                   "outside the image roots")
    msg = refused(domain(os_="<os><type>hvm</type><kernel>/boot/vmlinuz"
                             "</kernel></os>"))
    assert msg.endswith("at /domain/os/kernel is outside the image roots")


def test_initrd_symlink_escaping(boot_root, tmp_path):
    (tmp_path / "secret").write_bytes(b"x")
    (boot_root / "link").symlink_to(tmp_path / "secret")
    msg = refused(domain(os_=kernel_os(boot_root, initrd="link")), boot_root)
    assert msg == (f"disk source '{boot_root}/link' at /domain/os/initrd is "
                   "outside the image roots")


@pytest.mark.parametrize("os_, message", [
    (lambda r: kernel_os(r, kernel="nope", initrd=None),
     "disk source '@ROOT@/nope' at /domain/os/kernel does not exist or is "
     "not a regular file"),
    (lambda r: kernel_os(r, kernel="sd1", initrd=None),
     "disk source '@ROOT@/sd1' at /domain/os/kernel does not exist or is not "
     "a regular file"),
    (lambda r: kernel_os(r, kernel=None),
     "invalid /domain/os/initrd: it needs /domain/os/kernel"),
    (lambda r: kernel_os(r, kernel=None, initrd=None, cmdline="quiet"),
     "invalid /domain/os/cmdline: it needs /domain/os/kernel"),
    (lambda r: "<os><type>hvm</type><kernel> </kernel></os>",
     "missing value for /domain/os/kernel"),
    (lambda r: kernel_os(r) .replace("<kernel>", "<kernel x='1'>"),
     "unsupported attribute /domain/os/kernel/@x"),
    (lambda r: kernel_os(r, extra=f"<kernel>{r}/vmlinuz</kernel>"),
     "duplicate element /domain/os/kernel"),
    (lambda r: kernel_os(r, cmdline="a&#10;b"),
     "invalid value 'a\\nb' for /domain/os/cmdline: at most 2047 bytes, no "
     "control characters"),
    (lambda r: kernel_os(r, cmdline="x" * 2048),
     f"invalid value '{'x' * 2048}' for /domain/os/cmdline: at most 2047 "
     "bytes, no control characters"),
])
def test_invalid_direct_boot(boot_root, os_, message):
    msg = refused(domain(os_=os_(boot_root)), boot_root)
    assert msg == message.replace("@ROOT@", str(boot_root))


def test_longest_cmdline(boot_root):
    d = parse(domain(os_=kernel_os(boot_root, cmdline="x" * 2047)), boot_root)
    assert d.cmdline == "x" * 2047


def test_acpi_and_domain_type():
    assert parse(domain()).acpi is False
    d = parse(domain(extra="<features><acpi/></features>",
                     attrs='type="qemu"'))
    assert (d.acpi, d.domain_type) == (True, "qemu")
    assert parse(domain()).domain_type == "kvm"
