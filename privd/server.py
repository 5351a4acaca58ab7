"""
privd's AMP server: who may call, how much they may send, and the responders
of the fixed command table.

The server trusts nothing from the socket: the peer is identified by the
kernel (SO_PEERCRED) before any byte is read, a box larger than configured
drops the connection, arguments that do not parse become L{InvalidArgument},
and any other failure becomes a declared error, so one caller's bad request
never costs the connection of another (nor, as AMP would by default, its own
connection).  Only the commands of L{privd.commands.COMMANDS} are served: AMP's
built-in StartTLS and C{amp_*} string dispatch are not reachable.
"""

from __future__ import annotations

import grp
import os
import pwd
import socket
import struct
from types import ModuleType
from typing import Any, Callable

import attr
from twisted.internet.defer import fail
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure

from privd import netdev
from privd.commands import (
    COMMANDS,
    ERRORS,
    Busy,
    CreateTap,
    DeleteBridge,
    DeleteTap,
    EnsureBridge,
    InvalidArgument,
    OperationFailed,
    Ping,
    PrivdError,
    check_ifname,
    check_mtu,
    check_prefix,
    check_uid,
)
from vdsm_twisted.common.config import Config, ConfigError

log = Logger()

#: Received fds held at once before a box claims them; no command takes one.
MAX_HELD_FDS = 8


@attr.frozen
class PeerCredentials:
    pid: int
    uid: int
    gid: int


def read_peer_credentials(transport: Any) -> PeerCredentials:
    """The connecting process's pid/uid/gid, as the kernel recorded them at connect()."""
    sock = transport.getHandle()
    data = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    return PeerCredentials(*struct.unpack("3i", data))


@attr.frozen
class Policy:
    """privd's configuration, resolved: uids and gids rather than names."""

    allowed_uids: frozenset[int]
    allowed_gids: frozenset[int]
    tap_prefixes: tuple[str, ...]
    bridge_prefixes: tuple[str, ...]
    max_box_size: int = 16384
    max_pending: int = 16
    max_connections: int = 16

    @classmethod
    def from_config(cls, config: Config) -> "Policy":
        """Resolve user and group names now: a typo must stop privd at start."""
        uids, gids = set(), set()
        for user in config["privd", "allowed_users"]:
            try:
                uids.add(pwd.getpwnam(user).pw_uid)
            except KeyError:
                raise ConfigError(f"[privd] allowed_users: no such user {user!r}") from None
        for group in config["privd", "allowed_groups"]:
            try:
                gids.add(grp.getgrnam(group).gr_gid)
            except KeyError:
                raise ConfigError(f"[privd] allowed_groups: no such group {group!r}") from None
        return cls(
            allowed_uids=frozenset(uids),
            allowed_gids=frozenset(gids),
            tap_prefixes=tuple(config["network", "tap_prefixes"]),
            bridge_prefixes=tuple(config["network", "bridge_prefixes"]),
            max_box_size=config["privd", "max_box_size"],
            max_pending=config["privd", "max_pending"],
            max_connections=config["privd", "max_connections"],
        )

    def allows(self, peer: PeerCredentials) -> bool:
        return peer.uid == 0 or peer.uid in self.allowed_uids or peer.gid in self.allowed_gids


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class PrivdProtocol(amp.AMP):
    """One caller's connection."""

    peer: PeerCredentials | None = None

    def __init__(self, factory: "PrivdFactory"):
        super().__init__()
        self.factory = factory
        self.policy = factory.policy
        self.ops = factory.ops
        self._refused = False
        self._box_bytes = 0
        self._pending = 0
        self._outgoing_fds: list[int] = []
        self._reap_call = None

    # -- connection and credentials

    def connectionMade(self) -> None:
        try:
            self.peer = self.factory.peer_credentials(self.transport)
        except Exception as e:
            log.error("refused peer: cannot read its credentials: {error}", error=e)
            self._drop()
            return
        p = self.peer
        if not self.policy.allows(p):
            log.warn("refused peer pid={pid} uid={uid} gid={gid}", pid=p.pid, uid=p.uid, gid=p.gid)
            self._drop()
            return
        log.info("connection from peer pid={pid} uid={uid} gid={gid}", pid=p.pid, uid=p.uid, gid=p.gid)

    def _drop(self) -> None:
        self._refused = True
        self.paused = True  # stop Int16StringReceiver's parsing loop at once
        self.transport.abortConnection()

    def connectionLost(self, reason: Failure) -> None:
        self.factory.connection_closed(self)
        for fd in self._descriptors.values():
            _close_quietly(fd)
        self._descriptors.clear()
        self._reap_sent_fds(final=True)
        super().connectionLost(reason)

    def _caller(self) -> str:
        p = self.peer
        return f"uid={p.uid} pid={p.pid}" if p else "uid=? pid=?"

    # -- limits on what the peer sends

    def dataReceived(self, data: bytes) -> None:
        if self._refused:
            return
        super().dataReceived(data)
        # A string whose length prefix has arrived but not its bytes counts too.
        if not self._refused and self._box_bytes + len(self._unprocessed) > self.policy.max_box_size:
            self._too_big()

    def stringReceived(self, string: bytes) -> None:
        if self._refused:
            return
        self._box_bytes += 2 + len(string)
        if self._box_bytes > self.policy.max_box_size:
            self._too_big()
            return
        super().stringReceived(string)

    def _too_big(self) -> None:
        log.warn("peer {caller} sent an AMP box over {limit} bytes: disconnected",
                 caller=self._caller(), limit=self.policy.max_box_size)
        self._drop()

    def fileDescriptorReceived(self, descriptor: int) -> None:
        if self._refused:
            _close_quietly(descriptor)
            return
        super().fileDescriptorReceived(descriptor)
        if len(self._descriptors) > MAX_HELD_FDS:
            log.warn("peer {caller} sent more than {n} file descriptors: disconnected",
                     caller=self._caller(), n=MAX_HELD_FDS)
            self._drop()

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        self._box_bytes = 0
        if self._refused:
            return
        try:
            if amp.COMMAND not in box:
                # privd never asks: answers, errors and empty boxes are garbage.
                raise amp.NoEmptyBoxes(box)
            super().ampBoxReceived(box)
        except Exception as e:
            log.warn("peer {caller} sent a malformed AMP box ({error!r}): disconnected",
                     caller=self._caller(), error=e)
            self._drop()
        finally:
            # No command takes an fd: whatever came with this box is unclaimed.
            for fd in self._descriptors.values():
                log.warn("closing an unsolicited fd from peer {caller}", caller=self._caller())
                _close_quietly(fd)
            self._descriptors.clear()

    # -- dispatch: the fixed table only, every failure declared

    def locateResponder(self, name: bytes):
        if name not in self.factory.command_names:
            return None
        return amp.CommandLocator.locateResponder(self, name)

    def dispatchCommand(self, box: amp.AmpBox):
        name = box[amp.COMMAND]
        command = self.factory.command_names.get(name)
        if command is None:
            log.warn("peer {caller} called unknown command {name!r}", caller=self._caller(), name=name)
            return super().dispatchCommand(box)  # AMP's own "Unhandled Command" error
        if self._pending >= self.policy.max_pending:
            return fail(_declared(Busy(f"more than {self.policy.max_pending} requests in flight")))
        try:
            command.parseArguments(box, self)
        except Exception as e:
            return fail(_declared(InvalidArgument(
                f"malformed arguments for {name.decode('ascii', 'replace')}: {e!r}")))
        self._pending += 1
        d = super().dispatchCommand(box)

        def done(result):
            self._pending -= 1
            return result

        def undeclared(failure: Failure):
            if failure.check(amp.RemoteAmpError):
                return failure
            log.failure("privd bug in {name!r}", failure, name=name)
            return Failure(_declared(OperationFailed(f"internal error: {failure.getErrorMessage()}")))

        return d.addBoth(done).addErrback(undeclared)

    def unhandledError(self, failure: Failure) -> None:
        # Reached for commands sent without "_ask" that fail: nobody to tell.
        error = (failure.value.description if failure.check(amp.RemoteAmpError)
                 else failure.getErrorMessage())
        log.warn("peer {caller}: unanswerable failure ({error}): disconnected",
                 caller=self._caller(), error=error)
        if self.transport is not None:
            self._drop()

    def lengthLimitExceeded(self, length: int) -> None:
        log.warn("peer {caller} sent an AMP key of {length} bytes: disconnected",
                 caller=self._caller(), length=length)
        self._drop()

    # -- passing fds: close ours once the kernel has them

    def _sendFileDescriptor(self, descriptor: int) -> int:
        ordinal = super()._sendFileDescriptor(descriptor)
        self._outgoing_fds.append(descriptor)
        if self._reap_call is None:
            self._reap_call = self.factory.reactor.callLater(0, self._reap_sent_fds)
        return ordinal

    def _reap_sent_fds(self, final: bool = False) -> None:
        if self._reap_call is not None and self._reap_call.active():
            self._reap_call.cancel()
        self._reap_call = None
        # Twisted sends queued fds with sendmsg() from doWrite(); until then
        # they sit in the transport's queue and must stay open.
        queued = getattr(self.transport, "_sendmsgQueue", ()) if not final else ()
        keep = []
        for fd in self._outgoing_fds:
            if fd in queued:
                keep.append(fd)
            else:
                _close_quietly(fd)
        self._outgoing_fds = keep
        if keep and not final:
            self._reap_call = self.factory.reactor.callLater(0.01, self._reap_sent_fds)

    # -- the responders

    def _checked_tap(self, name: str) -> str:
        return check_prefix(check_ifname(name, "tap name"), self.policy.tap_prefixes, "tap")

    def _checked_bridge(self, name: str) -> str:
        return check_prefix(check_ifname(name, "bridge name"), self.policy.bridge_prefixes, "bridge")

    def _run(self, what: str, fn: Callable[[], Any]) -> Any:
        try:
            result = fn()
        except PrivdError as e:
            log.warn("{what} by {caller} failed: {error}", what=what, caller=self._caller(), error=e)
            raise
        except OSError as e:
            log.warn("{what} by {caller} failed: {error}", what=what, caller=self._caller(), error=e)
            raise OperationFailed(f"{what}: {e.strerror or e}", e.errno) from None
        log.info("{what} by {caller}: done", what=what, caller=self._caller())
        return result

    @Ping.responder
    def ping(self) -> dict:
        return {"pid": os.getpid(), "version": self.factory.version}

    @EnsureBridge.responder
    def ensure_bridge(self, name: str) -> dict:
        def op() -> bool:
            return self.ops.ensure_bridge(self._checked_bridge(name))

        return {"created": self._run(f"ensure bridge {name!r}", op)}

    @DeleteBridge.responder
    def delete_bridge(self, name: str) -> dict:
        self._run(f"delete bridge {name!r}", lambda: self.ops.delete_bridge(self._checked_bridge(name)))
        return {}

    @CreateTap.responder
    def create_tap(self, name: str, owner_uid: int, bridge: str | None = None,
                   mtu: int | None = None, vnet_hdr: bool | None = None) -> dict:
        def op() -> int:
            self._checked_tap(name)
            check_uid(owner_uid)
            if bridge is not None:
                self._checked_bridge(bridge)
            if mtu is not None:
                check_mtu(mtu)
            return self.ops.create_tap(name, owner_uid, bridge=bridge, mtu=mtu,
                                       vnet_hdr=bool(vnet_hdr))

        fd = self._run(f"create tap {name!r} owner={owner_uid} bridge={bridge!r} mtu={mtu}", op)
        return {"name": name, "fd": fd}  # closed by _reap_sent_fds once sent

    @DeleteTap.responder
    def delete_tap(self, name: str) -> dict:
        self._run(f"delete tap {name!r}", lambda: self.ops.delete_tap(self._checked_tap(name)))
        return {}


def _declared(error: PrivdError) -> amp.RemoteAmpError:
    return amp.RemoteAmpError(ERRORS[type(error)], str(error), False)


class PrivdFactory(Factory):
    """Builds one L{PrivdProtocol} per accepted caller, up to max_connections."""

    def __init__(self, policy: Policy, ops: ModuleType | Any = netdev, version: str = "",
                 peer_credentials: Callable[[Any], PeerCredentials] = read_peer_credentials,
                 reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.policy = policy
        self.ops = ops
        self.version = version
        self.peer_credentials = peer_credentials
        self.reactor = reactor
        self.connections: set[PrivdProtocol] = set()
        self.command_names = {command.commandName: command for command in COMMANDS}

    def buildProtocol(self, addr: Any) -> PrivdProtocol | None:
        if len(self.connections) >= self.policy.max_connections:
            log.warn("refused a connection: {n} connections already open",
                     n=len(self.connections))
            return None
        protocol = PrivdProtocol(self)
        self.connections.add(protocol)
        return protocol

    def connection_closed(self, protocol: PrivdProtocol) -> None:
        self.connections.discard(protocol)
