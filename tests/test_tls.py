"""Mutual TLS on the engine port: who gets in, reloads, connection limits."""

from __future__ import annotations

import os

from OpenSSL import SSL
from twisted.internet import defer, reactor, ssl, task
from twisted.internet.error import ConnectionClosed
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial import unittest

from tests._pki_helpers import (
    ListenerMixin, RawClient, client_creator, connect, good_client, make_config, no_stomp,
    temp_dir, write_pair)
from vdsm_twisted.protocols import tls
from vdsm_twisted.protocols.amp_commands import Call
from vdsm_twisted.tool import pki


class RefusedClients(ListenerMixin, unittest.TestCase):
    """Clients without a certificate from our CA never reach the API."""

    @defer.inlineCallbacks
    def setUp(self):
        self.paths = self.make_pki()
        self.service = yield self.start_listener(self.paths, stomp_factory=no_stomp)
        self.scratch = temp_dir(self)
        self.logged = []
        globalLogPublisher.addObserver(self.logged.append)
        self.addCleanup(globalLogPublisher.removeObserver, self.logged.append)

    def handshake_failures(self):
        return [e for e in self.logged
                if e.get("log_format", "").endswith("TLS handshake failed: {reason}")]

    @defer.inlineCallbacks
    def assert_refused(self, creator):
        # With TLS 1.3 the client finishes its side of the handshake before
        # the server has checked its certificate; the server's alert then
        # ends the connection, before any application byte is accepted.
        try:
            client = yield self.connect_amp(self.service.port, creator)
        except (SSL.Error, ConnectionClosed):
            pass  # refused before the client saw its handshake complete
        else:
            d = client.callRemote(Call, method="Test.echo", params={"value": 1})
            yield self.assertFailure(d, SSL.Error, ConnectionClosed)
            yield client.lost
            self.assertTrue(client.reason.check(SSL.Error), client.reason)
        self.assertEqual(self.ns.calls, [])
        yield self.wait_server_idle()
        # the server logged the refusal (at warn level, with the peer)
        (event,) = self.handshake_failures()
        self.assertEqual(event["log_level"], LogLevel.warn)
        self.assertIn("127.0.0.1:", event["peer"])

    @defer.inlineCallbacks
    def wait_server_idle(self):
        for _ in range(500):
            if self.service.connections == 0:
                return
            yield task.deferLater(reactor, 0.01, lambda: None)
        self.fail("the server kept the refused connection")

    @defer.inlineCallbacks
    def test_good_certificate_works(self):
        client = yield self.connect_amp(self.service.port, good_client(self.paths))
        answer = yield client.callRemote(Call, method="Test.echo", params={"value": "hi"})
        self.assertEqual(answer["response"], {"result": "hi"})
        # the host certificate is also a client certificate (as vdsm-client uses it)
        host_as_client = client_creator(self.paths.ca_cert, self.paths.cert, self.paths.key)
        client = yield self.connect_amp(self.service.port, host_as_client)
        answer = yield client.callRemote(Call, method="Test.echo", params={"value": 2})
        self.assertEqual(answer["response"], {"result": 2})
        self.assertEqual(self.handshake_failures(), [])

    def test_no_client_certificate(self):
        return self.assert_refused(client_creator(self.paths.ca_cert))

    def test_no_client_certificate_tls12(self):
        # TLS 1.2: the client itself sees the handshake fail
        return self.assert_refused(client_creator(
            self.paths.ca_cert, lowerMaximumSecurityTo=ssl.TLSVersion.TLSv1_2))

    @defer.inlineCallbacks
    def test_tls12_with_good_certificate_works(self):
        creator = client_creator(self.paths.ca_cert, self.paths.client_cert, self.paths.client_key,
                                 lowerMaximumSecurityTo=ssl.TLSVersion.TLSv1_2)
        client = yield self.connect_amp(self.service.port, creator)
        answer = yield client.callRemote(Call, method="Test.echo", params={"value": 12})
        self.assertEqual(answer["response"], {"result": 12})
        self.assertEqual(client.transport.getHandle().get_protocol_version_name(), "TLSv1.2")

    def test_self_signed_certificate(self):
        key, cert = pki.self_signed("intruder")
        cert_path, key_path = write_pair(self.scratch, "self", key, cert)
        return self.assert_refused(client_creator(self.paths.ca_cert, cert_path, key_path))

    def test_certificate_from_another_ca(self):
        ca_key, ca_cert = pki.create_ca("other CA")
        key, cert = pki.issue_cert(ca_key, ca_cert, pki.CLIENT_CN, server=False)
        cert_path, key_path = write_pair(self.scratch, "foreign", key, cert)
        return self.assert_refused(client_creator(self.paths.ca_cert, cert_path, key_path))

    @defer.inlineCallbacks
    def test_peer_common_name_in_context(self):
        client = yield self.connect_amp(self.service.port, good_client(self.paths))
        yield client.callRemote(Call, method="Test.echo", params={"value": 1})
        (tls_proto,) = self.service.factory.protocols
        self.assertEqual(tls.peer_common_name(tls_proto), pki.CLIENT_CN)
        self.assertIn(f"(CN={pki.CLIENT_CN})", tls_proto.wrappedProtocol.inner.peer)


class Reload(ListenerMixin, unittest.TestCase):

    @defer.inlineCallbacks
    def server_cn(self, port, paths):
        client = yield self.connect_amp(port, good_client(paths))
        yield client.callRemote(Call, method="Test.echo", params={"value": 1})
        return tls.peer_common_name(client.transport), client

    @defer.inlineCallbacks
    def test_reload_applies_to_new_connections(self):
        paths = self.make_pki()
        service = yield self.start_listener(paths, stomp_factory=no_stomp)
        cn, old_client = yield self.server_cn(service.port, paths)
        self.assertEqual(cn, "localhost")

        # The engine renews the host certificate in place.
        with open(paths.ca_key, "rb") as f:
            from cryptography.hazmat.primitives import serialization
            ca_key = serialization.load_pem_private_key(f.read(), None)
        with open(paths.ca_cert, "rb") as f:
            from cryptography import x509
            ca_cert = x509.load_pem_x509_certificate(f.read())
        key, cert = pki.issue_cert(ca_key, ca_cert, "renewed-host", ["localhost"])
        pki.write_pem(paths.cert, cert)
        pki.write_pem(paths.key, key)
        # nothing changes before the reload
        cn, _ = yield self.server_cn(service.port, paths)
        self.assertEqual(cn, "localhost")

        service.reload_tls()
        cn, _ = yield self.server_cn(service.port, paths)
        self.assertEqual(cn, "renewed-host")
        # the connection made before the reload is untouched
        self.assertEqual(tls.peer_common_name(old_client.transport), "localhost")
        answer = yield old_client.callRemote(Call, method="Test.echo", params={"value": "old"})
        self.assertEqual(answer["response"], {"result": "old"})

    @defer.inlineCallbacks
    def test_broken_reload_keeps_the_old_certificate(self):
        paths = self.make_pki()
        service = yield self.start_listener(paths, stomp_factory=no_stomp)
        with open(paths.key, "wb") as f:
            f.write(b"-----BEGIN PRIVATE KEY-----\ngarbage\n-----END PRIVATE KEY-----\n")
        self.assertRaises(tls.TLSConfigError, service.reload_tls)
        os.unlink(paths.cert)
        self.assertRaises(tls.TLSConfigError, service.reload_tls)
        # a key that does not match the certificate
        key, cert = pki.self_signed("other")
        pki.write_pem(paths.cert, cert)
        pki.write_pem(paths.key, pki.new_key())
        self.assertRaises(tls.TLSConfigError, service.reload_tls)
        cn, _ = yield self.server_cn(service.port, paths)
        self.assertEqual(cn, "localhost")


class Limits(ListenerMixin, unittest.TestCase):

    @defer.inlineCallbacks
    def test_connections_beyond_the_limit_are_closed_at_accept(self):
        paths = self.make_pki()
        service = yield self.start_listener(paths, stomp_factory=no_stomp, max_connections=2)
        first = yield self.connect_amp(service.port, good_client(paths))
        second = yield self.connect_amp(service.port, good_client(paths))
        try:
            third = yield connect(service.port, good_client(paths), RawClient(b"\x00"))
        except (SSL.Error, ConnectionClosed):
            pass
        else:
            yield third.lost
            self.assertEqual(third.received, b"")
        self.assertEqual(service.connections, 2)
        for client in (first, second):
            answer = yield client.callRemote(Call, method="Test.echo", params={"value": 1})
            self.assertEqual(answer["response"], {"result": 1})
        # once one leaves, a new client gets in
        first.transport.loseConnection()
        yield first.lost
        for _ in range(500):
            if service.connections < 2:
                break
            yield task.deferLater(reactor, 0.01, lambda: None)
        fourth = yield self.connect_amp(service.port, good_client(paths))
        answer = yield fourth.callRemote(Call, method="Test.echo", params={"value": 4})
        self.assertEqual(answer["response"], {"result": 4})

    @defer.inlineCallbacks
    def test_ipv6_any_address_serves_both_families(self):
        paths = self.make_pki()
        service = yield self.start_listener(paths, stomp_factory=no_stomp, management_ip="::")
        for host in ("::1", "127.0.0.1"):
            client = yield self.connect_amp(service.port, good_client(paths), host)
            answer = yield client.callRemote(Call, method="Test.echo", params={"value": host})
            self.assertEqual(answer["response"], {"result": host})

    @defer.inlineCallbacks
    def test_stop_service_drops_connections_and_port(self):
        paths = self.make_pki()
        service = yield self.start_listener(paths, stomp_factory=no_stomp)
        client = yield self.connect_amp(service.port, good_client(paths))
        yield client.callRemote(Call, method="Test.echo", params={"value": 1})
        yield service.stopService()
        yield client.lost
        self.assertEqual(service.connections, 0)
        d = connect(service.port, good_client(paths), RawClient())
        yield self.assertFailure(d, Exception)


class Config(unittest.TestCase):

    def test_relative_paths_resolve_against_pki_dir(self):
        directory = os.path.join(temp_dir(self), "pki")
        paths = pki.create_pki(directory, hostname="localhost")
        made = tls.MutualTLS.from_config(make_config(paths.directory))
        self.assertEqual((made.ca_path, made.cert_path, made.key_path),
                         (paths.ca_cert, paths.cert, paths.key))

    def test_missing_files_fail_at_start(self):
        directory = temp_dir(self)
        with self.assertRaises(tls.TLSConfigError) as caught:
            tls.MutualTLS.from_config(make_config(directory))
        self.assertIn("cacert.pem", str(caught.exception))

    def test_tls_minimum_version(self):
        directory = os.path.join(temp_dir(self), "pki")
        paths = pki.create_pki(directory, hostname="localhost")
        options = tls.server_options(paths.ca_cert, paths.cert, paths.key)
        context = options.getContext()
        current = context.set_options(0)  # adds nothing, returns the options in force
        self.assertTrue(current & SSL.OP_NO_TLSv1)
        self.assertTrue(current & SSL.OP_NO_TLSv1_1)
        self.assertFalse(current & SSL.OP_NO_TLSv1_2)
        self.assertTrue(context.get_verify_mode() & SSL.VERIFY_FAIL_IF_NO_PEER_CERT)
        self.assertTrue(context.get_verify_mode() & SSL.VERIFY_PEER)
