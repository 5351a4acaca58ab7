"""
privd's configuration keys: the embedded defaults and their documentation.

privd runs as root, so everything that widens what a caller may do is an
explicit operator decision here: who may connect, and which interface names
privd may create, enslave or delete (a caller must never be able to remove
eth0 or the management bridge it does not own).
"""

from __future__ import annotations

from vdsm_twisted.common.config import Config, Key, schema

SCHEMA = schema([
    # -- the socket and who may use it
    Key("privd", "socket", "path", "/run/vdsm-twisted-privd/privd.sock",
        "UNIX socket privd listens on. Its directory is created (root:socket_group,\n"
        "0750) when missing; a stale socket file is replaced."),
    Key("privd", "socket_group", "str", "vdsm",
        "Group owning the socket (and its directory)."),
    Key("privd", "socket_mode", "octal", "0660",
        "Permissions of the socket file."),
    Key("privd", "allowed_users", "list", "vdsm",
        "Users (names) whose processes may call privd, checked with SO_PEERCRED.\n"
        "root is always allowed."),
    Key("privd", "allowed_groups", "list", "",
        "Groups (names): a peer whose primary gid is one of them may call privd."),
    Key("privd", "log_level", "log-level", "info",
        "Lowest level logged: debug, info, warn, error, critical."),
    Key("privd", "max_box_size", "positive-int", "16384",
        "Largest AMP box (request) accepted, in bytes; a peer sending more is\n"
        "disconnected."),
    Key("privd", "max_pending", "positive-int", "16",
        "Requests one connection may have in flight; more fail with Busy."),
    Key("privd", "max_connections", "positive-int", "16",
        "Concurrent connections; more are closed at accept."),

    # -- which interfaces privd may touch
    Key("network", "tap_prefixes", "list", "vnet",
        "Name prefixes of the tap devices privd may create and delete\n"
        "(CreateTap/DeleteTap refuse any other name)."),
    Key("network", "bridge_prefixes", "list", "ovirtmgmt,vdsmbr_",
        "Name prefixes of the bridges privd may create, delete and enslave\n"
        "taps to. Keep host bridges you manage by hand out of this list."),
])


def load(path: str | None) -> Config:
    """Read privd's configuration (the embedded defaults when C{path} is None)."""
    return SCHEMA.load(path)
