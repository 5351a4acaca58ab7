"""
The client side of the engine API over AMP (L{vdsm_twisted.protocols.amp_commands}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet import defer, error
from twisted.protocols import amp
from twisted.python.failure import Failure
from zope.interface import implementer

from vdsm_twisted.api import errors
from vdsm_twisted.client._base import Client, Disconnected, ISession
from vdsm_twisted.protocols.amp_commands import Call, Event, Subscribe


def _unwrap(response: dict) -> Any:
    answer = response["response"]
    if isinstance(answer, dict) and "error" in answer:
        err = answer["error"]
        if isinstance(err, dict) and isinstance(err.get("code"), int):
            raise errors.from_code(err["code"], str(err.get("message", "")))
        raise errors.InternalError(f"malformed error in response: {err!r}"[:500])
    if not isinstance(answer, dict) or "result" not in answer:
        raise errors.InternalError(f"malformed response: {answer!r}"[:500])
    return answer["result"]


def _translate(failure: Failure):
    if failure.check(error.ConnectionLost, error.ConnectionDone):
        raise Disconnected(f"connection lost: {failure.getErrorMessage()}")
    if failure.check(amp.RemoteAmpError):
        raise errors.InternalError(f"server failed the AMP command: {failure.getErrorMessage()}")
    return failure


@implementer(ISession)
class AmpClientProtocol(amp.AMP):
    """One AMP connection of a L{Client}."""

    def __init__(self, client: Client):
        super().__init__()
        self.client = client
        self.events_subscribed = False
        self._ready = False

    def connectionMade(self) -> None:
        super().connectionMade()
        # Always speak first: the server picks the protocol from our first
        # bytes (and drops a silent client), and an answer proves the link.
        # Subscribe(False) is a harmless greeting when nobody wants events.
        wanted = self.client.wants_events
        d = self.callRemote(Subscribe, subscribe=wanted)

        def answered(_):
            self.events_subscribed = wanted
            self._now_ready()
        d.addCallbacks(answered, lambda f: self.transport.abortConnection())

    def _now_ready(self) -> None:
        self._ready = True
        self.client.session_ready(self)

    def connectionLost(self, reason: Failure) -> None:
        self._ready = False
        super().connectionLost(reason)
        self.client.session_lost(self, reason)

    @Event.responder
    def event(self, method: str, params: Any) -> dict:
        self.client.event_received(method, params)
        return {}

    # -- ISession

    def call(self, method: str, params: Any, flow_id: str | None) -> defer.Deferred:
        if not self._ready:
            return defer.fail(Disconnected("not connected"))
        kw = {"method": method, "params": {} if params is None else params}
        if flow_id is not None:
            kw["flow_id"] = flow_id
        try:
            d = self.callRemote(Call, **kw)
        except (TypeError, ValueError) as e:
            return defer.fail(errors.InvalidParams(f"params are not JSON: {e}"))
        return d.addCallbacks(_unwrap, _translate)

    def subscribe_events(self) -> defer.Deferred:
        def done(_):
            self.events_subscribed = True
        return self.callRemote(Subscribe, subscribe=True).addCallbacks(done, _translate)

    def disconnect(self) -> None:
        pass


def protocol_maker():
    """The per-connection protocol factory function for L{Client}."""
    return AmpClientProtocol
