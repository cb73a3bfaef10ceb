"""What the local IAM-checking endpoint adds per query and per connect: `python -m bench.iam_endpoint`.

pgbench (another process, libpq) runs ``SELECT 1`` against the same PostgreSQL two ways,
interleaved round by round: directly over verified TLS with the password, and through
``devstack.iam_endpoint`` (verified TLS to the endpoint, a token, the endpoint's SCRAM login
and relay to the server). Three loads: one client (latency per query), 20 clients on 2
threads (the gevent service's 2 workers x 10 connections), and one client reconnecting
for every query (``-C``: the token check and the backend login on every connect).
The endpoint runs in this process, as in the tests and ``make run``.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import statistics
import subprocess
import tempfile
from pathlib import Path

import boto3
from psycopg2 import sql

from devstack import PostgresCluster, free_port, new_password
from devstack.iam_endpoint import IamEndpoint
from devstack.postgres import pg_bindir
from devstack.tls import make_server_cert

LOADS = {
    "1 client": ["-c", "1"],
    "20 clients": ["-c", "20", "-j", "2"],
    "connect per query": ["-c", "1", "-C"],
}
_LATENCY = re.compile(r"latency average = ([0-9.]+) ms")
_TPS = re.compile(r"tps = ([0-9.]+)")


def _tls_cluster(base: Path) -> tuple[PostgresCluster, Path]:
    cluster = PostgresCluster(base / "data", free_port(), new_password())
    cluster.init()
    ca, cert, key = make_server_cert(base / "tls", "localhost")
    for source, name in ((cert, "server.crt"), (key, "server.key")):
        target = cluster.datadir / name
        shutil.copy(source, target)
        target.chmod(0o600)
        cluster._own(target)
    with open(cluster.datadir / "postgresql.conf", "a") as conf:
        conf.write("ssl = on\nssl_cert_file = 'server.crt'\nssl_key_file = 'server.key'\n")
    cluster.start()
    return cluster, ca


def _pgbench(
    port: int, user: str, password: str, ca: Path, script: Path, load: list[str], seconds: int
) -> str:
    env = {
        **os.environ,
        "PGHOST": "localhost",
        "PGHOSTADDR": "127.0.0.1",
        "PGPORT": str(port),
        "PGUSER": user,
        "PGDATABASE": "postgres",
        "PGPASSWORD": password,
        "PGSSLMODE": "verify-full",
        "PGSSLROOTCERT": str(ca),
    }
    cmd = [str(pg_bindir() / "pgbench"), "-n", "-f", str(script), "-T", str(seconds), *load]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, check=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=int, default=5, help="length of each pgbench run")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of each load and path")
    args = parser.parse_args()
    base = Path(tempfile.mkdtemp(prefix="commng-bench-iam-"))
    base.chmod(0o755)
    cluster, ca = _tls_cluster(base)
    try:
        password = new_password()
        cluster.execute(sql.SQL("CREATE ROLE bench LOGIN PASSWORD {}").format(sql.Literal(password)))
        script = base / "select1.sql"
        script.write_text("SELECT 1;\n")
        endpoint = IamEndpoint(
            backend=lambda: ("127.0.0.1", cluster.port),
            logins={"bench": password},
            hostname="localhost",
            region="us-east-1",
            access_key="testing",
            secret_key="testing",
            certfile=base / "tls" / "server.crt",
            keyfile=base / "tls" / "server.key",
        )
        with endpoint:
            rds = boto3.client(
                "rds", region_name="us-east-1", aws_access_key_id="testing", aws_secret_access_key="testing"
            )
            token = rds.generate_db_auth_token("localhost", endpoint.port, "bench", "us-east-1")
            paths = {
                "direct (TLS)": (cluster.port, password),
                "endpoint (TLS, token)": (endpoint.port, token),
            }
            results: dict[tuple[str, str], list[tuple[float, float]]] = {}
            for _ in range(args.rounds):
                for load_name, load in LOADS.items():
                    for path_name, (port, secret) in paths.items():
                        out = _pgbench(port, "bench", secret, ca, script, load, args.seconds)
                        latency = float(_LATENCY.search(out).group(1))  # type: ignore[union-attr]
                        tps = float(_TPS.search(out).group(1))  # type: ignore[union-attr]
                        results.setdefault((load_name, path_name), []).append((latency, tps))
            refusals = dict(endpoint.refusals)
    finally:
        cluster.stop("immediate")
        shutil.rmtree(base, ignore_errors=True)
    print(f"pgbench SELECT 1, {args.rounds} interleaved rounds of {args.seconds} s (medians)")
    print(f"{'load':<20} {'path':<24} {'latency ms':>11} {'tps':>9}")
    for load_name in LOADS:
        direct = statistics.median(lat for lat, _ in results[(load_name, "direct (TLS)")])
        for path_name in paths:
            runs = results[(load_name, path_name)]
            latency = statistics.median(lat for lat, _ in runs)
            tps = statistics.median(t for _, t in runs)
            print(f"{load_name:<20} {path_name:<24} {latency:>11.3f} {tps:>9.0f}")
        added = statistics.median(lat for lat, _ in results[(load_name, "endpoint (TLS, token)")]) - direct
        print(f"{'':<20} {'added by the endpoint':<24} {added:>11.3f}")
    print(f"refused logins: {refusals or 'none'}")


if __name__ == "__main__":
    main()
