"""The ``iam`` scenario and its password twin: the same local endpoint, only the login differs.

RDS checks IAM tokens itself; locally the IAM-checking endpoint (``devstack.iam_endpoint``)
does, in front of PostgreSQL, with TLS termination and a relay in one asyncio thread. A
scenario through it compared with ``steady`` (straight to PostgreSQL, no TLS) would measure
that local endpoint, not IAM authentication. So the twin, ``iam-password``, goes through
the same endpoint code in password mode (``check_tokens=False``: PostgreSQL's own SCRAM
exchange relayed untouched), with the same host name, port, ``verify-full`` TLS and relay:

- ``iam``: ``DB_AUTH=iam``, ``POSTGRES_USER``, the stack's dummy AWS credentials (the ones
  the endpoint verifies signatures with); each new connection gets a token, reused for
  ``TOKEN_REUSE_S``; the endpoint accepts one for ``TOKEN_LIFETIME_S`` (RDS: 900 s), so
  tokens are re-signed, and old ones expire, during the run;
- ``iam-password``: ``DB_SECRET_ID`` (a Secrets Manager secret, watched), the password sent
  only over SCRAM (``require_auth=scram-sha-256``).

Both recycle pooled connections after ``RECYCLE_S`` (``DB_ROTATION_PERIOD_S``, the
service's pool_recycle, at its minimum), besides the pool's own overflow connections,
so that new logins happen under load; the endpoint counts them (completed logins).
"""

from __future__ import annotations

import statistics
from datetime import datetime
from pathlib import Path
from typing import Any

from bench.iam_process import EndpointProcess
from bench.measure import log_records
from bench.stack import AppDatabase, BenchStack
from devstack.tls import make_server_cert

__all__ = [
    "HOSTNAME",
    "RECYCLE_S",
    "TOKEN_LIFETIME_S",
    "TOKEN_REUSE_S",
    "app_env",
    "figures",
    "start_endpoint",
]

HOSTNAME = "localhost"  # what the certificate and the token name; /etc/hosts maps it to 127.0.0.1
TOKEN_LIFETIME_S = 30.0
TOKEN_REUSE_S = 20
RECYCLE_S = 60
MODES = ("iam", "password")


def _tls(stack: BenchStack) -> tuple[Path, Path, Path]:
    """The stack's CA and the endpoint's certificate for ``localhost`` (made once)."""
    directory = stack.workdir / "iam-tls"
    paths = (directory / "ca.pem", directory / "server.crt", directory / "server.key")
    if not paths[0].exists():
        return make_server_cert(directory, HOSTNAME)
    return paths


def start_endpoint(stack: BenchStack, db: AppDatabase, mode: str, workdir: Path) -> EndpointProcess:
    """An endpoint process in front of the stack's PostgreSQL, checking tokens (``iam``) or not."""
    assert mode in MODES
    _, cert, key = _tls(stack)
    env = stack.app_env(db.name, workdir, (1, 0), 1000, 0)  # only for the AWS keys and region
    config = {
        "backend_port": stack.cluster.port,
        "logins": {db.role: db.password} if mode == "iam" else {},
        "hostname": HOSTNAME,
        "region": env["AWS_REGION"],
        "access_key": env["AWS_ACCESS_KEY_ID"],
        "secret_key": env["AWS_SECRET_ACCESS_KEY"],
        "certfile": str(cert),
        "keyfile": str(key),
        "token_lifetime_s": TOKEN_LIFETIME_S,
        "check_tokens": mode == "iam",
    }
    return EndpointProcess(config, workdir / "endpoint.log").start()


def app_env(stack: BenchStack, endpoint: EndpointProcess, db: AppDatabase, mode: str) -> dict[str, str]:
    """What the app gets on top of the bench's environment to log in through ``endpoint``."""
    ca, _, _ = _tls(stack)
    env = {
        "POSTGRES_HOST": HOSTNAME,
        "POSTGRES_PORT": str(endpoint.port),
        "POSTGRES_SSL": "verify-full",
        "POSTGRES_SSL_ROOT_CERT": str(ca),
        "DB_ROTATION_PERIOD_S": str(RECYCLE_S),
    }
    if mode == "iam":
        env.update(DB_AUTH="iam", POSTGRES_USER=db.role, DB_IAM_TOKEN_REUSE_S=str(TOKEN_REUSE_S))
    return env


def figures(
    before: dict[str, Any],
    after: dict[str, Any],
    elapsed_s: float,
    requests: int,
    output: str,
    wall_t0: float,
) -> dict[str, Any]:
    """Logins, tokens and refusals of one scenario (``before``/``after``: the endpoint's stats).

    Connects and the endpoint's CPU are counted over the measured load (the whole run when
    interleaved: the endpoint idles through the other scenario's slices); refusals, tokens
    signed and ``iam_token_refused`` lines over the scenario's whole life (start-up and
    warm-up too): each must be 0 where it is a refusal.
    """
    connects = int(after["connects"]) - int(before["connects"])
    signed, refused = _token_events(output, wall_t0)
    in_run = [us for t, us in signed if t >= 0]
    all_us = [us for _, us in signed]
    return {
        "connects": connects,
        "connects_per_s": round(connects / elapsed_s, 2) if elapsed_s else None,
        "endpoint_refusals": dict(after["refusals"]),
        "app_token_refusals": refused,
        "tokens_signed_run": len(in_run),
        "tokens_signed_total": len(all_us),
        "sign_us_median": round(statistics.median(all_us)) if all_us else None,
        "tokens_in_log": output.count("X-Amz-Signature"),
        # The endpoint's own work (TLS, relay, and in iam mode the token check and SCRAM login).
        "endpoint_cpu_ms_per_request": round((after["cpu_s"] - before["cpu_s"]) * 1000 / max(1, requests), 3),
    }


def _token_events(output: str, wall_t0: float) -> tuple[list[tuple[float, float]], dict[str, int]]:
    """(seconds from ``wall_t0``, sign_us) per ``iam_token_signed``; refusals by cause."""
    signed: list[tuple[float, float]] = []
    refused: dict[str, int] = {}
    for _, record in log_records(output):
        event = record.get("event")
        if event == "iam_token_signed":
            at = datetime.fromisoformat(record["timestamp"]).timestamp() - wall_t0
            signed.append((at, float(record.get("sign_us") or 0)))
        elif event in {"iam_token_refused", "iam_login_refused"}:
            key = f"{event} ({record.get('cause')})"
            refused[key] = refused.get(key, 0) + 1
    return signed, refused
