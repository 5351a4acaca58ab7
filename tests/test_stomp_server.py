"""The STOMP 1.2 server: VDSM's wire, byte for byte, with a real Api."""

import json

import pytest
from twisted.internet import defer, reactor, task
from twisted.internet.address import IPv4Address
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP4ServerEndpoint, connectProtocol
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.testing import StringTransport
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.trial import unittest
from zope.interface import implementer

from vdsm_twisted.api.events import EventBus
from vdsm_twisted.api.jsonrpc import JsonRpcServer
from vdsm_twisted.api.registry import Api, IApiNamespace
from vdsm_twisted.api.schema import METHODS, Method
from vdsm_twisted.protocols.stomp import StompBroker, StompServerProtocol

REQUESTS = "jms.topic.vdsm_requests"
IRS_REQUESTS = "jms.topic.vdsm_irs_requests"
RESPONSES = "jms.topic.vdsm_responses"
EVENTS = "jms.queue.events"
REPLY = "c4f5e9a6-59cf-4a31-9a0c-6e3a0b1c2d3e"
VM_ID = "3f1b7a4e-0c1d-4e5f-8a9b-0123456789ab"

CONNECT = b"CONNECT\naccept-version:1.2\nheart-beat:0,2000\n\n\x00"
CONNECT_NO_HB = b"CONNECT\naccept-version:1.2\n\n\x00"
CONNECTED = b"CONNECTED\nversion:1.2\nheart-beat:2000,0\n\n\x00"


@implementer(IApiNamespace)
class HostNamespace:
    namespace = "Host"

    def ping2(self):
        return True

    def getVMList(self, fullStatus=False, vmList=(), onlyUUID=False):
        return [VM_ID] if onlyUUID else [{"vmId": VM_ID, "status": "Up"}]


@implementer(IApiNamespace)
class SlowNamespace:
    """A verb that answers when the test says so (requests in flight)."""

    namespace = "Test"

    def __init__(self):
        self.waiting = []

    def wait(self):
        d = defer.Deferred()
        self.waiting.append(d)
        return d


TEST_METHODS = METHODS + (Method("Test", "wait", "Answers when the test fires it."),)


def error_bytes(text: str) -> bytes:
    body = text.encode()
    return b"ERROR\nmessage:%s\ncontent-length:%d\n\n%s\x00" % (body, len(body), body)


def send(destination, body: bytes, *headers) -> bytes:
    head = b"".join(b"%s:%s\n" % (k.encode(), v.encode()) for k, v in headers)
    return b"SEND\ndestination:%s\n%scontent-length:%d\n\n%s\x00" % (
        destination.encode(), head, len(body), body)


def subscribe(destination: str, sub_id: str) -> bytes:
    return b"SUBSCRIBE\ndestination:%s\nid:%s\nack:auto\n\n\x00" % (
        destination.encode(), sub_id.encode())


def message(destination, sub_id, body: bytes) -> bytes:
    return (b"MESSAGE\ndestination:%s\ncontent-type:application/json\nsubscription:%s\n"
            b"content-length:%d\n\n%s\x00" % (destination.encode(), sub_id.encode(),
                                              len(body), body))


def request(method, params=None, req_id="r1") -> dict:
    return {"jsonrpc": "2.0", "method": method, "params": params or {}, "id": req_id}


def jbody(obj) -> bytes:
    return json.dumps(obj).encode()


class Client:
    """One server protocol on a StringTransport, as the engine sees it."""

    def __init__(self, env, port=40000, max_size=1 << 20, max_pending=8):
        self.transport = StringTransport(peerAddress=IPv4Address("TCP", "192.0.2.7", port))
        self.proto = StompServerProtocol(env.broker, env.rpc, max_size, max_pending,
                                         clock=env.clock)
        self.log_events = []
        self.proto.log = Logger(observer=self.log_events.append)
        self.proto.makeConnection(self.transport)

    def feed(self, data: bytes) -> bytes:
        """Deliver C{data}; return (and clear) what the server wrote."""
        self.proto.dataReceived(data)
        return self.take()

    def take(self) -> bytes:
        out = self.transport.value()
        self.transport.clear()
        return out

    @property
    def closing(self) -> bool:
        return self.transport.disconnecting

    def lose(self):
        self.proto.connectionLost(Failure(ConnectionError("gone")))

    def connect(self, reply=REPLY):
        assert self.feed(CONNECT_NO_HB) == b"CONNECTED\nversion:1.2\nheart-beat:0,0\n\n\x00"
        assert self.feed(subscribe(reply, "sub-reply")) == b""

    def call(self, method, params=None, req_id="r1", reply=REPLY):
        out = self.feed(send(REQUESTS, jbody(request(method, params, req_id)), ("reply-to", reply)))
        head, _, rest = out.partition(b"\n\n")
        assert head.startswith(b"MESSAGE\ndestination:" + reply.encode()), out
        return json.loads(rest[:-1])


class Env:
    def __init__(self):
        self.clock = task.Clock()
        self.slow = SlowNamespace()
        self.api = Api([HostNamespace(), self.slow], methods=TEST_METHODS)
        self.rpc = JsonRpcServer(self.api, max_batch_size=10)
        self.broker = StompBroker([REQUESTS, IRS_REQUESTS], RESPONSES, EVENTS)

    def client(self, **kw) -> Client:
        return Client(self, **kw)


@pytest.fixture
def env():
    return Env()


# -- the exchange of PROTOCOL.md, byte for byte


def test_full_exchange(env):
    c = env.client()
    assert c.feed(CONNECT) == CONNECTED
    assert c.feed(subscribe(REPLY, "sub-1")) == b""
    assert c.feed(subscribe(EVENTS, "sub-ev")) == b""

    # The Python client wraps a call in a one-element array; answered unwrapped.
    body = b'[{"jsonrpc":"2.0","method":"Host.ping2","params":{},"id":"r1"}]'
    out = c.feed(send(REQUESTS, body, ("content-type", "application/json"),
                      ("reply-to", REPLY), ("ovirtCorrelationId", "flow-7")))
    assert out == (
        b"MESSAGE\ndestination:" + REPLY.encode() + b"\ncontent-type:application/json\n"
        b"subscription:sub-1\ncontent-length:41\n\n"
        b'{"jsonrpc":"2.0","id":"r1","result":true}\x00')

    # A two-element batch is answered with an array.
    body = jbody([request("Host.ping2", req_id="a"),
                  request("Host.getVMList", {"onlyUUID": True}, req_id="b")])
    out = c.feed(send(REQUESTS, body, ("reply-to", REPLY)))
    expected = (b'[{"jsonrpc":"2.0","id":"a","result":true},'
                b'{"jsonrpc":"2.0","id":"b","result":["' + VM_ID.encode() + b'"]}]')
    assert out == message(REPLY, "sub-1", expected)

    # Nobody subscribed: an ERROR frame, and the connection stays.
    out = c.feed(send("nobody.listens", b"{}"))
    assert out == (b"ERROR\nmessage:Subscription not available\ncontent-length:26\n\n"
                   b"Subscription not available\x00")
    assert not c.closing

    assert c.feed(b"DISCONNECT\nreceipt:42\n\n\x00") == b"RECEIPT\nreceipt-id:42\n\n\x00"
    assert c.closing
    c.lose()
    assert not env.broker.has_subscribers(REPLY)
    assert not env.broker.has_subscribers(EVENTS)


def test_full_exchange_one_byte_at_a_time(env):
    c = env.client()
    stream = (CONNECT + b"\n" + subscribe(REPLY, "s") + b"\r\n"
              + send(REQUESTS, jbody([request("Host.ping2")]), ("reply-to", REPLY))
              + b"\n\n" + b"DISCONNECT\nreceipt:9\n\n\x00")
    out = b"".join(c.feed(stream[i:i + 1]) for i in range(len(stream)))
    assert out == (CONNECTED
                   + message(REPLY, "s", b'{"jsonrpc":"2.0","id":"r1","result":true}')
                   + b"RECEIPT\nreceipt-id:9\n\n\x00")
    assert c.closing


def test_disconnect_without_receipt_just_closes(env):
    c = env.client()
    c.connect()
    assert c.feed(b"DISCONNECT\n\n\x00") == b""
    assert c.closing
    # Nothing is served after DISCONNECT.
    assert c.feed(send(REQUESTS, jbody(request("Host.ping2")), ("reply-to", REPLY))) == b""


def test_request_without_reply_to_goes_to_response_queue(env):
    listener = env.client(port=1)
    listener.connect()
    assert listener.feed(subscribe(RESPONSES, "resp")) == b""
    c = env.client(port=2)
    c.connect()
    assert c.feed(send(REQUESTS, jbody(request("Host.ping2")))) == b""
    assert listener.take() == message(
        RESPONSES, "resp", b'{"jsonrpc":"2.0","id":"r1","result":true}')


@pytest.mark.parametrize("destination", [IRS_REQUESTS, REQUESTS + ".suffix"])
def test_other_request_destinations(env, destination):
    c = env.client()
    c.connect()
    out = c.feed(send(destination, jbody(request("Host.ping2")), ("reply-to", REPLY)))
    assert out == message(REPLY, "sub-reply", b'{"jsonrpc":"2.0","id":"r1","result":true}')


def test_stomp_command_accepted_as_connect(env):
    c = env.client()
    assert c.feed(b"STOMP\naccept-version:1.1,1.2\nhost:x\n\n\x00") == \
        b"CONNECTED\nversion:1.2\nheart-beat:0,0\n\n\x00"


def test_flow_id_in_log(env):
    c = env.client()
    c.connect()
    c.feed(send(REQUESTS, jbody(request("Host.ping2")), ("reply-to", REPLY),
                ("ovirtCorrelationId", "flow-1234")))
    assert any(e.get("flow") == "flow-1234" and "flow" in e["log_format"]
               for e in c.log_events)


# -- JSON-RPC errors through STOMP


def test_unknown_method(env):
    c = env.client()
    c.connect()
    response = c.call("Host.noSuchVerb", req_id="x")
    assert response["id"] == "x"
    assert response["error"]["code"] == -32601


def test_bad_params(env):
    c = env.client()
    c.connect()
    response = c.call("Host.getVMList", {"fullStatus": "yes"})
    assert response["error"]["code"] == -32602
    assert "fullStatus" in response["error"]["message"]


def test_invalid_json(env):
    c = env.client()
    c.connect()
    out = c.feed(send(REQUESTS, b"{not json", ("reply-to", REPLY)))
    response = json.loads(out.partition(b"\n\n")[2][:-1])
    assert response["id"] is None
    assert response["error"]["code"] == -32700
    assert not c.closing


# -- CONNECT and heartbeats


def test_version_refused(env):
    c = env.client()
    out = c.feed(b"CONNECT\naccept-version:1.0,1.1\n\n\x00")
    assert out == error_bytes("unsupported version, only STOMP 1.2 is supported")
    assert c.closing


def test_connect_without_accept_version_refused(env):
    c = env.client()
    assert c.feed(b"CONNECT\n\n\x00").startswith(b"ERROR\n")
    assert c.closing


def test_frame_before_connect(env):
    c = env.client()
    out = c.feed(subscribe(REPLY, "s"))
    assert out == error_bytes("not connected")
    assert c.closing
    assert not env.broker.has_subscribers(REPLY)


@pytest.mark.parametrize("client_hb, server_hb", [
    ("0,2000", "2000,0"),
    ("500,300", "1000,1000"),
    ("3000,0", "0,3000"),
    ("0,0", "0,0"),
])
def test_heartbeat_negotiation(env, client_hb, server_hb):
    c = env.client()
    out = c.feed(b"CONNECT\naccept-version:1.2\nheart-beat:%s\n\n\x00" % client_hb.encode())
    assert out == b"CONNECTED\nversion:1.2\nheart-beat:%s\n\n\x00" % server_hb.encode()


def test_invalid_heartbeat_header(env):
    c = env.client()
    assert c.feed(b"CONNECT\naccept-version:1.2\nheart-beat:fast\n\n\x00") == \
        error_bytes("invalid heart-beat header")
    assert c.closing


def test_no_heartbeat_timers_without_heartbeat(env):
    c = env.client()
    c.connect()
    assert env.clock.getDelayedCalls() == []
    env.clock.advance(3600)
    assert c.take() == b""
    assert not c.closing


def test_server_sends_heartbeats_when_idle(env):
    c = env.client()
    assert c.feed(CONNECT) == CONNECTED
    assert c.feed(subscribe(EVENTS, "ev")) == b""
    env.clock.advance(1.999)
    assert c.take() == b""
    env.clock.advance(0.001)
    assert c.take() == b"\n"
    env.clock.advance(2)
    assert c.take() == b"\n"
    # Any write postpones the next heartbeat.
    env.clock.advance(1.5)
    env.broker.event_sink("|net|host_conn|no_id", {})
    assert c.take().startswith(b"MESSAGE\n")
    env.clock.advance(1.9)
    assert c.take() == b""
    env.clock.advance(0.1)
    assert c.take() == b"\n"
    c.lose()
    assert env.clock.getDelayedCalls() == []


def test_silent_client_is_closed(env):
    c = env.client()
    c.feed(b"CONNECT\naccept-version:1.2\nheart-beat:1000,0\n\n\x00")
    env.clock.advance(1.5)
    c.feed(b"\n")  # a heartbeat from the client keeps the connection
    env.clock.advance(1.9)
    assert not c.closing
    env.clock.advance(0.1)
    assert c.closing and c.transport.disconnected
    assert any("no heartbeat" in e["log_format"] for e in c.log_events)
    assert env.clock.getDelayedCalls() == []


# -- bad input


def test_garbage_closes_connection(env):
    c = env.client()
    out = c.feed(b"GET / HTTP/1.1\r\n\r\n\x00")
    assert out.startswith(b"ERROR\nmessage:unknown command 'GET / HTTP/1.1'")
    assert c.closing
    assert c.feed(CONNECT) == b""


def test_unknown_command_after_connect(env):
    c = env.client()
    c.connect()
    out = c.feed(b"BOGUS\n\n\x00")
    assert out == error_bytes("unknown command 'BOGUS'")
    assert c.closing
    assert not env.broker.has_subscribers(REPLY)


def test_server_command_from_client_refused(env):
    c = env.client()
    c.connect()
    assert c.feed(b"MESSAGE\n\n\x00") == error_bytes("unknown command 'MESSAGE'")
    assert c.closing


@pytest.mark.parametrize("frame, reason", [
    (b"SEND\nno colon here\n\n\x00", "header line without ':'"),
    (b"SEND\ndestination:a\\qb\n\n\x00", "invalid escape"),
    (b"SEND\ncontent-length:x\n\n\x00", "invalid content-length"),
    (b"SEND\ncontent-length:1\n\nab\x00", "not followed by NUL"),
    (b"SEND\ndestination:\xff\n\n\x00", "UTF-8"),
])
def test_malformed_frames(env, frame, reason):
    c = env.client()
    c.connect()
    out = c.feed(frame)
    assert out.startswith(b"ERROR\nmessage:") and reason.encode() in out
    assert c.closing


def test_oversized_frame_closes_only_that_connection(env):
    other = env.client(port=1)
    other.connect()
    other.feed(subscribe(EVENTS, "ev"))
    c = env.client(port=2, max_size=200)
    c.connect()
    out = c.feed(send(REQUESTS, b"x" * 300, ("reply-to", REPLY)))
    assert out == error_bytes("frame exceeds 200 bytes")
    assert c.closing
    c.lose()
    assert not other.closing
    assert other.call("Host.ping2")["result"] is True
    env.broker.event_sink("|net|host_conn|no_id", {"notify_time": 1})
    assert other.take().startswith(b"MESSAGE\ndestination:jms.queue.events\n")


def test_oversized_frame_detected_while_streaming(env):
    c = env.client(max_size=200)
    c.connect()
    c.feed(b"SEND\ndestination:q\n\n" + b"x" * 150)
    assert not c.closing
    assert c.feed(b"x" * 100) == error_bytes("frame exceeds 200 bytes")
    assert c.closing


def test_truncated_frame_logged_and_subscriptions_removed(env):
    c = env.client()
    c.connect()
    c.feed(subscribe(EVENTS, "ev"))
    c.feed(b"SEND\ndestination:" + REQUESTS.encode() + b"\ncontent-le")
    c.lose()
    assert any("truncated frame" in e["log_format"] for e in c.log_events)
    assert not env.broker.has_subscribers(REPLY)
    assert not env.broker.has_subscribers(EVENTS)


def test_clean_close_is_not_truncated(env):
    c = env.client()
    c.connect()
    c.feed(b"\n\n")
    c.lose()
    assert not any("truncated" in e["log_format"] for e in c.log_events)


# -- subscriptions


def test_subscribe_needs_destination_and_id(env):
    c = env.client()
    c.connect()
    assert c.feed(b"SUBSCRIBE\ndestination:x\n\n\x00") == \
        error_bytes("SUBSCRIBE needs 'destination' and 'id' headers")
    assert c.feed(b"SUBSCRIBE\nid:7\n\n\x00") == \
        error_bytes("SUBSCRIBE needs 'destination' and 'id' headers")
    assert not c.closing
    assert not env.broker.has_subscribers("x")


def test_duplicate_subscription_id(env):
    c = env.client()
    c.connect()
    assert c.feed(subscribe(EVENTS, "sub-reply")) == \
        error_bytes("subscription id sub-reply already in use")
    assert not c.closing
    assert not env.broker.has_subscribers(EVENTS)


def test_unsubscribe(env):
    c = env.client()
    c.connect()
    c.feed(subscribe(EVENTS, "ev"))
    assert c.feed(b"UNSUBSCRIBE\nid:nope\n\n\x00") == b""
    assert not c.closing
    env.broker.event_sink("|a|b|c", {})
    assert c.take().startswith(b"MESSAGE\n")
    assert c.feed(b"UNSUBSCRIBE\nid:ev\n\n\x00") == b""
    env.broker.event_sink("|a|b|c", {})
    assert c.take() == b""
    # The id is free again.
    assert c.feed(subscribe(EVENTS, "ev")) == b""


def test_receipt_on_subscribe(env):
    c = env.client()
    c.connect()
    assert c.feed(b"SUBSCRIBE\ndestination:d\nid:1\nreceipt:r9\n\n\x00") == \
        b"RECEIPT\nreceipt-id:r9\n\n\x00"


def test_events_reach_only_subscribers(env):
    bus = EventBus(clock=lambda: 1.0)
    bus.add_sink(env.broker.event_sink)
    a = env.client(port=1)
    a.connect()
    a.feed(subscribe(EVENTS, "ev-a"))
    b = env.client(port=2)
    b.connect(reply="other-reply")
    bus.publish(f"|virt|VM_status|{VM_ID}", {VM_ID: {"status": "Up"}})
    body = (b'{"jsonrpc":"2.0","method":"|virt|VM_status|' + VM_ID.encode()
            + b'","params":{"' + VM_ID.encode() + b'":{"status":"Up"},"notify_time":2147484647}}')
    assert a.take() == message(EVENTS, "ev-a", body)
    assert b.take() == b""


def test_hierarchical_destinations(env):
    c = env.client()
    c.connect()
    c.feed(subscribe("a.b", "s1"))
    assert env.broker.publish("a.b.c", b"1") == 1
    assert c.take() == message("a.b.c", "s1", b"1")
    assert env.broker.publish("a.bc", b"2") == 0
    assert env.broker.publish("a", b"3") == 0
    assert c.take() == b""


def test_two_connections_share_the_broker(env):
    a = env.client(port=1)
    a.connect(reply="reply-a")
    b = env.client(port=2)
    b.connect(reply="reply-b")
    # Each gets its own responses only.
    assert a.call("Host.ping2", req_id="from-a", reply="reply-a")["id"] == "from-a"
    assert b.take() == b""
    assert b.call("Host.ping2", req_id="from-b", reply="reply-b")["id"] == "from-b"
    assert a.take() == b""
    # A SEND to a destination someone subscribed is forwarded to them.
    assert a.feed(send("reply-b", b'{"hi":1}', ("x-extra", "v"))) == b""
    assert b.take() == (b"MESSAGE\ndestination:reply-b\ncontent-type:application/json\n"
                        b"subscription:sub-reply\nx-extra:v\ncontent-length:8\n\n"
                        b'{"hi":1}\x00')
    # A closing connection takes its subscriptions with it, not the others'.
    a.lose()
    assert not env.broker.has_subscribers("reply-a")
    assert b.call("Host.ping2", reply="reply-b")["result"] is True


# -- requests in flight


def test_pending_request_limit(env):
    c = env.client(max_pending=2)
    c.connect()
    for i in range(2):
        assert c.feed(send(REQUESTS, jbody(request("Test.wait", req_id=f"w{i}")),
                           ("reply-to", REPLY))) == b""
    # Third one: refused at once, with its id, connection kept.
    busy = c.call("Test.wait", req_id="w2")
    assert busy == {"jsonrpc": "2.0", "id": "w2",
                    "error": {"code": 101, "message": "Server busy: too many pending requests"}}
    batch = c.feed(send(REQUESTS, jbody([request("Test.wait", req_id="b")]), ("reply-to", REPLY)))
    assert json.loads(batch.partition(b"\n\n")[2][:-1])["id"] == "b"
    garbage = c.feed(send(REQUESTS, b"{{", ("reply-to", REPLY)))
    assert json.loads(garbage.partition(b"\n\n")[2][:-1])["error"]["code"] == 101
    assert not c.closing
    assert len(env.slow.waiting) == 2

    env.slow.waiting.pop(0).callback(None)
    assert c.take() == message(REPLY, "sub-reply", b'{"jsonrpc":"2.0","id":"w0","result":true}')
    # A slot is free again.
    assert c.feed(send(REQUESTS, jbody(request("Test.wait", req_id="w3")),
                       ("reply-to", REPLY))) == b""
    assert len(env.slow.waiting) == 2
    busy = c.call("Test.wait", req_id="w4")
    assert busy["error"]["code"] == 101


def test_busy_multi_element_batch(env):
    c = env.client(max_pending=0)
    c.connect()
    out = c.feed(send(REQUESTS, jbody([request("Host.ping2", req_id=1),
                                       request("Host.ping2", req_id=2)]), ("reply-to", REPLY)))
    responses = json.loads(out.partition(b"\n\n")[2][:-1])
    assert [r["id"] for r in responses] == [1, 2]
    assert {r["error"]["code"] for r in responses} == {101}


def test_response_after_close_goes_to_other_subscribers_only(env):
    a = env.client(port=1)
    a.connect()
    b = env.client(port=2)
    b.connect(reply="shared")
    a.feed(send(REQUESTS, jbody(request("Test.wait", req_id="s")), ("reply-to", "shared")))
    a.feed(send(REQUESTS, jbody(request("Test.wait", req_id="t")), ("reply-to", REPLY)))
    a.lose()
    first, second = env.slow.waiting
    first.callback(None)
    assert b.take() == message("shared", "sub-reply", b'{"jsonrpc":"2.0","id":"s","result":true}')
    # Nobody listens to the closed connection's own reply queue any more.
    second.callback(None)
    assert a.take() == b""
    assert b.take() == b""
    assert a.proto.pending == 0


# -- over a real socket


class _Collect(Protocol):
    """A raw client: keeps what arrives, fires when a given byte string is in."""

    def __init__(self):
        self.data = b""
        self.waiting = []
        self.lost = defer.Deferred()

    def dataReceived(self, data):
        self.data += data
        for item in list(self.waiting):
            needle, d = item
            if needle in self.data:
                self.waiting.remove(item)
                d.callback(self.data)

    def until(self, needle: bytes) -> defer.Deferred:
        d = defer.Deferred()
        self.waiting.append((needle, d))
        self.dataReceived(b"")
        return d

    def connectionLost(self, reason):
        self.lost.callback(None)


class RealSocketTests(unittest.TestCase):
    """Two real TCP connections on loopback sharing one broker."""

    @defer.inlineCallbacks
    def test_request_and_event_over_tcp(self):
        env = Env()
        factory = ServerFactory.forProtocol(lambda: StompServerProtocol(
            env.broker, env.rpc, 1 << 16, 4))
        port = yield TCP4ServerEndpoint(reactor, 0, interface="127.0.0.1").listen(factory)
        self.addCleanup(port.stopListening)
        endpoint = TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)
        a = yield connectProtocol(endpoint, _Collect())
        b = yield connectProtocol(endpoint, _Collect())
        for client in (a, b):
            self.addCleanup(lambda c=client: c.transport.loseConnection() or c.lost)

        a.transport.write(CONNECT_NO_HB + subscribe(REPLY, "s1") + subscribe(EVENTS, "ev"))
        b.transport.write(CONNECT_NO_HB)
        yield b.until(b"CONNECTED")
        # Split a request over several writes.
        data = send(REQUESTS, jbody([request("Host.ping2")]), ("reply-to", REPLY))
        a.transport.write(data[:10])
        a.transport.write(data[10:])
        out = yield a.until(b'"result":true}\x00')
        self.assertEqual(out, b"CONNECTED\nversion:1.2\nheart-beat:0,0\n\n\x00" + message(
            REPLY, "s1", b'{"jsonrpc":"2.0","id":"r1","result":true}'))

        env.broker.event_sink("|net|host_conn|no_id", {"notify_time": 5})
        yield a.until(b"|net|host_conn|no_id")

        # b sends garbage: only b is closed.
        b.transport.write(b"NONSENSE\n\n\x00")
        yield b.lost
        self.assertIn(b"ERROR\nmessage:unknown command", b.data)
        a.transport.write(b"DISCONNECT\nreceipt:end\n\n\x00")
        yield a.lost
        self.assertTrue(a.data.endswith(b"RECEIPT\nreceipt-id:end\n\n\x00"))
        self.assertFalse(env.broker.has_subscribers(EVENTS))
