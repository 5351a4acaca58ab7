"""
The agent's privd client against in-process servers on real UNIX sockets:
privd's own factory (with fake operations) and a peer that never answers.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time

from twisted.internet import defer, reactor, task
from twisted.internet.protocol import Factory
from twisted.protocols import amp
from twisted.trial import unittest

from privd.server import Policy, PrivdFactory
from vdsm_twisted.privdclient import (
    AlreadyExists,
    InvalidArgument,
    NotFound,
    OperationFailed,
    PrivdClient,
    PrivdTimeout,
    PrivdUnavailable,
    TapDevice,
)


class FakeOps:
    """netdev's interface; create_tap hands out the read end of a pipe."""

    def __init__(self):
        self.pipes: list[tuple[int, int]] = []

    def ensure_bridge(self, name):
        if name == "vtexists":
            raise AlreadyExists(f"{name!r} exists and is not a bridge")
        return True

    def delete_bridge(self, name):
        raise NotFound(f"no such bridge {name!r}")

    def create_tap(self, name, owner_uid, bridge=None, mtu=None, vnet_hdr=False):
        if bridge == "vtbroken":
            raise OSError(19, "No such device")
        read_end, write_end = os.pipe()
        self.pipes.append((read_end, write_end))
        return read_end

    def delete_tap(self, name):
        pass


class Silent(amp.AMP):
    """A peer that reads every box and answers none (a hung privd)."""

    instances: list["Silent"] = []

    def connectionMade(self):
        Silent.instances.append(self)
        self.boxes = []

    def ampBoxReceived(self, box):
        self.boxes.append(box)


def _fds_of_pipe(fd: int) -> int:
    """How many fds of this process point at the same pipe as C{fd}."""
    target = os.readlink(f"/proc/self/fd/{fd}")
    count = 0
    for entry in os.listdir("/proc/self/fd"):
        try:
            count += os.readlink(f"/proc/self/fd/{entry}") == target
        except OSError:
            pass
    return count


class PrivdClientTests(unittest.TestCase):
    def setUp(self):
        self.directory = tempfile.mkdtemp(prefix="privdclient-")
        self.addCleanup(shutil.rmtree, self.directory, True)
        self.path = os.path.join(self.directory, "privd.sock")
        self.ops = FakeOps()
        self.port = None
        self.addCleanup(self._close_pipes)

    def _close_pipes(self):
        for pair in self.ops.pipes:
            for fd in pair:
                try:
                    os.close(fd)
                except OSError:
                    pass

    def listen(self, factory=None):
        if factory is None:
            policy = Policy(allowed_uids=frozenset(), allowed_gids=frozenset(),
                            tap_prefixes=("vt",), bridge_prefixes=("vt",))
            factory = PrivdFactory(policy, ops=self.ops, version="test", reactor=reactor)
        self.factory = factory
        self.port = reactor.listenUNIX(self.path, factory)
        self.addCleanup(self.unlisten)

    @defer.inlineCallbacks
    def unlisten(self):
        port, self.port = self.port, None
        if port is not None:
            yield port.stopListening()
        for protocol in list(getattr(self.factory, "connections", ())) + Silent.instances:
            if protocol.transport is not None:
                protocol.transport.abortConnection()
        Silent.instances.clear()
        if os.path.exists(self.path):
            os.unlink(self.path)
        yield task.deferLater(reactor, 0.01, lambda: None)

    def client(self, **kwargs) -> PrivdClient:
        client = PrivdClient(self.path, reactor=reactor, **kwargs)
        client.startService()
        self.addCleanup(client.stopService)
        return client

    @defer.inlineCallbacks
    def test_first_call_waits_for_the_first_connection(self):
        self.listen()
        client = self.client()
        self.assertFalse(client.connected)
        result = yield client.ping()  # made before the connection exists
        self.assertEqual(result, {"pid": os.getpid(), "version": "test"})
        self.assertTrue(client.connected)

    @defer.inlineCallbacks
    def test_privd_absent_fails_at_once(self):
        client = self.client(call_timeout=30.0)
        started = time.monotonic()
        yield self.assertFailure(client.ping(), PrivdUnavailable)
        yield self.assertFailure(client.ensure_bridge("vtbr"), PrivdUnavailable)
        self.assertLess(time.monotonic() - started, 2.0)

    @defer.inlineCallbacks
    def test_declared_errors_keep_class_and_message(self):
        self.listen()
        client = self.client()
        failure = yield self.assertFailure(client.ensure_bridge("vtexists"), AlreadyExists)
        self.assertEqual(str(failure), "'vtexists' exists and is not a bridge")
        failure = yield self.assertFailure(client.delete_bridge("vtgone"), NotFound)
        self.assertEqual(str(failure), "no such bridge 'vtgone'")
        yield self.assertFailure(client.ensure_bridge("bad name"), InvalidArgument)
        failure = yield self.assertFailure(client.create_tap("vttap", 995, bridge="vtbroken"),
                                           OperationFailed)
        self.assertEqual(failure.errno, 19)
        self.assertTrue((yield client.ensure_bridge("vtbr")))

    @defer.inlineCallbacks
    def test_create_tap_passes_a_working_fd(self):
        self.listen()
        client = self.client()
        tap = yield client.create_tap("vttap", 995, bridge="vtbr", mtu=1400)
        self.assertIsInstance(tap, TapDevice)
        self.assertEqual(tap.name, "vttap")
        read_end, write_end = self.ops.pipes[0]
        try:
            os.write(write_end, b"frame")
            self.assertEqual(os.read(tap.fd, 100), b"frame")
            # privd closes its copy once the kernel has passed it on.
            yield task.deferLater(reactor, 0.05, lambda: None)
            self.assertEqual(_fds_of_pipe(write_end), 2)  # ours: write end and tap.fd
        finally:
            tap.close()
        self.assertIsNone((yield client.delete_tap("vttap")))

    @defer.inlineCallbacks
    def test_drop_fails_calls_in_flight_at_once_and_reconnects(self):
        self.listen(Factory.forProtocol(Silent))
        client = self.client(call_timeout=30.0, max_delay=30.0)
        in_flight = [client.ping(), client.delete_tap("vttap")]
        while not (Silent.instances and len(Silent.instances[0].boxes) == 2):
            yield task.deferLater(reactor, 0.01, lambda: None)
        started = time.monotonic()
        yield self.unlisten()
        for d in in_flight:
            yield self.assertFailure(d, PrivdUnavailable)
        # Known down: fail at once.
        yield self.assertFailure(client.ping(), PrivdUnavailable)
        self.assertLess(time.monotonic() - started, 2.0)
        # Back: the very next call succeeds, whatever the backoff says.
        self.listen()
        result = yield client.ping()
        self.assertEqual(result["version"], "test")

    @defer.inlineCallbacks
    def test_timeout(self):
        self.listen(Factory.forProtocol(Silent))
        client = self.client(call_timeout=0.3)
        started = time.monotonic()
        failure = yield self.assertFailure(client.ping(), PrivdTimeout)
        self.assertGreaterEqual(time.monotonic() - started, 0.25)
        self.assertIn("Ping", str(failure))

    @defer.inlineCallbacks
    def test_late_answer_fd_is_closed(self):
        self.listen(Factory.forProtocol(Silent))
        client = self.client(call_timeout=0.2)
        yield self.assertFailure(client.create_tap("vttap", 995), PrivdTimeout)
        read_end, write_end = os.pipe()
        self.ops.pipes.append((read_end, write_end))
        server = Silent.instances[0]
        ask = server.boxes[0][b"_ask"]
        server.transport.sendFileDescriptor(read_end)
        server.sendBox(amp.AmpBox({b"_answer": ask, b"name": b"vttap", b"fd": b"0"}))
        yield task.deferLater(reactor, 0.1, lambda: None)
        os.close(read_end)
        # Neither the client nor anyone else keeps the passed fd.
        self.assertEqual(_fds_of_pipe(write_end), 1)
        self.assertTrue(client.connected)

    @defer.inlineCallbacks
    def test_stop_fails_calls(self):
        self.listen(Factory.forProtocol(Silent))
        client = PrivdClient(self.path, reactor=reactor)
        client.startService()
        yield task.deferLater(reactor, 0.05, lambda: None)
        in_flight = client.ping()
        yield client.stopService()
        yield self.assertFailure(in_flight, PrivdUnavailable)
        yield self.assertFailure(client.ping(), PrivdUnavailable)
