"""
privd for real (twistd privd as root, the client as the real vdsm user, real
taps and bridges) and its server logic in memory.
"""

from __future__ import annotations

import grp
import json
import os
import select
import shutil
import signal
import socket
import stat
import subprocess
import tempfile
import time
from pathlib import Path

import pytest
from twisted.internet import defer, reactor, task
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import StringTransport
from twisted.protocols import amp
from twisted.python.failure import Failure
from twisted.trial import unittest

from privd import commands, config as privd_config
from privd.server import PeerCredentials, Policy, PrivdFactory
from tests import _procs
from tests._privd_helpers import (
    Privd,
    RawAmp,
    ip_link,
    link_exists,
    remove_links,
    unique,
    write_config,
)
from vdsm_twisted.common.config import ConfigError
from vdsm_twisted.privdclient import (
    InvalidArgument,
    NotPermitted,
    PrivdClient,
    PrivdTimeout,
    PrivdUnavailable,
)


@pytest.fixture(scope="module")
def privd(code_dir, tmp_path_factory):
    directory = tmp_path_factory.mktemp("privd")
    os.chmod(directory, 0o755)
    conf, sock = write_config(directory)
    daemon = Privd(code_dir, directory, conf, sock).start()
    yield daemon
    daemon.stop()
    assert not sock.exists(), "privd left its socket behind"


def _client_proc(code_dir, sock, user, *actions):
    return subprocess.Popen(
        [_procs.PYTHON, "-m", "tests._privd_client_script", str(sock), json.dumps(list(actions))],
        env=_procs.env_for(code_dir), cwd="/", stdin=subprocess.PIPE, stdout=subprocess.PIPE,
        stderr=subprocess.PIPE, **_procs.user_kwargs(user))


class _Lines:
    """JSON lines from a child's stdout, with timeouts (no stdio buffering)."""

    def __init__(self, proc):
        self.proc = proc
        self.buffer = b""

    def ready(self, timeout: float) -> bool:
        if b"\n" in self.buffer:
            return True
        return bool(select.select([self.proc.stdout], [], [], timeout)[0])

    def next(self, timeout: float = 15.0) -> dict:
        deadline = time.monotonic() + timeout
        while b"\n" not in self.buffer:
            remaining = deadline - time.monotonic()
            assert remaining > 0 and self.ready(remaining), "client script said nothing"
            data = os.read(self.proc.stdout.fileno(), 65536)
            assert data, f"client script ended: {self.proc.stderr.read().decode()}"
            self.buffer += data
        line, self.buffer = self.buffer.split(b"\n", 1)
        return json.loads(line)


def _run_client(code_dir, sock, user, *actions) -> list[dict]:
    proc = _client_proc(code_dir, sock, user, *actions)
    try:
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    lines = [json.loads(line) for line in out.decode().splitlines()]
    assert lines, f"client script printed nothing: {err.decode()}"
    return lines


# -- (a) who may call


def test_vdsm_is_allowed_nobody_is_refused(privd, code_dir):
    assert _run_client(code_dir, privd.sock, "vdsm", {"op": "ping"})[0]["ok"] is True

    refused = _run_client(code_dir, privd.sock, "nobody", {"op": "ping"})
    assert refused[0]["ok"] is False
    assert refused[0]["error"] == "PrivdUnavailable"
    nobody = _procs.user_kwargs("nobody")["user"]
    _procs.wait_for(lambda: f"uid={nobody} gid=" in privd.output(), what="the refusal in privd's log")
    assert "refused peer pid=" in privd.output()

    # privd keeps serving the next allowed caller.
    again = _run_client(code_dir, privd.sock, "vdsm", {"op": "ping"})
    assert again[0]["ok"] is True
    assert again[0]["result"]["pid"] == privd.proc.pid


# -- (b) a tap for real, its fd in an unprivileged process


def _tun_fds(pid: int) -> int:
    count = 0
    for entry in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{entry}") == "/dev/net/tun":
                count += 1
        except OSError:
            pass
    return count


def _frame(payload: bytes) -> bytes:
    return (bytes.fromhex("02aabbccdd03") + bytes.fromhex("02aabbccdd04") + b"\x88\xb5"
            + payload).ljust(60, b"\0")


def test_tap_on_bridge_fd_passed_to_vdsm(privd, code_dir):
    bridge, tap = unique(), unique()
    marker = "to-client-" + unique()
    vdsm_uid = _procs.user_kwargs("vdsm")["user"]
    proc = _client_proc(code_dir, privd.sock, "vdsm",
                        {"op": "ensure_bridge", "name": bridge},
                        {"op": "create_tap", "name": tap, "bridge": bridge, "expect": marker},
                        {"op": "wait"},
                        {"op": "delete_tap", "name": tap},
                        {"op": "delete_bridge", "name": bridge})
    lines = _Lines(proc)
    try:
        assert lines.next() == {"op": "ensure_bridge", "ok": True, "created": True}
        assert os.path.isdir(f"/sys/class/net/{bridge}/bridge")

        created = lines.next()
        assert created["ok"] is True, created
        link = ip_link(tap)
        assert f"master {bridge}" in link and ",UP" in link, link
        with open(f"/sys/class/net/{tap}/owner") as f:
            assert int(f.read()) == vdsm_uid

        # The client wrote a frame to its fd: the kernel received it on the tap.
        assert lines.next()["op"] == "written"
        _procs.wait_for(lambda: int(open(f"/sys/class/net/{tap}/statistics/rx_packets").read()) >= 1,
                        what="rx_packets to grow")

        # A frame sent to the tap arrives on the client's fd.  Resend until it
        # does: until the kernel's linkwatch activates the new tap's qdisc
        # (up to a second), frames sent to it are dropped.
        with socket.socket(socket.AF_PACKET, socket.SOCK_RAW) as raw:
            raw.bind((tap, 0))
            deadline = time.monotonic() + 8
            while time.monotonic() < deadline:
                raw.send(_frame(marker.encode()))
                if lines.ready(0.1):
                    break
        assert lines.next() == {"op": "read", "ok": True}

        # privd kept no copy of the tap's fd.
        assert _tun_fds(privd.proc.pid) == 0

        proc.stdin.write(b"go\n")
        proc.stdin.flush()
        assert lines.next() == {"op": "delete_tap", "ok": True}
        assert not link_exists(tap) and ip_link(tap) == ""
        assert lines.next() == {"op": "delete_bridge", "ok": True}
        assert not link_exists(bridge)
        assert proc.wait(10) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        for stream in (proc.stdin, proc.stdout, proc.stderr):
            stream.close()
        remove_links(tap, bridge)


# -- (d) bad input: a clear error or a closed connection, never a dead privd


def _error(box: amp.AmpBox) -> tuple[bytes, str]:
    return box[b"_error_code"], box[b"_error_description"].decode()


def test_bad_input_gets_declared_errors(privd):
    bridge, tap = unique(), unique()
    raw = RawAmp(privd.sock)
    try:
        for name in (b"", b"x" * 16, b"vt/../eth0", b"vt bad", b"vt\xff"):
            code, text = _error(raw.ask(b"EnsureBridge", name=name))
            assert code == b"INVALID_ARGUMENT", (name, text)
        assert _error(raw.ask(b"DeleteBridge", name=b"eth0"))[0] == b"NOT_PERMITTED"
        code, text = _error(raw.ask(b"DeleteTap", name=b"lo"))
        assert code == b"NOT_PERMITTED" and "outside the allowed prefixes" in text
        assert _error(raw.ask(b"CreateTap", name=tap.encode(), owner_uid=b"-1"))[0] == b"INVALID_ARGUMENT"
        assert _error(raw.ask(b"CreateTap", name=tap.encode(), owner_uid=b"abc"))[0] == b"INVALID_ARGUMENT"
        assert _error(raw.ask(b"CreateTap", name=tap.encode()))[0] == b"INVALID_ARGUMENT"
        assert _error(raw.ask(b"CreateTap", name=tap.encode(), owner_uid=b"995",
                              bridge=b"vtnosuchbr"))[0] == b"NOT_FOUND"
        assert _error(raw.ask(b"CreateTap", name=tap.encode(), owner_uid=b"995",
                              mtu=b"20"))[0] == b"INVALID_ARGUMENT"
        assert _error(raw.ask(b"DeleteTap", name=b"vtnosuchtap"))[0] == b"NOT_FOUND"
        # Names within the prefixes but of the wrong kind of device.
        assert raw.ask(b"EnsureBridge", name=bridge.encode())[b"created"] == b"True"
        code, text = _error(raw.ask(b"DeleteTap", name=bridge.encode()))
        assert code == b"NOT_PERMITTED" and "not a tap" in text
        assert b"fd" in raw.ask(b"CreateTap", name=tap.encode(), owner_uid=b"995")  # fd arrives too
        assert _error(raw.ask(b"DeleteBridge", name=tap.encode()))[0] == b"NOT_PERMITTED"
        assert _error(raw.ask(b"EnsureBridge", name=tap.encode()))[0] == b"ALREADY_EXISTS"
        assert _error(raw.ask(b"CreateTap", name=tap.encode(), owner_uid=b"995"))[0] == b"ALREADY_EXISTS"
        # An unknown command, or AMP's built-ins, are not served.
        for command in (b"RunShell", b"StartTLS", b"_command"):
            assert _error(raw.ask(command))[0] == b"UNHANDLED"
        assert raw.ask(b"Ping")[b"pid"] == str(privd.proc.pid).encode()
        assert link_exists("lo")
    finally:
        raw.close()
        remove_links(tap, bridge)


@pytest.mark.parametrize("garbage", [
    b"\x01\x00" + b"k" * 256,                       # key longer than AMP allows
    b"\x00\x03abc\x00\x01x" + b"\x00\x04long\xff\xff" + b"v" * 6000,  # box over max_box_size
    b"\x00\x07_answer\x00\x0299\x00\x00",            # an answer to nothing
    b"\x00\x03foo\x00\x03bar\x00\x00",               # neither a command nor an answer
])
def test_garbage_closes_that_connection_only(privd, garbage):
    other = RawAmp(privd.sock)
    raw = RawAmp(privd.sock)
    try:
        raw.send(garbage)
        assert raw.closed_by_peer()
        assert other.ask(b"Ping")[b"pid"] == str(privd.proc.pid).encode()
    finally:
        raw.close()
        other.close()


def test_unsolicited_fd_is_closed(privd):
    read_end, write_end = os.pipe()
    raw = RawAmp(privd.sock)
    try:
        assert b"pid" in raw.ask(b"Ping", fds=[read_end])
        os.close(read_end)
        # privd closed its copy: the pipe has no reader left anywhere.
        with pytest.raises(BrokenPipeError):
            os.write(write_end, b"x")
        assert b"pid" in raw.ask(b"Ping", tag=b"2")
    finally:
        raw.close()
        os.close(write_end)


def test_bad_config_fails_at_start(code_dir, tmp_path):
    os.chmod(tmp_path, 0o755)
    conf, sock = write_config(tmp_path, privd__socket_group="no-such-group-x")
    proc = _procs.twistd(code_dir, "privd", ["--config", str(conf)], log_path=tmp_path / "privd.log")
    try:
        assert proc.wait(20) != 0
    finally:
        _procs.stop(proc)
    out = (tmp_path / "privd.log").read_text(errors="replace") + \
        (tmp_path / "privd.out").read_text(errors="replace")
    assert "no such group 'no-such-group-x'" in out
    assert not sock.exists()


def test_socket_permissions_and_readiness(code_dir, tmp_path):
    os.chmod(tmp_path, 0o755)
    conf, sock = write_config(tmp_path, make_dir=False, privd__socket_mode="0660")
    notify_path = tmp_path / "notify"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
        notify.bind(str(notify_path))
        notify.settimeout(15)
        proc = _procs.twistd(code_dir, "privd", ["--config", str(conf)],
                             log_path=tmp_path / "privd.log",
                             env=_procs.env_for(code_dir, NOTIFY_SOCKET=str(notify_path)))
        try:
            assert b"READY=1" in notify.recv(4096)
            vdsm_gid = grp.getgrnam("vdsm").gr_gid
            st = os.stat(sock.parent)
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o750, 0, vdsm_gid)
            st = os.stat(sock)
            assert (stat.S_IMODE(st.st_mode), st.st_uid, st.st_gid) == (0o660, 0, vdsm_gid)
            # A second privd on the same socket refuses to start.
            twin = _procs.twistd(code_dir, "privd", ["--config", str(conf)],
                                 log_path=tmp_path / "twin.log")
            try:
                assert twin.wait(20) != 0
            finally:
                _procs.stop(twin)
            assert "another privd is serving" in (tmp_path / "twin.log").read_text() + \
                (tmp_path / "twin.out").read_text()
            proc.send_signal(signal.SIGTERM)
            assert b"STOPPING=1" in notify.recv(4096)
            assert proc.wait(10) in (0, -signal.SIGTERM)  # twistd re-raises the signal
        finally:
            _procs.stop(proc)
    assert not sock.exists()


def test_regular_file_at_socket_path_is_not_replaced(code_dir, tmp_path):
    os.chmod(tmp_path, 0o755)
    conf, sock = write_config(tmp_path)
    sock.write_text("precious")
    proc = _procs.twistd(code_dir, "privd", ["--config", str(conf)], log_path=tmp_path / "privd.log")
    try:
        assert proc.wait(20) != 0
    finally:
        _procs.stop(proc)
    assert sock.read_text() == "precious"


# -- (c) and (e): privd dies or hangs under a call


@pytest.fixture(scope="class")
def _class_code_dir(request, code_dir):
    request.cls.code_dir = code_dir


@pytest.mark.usefixtures("_class_code_dir")
class PrivdFailureTests(unittest.TestCase):
    """The agent's client against a privd that is killed, stopped, restarted."""

    code_dir = None

    def setUp(self):
        self.directory = Path(tempfile.mkdtemp(prefix="privd-kill-"))
        self.addCleanup(shutil.rmtree, self.directory, True)
        os.chmod(self.directory, 0o755)
        conf, sock = write_config(self.directory)
        self.privd = Privd(self.code_dir, self.directory, conf, sock).start()
        self.addCleanup(self.privd.stop)

    def _client(self, **kwargs) -> PrivdClient:
        client = PrivdClient(str(self.privd.sock), reactor=reactor, **kwargs)
        client.startService()
        self.addCleanup(client.stopService)
        return client

    @defer.inlineCallbacks
    def test_concurrent_taps_each_get_their_own_fd(self):
        """Twenty CreateTap at once: every answer is paired with its own tap's fd."""
        import fcntl
        import struct
        import uuid

        client = self._client(max_in_flight=4)
        names = [f"vt{uuid.uuid4().hex[:10]}" for _ in range(20)]
        self.addCleanup(lambda: [subprocess.run(["ip", "link", "del", n], capture_output=True)
                                 for n in names])
        taps = yield defer.gatherResults([client.create_tap(n, 995) for n in names])
        try:
            self.assertEqual(sorted(t.name for t in taps), sorted(names))
            for tap in taps:
                # TUNGETIFF names the interface an fd is attached to.
                ifr = fcntl.ioctl(tap.fd, 0x800454D2, b"\0" * 40)
                self.assertEqual(ifr[:16].rstrip(b"\0").decode(), tap.name)
        finally:
            for tap in taps:
                tap.close()
        yield defer.gatherResults([client.delete_tap(n) for n in names])
        self.assertEqual([n for n in names if link_exists(n)], [])

    @defer.inlineCallbacks
    def test_kill_during_call_then_restart(self):
        client = self._client(call_timeout=30.0, max_delay=0.5)
        first = yield client.ping()
        os.kill(self.privd.proc.pid, signal.SIGSTOP)
        in_flight = client.ping()
        yield task.deferLater(reactor, 0.2, lambda: None)
        self.assertFalse(in_flight.called)
        started = time.monotonic()
        self.privd.proc.kill()
        self.privd.proc.wait()
        yield self.assertFailure(in_flight, PrivdUnavailable)
        self.assertLess(time.monotonic() - started, 2.0)

        # Known down: the next call fails at once, not after call_timeout.
        started = time.monotonic()
        yield self.assertFailure(client.ping(), PrivdUnavailable)
        self.assertLess(time.monotonic() - started, 2.0)

        self.privd.start()  # same socket path: the stale socket is replaced
        second = yield client.ping()
        self.assertNotEqual(second["pid"], first["pid"])
        self.assertEqual(second["pid"], self.privd.proc.pid)

    @defer.inlineCallbacks
    def test_stopped_privd_times_out(self):
        client = self._client(call_timeout=0.5, max_delay=0.5)
        yield client.ping()
        os.kill(self.privd.proc.pid, signal.SIGSTOP)
        started = time.monotonic()
        try:
            yield self.assertFailure(client.ping(), PrivdTimeout)
        finally:
            os.kill(self.privd.proc.pid, signal.SIGCONT)
        self.assertGreaterEqual(time.monotonic() - started, 0.45)
        # The late answer is dropped; privd and the connection are fine.
        result = yield client.ping()
        self.assertEqual(result["pid"], self.privd.proc.pid)

    @defer.inlineCallbacks
    def test_declared_errors_reach_the_client(self):
        client = self._client(call_timeout=5.0)
        failure = yield self.assertFailure(client.delete_tap("lo"), NotPermitted)
        self.assertIn("'lo' is outside the allowed prefixes", str(failure))
        yield self.assertFailure(client.ensure_bridge("vt bad"), InvalidArgument)
        yield self.assertFailure(client.create_tap(unique(), -5), InvalidArgument)
        self.assertTrue(link_exists("lo"))


# -- the server's logic in memory


def _policy(**overrides) -> Policy:
    values = dict(allowed_uids=frozenset({995}), allowed_gids=frozenset({4242}),
                  tap_prefixes=("vt",), bridge_prefixes=("vt",), max_box_size=1024,
                  max_pending=4, max_connections=2)
    values.update(overrides)
    return Policy(**values)


class FakeOps:
    def __init__(self):
        self.calls = []

    def ensure_bridge(self, name):
        self.calls.append(("ensure_bridge", name))
        return True

    def delete_bridge(self, name):
        raise RuntimeError("a bug")

    def create_tap(self, *args, **kwargs):
        raise OSError(1, "Operation not permitted")

    def delete_tap(self, name):
        self.calls.append(("delete_tap", name))


def _connect(policy=None, peer=PeerCredentials(pid=7, uid=995, gid=995), ops=None):
    clock = task.Clock()
    factory = PrivdFactory(policy or _policy(), ops=ops or FakeOps(), version="t",
                           peer_credentials=lambda transport: peer, reactor=clock)
    proto = factory.buildProtocol(None)
    transport = StringTransport()
    proto.makeConnection(transport)
    return factory, proto, transport


def _ask(proto, transport, command: bytes, **args) -> amp.AmpBox:
    transport.clear()
    box = amp.AmpBox({b"_command": command, b"_ask": b"1", **{k.encode(): v for k, v in args.items()}})
    proto.dataReceived(box.serialize())
    boxes = amp.parseString(transport.value())
    return boxes[0] if boxes else None


def test_policy_allows_listed_uids_groups_and_root():
    policy = _policy()
    assert policy.allows(PeerCredentials(1, 995, 995))
    assert policy.allows(PeerCredentials(1, 0, 0))
    assert policy.allows(PeerCredentials(1, 1234, 4242))
    assert not policy.allows(PeerCredentials(1, 65534, 65534))


def test_policy_from_config_refuses_unknown_names():
    config = privd_config.SCHEMA.parse_text("[privd]\nallowed_users = vdsm, no-such-user-x\n")
    with pytest.raises(ConfigError, match="no such user 'no-such-user-x'"):
        Policy.from_config(config)
    config = privd_config.SCHEMA.parse_text("[privd]\nallowed_groups = no-such-group-x\n")
    with pytest.raises(ConfigError, match="no such group"):
        Policy.from_config(config)
    policy = Policy.from_config(privd_config.load(None))
    assert policy.allowed_uids == {995} and policy.tap_prefixes == ("vnet",)


def test_every_config_key_is_documented():
    assert all(key.doc.strip() for key in privd_config.SCHEMA.keys)
    config = privd_config.load(None)
    assert config["privd", "socket_mode"] == 0o660
    assert config["privd", "socket"] == "/run/vdsm-twisted-privd/privd.sock"


def test_refused_peer_is_aborted_before_reading():
    _, proto, transport = _connect(peer=PeerCredentials(pid=9, uid=65534, gid=65534))
    assert transport.disconnecting
    proto.dataReceived(amp.AmpBox({b"_command": b"Ping", b"_ask": b"1"}).serialize())
    assert transport.value() == b""


def test_responders_validate_and_map_errors():
    ops = FakeOps()
    _, proto, transport = _connect(ops=ops)
    assert _ask(proto, transport, b"Ping")[b"version"] == b"t"
    assert _ask(proto, transport, b"EnsureBridge", name=b"vtbr")[b"created"] == b"True"
    assert _ask(proto, transport, b"EnsureBridge", name=b"eth0")[b"_error_code"] == b"NOT_PERMITTED"
    # An undeclared exception becomes a declared error; the connection stays.
    answer = _ask(proto, transport, b"DeleteBridge", name=b"vtbr")
    assert answer[b"_error_code"] == b"OPERATION_FAILED"
    answer = _ask(proto, transport, b"CreateTap", name=b"vttap", owner_uid=b"995")
    assert answer[b"_error_code"] == b"OPERATION_FAILED" and b"errno 1" in answer[b"_error_description"]
    assert _ask(proto, transport, b"DeleteTap", name=b"vttap") is not None
    assert ops.calls == [("ensure_bridge", "vtbr"), ("delete_tap", "vttap")]
    assert not transport.disconnecting


def test_box_over_limit_disconnects():
    _, proto, transport = _connect(policy=_policy(max_box_size=100))
    answer = _ask(proto, transport, b"EnsureBridge", name=b"vt" + b"x" * 200)
    assert answer is None and transport.disconnecting


def test_partial_oversized_value_disconnects_early():
    _, proto, transport = _connect(policy=_policy(max_box_size=100))
    proto.dataReceived(b"\x00\x04name\xff\xff" + b"x" * 200)  # value announced: 65535 bytes
    assert transport.disconnecting


def test_too_many_pending_is_busy():
    _, proto, transport = _connect(policy=_policy(max_pending=1))
    proto._pending = 1  # one call in flight
    assert _ask(proto, transport, b"Ping")[b"_error_code"] == b"BUSY"
    proto._pending = 0
    assert b"pid" in _ask(proto, transport, b"Ping")


def test_max_connections():
    factory, proto, _ = _connect(policy=_policy(max_connections=1))
    assert factory.buildProtocol(None) is None
    proto.connectionLost(Failure(ConnectionDone()))
    assert factory.buildProtocol(None) is not None


@pytest.mark.parametrize("name", ["", ".", "..", "a" * 16, "eth0:1", "a/b", "tap 0", "é"])
def test_check_ifname_rejects(name):
    with pytest.raises(commands.InvalidArgument):
        commands.check_ifname(name)


def test_check_helpers_accept():
    assert commands.check_ifname("vnet0_a.b-c") == "vnet0_a.b-c"
    assert commands.check_prefix("vnet3", ("vnet",), "tap") == "vnet3"
    with pytest.raises(commands.NotPermitted):
        commands.check_prefix("eth0", ("vnet",), "tap")
    with pytest.raises(commands.NotPermitted):
        commands.check_prefix("eth0", ("",), "tap")  # an empty prefix allows nothing
    assert commands.check_uid(0) == 0
    for bad in (-1, 2**32 - 1, True, "5"):
        with pytest.raises(commands.InvalidArgument):
            commands.check_uid(bad)
    with pytest.raises(commands.InvalidArgument):
        commands.check_mtu(67)
    assert commands.OperationFailed("x", 17).errno == 17
    assert commands.OperationFailed(str(commands.OperationFailed("x", 17))).errno == 17
