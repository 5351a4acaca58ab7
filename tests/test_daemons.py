"""
End to end: C{twistd -n privd} as root and C{twistd -n vdsm} as the vdsm user,
real TLS on loopback, real signals, sd_notify on a real datagram socket.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import ssl
import subprocess

import pytest

from tests import _procs, _stack


@pytest.fixture
def stack(private_dir, code_dir):
    s = _stack.make_stack(private_dir, code_dir, notify=True)
    yield s
    s.stop()


def _uid_of(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Uid:"):
                return int(line.split()[1])
    raise AssertionError("no Uid line")


def test_twistd_lists_both_plugins(code_dir):
    out = subprocess.run(
        [_procs.PYTHON, "-c", "import sys; from twisted.scripts.twistd import run; "
         "sys.argv[0] = 'twistd'; run()", "--help"],
        env=_procs.env_for(code_dir), capture_output=True, text=True, timeout=60).stdout
    assert "\n    vdsm " in out or " vdsm  " in out, out
    assert "privd" in out, out


def test_stack_serves_reloads_and_stops(stack):
    stack.start_privd(notify=True)
    seen = _stack.read_notifications(stack.notify_socket, "READY=1")
    assert f"MAINPID={stack.privd.pid}" in seen[-1]

    stack.start_agent(notify=True)
    seen = _stack.read_notifications(stack.notify_socket, "READY=1")
    assert f"MAINPID={stack.agent.pid}" in seen[-1]
    # The agent really runs unprivileged; privd really as root.
    assert _uid_of(stack.agent.pid) == pwd.getpwnam("vdsm").pw_uid
    assert _uid_of(stack.privd.pid) == 0

    for protocol in ("stomp", "amp"):
        assert stack.call("Host", "ping2", protocol=protocol) is True
        caps = stack.call("Host", "getCapabilities", protocol=protocol)
        assert int(caps["cpuCores"]) >= 1
        assert int(caps["memSize"]) > 0
        assert caps["kvmEnabled"] in ("true", "false")
        assert "qemu-kvm" in caps["packages2"]
        assert caps["uuid"]
        stats = stack.call("Host", "getStats", protocol=protocol)
        assert "cpuUser" in stats and "network" in stats
        assert stack.call("Host", "getVMList", protocol=protocol) == []

    # Unknown method: the API's error, exit 1, and the agent keeps serving.
    rc, out, err = stack.cli("Host", "noSuchVerb")
    assert rc == 1 and "-32601" in err
    rc, out, err = stack.cli("Host", "getVMList", "fullStatus=notabool", protocol="amp")
    assert rc == 1 and "-32602" in err

    # SIGHUP: RELOADING=1 then READY=1, same process, still answering.
    stack.agent.send_signal(signal.SIGHUP)
    seen = _stack.read_notifications(stack.notify_socket, "READY=1")
    assert any("RELOADING=1" in s for s in seen), seen
    assert stack.call("Host", "ping2") is True

    # A configuration that does not parse is refused; the old one stays in force.
    good = stack.agent_conf.read_text()
    stack.agent_conf.write_text("[addresses\nthis is not ini")
    stack.agent.send_signal(signal.SIGHUP)
    _stack.read_notifications(stack.notify_socket, "READY=1")
    stack.agent_conf.write_text(good)
    assert stack.agent.poll() is None
    assert stack.call("Host", "ping2") is True
    _procs.wait_for(lambda: "reload refused" in stack.read_log("vdsm"), what="refusal logged")

    # privd: SIGHUP reloads too.
    stack.privd.send_signal(signal.SIGHUP)
    seen = _stack.read_notifications(stack.notify_socket, "READY=1")
    assert any("RELOADING=1" in s for s in seen), seen
    assert stack.privd.poll() is None

    # SIGTERM: STOPPING=1 and a clean exit, for both.
    for proc in (stack.agent, stack.privd):
        proc.send_signal(signal.SIGTERM)
        _stack.read_notifications(stack.notify_socket, "STOPPING=1")
        # twistd re-raises SIGTERM after a clean shutdown (systemd counts that as success).
        assert proc.wait(20) in (0, -signal.SIGTERM)
    assert not stack.privd_socket.exists()


def _recv_frame(sock) -> bytes:
    data = b""
    while not data.endswith(b"\x00"):
        chunk = sock.recv(65536)
        if not chunk:
            raise AssertionError(f"connection closed after {data!r}")
        data += chunk
        data = data.lstrip(b"\n")
    return data


def test_stomp_wire_over_real_tls(stack):
    """The frame exchange of PROTOCOL.md, byte for byte, against the real daemon."""
    stack.start_privd()
    stack.start_agent()
    with stack.tls_socket() as s:
        s.sendall(b"CONNECT\naccept-version:1.2\nheart-beat:0,2000\n\n\x00")
        assert _recv_frame(s) == b"CONNECTED\nversion:1.2\nheart-beat:2000,0\n\n\x00"
        s.sendall(b"SUBSCRIBE\ndestination:reply-q\nid:sub-1\nack:auto\n\n\x00")
        s.sendall(b"SUBSCRIBE\ndestination:jms.queue.events\nid:sub-2\nack:auto\n\n\x00")
        body = b'[{"jsonrpc":"2.0","method":"Host.ping2","params":{},"id":"r1"}]'
        s.sendall(b"SEND\ndestination:jms.topic.vdsm_requests\nreply-to:reply-q\n"
                  b"content-type:application/json\novirtCorrelationId:flow-1\n"
                  b"content-length:%d\n\n%s\x00" % (len(body), body))
        response = b'{"jsonrpc":"2.0","id":"r1","result":true}'
        assert _recv_frame(s) == (
            b"MESSAGE\ndestination:reply-q\ncontent-type:application/json\n"
            b"subscription:sub-1\ncontent-length:%d\n\n%s\x00" % (len(response), response))
        s.sendall(b"SEND\ndestination:nobody.listens\n\nhello\x00")
        text = b"Subscription not available"
        assert _recv_frame(s) == (b"ERROR\nmessage:%s\ncontent-length:%d\n\n%s\x00"
                                  % (text, len(text), text))
        s.sendall(b"DISCONNECT\nreceipt:bye-1\n\n\x00")
        assert _recv_frame(s) == b"RECEIPT\nreceipt-id:bye-1\n\n\x00"
        assert s.recv(100) == b""
    assert "flow-1" in stack.read_log("vdsm")



@pytest.mark.parametrize("payload", [
    b"CONNECT\naccept-version:1.2\n\n\x00GARBAGE\n\n\x00",          # unknown command
    b"CONNECT\naccept-version:1.2\n\n\x00SEND\nno-colon-header\n\n\x00",  # malformed header
    b"CONNECT\naccept-version:1.2\n\n\x00SEND\ndestination:x\ncontent-length:99999999\n\n",
    b"GET / HTTP/1.1\r\nHost: x\r\n\r\n",                                 # not our protocols
    b"\xff\xfe junk",
])
def test_bad_input_closes_that_connection_only(stack, payload):
    stack.start_privd()
    stack.start_agent()
    with stack.tls_socket() as bystander:
        bystander.sendall(b"CONNECT\naccept-version:1.2\n\n\x00")
        assert _recv_frame(bystander).startswith(b"CONNECTED\n")
        with stack.tls_socket() as s:
            s.sendall(payload)
            if b"99999999" in payload:
                try:  # over [limits] max_message_size; the server may close first
                    s.sendall(b"x" * (5 * 1024 * 1024))
                except OSError:
                    pass
            data = b""
            try:
                while chunk := s.recv(65536):
                    data += chunk
            except (ConnectionResetError, ssl.SSLError):
                pass
            if payload.startswith(b"CONNECT"):
                assert b"ERROR\n" in data, data
        # The daemon and the other client are unaffected.
        bystander.sendall(b"SUBSCRIBE\ndestination:q\nid:1\n\n\x00"
                          b"SEND\ndestination:jms.topic.vdsm_requests\nreply-to:q\n\n"
                          b'{"jsonrpc":"2.0","method":"Host.ping2","id":7}\x00')
        assert b'"result":true' in _recv_frame(bystander)
    assert stack.agent.poll() is None
    assert stack.call("Host", "ping2") is True


def test_standby_takes_over_and_tells_the_service_manager(private_dir, code_dir):
    """kill -9 of the agent: the standby serves, READY=1 comes with its MAINPID,
    and agent.pid (the unit's PIDFile=) named it beforehand, as systemd needs."""
    s = _stack.make_stack(private_dir, code_dir, notify=True, standby=True)
    try:
        s.start_privd()
        s.start_agent(notify=True)
        _stack.read_notifications(s.notify_socket, "READY=1")
        _procs.wait_for(lambda: "warm and ready" in s.read_log("vdsm"), 60,
                        what="the standby")
        standby = s.serving_pid()
        assert standby != s.agent.pid
        s.agent.kill()
        s.agent.wait()
        seen = _stack.read_notifications(s.notify_socket, "READY=1")
        assert f"MAINPID={standby}" in seen[-1]
        assert s.call("Host", "ping2") is True
        # Its own standby is named next; a second agent is refused meanwhile.
        _procs.wait_for(lambda: s.serving_pid() not in (None, standby), 60,
                        what="the next standby")
        rival = _procs.twistd(code_dir, "vdsm", ["--config", str(s.agent_conf)],
                              user="vdsm", env=s.env(False))
        assert rival.wait(60) == 1
        assert s.call("Host", "ping2") is True
    finally:
        s.stop()
    assert _procs.processes_mentioning(s.agent_conf) == {}
