"""
The STOMP client: exact bytes and logic against StringTransport and a Clock,
then reconnects and TLS against scripted servers on real loopback sockets.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import uuid

from twisted.internet import defer, endpoints, reactor, ssl
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.task import Clock, deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from vdsm_twisted.api import errors
from vdsm_twisted.client import (
    CallTimeout, ConnectFailed, Disconnected, PkiError, connect, connect_endpoint)
from vdsm_twisted.client._stomp import ServerError
from vdsm_twisted.protocols.stomp.frame import Frame, FrameParser, encode_frame

CONNECT = b"CONNECT\naccept-version:1.2\nheart-beat:0,24000\n\n\x00"


def parse(data: bytes) -> list[Frame]:
    return FrameParser(10 ** 7).feed(data)


class _Conn:
    """One fake connection: the protocol (as ClientService wraps it) and its transport."""

    def __init__(self, proto, transport):
        self.proto = proto
        self.transport = transport
        self.held: list[Frame] = []

    def take(self) -> list[Frame]:
        frames = self.held + parse(self.transport.value())
        self.held = []
        self.transport.clear()
        return frames

    def receive(self, frame: Frame | bytes) -> None:
        self.proto.dataReceived(frame if isinstance(frame, bytes) else encode_frame(frame))

    def drop(self) -> None:
        self.proto.connectionLost(Failure(ConnectionDone()))

    def handshake(self, heart_beat="24000,0"):
        assert self.transport.value() == CONNECT
        self.transport.clear()
        self.receive(Frame("CONNECTED", (("version", "1.2"), ("heart-beat", heart_beat))))
        frames = self.take()
        self.held = [f for f in frames if f.command != "SUBSCRIBE"]
        return {f.header("destination"): f.header("id") for f in frames if f.command == "SUBSCRIBE"}

    def answer(self, send: Frame, response) -> None:
        self.receive(Frame("MESSAGE", (("destination", send.header("reply-to")),
                                       ("content-type", "application/json")),
                           json.dumps(response).encode()))


class _Endpoint:
    """Each connection attempt gets a StringTransport."""

    def __init__(self):
        self.conns: list[_Conn] = []

    def connect(self, factory):
        proto = factory.buildProtocol(None)
        transport = StringTransport()
        proto.makeConnection(transport)
        self.conns.append(_Conn(proto, transport))
        return defer.succeed(proto)


class StompClientUnitTests(unittest.SynchronousTestCase):

    def setUp(self):
        self.clock = Clock()
        self.endpoint = _Endpoint()
        d = connect_endpoint(self.endpoint, reactor=self.clock, timeout=10,
                             retry_policy=lambda attempt: 1.0)
        self.conn = self.endpoint.conns[0]
        self.subs = self.conn.handshake()
        self.client = self.successResultOf(d)

    def test_connect_and_subscribe_bytes(self):
        reply, events = [d for d in self.subs if d != "jms.queue.events"][0], "jms.queue.events"
        self.assertEqual(set(self.subs), {reply, events})
        uuid.UUID(reply)
        uuid.UUID(self.subs[reply])
        uuid.UUID(self.subs[events])
        # Re-encode exactly what we expect and compare the bytes.
        self.endpoint.conns.clear()
        d = connect_endpoint(self.endpoint, reactor=self.clock, timeout=10)
        conn = self.endpoint.conns[0]
        self.assertEqual(conn.transport.value(), CONNECT)
        conn.transport.clear()
        conn.receive(b"CONNECTED\nversion:1.2\nheart-beat:24000,0\n\n\x00")
        raw = conn.transport.value()
        first, second = parse(raw)
        expected = (b"SUBSCRIBE\ndestination:%s\nid:%s\nack:auto\n\n\x00"
                    % (first.header("destination").encode(), first.header("id").encode())
                    + b"SUBSCRIBE\ndestination:jms.queue.events\nid:%s\nack:auto\n\n\x00"
                    % second.header("id").encode())
        self.assertEqual(raw, expected)
        self.successResultOf(d)

    def test_send_bytes_and_bare_response(self):
        d = self.client.call("Host.getVMList", {"onlyUUID": True}, flow_id="flow-1")
        raw = self.conn.transport.value()
        [send] = self.conn.take()
        [request] = json.loads(send.body)
        body = json.dumps([{"jsonrpc": "2.0", "method": "Host.getVMList",
                            "params": {"onlyUUID": True}, "id": request["id"]}],
                          separators=(",", ":")).encode()
        reply = send.header("reply-to")
        self.assertIn(reply, self.subs)
        self.assertEqual(raw, b"SEND\ndestination:jms.topic.vdsm_requests\nreply-to:%s\n"
                              b"content-type:application/json\novirtCorrelationId:flow-1\n"
                              b"content-length:%d\n\n%s\x00" % (reply.encode(), len(body), body))
        self.assertNoResult(d)
        self.conn.answer(send, {"jsonrpc": "2.0", "id": request["id"], "result": ["a", "b"]})
        self.assertEqual(self.successResultOf(d), ["a", "b"])

    def test_no_flow_header_without_flow_id_and_null_params(self):
        self.client.call("Host.ping2")
        [send] = self.conn.take()
        self.assertIsNone(send.header("ovirtCorrelationId"))
        self.assertEqual(json.loads(send.body)[0]["params"], {})

    def test_responses_matched_by_id_array_and_bare(self):
        d1 = self.client.call("Host.ping2")
        d2 = self.client.call("Host.getStats")
        s1, s2 = self.conn.take()
        id1, id2 = json.loads(s1.body)[0]["id"], json.loads(s2.body)[0]["id"]
        self.assertNotEqual(id1, id2)
        # Second answered first, as a one-element array.
        self.conn.answer(s2, [{"jsonrpc": "2.0", "id": id2, "result": {"cpuIdle": "99"}}])
        self.assertNoResult(d1)
        self.assertEqual(self.successResultOf(d2), {"cpuIdle": "99"})
        # An answer for nobody is ignored.
        self.conn.answer(s1, {"jsonrpc": "2.0", "id": "unknown", "result": 1})
        self.assertNoResult(d1)
        self.conn.answer(s1, {"jsonrpc": "2.0", "id": id1, "result": True})
        self.assertIs(self.successResultOf(d1), True)

    def test_error_response_rebuilt_from_code(self):
        d = self.client.call("VM.getStats", {"vmID": str(uuid.uuid4())})
        [send] = self.conn.take()
        rid = json.loads(send.body)[0]["id"]
        self.conn.answer(send, {"jsonrpc": "2.0", "id": rid,
                                "error": {"code": 1, "message": "Virtual machine does not exist: x"}})
        failure = self.failureResultOf(d, errors.NoSuchVM)
        self.assertEqual(failure.value.code, 1)
        self.assertEqual(failure.value.message, "Virtual machine does not exist: x")

    def test_unknown_error_code_keeps_code(self):
        d = self.client.call("Image.prepare")
        [send] = self.conn.take()
        rid = json.loads(send.body)[0]["id"]
        self.conn.answer(send, {"jsonrpc": "2.0", "id": rid, "error": {"code": 358, "message": "nope"}})
        failure = self.failureResultOf(d, errors.ApiError)
        self.assertEqual((failure.value.code, failure.value.message), (358, "nope"))

    def test_error_frame_fails_pending_calls(self):
        d1 = self.client.call("Host.ping2")
        d2 = self.client.call("VM.create")
        self.conn.take()
        self.conn.receive(Frame("ERROR", (("message", "destination not subscribed"),), b"detail"))
        for d in (d1, d2):
            failure = self.failureResultOf(d, ServerError)
            self.assertIn("destination not subscribed", failure.value.message)
            self.assertIn("detail", failure.value.message)

    def test_events_callback(self):
        seen = []
        self.client.subscribe_events(lambda method, params: seen.append((method, params)))
        self.conn.receive(Frame("MESSAGE", (("destination", "jms.queue.events"),),
                                json.dumps({"jsonrpc": "2.0", "method": "|virt|VM_status|v1",
                                            "params": {"v1": {"status": "Up"}, "notify_time": 5}}).encode()))
        self.assertEqual(seen, [("|virt|VM_status|v1", {"v1": {"status": "Up"}, "notify_time": 5})])

    def test_broken_event_callback_does_not_break_others(self):
        seen = []
        self.client.subscribe_events(lambda m, p: 1 / 0)
        self.client.subscribe_events(lambda m, p: seen.append(m))
        self.conn.receive(Frame("MESSAGE", (), b'{"jsonrpc":"2.0","method":"|net|host_conn|no_id","params":{}}'))
        self.assertEqual(seen, ["|net|host_conn|no_id"])
        self.assertEqual(len(self.flushLoggedErrors(ZeroDivisionError)), 1)

    def test_call_timeout(self):
        d = self.client.call("Host.ping2", timeout=5)
        [send] = self.conn.take()
        self.clock.advance(4.9)
        self.assertNoResult(d)
        self.clock.advance(0.2)
        self.failureResultOf(d, CallTimeout)
        # The late answer is dropped quietly.
        self.conn.answer(send, {"jsonrpc": "2.0", "id": json.loads(send.body)[0]["id"], "result": True})

    def test_default_timeout_from_connect(self):
        d = self.client.call("Host.ping2")
        self.clock.advance(10)
        self.failureResultOf(d, CallTimeout)

    def test_call_while_disconnected_waits_for_reconnect(self):
        self.conn.drop()
        d = self.client.call("VM.create", {"vmParams": {}})
        self.assertNoResult(d)
        self.clock.advance(1.0)   # the retry policy's delay
        conn2 = self.endpoint.conns[1]
        subs2 = conn2.handshake()
        self.assertEqual(set(subs2), set(self.subs))  # same reply queue, fresh subscription
        [send] = conn2.take()
        conn2.answer(send, {"jsonrpc": "2.0", "id": json.loads(send.body)[0]["id"], "result": {}})
        self.assertEqual(self.successResultOf(d), {})

    def test_call_while_disconnected_times_out(self):
        self.conn.drop()
        d = self.client.call("Host.ping2", timeout=0.5)
        self.clock.advance(0.5)
        self.failureResultOf(d, CallTimeout)
        self.assertEqual(self.client._waiters, [])

    def test_in_flight_non_idempotent_fails_idempotent_resent(self):
        d_create = self.client.call("VM.create", {"vmParams": {}})
        d_ping = self.client.call("Host.ping2")
        self.conn.take()
        self.conn.drop()
        self.failureResultOf(d_create, Disconnected)
        self.assertNoResult(d_ping)
        self.clock.advance(1.0)
        conn2 = self.endpoint.conns[1]
        conn2.handshake()
        [send] = conn2.take()
        self.assertEqual(json.loads(send.body)[0]["method"], "Host.ping2")
        conn2.answer(send, {"jsonrpc": "2.0", "id": json.loads(send.body)[0]["id"], "result": True})
        self.assertIs(self.successResultOf(d_ping), True)

    def test_server_heartbeats_and_dead_connection(self):
        self.endpoint.conns.clear()
        d = connect_endpoint(self.endpoint, reactor=self.clock, timeout=10)
        conn = self.endpoint.conns[0]
        conn.handshake(heart_beat="10000,5000")
        self.successResultOf(d)
        # The server asked for beats every 5 s.
        self.clock.advance(5)
        self.assertEqual(conn.transport.value(), b"\n")
        conn.transport.clear()
        # Bytes from the server keep it alive...
        self.clock.advance(20)
        conn.receive(b"\n")
        self.clock.advance(20)
        self.assertFalse(conn.transport.disconnecting)
        # ... 30 s of silence kills it.
        self.clock.advance(10)
        self.assertTrue(conn.transport.disconnecting)

    def test_no_watchdog_when_server_sends_no_heartbeats(self):
        self.endpoint.conns.clear()
        d = connect_endpoint(self.endpoint, reactor=self.clock, timeout=10)
        conn = self.endpoint.conns[0]
        conn.handshake(heart_beat="0,0")
        self.successResultOf(d)
        self.clock.advance(300)
        self.assertFalse(conn.transport.disconnecting)
        self.assertEqual(conn.transport.value(), b"")

    def test_no_connected_answer_fails_connect(self):
        self.endpoint.conns.clear()
        d = connect_endpoint(self.endpoint, reactor=self.clock, timeout=10)
        self.clock.advance(10)
        self.failureResultOf(d, ConnectFailed)

    def test_close_fails_pending_and_says_goodbye(self):
        d = self.client.call("Host.ping2")
        waiting = self.client.call("Host.getStats")
        self.conn.take()
        closed = self.client.close()
        [goodbye] = self.conn.take()
        self.assertEqual(goodbye.command, "DISCONNECT")
        self.assertTrue(goodbye.header("receipt"))
        self.assertTrue(self.conn.transport.disconnecting)
        self.conn.drop()
        self.successResultOf(closed)
        self.failureResultOf(d, Disconnected)
        self.failureResultOf(waiting, Disconnected)
        self.failureResultOf(self.client.call("Host.ping2"), Disconnected)
        self.assertEqual(len(self.endpoint.conns), 1)

    def test_garbage_from_server_drops_connection(self):
        d = self.client.call("VM.create")
        self.conn.receive(b"BOGUS\n\n\x00")
        self.assertTrue(self.conn.transport.disconnecting)
        self.conn.drop()
        self.failureResultOf(d, Disconnected)


# -- real sockets

class FakeServer(Protocol):
    """A scripted STOMP broker: answers CONNECT, records SUBSCRIBEs, runs requests."""

    def connectionMade(self):
        self.parser = FrameParser(10 ** 7)
        self.subscriptions: dict[str, str] = {}
        self.closed = defer.Deferred()
        self.factory.connections.append(self)

    def dataReceived(self, data):
        for frame in self.parser.feed(data):
            self.factory.frames.append(frame)
            getattr(self, "do_" + frame.command)(frame)

    def send(self, frame):
        self.transport.write(encode_frame(frame))

    def do_CONNECT(self, frame):
        self.send(Frame("CONNECTED", (("version", "1.2"), ("heart-beat", "0,0"))))

    def do_SUBSCRIBE(self, frame):
        self.subscriptions[frame.header("destination")] = frame.header("id")
        if frame.header("destination") == "jms.queue.events":
            self.factory.fire("subscribed", self)

    def do_SEND(self, frame):
        [request] = json.loads(frame.body)
        self.factory.requests.append(request["method"])
        if request["method"] in self.factory.drop_once:
            self.factory.drop_once.discard(request["method"])
            self.transport.loseConnection()
            return
        reply = frame.header("reply-to")
        self.send(Frame("MESSAGE", (("destination", reply), ("subscription", self.subscriptions[reply]),
                                    ("content-type", "application/json")),
                        json.dumps({"jsonrpc": "2.0", "id": request["id"], "result": True}).encode()))

    def do_DISCONNECT(self, frame):
        self.send(Frame("RECEIPT", (("receipt-id", frame.header("receipt")),)))

    def event(self, method, params):
        self.send(Frame("MESSAGE", (("destination", "jms.queue.events"),
                                    ("subscription", self.subscriptions["jms.queue.events"])),
                        json.dumps({"jsonrpc": "2.0", "method": method, "params": params}).encode()))

    def connectionLost(self, reason):
        self.closed.callback(None)


class FakeServerFactory(Factory):
    protocol = FakeServer

    def __init__(self):
        self.connections: list[FakeServer] = []
        self.frames: list[Frame] = []
        self.requests: list[str] = []
        self.drop_once: set[str] = set()
        self._waiting: dict[str, list[defer.Deferred]] = {}

    def wait(self, what):
        d = defer.Deferred()
        self._waiting.setdefault(what, []).append(d)
        return d

    def fire(self, what, value):
        for d in self._waiting.pop(what, []):
            d.callback(value)

    def all_closed(self):
        return defer.gatherResults([c.closed for c in self.connections if not c.closed.called])


class StompClientLoopbackTests(unittest.TestCase):

    timeout = 20

    async def _start(self, factory=None, **kw):
        self.server = factory or FakeServerFactory()
        self.port = reactor.listenTCP(0, self.server, interface="127.0.0.1")
        self.addCleanup(self.port.stopListening)
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", self.port.getHost().port)
        subscribed = self.server.wait("subscribed")
        client = await connect_endpoint(endpoint, retry_policy=lambda n: 0.02, **kw)
        self.addCleanup(self._close, client)
        await subscribed
        return client

    async def _close(self, client):
        await client.close()
        await self.server.all_closed()

    @defer.inlineCallbacks
    def test_reconnect_resubscribes_and_retries(self):
        client = yield defer.ensureDeferred(self._start(timeout=5))
        seen = defer.Deferred()
        client.subscribe_events(lambda method, params: seen.callback((method, params)))
        first = self.server.connections[0]
        reply_queue = next(d for d in first.subscriptions if d != "jms.queue.events")

        # The server drops the connection; the next call waits and goes through.
        resubscribed = self.server.wait("subscribed")
        first.transport.loseConnection()
        yield first.closed
        result = yield client.call("Host.ping2")
        self.assertIs(result, True)
        second = yield resubscribed
        self.assertIsNot(second, first)
        self.assertEqual(set(second.subscriptions), {reply_queue, "jms.queue.events"})
        commands = [f.command for f in self.server.frames]
        self.assertEqual(commands.count("CONNECT"), 2)
        self.assertEqual(commands.count("SUBSCRIBE"), 4)

        # Events flow on the new connection.
        second.event("|virt|VM_status|v1", {"v1": {"status": "Up"}})
        method, params = yield seen
        self.assertEqual((method, params), ("|virt|VM_status|v1", {"v1": {"status": "Up"}}))

        # An idempotent call dropped mid-flight is re-sent transparently...
        self.server.drop_once.add("Host.getStats")
        result = yield client.call("Host.getStats")
        self.assertIs(result, True)
        self.assertEqual(self.server.requests.count("Host.getStats"), 2)
        # ... a non-idempotent one fails with Disconnected and is not re-sent.
        self.server.drop_once.add("VM.create")
        yield self.assertFailure(client.call("VM.create", {"vmParams": {}}), Disconnected)
        self.assertEqual(self.server.requests.count("VM.create"), 1)
        # And the client is still usable afterwards.
        self.assertIs((yield client.call("VM.create", {"vmParams": {}})), True)
        self.assertEqual(len(self.server.connections), 4)

    @defer.inlineCallbacks
    def test_close_sends_disconnect(self):
        client = yield defer.ensureDeferred(self._start())
        yield client.close()
        yield self.server.all_closed()
        self.assertEqual(self.server.frames[-1].command, "DISCONNECT")

    @defer.inlineCallbacks
    def test_connection_refused(self):
        port = reactor.listenTCP(0, Factory.forProtocol(Protocol), interface="127.0.0.1")
        number = port.getHost().port
        yield port.stopListening()
        endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", number)
        failure = yield self.assertFailure(connect_endpoint(endpoint, timeout=5), ConnectFailed)
        self.assertIn("refused", str(failure).lower())


class StompClientTLSTests(unittest.TestCase):
    """connect() with a real PKI (engineer D's create_pki) against a TLS server."""

    timeout = 30

    def setUp(self):
        from vdsm_twisted.tool import pki
        self.pki_dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.pki_dir)
        self.paths = pki.create_pki(self.pki_dir + "/good", hostname="localhost")
        pki.create_pki(self.pki_dir + "/foreign", hostname="localhost")

    def _listen(self, interface="127.0.0.1"):
        paths = self.paths
        with open(paths.cert, "rb") as c, open(paths.key, "rb") as k, open(paths.ca_cert, "rb") as ca:
            mine = ssl.PrivateCertificate.loadPEM(c.read() + k.read())
            trust = ssl.Certificate.loadPEM(ca.read())
        options = ssl.CertificateOptions(privateKey=mine.privateKey.original, certificate=mine.original,
                                         trustRoot=trust)
        self.server = FakeServerFactory()
        port = reactor.listenSSL(0, self.server, options, interface=interface)
        self.addCleanup(port.stopListening)
        return port.getHost().port

    async def _use(self, d):
        client = await d
        try:
            return await client.call("Host.ping2")
        finally:
            await client.close()
            await self.server.all_closed()

    def test_mutual_tls_by_name_and_address(self):
        port = self._listen()
        d = defer.ensureDeferred(self._use(connect("localhost", port, pki_dir=self.pki_dir + "/good",
                                                   timeout=10)))
        d.addCallback(self.assertIs, True)
        d.addCallback(lambda _: defer.ensureDeferred(self._use(
            connect("127.0.0.1", port, pki_dir=self.pki_dir + "/good", protocol="stomp", timeout=10))))
        d.addCallback(self.assertIs, True)
        return d

    @defer.inlineCallbacks
    def test_foreign_ca_refused(self):
        port = self._listen()
        yield self.assertFailure(connect("localhost", port, pki_dir=self.pki_dir + "/foreign", timeout=10),
                                 ConnectFailed)
        yield self.server.all_closed()

    @defer.inlineCallbacks
    def test_verify_hostname_off_still_checks_chain(self):
        port = self._listen(interface="127.0.0.2")
        # The certificate does not list 127.0.0.2: refused by name...
        yield self.assertFailure(connect("127.0.0.2", port, pki_dir=self.pki_dir + "/good", timeout=10),
                                 ConnectFailed)
        yield self.server.all_closed()
        # ... accepted without the name check ...
        result = yield defer.ensureDeferred(self._use(
            connect("127.0.0.2", port, pki_dir=self.pki_dir + "/good", timeout=10, verify_hostname=False)))
        self.assertIs(result, True)
        # ... and a foreign chain is still refused.
        yield self.assertFailure(connect("127.0.0.2", port, pki_dir=self.pki_dir + "/foreign", timeout=10,
                                         verify_hostname=False), ConnectFailed)
        yield self.server.all_closed()
        yield deferLater(reactor, 0, lambda: None)

    def test_vdsm_host_certificate_used_without_client_cert(self):
        os.unlink(self.paths.client_cert)
        os.unlink(self.paths.client_key)
        port = self._listen()
        d = defer.ensureDeferred(self._use(connect("localhost", port, pki_dir=self.pki_dir + "/good",
                                                   timeout=10)))
        d.addCallback(self.assertIs, True)
        return d


class PkiErrorTests(unittest.SynchronousTestCase):

    def test_missing_pki_fails_the_deferred(self):
        d = connect("localhost", 1, pki_dir="/nonexistent-pki", reactor=Clock())
        failure = self.failureResultOf(d, PkiError)
        self.assertIn("/nonexistent-pki/certs/cacert.pem", str(failure.value))

    def test_ca_without_any_client_certificate(self):
        directory = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, directory)
        from vdsm_twisted.tool import pki
        paths = pki.create_pki(directory, hostname="localhost")
        for path in (paths.client_key, paths.key):
            os.unlink(path)
        failure = self.failureResultOf(connect("localhost", 1, pki_dir=directory, reactor=Clock()), PkiError)
        self.assertIn("no client certificate", str(failure.value))
