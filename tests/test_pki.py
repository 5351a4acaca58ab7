"""The development PKI: layout, modes, names, chains."""

from __future__ import annotations

import grp
import ipaddress
import os
import stat

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from vdsm_twisted.tool import pki


def load(path):
    with open(path, "rb") as f:
        return x509.load_pem_x509_certificate(f.read())


def load_key(path):
    with open(path, "rb") as f:
        return serialization.load_pem_private_key(f.read(), None)


def cn(cert):
    return cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value


def mode(path):
    return stat.S_IMODE(os.stat(path).st_mode)


def eku(cert):
    return set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)


@pytest.fixture
def paths(tmp_path):
    return pki.create_pki(str(tmp_path / "pki"), hostname="host1.example")


def test_layout_and_modes(paths, tmp_path):
    base = tmp_path / "pki"
    assert paths.ca_cert == str(base / "certs" / "cacert.pem")
    assert paths.cert == str(base / "certs" / "vdsmcert.pem")
    assert paths.key == str(base / "keys" / "vdsmkey.pem")
    assert paths.client_cert == str(base / "certs" / "clientcert.pem")
    assert paths.client_key == str(base / "keys" / "clientkey.pem")
    assert paths.ca_key == str(base / "private" / "cakey.pem")
    assert mode(paths.ca_key) == 0o600
    for key in (paths.key, paths.client_key):
        assert mode(key) == 0o640
    for cert in (paths.ca_cert, paths.cert, paths.client_cert):
        assert mode(cert) == 0o644
    assert sorted(os.listdir(base)) == ["certs", "keys", "private"]
    assert not [name for name in os.listdir(base / "certs") if ".tmp." in name]


def test_host_certificate(paths):
    ca, host = load(paths.ca_cert), load(paths.cert)
    host.verify_directly_issued_by(ca)
    assert cn(host) == "host1.example"
    san = host.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["host1.example", "localhost"]
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"), ipaddress.ip_address("::1")]
    assert eku(host) == {ExtendedKeyUsageOID.SERVER_AUTH, ExtendedKeyUsageOID.CLIENT_AUTH}
    assert not host.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert load_key(paths.key).public_key() == host.public_key()
    assert isinstance(host.public_key(), ec.EllipticCurvePublicKey)
    assert host.public_key().curve.name == "secp256r1"


def test_client_certificate_and_ca(paths):
    ca, client = load(paths.ca_cert), load(paths.client_cert)
    client.verify_directly_issued_by(ca)
    ca.verify_directly_issued_by(ca)
    assert cn(client) == pki.CLIENT_CN == "vdsm-twisted-client"
    assert eku(client) == {ExtendedKeyUsageOID.CLIENT_AUTH}
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert load_key(paths.client_key).public_key() == client.public_key()
    assert load_key(paths.ca_key).public_key() == ca.public_key()


def test_refuses_to_replace_a_ca(paths):
    def read(path):
        with open(path, "rb") as f:
            return f.read()

    before = read(paths.ca_cert)
    with pytest.raises(pki.PkiExists):
        pki.create_pki(paths.directory, hostname="host1.example")
    assert read(paths.ca_cert) == before
    again = pki.create_pki(paths.directory, hostname="host2.example", force=True)
    assert read(again.ca_cert) != before
    assert cn(load(again.cert)) == "host2.example"
    load(again.cert).verify_directly_issued_by(load(again.ca_cert))


def test_owner_group_and_days(tmp_path):
    gid = grp.getgrnam("kvm").gr_gid
    paths = pki.create_pki(str(tmp_path / "p"), hostname="localhost", days=10, owner_gid=gid)
    for key in (paths.key, paths.client_key):
        assert os.stat(key).st_gid == gid
    assert os.stat(os.path.dirname(paths.key)).st_gid == gid
    assert os.stat(paths.ca_key).st_gid == os.getgid()
    cert = load(paths.cert)
    lifetime = cert.not_valid_after_utc - cert.not_valid_before_utc
    assert 10 <= lifetime.days <= 11
    # "localhost" as the hostname does not repeat the SAN
    san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.DNSName) == ["localhost"]


def test_foreign_ca_and_self_signed_do_not_chain():
    ca_key, ca_cert = pki.create_ca("A")
    other_key, other_ca = pki.create_ca("B")
    _, leaf = pki.issue_cert(other_key, other_ca, "x", sans=["h", "10.0.0.1"])
    leaf.verify_directly_issued_by(other_ca)
    with pytest.raises(Exception):
        leaf.verify_directly_issued_by(ca_cert)
    _, selfie = pki.self_signed("me")
    selfie.verify_directly_issued_by(selfie)
    with pytest.raises(Exception):
        selfie.verify_directly_issued_by(ca_cert)
    san = leaf.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [ipaddress.ip_address("10.0.0.1")]
    with pytest.raises(ValueError):
        pki.issue_cert(ca_key, None, "half")


def test_write_pem_modes(tmp_path):
    key, cert = pki.self_signed("w")
    pki.write_pem(str(tmp_path / "k.pem"), key)
    pki.write_pem(str(tmp_path / "c.pem"), cert)
    pki.write_pem(str(tmp_path / "k2.pem"), key, mode=0o600)
    assert mode(tmp_path / "k.pem") == 0o640
    assert mode(tmp_path / "c.pem") == 0o644
    assert mode(tmp_path / "k2.pem") == 0o600
    assert load(tmp_path / "c.pem") == cert
    assert load_key(tmp_path / "k.pem").public_key() == key.public_key()


def test_main(tmp_path, capsys):
    directory = str(tmp_path / "cli")
    assert pki.main(["--dir", directory, "--hostname", "h.example", "--group", "vdsm"]) == 0
    out = capsys.readouterr().out
    assert f"cert: {directory}/certs/vdsmcert.pem" in out
    assert cn(load(f"{directory}/certs/vdsmcert.pem")) == "h.example"
    assert os.stat(f"{directory}/keys/vdsmkey.pem").st_gid == grp.getgrnam("vdsm").gr_gid
    assert pki.main(["--dir", directory]) == 1
    assert "already holds a CA" in capsys.readouterr().err
    assert pki.main(["--dir", str(tmp_path / "x"), "--group", "no-such-group-here"]) == 1
