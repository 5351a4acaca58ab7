"""
The AMP client against an in-test AMP server over real loopback TCP.
"""

from __future__ import annotations

from twisted.internet import defer, endpoints, reactor
from twisted.internet.protocol import Factory
from twisted.internet.task import Clock
from twisted.protocols import amp
from twisted.trial import unittest

from vdsm_twisted.api import errors
from vdsm_twisted.client import CallTimeout, Disconnected, connect_endpoint
from vdsm_twisted.protocols.amp_commands import Call, Event, Subscribe


class FakeAmpServer(amp.AMP):

    def connectionMade(self):
        super().connectionMade()
        self.closed = defer.Deferred()
        self.subscribed = None
        self.factory.connections.append(self)

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.closed.callback(None)

    @Call.responder
    def call(self, method, params, flow_id=None):
        f = self.factory
        f.calls.append((method, params, flow_id))
        if method in f.drop_once:
            f.drop_once.discard(method)
            self.transport.loseConnection()
            return defer.Deferred()
        if method == "Test.hold":
            return defer.Deferred()
        if f.recovering.get(method, 0) > 0:
            f.recovering[method] -= 1
            return {"response": {"error": {"code": 99, "message": "Recovering"}}}
        if method == "VM.getStats":
            return {"response": {"error": {"code": 1, "message": "no VM with that id"}}}
        if method == "Test.broken":
            raise RuntimeError("oops")
        return {"response": {"result": {"method": method, "params": params}}}

    @Subscribe.responder
    def subscribe(self, subscribe):
        self.subscribed = subscribe
        self.factory.fire("subscribed", self)
        return {}

    def event(self, method, params):
        self.callRemote(Event, method=method, params=params)


class FakeAmpServerFactory(Factory):
    protocol = FakeAmpServer

    def __init__(self):
        self.connections = []
        self.calls = []
        self.drop_once = set()
        self.recovering = {}  # method -> how many more calls answer code 99
        self._waiting = {}

    def wait(self, what):
        d = defer.Deferred()
        self._waiting.setdefault(what, []).append(d)
        return d

    def fire(self, what, value):
        for d in self._waiting.pop(what, []):
            d.callback(value)

    def all_closed(self):
        return defer.gatherResults([c.closed for c in self.connections if not c.closed.called])


class AmpClientTests(unittest.TestCase):

    timeout = 20

    def setUp(self):
        self.server = FakeAmpServerFactory()
        port = reactor.listenTCP(0, self.server, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        self.endpoint = endpoints.TCP4ClientEndpoint(reactor, "127.0.0.1", port.getHost().port)

    async def _connect(self, **kw):
        client = await connect_endpoint(self.endpoint, protocol="amp", retry_policy=lambda n: 0.02, **kw)
        self.addCleanup(self._close, client)
        return client

    async def _close(self, client):
        await client.close()
        await self.server.all_closed()

    def run_async(self, coro):
        return defer.ensureDeferred(coro)

    def test_call_result_params_and_flow(self):
        async def go():
            client = await self._connect()
            result = await client.call("Host.getVMList", {"onlyUUID": True}, flow_id="flow-7")
            self.assertEqual(result, {"method": "Host.getVMList", "params": {"onlyUUID": True}})
            self.assertEqual(await client.call("Host.ping2"), {"method": "Host.ping2", "params": {}})
            self.assertEqual(self.server.calls, [("Host.getVMList", {"onlyUUID": True}, "flow-7"),
                                                 ("Host.ping2", {}, None)])
            # The client spoke first (a Subscribe(False) greeting), asking for no events.
            self.assertIs(self.server.connections[0].subscribed, False)
        return self.run_async(go())

    def test_large_params_round_trip(self):
        async def go():
            client = await self._connect()
            big = {"xml": "x" * 200_000}
            result = await client.call("VM.create", big)
            self.assertEqual(result["params"], big)
        return self.run_async(go())

    def test_recovery_in_progress_is_waited_out_by_every_call(self):
        from vdsm_twisted.client import CallTimeout

        async def go():
            client = await self._connect()
            # Code 99 means "not run": even a non-idempotent call asks again.
            self.server.recovering = {"Host.getVMList": 3, "VM.destroy": 1}
            result = await client.call("Host.getVMList", timeout=10)
            self.assertEqual(result["method"], "Host.getVMList")
            self.assertEqual(self.server.recovering["Host.getVMList"], 0)
            result = await client.call("VM.destroy", {"vmID": "x"}, timeout=10)
            self.assertEqual(self.server.recovering["VM.destroy"], 0)
            # ... but only within its timeout.
            self.server.recovering = {"VM.destroy": 10 ** 6}
            with self.assertRaises(CallTimeout):
                await client.call("VM.destroy", {"vmID": "x"}, timeout=0.5)
        return self.run_async(go())

    def test_api_error_rebuilt(self):
        async def go():
            client = await self._connect()
            try:
                await client.call("VM.getStats", {"vmID": "x"})
            except errors.NoSuchVM as e:
                self.assertEqual((e.code, e.message), (1, "no VM with that id"))
            else:
                self.fail("no error")
            try:
                await client.call("Test.broken")
            except errors.ApiError as e:
                self.assertEqual(e.code, -32603)
            else:
                self.fail("no error")
            self.flushLoggedErrors(RuntimeError)
        return self.run_async(go())

    def test_events_and_resubscribe_after_reconnect(self):
        async def go():
            client = await self._connect()
            seen = []
            got = [defer.Deferred()]

            def on_event(method, params):
                seen.append((method, params))
                got[0].callback(None)
            await client.subscribe_events(on_event)
            first = self.server.connections[0]
            self.assertTrue(first.subscribed)
            first.event("|virt|VM_status|v1", {"v1": {"status": "Up"}})
            await got[0]
            self.assertEqual(seen, [("|virt|VM_status|v1", {"v1": {"status": "Up"}})])

            resubscribed = self.server.wait("subscribed")
            first.transport.loseConnection()
            second = await resubscribed
            self.assertIsNot(second, first)
            got[0] = defer.Deferred()
            second.event("|jobs|status|j1", {"j1": {"status": "done"}})
            await got[0]
            self.assertEqual(seen[-1], ("|jobs|status|j1", {"j1": {"status": "done"}}))
        return self.run_async(go())

    def test_idempotent_retried_non_idempotent_fails(self):
        async def go():
            client = await self._connect()
            self.server.drop_once.add("Host.getStats")
            result = await client.call("Host.getStats")
            self.assertEqual(result["method"], "Host.getStats")
            self.assertEqual([c[0] for c in self.server.calls], ["Host.getStats"] * 2)

            self.server.drop_once.add("VM.destroy")
            try:
                await client.call("VM.destroy", {"vmID": "x"})
            except Disconnected:
                pass
            else:
                self.fail("no Disconnected")
            self.assertEqual([c[0] for c in self.server.calls].count("VM.destroy"), 1)
            self.assertEqual((await client.call("Host.ping2"))["method"], "Host.ping2")
            self.assertEqual(len(self.server.connections), 3)
        return self.run_async(go())

    def test_timeout_with_clock(self):
        clock = Clock()

        async def go():
            client = await self._connect(reactor=clock, timeout=30)
            d = client.call("Test.hold", timeout=2)
            answered = client.call("Host.ping2", timeout=2)
            self.assertEqual((await answered)["method"], "Host.ping2")
            clock.advance(1.9)
            self.assertNoResult(d)
            clock.advance(0.2)
            self.failureResultOf(d, CallTimeout)
            d = client.call("Test.hold")
            clock.advance(30)
            self.failureResultOf(d, CallTimeout)
        return self.run_async(go())
