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

CA_CERT, CA_KEY, SERVER_CERT, SERVER_KEY = "ca.crt", "ca.key", "server.pem", "server.key"
DEFAULT_HOSTS = ("localhost", "127.0.0.1", "::1")
VALID_DAYS = 365


def make_credentials(
    out: Path, hosts: Sequence[str] | None = None, nodes: Sequence[str] = ()
) -> Path:
    """Write a CA and a server certificate (unless present), and node key pairs.

    `hosts` (default: this machine's loopback names) are the names and addresses clients
    dial. Given for a directory that has credentials already, a server certificate for
    other hosts is issued again by the same CA, so devices keep the ca.crt they have.
    """
    out.mkdir(parents=True, exist_ok=True)
    wanted = list(hosts or DEFAULT_HOSTS)
    # The SuperLink's own runtime dials 127.0.0.1 over TLS, whatever address it serves on.
    wanted += [h for h in ("127.0.0.1",) if h not in wanted]
    if not (out / CA_CERT).exists():
        ca_key, ca_cert = _authority()
        (out / CA_CERT).write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        _write_private(out / CA_KEY, _pem(ca_key))
        _issue(out, ca_key, ca_cert, wanted)
    elif hosts is not None and sorted(server_hosts(out)) != sorted(wanted):
        if not (out / CA_KEY).exists():
            raise FileNotFoundError(
                f"{out / SERVER_CERT} is for {', '.join(server_hosts(out))}; a certificate "
                f"for other hosts needs the CA's key, and {out} has none (made before "
                "fedstream kept it): make new credentials in a new directory, and give the "
                "devices its ca.crt"
            )
        ca_key = serialization.load_pem_private_key((out / CA_KEY).read_bytes(), None)
        ca_cert = x509.load_pem_x509_certificate((out / CA_CERT).read_bytes())
        assert isinstance(ca_key, ec.EllipticCurvePrivateKey)
        _issue(out, ca_key, ca_cert, wanted)
    for name in nodes:
        if not (out / f"{name}.key").exists():
            node_key_pair(out, name)
    return out


def server_hosts(out: Path) -> list[str]:
    """The names and addresses the server certificate in `out` is valid for."""
    cert = x509.load_pem_x509_certificate((out / SERVER_CERT).read_bytes())
    names = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    return [str(name.value) for name in names]


def _issue(
    out: Path, ca_key: ec.EllipticCurvePrivateKey, ca_cert: x509.Certificate, hosts: list[str]
) -> None:
    key, cert = _server_certificate(ca_key, ca_cert, hosts)
    (out / SERVER_CERT).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    _write_private(out / SERVER_KEY, _pem(key))


def _pem(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


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


def check_certificate(path: Path) -> None:
    """Refuse a file that is not a PEM certificate, or one that is not valid now, before a
    SuperLink serves it or a SuperNode trusts it: either would start and then fail every
    connection (a SuperNode keeps retrying with a reason only in its log)."""
    try:
        certs = x509.load_pem_x509_certificates(path.read_bytes())
    except ValueError:
        raise ValueError(f"{path}: not a PEM certificate (a key, or another file?)") from None
    now = _now()
    for cert in certs:
        if cert.not_valid_after_utc < now:
            raise ValueError(
                f"{path}: the certificate expired on {cert.not_valid_after_utc:%Y-%m-%d %H:%M} "
                "UTC: make new credentials with `fedstream certs`"
            )
        if cert.not_valid_before_utc > now:
            raise ValueError(
                f"{path}: the certificate is valid only from "
                f"{cert.not_valid_before_utc:%Y-%m-%d %H:%M} UTC (is this machine's clock right?)"
            )


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
