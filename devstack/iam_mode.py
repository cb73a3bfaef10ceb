"""`make run AUTH=iam`: the service logs in with IAM tokens, checked by the stack's own endpoint.

What RDS does for IAM database authentication, the stack does with pieces of its own:

- ``rds_iam`` exists (a NOLOGIN role standing for RDS's), and ``flask db bootstrap`` with
  ``DB_APP_IAM_USER=commng_app`` creates the app login without a password and grants it
  (commng/bootstrap.py), as the Terraform's migration task does.
- An IAM-checking endpoint (``devstack/iam_endpoint.py``) listens on 127.0.0.1 under the
  name ``localhost``, with a certificate from a CA made for this run (``.local/tls/``):
  it checks each token with botocore's signer against the stack's AWS credentials and
  region, then logs in to PostgreSQL as that user with a password only this process knows
  (set on the role after the bootstrap, never written anywhere), through the stack's
  plain endpoint, so ``make failover`` and ``make switchover`` move it too.
- The service gets ``DB_AUTH=iam``, ``POSTGRES_USER``, ``POSTGRES_HOST=localhost`` and
  ``verify-full`` against that CA: no secret, no watcher, no Secrets Manager call. The
  master secret stays, for the bootstrap, as on RDS.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from psycopg2 import sql

from devstack.iam_endpoint import IamEndpoint
from devstack.postgres import PostgresCluster, new_password
from devstack.stack import APP_ROLE, DUMMY_AWS, LOCAL
from devstack.tls import make_server_cert

__all__ = ["HOSTNAME", "IamStack", "bootstrap_env", "service_env"]

HOSTNAME = "localhost"  # the name tokens are signed for, and the certificate's
TLS_DIR = LOCAL / "tls"


class IamStack:
    """The ``rds_iam`` role, the certificate and the IAM-checking endpoint of one run."""

    def __init__(self, cluster: PostgresCluster, backend: Callable[[], tuple[str, int]], port: int) -> None:
        self.cluster = cluster
        self.backend = backend
        self.port = port
        self.password = new_password()  # commng_app's, for the endpoint's backend login only
        self.ca: Path | None = None
        self.endpoint: IamEndpoint | None = None

    def prepare(self) -> None:
        """``rds_iam`` as RDS has it, before the bootstrap grants it."""
        if not self.cluster.execute("SELECT 1 FROM pg_roles WHERE rolname = 'rds_iam'"):
            self.cluster.execute("CREATE ROLE rds_iam NOLOGIN")

    def start(self) -> IamEndpoint:
        """After the bootstrap: the app role's backend password, then the endpoint."""
        self.cluster.execute(
            sql.SQL("ALTER ROLE {} PASSWORD {}").format(sql.Identifier(APP_ROLE), sql.Literal(self.password))
        )
        self.ca, cert, key = make_server_cert(TLS_DIR, HOSTNAME)
        self.endpoint = IamEndpoint(
            backend=self.backend,
            logins={APP_ROLE: self.password},
            hostname=HOSTNAME,
            region=DUMMY_AWS["AWS_REGION"],
            access_key=DUMMY_AWS["AWS_ACCESS_KEY_ID"],
            secret_key=DUMMY_AWS["AWS_SECRET_ACCESS_KEY"],
            certfile=cert,
            keyfile=key,
            port=self.port,
        )
        self.endpoint.start()
        return self.endpoint

    def stop(self) -> None:
        if self.endpoint is not None:
            self.endpoint.stop()


def service_env(env: Mapping[str, str], state: Mapping[str, Any]) -> dict[str, str]:
    """The service's environment in iam mode: ``env`` without any secret, with the token login."""
    dropped = ("DB_SECRET_ID", "DB_REPLICA_SECRET_ID", "DB_ROTATION_QUEUE_URL")
    return {
        **{k: v for k, v in env.items() if k not in dropped},
        "DB_AUTH": "iam",
        "POSTGRES_USER": APP_ROLE,
        "POSTGRES_HOST": HOSTNAME,
        "POSTGRES_PORT": str(state["iam_port"]),
        "POSTGRES_SSL": "verify-full",
        "POSTGRES_SSL_ROOT_CERT": str(TLS_DIR / "ca.pem"),
    }


def bootstrap_env(env: Mapping[str, str], master_arn: str) -> dict[str, str]:
    """``flask db bootstrap`` as the master, with a password: it creates the IAM app login."""
    iam_only = ("DB_AUTH", "POSTGRES_USER", "POSTGRES_SSL_ROOT_CERT", "DB_APP_SECRET_ID")
    return {
        **{k: v for k, v in env.items() if k not in iam_only},
        "DB_SECRET_ID": master_arn,
        "DB_APP_IAM_USER": APP_ROLE,
    }
