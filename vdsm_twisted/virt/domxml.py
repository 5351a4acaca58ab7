"""
libvirt domain XML, the VM definition the engine sends in C{VM.create}, read
into frozen records the qemu driver can turn into a command line.

The parser is strict on purpose: anything it does not know is refused with a
L{DomainXMLError} naming the element or attribute (C{"unsupported element
/domain/devices/hostdev"}), because silently dropping a device the engine
asked for gives a guest that is not the one it defined.

Input safety: at most C{max_size} bytes of UTF-8; DOCTYPE, entity
declarations and processing instructions are refused before and after
parsing (no XXE, no entity expansion); lxml runs without network, DTD
loading or entity resolution; comments are dropped.

Disk sources are checked here, when the XML is parsed; QEMU opens them by
path later. The image roots must therefore not be writable by anyone who is
not trusted to swap a file for a symlink in between (or the driver passes
opened fds instead of paths).

Supported subset (everything else is refused)
=============================================

C{<domain type="kvm|qemu">}, with libvirt's meaning: C{qemu} runs the guest
under TCG (emulation) even where KVM works; C{kvm} uses KVM where the host
has it (the driver falls back to TCG where C{/dev/kvm} is unusable).

- C{<name>} (required; no C{/}, no control characters), C{<uuid>}
  (required), C{<title>}, C{<description>} (ignored).
- C{<metadata>}: kept verbatim (L{Domain.metadata_xml}); the children of
  C{<ovirt-vm:custom>} (namespace C{http://ovirt.org/vm/1.0}) become
  L{Domain.custom}.
- C{<memory>}, C{<currentMemory>} (the balloon target, applied over QMP),
  C{<maxMemory slots=...>} (memory hotplug); every C{unit} libvirt knows.
- C{<vcpu current=...>MAX</vcpu>} (C{placement} ignored; C{cpuset}
  refused).
- C{<cpu mode="host-passthrough|host-model|custom">} with C{<model>},
  C{<topology sockets cores threads [dies=1]>}, C{<feature policy name>}
  (require/force: on, disable/forbid: off, optional: ignored) and
  C{<numa><cell id cpus memory [unit]>}. C{host-model} is treated as
  C{host-passthrough}: QEMU has no host-model, libvirt computes one.
- C{<os>}: C{<type arch="x86_64" machine=...>hvm</type>} (machine defaults
  to C{pc}), C{<boot dev="hd|cdrom|network|fd">}, C{<bootmenu enable>},
  C{<smbios mode="sysinfo|emulate">}, and direct kernel boot:
  C{<kernel>PATH</kernel>}, C{<initrd>PATH</initrd>} (needs a kernel),
  C{<cmdline>TEXT</cmdline>} (needs a kernel; printable, at most 2047
  bytes, the x86 limit). Kernel and initrd are resolved and checked like
  disk sources: regular files inside the image roots, since QEMU reads them
  with the agent's rights.
- C{<sysinfo type="smbios"><system><entry name>} (SMBIOS type 1).
- C{<features>}: C{<acpi/>} (without it the machine has no ACPI, as in
  libvirt: no power button, so C{VM.shutdown} can only time out), C{<apic/>},
  C{<pae/>}, C{<vmcoreinfo/>}.
- C{<clock offset="utc|localtime|variable" [basis] [adjustment]>} with
  timers C{rtc} (tickpolicy catchup|delay), C{pit} (tickpolicy delay),
  C{hpet} and C{kvmclock} (present yes|no).
- C{<on_poweroff>}, C{<on_reboot>}, C{<on_crash>}: C{destroy} or
  C{restart} (the agent acts on them: QEMU runs with C{-no-shutdown}).
- C{<devices>}:
   - C{<emulator>}: ignored (the agent picks its binary).
   - C{<disk type="file" device="disk|cdrom">}: C{<driver type="qcow2|raw"
     cache io error_policy discard>}, C{<source file>} (absent: an empty
     cdrom), C{<target dev bus="virtio|ide|sata|scsi">}, C{<readonly/>},
     C{<serial>}, C{<boot order>}, C{<alias>}. The source is realpath'd and
     must be an existing regular file inside one of the image roots.
     C{<source><seclabel>} and C{<address>} are ignored.
   - C{<interface type="bridge">}: C{<mac>} (generated, locally
     administered, when absent), C{<source bridge>}, C{<model
     type="virtio|e1000|rtl8139">}, C{<target dev>}, C{<boot order>},
     C{<alias>}, C{<link state>} (applied over QMP), C{<mtu size>},
     C{<driver name>} (ignored). C{<filterref>} and a non-empty
     C{<bandwidth>} are refused: a spoofing filter we cannot apply must not
     look applied.
   - C{<graphics type="vnc|spice" port autoport listen passwd
     passwdValidTo keymap>} with C{<listen type="address|network">}. The
     password is kept for QMP, never put on the command line; C{keymap} is
     ignored; spice C{tlsPort} is refused.
   - C{<serial type="pty|file">} on port 0 (at most one): its output goes to
     the agent's log file; C{<source>} paths are ignored.
     C{<console type="pty">} targeting that serial is accepted.
   - C{<channel type="unix">} with C{<target type="virtio" name>} (the
     socket path is chosen by the agent, not the XML) and C{<channel
     type="spicevmc">}.
   - C{<controller>}: usb (models piix3-uhci, ich9-ehci1, qemu-xhci,
     nec-xhci, none), pci (pci-root, pcie-root, pcie-root-port), ide,
     sata, virtio-serial, scsi (virtio-scsi). Missing usb, sata, scsi and
     virtio-serial controllers that devices need are added.
   - C{<input type="tablet|mouse|keyboard" bus="usb|ps2|virtio">}.
   - C{<video><model type="vga|qxl|virtio|cirrus|none">}: one.
   - C{<memballoon model="virtio|none">} (absent: virtio, as libvirt) with
     C{<stats period>}.
   - C{<rng model="virtio"><backend model="random">/dev/urandom</backend>}
     with C{<rate bytes period>}.
   - C{<address>} and C{<alias>} on any device; addresses are ignored.
"""

from __future__ import annotations

import ipaddress
import os
import re
import secrets
import types
import uuid as _uuid
from typing import Mapping, Sequence

import attr
from lxml import etree

__all__ = [
    "DomainXMLError", "Domain", "Disk", "Nic", "Graphics", "Serial",
    "Channel", "Controller", "Input", "Video", "Memballoon", "Rng", "Cpu",
    "NumaCell", "Clock", "Timer", "parse_domain", "resolve_image_path",
    "OVIRT_VM_NS",
]

OVIRT_VM_NS = "http://ovirt.org/vm/1.0"

MAX_SIZE = 1 << 20


class DomainXMLError(ValueError):
    """The domain XML is malformed, unsafe or outside the supported subset."""


# -- records ---------------------------------------------------------------

def _frozen(cls):
    return attr.s(frozen=True, auto_attribs=True, kw_only=True)(cls)


@_frozen
class Disk:
    device: str                  # "disk" | "cdrom"
    source_path: str | None      # realpath; None for an empty cdrom
    format: str                  # "qcow2" | "raw"
    bus: str                     # "virtio" | "ide" | "sata" | "scsi"
    target: str                  # "vda", "hdc", "sda", ...
    readonly: bool = False
    serial: str | None = None
    boot_order: int | None = None
    alias: str | None = None
    cache: str | None = None     # none|writeback|writethrough|directsync|unsafe
    io: str | None = None        # threads|native|io_uring
    error_policy: str | None = None  # stop|report|ignore|enospace
    discard: str | None = None   # unmap|ignore

    @property
    def index(self) -> int:
        """The target's letters as a number: vda -> 0, hdc -> 2, sdaa -> 26."""
        return _target_index(self.target)


@_frozen
class Nic:
    mac: str
    bridge: str
    model: str = "virtio"        # "virtio" | "e1000" | "rtl8139"
    target_dev: str | None = None
    alias: str | None = None
    boot_order: int | None = None
    link_state: str = "up"
    mtu: int | None = None


@_frozen
class Graphics:
    type: str                    # "vnc" | "spice"
    listen: str | None = None    # an IP address
    listen_network: str | None = None
    port: int | None = None      # None with autoport
    autoport: bool = True
    passwd: str | None = attr.ib(default=None, repr=False)
    passwd_valid_to: str | None = None
    keymap: str | None = None


@_frozen
class Serial:
    type: str                    # "pty" | "file"
    port: int = 0
    alias: str | None = None


@_frozen
class Channel:
    type: str                    # "unix" | "spicevmc"
    name: str                    # the virtio port name
    alias: str | None = None


@_frozen
class Controller:
    type: str
    index: int = 0
    model: str | None = None
    implicit: bool = False       # added by the parser, not in the XML


@_frozen
class Input:
    type: str                    # "tablet" | "mouse" | "keyboard"
    bus: str                     # "usb" | "ps2" | "virtio"
    alias: str | None = None


@_frozen
class Video:
    model: str                   # "vga" | "qxl" | "virtio" | "cirrus"
    alias: str | None = None


@_frozen
class Memballoon:
    model: str                   # "virtio" | "none"
    stats_period: int | None = None
    alias: str | None = None


@_frozen
class Rng:
    backend: str = "/dev/urandom"
    rate_bytes: int | None = None
    rate_period: int | None = None
    alias: str | None = None


@_frozen
class NumaCell:
    id: int
    cpus: tuple[int, ...]
    memory_kib: int


@_frozen
class Cpu:
    mode: str | None = None      # None: QEMU's default model
    model: str | None = None
    features: tuple[tuple[str, bool], ...] = ()  # (name, enabled)


@_frozen
class Timer:
    name: str
    present: bool | None = None
    tickpolicy: str | None = None


@_frozen
class Clock:
    offset: str = "utc"          # utc | localtime | variable
    basis: str = "utc"
    adjustment: int = 0
    timers: tuple[Timer, ...] = ()


@_frozen
class Domain:
    uuid: str
    name: str
    memory_kib: int
    current_memory_kib: int
    vcpus: int
    sockets: int
    cores: int
    threads: int
    max_vcpus: int | None = None
    max_memory_kib: int | None = None
    memory_slots: int | None = None
    domain_type: str = "kvm"
    machine: str = "pc"
    arch: str = "x86_64"
    cpu: Cpu = Cpu()
    numa: tuple[NumaCell, ...] = ()
    boot_devices: tuple[str, ...] = ()  # <os><boot dev>, in order
    boot_menu: bool | None = None
    kernel: str | None = None    # direct kernel boot: realpath'd
    initrd: str | None = None    # realpath'd
    cmdline: str | None = None
    acpi: bool = False
    apic: bool = False
    vmcoreinfo: bool = False
    clock: Clock = Clock()
    sysinfo: tuple[tuple[str, str], ...] = ()  # SMBIOS type 1 entries
    disks: tuple[Disk, ...] = ()
    nics: tuple[Nic, ...] = ()
    graphics: tuple[Graphics, ...] = ()
    serial_consoles: tuple[Serial, ...] = ()
    channels: tuple[Channel, ...] = ()
    controllers: tuple[Controller, ...] = ()
    inputs: tuple[Input, ...] = ()
    video: Video | None = None
    memballoon: Memballoon = Memballoon(model="virtio")
    rngs: tuple[Rng, ...] = ()
    on_poweroff: str = "destroy"
    on_reboot: str = "restart"
    on_crash: str = "destroy"
    metadata_xml: str | None = None
    custom: Mapping[str, str] = attr.ib(
        factory=dict, converter=lambda d: types.MappingProxyType(dict(d)),
        hash=False)
    xml: str = attr.ib(default="", repr=False, hash=False, eq=False)

    @property
    def q35(self) -> bool:
        """Whether the machine is a Q35 (PCIe, AHCI, no IDE) one."""
        return "q35" in self.machine

    def controller(self, type: str) -> Controller | None:
        for c in self.controllers:
            if c.type == type:
                return c
        return None


# -- small helpers ---------------------------------------------------------

_ID = re.compile(r"^[A-Za-z][A-Za-z0-9_.-]{0,127}$")
_SAFE = re.compile(r"^[A-Za-z0-9_.+-]+$")
_MAC = re.compile(r"^[0-9a-f]{2}(:[0-9a-f]{2}){5}$")
_IFNAME = re.compile(r"^[A-Za-z0-9_.:+-]{1,15}$")
_TARGET = re.compile(r"^(vd|hd|sd)([a-z]{1,3})$")
_UNITS = {
    "b": 1, "bytes": 1,
    "kb": 10**3, "k": 1024, "kib": 1024,
    "mb": 10**6, "m": 1024**2, "mib": 1024**2,
    "gb": 10**9, "g": 1024**3, "gib": 1024**3,
    "tb": 10**12, "t": 1024**4, "tib": 1024**4,
}
_YES_NO = {"yes": True, "on": True, "no": False, "off": False}


def _err(msg: str) -> DomainXMLError:
    return DomainXMLError(msg)


def _target_index(target: str) -> int:
    letters = _TARGET.match(target).group(2)
    n = 0
    for ch in letters:
        n = n * 26 + (ord(ch) - ord("a") + 1)
    return n - 1


class _El:
    """An element and its XPath-like path, with strict accessors."""

    def __init__(self, el, path: str):
        self.el = el
        self.path = path

    def check(self, attrs: Sequence[str] = (), children: Sequence[str] = ()):
        """Refuse attributes and child elements not listed."""
        for name in self.el.attrib:
            if name not in attrs:
                raise _err(f"unsupported attribute {self.path}/@{_qname(name)}")
        for child in self.el:
            tag = child.tag
            if not isinstance(tag, str) or tag not in children:
                raise _err(f"unsupported element {self.path}/{_qname(tag)}")

    def children(self, tag: str) -> list["_El"]:
        return [_El(c, f"{self.path}/{tag}") for c in self.el if c.tag == tag]

    def child(self, tag: str) -> "_El | None":
        found = self.children(tag)
        if len(found) > 1:
            raise _err(f"duplicate element {self.path}/{tag}")
        return found[0] if found else None

    def get(self, name: str, default: str | None = None) -> str | None:
        return self.el.get(name, default)

    def need(self, name: str) -> str:
        value = self.el.get(name)
        if value is None or not value.strip():
            raise _err(f"missing attribute {self.path}/@{name}")
        return value.strip()

    def choice(self, name: str, allowed: Sequence[str],
               default: str | None = None) -> str | None:
        value = self.el.get(name)
        if value is None:
            return default
        if value not in allowed:
            raise _err(f"unsupported value {value!r} for {self.path}/@{name}")
        return value

    def int(self, name: str, default: int | None = None, minimum: int = 0,
            maximum: int | None = None) -> int | None:
        value = self.el.get(name)
        if value is None:
            return default
        return _int(value, f"{self.path}/@{name}", minimum, maximum)

    def yesno(self, name: str, default: bool | None = None) -> bool | None:
        value = self.el.get(name)
        if value is None:
            return default
        if value not in _YES_NO:
            raise _err(f"invalid value {value!r} for {self.path}/@{name}: "
                       "expected yes or no")
        return _YES_NO[value]

    @property
    def text(self) -> str:
        return (self.el.text or "").strip()

    def text_int(self, minimum: int = 0, maximum: int | None = None) -> int:
        return _int(self.text, self.path, minimum, maximum)


def _qname(tag) -> str:
    if not isinstance(tag, str):
        return "node()"
    if tag.startswith("{"):
        ns, _, local = tag[1:].partition("}")
        return f"{{{ns}}}{local}"
    return tag


def _int(value: str, where: str, minimum: int = 0,
         maximum: int | None = None) -> int:
    value = value.strip()
    if not re.fullmatch(r"[+-]?[0-9]{1,19}", value):
        raise _err(f"invalid value {value!r} for {where}: expected an integer")
    n = int(value)
    if n < minimum or (maximum is not None and n > maximum):
        bound = f">= {minimum}" if maximum is None else \
            f"in [{minimum}, {maximum}]"
        raise _err(f"invalid value {value!r} for {where}: must be {bound}")
    return n


def _kib(el: _El) -> int:
    """A libvirt scaled size (C{<memory unit="GiB">4</memory>}) in KiB."""
    el.check(attrs=("unit", "dumpCore", "slots"))
    unit = (el.get("unit") or "KiB").lower()
    if unit not in _UNITS:
        raise _err(f"unsupported value {el.get('unit')!r} for {el.path}/@unit")
    n = el.text_int(minimum=1) * _UNITS[unit]
    kib = -(-n // 1024)
    if kib > 1 << 40:
        raise _err(f"invalid value for {el.path}: too large")
    return kib


def _alias(dev: _El) -> str | None:
    el = dev.child("alias")
    if el is None:
        return None
    el.check(attrs=("name",))
    name = el.need("name")
    if not _ID.match(name):
        raise _err(f"invalid value {name!r} for {el.path}/@name: an id is a "
                   "letter then letters, digits, '_', '.', '-'")
    return name


def _boot_order(dev: _El) -> int | None:
    el = dev.child("boot")
    if el is None:
        return None
    el.check(attrs=("order", "loadparm"))
    return el.int("order", minimum=1, maximum=9999)


def _cpuset(text: str, where: str) -> tuple[int, ...]:
    cpus: set[int] = set()
    for part in text.split(","):
        m = re.fullmatch(r"\s*([0-9]{1,4})(?:-([0-9]{1,4}))?\s*", part)
        if not m:
            raise _err(f"invalid value {text!r} for {where}")
        lo = int(m.group(1))
        hi = int(m.group(2)) if m.group(2) else lo
        if hi < lo:
            raise _err(f"invalid value {text!r} for {where}")
        cpus.update(range(lo, hi + 1))
    return tuple(sorted(cpus))


def resolve_image_path(path: str, roots: Sequence[str], where: str,
                       must_exist: bool = True) -> str:
    """
    C{path} with symlinks and C{..} resolved, if that lies inside one of
    C{roots} (themselves resolved) and, if C{must_exist}, is a regular file;
    else L{DomainXMLError} naming C{where}. Shared by the parser and the
    verbs that take an image path later (C{VM.changeCD}).
    """
    if not isinstance(path, str) or not path.startswith("/"):
        raise _err(f"invalid value {path!r} for {where}: not an absolute path")
    try:
        real = os.path.realpath(path)
    except ValueError:           # an embedded NUL
        raise _err(f"invalid value {path!r} for {where}")
    for root in roots:
        root = os.path.realpath(root)
        if real != root and os.path.commonpath([real, root]) == root:
            break
    else:
        raise _err(f"disk source {path!r} at {where} is outside the image roots")
    if must_exist and not os.path.isfile(real):
        raise _err(f"disk source {path!r} at {where} does not exist "
                   "or is not a regular file")
    return real


# -- the parser ------------------------------------------------------------

_FORBIDDEN = ("<!DOCTYPE", "<!ENTITY", "<!ELEMENT", "<!ATTLIST")


def _load(xml: str | bytes, max_size: int):
    if isinstance(xml, str):
        raw = xml.encode("utf-8", "surrogatepass")
    elif isinstance(xml, (bytes, bytearray)):
        raw = bytes(xml)
    else:
        raise _err("domain XML must be text")
    if len(raw) > max_size:
        raise _err(f"domain XML is {len(raw)} bytes, larger than the limit "
                   f"of {max_size}")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise _err("domain XML is not valid UTF-8")
    for word in _FORBIDDEN:
        if word in text:
            raise _err(f"domain XML must not contain {word}: DTDs and "
                       "entities are refused")
    parser = etree.XMLParser(
        resolve_entities=False, no_network=True, load_dtd=False,
        dtd_validation=False, huge_tree=False, remove_comments=True)
    try:
        root = etree.fromstring(raw, parser)
    except etree.XMLSyntaxError as e:
        raise _err(f"malformed domain XML: {e}")
    if root is None:
        raise _err("malformed domain XML: empty document")
    tree = root.getroottree()
    if tree.docinfo.doctype or tree.docinfo.internalDTD is not None:
        raise _err("domain XML must not contain <!DOCTYPE: DTDs and entities "
                   "are refused")
    if any(True for _ in root.iter(etree.Entity)):
        raise _err("domain XML must not contain entity references")
    pis = list(root.iter(etree.PI)) + [
        s for s in root.itersiblings(preceding=True)
        if isinstance(s, etree._ProcessingInstruction)] + [
        s for s in root.itersiblings()
        if isinstance(s, etree._ProcessingInstruction)]
    if pis:
        raise _err("domain XML must not contain processing instructions "
                   f"(found <?{pis[0].target}>)")
    return text, root


def parse_domain(xml: str | bytes, image_roots: Sequence[str],
                 max_size: int = MAX_SIZE) -> Domain:
    """
    Read libvirt domain XML into a L{Domain}, or raise L{DomainXMLError}.

    Disk sources, kernels and initrds are resolved (symlinks, C{..}) and
    must lie inside one of C{image_roots}; checking happens here, once, so
    the command line only ever names files the agent accepted.
    """
    text, root = _load(xml, max_size)
    if root.tag != "domain":
        raise _err(f"unsupported element /{_qname(root.tag)}: the root must "
                   "be <domain>")
    dom = _El(root, "/domain")
    dom.check(attrs=("type", "id"), children=(
        "name", "uuid", "title", "description", "metadata", "memory",
        "currentMemory", "maxMemory", "vcpu", "cpu", "os", "sysinfo",
        "features", "clock", "on_poweroff", "on_reboot", "on_crash",
        "devices"))
    kw: dict = {"xml": text}
    kw["domain_type"] = dom.choice("type", ("kvm", "qemu"), "kvm")

    name = dom.child("name")
    if name is None or not name.text:
        raise _err("missing element /domain/name")
    name.check()
    if (len(name.text) > 255 or "/" in name.text
            or any(ord(c) < 32 or ord(c) == 127 for c in name.text)):
        raise _err(f"invalid value {name.text!r} for /domain/name")
    kw["name"] = name.text

    uid = dom.child("uuid")
    if uid is None:
        raise _err("missing element /domain/uuid")
    uid.check()
    try:
        kw["uuid"] = str(_uuid.UUID(uid.text))
    except ValueError:
        raise _err(f"invalid value {uid.text!r} for /domain/uuid")
    for tag in ("title", "description"):
        el = dom.child(tag)
        if el is not None:
            el.check()

    _parse_metadata(dom, kw)
    _parse_memory(dom, kw)
    _parse_vcpu_cpu(dom, kw)
    _parse_os(dom, kw, image_roots)
    _parse_sysinfo(dom, kw)
    _parse_features(dom, kw)
    _parse_clock(dom, kw)
    for tag in ("on_poweroff", "on_reboot", "on_crash"):
        el = dom.child(tag)
        if el is not None:
            el.check()
            if el.text not in ("destroy", "restart"):
                raise _err(f"unsupported value {el.text!r} for /domain/{tag}")
            kw[tag] = el.text
    devices = dom.child("devices")
    _parse_devices(devices, image_roots, kw)
    return Domain(**kw)


def _parse_metadata(dom: _El, kw: dict) -> None:
    md = dom.child("metadata")
    if md is None:
        return
    kw["metadata_xml"] = etree.tostring(md.el, encoding="unicode",
                                        with_tail=False)
    custom = {}
    for el in md.el.iter(f"{{{OVIRT_VM_NS}}}custom"):
        for prop in el:
            if isinstance(prop.tag, str):
                custom[etree.QName(prop).localname] = (prop.text or "").strip()
    kw["custom"] = custom


def _parse_memory(dom: _El, kw: dict) -> None:
    mem = dom.child("memory")
    if mem is None:
        raise _err("missing element /domain/memory")
    kw["memory_kib"] = _kib(mem)
    cur = dom.child("currentMemory")
    kw["current_memory_kib"] = kw["memory_kib"] if cur is None else _kib(cur)
    if kw["current_memory_kib"] > kw["memory_kib"]:
        raise _err("invalid /domain/currentMemory: larger than /domain/memory")
    mx = dom.child("maxMemory")
    if mx is not None:
        kw["max_memory_kib"] = _kib(mx)
        kw["memory_slots"] = mx.int("slots", minimum=1, maximum=256)
        if kw["memory_slots"] is None:
            raise _err("missing attribute /domain/maxMemory/@slots")
        if kw["max_memory_kib"] < kw["memory_kib"]:
            raise _err("invalid /domain/maxMemory: smaller than /domain/memory")


def _parse_vcpu_cpu(dom: _El, kw: dict) -> None:
    vcpu = dom.child("vcpu")
    maxv = 1
    current = None
    if vcpu is not None:
        vcpu.check(attrs=("placement", "current"))
        vcpu.choice("placement", ("static", "auto"))
        maxv = vcpu.text_int(minimum=1, maximum=1024)
        current = vcpu.int("current", minimum=1, maximum=maxv)
    kw["vcpus"] = current or maxv
    if current is not None and current != maxv:
        kw["max_vcpus"] = maxv
    sockets, cores, threads = maxv, 1, 1
    cpu_kw: dict = {}
    cpu = dom.child("cpu")
    if cpu is not None:
        cpu.check(attrs=("mode", "match", "check", "migratable"),
                  children=("model", "topology", "feature", "numa"))
        cpu.choice("match", ("exact", "minimum", "strict"))
        cpu.choice("check", ("none", "partial", "full"))
        model = cpu.child("model")
        default_mode = "custom" if model is not None else None
        mode = cpu.choice("mode", ("host-passthrough", "host-model", "custom"),
                          default_mode)
        if mode == "custom":
            if model is None or not model.text:
                raise _err("missing element /domain/cpu/model")
        if model is not None:
            model.check(attrs=("fallback",))
            model.choice("fallback", ("allow", "forbid"))
            if model.text:
                if not _SAFE.match(model.text):
                    raise _err(f"invalid value {model.text!r} for "
                               "/domain/cpu/model")
                if mode == "custom":
                    cpu_kw["model"] = model.text
        cpu_kw["mode"] = mode
        feats = []
        for f in cpu.children("feature"):
            f.check(attrs=("policy", "name"))
            policy = f.choice("policy", ("require", "force", "disable",
                                         "forbid", "optional"), "require")
            fname = f.need("name")
            if not re.fullmatch(r"[a-z0-9_.-]+", fname):
                raise _err(f"invalid value {fname!r} for {f.path}/@name")
            if policy != "optional":
                feats.append((fname, policy in ("require", "force")))
        cpu_kw["features"] = tuple(feats)
        topo = cpu.child("topology")
        if topo is not None:
            topo.check(attrs=("sockets", "dies", "cores", "threads"))
            sockets = topo.int("sockets", minimum=1, maximum=1024) or 1
            cores = topo.int("cores", minimum=1, maximum=1024) or 1
            threads = topo.int("threads", minimum=1, maximum=1024) or 1
            if topo.int("dies", 1, minimum=1) != 1:
                raise _err("unsupported value for /domain/cpu/topology/@dies")
            if sockets * cores * threads != maxv:
                raise _err(
                    f"invalid /domain/cpu/topology: {sockets} sockets x {cores}"
                    f" cores x {threads} threads is not {maxv} vcpus")
        numa = cpu.child("numa")
        if numa is not None:
            kw["numa"] = _parse_numa(numa, maxv, kw["memory_kib"])
    kw["cpu"] = Cpu(**cpu_kw)
    kw["sockets"], kw["cores"], kw["threads"] = sockets, cores, threads


def _parse_numa(numa: _El, maxv: int, memory_kib: int) -> tuple:
    numa.check(children=("cell",))
    cells = []
    seen: set[int] = set()
    for i, cell in enumerate(numa.children("cell")):
        cell.check(attrs=("id", "cpus", "memory", "unit"))
        cid = cell.int("id", default=i, maximum=255)
        if cid != i:
            raise _err(f"invalid {cell.path}/@id: cells must be numbered "
                       "0, 1, ... in order")
        cpus = _cpuset(cell.need("cpus"), f"{cell.path}/@cpus")
        if cpus[-1] >= maxv or seen.intersection(cpus):
            raise _err(f"invalid value for {cell.path}/@cpus: vcpus out of "
                       "range or in two cells")
        seen.update(cpus)
        unit = (cell.get("unit") or "KiB").lower()
        if unit not in _UNITS:
            raise _err(f"unsupported value {cell.get('unit')!r} for "
                       f"{cell.path}/@unit")
        size = _int(cell.need("memory"), f"{cell.path}/@memory", 1)
        cells.append(NumaCell(id=cid, cpus=cpus,
                              memory_kib=-(-size * _UNITS[unit] // 1024)))
    if not cells:
        raise _err("missing element /domain/cpu/numa/cell")
    if sum(c.memory_kib for c in cells) != memory_kib:
        raise _err("invalid /domain/cpu/numa: the cells' memory does not add "
                   "up to /domain/memory")
    return tuple(cells)


_BOOT_DEVS = ("hd", "cdrom", "network", "fd")


def _parse_os(dom: _El, kw: dict, roots: Sequence[str]) -> None:
    os_el = dom.child("os")
    if os_el is None:
        return
    os_el.check(children=("type", "boot", "bootmenu", "smbios", "kernel",
                          "initrd", "cmdline"))
    typ = os_el.child("type")
    if typ is not None:
        typ.check(attrs=("arch", "machine"))
        if typ.text != "hvm":
            raise _err(f"unsupported value {typ.text!r} for /domain/os/type")
        typ.choice("arch", ("x86_64",))
        machine = typ.get("machine")
        if machine is not None:
            if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", machine):
                raise _err(f"invalid value {machine!r} for "
                           "/domain/os/type/@machine")
            kw["machine"] = machine
    boots = []
    for b in os_el.children("boot"):
        b.check(attrs=("dev",))
        dev = b.choice("dev", _BOOT_DEVS)
        if dev is None:
            raise _err("missing attribute /domain/os/boot/@dev")
        boots.append(dev)
    kw["boot_devices"] = tuple(boots)
    menu = os_el.child("bootmenu")
    if menu is not None:
        menu.check(attrs=("enable", "timeout"))
        kw["boot_menu"] = menu.yesno("enable")
    smbios = os_el.child("smbios")
    if smbios is not None:
        smbios.check(attrs=("mode",))
        smbios.choice("mode", ("sysinfo", "emulate"))
    _parse_direct_boot(os_el, kw, roots)


#: Linux's COMMAND_LINE_SIZE on x86, including the terminating NUL.
_MAX_CMDLINE = 2048


def _parse_direct_boot(os_el: _El, kw: dict, roots: Sequence[str]) -> None:
    """<kernel>, <initrd>, <cmdline>: QEMU loads the kernel itself."""
    for tag in ("kernel", "initrd"):
        el = os_el.child(tag)
        if el is None:
            continue
        el.check()
        if not el.text:
            raise _err(f"missing value for {el.path}")
        kw[tag] = resolve_image_path(el.text, roots, el.path, must_exist=True)
    cmdline = os_el.child("cmdline")
    if cmdline is not None:
        cmdline.check()
        text = cmdline.text
        if (len(text.encode("utf-8")) >= _MAX_CMDLINE
                or any(ord(c) < 32 or ord(c) == 127 for c in text)):
            raise _err(f"invalid value {text!r} for {cmdline.path}: at most "
                       f"{_MAX_CMDLINE - 1} bytes, no control characters")
        kw["cmdline"] = text or None
    if "kernel" not in kw:
        for tag in ("initrd", "cmdline"):
            if os_el.child(tag) is not None:
                raise _err(f"invalid /domain/os/{tag}: it needs "
                           "/domain/os/kernel")


_SMBIOS_SYSTEM = ("manufacturer", "product", "version", "serial", "uuid",
                  "sku", "family")


def _parse_sysinfo(dom: _El, kw: dict) -> None:
    si = dom.child("sysinfo")
    if si is None:
        return
    si.check(attrs=("type",), children=("system",))
    si.choice("type", ("smbios",))
    entries = []
    system = si.child("system")
    if system is not None:
        system.check(children=("entry",))
        for e in system.children("entry"):
            e.check(attrs=("name",))
            ename = e.choice("name", _SMBIOS_SYSTEM)
            if ename is None:
                raise _err(f"missing attribute {e.path}/@name")
            if any(ord(c) < 32 for c in e.text) or len(e.text) > 255:
                raise _err(f"invalid value {e.text!r} for {e.path}")
            entries.append((ename, e.text))
    kw["sysinfo"] = tuple(entries)


def _parse_features(dom: _El, kw: dict) -> None:
    feats = dom.child("features")
    if feats is None:
        return
    feats.check(children=("acpi", "apic", "pae", "vmcoreinfo"))
    for tag in ("acpi", "apic", "pae"):
        el = feats.child(tag)
        if el is not None:
            el.check()
            if tag != "pae":
                kw[tag] = True
    vmci = feats.child("vmcoreinfo")
    if vmci is not None:
        vmci.check(attrs=("state",))
        kw["vmcoreinfo"] = vmci.yesno("state", True)


def _parse_clock(dom: _El, kw: dict) -> None:
    clock = dom.child("clock")
    if clock is None:
        return
    clock.check(attrs=("offset", "basis", "adjustment"), children=("timer",))
    offset = clock.choice("offset", ("utc", "localtime", "variable"), "utc")
    basis = "utc"
    adjustment = 0
    if offset == "variable":
        basis = clock.choice("basis", ("utc", "localtime"), "utc")
        adjustment = clock.int("adjustment", 0, minimum=-(10**10))
    else:
        if clock.get("basis") is not None:
            raise _err("unsupported attribute /domain/clock/@basis")
        if clock.get("adjustment") not in (None, "0", "reset"):
            raise _err("unsupported attribute /domain/clock/@adjustment")
    allowed = {"rtc": ("catchup", "delay"), "pit": ("delay",),
               "hpet": (), "kvmclock": ()}
    timers = []
    for t in clock.children("timer"):
        t.check(attrs=("name", "present", "tickpolicy"))
        tname = t.choice("name", tuple(allowed))
        if tname is None:
            raise _err(f"missing attribute {t.path}/@name")
        policy = t.get("tickpolicy")
        if policy is not None and policy not in allowed[tname]:
            raise _err(f"unsupported value {policy!r} for {t.path}/@tickpolicy"
                       f" (timer {tname})")
        present = t.yesno("present")
        if present is False and tname in ("rtc", "pit"):
            raise _err(f"unsupported value 'no' for {t.path}/@present "
                       f"(timer {tname})")
        timers.append(Timer(name=tname, present=present, tickpolicy=policy))
    kw["clock"] = Clock(offset=offset, basis=basis, adjustment=adjustment,
                        timers=tuple(timers))


# -- devices ---------------------------------------------------------------

_DEVICES = ("emulator", "disk", "interface", "graphics", "serial", "console",
            "channel", "controller", "input", "video", "memballoon", "rng")


def _parse_devices(devices: _El | None, roots: Sequence[str],
                   kw: dict) -> None:
    if devices is None:
        return
    devices.check(children=_DEVICES)
    machine_q35 = "q35" in kw.get("machine", "pc")
    disks = [_parse_disk(d, roots, machine_q35)
             for d in devices.children("disk")]
    nics = [_parse_nic(n) for n in devices.children("interface")]
    graphics = [_parse_graphics(g) for g in devices.children("graphics")]
    for t in ("vnc", "spice"):
        if sum(g.type == t for g in graphics) > 1:
            raise _err(f"unsupported: more than one {t} "
                       "/domain/devices/graphics")
    serials = [_parse_serial(s) for s in devices.children("serial")]
    for c in devices.children("console"):
        c.check(attrs=("type",), children=("target", "alias", "source",
                                           "address"))
        c.choice("type", ("pty",))
        tgt = c.child("target")
        ttype = "serial" if tgt is None else tgt.get("type", "serial")
        if tgt is not None:
            tgt.check(attrs=("type", "port"))
            tgt.int("port", 0, maximum=0)
        if ttype != "serial":
            raise _err(f"unsupported value {ttype!r} for "
                       "/domain/devices/console/target/@type")
        if not serials:
            serials.append(Serial(type="pty", port=0))
    if len(serials) > 1:
        raise _err("unsupported: more than one /domain/devices/serial")
    channels = [_parse_channel(c) for c in devices.children("channel")]
    if any(c.type == "spicevmc" for c in channels) and not any(
            g.type == "spice" for g in graphics):
        raise _err("invalid /domain/devices/channel: spicevmc needs spice "
                   "graphics")
    names = [c.name for c in channels]
    if len(set(names)) != len(names):
        raise _err("invalid /domain/devices/channel: duplicate target names")
    controllers = [_parse_controller(c) for c in devices.children("controller")]
    inputs = [_parse_input(i) for i in devices.children("input")]
    videos = devices.children("video")
    if len(videos) > 1:
        raise _err("unsupported: more than one /domain/devices/video")
    if videos:
        kw["video"] = _parse_video(videos[0])
    balloon = devices.child("memballoon")
    if balloon is not None:
        kw["memballoon"] = _parse_balloon(balloon)
    kw["rngs"] = tuple(_parse_rng(r) for r in devices.children("rng"))
    emulator = devices.child("emulator")
    if emulator is not None:
        emulator.check()

    # Unique targets, device ids, MACs.
    targets = [d.target for d in disks]
    if len(set(targets)) != len(targets):
        raise _err("invalid /domain/devices/disk: duplicate target/@dev")
    macs = [n.mac for n in nics]
    if len(set(macs)) != len(macs):
        raise _err("invalid /domain/devices/interface: duplicate mac/@address")
    aliases = [x.alias for x in (*disks, *nics, *serials, *channels, *inputs,
                                 *kw["rngs"]) if x.alias]
    if len(set(aliases)) != len(aliases):
        raise _err("invalid /domain/devices: duplicate alias/@name")
    # Boot order: per device or <os><boot>, not both (as libvirt).
    if kw.get("boot_devices") and any(
            x.boot_order for x in (*disks, *nics)):
        raise _err("invalid: /domain/os/boot and per-device boot/@order "
                   "cannot be mixed")
    orders = [x.boot_order for x in (*disks, *nics) if x.boot_order]
    if len(set(orders)) != len(orders):
        raise _err("invalid /domain/devices: duplicate boot/@order")

    # Controllers devices need but the XML left out.
    def need(ctype: str, model: str | None) -> None:
        have = [c for c in controllers if c.type == ctype]
        if not have:
            controllers.append(Controller(type=ctype, index=0, model=model,
                                          implicit=True))
        elif ctype == "usb" and have[0].model == "none":
            raise _err("invalid: a usb device needs a usb controller, and "
                       "/domain/devices/controller[@type='usb'] has "
                       "model 'none'")

    if any(d.bus == "scsi" for d in disks):
        need("scsi", "virtio-scsi")
    if any(d.bus == "sata" for d in disks):
        need("sata", None)
    if any(c.type == "unix" or c.type == "spicevmc" for c in channels):
        need("virtio-serial", None)
    if any(i.bus == "usb" for i in inputs):
        need("usb", "qemu-xhci" if machine_q35 else "piix3-uhci")
    kw.update(disks=tuple(disks), nics=tuple(nics), graphics=tuple(graphics),
              serial_consoles=tuple(serials), channels=tuple(channels),
              controllers=tuple(controllers), inputs=tuple(inputs))


_BUS_PREFIX = {"virtio": "vd", "ide": "hd", "sata": "sd", "scsi": "sd"}


def _parse_disk(d: _El, roots: Sequence[str], q35: bool) -> Disk:
    d.check(attrs=("type", "device", "snapshot", "sgio", "rawio"),
            children=("driver", "source", "target", "readonly", "serial",
                      "boot", "alias", "address"))
    if d.get("type") is None:
        raise _err(f"missing attribute {d.path}/@type")
    d.choice("type", ("file",))
    device = d.choice("device", ("disk", "cdrom"), "disk")
    if d.get("sgio") or d.get("rawio"):
        raise _err(f"unsupported attribute {d.path}/@sgio")
    kw: dict = {"device": device}

    drv = d.child("driver")
    fmt = "raw"
    if drv is not None:
        drv.check(attrs=("name", "type", "cache", "io", "error_policy",
                         "rerror_policy", "discard"))
        drv.choice("name", ("qemu",))
        fmt = drv.choice("type", ("qcow2", "raw"), "raw")
        kw["cache"] = drv.choice("cache", ("default", "none", "writeback",
                                           "writethrough", "directsync",
                                           "unsafe"))
        if kw["cache"] == "default":
            kw["cache"] = None
        kw["io"] = drv.choice("io", ("default", "threads", "native",
                                     "io_uring"))
        if kw["io"] == "default":
            kw["io"] = None
        if kw["io"] == "native" and kw["cache"] not in ("none", "directsync"):
            raise _err(f"invalid {drv.path}: io='native' needs cache='none' "
                       "or 'directsync'")
        kw["error_policy"] = drv.choice("error_policy", ("stop", "report",
                                                         "ignore", "enospace"))
        if drv.get("rerror_policy") not in (None, kw["error_policy"]):
            raise _err(f"unsupported attribute {drv.path}/@rerror_policy")
        kw["discard"] = drv.choice("discard", ("unmap", "ignore"))
    kw["format"] = fmt

    src = d.child("source")
    path = None
    if src is not None:
        src.check(attrs=("file", "startupPolicy", "index"),
                  children=("seclabel",))
        src.choice("startupPolicy", ("mandatory", "requisite", "optional"))
        for sl in src.children("seclabel"):
            sl.check(attrs=("model", "relabel", "type"))
        path = src.get("file") or None
    if path is None and device == "disk":
        raise _err(f"missing attribute {d.path}/source/@file")
    if path is not None:
        kw["source_path"] = resolve_image_path(
            path, roots, f"{d.path}/source/@file", must_exist=True)
    else:
        kw["source_path"] = None

    tgt = d.child("target")
    if tgt is None:
        raise _err(f"missing element {d.path}/target")
    tgt.check(attrs=("dev", "bus", "tray", "removable"))
    dev = tgt.need("dev")
    m = _TARGET.match(dev)
    if not m:
        raise _err(f"invalid value {dev!r} for {tgt.path}/@dev")
    default_bus = {"vd": "virtio", "hd": "ide", "sd": "scsi"}[m.group(1)]
    bus = tgt.choice("bus", ("virtio", "ide", "sata", "scsi"), default_bus)
    if m.group(1) != _BUS_PREFIX[bus]:
        raise _err(f"invalid value {dev!r} for {tgt.path}/@dev: bus {bus!r} "
                   f"disks are named {_BUS_PREFIX[bus]}*")
    kw["bus"], kw["target"] = bus, dev
    index = _target_index(dev)
    if bus == "ide":
        if q35:
            raise _err(f"unsupported value 'ide' for {tgt.path}/@bus: q35 "
                       "machines have no IDE (use sata)")
        if index > 3:
            raise _err(f"invalid value {dev!r} for {tgt.path}/@dev: IDE has "
                       "4 units (hda-hdd)")
    if bus == "sata" and index > 5:
        raise _err(f"invalid value {dev!r} for {tgt.path}/@dev: SATA has "
                   "6 ports (sda-sdf)")
    if bus == "scsi" and index > 255:
        raise _err(f"invalid value {dev!r} for {tgt.path}/@dev")
    if device == "cdrom" and bus == "virtio":
        raise _err(f"unsupported value 'virtio' for {tgt.path}/@bus: a "
                   "cdrom needs ide, sata or scsi")

    ro = d.child("readonly")
    if ro is not None:
        ro.check()
    kw["readonly"] = device == "cdrom" or ro is not None
    if ro is not None and device == "disk" and bus in ("ide", "sata"):
        raise _err(f"unsupported {d.path}/readonly: read-only {bus} disks are "
                   "not supported by QEMU")
    serial = d.child("serial")
    if serial is not None:
        serial.check()
        if not re.fullmatch(r"[A-Za-z0-9_.+-]{1,64}", serial.text):
            raise _err(f"invalid value {serial.text!r} for {serial.path}")
        kw["serial"] = serial.text
    kw["boot_order"] = _boot_order(d)
    kw["alias"] = _alias(d)
    _address(d)
    return Disk(**kw)


def _address(dev: _El) -> None:
    for a in dev.children("address"):
        # Any attributes: addresses are accepted and ignored.
        if len(a.el):
            raise _err(f"unsupported element {a.path}/{_qname(a.el[0].tag)}")


def _random_mac() -> str:
    tail = secrets.token_bytes(3)
    return "52:54:00:" + ":".join(f"{b:02x}" for b in tail)


def _parse_nic(n: _El) -> Nic:
    n.check(attrs=("type", "trustGuestRxFilters"),
            children=("mac", "source", "model", "target", "alias", "boot",
                      "address", "link", "mtu", "driver", "bandwidth",
                      "filterref"))
    if n.get("type") is None:
        raise _err(f"missing attribute {n.path}/@type")
    n.choice("type", ("bridge",))
    if n.get("trustGuestRxFilters") not in (None, "no"):
        raise _err(f"unsupported attribute {n.path}/@trustGuestRxFilters")
    if n.child("filterref") is not None:
        raise _err(f"unsupported element {n.path}/filterref")
    bw = n.child("bandwidth")
    if bw is not None:
        if len(bw.el) or bw.el.attrib:
            raise _err(f"unsupported element {bw.path}/"
                       f"{_qname(bw.el[0].tag) if len(bw.el) else ''}"
                       .rstrip("/"))
    kw: dict = {}
    mac_el = n.child("mac")
    if mac_el is not None:
        mac_el.check(attrs=("address",))
        mac = mac_el.need("address").lower()
        if not _MAC.match(mac):
            raise _err(f"invalid value {mac!r} for {mac_el.path}/@address")
        if int(mac[:2], 16) & 1:
            raise _err(f"invalid value {mac!r} for {mac_el.path}/@address: "
                       "a multicast address")
        kw["mac"] = mac
    else:
        kw["mac"] = _random_mac()
    src = n.child("source")
    if src is None:
        raise _err(f"missing element {n.path}/source")
    src.check(attrs=("bridge",))
    bridge = src.need("bridge")
    if not _IFNAME.match(bridge):
        raise _err(f"invalid value {bridge!r} for {src.path}/@bridge")
    kw["bridge"] = bridge
    model = n.child("model")
    if model is not None:
        model.check(attrs=("type",))
        kw["model"] = model.choice("type", ("virtio", "e1000", "rtl8139"),
                                   "virtio")
    tgt = n.child("target")
    if tgt is not None:
        tgt.check(attrs=("dev",))
        dev = tgt.get("dev")
        if dev is not None:
            if not _IFNAME.match(dev):
                raise _err(f"invalid value {dev!r} for {tgt.path}/@dev")
            kw["target_dev"] = dev
    link = n.child("link")
    if link is not None:
        link.check(attrs=("state",))
        kw["link_state"] = link.choice("state", ("up", "down"), "up")
    mtu = n.child("mtu")
    if mtu is not None:
        mtu.check(attrs=("size",))
        kw["mtu"] = mtu.int("size", minimum=68, maximum=65535)
    drv = n.child("driver")
    if drv is not None:
        drv.check(attrs=("name",))
        drv.choice("name", ("vhost", "qemu"))
    kw["alias"] = _alias(n)
    kw["boot_order"] = _boot_order(n)
    _address(n)
    return Nic(**kw)


def _listen_address(value: str, where: str) -> str:
    try:
        return str(ipaddress.ip_address(value))
    except ValueError:
        raise _err(f"invalid value {value!r} for {where}: an IP address is "
                   "needed")


def _parse_graphics(g: _El) -> Graphics:
    g.check(attrs=("type", "port", "autoport", "listen", "passwd",
                   "passwdValidTo", "keymap", "tlsPort", "defaultMode",
                   "connected", "sharePolicy"),
            children=("listen",))
    gtype = g.choice("type", ("vnc", "spice"))
    if gtype is None:
        raise _err(f"missing attribute {g.path}/@type")
    if gtype == "spice" and g.get("tlsPort") not in (None, "0"):
        raise _err(f"unsupported attribute {g.path}/@tlsPort")
    if gtype == "vnc" and g.get("tlsPort") is not None:
        raise _err(f"unsupported attribute {g.path}/@tlsPort")
    if g.get("defaultMode") not in (None, "any", "insecure"):
        raise _err(f"unsupported value {g.get('defaultMode')!r} for "
                   f"{g.path}/@defaultMode")
    g.choice("connected", ("keep", "disconnect", "fail"))
    g.choice("sharePolicy", ("allow-exclusive", "force-shared", "ignore"))
    kw: dict = {"type": gtype}
    port = g.int("port", -1, minimum=-1, maximum=65535)
    autoport = g.yesno("autoport")
    if autoport is None:
        autoport = port in (-1, 0)
    if not autoport:
        if port is None or port < 1:
            raise _err(f"missing attribute {g.path}/@port (autoport is no)")
        kw["port"] = port
    kw["autoport"] = autoport
    listen = g.get("listen")
    if listen is not None:
        kw["listen"] = _listen_address(listen, f"{g.path}/@listen")
    for ln in g.children("listen"):
        ln.check(attrs=("type", "address", "network"))
        ltype = ln.choice("type", ("address", "network"))
        if ltype is None:
            raise _err(f"missing attribute {ln.path}/@type")
        if ltype == "address" and ln.get("address"):
            kw["listen"] = _listen_address(ln.get("address"),
                                           f"{ln.path}/@address")
        elif ltype == "network":
            net = ln.need("network")
            if not _SAFE.match(net):
                raise _err(f"invalid value {net!r} for {ln.path}/@network")
            kw["listen_network"] = net
    if len(g.children("listen")) > 1:
        raise _err(f"unsupported: more than one {g.path}/listen")
    kw["passwd"] = g.get("passwd")
    kw["passwd_valid_to"] = g.get("passwdValidTo")
    kw["keymap"] = g.get("keymap")
    return Graphics(**kw)


def _parse_serial(s: _El) -> Serial:
    s.check(attrs=("type",), children=("source", "target", "alias", "address",
                                       "log"))
    if s.child("log") is not None:
        raise _err(f"unsupported element {s.path}/log")
    stype = s.choice("type", ("pty", "file"))
    if stype is None:
        raise _err(f"missing attribute {s.path}/@type")
    src = s.child("source")
    if src is not None:
        src.check(attrs=("path", "append"))
    tgt = s.child("target")
    port = 0
    if tgt is not None:
        tgt.check(attrs=("type", "port"), children=("model",))
        tgt.choice("type", ("isa-serial",))
        port = tgt.int("port", 0, maximum=0)
        model = tgt.child("model")
        if model is not None:
            model.check(attrs=("name",))
            model.choice("name", ("isa-serial",))
    _address(s)
    return Serial(type=stype, port=port, alias=_alias(s))


def _parse_channel(c: _El) -> Channel:
    c.check(attrs=("type",), children=("source", "target", "alias",
                                       "address"))
    ctype = c.choice("type", ("unix", "spicevmc"))
    if ctype is None:
        raise _err(f"missing attribute {c.path}/@type")
    src = c.child("source")
    if src is not None:
        if ctype != "unix":
            raise _err(f"unsupported element {c.path}/source")
        src.check(attrs=("mode", "path"))
        src.choice("mode", ("bind",))
    tgt = c.child("target")
    if tgt is None:
        raise _err(f"missing element {c.path}/target")
    tgt.check(attrs=("type", "name", "state"))
    tgt.choice("type", ("virtio",))
    if tgt.get("type") is None:
        raise _err(f"missing attribute {tgt.path}/@type")
    default = "com.redhat.spice.0" if ctype == "spicevmc" else None
    name = tgt.get("name", default)
    if name is None:
        raise _err(f"missing attribute {tgt.path}/@name")
    if not re.fullmatch(r"[A-Za-z0-9_.-]{1,64}", name):
        raise _err(f"invalid value {name!r} for {tgt.path}/@name")
    _address(c)
    return Channel(type=ctype, name=name, alias=_alias(c))


_CONTROLLER_MODELS = {
    "usb": ("piix3-uhci", "ich9-ehci1", "qemu-xhci", "nec-xhci", "none"),
    "pci": ("pci-root", "pcie-root", "pcie-root-port"),
    "ide": ("piix3", "piix4"),
    "sata": (),
    "virtio-serial": ("virtio",),
    "scsi": ("virtio-scsi",),
}


def _parse_controller(c: _El) -> Controller:
    c.check(attrs=("type", "index", "model", "ports", "vectors"),
            children=("alias", "address", "model", "target", "driver"))
    ctype = c.choice("type", tuple(_CONTROLLER_MODELS))
    if ctype is None:
        raise _err(f"missing attribute {c.path}/@type")
    index = c.int("index", 0, maximum=255)
    models = _CONTROLLER_MODELS[ctype]
    model = c.get("model")
    if model is not None and model not in models:
        raise _err(f"unsupported value {model!r} for {c.path}/@model "
                   f"(controller type {ctype!r})")
    if ctype == "scsi" and model is None:
        raise _err(f"missing attribute {c.path}/@model (only virtio-scsi "
                   "is supported)")
    for sub in c.children("model"):
        sub.check(attrs=("name",))
    for sub in c.children("target"):
        sub.check(attrs=("chassis", "port", "chassisNr", "busNr"))
    for sub in c.children("driver"):
        sub.check(attrs=("queues",))
    if ctype != "pci" and (c.child("model") or c.child("target")):
        raise _err(f"unsupported element {c.path}/model")
    if index != 0 and ctype in ("usb", "ide", "sata", "virtio-serial",
                                "scsi"):
        raise _err(f"unsupported value {index} for {c.path}/@index: one "
                   f"{ctype} controller is supported")
    _address(c)
    return Controller(type=ctype, index=index, model=model)


def _parse_input(i: _El) -> Input:
    i.check(attrs=("type", "bus"), children=("alias", "address"))
    itype = i.choice("type", ("tablet", "mouse", "keyboard"))
    if itype is None:
        raise _err(f"missing attribute {i.path}/@type")
    bus = i.choice("bus", ("usb", "ps2", "virtio"),
                   "usb" if itype == "tablet" else "ps2")
    if itype == "tablet" and bus == "ps2":
        raise _err(f"unsupported value 'ps2' for {i.path}/@bus (tablet)")
    _address(i)
    return Input(type=itype, bus=bus, alias=_alias(i))


def _parse_video(v: _El) -> Video | None:
    v.check(children=("model", "alias", "address"))
    model = v.child("model")
    if model is None:
        raise _err(f"missing element {v.path}/model")
    model.check(attrs=("type", "vram", "heads", "ram", "vgamem", "primary"))
    mtype = model.choice("type", ("vga", "qxl", "virtio", "cirrus", "none"))
    if mtype is None:
        raise _err(f"missing attribute {model.path}/@type")
    _address(v)
    return None if mtype == "none" else Video(model=mtype, alias=_alias(v))


def _parse_balloon(b: _El) -> Memballoon:
    b.check(attrs=("model", "autodeflate", "freePageReporting"),
            children=("stats", "alias", "address"))
    model = b.choice("model", ("virtio", "none"))
    if model is None:
        raise _err(f"missing attribute {b.path}/@model")
    if b.get("autodeflate") not in (None, "off") or b.get(
            "freePageReporting") not in (None, "off"):
        raise _err(f"unsupported attribute {b.path}/@autodeflate")
    period = None
    stats = b.child("stats")
    if stats is not None:
        stats.check(attrs=("period",))
        period = stats.int("period", maximum=86400)
    _address(b)
    return Memballoon(model=model, stats_period=period, alias=_alias(b))


def _parse_rng(r: _El) -> Rng:
    r.check(attrs=("model",), children=("backend", "rate", "alias",
                                        "address"))
    r.choice("model", ("virtio",))
    if r.get("model") is None:
        raise _err(f"missing attribute {r.path}/@model")
    be = r.child("backend")
    if be is None:
        raise _err(f"missing element {r.path}/backend")
    be.check(attrs=("model",))
    be.choice("model", ("random",))
    if be.text not in ("", "/dev/urandom"):
        raise _err(f"unsupported value {be.text!r} for {be.path}: only "
                   "/dev/urandom")
    kw: dict = {}
    rate = r.child("rate")
    if rate is not None:
        rate.check(attrs=("bytes", "period"))
        kw["rate_bytes"] = rate.int("bytes", minimum=1)
        kw["rate_period"] = rate.int("period", minimum=1)
    _address(r)
    return Rng(alias=_alias(r), **kw)
