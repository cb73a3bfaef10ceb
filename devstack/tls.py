"""Throwaway certificates: a CA made here, and a server certificate it signs.

Enough for ``sslmode=verify-full`` against a local server: the server certificate names
the host (and 127.0.0.1), so libpq checks the chain and the name as it would against RDS.
Used by the TLS tests, the IAM-checking endpoint's tests and ``make run``.
"""

from __future__ import annotations

import datetime
import ipaddress
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devstack.postgres import write_private_file

# Long enough for a day of `make run`; short enough that a leaked one is soon worthless.
_VALIDITY = datetime.timedelta(days=1)


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def new_authority(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA: its key and certificate."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def server_cert_pem(
    ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate, hostname: str = "localhost"
) -> tuple[bytes, bytes]:
    """(certificate PEM, unencrypted PKCS#8 key PEM) for ``hostname`` and 127.0.0.1, signed by ``ca``."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    names: list[x509.GeneralName] = [x509.DNSName(hostname)]
    names.append(x509.IPAddress(ipaddress.ip_address("127.0.0.1")))
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hostname))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + _VALIDITY)
        .add_extension(x509.SubjectAlternativeName(names), critical=False)
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


def ca_pem(cert: x509.Certificate) -> bytes:
    """A CA certificate in PEM, what a client passes as ``sslrootcert``."""
    return cert.public_bytes(serialization.Encoding.PEM)


def make_server_cert(directory: Path, hostname: str = "localhost") -> tuple[Path, Path, Path]:
    """A new CA and a server certificate for ``hostname`` in ``directory``: (ca, cert, key) paths.

    The key file is mode 0600 from its creation; the CA's own key is never written.
    """
    directory.mkdir(parents=True, exist_ok=True)
    ca_key, ca = new_authority(f"commng local CA for {hostname}")
    cert, key = server_cert_pem(ca_key, ca, hostname)
    ca_path, cert_path, key_path = directory / "ca.pem", directory / "server.crt", directory / "server.key"
    ca_path.write_bytes(ca_pem(ca))
    cert_path.write_bytes(cert)
    write_private_file(key_path, key.decode())
    return ca_path, cert_path, key_path
