"""
Client TLS from a VDSM-style PKI directory: trust the agents' CA, present
the client certificate (or, on a host, the host's own certificate, as
vdsm-client does).
"""

from __future__ import annotations

import os

from twisted.internet import ssl


class PkiError(Exception):
    """The PKI directory lacks a file the client needs."""


def _read(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise PkiError(f"cannot read {path}: {e.strerror}") from None


def client_credentials(pki_dir: str) -> tuple[ssl.Certificate, ssl.PrivateCertificate]:
    """The CA to trust and the certificate (with key) to present."""
    ca = ssl.Certificate.loadPEM(_read(os.path.join(pki_dir, "certs", "cacert.pem")))
    for cert, key in (("clientcert.pem", "clientkey.pem"), ("vdsmcert.pem", "vdsmkey.pem")):
        cert_path = os.path.join(pki_dir, "certs", cert)
        key_path = os.path.join(pki_dir, "keys", key)
        if os.path.exists(cert_path) and os.path.exists(key_path):
            mine = ssl.PrivateCertificate.loadPEM(_read(cert_path) + b"\n" + _read(key_path))
            return ca, mine
    raise PkiError(f"no client certificate in {pki_dir} "
                   "(certs/clientcert.pem + keys/clientkey.pem or certs/vdsmcert.pem + keys/vdsmkey.pem)")


def client_tls_options(pki_dir: str, hostname: str, verify_hostname: bool = True):
    """
    Connection options for L{twisted.internet.endpoints.wrapClientTLS}.
    Without C{verify_hostname} the chain is still checked against the CA;
    only the name check is skipped (agents reached by an address their
    certificate does not list).
    """
    ca, mine = client_credentials(pki_dir)
    if verify_hostname:
        return ssl.optionsForClientTLS(hostname, trustRoot=ca, clientCertificate=mine)
    return ssl.CertificateOptions(privateKey=mine.privateKey.original,
                                  certificate=mine.original,
                                  trustRoot=ca, raiseMinimumTo=ssl.TLSVersion.TLSv1_2)
