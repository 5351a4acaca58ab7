"""
The fixed AMP command table between the agent and privd.

This module is the whole privileged surface: a handful of commands with typed
arguments, and one set of declared errors that every failure maps to (an
undeclared exception would close the AMP connection).  The argument checks
that do not depend on privd's configuration live here too, so the agent can
run them before asking.
"""

from __future__ import annotations

import errno as _errno
import re

from twisted.protocols import amp

IFNAMSIZ = 16
MAX_UID = 2**32 - 2  # (uid_t)-1 means "no change" to the kernel
MIN_MTU, MAX_MTU = 68, 65535

_IFNAME = re.compile(r"[A-Za-z0-9_.\-]{1,15}")
_ERRNO_IN_MESSAGE = re.compile(r"\(errno (\d+)")


class PrivdError(Exception):
    """A call to privd failed; the message says why (same on both sides)."""

    def __str__(self) -> str:
        return self.args[0] if self.args else self.__class__.__name__


class InvalidArgument(PrivdError):
    """An argument is malformed (bad interface name, uid out of range...)."""


class NotPermitted(PrivdError):
    """The request is well formed but privd's policy refuses it."""


class NotFound(PrivdError):
    """The named device does not exist."""


class AlreadyExists(PrivdError):
    """A device of that name exists (and is not what was asked for)."""


class Busy(PrivdError):
    """Too many requests in flight on this connection; retry later."""


class OperationFailed(PrivdError):
    """The kernel refused the operation; C{errno} is set when known."""

    def __init__(self, message: str, errno: int | None = None):
        if errno is None:
            found = _ERRNO_IN_MESSAGE.search(message)
            errno = int(found.group(1)) if found else None
        elif f"(errno {errno}" not in message:
            name = _errno.errorcode.get(errno, "?")
            message = f"{message} (errno {errno} {name})"
        super().__init__(message)
        self.errno = errno


#: Every command declares all of them: one error vocabulary for the table.
ERRORS: dict[type[Exception], bytes] = {
    InvalidArgument: b"INVALID_ARGUMENT",
    NotPermitted: b"NOT_PERMITTED",
    NotFound: b"NOT_FOUND",
    AlreadyExists: b"ALREADY_EXISTS",
    Busy: b"BUSY",
    OperationFailed: b"OPERATION_FAILED",
}


class Ping(amp.Command):
    """Is privd there?  Answers its pid and version."""

    arguments: list = []
    response = [(b"pid", amp.Integer()), (b"version", amp.Unicode())]
    errors = ERRORS


class EnsureBridge(amp.Command):
    """Create the bridge C{name} if missing and set it up (idempotent)."""

    arguments = [(b"name", amp.Unicode())]
    response = [(b"created", amp.Boolean())]
    errors = ERRORS


class DeleteBridge(amp.Command):
    """Delete the bridge C{name} (bridges only; refused while foreign ports remain)."""

    arguments = [(b"name", amp.Unicode())]
    response: list = []
    errors = ERRORS


class CreateTap(amp.Command):
    """
    Create a persistent tap owned by C{owner_uid}, up, optionally enslaved to
    C{bridge}, and return an open fd attached to it.
    """

    arguments = [
        (b"name", amp.Unicode()),
        (b"owner_uid", amp.Integer()),
        (b"bridge", amp.Unicode(optional=True)),
        (b"mtu", amp.Integer(optional=True)),
        (b"vnet_hdr", amp.Boolean(optional=True)),
    ]
    response = [(b"name", amp.Unicode()), (b"fd", amp.Descriptor())]
    errors = ERRORS


class DeleteTap(amp.Command):
    """Delete the tap C{name} (tun/tap devices only), even while fds are open."""

    arguments = [(b"name", amp.Unicode())]
    response: list = []
    errors = ERRORS


#: The table privd serves; anything else is answered "unhandled command".
COMMANDS: tuple[type[amp.Command], ...] = (Ping, EnsureBridge, DeleteBridge, CreateTap, DeleteTap)


# -- argument checks that need no configuration

def check_ifname(name: object, what: str = "interface name") -> str:
    if not isinstance(name, str) or not _IFNAME.fullmatch(name) or name in (".", ".."):
        raise InvalidArgument(
            f"invalid {what} {name!r}: 1-15 characters of [A-Za-z0-9_.-]")
    return name


def check_prefix(name: str, prefixes: tuple[str, ...], what: str) -> str:
    if not any(prefix and name.startswith(prefix) for prefix in prefixes):
        allowed = ", ".join(repr(p) for p in prefixes) or "none configured"
        raise NotPermitted(f"{what} {name!r} is outside the allowed prefixes ({allowed})")
    return name


def check_uid(uid: object) -> int:
    if not isinstance(uid, int) or isinstance(uid, bool) or not 0 <= uid <= MAX_UID:
        raise InvalidArgument(f"invalid uid {uid!r}: must be 0..{MAX_UID}")
    return uid


def check_mtu(mtu: object) -> int:
    if not isinstance(mtu, int) or isinstance(mtu, bool) or not MIN_MTU <= mtu <= MAX_MTU:
        raise InvalidArgument(f"invalid mtu {mtu!r}: must be {MIN_MTU}..{MAX_MTU}")
    return mtu
