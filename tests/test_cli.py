"""
The console scripts: vdsm-twisted-client (with a fake client, then as a real
process over real TLS) and vdsm-twisted-tool.
"""

from __future__ import annotations

import grp
import io
import json
import os
import shutil
import stat
import sys
import tempfile

from twisted.internet import defer, reactor, ssl
from twisted.internet.utils import getProcessOutputAndValue
from twisted.trial import unittest

from tests.test_client_stomp import FakeServerFactory
from vdsm_twisted.api import errors, schema
from vdsm_twisted.client import CallTimeout, ConnectFailed, PkiError, cli, connect
from vdsm_twisted.client.testing import FakeClient, FakeConnect
from vdsm_twisted.tool import cli as tool

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class ClientCliTests(unittest.SynchronousTestCase):

    def run_cli(self, argv, connect=None, stdin=""):
        self.out, self.err = io.StringIO(), io.StringIO()
        self.connect = connect or FakeConnect(FakeClient({
            "Host.getCapabilities": {"cpuCores": "4", "hostname": "h1"},
            "Host.ping2": True,
            "VM.getStats": lambda params: errors.NoSuchVM(f"no VM {params['vmID']}"),
            "VM.create": lambda params: params,
            "Host.getStats": CallTimeout("Host.getStats: no answer"),
        }))
        d = defer.ensureDeferred(cli.run(None, argv, connect=self.connect, stdout=self.out,
                                         stderr=self.err, stdin=io.StringIO(stdin)))
        return self.successResultOf(d)

    @property
    def client(self):
        return self.connect.client

    def test_call_prints_indented_json(self):
        self.assertEqual(self.run_cli(["Host", "getCapabilities"]), 0)
        self.assertEqual(self.out.getvalue(), '{\n    "cpuCores": "4",\n    "hostname": "h1"\n}\n')
        self.assertEqual(self.err.getvalue(), "")
        [call] = self.client.calls
        self.assertEqual((call.method, call.params, call.timeout, call.flow_id),
                         ("Host.getCapabilities", {}, 60.0, None))
        self.assertTrue(self.client.closed)

    def test_connection_options(self):
        self.run_cli(["--host", "h2", "--port", "1234", "--pki", "/p", "--protocol", "amp",
                      "--timeout", "5", "--no-verify-hostname", "--flow-id", "f9", "Host.ping2"])
        [kw] = self.connect.kwargs
        self.assertEqual({k: v for k, v in kw.items() if k != "reactor"},
                         {"host": "h2", "port": 1234, "pki_dir": "/p", "protocol": "amp",
                          "timeout": 5.0, "verify_hostname": False})
        [call] = self.client.calls
        self.assertEqual((call.method, call.timeout, call.flow_id), ("Host.ping2", 5.0, "f9"))
        self.assertEqual(self.out.getvalue(), "true\n")

    def test_key_value_params_parse_as_json_else_string(self):
        self.assertEqual(self.run_cli(["VM", "create", "n=3", "on=true", "name=web 1", "obj={\"a\": [1]}",
                                       "empty=", "uuid=6f1c-x", "eq=a=b"]), 0)
        self.assertEqual(self.client.calls[0].params,
                         {"n": 3, "on": True, "name": "web 1", "obj": {"a": [1]}, "empty": "",
                          "uuid": "6f1c-x", "eq": "a=b"})

    def test_params_json_and_stdin(self):
        self.run_cli(["--params", '{"vmParams": {"memSize": 512}}', "VM", "create"])
        self.assertEqual(self.client.calls[0].params, {"vmParams": {"memSize": 512}})
        self.run_cli(["--params", "-", "VM", "create"], stdin='["a", 1]')
        self.assertEqual(self.client.calls[0].params, ["a", 1])

    def test_usage_errors(self):
        for argv in (["Host"], [], ["--params", "{}", "VM", "create", "a=1"],
                     ["--params", "nope", "VM", "create"], ["--params", "3", "VM", "create"],
                     ["VM", "create", "novalue"], ["--events", "Host", "ping2"]):
            self.assertEqual(self.run_cli(argv), 2, argv)
            self.assertTrue(self.err.getvalue(), argv)
            self.assertEqual(self.connect.kwargs, [], argv)

    def test_argparse_error_returns_2(self):
        stderr = sys.stderr
        sys.stderr = io.StringIO()
        try:
            self.assertEqual(self.run_cli(["--port", "x", "Host", "ping2"]), 2)
        finally:
            sys.stderr = stderr

    def test_api_error(self):
        self.assertEqual(self.run_cli(["VM", "getStats", "vmID=v1"]), 1)
        self.assertEqual(self.err.getvalue(), "error 1: no VM v1\n")
        self.assertEqual(self.out.getvalue(), "")
        self.assertEqual(self.run_cli(["Host", "nothing"]), 1)
        self.assertEqual(self.err.getvalue(), "error -32601: Method not found: Host.nothing\n")

    def test_timeout_exit_2(self):
        self.assertEqual(self.run_cli(["Host", "getStats"]), 2)
        self.assertIn("no answer from localhost:54321", self.err.getvalue())

    def test_connection_failures_exit_2(self):
        for error in (ConnectFailed(string="Connection refused"), PkiError("cannot read /x: nope")):
            self.assertEqual(self.run_cli(["Host", "ping2"], connect=FakeConnect(error=error)), 2)
            self.assertIn("cannot connect to localhost:54321", self.err.getvalue())
            self.assertEqual(self.out.getvalue(), "")

    def test_events(self):
        d = defer.ensureDeferred(cli.run(None, ["--events"], connect=(fake := FakeConnect()),
                                         stdout=(out := io.StringIO()), stderr=io.StringIO()))
        self.assertNoResult(d)
        fake.client.emit("|virt|VM_status|v1", {"v1": {"status": "Up"}, "notify_time": 7})
        fake.client.emit("|net|host_conn|no_id", {})
        lines = [json.loads(line) for line in out.getvalue().splitlines()]
        self.assertEqual(lines, [{"method": "|virt|VM_status|v1",
                                  "params": {"v1": {"status": "Up"}, "notify_time": 7}},
                                 {"method": "|net|host_conn|no_id", "params": {}}])
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertTrue(fake.client.closed)


class FakeClientTests(unittest.SynchronousTestCase):

    def test_records_and_answers(self):
        client = FakeClient({"Host.ping2": True, "VM.create": defer.succeed({"vmId": "x"})})
        self.assertIs(self.successResultOf(client.call("Host.ping2", timeout=3, flow_id="f")), True)
        self.assertEqual(self.successResultOf(client.call("VM.create", {"a": 1})), {"vmId": "x"})
        self.failureResultOf(client.call("VM.nope"), errors.MethodNotFound)
        self.assertEqual([(c.method, c.params, c.timeout, c.flow_id) for c in client.calls],
                         [("Host.ping2", None, 3, "f"), ("VM.create", {"a": 1}, None, None),
                          ("VM.nope", None, None, None)])


class ToolTests(unittest.TestCase):

    timeout = 30

    def setUp(self):
        self.dir = tempfile.mkdtemp()
        self.addCleanup(shutil.rmtree, self.dir)

    def tool(self, argv):
        out, err = io.StringIO(), io.StringIO()
        code = tool.main(argv, stdout=out, stderr=err)
        return code, out.getvalue(), err.getvalue()

    @defer.inlineCallbacks
    def test_pki_is_usable(self):
        pki_dir = os.path.join(self.dir, "pki")
        code, out, err = self.tool(["pki", "--dir", pki_dir, "--hostname", "localhost", "--group", "vdsm"])
        self.assertEqual((code, err), (0, ""))
        self.assertIn(os.path.join(pki_dir, "certs", "cacert.pem"), out)
        key = os.path.join(pki_dir, "keys", "vdsmkey.pem")
        self.assertEqual(os.stat(key).st_gid, grp.getgrnam("vdsm").gr_gid)
        self.assertEqual(stat.S_IMODE(os.stat(os.path.join(pki_dir, "private", "cakey.pem")).st_mode), 0o600)

        # Refuses to replace the CA, unless forced.
        with open(os.path.join(pki_dir, "certs", "cacert.pem"), "rb") as f:
            ca = f.read()
        code, out, err = self.tool(["pki", "--dir", pki_dir, "--hostname", "localhost"])
        self.assertEqual(code, 1)
        self.assertIn("already holds a CA", err)
        code, out, err = self.tool(["pki", "--dir", pki_dir, "--hostname", "localhost", "--force"])
        self.assertEqual(code, 0)
        with open(os.path.join(pki_dir, "certs", "cacert.pem"), "rb") as f:
            self.assertNotEqual(f.read(), ca)

        # A TLS server from the host cert accepts the client cert.
        with open(os.path.join(pki_dir, "certs", "vdsmcert.pem"), "rb") as c, open(key, "rb") as k, \
                open(os.path.join(pki_dir, "certs", "cacert.pem"), "rb") as a:
            mine = ssl.PrivateCertificate.loadPEM(c.read() + k.read())
            trust = ssl.Certificate.loadPEM(a.read())
        server = FakeServerFactory()
        port = reactor.listenSSL(0, server, ssl.CertificateOptions(
            privateKey=mine.privateKey.original, certificate=mine.original, trustRoot=trust),
            interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        client = yield connect("localhost", port.getHost().port, pki_dir=pki_dir, timeout=10)
        self.assertIs((yield client.call("Host.ping2")), True)
        yield client.close()
        yield server.all_closed()

        # And so does the real command line, as a separate process.
        code_, out, err = yield self._client_process(
            ["--port", str(port.getHost().port), "--pki", pki_dir, "Host", "ping2"])
        self.assertEqual((code_, out, err), (0, b"true\n", b""))
        yield server.all_closed()

    def _client_process(self, argv):
        env = dict(os.environ, PYTHONPATH=ROOT)
        d = getProcessOutputAndValue(sys.executable, ["-m", "vdsm_twisted.client.cli"] + argv,
                                     env=env, path=ROOT)
        return d.addCallback(lambda r: (r[2], r[0], r[1]))

    @defer.inlineCallbacks
    def test_client_process_connection_failure(self):
        code, out, err = yield self._client_process(
            ["--port", "1", "--pki", self.dir, "Host", "ping2"])
        self.assertEqual((code, out), (2, b""))
        self.assertIn(b"cannot connect to localhost:1", err)
        self.assertIn(b"cacert.pem", err)

    def test_pki_bad_group(self):
        code, out, err = self.tool(["pki", "--dir", self.dir + "/x", "--group", "no-such-group-xyz"])
        self.assertEqual(code, 1)
        self.assertIn("no such group", err)

    def test_sample_configs(self):
        from privd.config import SCHEMA as PRIVD
        from vdsm_twisted.config import SCHEMA as VDSM
        for which, sch in (("vdsm", VDSM), ("privd", PRIVD)):
            code, out, err = self.tool(["sample-config", which])
            self.assertEqual((code, err), (0, ""))
            self.assertEqual(out, sch.render_sample(tool.SAMPLE_HEADERS[which]))
            self.assertTrue(out.startswith("# vdsm-twisted"))
            self.assertEqual(sch.documented_in(out), [])
            # The sample, as is, loads to the defaults.
            self.assertEqual(sch.parse_text(out).values, sch.defaults().values)

    def test_api_doc(self):
        code, out, err = self.tool(["api-doc"])
        self.assertEqual(code, 0)
        self.assertEqual(out, schema.render_markdown())
        self.assertIn("### `Host.ping2`", out)

    def test_usage(self):
        stderr = sys.stderr
        sys.stderr = io.StringIO()
        try:
            self.assertEqual(self.tool([])[0], 2)
            self.assertEqual(self.tool(["sample-config", "nope"])[0], 2)
        finally:
            sys.stderr = stderr
