"""
One port, several protocols: pick STOMP or AMP from a connection's first bytes.

VDSM serves STOMP (and, long ago, XML-RPC over HTTP) on port 54321 and tells
them apart by peeking at the first bytes after the TLS handshake.  We do the
same with STOMP and AMP: an AMP box starts with a 16-bit key length whose high
byte is always 0, which no STOMP frame can start with.  Anything else is
closed.  One timer covers the handshake and the first bytes, so a client that
connects and says nothing does not hold a connection slot.
"""

from __future__ import annotations

from typing import Callable, Mapping

from OpenSSL import SSL
from twisted.internet.interfaces import IDelayedCall, IHandshakeListener, IProtocol, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from vdsm_twisted.protocols.tls import peer_description

STOMP = "stomp"
AMP = "amp"

#: Client commands that may open a STOMP conversation (VDSM's list).
STOMP_COMMANDS = (b"CONNECT", b"STOMP", b"SEND", b"SUBSCRIBE", b"UNSUBSCRIBE", b"DISCONNECT")
_LONGEST = max(len(c) for c in STOMP_COMMANDS)
#: Heart-beat bytes tolerated before the first command word.
MAX_LEADING_EOLS = 256


def classify(data: bytes) -> str | None:
    """
    C{"stomp"}, C{"amp"}, C{""} (reject), or None when more bytes are
    needed to decide.
    """
    if not data:
        return None
    if data[:1] == b"\x00":
        return AMP
    rest = data.lstrip(b"\r\n")
    if not rest:
        return None if len(data) <= MAX_LEADING_EOLS else ""
    end = len(rest)
    for eol in (b"\n", b"\r"):
        index = rest.find(eol)
        if index != -1:
            end = min(end, index)
    word = rest[:end]
    if end < len(rest):  # the word is complete
        return STOMP if word in STOMP_COMMANDS else ""
    if len(word) <= _LONGEST and any(c.startswith(word) for c in STOMP_COMMANDS):
        return None
    return ""


@implementer(IHandshakeListener)
class ProtocolSniffer(Protocol):
    """
    Buffers the first bytes, builds the protocol they call for, then relays
    everything to it: it sees the same transport (the TLS one, so peer
    certificate and address work) as if it had been connected directly.
    """

    log = Logger()

    def __init__(self, builders: Mapping[str, Callable[[], IProtocol]],
                 timeout: float, clock: IReactorTime):
        self._builders = builders
        self._timeout = timeout
        self._clock = clock
        self._buffer = b""
        self._timer: IDelayedCall | None = None
        self._handshake_done = False
        self._closing = False
        #: The chosen protocol, once the first bytes arrived.
        self.inner: IProtocol | None = None
        self.chosen: str | None = None

    def connectionMade(self) -> None:
        self._timer = self._clock.callLater(self._timeout, self._timed_out)

    def handshakeCompleted(self) -> None:
        self._handshake_done = True
        self.log.debug("TLS handshake done with {peer}", peer=peer_description(self.transport))

    def _timed_out(self) -> None:
        self._timer = None
        stage = "first bytes" if self._handshake_done else "TLS handshake"
        self.log.warn("{peer}: no {stage} within {timeout}s, dropping the connection",
                      peer=peer_description(self.transport), stage=stage, timeout=self._timeout)
        self._closing = True
        self.transport.abortConnection()

    def _cancel_timer(self) -> None:
        if self._timer is not None and self._timer.active():
            self._timer.cancel()
        self._timer = None

    def dataReceived(self, data: bytes) -> None:
        if self.inner is not None:
            self.inner.dataReceived(data)
            return
        if self._closing:
            return
        self._buffer += data
        kind = classify(self._buffer)
        if kind is None:
            return
        self._cancel_timer()
        builder = self._builders.get(kind) if kind else None
        if builder is None:
            self.log.warn("{peer}: unknown protocol (first bytes {head!r}), closing",
                          peer=peer_description(self.transport), head=self._buffer[:16])
            self._closing = True
            self.transport.loseConnection()
            return
        self._hand_over(kind, builder)

    def _hand_over(self, kind: str, builder: Callable[[], IProtocol]) -> None:
        try:
            inner = builder()
        except Exception:
            self.log.failure("cannot build the {kind} protocol", kind=kind)
            self._closing = True
            self.transport.abortConnection()
            return
        self.log.info("{peer} speaks {kind}", peer=peer_description(self.transport), kind=kind)
        self.inner, self.chosen = inner, kind
        buffered, self._buffer = self._buffer, b""
        inner.makeConnection(self.transport)
        if buffered:
            inner.dataReceived(buffered)

    def connectionLost(self, reason: Failure) -> None:
        self._cancel_timer()
        if self.inner is not None:
            self.inner.connectionLost(reason)
        elif reason.check(SSL.Error):
            # A refused client certificate lands here: worth more than info.
            self.log.warn("{peer}: TLS handshake failed: {reason}",
                          peer=peer_description(self.transport), reason=reason.getErrorMessage())
        elif not self._closing:
            self.log.info("{peer}: closed before a protocol was chosen: {reason}",
                          peer=peer_description(self.transport), reason=reason.getErrorMessage())


class SniffingFactory(Factory):
    """Builds a L{ProtocolSniffer} per connection; C{builders} by protocol name."""

    noisy = False

    def __init__(self, builders: Mapping[str, Callable[[], IProtocol]],
                 timeout: float, clock: IReactorTime):
        self.builders = builders
        self.timeout = timeout
        self.clock = clock

    def buildProtocol(self, addr) -> ProtocolSniffer:
        proto = ProtocolSniffer(self.builders, self.timeout, self.clock)
        proto.factory = self
        return proto
