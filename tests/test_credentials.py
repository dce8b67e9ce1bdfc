"""`fedstream certs`: a CA, a server certificate for the names clients dial, node keys."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec

from fedstream.server.credentials import (
    CA_CERT,
    CA_KEY,
    SERVER_CERT,
    make_credentials,
    server_hosts,
)


def issued_by_ca(out: Path) -> bool:
    ca = x509.load_pem_x509_certificate((out / CA_CERT).read_bytes())
    cert = x509.load_pem_x509_certificate((out / SERVER_CERT).read_bytes())
    assert isinstance(ca.public_key(), ec.EllipticCurvePublicKey)
    cert.verify_directly_issued_by(ca)  # raises if the signature or issuer is wrong
    return True


def test_other_hosts_get_a_new_server_certificate_from_the_same_ca(tmp_path: Path) -> None:
    out = tmp_path / "creds"
    make_credentials(out, nodes=["dev0"])
    assert sorted(server_hosts(out)) == ["127.0.0.1", "::1", "localhost"]
    ca_before = (out / CA_CERT).read_bytes()
    make_credentials(out, nodes=["dev1"])  # no hosts given: the certificate stays
    assert sorted(server_hosts(out)) == ["127.0.0.1", "::1", "localhost"]
    make_credentials(out, ["agg.example.org"], nodes=["dev1"])
    assert server_hosts(out) == ["agg.example.org", "127.0.0.1"]
    assert (out / CA_CERT).read_bytes() == ca_before and issued_by_ca(out)
    assert (out / CA_KEY).stat().st_mode & 0o777 == 0o600
    assert (out / "dev0.key").exists() and (out / "dev1.pub").exists()


def test_credentials_without_a_ca_key_say_how_to_start_over(tmp_path: Path) -> None:
    out = tmp_path / "creds"
    make_credentials(out)
    (out / CA_KEY).unlink()  # as made by fedstream before it kept the CA's key
    with pytest.raises(FileNotFoundError, match="make new credentials in a new directory"):
        make_credentials(out, ["agg.example.org"])
    proc = subprocess.run(
        [sys.executable, "-m", "fedstream.cli.main", "certs", str(out), "--host", "agg.org"],
        capture_output=True, text=True, timeout=60,
    )
    assert proc.returncode == 2 and "has none" in proc.stderr
