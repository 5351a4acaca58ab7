"""
A QMP (QEMU Machine Protocol) client.

QMP is newline-delimited JSON over the monitor's UNIX socket: QEMU greets,
the client negotiates capabilities, then sends commands tagged with an C{id}
that QEMU echoes in the reply; asynchronous events are interleaved with the
replies.  The agent keeps one connection per VM and, after a crash or an
upgrade re-exec, simply connects again to the socket of the still-running QEMU
(a C{server=on} chardev accepts a new client once the previous one is gone).

QEMU is trusted but may be buggy: a malformed or oversized line drops the
connection (every pending call fails with L{QMPDisconnected}) and never raises
into the agent.  No call can hang: each either gets its reply, times out, or
fails when the connection goes.
"""

from __future__ import annotations

import itertools
import json
from typing import Any, Callable, Optional

from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import UNIXClientEndpoint, connectProtocol
from twisted.internet.error import ConnectError, ConnectionDone
from twisted.internet.interfaces import IReactorTime
from twisted.internet.protocol import Protocol
from twisted.internet.task import deferLater
from twisted.logger import Logger
from twisted.python.failure import Failure

__all__ = [
    "QMPFailure", "QMPError", "QMPTimeout", "QMPDisconnected", "QMPProtocolError",
    "QMPProtocol", "connect_qmp", "MAX_LINE_LENGTH",
]

#: Longest line accepted from QEMU: large query results fit, a runaway stream does not.
MAX_LINE_LENGTH = 16 * 1024 * 1024

EventHandler = Callable[[str, dict, Optional[float]], None]


class QMPFailure(Exception):
    """Base of every failure of a QMP call."""


class QMPError(QMPFailure):
    """QEMU answered a command with C{{"error": {"class": cls, "desc": desc}}}."""

    def __init__(self, cls: str, desc: str):
        super().__init__(cls, desc)
        self.cls = cls
        self.desc = desc

    def __str__(self) -> str:
        return f"{self.cls}: {self.desc}"


class QMPTimeout(QMPFailure, TimeoutError):
    """No reply (or no connection) within the allowed time."""

    def __init__(self, command: str, timeout: float, detail: str = ""):
        super().__init__(command, timeout, detail)
        self.command = command
        self.timeout = timeout
        self.detail = detail

    def __str__(self) -> str:
        extra = f" ({self.detail})" if self.detail else ""
        return f"QMP {self.command} timed out after {self.timeout:g}s{extra}"


class QMPDisconnected(QMPFailure):
    """The QMP connection is gone (or went away before the reply)."""


class QMPProtocolError(QMPFailure):
    """QEMU sent something that is not QMP (garbage, oversized line, bad greeting)."""


class _OneShot:
    """A result delivered once to any number of independent Deferreds."""

    _unset = object()

    def __init__(self) -> None:
        self._result: Any = self._unset
        self._waiters: list[Deferred] = []

    @property
    def fired(self) -> bool:
        return self._result is not self._unset

    def when(self) -> Deferred:
        d: Deferred = Deferred()
        if self.fired:
            self._deliver(d)
        else:
            self._waiters.append(d)
        return d

    def fire(self, result: Any) -> None:
        if self.fired:
            return
        self._result = result
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            self._deliver(d)

    def _deliver(self, d: Deferred) -> None:
        if isinstance(self._result, Failure):
            d.errback(self._result)
        else:
            d.callback(self._result)


class _Pending:
    __slots__ = ("command", "deferred", "timer")

    def __init__(self, command: str, deferred: Deferred, timer: Any):
        self.command = command
        self.deferred = deferred
        self.timer = timer


class QMPProtocol(Protocol):
    """
    One QMP connection.

    Public state for the owner:
      - C{ready}: fires with QEMU's version dict once capabilities are negotiated
        (fails with L{QMPDisconnected}/L{QMPProtocolError}/L{QMPError});
        L{when_ready} gives more such Deferreds.
      - C{closed}: fires (never fails) with the exception that ended the
        connection; L{when_closed} gives more such Deferreds.
      - C{event_handler(name, data, timestamp)}: called for each event; timestamp
        is QEMU's event time in seconds (float) or None.
      - C{connection_lost(reason: Failure)}: optional callback.
    """

    log = Logger()

    def __init__(self, clock: IReactorTime | None = None,
                 max_line_length: int = MAX_LINE_LENGTH, name: str = "qmp"):
        if clock is None:
            from twisted.internet import reactor as clock  # type: ignore[assignment]
        self._clock = clock
        self.max_line_length = max_line_length
        self.name = name
        self.event_handler: EventHandler | None = None
        self.connection_lost: Callable[[Failure], None] | None = None
        self.version: dict | None = None
        self.capabilities: list = []
        self._ready = _OneShot()
        self._closed = _OneShot()
        self.ready: Deferred = self._ready.when()
        self.closed: Deferred = self._closed.when()
        self._ids = itertools.count(1)
        # id -> _Pending, or None once the caller gave up (timeout/cancel):
        # the id stays reserved so a late reply is recognised and dropped.
        self._pending: dict[int, _Pending | None] = {}
        self._buffer = bytearray()
        self._scanned = 0
        self._greeted = False
        self._connected = False
        self._broken = False

    # -- owner API -------------------------------------------------------

    @property
    def is_connected(self) -> bool:
        """True while calls can be sent (connected, not dropped for bad input)."""
        return self._connected and not self._broken

    def when_ready(self) -> Deferred:
        return self._ready.when()

    def when_closed(self) -> Deferred:
        return self._closed.when()

    def close(self) -> Deferred:
        """Drop the connection (QEMU keeps running); fires once it is closed."""
        if self.transport is not None and self._connected:
            self.transport.loseConnection()
        return self.when_closed()

    def execute(self, command: str, arguments: dict | None = None,
                timeout: float | None = None, fd: int | None = None) -> Deferred:
        """
        Run one QMP command; fires with its C{return} value.

        Fails with L{QMPError} (QEMU refused), L{QMPTimeout} (no reply within
        C{timeout} seconds), or L{QMPDisconnected}.  Cancelling the Deferred
        abandons the call like a timeout does.  C{fd} travels with the command
        (SCM_RIGHTS), as C{getfd} and C{add-fd} expect.
        """
        if not self.is_connected:
            return _failed(QMPDisconnected(f"QMP {self.name}: not connected ({command})"))
        cid = next(self._ids)
        message: dict[str, Any] = {"execute": command, "id": cid}
        if arguments is not None:
            message["arguments"] = arguments
        try:
            line = json.dumps(message, separators=(",", ":")).encode("utf-8") + b"\n"
        except (TypeError, ValueError) as e:
            return _failed(TypeError(f"QMP {command}: arguments are not JSON: {e}"))

        def abandon(d: Deferred) -> None:
            self._abandon(cid)

        d: Deferred = Deferred(canceller=abandon)
        timer = None
        if timeout is not None:
            timer = self._clock.callLater(timeout, self._timed_out, cid, timeout)
        self._pending[cid] = _Pending(command, d, timer)
        if fd is not None:
            self.transport.sendFileDescriptor(fd)
        self.transport.write(line)
        return d

    # -- helpers used by the driver ---------------------------------------

    def query_status(self, timeout: float | None = None) -> Deferred:
        """The run state: "running", "paused", "prelaunch", "shutdown", ..."""
        return self.execute("query-status", timeout=timeout).addCallback(lambda r: r["status"])

    def cont(self, timeout: float | None = None) -> Deferred:
        return self.execute("cont", timeout=timeout)

    def stop(self, timeout: float | None = None) -> Deferred:
        return self.execute("stop", timeout=timeout)

    def system_reset(self, timeout: float | None = None) -> Deferred:
        return self.execute("system_reset", timeout=timeout)

    def system_powerdown(self, timeout: float | None = None) -> Deferred:
        return self.execute("system_powerdown", timeout=timeout)

    def quit(self, timeout: float | None = None) -> Deferred:
        """Ask QEMU to exit; losing the connection before the reply counts as done."""
        d = self.execute("quit", timeout=timeout)
        d.addErrback(lambda f: f.trap(QMPDisconnected) and None)
        return d

    def set_password(self, protocol: str, password: str, connected: str = "keep",
                     timeout: float | None = None) -> Deferred:
        """Set the VNC/SPICE ticket.

        QEMU takes C{connected} (what happens to open sessions) for SPICE only;
        VNC keeps its sessions whatever is asked.
        """
        arguments = {"protocol": protocol, "password": password}
        if protocol == "spice":
            arguments["connected"] = connected
        return self.execute("set_password", arguments, timeout=timeout)

    def expire_password(self, protocol: str, time: str | int,
                        timeout: float | None = None) -> Deferred:
        """C{time}: "now", "never", "+SECONDS" or an absolute UNIX time."""
        return self.execute("expire_password", {"protocol": protocol, "time": str(time)},
                            timeout=timeout)

    def query_blockstats(self, timeout: float | None = None) -> Deferred:
        return self.execute("query-blockstats", timeout=timeout)

    def query_block(self, timeout: float | None = None) -> Deferred:
        return self.execute("query-block", timeout=timeout)

    def change_medium(self, device_id: str, filename: str | None, format: str = "raw",
                      timeout: float | None = None) -> Deferred:
        """Insert C{filename} into the removable device with qdev id C{device_id};
        C{None} ejects (forcibly: the guest may have locked the tray)."""
        if filename is None:
            return self.eject(device_id, force=True, timeout=timeout)
        return self.execute("blockdev-change-medium",
                            {"id": device_id, "filename": filename, "format": format},
                            timeout=timeout)

    def eject(self, device_id: str, force: bool = True, timeout: float | None = None) -> Deferred:
        return self.execute("eject", {"id": device_id, "force": force}, timeout=timeout)

    def query_cpus_fast(self, timeout: float | None = None) -> Deferred:
        return self.execute("query-cpus-fast", timeout=timeout)

    def query_balloon(self, timeout: float | None = None) -> Deferred:
        return self.execute("query-balloon", timeout=timeout)

    # -- Protocol -----------------------------------------------------------

    def connectionMade(self) -> None:
        self._connected = True

    def dataReceived(self, data: bytes) -> None:
        if self._broken:
            return
        buf = self._buffer
        buf += data
        start = 0
        while not self._broken:
            nl = buf.find(b"\n", max(start, self._scanned))
            if nl < 0:
                break
            line = bytes(buf[start:nl])
            start = nl + 1
            self._scanned = start
            if len(line) > self.max_line_length:
                self._drop(f"line of {len(line)} bytes exceeds {self.max_line_length}")
                return
            line = line.strip()
            if line:
                self._line_received(line)
        if self._broken:
            return
        del buf[:start]
        self._scanned = len(buf)
        if len(buf) > self.max_line_length:
            self._drop(f"unterminated line exceeds {self.max_line_length} bytes")

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self._connected = False
        self._buffer = bytearray()
        pending, self._pending = self._pending, {}
        for cid, call in pending.items():
            if call is None:
                continue
            if call.timer is not None and call.timer.active():
                call.timer.cancel()
            call.deferred.errback(QMPDisconnected(
                f"QMP {self.name}: connection lost before the reply to {call.command}"))
        if not self._ready.fired:
            self._ready.fire(Failure(QMPDisconnected(
                f"QMP {self.name}: connection lost before negotiation: {reason.getErrorMessage()}")))
        self._closed.fire(reason.value)
        if self.connection_lost is not None:
            try:
                self.connection_lost(reason)
            except Exception:
                self.log.failure("QMP {name}: connection_lost callback failed", name=self.name)

    # -- internals ----------------------------------------------------------

    def _drop(self, why: str) -> None:
        """QEMU sent something we cannot follow: stop reading and hang up."""
        if self._broken:
            return
        self._broken = True
        self._buffer = bytearray()
        self.log.error("QMP {name}: protocol error, dropping the connection: {why}",
                       name=self.name, why=why)
        if not self._ready.fired:
            self._ready.fire(Failure(QMPProtocolError(f"QMP {self.name}: {why}")))
        if self.transport is not None:
            self.transport.abortConnection()

    def _line_received(self, line: bytes) -> None:
        try:
            message = json.loads(line)
        except (ValueError, RecursionError) as e:
            self._drop(f"malformed JSON ({e}): {line[:200]!r}")
            return
        if not isinstance(message, dict):
            self._drop(f"not a JSON object: {line[:200]!r}")
            return
        if not self._greeted:
            self._greeting(message)
        elif "event" in message:
            self._event(message)
        elif "return" in message or "error" in message:
            self._reply(message)
        else:
            self.log.warn("QMP {name}: ignoring unexpected message {message!r}",
                          name=self.name, message=line[:200])

    def _greeting(self, message: dict) -> None:
        greeting = message.get("QMP")
        if not isinstance(greeting, dict) or not isinstance(greeting.get("version"), dict):
            self._drop(f"expected the QMP greeting, got {json.dumps(message)[:200]}")
            return
        self._greeted = True
        self.version = greeting["version"]
        caps = greeting.get("capabilities")
        self.capabilities = caps if isinstance(caps, list) else []

        def negotiated(_: Any) -> None:
            self._ready.fire(self.version)

        def refused(f: Failure) -> None:
            if f.check(QMPError):
                self.log.error("QMP {name}: capabilities negotiation refused: {error}",
                               name=self.name, error=f.getErrorMessage())
                if self.transport is not None:
                    self.transport.abortConnection()
            self._ready.fire(f)

        self.execute("qmp_capabilities").addCallbacks(negotiated, refused)

    def _event(self, message: dict) -> None:
        name = message.get("event")
        data = message.get("data")
        if not isinstance(name, str):
            self.log.warn("QMP {name}: ignoring event without a name", name=self.name)
            return
        if not isinstance(data, dict):
            data = {}
        timestamp = None
        stamp = message.get("timestamp")
        if isinstance(stamp, dict):
            try:
                timestamp = float(stamp.get("seconds", 0)) + float(stamp.get("microseconds", 0)) / 1e6
            except (TypeError, ValueError):
                timestamp = None
        handler = self.event_handler
        if handler is None:
            self.log.debug("QMP {name}: event {event} (no handler)", name=self.name, event=name)
            return
        try:
            handler(name, data, timestamp)
        except Exception:
            self.log.failure("QMP {name}: event handler failed for {event}",
                             name=self.name, event=name)

    def _reply(self, message: dict) -> None:
        cid = message.get("id")
        try:
            call = self._pending.pop(cid)
        except (KeyError, TypeError):
            self.log.warn("QMP {name}: reply with unknown id {id!r} dropped",
                          name=self.name, id=cid)
            return
        if call is None:
            self.log.info("QMP {name}: late reply to abandoned call {id} dropped",
                          name=self.name, id=cid)
            return
        if call.timer is not None and call.timer.active():
            call.timer.cancel()
        if "error" in message:
            error = message["error"]
            if isinstance(error, dict):
                exc = QMPError(str(error.get("class", "GenericError")), str(error.get("desc", "")))
            else:
                exc = QMPError("GenericError", repr(error))
            call.deferred.errback(exc)
        else:
            call.deferred.callback(message["return"])

    def _timed_out(self, cid: int, timeout: float) -> None:
        call = self._pending.get(cid)
        if call is None:
            return
        self._pending[cid] = None
        call.deferred.errback(QMPTimeout(call.command, timeout))

    def _abandon(self, cid: int) -> None:
        call = self._pending.get(cid)
        if call is None:
            return
        if self._connected:
            self._pending[cid] = None
        else:
            del self._pending[cid]
        if call.timer is not None and call.timer.active():
            call.timer.cancel()


def _failed(exc: BaseException) -> Deferred:
    d: Deferred = Deferred()
    d.errback(exc)
    return d


#: Pause between attempts while QEMU has not created/opened its socket yet.
RETRY_INTERVAL = 0.05


def connect_qmp(reactor: Any, path: str, timeout: float = 10.0,
                event_handler: EventHandler | None = None) -> Deferred:
    """
    Connect to the QMP socket at C{path} and negotiate; fires with a ready
    L{QMPProtocol}.

    Retries while the socket does not exist or refuses (QEMU creates it shortly
    after exec).  Fails with L{QMPTimeout} if no negotiated connection within
    C{timeout} seconds -- also when QEMU does not greet, e.g. because another
    client still holds its single monitor connection.  C{event_handler} is
    installed before negotiation so no event is missed.
    """
    return Deferred.fromCoroutine(_connect(reactor, path, timeout, event_handler))


async def _connect(reactor: Any, path: str, timeout: float,
                   event_handler: EventHandler | None) -> QMPProtocol:
    deadline = reactor.seconds() + timeout
    while True:
        remaining = deadline - reactor.seconds()
        proto = QMPProtocol(clock=reactor, name=path)
        proto.event_handler = event_handler
        endpoint = UNIXClientEndpoint(reactor, path, timeout=max(1, int(remaining + 1)))
        try:
            await connectProtocol(endpoint, proto)
            break
        except ConnectError as e:
            if reactor.seconds() + RETRY_INTERVAL >= deadline:
                raise QMPTimeout(f"connect {path}", timeout, str(e)) from e
            await deferLater(reactor, RETRY_INTERVAL, lambda: None)

    expired = []

    def expire() -> None:
        expired.append(True)
        proto.transport.abortConnection()

    timer = reactor.callLater(max(0.0, deadline - reactor.seconds()), expire)
    try:
        await proto.when_ready()
    except QMPFailure as e:
        proto.ready.addErrback(lambda _: None)  # reported here; proto is never handed out
        if proto.is_connected:
            proto.transport.abortConnection()
        if expired:
            raise QMPTimeout(f"negotiate {path}", timeout, "no QMP greeting") from e
        raise
    except CancelledError:
        proto.ready.addErrback(lambda _: None)
        proto.transport.abortConnection()
        raise
    finally:
        if timer.active():
            timer.cancel()
    return proto
