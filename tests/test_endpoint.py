"""The local endpoint that stands for the RDS name (devstack/endpoint.py), on the suite's real servers.

New connections go where it points now, open ones stay where they were (as with a DNS
change), refusing is a refused connect, and ``make failover``'s control socket steers it.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from pathlib import Path

import psycopg2
import pytest

from devstack.endpoint import Endpoint, EndpointUnavailable, send_control
from devstack.postgres import PostgresCluster


def _connect(port: int, cluster: PostgresCluster) -> psycopg2.extensions.connection:
    conn = psycopg2.connect(
        host="127.0.0.1",
        port=port,
        user="postgres",
        password=cluster.superuser_password,
        dbname="postgres",
        connect_timeout=5,
    )
    conn.autocommit = True
    return conn


def _in_recovery(conn: psycopg2.extensions.connection) -> bool:
    with conn.cursor() as cur:
        cur.execute("SELECT pg_is_in_recovery()")
        return bool(cur.fetchone()[0])


@pytest.fixture
def endpoint(pg: PostgresCluster) -> Iterator[Endpoint]:
    with Endpoint(pg.port) as running:
        yield running


def test_new_connections_follow_the_endpoint_and_open_ones_stay(
    endpoint: Endpoint, pg: PostgresCluster, standby: PostgresCluster
) -> None:
    on_primary = _connect(endpoint.port, pg)
    assert not _in_recovery(on_primary)
    endpoint.point_at(standby.port)
    on_standby = _connect(endpoint.port, pg)  # the standby has the primary's superuser password
    assert _in_recovery(on_standby)
    assert not _in_recovery(on_primary)  # an open connection does not move
    # A result bigger than the socket buffers goes through whole (flow control both ways).
    with on_primary.cursor() as cur:
        cur.execute("SELECT repeat('x', 8 * 1024 * 1024)")
        assert len(cur.fetchone()[0]) == 8 * 1024 * 1024
    assert endpoint.status()["relayed"] == 2
    on_primary.close()
    on_standby.close()


def test_a_refusing_endpoint_refuses_then_listens_again_on_the_same_port(
    endpoint: Endpoint, pg: PostgresCluster
) -> None:
    held = _connect(endpoint.port, pg)
    port = endpoint.port
    endpoint.refuse()
    with pytest.raises(psycopg2.OperationalError, match="Connection refused"):
        _connect(port, pg)
    assert not _in_recovery(held)  # the relayed connection outlives the refusal
    endpoint.point_at(pg.port)
    assert endpoint.port == port
    _connect(port, pg).close()
    held.close()


def test_stop_closes_every_relayed_connection(pg: PostgresCluster) -> None:
    endpoint = Endpoint(pg.port).start()
    conn = _connect(endpoint.port, pg)
    endpoint.stop()
    with pytest.raises(psycopg2.OperationalError), conn.cursor() as cur:
        cur.execute("SELECT 1")


def test_the_control_socket_moves_it_and_says_what_it_refuses(
    endpoint: Endpoint, pg: PostgresCluster
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        control = Path(tmp) / "endpoint.sock"
        endpoint.serve_control(control)
        assert control.stat().st_mode & 0o777 == 0o600
        assert send_control(control, "refuse")["target"] is None
        moved = send_control(control, "point_at", pg.port)
        assert (moved["target"], moved["port"]) == (pg.port, endpoint.port)
        with pytest.raises(EndpointUnavailable, match="the endpoint refused jump: unknown op 'jump'"):
            send_control(control, "jump")
    with pytest.raises(EndpointUnavailable, match="does not answer"):
        send_control(Path(tmp) / "endpoint.sock", "status")
