"""
The engine API over AMP (L{vdsm_twisted.protocols.amp_commands}).

Every answer to C{Call} has JSON-RPC's shape without the envelope, errors
included: an exception escaping an AMP responder would be an undeclared
error, which AMP answers by closing the connection, so the responder turns
every failure into an error response.  Limits protect the agent from one
client: boxes larger than C{max_message_size} abort that connection, calls
beyond C{max_pending_requests} in flight answer ServerBusy.
"""

from __future__ import annotations

import json
from typing import Any, Callable

from twisted.internet import defer
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.logger import Logger

from vdsm_twisted.api import errors
from vdsm_twisted.api.registry import Api, CallContext
from vdsm_twisted.protocols.amp_commands import Call, Event, Subscribe
from vdsm_twisted.protocols.tls import peer_description

#: AMP error code for a box whose arguments do not parse (connection stays up).
BAD_ARGUMENTS = b"BAD_ARGUMENTS"


def _error(error: errors.ApiError) -> dict:
    return {"response": {"error": error.to_dict()}}


def _result(result: Any) -> dict:
    # A verb that returns nothing answers true, as over JSON-RPC.
    result = True if result is None else result
    try:
        # BigJSON encodes after the responder returns, where a failure would
        # be an undeclared error; find out here instead.
        json.dumps(result, allow_nan=False)
    except (TypeError, ValueError) as e:
        return _error(errors.InternalError(f"result not serializable: {e}"))
    return {"response": {"result": result}}


class AmpEventHub:
    """
    The AMP connections that asked for events (one hub per agent);
    L{event_sink} is the EventBus sink that fans notifications out to them.
    """

    log = Logger()

    def __init__(self) -> None:
        self._subscribers: dict[int, amp.AMP] = {}

    def subscribe(self, connection: amp.AMP) -> None:
        self._subscribers[id(connection)] = connection

    def unsubscribe(self, connection: amp.AMP) -> None:
        self._subscribers.pop(id(connection), None)

    @property
    def subscribers(self) -> list[amp.AMP]:
        return list(self._subscribers.values())

    def event_sink(self, method: str, params: dict) -> None:
        for connection in self.subscribers:
            try:
                connection.callRemote(Event, method=method, params=params)
            except Exception:
                self.log.failure("cannot send event {method} to {peer}; unsubscribing it",
                                 method=method, peer=getattr(connection, "peer", "?"))
                self.unsubscribe(connection)


class EngineAMP(amp.AMP):
    """One engine connection speaking AMP."""

    log = Logger()

    def __init__(self, api: Api, amp_hub: AmpEventHub, max_message_size: int,
                 max_pending_requests: int):
        super().__init__()
        self.api = api
        self.hub = amp_hub
        self.max_message_size = max_message_size
        self.max_pending_requests = max_pending_requests
        self.peer = "unknown"
        self.pending = 0
        self._box_bytes = 0
        self._too_big = False

    def connectionMade(self) -> None:
        super().connectionMade()
        self.peer = peer_description(self.transport)

    def connectionLost(self, reason: Failure) -> None:
        self.hub.unsubscribe(self)
        super().connectionLost(reason)

    # -- size limit: count every key and value (2-byte length prefix each)
    # as it arrives, since BigJSON lets one box span any number of them.

    def stringReceived(self, string: bytes) -> None:
        if self._too_big:
            return
        self._box_bytes += len(string) + 2
        if self._box_bytes > self.max_message_size:
            self._too_big = True
            self.log.error("{peer}: AMP box larger than {limit} bytes, closing the connection",
                           peer=self.peer, limit=self.max_message_size)
            self.transport.abortConnection()
            return
        super().stringReceived(string)

    def ampBoxReceived(self, box: amp.AmpBox) -> None:
        self._box_bytes = 0
        super().ampBoxReceived(box)

    # -- bad arguments answer an error; they must not close the connection

    def locateResponder(self, name: bytes) -> Callable | None:
        responder = super().locateResponder(name)
        if responder is None:
            return None  # AMP answers UNHANDLED, the connection stays up

        def guarded(box):
            try:
                return responder(box)
            except Exception as e:
                self.log.warn("{peer}: bad arguments to {command}: {error}",
                              peer=self.peer, command=name, error=e)
                if name == Call.commandName:
                    return defer.succeed(Call.makeResponse(
                        _error(errors.InvalidParams(f"bad AMP arguments: {e}")), self))
                return defer.fail(amp.RemoteAmpError(BAD_ARGUMENTS, f"bad arguments: {e}", False))

        return guarded

    # -- the commands

    @Call.responder
    def call(self, method: str, params: Any, flow_id: str | None = None) -> Any:
        if self.pending >= self.max_pending_requests:
            self.log.warn("{peer}: {n} calls in flight, {method} answered ServerBusy (flow={flow})",
                          peer=self.peer, n=self.pending, method=method, flow=flow_id)
            return _error(errors.ServerBusy(
                f"more than {self.max_pending_requests} requests in flight"))
        self.pending += 1
        d = self.api.call(method, params, CallContext("amp", self.peer, flow_id))
        d.addCallbacks(_result, self._failed, errbackArgs=(method, flow_id))
        d.addBoth(self._done)
        return d

    def _failed(self, failure: Failure, method: str, flow_id: str | None) -> dict:
        if failure.check(errors.ApiError):
            return _error(failure.value)
        self.log.failure("{method} failed (flow={flow})", failure, method=method, flow=flow_id)
        return _error(errors.InternalError(f"{failure.type.__name__}: {failure.getErrorMessage()}"))

    def _done(self, response: Any) -> Any:
        self.pending -= 1
        return response

    @Subscribe.responder
    def subscribe(self, subscribe: bool) -> dict:
        if subscribe:
            self.hub.subscribe(self)
        else:
            self.hub.unsubscribe(self)
        self.log.info("{peer} {what} events", peer=self.peer,
                      what="subscribed to" if subscribe else "unsubscribed from")
        return {}
