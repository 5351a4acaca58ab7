"""
Helpers for tests of the engine port: PKIs, TLS clients, a test API and a
listener on a free loopback port.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import crypto
from twisted.internet import defer, protocol, reactor, ssl
from twisted.internet.endpoints import TCP4ClientEndpoint, TCP6ClientEndpoint, connectProtocol, wrapClientTLS
from twisted.protocols import amp

from vdsm_twisted import config as agent_config
from vdsm_twisted.api import errors, schema
from vdsm_twisted.api.events import EventBus
from vdsm_twisted.api.registry import Api
from vdsm_twisted.protocols.amp_commands import Event
from vdsm_twisted.protocols.listener import EngineListenerService
from vdsm_twisted.tool import pki


class TestNamespace:
    """The verbs the tests call (namespace "Test")."""

    namespace = "Test"

    def __init__(self):
        self.calls: list[tuple[str, Any]] = []
        self.waiting: list[defer.Deferred] = []

    def echo(self, value):
        self.calls.append(("echo", value))
        return value

    def big(self, size):
        self.calls.append(("big", size))
        return "x" * size

    def nothing(self):
        self.calls.append(("nothing", None))

    def fail(self):
        self.calls.append(("fail", None))
        raise errors.NoSuchVM("no such VM: test")

    def crash(self):
        self.calls.append(("crash", None))
        raise RuntimeError("boom")

    def unserializable(self):
        return {"x": object()}

    def slow(self):
        self.calls.append(("slow", None))
        d = defer.Deferred()
        self.waiting.append(d)
        return d


def _m(verb, *params):
    return schema.Method("Test", verb, f"test verb {verb}", tuple(params))


TEST_METHODS = [
    _m("echo", schema.Param("value", schema.ANY, "anything")),
    _m("big", schema.Param("size", schema.INT, "length of the string")),
    _m("nothing"),
    _m("fail"),
    _m("crash"),
    _m("unserializable"),
    _m("slow"),
]


def make_api() -> tuple[Api, TestNamespace]:
    ns = TestNamespace()
    return Api([ns], methods=TEST_METHODS), ns


def no_stomp(config, rpc, reactor):
    """A stand-in for the STOMP side in tests that must not depend on it."""
    def build():
        raise AssertionError("STOMP not expected here")
    return (lambda method, params: None), build


def make_config(pki_dir: str, **limits: Any) -> Any:
    """Agent config on 127.0.0.1, port 0; C{limits} may also set handshake_timeout."""
    timeout = limits.pop("handshake_timeout", 5)
    ip = limits.pop("management_ip", "127.0.0.1")
    lines = ["[addresses]", f"management_ip = {ip}", "management_port = 0",
             "[tls]", f"pki_dir = {pki_dir}", f"handshake_timeout = {timeout}",
             "[limits]"]
    lines += [f"{k} = {v}" for k, v in limits.items()]
    return agent_config.SCHEMA.parse_text("\n".join(lines) + "\n")


def _load_cert(path: str) -> x509.Certificate:
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def _load_key(path: str):
    with open(path, "rb") as f:
        return serialization.load_pem_private_key(f.read(), password=None)


def client_creator(ca_path: str, cert_path: str | None = None, key_path: str | None = None,
                   **options: Any):
    """TLS client options trusting C{ca_path}, presenting the given certificate if any."""
    trust = ssl.trustRootFromCertificates(
        [ssl.Certificate(crypto.X509.from_cryptography(_load_cert(ca_path)))])
    kwargs = dict(options)
    if cert_path is not None:
        kwargs.update(certificate=_load_cert(cert_path), privateKey=_load_key(key_path))
    return ssl.CertificateOptions(trustRoot=trust, raiseMinimumTo=ssl.TLSVersion.TLSv1_2, **kwargs)


def good_client(paths: pki.PkiPaths):
    return client_creator(paths.ca_cert, paths.client_cert, paths.client_key)


def write_pair(directory: str, name: str, key, cert) -> tuple[str, str]:
    cert_path = os.path.join(directory, f"{name}-cert.pem")
    key_path = os.path.join(directory, f"{name}-key.pem")
    pki.write_pem(cert_path, cert)
    pki.write_pem(key_path, key)
    return cert_path, key_path


def endpoint(port: int, creator, host: str = "127.0.0.1"):
    tcp = TCP6ClientEndpoint if ":" in host else TCP4ClientEndpoint
    return wrapClientTLS(creator, tcp(reactor, host, port, timeout=5))


class RecordingAMP(amp.AMP):
    """An AMP client that records events and the end of its connection."""

    def __init__(self):
        super().__init__()
        self.events: list[tuple[str, Any]] = []
        self.event_waiters: list[defer.Deferred] = []
        self.lost = defer.Deferred()  # fires (None) at connectionLost; see .reason
        self.reason = None

    def connectionLost(self, reason):
        super().connectionLost(reason)
        self.reason = reason
        self.lost.callback(None)

    @Event.responder
    def event(self, method, params):
        self.events.append((method, params))
        waiters, self.event_waiters = self.event_waiters, []
        for d in waiters:
            d.callback((method, params))
        return {}

    def next_event(self) -> defer.Deferred:
        d = defer.Deferred()
        self.event_waiters.append(d)
        return d


class RawClient(protocol.Protocol):
    """Sends raw bytes over TLS and records what comes back and when it ends."""

    def __init__(self, payload: bytes = b""):
        self.payload = payload
        self.received = b""
        self.lost = defer.Deferred()  # fires (None) at connectionLost; see .reason
        self.reason = None

    def connectionMade(self):
        if self.payload:
            self.transport.write(self.payload)

    def dataReceived(self, data):
        self.received += data

    def connectionLost(self, reason):
        self.reason = reason
        self.lost.callback(None)


def connect(port: int, creator, proto, host: str = "127.0.0.1") -> defer.Deferred:
    return connectProtocol(endpoint(port, creator, host), proto)


def temp_dir(testcase) -> str:
    """A private temporary directory removed after the test (trial's mktemp
    would create it under the current directory)."""
    directory = tempfile.mkdtemp(prefix="vdsm-twisted-test-")
    testcase.addCleanup(shutil.rmtree, directory, True)
    return directory


class ListenerMixin:
    """For trial TestCases: a PKI and a started listener, cleaned up after."""

    def make_pki(self) -> pki.PkiPaths:
        return pki.create_pki(os.path.join(temp_dir(self), "pki"), hostname="localhost")

    @defer.inlineCallbacks
    def start_listener(self, paths: pki.PkiPaths, stomp_factory=None, **limits):
        self.api, self.ns = make_api()
        self.bus = EventBus()
        kwargs = {"stomp_factory": stomp_factory} if stomp_factory is not None else {}
        service = EngineListenerService(make_config(paths.directory, **limits),
                                        self.api, self.bus, reactor, **kwargs)
        service.startService()
        self.addCleanup(service.stopService)
        yield service.listening
        return service

    @defer.inlineCallbacks
    def connect_amp(self, port: int, creator, host: str = "127.0.0.1"):
        proto = yield connect(port, creator, RecordingAMP(), host)
        self.addCleanup(self._close, proto)
        return proto

    @defer.inlineCallbacks
    def connect_raw(self, port: int, creator, payload: bytes = b""):
        proto = yield connect(port, creator, RawClient(payload))
        self.addCleanup(self._close, proto)
        return proto

    @staticmethod
    def _close(proto):
        if proto.transport is not None and not proto.lost.called:
            proto.transport.abortConnection()
            return proto.lost
        return None
