"""A local PostgreSQL serving TLS with a certificate from a CA generated here.

``tls_cluster`` starts one (certificate for ``localhost`` and 127.0.0.1) with extra
pg_hba.conf lines in front (e.g. a role the server asks for a cleartext password), and
writes the PEM of its CA ("right") and of another CA ("wrong") next to it.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from devstack import PostgresCluster, free_port, new_password
from devstack.tls import ca_pem, new_authority, server_cert_pem

__all__ = ["tls_cluster"]


@contextmanager
def tls_cluster(hba_lines: tuple[str, ...] = ()) -> Iterator[tuple[PostgresCluster, Path, Path]]:
    """A cluster serving TLS with a certificate of CA "right"; also the PEM of CA "wrong"."""
    base = Path(tempfile.mkdtemp(prefix="commng-pg-tls-"))
    cluster = PostgresCluster(base / "data", free_port(), new_password())
    try:
        cluster.init()
        ca_key, ca = new_authority("commng test CA")
        cert, key = server_cert_pem(ca_key, ca)
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
        right.write_bytes(ca_pem(ca))
        wrong = base / "wrong-ca.pem"
        wrong.write_bytes(ca_pem(new_authority("someone else's CA")[1]))
        yield cluster, right, wrong
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)
