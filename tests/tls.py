"""A local PostgreSQL serving TLS with a certificate from a CA generated here.

``tls_cluster`` starts one (certificate for ``localhost`` and 127.0.0.1) with extra
pg_hba.conf lines in front (e.g. a role the server asks for a cleartext password), and
writes the PEM of its CA ("right") and of another CA ("wrong") next to it.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from devstack import PostgresCluster, free_port, new_password

__all__ = ["tls_cluster"]


def _name(common_name: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _authority(common_name: str) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    return key, cert


def _server_cert(ca_key: ec.EllipticCurvePrivateKey, ca: x509.Certificate) -> tuple[bytes, bytes]:
    key = ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(_name("localhost"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.DNSName("localhost"), x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA256())
    )
    key_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    return cert.public_bytes(serialization.Encoding.PEM), key_pem


@contextmanager
def tls_cluster(hba_lines: tuple[str, ...] = ()) -> Iterator[tuple[PostgresCluster, Path, Path]]:
    """A cluster serving TLS with a certificate of CA "right"; also the PEM of CA "wrong"."""
    base = Path(tempfile.mkdtemp(prefix="commng-pg-tls-"))
    cluster = PostgresCluster(base / "data", free_port(), new_password())
    try:
        cluster.init()
        ca_key, ca = _authority("commng test CA")
        cert, key = _server_cert(ca_key, ca)
        for name, data, mode in (("server.crt", cert, 0o644), ("server.key", key, 0o600)):
            path = cluster.datadir / name
            path.write_bytes(data)
            path.chmod(mode)
            if os.geteuid() == 0:
                shutil.chown(path, "postgres", "postgres")
        with open(cluster.datadir / "postgresql.conf", "a") as conf:
            conf.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
        hba = cluster.datadir / "pg_hba.conf"
        hba.write_text("".join(line + "\n" for line in hba_lines) + hba.read_text())
        cluster.start()
        right = base / "right-ca.pem"
        right.write_bytes(ca.public_bytes(serialization.Encoding.PEM))
        wrong = base / "wrong-ca.pem"
        wrong.write_bytes(_authority("someone else's CA")[1].public_bytes(serialization.Encoding.PEM))
        yield cluster, right, wrong
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
