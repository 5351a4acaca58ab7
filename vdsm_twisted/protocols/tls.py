"""
Mutual TLS for the engine port: only clients holding a certificate issued by
the configured CA get past the handshake.

The engine renews host certificates in place, so L{MutualTLS.reload} swaps
the OpenSSL context used for I{new} connections without a restart; a reload
that cannot read the new files raises and leaves the working context alone.
"""

from __future__ import annotations

import os
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from OpenSSL import SSL, crypto
from twisted.internet.interfaces import IOpenSSLServerConnectionCreator
from twisted.internet import ssl
from twisted.logger import Logger
from zope.interface import implementer

from vdsm_twisted.common.config import Config


class TLSConfigError(Exception):
    """The certificate, key or CA file is missing or unusable."""


def resolve(pki_dir: str, path: str) -> str:
    """C{path} as configured: relative paths are relative to C{pki_dir}."""
    return path if os.path.isabs(path) else os.path.join(pki_dir, path)


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise TLSConfigError(f"cannot read {path}: {e.strerror}") from None


def _certificates(path: str) -> list[x509.Certificate]:
    try:
        certs = x509.load_pem_x509_certificates(_read(path))
    except ValueError as e:
        raise TLSConfigError(f"{path}: no valid PEM certificate: {e}") from None
    if not certs:
        raise TLSConfigError(f"{path}: no certificate")
    return certs


def _private_key(path: str) -> Any:
    try:
        return serialization.load_pem_private_key(_read(path), password=None)
    except (ValueError, TypeError) as e:
        raise TLSConfigError(f"{path}: not an unencrypted PEM private key: {e}") from None


def _x509(cert: x509.Certificate) -> crypto.X509:
    return crypto.X509.from_cryptography(cert)


def server_options(ca_path: str, cert_path: str, key_path: str) -> ssl.CertificateOptions:
    """
    Options for a server that requires a client certificate chaining to the
    CA(s) in C{ca_path} (VERIFY_PEER | VERIFY_FAIL_IF_NO_PEER_CERT, set by
    C{trustRoot}), speaking TLS 1.2 or later.
    """
    cas = [ssl.Certificate(_x509(c)) for c in _certificates(ca_path)]
    chain = _certificates(cert_path)
    key = _private_key(key_path)
    options = ssl.CertificateOptions(
        privateKey=key,
        # pyOpenSSL takes cryptography objects for the context (X509 ones
        # are deprecated there), but still X509 for the trust store.
        certificate=chain[0],
        extraCertChain=chain[1:],
        trustRoot=ssl.trustRootFromCertificates(cas),
        raiseMinimumTo=ssl.TLSVersion.TLSv1_2,
    )
    try:
        # Build the context now: a key that does not match the certificate
        # must fail the (re)load, not every later handshake.
        options.getContext()
    except SSL.Error as e:
        raise TLSConfigError(f"{cert_path} / {key_path}: unusable: {e}") from None
    return options


@implementer(IOpenSSLServerConnectionCreator)
class MutualTLS:
    """
    Creates the server side of each TLS connection from the current
    options; L{reload} replaces them for the connections that follow.
    """

    log = Logger()

    def __init__(self, ca_path: str, cert_path: str, key_path: str):
        self.ca_path = ca_path
        self.cert_path = cert_path
        self.key_path = key_path
        self._options = server_options(ca_path, cert_path, key_path)

    @staticmethod
    def paths_from(config: Config) -> tuple[str, str, str]:
        pki_dir = config["tls", "pki_dir"]
        return (resolve(pki_dir, config["tls", "ca_cert"]),
                resolve(pki_dir, config["tls", "cert"]),
                resolve(pki_dir, config["tls", "key"]))

    @classmethod
    def from_config(cls, config: Config) -> "MutualTLS":
        return cls(*cls.paths_from(config))

    def reload(self, config: Config | None = None) -> None:
        """Re-read the files (at the paths of C{config}, when given).

        Raises L{TLSConfigError} and keeps the old context and paths on failure.
        """
        paths = (self.ca_path, self.cert_path, self.key_path)
        if config is not None:
            paths = self.paths_from(config)
        try:
            options = server_options(*paths)
        except TLSConfigError as e:
            self.log.error("TLS reload failed, keeping the current certificate: {error}", error=e)
            raise
        self.ca_path, self.cert_path, self.key_path = paths
        self._options = options
        self.log.info("TLS certificate reloaded from {cert}", cert=self.cert_path)

    def serverConnectionForTLS(self, tlsProtocol: Any) -> SSL.Connection:
        return self._options.serverConnectionForTLS(tlsProtocol)


def peer_common_name(transport: Any) -> str | None:
    """The subject CN of the peer's certificate, for log lines (None if unknown)."""
    getter = getattr(transport, "getPeerCertificate", None)
    if getter is None:
        return None
    try:
        cert = getter()
    except Exception:
        return None
    if cert is None:
        return None
    names = cert.to_cryptography().subject.get_attributes_for_oid(x509.NameOID.COMMON_NAME)
    return str(names[0].value) if names else None


def peer_description(transport: Any) -> str:
    """C{host:port (CN=...)}: who is on the other end, for logs and CallContext."""
    try:
        addr = transport.getPeer()
        where = f"{addr.host}:{addr.port}"
    except Exception:
        where = "unknown"
    cn = peer_common_name(transport)
    return f"{where} (CN={cn})" if cn else where
