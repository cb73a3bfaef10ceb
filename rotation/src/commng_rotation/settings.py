"""What the rotation layer needs to know, as one frozen object the host application builds.

The layer reads no environment variable itself: the host maps its own configuration onto
``RotationSettings`` (CommNG does it in ``commng.app``), so an adopter keeps its own names.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["RotationSettings"]


@dataclass(frozen=True)
class RotationSettings:
    """Where credentials come from, how often to look, and how engines are built."""

    # The Secrets Manager secret (name or ARN) holding {"username", "password", ...}.
    # None: use ``username``/``password`` below and never watch anything.
    secret_id: str | None = None
    aws_region: str | None = None
    refresh_interval_s: float = 300.0
    # How long an old pool may keep its checked-out connections after a swap.
    grace_period_s: float = 30.0
    # Defaults for the secret's optional keys, and the static login without a secret.
    host: str = "localhost"
    port: int = 5432
    dbname: str = "postgres"
    # True: ``host`` and ``port`` above win over the secret's keys (a read replica that
    # logs in with the primary's secret, whose ``host`` names the primary).
    pin_host: bool = False
    # True: the secret must name its host (a replica's own secret: without ``host``, the
    # default would be the primary's, and "replica" reads would quietly hit the primary).
    require_host: bool = False
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    # libpq's sslmode for every connection, and the CA file verify-ca/verify-full trust.
    sslmode: str = "require"
    ssl_root_cert: str | None = None
    pool_size: int = 5
    max_overflow: int = 5
    pool_timeout_s: int = 10
    # Bounds: a connection attempt, a statement (server-side statement_timeout, and the
    # longest a client waits on a silent server), and how long a request waits out an
    # outage (refused connections, a restart) before it fails.
    connect_timeout_s: int = 5
    statement_timeout_ms: int = 5000
    outage_wait_s: float = 10.0
    # The rotation schedule. Engines recycle pooled connections after this long
    # (``pool_recycle``): with a secret that alternates between two users, a connection
    # opened as one user never outlives the next rotation, so none is still open when that
    # user's password changes at the rotation after next.
    rotation_period_s: float = 7 * 24 * 3600.0
    application_name: str = "flask-app"
    history_retention_days: int = 90
    # Push and fan-out (commng_rotation.push, commng_rotation.fanout): the SQS queue that
    # receives the secret's EventBridge events (None: no push), the LISTEN/NOTIFY channel
    # workers announce adopted versions on, and whether they do.
    queue_url: str | None = None
    notify_channel: str = "commng_rotation"
    fanout: bool = True
