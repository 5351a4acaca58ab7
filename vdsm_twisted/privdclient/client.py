"""
The agent's side of privd: one reconnecting AMP connection over the UNIX socket.

privd is a separate service that the service manager restarts (seed 000,
proposal C), so its absence is an ordinary condition here, never a crash: a
call made while privd is known to be down fails at once with
L{PrivdUnavailable} (after one immediate reconnection attempt, so the first
call after privd comes back succeeds), calls in flight when the connection
drops fail at once, and a privd that stops answering costs a call at most
C{call_timeout} seconds (L{PrivdTimeout}).
"""

from __future__ import annotations

import os
import random
from typing import Any

import attr
from twisted.application.internet import ClientService, backoffPolicy
from twisted.application.service import Service
from twisted.internet.defer import (
    CancelledError, Deferred, DeferredLock, DeferredSemaphore, fail)
from twisted.internet.endpoints import UNIXClientEndpoint
from twisted.internet.error import ConnectError, ConnectionClosed
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Factory
from twisted.logger import Logger
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from privd.commands import (
    CreateTap,
    DeleteBridge,
    DeleteTap,
    EnsureBridge,
    Ping,
    PrivdError,
)

log = Logger()


class PrivdUnavailable(PrivdError):
    """privd is not reachable, or the connection dropped during the call."""


class PrivdTimeout(PrivdError):
    """privd did not answer within call_timeout; the outcome is unknown."""


@attr.frozen
class TapDevice:
    """A tap privd created; C{fd} is attached to it and now belongs to the caller."""

    name: str
    fd: int

    def close(self) -> None:
        os.close(self.fd)


class _PrivdAMP(amp.AMP):
    """The client connection: answers no commands, keeps no stray fds."""

    def __init__(self, client: "PrivdClient"):
        super().__init__()
        self._client = client

    def connectionMade(self) -> None:
        super().connectionMade()
        self._client._connected(self)

    def connectionLost(self, reason: Failure) -> None:
        self._client._disconnected(self)
        for fd in self._descriptors.values():
            _close_quietly(fd)
        self._descriptors.clear()
        super().connectionLost(reason)

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        try:
            super().ampBoxReceived(box)
        finally:
            # An fd nobody claimed (e.g. a CreateTap answer after a timeout).
            for fd in self._descriptors.values():
                _close_quietly(fd)
            self._descriptors.clear()

    def locateResponder(self, name: bytes):
        return None  # privd never calls the agent


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


@implementer(IStreamClientEndpoint)
class _WatchedEndpoint:
    """Tells the client when a connection attempt fails (privd is down)."""

    def __init__(self, endpoint: IStreamClientEndpoint, on_failure):
        self._endpoint = endpoint
        self._on_failure = on_failure

    def connect(self, factory):
        def failed(failure: Failure) -> Failure:
            self._on_failure(failure)
            return failure

        return self._endpoint.connect(factory).addErrback(failed)


class _RetryClock:
    """ClientService's clock, keeping the pending retry so a call can hurry it."""

    def __init__(self, reactor: Any):
        self._reactor = reactor
        self.pending = None

    def callLater(self, delay: float, f, *args, **kwargs):
        self.pending = self._reactor.callLater(delay, f, *args, **kwargs)
        return self.pending

    def seconds(self) -> float:
        return self._reactor.seconds()

    def getDelayedCalls(self):
        return self._reactor.getDelayedCalls()

    def retry_now(self) -> None:
        if self.pending is not None and self.pending.active():
            self.pending.reset(0)


class PrivdClient(Service):
    """
    A service keeping one AMP connection to privd (reconnecting with a backoff
    capped at C{max_delay}) and making calls over it.
    """

    def __init__(self, socket_path: str, call_timeout: float = 30.0, max_delay: float = 5.0,
                 max_in_flight: int = 8,
                 reactor: Any = None):
        if reactor is None:
            from twisted.internet import reactor as default_reactor

            reactor = default_reactor
        self.socket_path = socket_path
        self.call_timeout = call_timeout
        self._reactor = reactor
        self._slots = DeferredSemaphore(max_in_flight)
        self._fd_lock = DeferredLock()
        self._clock = _RetryClock(reactor)
        self._protocol: _PrivdAMP | None = None
        self._known_down = False
        endpoint = _WatchedEndpoint(UNIXClientEndpoint(reactor, socket_path, timeout=call_timeout),
                                    self._attempt_failed)
        policy = backoffPolicy(initialDelay=0.1, maxDelay=max_delay, factor=2.0,
                               jitter=lambda: random.uniform(0, 0.1))
        self._service = ClientService(endpoint, Factory.forProtocol(lambda: _PrivdAMP(self)),
                                      retryPolicy=policy, clock=self._clock)

    # -- lifecycle

    def startService(self) -> None:
        super().startService()
        self._service.startService()

    def stopService(self):
        super().stopService()
        return self._service.stopService()

    @property
    def connected(self) -> bool:
        return self._protocol is not None

    def _connected(self, protocol: _PrivdAMP) -> None:
        self._protocol = protocol
        self._known_down = False
        log.info("connected to privd on {path}", path=self.socket_path)

    def _disconnected(self, protocol: _PrivdAMP) -> None:
        if self._protocol is protocol:
            self._protocol = None
            self._known_down = True
            log.warn("lost the connection to privd on {path}", path=self.socket_path)

    def _attempt_failed(self, failure: Failure) -> None:
        if not failure.check(CancelledError):
            self._known_down = True

    # -- calls

    def call(self, command: type[amp.Command], **kwargs: Any) -> Deferred:
        """Run C{command} on privd; fires with its response dict.

        Calls queue here so privd never sees more than C{max_in_flight} at
        once (it answers Busy beyond its own limit), and commands answering
        with a file descriptor run one at a time: AMP pairs descriptors with
        answers by arrival order, which must not interleave.
        """
        if not self.running:
            return fail(PrivdUnavailable("the privd client is not running"))
        if any(isinstance(arg, amp.Descriptor) for _, arg in command.response):
            queued = self._fd_lock.run(self._slots.run, self._call, command, kwargs)
        else:
            queued = self._slots.run(self._call, command, kwargs)
        # A Deferred that fires only with the outcome (the queue's own
        # Deferreds count as "called" while they wait on the call).
        result: Deferred = Deferred(lambda _: queued.cancel())
        queued.addCallbacks(result.callback, result.errback)
        return result

    def _call(self, command: type[amp.Command], kwargs: dict) -> Deferred:
        if not self.running:
            return fail(PrivdUnavailable("the privd client is not running"))
        if self._protocol is not None:
            d = self._protocol.callRemote(command, **kwargs)
        else:
            if self._known_down:
                self._clock.retry_now()  # one immediate attempt decides
            d = self._when_connected()
            d.addCallback(lambda protocol: protocol.callRemote(command, **kwargs))
        name = command.__name__

        def timed_out(result: Any, timeout: float) -> Failure:
            return Failure(PrivdTimeout(f"privd did not answer {name} within {timeout:g}s"))

        d.addTimeout(self.call_timeout, self._reactor, onTimeoutCancel=timed_out)
        return d.addErrback(self._translate, name)

    def _when_connected(self) -> Deferred:
        """
        ClientService.whenConnected, but firing from a fresh reactor turn:
        it fires from inside ClientService's state machine, which must not be
        re-entered by whatever the caller does next (such as another call).
        """
        waiting = self._service.whenConnected(failAfterFailures=1)
        hop: Deferred = Deferred(lambda _: waiting.cancel())

        def deliver(result: Any) -> None:
            if not hop.called:
                self._reactor.callLater(0, hop.callback, result)

        waiting.addBoth(deliver)
        return hop

    def _translate(self, failure: Failure, name: str) -> Failure:
        if failure.check(PrivdError):
            return failure
        if failure.check(ConnectionClosed, ConnectError, CancelledError):
            return Failure(PrivdUnavailable(
                f"privd on {self.socket_path} is unavailable ({name}): "
                f"{failure.getErrorMessage() or failure.type.__name__}"))
        return Failure(PrivdError(f"{name} failed: {failure.getErrorMessage()}"))

    def ping(self) -> Deferred:
        """Fires with C{{"pid": int, "version": str}}."""
        return self.call(Ping)

    def ensure_bridge(self, name: str) -> Deferred:
        """Fires with True if the bridge was created, False if it existed."""
        return self.call(EnsureBridge, name=name).addCallback(lambda r: r["created"])

    def delete_bridge(self, name: str) -> Deferred:
        return self.call(DeleteBridge, name=name).addCallback(lambda _: None)

    def create_tap(self, name: str, owner_uid: int, bridge: str | None = None,
                   mtu: int | None = None, vnet_hdr: bool = False) -> Deferred:
        """Fires with a L{TapDevice}; the caller owns (and must close) its fd."""
        kwargs: dict[str, Any] = {"name": name, "owner_uid": owner_uid}
        if bridge is not None:
            kwargs["bridge"] = bridge
        if mtu is not None:
            kwargs["mtu"] = mtu
        if vnet_hdr:
            kwargs["vnet_hdr"] = True
        return self.call(CreateTap, **kwargs).addCallback(
            lambda r: TapDevice(name=r["name"], fd=r["fd"]))

    def delete_tap(self, name: str) -> Deferred:
        return self.call(DeleteTap, name=name).addCallback(lambda _: None)
