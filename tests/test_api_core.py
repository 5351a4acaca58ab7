"""The API table, its dispatcher and JSON-RPC 2.0, without any network."""

import json
import socket

from twisted.trial import unittest
from zope.interface import implementer

from vdsm_twisted.api import errors, schema
from vdsm_twisted.api.events import EventBus, vdsm_time_ms
from vdsm_twisted.api.jsonrpc import JsonRpcServer
from vdsm_twisted.api.registry import Api, CallContext, IApiNamespace
from vdsm_twisted.common import sdnotify

METHODS = (
    schema.Method("Test", "echo", "Echo.", (schema.Param("value", schema.ANY, "v"),),
                  idempotent=True),
    schema.Method("Test", "typed", "Types.", (
        schema.Param("vmID", schema.UUID, "uuid"),
        schema.Param("count", schema.INT, "n", 1),
        schema.Param("flag", schema.BOOL, "b", False))),
    schema.Method("Test", "nothing", "Returns None."),
    schema.Method("Test", "boom", "Raises."),
    schema.Method("Test", "unjsonable", "Returns a set."),
    schema.Method("Test", "alive", "Answers during recovery.", during_recovery=True),
    schema.Method("Test", "unimplemented", "No verb bound."),
)


@implementer(IApiNamespace)
class TestNamespace:
    namespace = "Test"

    def echo(self, value):
        return value

    def typed(self, vmID, count, flag):
        return {"vmID": vmID, "count": count, "flag": flag}

    def nothing(self):
        return None

    def boom(self):
        raise RuntimeError("kaboom")

    def unjsonable(self):
        return {1, 2}

    def alive(self):
        return "yes"


CTX = CallContext("test", "peer", "flow-9")


def make_server():
    api = Api([TestNamespace()], methods=METHODS)
    return api, JsonRpcServer(api, max_batch_size=3)


class JsonRpcTests(unittest.TestCase):
    def handle(self, body):
        _, server = make_server()
        d = server.handle(body if isinstance(body, bytes) else json.dumps(body).encode(), CTX)
        return self.successResultOf(d)

    def answer(self, body):
        raw = self.handle(body)
        return None if raw is None else json.loads(raw)

    def test_result(self):
        self.assertEqual(
            self.answer({"jsonrpc": "2.0", "method": "Test.echo", "params": {"value": [1]}, "id": "a"}),
            {"jsonrpc": "2.0", "id": "a", "result": [1]})

    def test_none_is_true(self):
        self.assertEqual(self.answer({"jsonrpc": "2.0", "method": "Test.nothing", "id": 1})["result"], True)

    def test_positional_params(self):
        uid = "6f1c7c8e-6a36-4a53-8a3c-2b1d0f1e0a11"
        self.assertEqual(
            self.answer({"jsonrpc": "2.0", "method": "Test.typed", "params": [uid, 3], "id": 1})["result"],
            {"vmID": uid, "count": 3, "flag": False})

    def test_one_element_batch_answered_bare(self):
        answer = self.answer([{"jsonrpc": "2.0", "method": "Test.echo", "params": {"value": 1}, "id": 5}])
        self.assertEqual(answer, {"jsonrpc": "2.0", "id": 5, "result": 1})

    def test_batch_answered_as_array(self):
        answer = self.answer([
            {"jsonrpc": "2.0", "method": "Test.echo", "params": {"value": 1}, "id": 1},
            {"jsonrpc": "2.0", "method": "Test.echo", "params": {"value": 2}},  # notification
            {"jsonrpc": "2.0", "method": "Test.nope", "id": 3}])
        self.assertEqual(answer[0]["result"], 1)
        self.assertEqual(answer[1]["error"]["code"], -32601)
        self.assertEqual(len(answer), 2)

    def test_batch_limits(self):
        self.assertEqual(self.answer([])["error"]["code"], -32600)
        big = [{"jsonrpc": "2.0", "method": "Test.nothing", "id": i} for i in range(4)]
        self.assertEqual(self.answer(big)["error"]["code"], -32600)

    def test_notification_gets_nothing(self):
        self.assertIsNone(self.answer({"jsonrpc": "2.0", "method": "Test.echo", "params": {"value": 1}}))

    def test_errors(self):
        cases = [
            (b"{not json", -32700),
            (b"\xff\xfe", -32700),
            ({"jsonrpc": "1.0", "method": "Test.echo", "id": 1}, -32600),
            ({"jsonrpc": "2.0", "method": 5, "id": 1}, -32600),
            ({"jsonrpc": "2.0", "method": "Test.echo", "id": {"x": 1}}, -32600),
            (["not an object"], -32600),
            ({"jsonrpc": "2.0", "method": "Nope.nope", "id": 1}, -32601),
            ({"jsonrpc": "2.0", "method": "Test.unimplemented", "id": 1}, -32601),
            ({"jsonrpc": "2.0", "method": "Test.echo", "params": {}, "id": 1}, -32602),
            ({"jsonrpc": "2.0", "method": "Test.echo", "params": {"value": 1, "x": 2}, "id": 1}, -32602),
            ({"jsonrpc": "2.0", "method": "Test.echo", "params": "str", "id": 1}, -32602),
            ({"jsonrpc": "2.0", "method": "Test.echo", "params": [1, 2], "id": 1}, -32602),
            ({"jsonrpc": "2.0", "method": "Test.typed", "params": {"vmID": "nope"}, "id": 1}, -32602),
            ({"jsonrpc": "2.0", "method": "Test.typed",
              "params": {"vmID": "6f1c7c8e-6a36-4a53-8a3c-2b1d0f1e0a11", "count": True}, "id": 1}, -32602),
            ({"jsonrpc": "2.0", "method": "Test.boom", "id": 1}, 100),
            ({"jsonrpc": "2.0", "method": "Test.unjsonable", "id": 1}, -32603),
        ]
        for body, code in cases:
            answer = self.answer(body)
            self.assertEqual(answer["error"]["code"], code, body)
        self.flushLoggedErrors(RuntimeError)

    def test_recovery_gate(self):
        api, server = make_server()
        api.recovering = True
        raw = self.successResultOf(server.handle(
            b'[{"jsonrpc":"2.0","method":"Test.echo","params":{"value":1},"id":1},'
            b'{"jsonrpc":"2.0","method":"Test.alive","id":2}]', CTX))
        first, second = json.loads(raw)
        self.assertEqual(first["error"]["code"], 99)
        self.assertEqual(second["result"], "yes")


class LateNamespaceTests(unittest.TestCase):
    """The VM side joins the API after the listener serves (Api.add)."""

    def call(self, api, name, params=None):
        return api.call(name, params or {}, CTX)

    def test_declared_but_not_loaded_yet_answers_99_while_recovering(self):
        api = Api([], methods=METHODS)
        api.recovering = True
        failure = self.failureResultOf(self.call(api, "Test.echo", {"value": 1}))
        self.assertEqual(failure.value.code, 99)
        # Parameters are still checked: a bad call is told so at once.
        failure = self.failureResultOf(self.call(api, "Test.typed", {"vmID": "nope"}))
        self.assertIsInstance(failure.value, errors.InvalidParams)
        failure = self.failureResultOf(self.call(api, "Test.noSuchVerb"))
        self.assertIsInstance(failure.value, errors.MethodNotFound)

    def test_added_namespaces_serve(self):
        api = Api([], methods=METHODS)
        api.add([TestNamespace()])
        self.assertEqual(self.successResultOf(self.call(api, "Test.echo", {"value": 2})), 2)
        # Declared without an implementation: unknown once start-up is over.
        failure = self.failureResultOf(self.call(api, "Test.unimplemented"))
        self.assertIsInstance(failure.value, errors.MethodNotFound)


class SchemaTests(unittest.TestCase):
    def test_every_method_has_docs_and_unique_name(self):
        names = [m.name for m in schema.METHODS]
        self.assertEqual(len(names), len(set(names)))
        for m in schema.METHODS:
            self.assertTrue(m.doc)
            for p in m.params:
                self.assertTrue(p.doc)

    def test_error_codes_round_trip(self):
        self.assertIsInstance(errors.from_code(1, "x"), errors.NoSuchVM)
        other = errors.from_code(2100, "storage")
        self.assertEqual((other.code, other.message), (2100, "storage"))


class EventBusTests(unittest.TestCase):
    def test_publish_reaches_sinks_and_survives_a_broken_one(self):
        bus = EventBus(clock=lambda: 1.5)
        got = []

        def broken(method, params):
            raise ValueError("sink bug")

        remove_broken = bus.add_sink(broken)
        remove = bus.add_sink(lambda m, p: got.append((m, p)))
        bus.publish("|virt|VM_status|x", {"x": {"status": "Up"}})
        self.assertEqual(got, [("|virt|VM_status|x",
                                {"x": {"status": "Up"}, "notify_time": 2 ** 31 - 1 + 1500})])
        self.assertEqual(len(self.flushLoggedErrors(ValueError)), 1)
        remove()
        remove_broken()
        bus.publish("|virt|VM_status|x", {})
        self.assertEqual(len(got), 1)

    def test_vdsm_time(self):
        self.assertEqual(vdsm_time_ms(lambda: 2.0), 2 ** 31 - 1 + 2000)


class SdNotifyTests(unittest.TestCase):
    def test_datagrams_reach_a_real_socket(self):
        path = self.mktemp()
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(path)
            self.assertTrue(sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": path}))
            self.assertEqual(sock.recv(100), b"READY=1")

    def test_abstract_namespace(self):
        name = f"vdsm-twisted-test-{id(self)}"
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.bind(b"\0" + name.encode())
            self.assertTrue(sdnotify.notify("STOPPING=1", environ={"NOTIFY_SOCKET": "@" + name}))
            self.assertEqual(sock.recv(100), b"STOPPING=1")

    def test_no_socket_is_a_no_op(self):
        self.assertFalse(sdnotify.notify("READY=1", environ={}))
        self.assertFalse(sdnotify.notify("READY=1", environ={"NOTIFY_SOCKET": "/nonexistent/x"}))


class LogLevelTests(unittest.TestCase):
    def test_set_level_filters_and_can_change_back(self):
        from twisted.logger import LogLevel, PredicateResult
        from vdsm_twisted.common import logging as vlogging

        self.addCleanup(vlogging.set_level, vlogging.current_level())
        pred = vlogging._PREDICATE
        vlogging.set_level("debug")
        self.assertEqual(pred({"log_level": LogLevel.debug, "log_namespace": "a.b"}),
                         PredicateResult.maybe)
        vlogging.set_level("warn")
        self.assertEqual(pred({"log_level": LogLevel.info, "log_namespace": "a.b"}),
                         PredicateResult.no)
        self.assertEqual(vlogging.current_level(), "warn")
