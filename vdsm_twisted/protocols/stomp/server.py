"""
The engine API over STOMP 1.2, as VDSM serves it (PROTOCOL.md).

VDSM is its own tiny broker: clients SEND JSON-RPC requests to a request
queue and SUBSCRIBE to a reply queue of their choice and to the event queue.
L{StompBroker} is that broker (one per agent, shared by every connection);
L{StompServerProtocol} is one client connection.
"""

from __future__ import annotations

import json
from typing import Any, Sequence

from twisted.internet import defer
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure

from vdsm_twisted.api import errors, jsonrpc
from vdsm_twisted.api.registry import CallContext
from vdsm_twisted.protocols.stomp.frame import (
    CLIENT_COMMANDS, HEARTBEAT, Frame, FrameError, FrameParser, encode_frame,
)

#: Non-zero heart-beat values below this are raised to it (ms), as in VDSM.
MIN_HEARTBEAT_MS = 1000

# Headers of a SEND frame that are not passed on when it is forwarded.
_NOT_FORWARDED = frozenset({
    "destination", "content-type", "content-length", "subscription", "receipt", "transaction",
})


def error_frame(message: str) -> Frame:
    """An ERROR frame carrying its text both as header and as body."""
    body = message.encode("utf-8")
    return Frame("ERROR", (("message", message), ("content-length", str(len(body)))), body)


def _prefixes(destination: str):
    """C{"a.b.c"} -> C{"a"}, C{"a.b"}, C{"a.b.c"}: who subscribed to these hears it."""
    parts = destination.split(".")
    for i in range(1, len(parts) + 1):
        yield ".".join(parts[:i])


class StompBroker:
    """
    The subscription registry of the agent, shared by all connections.

    A subscriber of C{a.b} also receives what is published to C{a.b.c}.
    """

    log = Logger()

    def __init__(self, request_queues: Sequence[str], response_queue: str, event_queue: str):
        self.request_queues = tuple(request_queues)
        self.response_queue = response_queue
        self.event_queue = event_queue
        # destination -> [(connection, subscription id)], in subscription order
        self._subscribers: dict[str, list[tuple[Any, str]]] = {}

    def is_request_queue(self, destination: str) -> bool:
        return any(destination == q or destination.startswith(q + ".")
                   for q in self.request_queues)

    def subscribe(self, connection: Any, destination: str, sub_id: str) -> None:
        self._subscribers.setdefault(destination, []).append((connection, sub_id))

    def unsubscribe(self, connection: Any, destination: str, sub_id: str) -> None:
        subs = self._subscribers.get(destination, [])
        try:
            subs.remove((connection, sub_id))
        except ValueError:
            return
        if not subs:
            del self._subscribers[destination]

    def remove_connection(self, connection: Any) -> None:
        """Forget every subscription of C{connection}."""
        for destination in list(self._subscribers):
            subs = [s for s in self._subscribers[destination] if s[0] is not connection]
            if subs:
                self._subscribers[destination] = subs
            else:
                del self._subscribers[destination]

    def _matching(self, destination: str) -> list[tuple[Any, str]]:
        found = []
        for prefix in _prefixes(destination):
            found.extend(self._subscribers.get(prefix, ()))
        return found

    def has_subscribers(self, destination: str) -> bool:
        return bool(self._matching(destination))

    def publish(self, destination: str, body: bytes,
                headers: Sequence[tuple[str, str]] = ()) -> int:
        """Send a MESSAGE to every subscriber; returns how many got it."""
        subscribers = self._matching(destination)
        for connection, sub_id in subscribers:
            frame = Frame(
                "MESSAGE",
                (("destination", destination),
                 ("content-type", "application/json"),
                 ("subscription", sub_id),
                 *headers,
                 ("content-length", str(len(body)))),
                body)
            connection.send_frame(frame)
        if not subscribers:
            self.log.debug("no subscriber for {destination}, message dropped",
                           destination=destination)
        return len(subscribers)

    def event_sink(self, method: str, params: dict) -> None:
        """An L{EventBus} sink: events become notifications on the event queue."""
        self.publish(self.event_queue, jsonrpc.notification(method, params))


def _busy_response(body: bytes) -> bytes:
    """The JSON-RPC answer to a request refused for too many pending ones."""
    error = errors.ServerBusy().to_dict()

    def one(req_id):
        return {"jsonrpc": "2.0", "id": req_id, "error": error}

    def id_of(item):
        req_id = item.get("id") if isinstance(item, dict) else None
        return req_id if isinstance(req_id, (str, int)) and not isinstance(req_id, bool) else None

    try:
        message = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        message = None
    if isinstance(message, list) and len(message) > 1:
        return jsonrpc.encode([one(id_of(item)) for item in message])
    if isinstance(message, list):
        message = message[0] if message else None
    return jsonrpc.encode(one(id_of(message)))


class StompServerProtocol(Protocol):
    """One engine connection speaking STOMP 1.2 with JSON-RPC bodies."""

    log = Logger()

    def __init__(self, broker: StompBroker, rpc: jsonrpc.JsonRpcServer,
                 max_message_size: int, max_pending_requests: int,
                 clock: IReactorTime | None = None):
        if clock is None:
            from twisted.internet import reactor as clock
        self.broker = broker
        self.rpc = rpc
        self.max_pending_requests = max_pending_requests
        self.clock = clock
        self._parser = FrameParser(max_message_size, CLIENT_COMMANDS)
        self._connected = False
        self._closed = False
        self._subscriptions: dict[str, str] = {}  # id -> destination
        self.pending = 0
        self.peer = "unknown"
        self._send_interval = 0.0   # seconds; we send heartbeats this often
        self._recv_timeout = 0.0    # seconds; silence after which we close
        self._send_timer: IDelayedCall | None = None
        self._recv_timer: IDelayedCall | None = None

    # -- connection lifecycle

    def connectionMade(self) -> None:
        peer = self.transport.getPeer()
        host, port = getattr(peer, "host", None), getattr(peer, "port", None)
        self.peer = f"{host}:{port}" if host is not None else str(peer)

    def connectionLost(self, reason: Failure = None) -> None:
        if self._parser.has_partial_frame:
            self.log.warn("connection from {peer} lost with a truncated frame", peer=self.peer)
        self._closed = True
        self._cancel_timers()
        self.broker.remove_connection(self)
        self._subscriptions.clear()
        self.log.debug("STOMP connection from {peer} closed", peer=self.peer)

    def dataReceived(self, data: bytes) -> None:
        if self._closed:
            return
        if self._recv_timer is not None and self._recv_timer.active():
            self._recv_timer.reset(self._recv_timeout)
        try:
            frames = self._parser.feed(data)
        except FrameError as e:
            self.log.warn("bad frame from {peer}: {reason}", peer=self.peer, reason=e.message)
            self._fatal(e.message)
            return
        for frame in frames:
            if self._closed:
                return
            self._frame_received(frame)

    # -- writing

    def send_frame(self, frame: Frame) -> None:
        """Write one frame (the broker delivers MESSAGEs through this)."""
        if self._closed:
            return
        self._write(encode_frame(frame))

    def _write(self, data: bytes) -> None:
        self.transport.write(data)
        if self._send_interval and not self._closed:
            if self._send_timer is not None and self._send_timer.active():
                self._send_timer.reset(self._send_interval)
            else:
                self._send_timer = self.clock.callLater(self._send_interval, self._heartbeat)

    def _heartbeat(self) -> None:
        self._send_timer = None
        if not self._closed:
            self._write(HEARTBEAT)

    def _recv_timed_out(self) -> None:
        self._recv_timer = None
        self.log.warn("no heartbeat from {peer} for {seconds} s, closing",
                      peer=self.peer, seconds=self._recv_timeout)
        self._close(abort=True)

    def _cancel_timers(self) -> None:
        for timer in (self._send_timer, self._recv_timer):
            if timer is not None and timer.active():
                timer.cancel()
        self._send_timer = self._recv_timer = None

    def _close(self, abort: bool = False) -> None:
        """Stop serving this connection: no more reads, writes or deliveries."""
        if self._closed:
            return
        self._closed = True
        self._cancel_timers()
        self.broker.remove_connection(self)
        self._subscriptions.clear()
        if abort:
            self.transport.abortConnection()
        else:
            self.transport.loseConnection()

    def _error(self, message: str) -> None:
        self.send_frame(error_frame(message))

    def _fatal(self, message: str) -> None:
        self._error(message)
        self._close()

    def _receipt(self, frame: Frame) -> None:
        receipt = frame.header("receipt")
        if receipt is not None:
            self.send_frame(Frame("RECEIPT", (("receipt-id", receipt),)))

    # -- frames

    def _frame_received(self, frame: Frame) -> None:
        command = frame.command
        if command in ("CONNECT", "STOMP"):
            self._on_connect(frame)
            return
        if not self._connected:
            self.log.warn("{command} from {peer} before CONNECT", command=command, peer=self.peer)
            self._fatal("not connected")
            return
        handler = getattr(self, f"_on_{command.lower()}", None)
        if handler is None:
            self._fatal(f"unsupported command {command}")
            return
        handler(frame)

    def _on_connect(self, frame: Frame) -> None:
        if self._connected:
            self._fatal("already connected")
            return
        versions = [v.strip() for v in (frame.header("accept-version") or "").split(",")]
        if "1.2" not in versions:
            self.log.warn("{peer} does not accept STOMP 1.2 (accept-version: {versions})",
                          peer=self.peer, versions=frame.header("accept-version"))
            self._fatal("unsupported version, only STOMP 1.2 is supported")
            return
        try:
            cx, cy = self._heartbeat_values(frame.header("heart-beat", "0,0"))
        except ValueError:
            self._fatal("invalid heart-beat header")
            return
        self._connected = True
        # cx: how often the client will send; cy: how often it wants to hear from us.
        self.send_frame(Frame("CONNECTED", (("version", "1.2"), ("heart-beat", f"{cy},{cx}"))))
        self._send_interval = cy / 1000.0
        if self._send_interval:
            self._send_timer = self.clock.callLater(self._send_interval, self._heartbeat)
        if cx:
            self._recv_timeout = 2 * cx / 1000.0
            self._recv_timer = self.clock.callLater(self._recv_timeout, self._recv_timed_out)
        self.log.info("STOMP client {peer} connected (heart-beat {cx},{cy})",
                      peer=self.peer, cx=cx, cy=cy)

    @staticmethod
    def _heartbeat_values(value: str) -> tuple[int, int]:
        parts = value.split(",")
        if len(parts) != 2:
            raise ValueError(value)
        result = []
        for part in parts:
            part = part.strip()
            if not (part.isascii() and part.isdigit()):
                raise ValueError(value)
            ms = int(part)
            result.append(max(ms, MIN_HEARTBEAT_MS) if ms else 0)
        return result[0], result[1]

    def _on_subscribe(self, frame: Frame) -> None:
        destination, sub_id = frame.header("destination"), frame.header("id")
        if not destination or sub_id is None:
            self._error("SUBSCRIBE needs 'destination' and 'id' headers")
            return
        if sub_id in self._subscriptions:
            self._error(f"subscription id {sub_id} already in use")
            return
        self._subscriptions[sub_id] = destination
        self.broker.subscribe(self, destination, sub_id)
        self.log.debug("{peer} subscribed to {destination} as {id}",
                       peer=self.peer, destination=destination, id=sub_id)
        self._receipt(frame)

    def _on_unsubscribe(self, frame: Frame) -> None:
        sub_id = frame.header("id")
        destination = self._subscriptions.pop(sub_id, None)
        if destination is None:
            self.log.debug("{peer} unsubscribes unknown id {id}", peer=self.peer, id=sub_id)
        else:
            self.broker.unsubscribe(self, destination, sub_id)
        self._receipt(frame)

    def _on_disconnect(self, frame: Frame) -> None:
        self._receipt(frame)
        self._close()

    def _on_ack(self, frame: Frame) -> None:
        # Subscriptions are ack:auto; an ACK has nothing to confirm.
        pass

    _on_nack = _on_ack

    def _on_send(self, frame: Frame) -> None:
        destination = frame.header("destination")
        if not destination:
            self._error("SEND needs a 'destination' header")
            return
        if self.broker.is_request_queue(destination):
            self._request(frame)
        elif self.broker.has_subscribers(destination):
            extra = tuple((k, v) for k, v in frame.headers if k not in _NOT_FORWARDED)
            self.broker.publish(destination, frame.body, extra)
        else:
            self.log.debug("{peer} sent to {destination}: no subscriber",
                           peer=self.peer, destination=destination)
            self._error("Subscription not available")
            return
        self._receipt(frame)

    def _request(self, frame: Frame) -> None:
        reply_to = frame.header("reply-to") or self.broker.response_queue
        flow_id = frame.header("ovirtCorrelationId")
        if self.pending >= self.max_pending_requests:
            self.log.warn("{peer} has {n} requests pending, refusing one (flow={flow})",
                          peer=self.peer, n=self.pending, flow=flow_id)
            self.broker.publish(reply_to, _busy_response(frame.body))
            return
        self.log.debug("request from {peer} (flow={flow}, {size} bytes)",
                       peer=self.peer, flow=flow_id, size=len(frame.body))
        self.pending += 1
        context = CallContext("stomp", self.peer, flow_id=flow_id)
        d = defer.maybeDeferred(self.rpc.handle, frame.body, context)
        d.addErrback(self._rpc_failed, flow_id)
        d.addCallback(self._respond, reply_to, flow_id)
        d.addErrback(lambda f: self.log.failure("cannot send response (flow={flow})", f,
                                                flow=flow_id))

    def _rpc_failed(self, failure: Failure, flow_id: str | None) -> bytes:
        self.log.failure("JSON-RPC handling failed (flow={flow})", failure, flow=flow_id)
        return jsonrpc.encode({"jsonrpc": "2.0", "id": None,
                               "error": errors.InternalError().to_dict()})

    def _respond(self, response: bytes | None, reply_to: str, flow_id: str | None) -> None:
        self.pending -= 1
        if response is None:
            return
        delivered = self.broker.publish(reply_to, response)
        if not delivered:
            self.log.info("response for {peer} (flow={flow}) dropped: nobody subscribed to {dest}",
                          peer=self.peer, flow=flow_id, dest=reply_to)
