"""Everything a deployment needs to trust itself: a CA, a server certificate, SuperNode keys.

The SuperLink serves TLS with a certificate for the names and addresses clients dial (a
certificate without the address a client uses is refused by that client). SuperNodes
authenticate with EC P-384 key pairs in OpenSSH format, which is what Flower's SuperNode
loads; the server registers the public halves before the nodes connect. Keys and
certificates are made with `cryptography` and written owner-readable only.
"""

from __future__ import annotations

import datetime as dt
import ipaddress
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

CA_CERT, SERVER_CERT, SERVER_KEY = "ca.crt", "server.pem", "server.key"
VALID_DAYS = 365


def make_credentials(
    out: Path,
    hosts: Sequence[str] = ("localhost", "127.0.0.1", "::1"),
    nodes: Sequence[str] = (),
) -> Path:
    """Write a CA and a server certificate for `hosts` (unless present), and node key pairs."""
    out.mkdir(parents=True, exist_ok=True)
    # The SuperLink's own runtime dials 127.0.0.1 over TLS, whatever address it serves on.
    hosts = [*hosts, *(h for h in ("127.0.0.1",) if h not in hosts)]
    if not (out / CA_CERT).exists():
        ca_key, ca_cert = _authority()
        key, cert = _server_certificate(ca_key, ca_cert, hosts)
        (out / CA_CERT).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        (out / SERVER_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        _write_private(out / SERVER_KEY, key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        ))
    for name in nodes:
        if not (out / f"{name}.key").exists():
            node_key_pair(out, name)
    return out


def node_key_pair(out: Path, name: str) -> tuple[Path, Path]:
    """A SuperNode's key pair: `name.key` (OpenSSH private) and `name.pub` (OpenSSH line)."""
    key = ec.generate_private_key(ec.SECP384R1())
    private = out / f"{name}.key"
    _write_private(private, key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    ))
    public = out / f"{name}.pub"
    public.write_bytes(key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    ) + b"\n")
    return private, public


def _write_private(path: Path, data: bytes) -> None:
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_bytes(data)


def _now() -> dt.datetime:
    return dt.datetime.now(dt.UTC)


def _authority() -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "fedstream deployment CA")])
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True, key_cert_sign=True, crl_sign=True,
                content_commitment=False, key_encipherment=False, data_encipherment=False,
                key_agreement=False, encipher_only=False, decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _server_certificate(
    ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: Sequence[str]
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP384R1())
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    cert = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, hosts[0])]))
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(_now() - dt.timedelta(minutes=5))
        .not_valid_after(_now() + dt.timedelta(days=VALID_DAYS))
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, hashes.SHA256())
    )
    return key, cert
