"""
The protocol-independent half of the client: one connection kept alive by a
L{ClientService}, calls that wait for it, time out, and survive a reconnect
when the method is safe to repeat.

A wire protocol (STOMP, AMP) provides L{ISession}: it tells its L{Client}
when it is ready to carry calls and when it is gone, and fails the calls in
flight with L{Disconnected} when the connection drops.
"""

from __future__ import annotations

import random
from typing import Any, Callable

from twisted.application.internet import ClientService
from twisted.internet.task import deferLater
from twisted.internet import defer, error
from twisted.internet.interfaces import IReactorTime, IStreamClientEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from vdsm_twisted.api.errors import RecoveryInProgress
from vdsm_twisted.api import schema

EventCallback = Callable[[str, Any], object]


class Disconnected(error.ConnectionLost):
    """
    The connection dropped while the call was in flight (or the client was
    closed): the server may or may not have run it.  Retrying is the
    caller's decision; methods marked idempotent are retried for you.
    (Code 99, RecoveryInProgress, is retried for every method: the agent
    answers it before running anything.)
    """


class CallTimeout(defer.TimeoutError):
    """No answer within the call's timeout; the call was abandoned."""


class ConnectFailed(error.ConnectError):
    """The first connection could not be made (refused, TLS, timeout...)."""


class ISession(Interface):
    """One live connection that can carry calls (a wire protocol instance)."""

    events_subscribed = Attribute("True once the server sends events on this connection.")

    def call(method: str, params: Any, flow_id: str | None) -> defer.Deferred:
        """
        Send one call; fires with its result, fails with an
        L{vdsm_twisted.api.errors.ApiError} or L{Disconnected}.
        Cancelling forgets the call.
        """

    def subscribe_events() -> defer.Deferred:
        """Ask the server for events on this connection."""

    def disconnect() -> None:
        """Say goodbye politely (the caller then drops the connection)."""


#: Methods the client re-sends after a reconnect.
IDEMPOTENT = frozenset(m.name for m in schema.METHODS if m.idempotent)


def backoff(attempt: int, cap: float = 5.0, base: float = 0.25,
            jitter: Callable[[], float] = random.random) -> float:
    """Exponential delay before reconnect attempt C{attempt}, jittered, capped."""
    delay = min(cap, base * (2 ** min(attempt, 16)))
    return delay * (0.5 + jitter() / 2)


class _SessionFactory(Factory):
    """Builds protocol instances bound to their client."""

    def __init__(self, client: "Client", make: Callable[["Client"], Protocol]):
        self.client = client
        self.make = make

    def buildProtocol(self, addr):
        proto = self.make(self.client)
        proto.factory = self
        return proto


class Client:
    """
    A connection to one agent.  Use L{vdsm_twisted.client.connect} to get
    one; everything here is safe to call while disconnected.
    """

    _log = Logger()

    def __init__(self, endpoint: IStreamClientEndpoint,
                 make_protocol: Callable[["Client"], Protocol],
                 reactor: IReactorTime, timeout: float = 30.0,
                 retry_policy: Callable[[int], float] | None = None):
        self.timeout = timeout
        self._clock = reactor
        self._session: ISession | None = None
        self._waiters: list[defer.Deferred] = []
        self._callbacks: list[EventCallback] = []
        self._closed = False
        self._first: defer.Deferred | None = None
        self._service = ClientService(
            endpoint, _SessionFactory(self, make_protocol),
            retryPolicy=retry_policy or backoff, clock=reactor)

    # -- lifecycle

    def start(self) -> defer.Deferred:
        """Connect; fires with C{self} once ready, fails with L{ConnectFailed}."""
        self._first = first = defer.Deferred()
        self._service.startService()

        def failed(f):
            if not f.check(defer.CancelledError):
                self._first_failed(f)
        self._service.whenConnected(failAfterFailures=1).addErrback(failed)
        first.addTimeout(self.timeout, self._clock,
                         onTimeoutCancel=lambda result, t: self._first_timed_out(t))
        return first

    def _first_timed_out(self, timeout: float):
        self._first = None
        self._closed = True
        self._service.stopService()
        raise ConnectFailed(string=f"not connected after {timeout:g} s")

    def _first_failed(self, reason: Failure) -> None:
        first, self._first = self._first, None
        if first is None or first.called:
            return
        self._closed = True
        message = reason.getErrorMessage()

        def stop():
            # Not from inside ClientService's own callbacks: it is not reentrant.
            self._service.stopService().addBoth(
                lambda _: first.errback(ConnectFailed(string=message)))
        self._clock.callLater(0, stop)

    def close(self) -> defer.Deferred:
        """Drop the connection and stop reconnecting; pending calls fail."""
        if self._closed:
            return defer.succeed(None)
        self._closed = True
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.errback(Disconnected("the client was closed"))
        if self._session is not None:
            self._session.disconnect()
        return self._service.stopService()

    @property
    def connected(self) -> bool:
        return self._session is not None

    # -- called by sessions

    def session_ready(self, session: ISession) -> None:
        self._session = session
        first, self._first = self._first, None
        if first is not None and not first.called:
            first.callback(self)
        waiters, self._waiters = self._waiters, []
        for waiter in waiters:
            waiter.callback(session)

    def session_lost(self, session: ISession, reason: Failure) -> None:
        if self._session is session:
            self._session = None
            if not self._closed:
                self._log.info("connection lost ({reason}); reconnecting",
                               reason=reason.getErrorMessage())
        elif self._first is not None:
            # Lost before it was ever ready: a TLS or protocol failure.
            self._first_failed(reason)

    @property
    def wants_events(self) -> bool:
        return bool(self._callbacks)

    def event_received(self, method: str, params: Any) -> None:
        for callback in list(self._callbacks):
            try:
                callback(method, params)
            except Exception:
                self._log.failure("event callback {callback!r} failed", callback=callback)

    # -- public API

    def subscribe_events(self, callback: EventCallback) -> defer.Deferred:
        """
        Call C{callback(method, params)} for every event; the subscription
        survives reconnects.  Fires once the server has been asked on a live
        connection.
        """
        self._callbacks.append(callback)
        return defer.ensureDeferred(self._subscribe())

    async def _subscribe(self) -> None:
        session = await self._ready()
        if not session.events_subscribed:
            await session.subscribe_events()

    def call(self, method: str, params: dict | list | None = None,
             timeout: float | None = None, flow_id: str | None = None) -> defer.Deferred:
        """
        Call one API method; fires with its result or fails with an
        L{ApiError}, L{Disconnected} or L{CallTimeout}.
        """
        if self._closed:
            return defer.fail(Disconnected("the client is closed"))
        timeout = self.timeout if timeout is None else timeout
        d = defer.ensureDeferred(self._attempts(method, params, flow_id, method in IDEMPOTENT))

        def timed_out(result, t):
            raise CallTimeout(f"{method}: no answer within {t:g} s")
        d.addTimeout(timeout, self._clock, onTimeoutCancel=timed_out)
        return d

    async def _attempts(self, method, params, flow_id, retry: bool) -> Any:
        delay = 0.05
        while True:
            session = await self._ready()
            try:
                return await session.call(method, params, flow_id)
            except RecoveryInProgress:
                # A starting, restarted or upgraded agent still re-attaching its
                # VMs refuses a call before running any of it (code 99), so any
                # call, idempotent or not, just asks again shortly (within its
                # timeout).
                if self._closed:
                    raise
                await deferLater(self._clock, delay, lambda: None)
                delay = min(delay * 2, 1.0)
            except Disconnected:
                # Whatever the session says later, it carries no more calls.
                if self._session is session:
                    self._session = None
                if not retry or self._closed:
                    raise
                self._log.info("re-sending idempotent {method} after reconnect", method=method)

    def _ready(self) -> defer.Deferred:
        if self._closed:
            return defer.fail(Disconnected("the client is closed"))
        if self._session is not None:
            return defer.succeed(self._session)

        def forget(d):
            if d in self._waiters:
                self._waiters.remove(d)
        waiter = defer.Deferred(forget)
        self._waiters.append(waiter)
        return waiter
