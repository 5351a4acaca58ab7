"""
Bridges and taps with the kernel's own interfaces: ioctl and one netlink
message, no C{ip}, no shell.

Every function checks what the named device really is (from sysfs) before
touching it, so a well-formed name still cannot turn "delete a tap" into
"delete the uplink".  Failures raise the declared errors of
L{privd.commands}; the calls are fast and run on the reactor thread, which
also serializes them.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct

from privd.commands import AlreadyExists, NotFound, NotPermitted, OperationFailed

SYS_CLASS_NET = "/sys/class/net"
TUN_DEVICE = "/dev/net/tun"

# <linux/sockios.h>
SIOCGIFFLAGS = 0x8913
SIOCSIFFLAGS = 0x8914
SIOCSIFMTU = 0x8922
SIOCBRADDBR = 0x89A0
SIOCBRDELBR = 0x89A1
SIOCBRADDIF = 0x89A2
# <linux/if_tun.h>: _IOW('T', n, int)
TUNSETIFF = 0x400454CA
TUNSETPERSIST = 0x400454CB
TUNSETOWNER = 0x400454CC
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_TUN_EXCL = 0x8000  # fail with EBUSY instead of attaching to an existing device
IFF_UP = 0x1
# <linux/rtnetlink.h>
RTM_DELLINK = 17
NLMSG_ERROR = 2
NLM_F_REQUEST = 0x1
NLM_F_ACK = 0x4

# struct ifreq is 40 bytes on Linux: a 16-byte name and a 24-byte union.
_IFREQ_SHORT = "16sH22x"
_IFREQ_INT = "16si20x"


def _ifreq_short(name: str, value: int) -> bytes:
    return struct.pack(_IFREQ_SHORT, name.encode(), value)


def _failed(what: str, name: str, error: OSError) -> OperationFailed:
    return OperationFailed(f"{what} {name}: {error.strerror or error}", error.errno)


# -- what a name is, according to sysfs

def exists(name: str) -> bool:
    return os.path.lexists(os.path.join(SYS_CLASS_NET, name))


def is_bridge(name: str) -> bool:
    return os.path.isdir(os.path.join(SYS_CLASS_NET, name, "bridge"))


def is_tuntap(name: str) -> bool:
    return os.path.exists(os.path.join(SYS_CLASS_NET, name, "tun_flags"))


def ifindex(name: str) -> int:
    try:
        with open(os.path.join(SYS_CLASS_NET, name, "ifindex")) as f:
            return int(f.read())
    except FileNotFoundError:
        raise NotFound(f"no such device {name!r}") from None


def bridge_ports(name: str) -> list[str]:
    try:
        return sorted(os.listdir(os.path.join(SYS_CLASS_NET, name, "brif")))
    except FileNotFoundError:
        return []


def master(name: str) -> str | None:
    link = os.path.join(SYS_CLASS_NET, name, "master")
    return os.path.basename(os.readlink(link)) if os.path.islink(link) else None


# -- small ioctl helpers

def _ctl_socket() -> socket.socket:
    return socket.socket(socket.AF_INET, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)


def _set_up(sock: socket.socket, name: str, up: bool = True) -> None:
    try:
        result = fcntl.ioctl(sock, SIOCGIFFLAGS, _ifreq_short(name, 0))
        flags = struct.unpack(_IFREQ_SHORT, result)[1]
        wanted = flags | IFF_UP if up else flags & ~IFF_UP
        if wanted != flags:
            fcntl.ioctl(sock, SIOCSIFFLAGS, _ifreq_short(name, wanted))
    except OSError as e:
        raise _failed("set up" if up else "set down", name, e) from None


def _set_mtu(sock: socket.socket, name: str, mtu: int) -> None:
    try:
        fcntl.ioctl(sock, SIOCSIFMTU, struct.pack(_IFREQ_INT, name.encode(), mtu))
    except OSError as e:
        raise _failed(f"set mtu {mtu} on", name, e) from None


def _rtnl_dellink(index: int, name: str) -> None:
    """RTM_DELLINK by index: removes a tap even while fds are attached to it."""
    ifinfo = struct.pack("=BBHiII", socket.AF_UNSPEC, 0, 0, index, 0, 0)
    header = struct.pack("=IHHII", 16 + len(ifinfo), RTM_DELLINK, NLM_F_REQUEST | NLM_F_ACK, 1, 0)
    with socket.socket(socket.AF_NETLINK, socket.SOCK_RAW | socket.SOCK_CLOEXEC,
                       socket.NETLINK_ROUTE) as nl:
        nl.settimeout(5.0)
        try:
            nl.bind((0, 0))
            nl.send(header + ifinfo)
            while True:
                reply = nl.recv(65536)
                offset = 0
                while offset + 16 <= len(reply):
                    length, kind, _flags, seq, _pid = struct.unpack_from("=IHHII", reply, offset)
                    if kind == NLMSG_ERROR and seq == 1:
                        code = struct.unpack_from("=i", reply, offset + 16)[0]
                        if code:
                            raise OSError(-code, os.strerror(-code))
                        return
                    offset += max((length + 3) & ~3, 16)
        except OSError as e:
            raise _failed("delete link", name, e) from None


# -- the operations

def ensure_bridge(name: str) -> bool:
    """Create the bridge if missing, set it up; True if it was created."""
    created = False
    with _ctl_socket() as sock:
        if exists(name):
            if not is_bridge(name):
                raise AlreadyExists(f"{name!r} exists and is not a bridge")
        else:
            try:
                fcntl.ioctl(sock, SIOCBRADDBR, name.encode() + b"\0")
            except OSError as e:
                raise _failed("create bridge", name, e) from None
            created = True
        try:
            _set_up(sock, name)
        except OperationFailed:
            if created:
                _delete_bridge(sock, name)
            raise
    return created


def _delete_bridge(sock: socket.socket, name: str) -> None:
    _set_up(sock, name, up=False)
    try:
        fcntl.ioctl(sock, SIOCBRDELBR, name.encode() + b"\0")
    except OSError as e:
        raise _failed("delete bridge", name, e) from None


def delete_bridge(name: str) -> None:
    """Delete a bridge; refused while anything but taps is enslaved to it."""
    if not exists(name):
        raise NotFound(f"no such bridge {name!r}")
    if not is_bridge(name):
        raise NotPermitted(f"{name!r} is not a bridge")
    foreign = [port for port in bridge_ports(name) if not is_tuntap(port)]
    if foreign:
        raise NotPermitted(f"bridge {name!r} still has non-tap ports: {', '.join(foreign)}")
    with _ctl_socket() as sock:
        _delete_bridge(sock, name)


def create_tap(name: str, owner_uid: int, bridge: str | None = None,
               mtu: int | None = None, vnet_hdr: bool = False) -> int:
    """
    Create a persistent tap, up (and enslaved to C{bridge}); return an fd
    attached to it, which the caller must close.  On any failure nothing is
    left behind.
    """
    if exists(name):
        raise AlreadyExists(f"device {name!r} already exists")
    if bridge is not None:
        if not exists(bridge):
            raise NotFound(f"no such bridge {bridge!r}")
        if not is_bridge(bridge):
            raise NotPermitted(f"{bridge!r} is not a bridge")
    flags = IFF_TAP | IFF_NO_PI | IFF_TUN_EXCL | (IFF_VNET_HDR if vnet_hdr else 0)
    try:
        fd = os.open(TUN_DEVICE, os.O_RDWR | os.O_CLOEXEC)
    except OSError as e:
        raise _failed("open", TUN_DEVICE, e) from None
    persistent = False
    try:
        try:
            fcntl.ioctl(fd, TUNSETIFF, _ifreq_short(name, flags))
        except OSError as e:
            if e.errno == 16:  # EBUSY: someone created it in between
                raise AlreadyExists(f"device {name!r} already exists") from None
            raise _failed("create tap", name, e) from None
        try:
            fcntl.ioctl(fd, TUNSETOWNER, owner_uid)
            fcntl.ioctl(fd, TUNSETPERSIST, 1)
            persistent = True
        except OSError as e:
            raise _failed("set owner/persist on", name, e) from None
        with _ctl_socket() as sock:
            if mtu is not None:
                _set_mtu(sock, name, mtu)
            if bridge is not None:
                try:
                    fcntl.ioctl(sock, SIOCBRADDIF, struct.pack(_IFREQ_INT, bridge.encode(),
                                                               ifindex(name)))
                except OSError as e:
                    raise _failed(f"add {name} to bridge", bridge, e) from None
            _set_up(sock, name)
    except BaseException:
        if persistent:
            try:
                fcntl.ioctl(fd, TUNSETPERSIST, 0)
            except OSError:
                pass
        os.close(fd)  # the last fd of a non-persistent tap: the device goes away
        raise
    return fd


def delete_tap(name: str) -> None:
    """Delete a tun/tap device; fds still attached to it see it vanish."""
    if not exists(name):
        raise NotFound(f"no such tap {name!r}")
    if not is_tuntap(name):
        raise NotPermitted(f"{name!r} is not a tap device")
    _rtnl_dellink(ifindex(name), name)
