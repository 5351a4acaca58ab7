"""
The QMP client: the wire logic against scripted peers (StringTransport, task.Clock,
a fake server on a real UNIX socket), then against a real QEMU.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import tempfile

from twisted.internet import defer, reactor, task
from twisted.internet.endpoints import UNIXServerEndpoint
from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial import unittest

from vdsm_twisted.virt.qemu import qmp
from vdsm_twisted.virt.qemu.qmp import (
    QMPDisconnected, QMPError, QMPProtocol, QMPProtocolError, QMPTimeout, connect_qmp)

VERSION = {"qemu": {"major": 7, "minor": 2, "micro": 22}, "package": "test"}
GREETING = json.dumps({"QMP": {"version": VERSION, "capabilities": ["oob"]}}).encode() + b"\r\n"


def line(obj) -> bytes:
    return json.dumps(obj).encode() + b"\r\n"


class Wire:
    """A QMPProtocol on a StringTransport, with the peer's side scripted by the test."""

    def __init__(self, **kwargs):
        self.clock = task.Clock()
        self.proto = QMPProtocol(clock=self.clock, **kwargs)
        self.transport = StringTransport()
        self.proto.makeConnection(self.transport)
        self.events = []
        self.proto.event_handler = lambda *a: self.events.append(a)

    def sent(self) -> list[dict]:
        """The messages written since the last call."""
        data = self.transport.value()
        self.transport.clear()
        assert data == b"" or data.endswith(b"\n")
        return [json.loads(x) for x in data.splitlines()]

    def feed(self, *messages) -> None:
        self.proto.dataReceived(b"".join(m if isinstance(m, bytes) else line(m) for m in messages))

    def negotiate(self) -> None:
        self.feed(GREETING)
        [cap] = self.sent()
        self.feed({"return": {}, "id": cap["id"]})
        self.lose_if_aborted()

    def lose(self, reason=None) -> None:
        self.proto.connectionLost(Failure(reason or ConnectionDone()))

    def lose_if_aborted(self) -> None:
        if self.transport.disconnecting or getattr(self.transport, "disconnected", False):
            self.lose(ConnectionLost())


class NegotiationTests(unittest.TestCase):

    def test_greeting_then_capabilities_then_ready(self):
        w = Wire()
        self.assertEqual(w.sent(), [])
        w.feed(GREETING[:17])  # the greeting in pieces, CRLF-terminated as QEMU sends it
        self.assertEqual(w.sent(), [])
        w.feed(GREETING[17:])
        self.assertEqual(w.sent(), [{"execute": "qmp_capabilities", "id": 1}])
        self.assertNoResult(w.proto.when_ready())
        w.feed({"return": {}, "id": 1})
        self.assertEqual(self.successResultOf(w.proto.ready), VERSION)
        self.assertEqual(self.successResultOf(w.proto.when_ready()), VERSION)
        self.assertEqual(w.proto.version, VERSION)
        self.assertEqual(w.proto.capabilities, ["oob"])

    def test_not_a_greeting_drops_the_connection(self):
        w = Wire()
        w.feed({"event": "STOP", "data": {}})
        self.assertTrue(w.transport.disconnecting)
        self.failureResultOf(w.proto.ready, QMPProtocolError)
        w.lose(ConnectionLost())
        self.assertIsInstance(self.successResultOf(w.proto.closed), ConnectionLost)

    def test_capabilities_refused(self):
        w = Wire()
        w.feed(GREETING)
        w.feed({"error": {"class": "CommandNotFound", "desc": "nope"}, "id": 1})
        f = self.failureResultOf(w.proto.ready, QMPError)
        self.assertEqual((f.value.cls, f.value.desc), ("CommandNotFound", "nope"))
        self.assertTrue(w.transport.disconnecting)

    def test_disconnect_before_greeting_fails_ready(self):
        w = Wire()
        w.lose()
        self.failureResultOf(w.proto.ready, QMPDisconnected)
        self.assertIsInstance(self.successResultOf(w.proto.closed), ConnectionDone)


class CallTests(unittest.TestCase):

    def setUp(self):
        self.w = Wire()
        self.w.negotiate()
        self.assertEqual(self.successResultOf(self.w.proto.ready), VERSION)

    def test_ids_match_replies_out_of_order_with_interleaved_events(self):
        w = self.w
        a = w.proto.execute("query-status")
        b = w.proto.execute("query-block", timeout=30)
        c = w.proto.execute("human-monitor-command", {"command-line": "info"})
        sa, sb, sc = w.sent()
        self.assertEqual(sa, {"execute": "query-status", "id": sa["id"]})
        self.assertEqual(sc["arguments"], {"command-line": "info"})
        self.assertEqual(len({sa["id"], sb["id"], sc["id"]}), 3)
        w.feed({"event": "STOP", "data": {}, "timestamp": {"seconds": 100, "microseconds": 250000}},
               {"return": ["block"], "id": sb["id"]},
               {"event": "SHUTDOWN", "data": {"guest": True, "reason": "guest-shutdown"},
                "timestamp": {"seconds": 101, "microseconds": 0}},
               {"return": "text", "id": sc["id"]})
        self.assertNoResult(a)
        self.assertEqual(self.successResultOf(b), ["block"])
        self.assertEqual(self.successResultOf(c), "text")
        w.feed({"event": "RESUME"}, {"return": {"status": "running"}, "id": sa["id"]})
        self.assertEqual(self.successResultOf(a), {"status": "running"})
        self.assertEqual(w.events, [
            ("STOP", {}, 100.25),
            ("SHUTDOWN", {"guest": True, "reason": "guest-shutdown"}, 101.0),
            ("RESUME", {}, None)])
        self.assertEqual(w.clock.getDelayedCalls(), [])  # b's timer went with its reply

    def test_error_reply(self):
        w = self.w
        d = w.proto.execute("eject", {"id": "nope"})
        [sent] = w.sent()
        w.feed({"error": {"class": "DeviceNotFound", "desc": "Device 'nope' not found"},
                "id": sent["id"]})
        f = self.failureResultOf(d, QMPError)
        self.assertEqual(f.value.cls, "DeviceNotFound")
        self.assertEqual(f.value.desc, "Device 'nope' not found")
        self.assertEqual(str(f.value), "DeviceNotFound: Device 'nope' not found")
        # the connection is still fine
        d2 = w.proto.query_status()
        w.feed({"return": {"status": "paused", "running": False}, "id": w.sent()[0]["id"]})
        self.assertEqual(self.successResultOf(d2), "paused")

    def test_timeout_keeps_id_reserved_and_drops_the_late_reply(self):
        w = self.w
        d = w.proto.execute("query-blockstats", timeout=5)
        [slow] = w.sent()
        w.clock.advance(4.9)
        self.assertNoResult(d)
        w.clock.advance(0.2)
        f = self.failureResultOf(d, QMPTimeout)
        self.assertEqual(f.value.command, "query-blockstats")
        d2 = w.proto.execute("query-status", timeout=5)
        [fast] = w.sent()
        self.assertNotEqual(fast["id"], slow["id"])
        # the late reply arrives first: it must not be taken for d2's
        w.feed({"return": ["late"], "id": slow["id"]})
        self.assertNoResult(d2)
        w.feed({"return": {"status": "running"}, "id": fast["id"]})
        self.assertEqual(self.successResultOf(d2), {"status": "running"})
        # a second late copy, or a reply nobody asked for, is dropped too
        w.feed({"return": [], "id": slow["id"]}, {"return": [], "id": 999}, {"return": [], "id": [1]})
        self.assertFalse(w.transport.disconnecting)
        self.assertEqual(w.clock.getDelayedCalls(), [])

    def test_cancel_abandons_the_call(self):
        w = self.w
        d = w.proto.execute("query-status", timeout=10)
        [sent] = w.sent()
        d.cancel()
        self.failureResultOf(d, defer.CancelledError)
        self.assertEqual(w.clock.getDelayedCalls(), [])
        w.feed({"return": {"status": "running"}, "id": sent["id"]})
        self.assertFalse(w.transport.disconnecting)

    def test_disconnect_fails_every_pending_call(self):
        w = self.w
        lost = []
        w.proto.connection_lost = lost.append
        calls = [w.proto.execute("query-status"), w.proto.execute("stop", timeout=3),
                 w.proto.execute("cont")]
        timed_out = w.proto.execute("query-block", timeout=1)
        w.clock.advance(1)
        self.failureResultOf(timed_out, QMPTimeout)
        w.lose(ConnectionLost("peer went away"))
        for d in calls:
            self.failureResultOf(d, QMPDisconnected)
        self.assertEqual(w.clock.getDelayedCalls(), [])
        self.assertIsInstance(self.successResultOf(w.proto.closed), ConnectionLost)
        self.assertIsInstance(self.successResultOf(w.proto.when_closed()), ConnectionLost)
        self.assertEqual(len(lost), 1)
        self.assertFalse(w.proto.is_connected)
        # later calls fail at once instead of hanging
        self.failureResultOf(w.proto.query_status(), QMPDisconnected)

    def test_quit_counts_a_lost_connection_as_done(self):
        w = self.w
        d = w.proto.quit()
        self.assertEqual(w.sent()[0]["execute"], "quit")
        w.feed({"event": "SHUTDOWN", "data": {"guest": False, "reason": "host-qmp-quit"}})
        w.lose()
        self.assertIsNone(self.successResultOf(d))

    def test_failing_event_handler_is_logged_and_the_connection_survives(self):
        w = self.w

        def broken(name, data, ts):
            raise RuntimeError("owner bug")
        w.proto.event_handler = broken
        d = w.proto.query_status()
        w.feed({"event": "RESET", "data": {"guest": True}}, {"return": {"status": "running"}, "id": w.sent()[0]["id"]})
        self.assertEqual(self.successResultOf(d), "running")
        self.assertEqual(len(self.flushLoggedErrors(RuntimeError)), 1)

    def test_helpers_send_what_qemu_7_2_expects(self):
        w = self.w
        p = w.proto
        cases = [
            (p.cont(), {"execute": "cont"}, {}, {}),
            (p.stop(), {"execute": "stop"}, {}, {}),
            (p.system_reset(), {"execute": "system_reset"}, {}, {}),
            (p.system_powerdown(), {"execute": "system_powerdown"}, {}, {}),
            (p.set_password("vnc", "s3cret"),
             {"execute": "set_password",
              "arguments": {"protocol": "vnc", "password": "s3cret"}}, {}, {}),
            (p.set_password("spice", "s3cret", connected="disconnect"),
             {"execute": "set_password",
              "arguments": {"protocol": "spice", "password": "s3cret", "connected": "disconnect"}},
             {}, {}),
            (p.expire_password("spice", 1700000000),
             {"execute": "expire_password", "arguments": {"protocol": "spice", "time": "1700000000"}},
             {}, {}),
            (p.query_blockstats(), {"execute": "query-blockstats"}, [], []),
            (p.query_block(), {"execute": "query-block"}, [{"device": "cd0"}], [{"device": "cd0"}]),
            (p.change_medium("cdrom0", "/x.iso"),
             {"execute": "blockdev-change-medium",
              "arguments": {"id": "cdrom0", "filename": "/x.iso", "format": "raw"}}, {}, {}),
            (p.change_medium("cdrom0", None),
             {"execute": "eject", "arguments": {"id": "cdrom0", "force": True}}, {}, {}),
            (p.query_cpus_fast(), {"execute": "query-cpus-fast"}, [{"cpu-index": 0}], [{"cpu-index": 0}]),
            (p.query_balloon(), {"execute": "query-balloon"}, {"actual": 1}, {"actual": 1}),
            (p.query_status(), {"execute": "query-status"}, {"status": "prelaunch"}, "prelaunch"),
        ]
        sent = w.sent()
        self.assertEqual(len(sent), len(cases))
        for (d, expected, reply, result), message in zip(cases, sent):
            cid = message.pop("id")
            self.assertEqual(message, expected)
            w.feed({"return": reply, "id": cid})
            self.assertEqual(self.successResultOf(d), result)


class BadInputTests(unittest.TestCase):
    """Buggy QEMU output drops that connection, fails its calls, and never raises."""

    def check_dropped(self, w: Wire, pending: list[defer.Deferred]) -> None:
        self.assertTrue(w.transport.disconnecting)
        self.assertFalse(w.proto.is_connected)
        self.failureResultOf(w.proto.query_status(), QMPDisconnected)
        w.feed({"event": "STOP"})  # ignored once dropped
        w.lose(ConnectionLost())
        for d in pending:
            self.failureResultOf(d, QMPDisconnected)
        self.assertIsInstance(self.successResultOf(w.proto.closed), ConnectionLost)
        self.assertEqual(w.events, [])

    def test_garbage_json(self):
        for garbage in [b'{"return": {}, "id": 1\n', b"\xff\xfe\n", b"[1, 2]\n", b"42\n",
                        b"[" * 100000 + b"\n"]:
            w = Wire()
            w.negotiate()
            d = w.proto.execute("query-status")
            w.feed(garbage)
            self.check_dropped(w, [d])

    def test_oversize_line(self):
        w = Wire(max_line_length=200)
        w.negotiate()
        d = w.proto.execute("query-block")
        cid = w.sent()[0]["id"]
        pad = 200 - (len(line({"return": "", "id": cid})) - 1)
        ok = line({"return": "x" * pad, "id": cid})
        self.assertEqual(len(ok), 201)  # exactly the limit, counting the CR, before the LF
        w.feed(ok)
        self.assertEqual(self.successResultOf(d), "x" * pad)
        d = w.proto.execute("query-block")
        w.feed(line({"return": "x" * 300, "id": w.sent()[0]["id"]}))
        self.check_dropped(w, [d])

    def test_unterminated_oversize_line(self):
        w = Wire(max_line_length=200)
        w.negotiate()
        d = w.proto.execute("query-block")
        for _ in range(5):
            w.feed(b'"' + b"x" * 49)
        self.check_dropped(w, [d])

    def test_large_reply_in_chunks(self):
        """A big (but bounded) reply, delivered the way a socket does, arrives whole."""
        w = Wire()
        self.assertEqual(w.proto.max_line_length, qmp.MAX_LINE_LENGTH)
        self.assertEqual(qmp.MAX_LINE_LENGTH, 16 * 1024 * 1024)
        w.negotiate()
        d = w.proto.query_blockstats()
        stats = [{"device": f"drive{i}", "stats": {"rd_bytes": i} } for i in range(40000)]
        data = line({"event": "STOP"}) + line({"return": stats, "id": w.sent()[0]["id"]})
        self.assertGreater(len(data), 1 << 20)
        for i in range(0, len(data), 65536):
            w.proto.dataReceived(data[i:i + 65536])
        self.assertEqual(self.successResultOf(d), stats)
        self.assertEqual(w.events, [("STOP", {}, None)])


class FakeQemu(Protocol):
    """A scripted QMP server on a real UNIX socket."""

    greet = True

    def connectionMade(self):
        self.factory.clients.append(self)
        if self.greet:
            self.transport.write(GREETING)

    def dataReceived(self, data):
        for raw in data.splitlines():
            msg = json.loads(raw)
            if msg["execute"] == "qmp_capabilities":
                self.transport.write(line({"return": {}, "id": msg["id"]}))
            elif msg["execute"] == "query-status":
                self.transport.write(line({"event": "RESUME", "data": {},
                                           "timestamp": {"seconds": 1, "microseconds": 2}}))
                self.transport.write(line({"return": {"status": "running", "running": True},
                                           "id": msg["id"]}))
            # anything else: never answered


class ConnectTests(unittest.TestCase):
    """connect_qmp on the real reactor and a real UNIX socket."""

    def setUp(self):
        self.dir = tempfile.mkdtemp(prefix="qmp-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.path = os.path.join(self.dir, "qmp.sock")

    def listen(self, greet=True):
        factory = Factory.forProtocol(FakeQemu)
        factory.clients = []
        FakeQemu.greet = greet
        self.addCleanup(setattr, FakeQemu, "greet", True)
        d = UNIXServerEndpoint(reactor, self.path).listen(factory)

        def listening(port):
            self.addCleanup(port.stopListening)
            return factory
        return d.addCallback(listening)

    @defer.inlineCallbacks
    def test_retries_until_the_socket_appears(self):
        listening = task.deferLater(reactor, 0.3, self.listen)
        events = []
        start = reactor.seconds()
        proto = yield connect_qmp(reactor, self.path, timeout=5, event_handler=lambda *a: events.append(a))
        factory = yield listening
        self.assertGreaterEqual(reactor.seconds() - start, 0.25)
        self.assertEqual(proto.version, VERSION)
        self.assertEqual((yield proto.ready), VERSION)
        self.assertEqual((yield proto.query_status()), "running")
        self.assertEqual(events, [("RESUME", {}, 1.000002)])
        # a call that QEMU never answers fails when the server side goes away
        pending = proto.execute("query-block")
        factory.clients[0].transport.loseConnection()
        yield self.assertFailure(pending, QMPDisconnected)
        yield proto.closed

    @defer.inlineCallbacks
    def test_times_out_when_there_is_no_socket(self):
        start = reactor.seconds()
        e = yield self.assertFailure(connect_qmp(reactor, self.path, timeout=0.4), QMPTimeout)
        self.assertLess(reactor.seconds() - start, 2)
        self.assertIn("connect", str(e))

    @defer.inlineCallbacks
    def test_times_out_without_a_greeting(self):
        factory = yield self.listen(greet=False)
        e = yield self.assertFailure(connect_qmp(reactor, self.path, timeout=0.4), QMPTimeout)
        self.assertIn("no QMP greeting", str(e))
        self.assertEqual(len(factory.clients), 1)
        # the half-open connection was dropped
        yield task.deferLater(reactor, 0.05, lambda: None)
        self.assertFalse(factory.clients[0].transport.connected)

    @defer.inlineCallbacks
    def test_close(self):
        factory = yield self.listen()
        proto = yield connect_qmp(reactor, self.path, timeout=5)
        reason = yield proto.close()
        self.assertIsInstance(reason, ConnectionDone)
        self.assertTrue(factory.clients)


# -- real QEMU ----------------------------------------------------------------

QEMU = shutil.which("qemu-system-x86_64")


def kvm_usable() -> bool:
    try:
        os.close(os.open("/dev/kvm", os.O_RDWR))
        return True
    except OSError:
        return False


class Events:
    """Records QMP events; lets a test wait for one."""

    def __init__(self):
        self.seen: list[tuple] = []
        self._waiters: list[tuple[str, defer.Deferred]] = []

    def __call__(self, name, data, timestamp):
        self.seen.append((name, data, timestamp))
        for waiter in list(self._waiters):
            if waiter[0] == name:
                self._waiters.remove(waiter)
                waiter[1].callback((name, data, timestamp))

    def wait(self, name: str, timeout: float = 10) -> defer.Deferred:
        d: defer.Deferred = defer.Deferred()
        self._waiters.append((name, d))
        return d.addTimeout(timeout, reactor)

    def clear(self):
        self.seen.clear()


class RealQemuTests(unittest.TestCase):

    def setUp(self):
        self.assertIsNotNone(QEMU, "qemu-system-x86_64 is not installed")
        self.dir = tempfile.mkdtemp(prefix="qmp-qemu-")
        self.addCleanup(shutil.rmtree, self.dir, True)
        self.sock = os.path.join(self.dir, "qmp.sock")
        accel = "kvm" if kvm_usable() else "tcg"
        cmd = [QEMU, "-accel", accel, "-machine", "pc", "-display", "none", "-nodefaults",
               "-S", "-m", "64",
               # a free display between :100 and :199 (QEMU tries them in turn)
               "-vnc", "127.0.0.1:100,to=199,password=on",
               "-chardev", f"socket,id=mon,path={self.sock},server=on,wait=off",
               "-mon", "chardev=mon,mode=control",
               "-drive", "if=none,id=cd0,media=cdrom",
               "-device", "ide-cd,drive=cd0,id=cdrom0"]
        self.log = open(os.path.join(self.dir, "qemu.log"), "wb")
        self.addCleanup(self.log.close)
        self.qemu = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=self.log,
                                     stderr=subprocess.STDOUT, cwd=self.dir)
        self.addCleanup(self._kill_qemu)
        self.events = Events()

    def _kill_qemu(self):
        if self.qemu.poll() is None:
            self.qemu.send_signal(signal.SIGCONT)
            self.qemu.kill()
        self.qemu.wait(10)

    def connect(self, timeout=10):
        d = connect_qmp(reactor, self.sock, timeout=timeout, event_handler=self.events)

        def connected(proto):
            self.addCleanup(proto.close)
            return proto
        return d.addCallback(connected)

    def qemu_log(self) -> str:
        with open(os.path.join(self.dir, "qemu.log"), "rb") as f:
            return f.read().decode(errors="replace")

    @defer.inlineCallbacks
    def test_lifecycle_against_real_qemu(self):
        proto = yield self.connect()
        self.assertEqual(proto.version["qemu"]["major"], 7)
        self.assertEqual((yield proto.query_status()), "prelaunch")

        resumed = self.events.wait("RESUME")
        yield proto.cont()
        name, data, ts = yield resumed
        self.assertIsInstance(ts, float)
        self.assertEqual((yield proto.query_status()), "running")

        stopped = self.events.wait("STOP")
        yield proto.stop()
        yield stopped
        self.assertEqual((yield proto.query_status()), "paused")

        yield proto.set_password("vnc", "s3cret")
        yield proto.expire_password("vnc", "never")
        e = yield self.assertFailure(proto.set_password("nope", "x"), QMPError)
        self.assertEqual(e.cls, "GenericError")

        # the CD-ROM: the empty tray takes a medium, then ejects it
        iso = os.path.join(self.dir, "disk.iso")
        with open(iso, "wb") as f:
            f.write(b"\0" * 2048 * 16)
        yield proto.change_medium("cdrom0", iso)
        [cd] = [b for b in (yield proto.query_block()) if b.get("qdev") == "cdrom0"]
        self.assertEqual(cd["inserted"]["file"], iso)
        stats = yield proto.query_blockstats()
        self.assertIn("cdrom0", [s.get("qdev") for s in stats])
        yield proto.change_medium("cdrom0", None)
        [cd] = [b for b in (yield proto.query_block()) if b.get("qdev") == "cdrom0"]
        self.assertNotIn("inserted", cd)
        e = yield self.assertFailure(proto.change_medium("nosuch", iso), QMPError)
        self.assertEqual(e.cls, "DeviceNotFound")

        cpus = yield proto.query_cpus_fast()
        self.assertEqual([c["cpu-index"] for c in cpus], [0])
        e = yield self.assertFailure(proto.query_balloon(), QMPError)
        self.assertEqual(e.cls, "DeviceNotActive")  # no balloon device on this machine

        yield proto.cont()
        reset = self.events.wait("RESET")
        yield proto.system_reset()
        name, data, ts = yield reset
        self.assertEqual(data.get("guest"), False)
        self.assertEqual((yield proto.query_status()), "running")

    @defer.inlineCallbacks
    def test_kill_9_fails_the_pending_call_and_closes(self):
        proto = yield self.connect()
        self.assertEqual((yield proto.query_status()), "prelaunch")
        # freeze QEMU so the call is certainly still pending when it dies
        os.kill(self.qemu.pid, signal.SIGSTOP)
        pending = proto.query_status(timeout=30)
        yield task.deferLater(reactor, 0.1, lambda: None)
        self.assertTrue(proto.is_connected)
        os.kill(self.qemu.pid, signal.SIGKILL)
        yield self.assertFailure(pending, QMPDisconnected)
        reason = yield proto.closed
        self.assertIsInstance(reason, Exception)
        self.assertFalse(proto.is_connected)
        self.assertEqual(self.qemu.wait(10), -signal.SIGKILL)

    @defer.inlineCallbacks
    def test_reconnect_to_a_running_qemu(self):
        """What crash-reattach relies on: a new client once the old one is gone."""
        proto = yield self.connect()
        yield proto.cont()
        self.assertEqual((yield proto.query_status()), "running")
        # while the first client holds the monitor, a second one is not greeted
        yield self.assertFailure(connect_qmp(reactor, self.sock, timeout=0.5), QMPTimeout)
        yield proto.close()
        again = yield self.connect()
        self.assertEqual((yield again.query_status()), "running")
        stopped = self.events.wait("STOP")
        yield again.stop()
        yield stopped
        self.assertEqual((yield again.query_status()), "paused")
        # quit: QEMU says SHUTDOWN, exits 0, and the connection closes
        yield again.quit()
        yield again.closed
        self.assertEqual(self.qemu.wait(10), 0)
        [shutdown] = [data for name, data, ts in self.events.seen if name == "SHUTDOWN"]
        self.assertEqual(shutdown, {"guest": False, "reason": "host-qmp-quit"})
