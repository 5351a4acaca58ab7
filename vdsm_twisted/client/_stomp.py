"""
The client side of VDSM's wire: JSON-RPC 2.0 over STOMP 1.2, speaking as
VDSM's own Python client does (PROTOCOL.md), so a server that works with
one works with the other.
"""

from __future__ import annotations

import json
import uuid
from typing import Any

from twisted.internet import defer
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol, connectionDone
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from vdsm_twisted.api import errors
from vdsm_twisted.client._base import Client, Disconnected, ISession
from vdsm_twisted.protocols.stomp.frame import (
    HEARTBEAT, SERVER_COMMANDS, Frame, FrameError, FrameParser, encode_frame)

REQUEST_QUEUE = "jms.topic.vdsm_requests"
EVENT_QUEUE = "jms.queue.events"
#: We cannot promise heart-beats, and want one from the server every 24 s.
HEART_BEAT = "0,24000"
#: Silence after which the connection is presumed dead (VDSM's client: 30 s).
DEAD_AFTER = 30.0
MAX_FRAME = 64 * 1024 * 1024


class ServerError(errors.ApiError):
    """The server answered with a STOMP ERROR frame instead of a response."""

    code, name = errors.GeneralError.code, "STOMP error"


def _response_error(error: Any) -> errors.ApiError:
    if isinstance(error, dict):
        code = error.get("code")
        message = error.get("message")
        if isinstance(code, int) and not isinstance(code, bool):
            return errors.from_code(code, str(message) if message is not None else "")
    return errors.InternalError(f"malformed error in response: {error!r}"[:500])


@implementer(ISession)
class StompClientProtocol(Protocol):
    """One STOMP connection of a L{Client}; fresh subscriptions each time."""

    _log = Logger()

    def __init__(self, client: Client, clock: IReactorTime, reply_queue: str | None = None):
        self.client = client
        self.clock = clock
        self.reply_queue = reply_queue or str(uuid.uuid4())
        self.events_subscribed = False
        self._parser = FrameParser(MAX_FRAME, SERVER_COMMANDS)
        self._pending: dict[str, defer.Deferred] = {}
        self._ready = False
        self._lost = False
        self._dead_after: float | None = DEAD_AFTER
        self._watchdog = None
        self._heartbeat = None

    # -- connection

    def connectionMade(self) -> None:
        self._send(Frame("CONNECT", (("accept-version", "1.2"), ("heart-beat", HEART_BEAT))))
        self._watchdog = self.clock.callLater(DEAD_AFTER, self._dead)

    def _send(self, frame: Frame) -> None:
        self.transport.write(encode_frame(frame))

    def _dead(self) -> None:
        self._watchdog = None
        self._log.warn("no data from the server for {s:g} s: reconnecting", s=self._dead_after)
        self._abort()

    def _abort(self) -> None:
        # Nothing more is read or sent on this connection.
        self._ready = False
        self._lost = True
        self.transport.abortConnection()

    def dataReceived(self, data: bytes) -> None:
        if self._watchdog is not None and self._watchdog.active():
            self._watchdog.reset(self._dead_after)
        try:
            frames = self._parser.feed(data)
        except FrameError as e:
            self._log.error("bad frame from the server: {error}", error=e.message)
            self._abort()
            return
        for frame in frames:
            handler = getattr(self, "frame_" + frame.command, None)
            if handler is not None:
                handler(frame)
            if self._lost:
                break

    def connectionLost(self, reason: Failure = connectionDone) -> None:
        self._lost = True
        self._ready = False
        for call in (self._watchdog, self._heartbeat):
            if call is not None and call.active():
                call.cancel()
        self._watchdog = self._heartbeat = None
        self.client.session_lost(self, reason)
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(Disconnected(f"connection lost: {reason.getErrorMessage()}"))

    # -- frames from the server

    def frame_CONNECTED(self, frame: Frame) -> None:
        sx, sy = _heart_beat(frame.header("heart-beat", "0,0"))
        # The server sends every sx ms; we asked for 24000.
        send_every = max(sx, 24000) if sx else 0
        if send_every:
            self._dead_after = max(DEAD_AFTER, 1.25 * send_every / 1000)
            self._watchdog.reset(self._dead_after)
        else:
            self._watchdog.cancel()
            self._watchdog = None
        if sy:
            # The server wants heart-beats from us: oblige, though we offered none.
            self._heartbeat = self.clock.callLater(max(sy, 1000) / 1000, self._beat, max(sy, 1000) / 1000)
        self._subscribe(self.reply_queue)
        self._subscribe(EVENT_QUEUE)
        self.events_subscribed = True
        self._ready = True
        self.client.session_ready(self)

    def _beat(self, every: float) -> None:
        self.transport.write(HEARTBEAT)
        self._heartbeat = self.clock.callLater(every, self._beat, every)

    def _subscribe(self, destination: str) -> None:
        self._send(Frame("SUBSCRIBE", (("destination", destination),
                                       ("id", str(uuid.uuid4())), ("ack", "auto"))))

    def frame_MESSAGE(self, frame: Frame) -> None:
        try:
            message = json.loads(frame.body)
        except (ValueError, UnicodeDecodeError) as e:
            self._log.error("MESSAGE with a body that is not JSON: {error}", error=e)
            return
        for item in message if isinstance(message, list) else [message]:
            self._dispatch(item)

    def _dispatch(self, item: Any) -> None:
        if not isinstance(item, dict):
            self._log.error("ignoring a message that is not an object: {item!r}", item=item)
            return
        if "id" not in item and isinstance(item.get("method"), str):
            self.client.event_received(item["method"], item.get("params"))
            return
        d = self._pending.pop(item.get("id"), None) if isinstance(item.get("id"), str) else None
        if d is None:
            if "error" in item:
                self._log.error("error for no pending call: {error!r}", error=item["error"])
            else:
                self._log.debug("response for no pending call: {id!r}", id=item.get("id"))
            return
        if "error" in item:
            d.errback(_response_error(item["error"]))
        else:
            d.callback(item.get("result"))

    def frame_ERROR(self, frame: Frame) -> None:
        message = frame.header("message") or "error"
        if frame.body:
            message += ": " + frame.body.decode("utf-8", "replace")[:1000]
        self._log.error("STOMP ERROR from the server: {message}", message=message)
        pending, self._pending = self._pending, {}
        for d in pending.values():
            d.errback(ServerError(message))

    def frame_RECEIPT(self, frame: Frame) -> None:
        pass

    # -- ISession

    def call(self, method: str, params: Any, flow_id: str | None) -> defer.Deferred:
        if not self._ready:
            return defer.fail(Disconnected("not connected"))
        call_id = str(uuid.uuid4())
        request = {"jsonrpc": "2.0", "method": method,
                   "params": {} if params is None else params, "id": call_id}
        try:
            body = json.dumps([request], separators=(",", ":"), allow_nan=False).encode("utf-8")
        except (TypeError, ValueError) as e:
            return defer.fail(errors.InvalidParams(f"params are not JSON: {e}"))
        headers = [("destination", REQUEST_QUEUE), ("reply-to", self.reply_queue),
                   ("content-type", "application/json")]
        if flow_id is not None:
            headers.append(("ovirtCorrelationId", flow_id))

        d = defer.Deferred(lambda _: self._pending.pop(call_id, None))
        self._pending[call_id] = d
        self._send(Frame("SEND", tuple(headers), body))
        return d

    def subscribe_events(self) -> defer.Deferred:
        # Every connection subscribes to the event queue, as VDSM's client does.
        return defer.succeed(None)

    def disconnect(self) -> None:
        if self._ready:
            self._send(Frame("DISCONNECT", (("receipt", str(uuid.uuid4())),)))


def _heart_beat(value: str) -> tuple[int, int]:
    try:
        sx, sy = (int(v) for v in value.split(","))
    except ValueError:
        return 0, 0
    return max(sx, 0), max(sy, 0)


def protocol_maker(clock: IReactorTime):
    """The per-connection protocol factory function for L{Client}."""
    reply_queue = str(uuid.uuid4())
    return lambda client: StompClientProtocol(client, clock, reply_queue)
