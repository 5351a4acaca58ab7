"""
privd's lifecycle: the socket (its directory, permissions and group), the
listener, and the service manager's readiness notifications.

privd is started by the service manager, never by the agent (seed 000,
proposal C): it owns its socket, replaces a stale one left by a crash, and
refuses to start beside a live twin or on a configuration that names a user
or group this host does not have.
"""

from __future__ import annotations

import errno
import grp
import os
import signal
import socket
import stat
from typing import Any

from twisted.application.service import IService, MultiService
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.logger import Logger
from twisted.python.failure import Failure

from privd import config as privd_config
from privd.server import Policy, PrivdFactory
from vdsm_twisted._version import __version__
from vdsm_twisted.common import sdnotify
from vdsm_twisted.common.config import Config, ConfigError
from vdsm_twisted.common.logging import set_level

log = Logger()


def _prepare_socket_path(path: str, gid: int) -> None:
    directory = os.path.dirname(path) or "."
    if not os.path.isdir(directory):
        os.makedirs(os.path.dirname(directory) or ".", exist_ok=True)
        os.mkdir(directory, 0o750)
        os.chown(directory, 0, gid)
        os.chmod(directory, 0o750)
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ConfigError(f"[privd] socket {path} exists and is not a socket; not touching it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        probe.connect(path)
    except OSError as e:
        if e.errno not in (errno.ECONNREFUSED, errno.ENOENT):
            raise
        log.info("removing stale socket {path}", path=path)
        os.unlink(path)
    else:
        raise ConfigError(f"another privd is serving on {path}")
    finally:
        probe.close()


class PrivdService(MultiService):
    """Listens on the configured socket while running."""

    def __init__(self, config: Config, policy: Policy, reactor: Any = None,
                 config_path: str | None = None):
        super().__init__()
        self.config_path = config_path
        self._previous_sighup = None
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.config = config
        self.policy = policy
        self.reactor = reactor
        self.socket_path: str = config["privd", "socket"]
        self.factory = PrivdFactory(policy, version=__version__, reactor=reactor)
        self.port = None
        self._inode: tuple[int, int] | None = None

    def startService(self) -> None:
        group = self.config["privd", "socket_group"]
        try:
            gid = grp.getgrnam(group).gr_gid
        except KeyError:
            raise ConfigError(f"[privd] socket_group: no such group {group!r}") from None
        _prepare_socket_path(self.socket_path, gid)
        endpoint = UNIXServerEndpoint(self.reactor, self.socket_path, backlog=50,
                                      mode=self.config["privd", "socket_mode"])
        # Listening on a UNIX socket is synchronous: the Deferred has fired.
        outcome: list = []
        endpoint.listen(self.factory).addBoth(outcome.append)
        if isinstance(outcome[0], Failure):
            outcome[0].raiseException()
        self.port = outcome[0]
        os.chown(self.socket_path, 0, gid)
        os.chmod(self.socket_path, self.config["privd", "socket_mode"])
        st = os.stat(self.socket_path)
        self._inode = (st.st_dev, st.st_ino)
        super().startService()
        log.info("privd {version} serving on {path} (users: {users}; groups: {groups})",
                 version=__version__, path=self.socket_path,
                 users=",".join(self.config["privd", "allowed_users"]) or "-",
                 groups=",".join(self.config["privd", "allowed_groups"]) or "-")
        self._previous_sighup = signal.signal(
            signal.SIGHUP, lambda *_: self.reactor.callFromThread(self.reload))
        sdnotify.ready("serving on " + self.socket_path)

    def reload(self) -> bool:
        """SIGHUP: new callers, limits and log level; a bad file changes nothing.

        The socket's path, group and mode stay as started (a restart moves them).
        """
        sdnotify.reloading()
        try:
            try:
                config = privd_config.load(self.config_path)
                policy = Policy.from_config(config)
            except ConfigError as e:
                log.error("reload refused, keeping the running configuration: {error}",
                          error=str(e))
                return False
            set_level(config["privd", "log_level"])
            self.policy = self.factory.policy = policy
            self.config = config
            log.info("configuration reloaded (users: {users}; groups: {groups})",
                     users=",".join(config["privd", "allowed_users"]) or "-",
                     groups=",".join(config["privd", "allowed_groups"]) or "-")
            return True
        finally:
            sdnotify.ready()

    def stopService(self):
        sdnotify.stopping()
        if self._previous_sighup is not None:
            signal.signal(signal.SIGHUP, self._previous_sighup)
            self._previous_sighup = None
        super().stopService()
        port, self.port = self.port, None
        if port is None:
            return None
        d = port.stopListening()

        def remove_socket(_: Any) -> None:
            try:
                st = os.lstat(self.socket_path)
            except FileNotFoundError:
                return
            if (st.st_dev, st.st_ino) == self._inode:  # ours, not a successor's
                os.unlink(self.socket_path)

        return d.addBoth(remove_socket) if d is not None else remove_socket(None)


def make_service(config_path: str | None, reactor: Any = None) -> IService:
    """privd as an IService (C{twistd privd}); raises ConfigError on a bad config."""
    config = privd_config.load(config_path)
    set_level(config["privd", "log_level"])
    policy = Policy.from_config(config)  # unknown users/groups stop privd here
    return PrivdService(config, policy, reactor=reactor, config_path=config_path)
