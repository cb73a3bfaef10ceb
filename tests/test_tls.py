"""TLS that verifies: a local PostgreSQL with a certificate from a CA generated here.

verify-full connects through the engine the rotation layer builds; a server certificate
from another CA fails with a clear error and never falls back to an unverified or
cleartext connection; and a server that asks for the password in cleartext gets nothing.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa
from psycopg2 import sql

from commng_rotation import RotationSettings, probe
from commng_rotation.credentials import static_credentials
from commng_rotation.engines import EngineFactory
from devstack import PostgresCluster, free_port, new_password
from devstack.tls import ca_pem, new_authority, server_cert_pem
from tests.helpers import assert_no_secrets

CLEARTEXT_ROLE = "cleartext_user"


@pytest.fixture(scope="module")
def tls_cluster() -> Iterator[tuple[PostgresCluster, Path, Path]]:
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
        # One role whose login the server asks for in cleartext (the downgrade an attacker wants).
        hba = cluster.datadir / "pg_hba.conf"
        hba.write_text(f"host all {CLEARTEXT_ROLE} 127.0.0.1/32 password\n" + hba.read_text())
        cluster.start()
        right = base / "right-ca.pem"
        right.write_bytes(ca_pem(ca))
        wrong = base / "wrong-ca.pem"
        wrong.write_bytes(ca_pem(new_authority("someone else's CA")[1]))
        yield cluster, right, wrong
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


def _role(cluster: PostgresCluster, name: str) -> str:
    password = new_password()
    cluster.execute(sql.SQL("DROP ROLE IF EXISTS {}").format(sql.Identifier(name)))
    cluster.execute(
        sql.SQL("CREATE ROLE {} LOGIN PASSWORD {}").format(sql.Identifier(name), sql.Literal(password))
    )
    return password


def _engine(cluster: PostgresCluster, username: str, password: str, **overrides: Any) -> sa.Engine:
    settings = RotationSettings(
        host="127.0.0.1",
        port=cluster.port,
        dbname="postgres",
        username=username,
        password=password,
        connect_timeout_s=3,
        **overrides,
    )
    return EngineFactory(settings).build(static_credentials(settings)).engine


def test_verify_full_connects_over_tls_to_a_server_of_the_trusted_ca(
    tls_cluster: tuple[PostgresCluster, Path, Path],
) -> None:
    cluster, right, _ = tls_cluster
    password = _role(cluster, "tls_app")
    engine = _engine(cluster, "tls_app", password, sslmode="verify-full", ssl_root_cert=str(right))
    try:
        probe(engine, 3.0)
        with engine.connect() as conn:
            ssl = conn.exec_driver_sql("SELECT ssl FROM pg_stat_ssl WHERE pid = pg_backend_pid()").scalar()
        assert ssl is True
    finally:
        engine.dispose()


def test_a_server_certificate_from_another_ca_fails_clearly_and_never_falls_back(
    tls_cluster: tuple[PostgresCluster, Path, Path],
) -> None:
    cluster, _, wrong = tls_cluster
    password = _role(cluster, "tls_app")
    engine = _engine(cluster, "tls_app", password, sslmode="verify-full", ssl_root_cert=str(wrong))
    try:
        with pytest.raises(sa.exc.OperationalError) as raised:
            probe(engine, 3.0)
        assert "certificate verify failed" in str(raised.value.orig)
        assert_no_secrets(str(raised.value), [password])
        unencrypted = cluster.execute(
            "SELECT count(*) FROM pg_stat_activity a JOIN pg_stat_ssl s USING (pid) "
            "WHERE a.usename = 'tls_app' AND NOT s.ssl"
        )
        assert unencrypted[0][0] == 0
    finally:
        engine.dispose()


def test_a_server_asking_for_a_cleartext_password_gets_none(
    tls_cluster: tuple[PostgresCluster, Path, Path],
) -> None:
    cluster, right, _ = tls_cluster
    password = _role(cluster, CLEARTEXT_ROLE)
    engine = _engine(cluster, CLEARTEXT_ROLE, password, sslmode="verify-full", ssl_root_cert=str(right))
    try:
        with pytest.raises(sa.exc.OperationalError) as raised:
            probe(engine, 3.0)
        assert "scram-sha-256" in str(raised.value.orig)
        assert_no_secrets(str(raised.value), [password])
    finally:
        engine.dispose()
