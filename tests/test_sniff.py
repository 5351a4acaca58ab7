"""Choosing STOMP or AMP from the first bytes on the engine port."""

from __future__ import annotations

import time

from twisted.internet import defer, protocol, reactor
from twisted.internet.endpoints import TCP4ClientEndpoint, connectProtocol
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial import unittest

from tests._pki_helpers import ListenerMixin, RawClient, good_client
from vdsm_twisted.protocols import sniff
from vdsm_twisted.protocols.amp_commands import Call


class Classify(unittest.TestCase):

    def test_stomp_commands(self):
        for data in (b"CONNECT\n", b"STOMP\r\n", b"SEND\ndestination:x\n", b"SUBSCRIBE\n",
                     b"UNSUBSCRIBE\n", b"DISCONNECT\n", b"\nCONNECT\n", b"\r\n\r\n\nCONNECT\r\n"):
            self.assertEqual(sniff.classify(data), sniff.STOMP, data)

    def test_amp(self):
        self.assertEqual(sniff.classify(b"\x00"), sniff.AMP)
        self.assertEqual(sniff.classify(b"\x00\x04_ask"), sniff.AMP)

    def test_need_more(self):
        for data in (b"", b"\n", b"\r\n", b"C", b"CONN", b"CONNECT", b"\nUNSUBSCRIB", b"S"):
            self.assertIsNone(sniff.classify(data), data)

    def test_rejects(self):
        for data in (b"GET / HTTP/1.1\r\n", b"PUT /", b"G", b"junk", b"\x16\x03\x01",
                     b"CONNECTX\n", b"CONNECTED\n", b"connect\n", b"\xff", b"SENDER",
                     b"\n" * (sniff.MAX_LEADING_EOLS + 1)):
            self.assertEqual(sniff.classify(data), "", data)


class Recorder(protocol.Protocol):
    def __init__(self):
        self.data = b""
        self.made = False
        self.lost = None

    def connectionMade(self):
        self.made = True

    def dataReceived(self, data):
        self.data += data

    def connectionLost(self, reason):
        self.lost = reason


class SnifferUnit(unittest.TestCase):
    """The sniffer alone, on a fake transport and clock."""

    def setUp(self):
        self.clock = Clock()
        self.built = []

        def builder():
            p = Recorder()
            self.built.append(p)
            return p

        self.sniffer = sniff.ProtocolSniffer({sniff.STOMP: builder, sniff.AMP: builder}, 10, self.clock)
        self.transport = StringTransport()
        self.sniffer.makeConnection(self.transport)

    def test_hand_over_with_buffered_bytes(self):
        self.sniffer.dataReceived(b"\r\nCON")
        self.assertEqual(self.built, [])
        self.sniffer.dataReceived(b"NECT\naccept-version:1.2\n")
        (inner,) = self.built
        self.assertTrue(inner.made)
        self.assertIs(inner.transport, self.transport)
        self.assertEqual(inner.data, b"\r\nCONNECT\naccept-version:1.2\n")
        self.sniffer.dataReceived(b"\n\x00")
        self.assertEqual(inner.data, b"\r\nCONNECT\naccept-version:1.2\n\n\x00")
        self.assertEqual(self.sniffer.chosen, sniff.STOMP)
        # the timer no longer runs
        self.clock.advance(100)
        self.assertFalse(self.transport.disconnecting)
        self.sniffer.connectionLost(protocol.connectionDone)
        self.assertIsNotNone(inner.lost)

    def test_timeout_before_first_bytes(self):
        self.sniffer.dataReceived(b"\n")
        self.clock.advance(9.9)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(0.2)
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.built, [])

    def test_reject_closes(self):
        self.sniffer.dataReceived(b"GET / HTTP/1.1\r\n")
        self.assertTrue(self.transport.disconnecting)
        self.assertEqual(self.built, [])
        self.assertEqual(self.clock.getDelayedCalls(), [])


class StandInStomp(protocol.Protocol):
    """Answers every byte it got so far, to prove the hand-over lost none."""

    def dataReceived(self, data):
        self.transport.write(b"STANDIN:" + data)


def standin_stomp(config, rpc, reactor):
    return (lambda method, params: None), StandInStomp


class SnifferOverTLS(ListenerMixin, unittest.TestCase):

    @defer.inlineCallbacks
    def listen(self, **kw):
        self.paths = self.make_pki()
        self.service = yield self.start_listener(self.paths, **kw)

    @defer.inlineCallbacks
    def wait_for(self, predicate, timeout=5.0):
        from twisted.internet import task
        for _ in range(int(timeout / 0.01)):
            if predicate():
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.fail("condition not reached")

    @defer.inlineCallbacks
    def test_amp_box_gets_amp(self):
        yield self.listen(stomp_factory=standin_stomp)
        client = yield self.connect_amp(self.service.port, good_client(self.paths))
        answer = yield client.callRemote(Call, method="Test.echo", params={"value": "amp"})
        self.assertEqual(answer["response"], {"result": "amp"})

    @defer.inlineCallbacks
    def test_stomp_word_gets_stomp_with_all_bytes(self):
        yield self.listen(stomp_factory=standin_stomp)
        payload = b"\r\n\nCONNECT\naccept-version:1.2\n\n\x00"
        client = yield self.connect_raw(self.service.port, good_client(self.paths), payload)
        yield self.wait_for(lambda: len(client.received) >= len(b"STANDIN:" + payload))
        self.assertEqual(client.received, b"STANDIN:" + payload)

    @defer.inlineCallbacks
    def test_real_stomp_connect(self):
        # engineer A's STOMP server, built by the listener's default factory
        yield self.listen()
        frame = b"CONNECT\naccept-version:1.2\nheart-beat:0,0\nhost:localhost\n\n\x00"
        client = yield self.connect_raw(self.service.port, good_client(self.paths), frame)
        yield self.wait_for(lambda: b"\x00" in client.received)
        self.assertTrue(client.received.startswith(b"CONNECTED\n"), client.received)
        self.assertIn(b"version:1.2", client.received)

    @defer.inlineCallbacks
    def assert_closed(self, payload):
        client = yield self.connect_raw(self.service.port, good_client(self.paths), payload)
        yield client.lost
        self.assertEqual(client.received, b"")
        self.assertEqual(self.ns.calls, [])

    @defer.inlineCallbacks
    def test_http_is_closed(self):
        yield self.listen(stomp_factory=standin_stomp)
        yield self.assert_closed(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")

    @defer.inlineCallbacks
    def test_junk_is_closed(self):
        yield self.listen(stomp_factory=standin_stomp)
        yield self.assert_closed(b"\x01\x02junk")
        yield self.assert_closed(b"CONNECTX\n")

    @defer.inlineCallbacks
    def test_silent_client_is_dropped_after_the_timeout(self):
        yield self.listen(stomp_factory=standin_stomp, handshake_timeout=0.3)
        started = time.monotonic()
        client = yield self.connect_raw(self.service.port, good_client(self.paths))
        yield client.lost
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.25)
        self.assertLess(elapsed, 3)

    @defer.inlineCallbacks
    def test_no_handshake_is_dropped_after_the_timeout(self):
        # plain TCP, never starting TLS
        yield self.listen(stomp_factory=standin_stomp, handshake_timeout=0.3)
        started = time.monotonic()
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", self.service.port)
        client = yield connectProtocol(endpoint, RawClient())
        self.addCleanup(self._close, client)
        yield client.lost
        self.assertGreaterEqual(time.monotonic() - started, 0.25)
        self.assertEqual(self.service.connections, 0)

    @defer.inlineCallbacks
    def test_partial_word_then_silence_is_dropped(self):
        yield self.listen(stomp_factory=standin_stomp, handshake_timeout=0.3)
        client = yield self.connect_raw(self.service.port, good_client(self.paths), b"\nCONN")
        yield client.lost
        self.assertEqual(client.received, b"")
