"""
A development PKI in VDSM's layout, made with C{cryptography} (no openssl CLI).

On a real host the engine's CA issues the host certificate; this module makes
a self-contained stand-in (a CA, a host certificate, a client certificate) for
development hosts and for the tests, which also use L{create_ca} and
L{issue_cert} to make foreign CAs and self-signed certificates.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import socket
from typing import Iterable, Union

import attr
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

PrivateKey = ec.EllipticCurvePrivateKey

#: CN of the client certificate that create_pki makes for vdsm-twisted-client.
CLIENT_CN = "vdsm-twisted-client"


class PkiExists(Exception):
    """The directory already holds a CA; refusing to replace it silently."""


@attr.frozen
class PkiPaths:
    """Every file of a PKI directory in VDSM's layout."""

    directory: str
    ca_cert: str
    ca_key: str
    cert: str
    key: str
    client_cert: str
    client_key: str

    @classmethod
    def of(cls, directory: str) -> "PkiPaths":
        j = os.path.join
        return cls(
            directory=directory,
            ca_cert=j(directory, "certs", "cacert.pem"),
            ca_key=j(directory, "private", "cakey.pem"),
            cert=j(directory, "certs", "vdsmcert.pem"),
            key=j(directory, "keys", "vdsmkey.pem"),
            client_cert=j(directory, "certs", "clientcert.pem"),
            client_key=j(directory, "keys", "clientkey.pem"),
        )


def new_key() -> PrivateKey:
    return ec.generate_private_key(ec.SECP256R1())


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _validity(builder: x509.CertificateBuilder, days: int) -> x509.CertificateBuilder:
    # Backdate a little: clocks of the engine and the host are rarely equal.
    now = datetime.datetime.now(datetime.timezone.utc)
    return builder.not_valid_before(now - datetime.timedelta(hours=1)).not_valid_after(
        now + datetime.timedelta(days=days))


def create_ca(common_name: str = "vdsm-twisted CA", days: int = 3650) -> tuple[PrivateKey, x509.Certificate]:
    """A new self-signed CA able to sign leaf certificates only."""
    key = new_key()
    ski = x509.SubjectKeyIdentifier.from_public_key(key.public_key())
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=False, key_cert_sign=True,
            crl_sign=True, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(ski, critical=False)
    )
    cert = _validity(builder, days).sign(key, hashes.SHA256())
    return key, cert


SanEntry = Union[str, ipaddress.IPv4Address, ipaddress.IPv6Address]


def _general_name(entry: SanEntry) -> x509.GeneralName:
    if isinstance(entry, (ipaddress.IPv4Address, ipaddress.IPv6Address)):
        return x509.IPAddress(entry)
    try:
        return x509.IPAddress(ipaddress.ip_address(entry))
    except ValueError:
        return x509.DNSName(entry)


def issue_cert(
    ca_key: PrivateKey | None,
    ca_cert: x509.Certificate | None,
    common_name: str,
    sans: Iterable[SanEntry] = (),
    server: bool = True,
    client: bool = True,
    days: int = 825,
) -> tuple[PrivateKey, x509.Certificate]:
    """
    A leaf certificate signed by C{ca_key}/C{ca_cert}, or self-signed when
    both are None.  C{sans} entries that parse as IP addresses become IP SANs,
    the others DNS SANs.
    """
    key = new_key()
    if (ca_key is None) != (ca_cert is None):
        raise ValueError("give both ca_key and ca_cert, or neither")
    issuer = ca_cert.subject if ca_cert is not None else _name(common_name)
    signer = ca_key if ca_key is not None else key
    usages = []
    if server:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(issuer)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.KeyUsage(
            digital_signature=True, content_commitment=False, key_encipherment=False,
            data_encipherment=False, key_agreement=True, key_cert_sign=False,
            crl_sign=False, encipher_only=False, decipher_only=False), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
    )
    if usages:
        builder = builder.add_extension(x509.ExtendedKeyUsage(usages), critical=False)
    names = [_general_name(s) for s in sans]
    if names:
        builder = builder.add_extension(x509.SubjectAlternativeName(names), critical=False)
    if ca_cert is not None:
        builder = builder.add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_cert.public_key()), critical=False)
    cert = _validity(builder, days).sign(signer, hashes.SHA256())
    return key, cert


def self_signed(common_name: str, sans: Iterable[SanEntry] = ()) -> tuple[PrivateKey, x509.Certificate]:
    """A leaf certificate signed by its own key (trusted by nobody)."""
    return issue_cert(None, None, common_name, sans)


def key_pem(key: PrivateKey) -> bytes:
    return key.private_bytes(serialization.Encoding.PEM,
                             serialization.PrivateFormat.PKCS8,
                             serialization.NoEncryption())


def cert_pem(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_pem(path: str, data: PrivateKey | x509.Certificate | bytes,
              mode: int | None = None, gid: int | None = None) -> None:
    """
    Write a key or certificate atomically (a reader never sees half a file,
    which matters when the agent reloads its TLS files while we write them).
    Keys default to mode 0640, certificates to 0644.
    """
    if isinstance(data, x509.Certificate):
        blob, default_mode = cert_pem(data), 0o644
    elif isinstance(data, bytes):
        blob, default_mode = data, 0o644
    else:
        blob, default_mode = key_pem(data), 0o640
    mode = default_mode if mode is None else mode
    tmp = f"{path}.tmp.{os.getpid()}"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(blob)
        os.chmod(tmp, mode)  # the umask may have narrowed it
        if gid is not None:
            os.chown(tmp, -1, gid)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def create_pki(directory: str, hostname: str | None = None, days: int = 3650,
               owner_gid: int | None = None, force: bool = False) -> PkiPaths:
    """
    Make a CA, a host certificate and a client certificate under
    C{directory} in VDSM's layout.  Refuses to replace an existing CA (it
    would invalidate every certificate it issued) unless C{force}.
    """
    paths = PkiPaths.of(directory)
    if not force and (os.path.exists(paths.ca_cert) or os.path.exists(paths.ca_key)):
        raise PkiExists(f"{directory} already holds a CA ({paths.ca_cert}); use force to replace it")
    hostname = hostname or socket.getfqdn()
    for sub, mode in (("certs", 0o755), ("keys", 0o750), ("private", 0o700)):
        path = os.path.join(directory, sub)
        os.makedirs(path, exist_ok=True)
        os.chmod(path, mode)
        if owner_gid is not None and sub == "keys":
            os.chown(path, -1, owner_gid)
    ca_key, ca_cert = create_ca(f"vdsm-twisted CA {hostname}", days)
    sans = [hostname, "localhost", ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    sans = list(dict.fromkeys(sans))  # hostname may be "localhost"
    host_key, host_cert = issue_cert(ca_key, ca_cert, hostname, sans, server=True, client=True, days=days)
    client_key, client_cert = issue_cert(ca_key, ca_cert, CLIENT_CN, server=False, client=True, days=days)
    write_pem(paths.ca_key, ca_key, mode=0o600)
    write_pem(paths.ca_cert, ca_cert)
    write_pem(paths.key, host_key, gid=owner_gid)
    write_pem(paths.cert, host_cert)
    write_pem(paths.client_key, client_key, gid=owner_gid)
    write_pem(paths.client_cert, client_cert)
    return paths


def main(argv: list[str] | None = None) -> int:
    """C{vdsm-twisted-tool pki}: make a development PKI (prints the paths)."""
    import argparse
    import grp
    import sys

    parser = argparse.ArgumentParser(prog="vdsm-twisted-tool pki",
                                     description="Create a development PKI in VDSM's layout.")
    parser.add_argument("--dir", default="/etc/pki/vdsm", help="PKI directory (default %(default)s)")
    parser.add_argument("--hostname", default=None, help="host certificate CN (default: FQDN)")
    parser.add_argument("--days", type=int, default=3650, help="validity (default %(default)s)")
    parser.add_argument("--group", default=None, help="group owning the private keys (e.g. vdsm)")
    parser.add_argument("--force", action="store_true", help="replace an existing CA")
    args = parser.parse_args(argv)
    try:
        gid = grp.getgrnam(args.group).gr_gid if args.group else None
        paths = create_pki(args.dir, args.hostname, args.days, gid, force=args.force)
    except (KeyError, PkiExists, OSError) as e:
        print(f"vdsm-twisted-tool pki: {e}", file=sys.stderr)
        return 1
    for field in attr.fields(PkiPaths):
        print(f"{field.name}: {getattr(paths, field.name)}")
    return 0
