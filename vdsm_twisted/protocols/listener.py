"""
The engine port: mutual TLS, then STOMP or AMP chosen from the first bytes.

Layers, outside in: a connection limit at accept, TLS (L{tls.MutualTLS}),
the sniffer (L{sniff.ProtocolSniffer}), then one of the two API protocols,
which share the agent's L{Api} through one L{JsonRpcServer} (STOMP) or
directly (AMP), and get events from the agent's L{EventBus}.
"""

from __future__ import annotations

import os

from typing import Any, Callable

from twisted.application.service import Service
from twisted.internet import defer
from twisted.internet.endpoints import TCP4ServerEndpoint, TCP6ServerEndpoint
from twisted.internet.interfaces import IListeningPort, IProtocol
from twisted.logger import Logger
from twisted.protocols.tls import BufferingTLSTransport, TLSMemoryBIOFactory

from vdsm_twisted.api.events import EventBus
from vdsm_twisted.api.jsonrpc import JsonRpcServer
from vdsm_twisted.api.registry import Api
from vdsm_twisted.common.config import Config
from vdsm_twisted.protocols import sniff
from vdsm_twisted.protocols.amp_server import AmpEventHub, EngineAMP
from vdsm_twisted.protocols.tls import MutualTLS

#: (event sink for the bus, builder of one STOMP connection's protocol)
StompSide = tuple[Callable[[str, dict], None], Callable[[], IProtocol]]


def stomp_side(config: Config, rpc: JsonRpcServer, reactor: Any) -> StompSide:
    """The agent's STOMP broker and a builder of its connections (imported late)."""
    from vdsm_twisted.protocols.stomp.server import StompBroker, StompServerProtocol

    broker = StompBroker(config["addresses", "request_queues"],
                         config["addresses", "response_queue"],
                         config["addresses", "event_queue"])
    max_size = config["limits", "max_message_size"]
    max_pending = config["limits", "max_pending_requests"]

    def build() -> IProtocol:
        return StompServerProtocol(broker, rpc, max_size, max_pending, clock=reactor)

    return broker.event_sink, build


class _TrackedTLS(BufferingTLSTransport):
    """A TLS connection whose end can be awaited (for a bounded stopService)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.lost = defer.Deferred()

    def connectionLost(self, reason):
        try:
            super().connectionLost(reason)
        finally:
            self.lost.callback(None)


class LimitedTLSFactory(TLSMemoryBIOFactory):
    """TLS server factory refusing connections beyond C{max_connections} at accept."""

    log = Logger()
    protocol = _TrackedTLS

    def __init__(self, creator: MutualTLS, wrapped: Any, max_connections: int, clock: Any):
        super().__init__(creator, False, wrapped, clock)
        self.max_connections = max_connections

    def buildProtocol(self, addr):
        if len(self.protocols) >= self.max_connections:
            self.log.warn("refusing connection from {host}:{port}: {n} connections open (max_connections)",
                          host=getattr(addr, "host", "?"), port=getattr(addr, "port", "?"),
                          n=len(self.protocols))
            return None  # the reactor closes the socket
        return super().buildProtocol(addr)


class EngineListenerService(Service):
    """
    Listens on [addresses] management_ip:management_port.  C{listening}
    fires with the L{IListeningPort} once bound (or fails, e.g. port in use);
    C{port} is then the bound port number.
    """

    name = "engine-listener"
    log = Logger()

    def __init__(self, config: Config, api: Api, bus: EventBus, reactor: Any = None,
                 stomp_factory: Callable[[Config, JsonRpcServer, Any], StompSide] = stomp_side):
        if reactor is None:
            from twisted.internet import reactor  # type: ignore[no-redef]
        self.config = config
        self.api = api
        self.bus = bus
        self.reactor = reactor
        self.rpc = JsonRpcServer(api, config["limits", "max_batch_size"])
        self.amp_hub = AmpEventHub()
        self._stomp_factory = stomp_factory
        self.tls: MutualTLS | None = None
        self.factory: LimitedTLSFactory | None = None
        self.port: int | None = None
        self.listening: defer.Deferred | None = None
        self._listening_port: IListeningPort | None = None
        self._remove_sinks: list[Callable[[], None]] = []
        #: A listening socket inherited across an upgrade re-exec, to adopt
        #: instead of binding: connections queued in its backlog meanwhile
        #: are served, none is refused.
        self.adopt: dict | None = None

    def _build_amp(self) -> IProtocol:
        return EngineAMP(self.api, self.amp_hub,
                         self.config["limits", "max_message_size"],
                         self.config["limits", "max_pending_requests"])

    def startService(self) -> None:
        config = self.config
        # Unreadable TLS files fail startService itself: no point listening.
        self.tls = MutualTLS.from_config(config)
        stomp_sink, build_stomp = self._stomp_factory(config, self.rpc, self.reactor)
        super().startService()
        self._remove_sinks = [self.bus.add_sink(stomp_sink),
                              self.bus.add_sink(self.amp_hub.event_sink)]
        sniffer = sniff.SniffingFactory(
            {sniff.STOMP: build_stomp, sniff.AMP: self._build_amp},
            config["tls", "handshake_timeout"], self.reactor)
        self.factory = LimitedTLSFactory(self.tls, sniffer,
                                         config["limits", "max_connections"], self.reactor)
        ip = config["addresses", "management_ip"]
        if self.adopt is not None:
            fd, family = self.adopt["fd"], self.adopt["family"]
            try:
                port = self.reactor.adoptStreamPort(fd, family, self.factory)
            finally:
                os.close(fd)  # adoptStreamPort works on its own dup
            self.listening = defer.succeed(port)
            self.listening.addCallback(self._bound)
            return
        endpoint_type = TCP6ServerEndpoint if ":" in ip else TCP4ServerEndpoint
        endpoint = endpoint_type(self.reactor, config["addresses", "management_port"],
                                 backlog=config["addresses", "backlog"], interface=ip)
        self.listening = endpoint.listen(self.factory)
        self.listening.addCallbacks(self._bound, self._bind_failed, errbackArgs=(ip,))

    def _bound(self, port: IListeningPort) -> IListeningPort:
        self._listening_port = port
        self.port = port.getHost().port
        self.log.info("engine API listening on {ip} port {port} (mutual TLS: STOMP, AMP)",
                      ip=self.config["addresses", "management_ip"], port=self.port)
        return port

    def _bind_failed(self, failure, ip):
        self.log.critical("cannot listen on {ip} port {port}: {error}", ip=ip,
                          port=self.config["addresses", "management_port"],
                          error=failure.getErrorMessage())
        return failure

    def reload_tls(self, config=None) -> None:
        """Re-read cert, key and CA (at C{config}'s paths, when given) for new
        connections; raises, keeping the old, on failure."""
        if self.tls is None:
            raise RuntimeError("the engine listener is not started")
        self.tls.reload(config)

    # -- upgrade re-exec support
    def pause_accepting(self) -> None:
        """Leave new connections in the kernel's backlog (not refused)."""
        if self._listening_port is not None:
            self._listening_port.stopReading()

    def resume_accepting(self) -> None:
        if self._listening_port is not None:
            self._listening_port.startReading()

    def handoff(self) -> list[dict]:
        """The listening socket(s) the next image adopts."""
        if self._listening_port is None:
            return []
        sock = self._listening_port.socket
        return [{"fd": sock.fileno(), "family": int(sock.family), "name": "engine"}]

    def close_connections(self, timeout: float) -> defer.Deferred:
        """Close every client connection (flushing what was written), abort
        the ones still open after C{timeout}; fires when all are gone."""
        protocols = list(self.factory.protocols) if self.factory is not None else []
        lost = [proto.lost for proto in protocols]
        for proto in protocols:
            proto.transport.loseConnection()

        def abort_rest():
            for proto in protocols:
                if not proto.lost.called:
                    proto.abortConnection()

        timer = self.reactor.callLater(timeout, abort_rest)
        d = defer.gatherResults(lost, consumeErrors=True)
        d.addBoth(lambda r: timer.active() and timer.cancel())
        return d

    @property
    def connections(self) -> int:
        return len(self.factory.protocols) if self.factory is not None else 0

    def stopService(self) -> defer.Deferred:
        super().stopService()
        for remove in self._remove_sinks:
            remove()
        self._remove_sinks = []
        if self.listening is not None and not self.listening.called:
            self.listening.cancel()
        port, self._listening_port = self._listening_port, None
        d = defer.maybeDeferred(port.stopListening) if port is not None else defer.succeed(None)
        # Drop the open connections too: a stopped agent serves nobody.
        lost = []
        if self.factory is not None:
            for proto in list(self.factory.protocols):
                lost.append(proto.lost)
                proto.abortConnection()
        return defer.gatherResults([d, *lost]).addCallback(lambda _: None)

