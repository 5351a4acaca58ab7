"""The Host namespace through the API dispatcher and the JSON-RPC server."""

import json

from twisted.internet import defer, task
from twisted.trial import unittest
from zope.interface.verify import verifyObject

from vdsm_twisted.api import errors
from vdsm_twisted.api.host import HostApi
from vdsm_twisted.api.jsonrpc import JsonRpcServer
from vdsm_twisted.api.registry import Api, CallContext, IApiNamespace
from vdsm_twisted.host.caps import CapabilitiesCache
from vdsm_twisted.host.stats import HostStatsSampler

VM1 = "11111111-1111-1111-1111-111111111111"
VM2 = "22222222-2222-2222-2222-222222222222"
VMS = [{"vmId": VM1, "status": "Up", "vmName": "a", "memSize": 1024},
       {"vmId": VM2, "status": "Down", "vmName": "b", "memSize": 512}]
CTX = CallContext("test", "peer")


class HostApiTests(unittest.TestCase):

    def setUp(self):
        from twisted.internet import reactor
        self.sampler = HostStatsSampler(60.0, clock=reactor)
        self.caps = CapabilitiesCache("/nonexistent/vdsm.id")
        self.vms = list(VMS)
        self.host = HostApi(self.caps, self.sampler, vm_list=lambda: self.vms)
        self.api = Api([self.host])

    def call(self, method, params=None):
        return self.api.call(method, {} if params is None else params, CTX)

    @defer.inlineCallbacks
    def assertApiError(self, d, cls):
        try:
            yield d
        except errors.ApiError as e:
            self.assertIsInstance(e, cls)
            return e
        self.fail(f"no {cls.__name__}")

    def test_provides_the_namespace(self):
        self.assertTrue(verifyObject(IApiNamespace, self.host))
        self.assertEqual(set(self.api.methods),
                         {"Host.ping2", "Host.getCapabilities", "Host.getStats",
                          "Host.getVMList"})

    @defer.inlineCallbacks
    def test_ping2(self):
        self.assertIs((yield self.call("Host.ping2")), True)

    @defer.inlineCallbacks
    def test_get_stats_from_the_sampler(self):
        self.sampler.sample()
        s = yield self.call("Host.getStats")
        self.assertIn("lo", s["network"])
        for key in ("cpuUser", "cpuSys", "cpuIdle", "cpuLoad", "memUsed", "memFree",
                    "memAvailable", "swapTotal", "swapFree", "elapsedTime", "bootTime",
                    "cpuStatistics", "numaNodeMemFree", "vmCount", "vmActive"):
            self.assertIn(key, s)
        json.dumps(s)

    @defer.inlineCallbacks
    def test_get_capabilities_real(self):
        c = yield self.call("Host.getCapabilities")
        self.assertEqual(c["kvmEnabled"], "true")
        self.assertEqual(c["vmTypes"], ["kvm"])
        again = yield self.call("Host.getCapabilities", [])
        self.assertEqual(again, c)

    @defer.inlineCallbacks
    def test_get_vm_list(self):
        self.assertEqual((yield self.call("Host.getVMList")),
                         [{"vmId": VM1, "status": "Up"}, {"vmId": VM2, "status": "Down"}])
        self.assertEqual((yield self.call("Host.getVMList", {"onlyUUID": True})), [VM1, VM2])
        self.assertEqual((yield self.call("Host.getVMList", {"fullStatus": True})), VMS)
        self.assertEqual((yield self.call("Host.getVMList",
                                          {"vmList": [VM2, "unknown"], "fullStatus": True})),
                         [VMS[1]])
        self.assertEqual((yield self.call("Host.getVMList", [False, [VM1], True])), [VM1])

    @defer.inlineCallbacks
    def test_get_vm_list_without_a_driver_is_empty(self):
        api = Api([HostApi(self.caps, self.sampler)])
        self.assertEqual((yield api.call("Host.getVMList", {"fullStatus": True}, CTX)), [])

    @defer.inlineCallbacks
    def test_vm_list_may_be_asynchronous(self):
        clock = task.Clock()
        host = HostApi(self.caps, self.sampler,
                       vm_list=lambda: task.deferLater(clock, 1, lambda: VMS))
        d = Api([host]).call("Host.getVMList", {"onlyUUID": True}, CTX)
        self.assertNoResult(d)
        clock.advance(1)
        self.assertEqual((yield d), [VM1, VM2])

    @defer.inlineCallbacks
    def test_bad_params(self):
        e = yield self.assertApiError(self.call("Host.getVMList", {"fullStatus": "yes"}),
                                      errors.InvalidParams)
        self.assertEqual(e.code, -32602)
        self.assertIn("fullStatus", e.message)
        e = yield self.assertApiError(self.call("Host.getVMList", {"everything": True}),
                                      errors.InvalidParams)
        self.assertIn("everything", e.message)
        yield self.assertApiError(self.call("Host.getVMList", {"vmList": "abc"}),
                                  errors.InvalidParams)
        e = yield self.assertApiError(self.call("Host.getVMList", {"vmList": [1]}),
                                      errors.InvalidParams)
        self.assertIn("vmList", e.message)
        yield self.assertApiError(self.call("Host.getStats", {"x": 1}), errors.InvalidParams)
        yield self.assertApiError(self.call("Host.ping2", [1]), errors.InvalidParams)
        yield self.assertApiError(self.call("Host.getAllVmStats"), errors.MethodNotFound)

    @defer.inlineCallbacks
    def test_broken_driver_is_a_general_error(self):
        def broken():
            raise KeyError("vmId")
        api = Api([HostApi(self.caps, self.sampler, vm_list=broken)])
        e = yield self.assertApiError(api.call("Host.getVMList", {}, CTX), errors.GeneralError)
        self.assertEqual(e.code, 100)
        self.assertEqual(len(self.flushLoggedErrors(KeyError)), 1)

    @defer.inlineCallbacks
    def test_over_json_rpc(self):
        server = JsonRpcServer(self.api)
        body = json.dumps([
            {"jsonrpc": "2.0", "method": "Host.ping2", "params": {}, "id": "a"},
            {"jsonrpc": "2.0", "method": "Host.getStats", "params": {}, "id": "b"},
            {"jsonrpc": "2.0", "method": "Host.getVMList",
             "params": {"fullStatus": "yes"}, "id": "c"},
        ]).encode()
        responses = {r["id"]: r for r in json.loads((yield server.handle(body, CTX)))}
        self.assertIs(responses["a"]["result"], True)
        self.assertIn("cpuIdle", responses["b"]["result"])
        self.assertEqual(responses["c"]["error"]["code"], -32602)
