"""The engine API over AMP, through the real listener (mutual TLS on loopback)."""

from __future__ import annotations

from twisted.internet import defer
from twisted.protocols import amp
from twisted.trial import unittest

from tests._pki_helpers import ListenerMixin, good_client, no_stomp
from vdsm_twisted.protocols.amp_commands import BigJSON, Call, Subscribe
from vdsm_twisted.protocols.amp_server import AmpEventHub


class RawParamsCall(amp.Command):
    """A Call whose params are sent as raw bytes (to send broken JSON)."""

    commandName = b"Call"
    arguments = [(b"method", amp.Unicode()), (b"params", amp.String())]
    response = [(b"response", BigJSON())]


class NoSuchCommand(amp.Command):
    arguments = [(b"x", amp.Integer())]
    response = []


class EngineAMPTests(ListenerMixin, unittest.TestCase):

    @defer.inlineCallbacks
    def setUp(self):
        self.paths = self.make_pki()
        self.service = yield self.start_listener(self.paths, stomp_factory=no_stomp)
        self.client = yield self.connect_amp(self.service.port, good_client(self.paths))

    def call(self, method, params=None, client=None, **kw):
        client = client or self.client
        d = client.callRemote(Call, method=method, params=params or {}, **kw)
        d.addCallback(lambda answer: answer["response"])
        return d

    @defer.inlineCallbacks
    def test_call_answers_result(self):
        value = {"a": [1, 2.5, None, True], "b": "\u00e9t\u00e9"}
        response = yield self.call("Test.echo", {"value": value}, flow_id="flow-1")
        self.assertEqual(response, {"result": value})
        self.assertEqual(self.ns.calls, [("echo", value)])

    @defer.inlineCallbacks
    def test_positional_params_and_none_result(self):
        response = yield self.call("Test.echo", [7])
        self.assertEqual(response, {"result": 7})
        response = yield self.call("Test.nothing")
        self.assertEqual(response, {"result": True})

    @defer.inlineCallbacks
    def test_unknown_method(self):
        response = yield self.call("Test.nope")
        self.assertEqual(response["error"]["code"], -32601)
        self.assertIn("Test.nope", response["error"]["message"])

    @defer.inlineCallbacks
    def test_bad_params(self):
        response = yield self.call("Test.big", {"size": "many"})
        self.assertEqual(response["error"]["code"], -32602)
        response = yield self.call("Test.echo", {"value": 1, "extra": 2})
        self.assertEqual(response["error"]["code"], -32602)
        response = yield self.call("Test.echo", {})
        self.assertEqual(response["error"]["code"], -32602)
        self.assertEqual(self.ns.calls, [])

    @defer.inlineCallbacks
    def test_errors_keep_the_connection(self):
        response = yield self.call("Test.fail")
        self.assertEqual(response["error"], {"code": 1, "message": "no such VM: test"})
        response = yield self.call("Test.crash")
        self.assertEqual(response["error"]["code"], 100)
        self.assertIn("boom", response["error"]["message"])
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)
        response = yield self.call("Test.unserializable")
        self.assertEqual(response["error"]["code"], -32603)
        response = yield self.call("Test.echo", {"value": "still up"})
        self.assertEqual(response, {"result": "still up"})
        self.assertFalse(self.client.lost.called)

    @defer.inlineCallbacks
    def test_broken_json_params_answer_invalid_params(self):
        answer = yield self.client.callRemote(RawParamsCall, method="Test.echo", params=b"{nope")
        self.assertEqual(answer["response"]["error"]["code"], -32602)
        response = yield self.call("Test.echo", {"value": 1})
        self.assertEqual(response, {"result": 1})

    @defer.inlineCallbacks
    def test_unknown_amp_command_is_unhandled_and_connection_stays(self):
        with self.assertRaises(amp.UnhandledCommand):
            yield self.client.callRemote(NoSuchCommand, x=1)
        response = yield self.call("Test.echo", {"value": "after"})
        self.assertEqual(response, {"result": "after"})
        self.assertFalse(self.client.lost.called)

    @defer.inlineCallbacks
    def test_large_response_and_request_travel(self):
        response = yield self.call("Test.big", {"size": 300_000})
        self.assertEqual(response, {"result": "x" * 300_000})
        value = "y" * 200_000
        response = yield self.call("Test.echo", {"value": value})
        self.assertEqual(response, {"result": value})

    @defer.inlineCallbacks
    def test_subscribe_and_event(self):
        yield self.client.callRemote(Subscribe, subscribe=True)
        self.assertEqual(self.service.amp_hub.subscribers, [self.server_side()])
        waiting = self.client.next_event()
        self.bus.publish("|virt|VM_status|vm-1", {"vm-1": {"status": "Up"}})
        method, params = yield waiting
        self.assertEqual(method, "|virt|VM_status|vm-1")
        self.assertEqual(params["vm-1"], {"status": "Up"})
        self.assertIsInstance(params["notify_time"], int)
        # A big event travels too (BigJSON).
        waiting = self.client.next_event()
        self.bus.publish("|big|event|x", {"blob": "z" * 100_000})
        method, params = yield waiting
        self.assertEqual(params["blob"], "z" * 100_000)
        yield self.client.callRemote(Subscribe, subscribe=False)
        self.assertEqual(self.service.amp_hub.subscribers, [])

    @defer.inlineCallbacks
    def test_lost_connection_unsubscribes(self):
        yield self.client.callRemote(Subscribe, subscribe=True)
        self.assertEqual(len(self.service.amp_hub.subscribers), 1)
        self.client.transport.loseConnection()
        yield self.client.lost
        yield self.wait_until(lambda: not self.service.amp_hub.subscribers)
        # publishing now reaches nobody and fails nothing
        self.bus.publish("|virt|VM_status|vm-1", {})

    def server_side(self):
        (tls,) = self.service.factory.protocols
        return tls.wrappedProtocol.inner

    @defer.inlineCallbacks
    def wait_until(self, predicate, timeout=5.0):
        from twisted.internet import reactor, task
        for _ in range(int(timeout / 0.01)):
            if predicate():
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.fail("condition not reached")


class LimitTests(ListenerMixin, unittest.TestCase):

    @defer.inlineCallbacks
    def test_oversized_box_aborts_that_connection_only(self):
        paths = self.make_pki()
        service = yield self.start_listener(paths, stomp_factory=no_stomp, max_message_size=20_000)
        other = yield self.connect_amp(service.port, good_client(paths))
        client = yield self.connect_amp(service.port, good_client(paths))
        d = client.callRemote(Call, method="Test.echo", params={"value": "v" * 30_000})
        yield self.assertFailure(d, Exception)
        yield client.lost
        self.assertEqual(self.ns.calls, [])
        # a box under the limit still works on the other connection and a new one
        answer = yield other.callRemote(Call, method="Test.echo", params={"value": "ok"})
        self.assertEqual(answer["response"], {"result": "ok"})
        again = yield self.connect_amp(service.port, good_client(paths))
        answer = yield again.callRemote(Call, method="Test.echo", params={"value": "v" * 15_000})
        self.assertEqual(answer["response"], {"result": "v" * 15_000})

    @defer.inlineCallbacks
    def test_too_many_pending_calls_answer_server_busy(self):
        paths = self.make_pki()
        service = yield self.start_listener(paths, stomp_factory=no_stomp, max_pending_requests=2)
        client = yield self.connect_amp(service.port, good_client(paths))
        first = client.callRemote(Call, method="Test.slow", params={})
        second = client.callRemote(Call, method="Test.slow", params={})
        third = yield client.callRemote(Call, method="Test.slow", params={})
        self.assertEqual(third["response"]["error"]["code"], 101)
        self.assertEqual(len(self.ns.waiting), 2)
        self.ns.waiting[0].callback("one")
        self.assertEqual((yield first)["response"], {"result": "one"})
        # a slot is free again
        fourth = client.callRemote(Call, method="Test.echo", params={"value": 4})
        self.assertEqual((yield fourth)["response"], {"result": 4})
        self.ns.waiting[1].callback(None)
        self.assertEqual((yield second)["response"], {"result": True})


class HubTests(unittest.TestCase):

    def test_failing_connection_is_dropped_others_still_served(self):
        sent = []

        class Good:
            def callRemote(self, command, **kw):
                sent.append(kw)

        class Broken:
            def callRemote(self, command, **kw):
                raise amp.ProtocolSwitched("gone")

        hub = AmpEventHub()
        good, broken = Good(), Broken()
        hub.subscribe(broken)
        hub.subscribe(good)
        hub.event_sink("|a|b|c", {"x": 1})
        self.assertEqual(sent, [{"method": "|a|b|c", "params": {"x": 1}}])
        self.assertEqual(hub.subscribers, [good])
        self.assertEqual(len(self.flushLoggedErrors(amp.ProtocolSwitched)), 1)
