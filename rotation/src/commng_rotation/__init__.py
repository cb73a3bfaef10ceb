"""Database credentials that rotate without a failed request, for any Flask-SQLAlchemy app.

Each worker watches a Secrets Manager secret, builds and tests an engine with the new
login, swaps it in under a lock, drains the old pool for a grace period and closes it.
A login refused mid-rotation triggers an immediate refresh (AWSCURRENT, then AWSPENDING).
A view wrapped in ``retry_on_disconnect`` runs again when its connection died before
anything was committed, and a COMMIT cut by a disconnect is judged by PostgreSQL.

The host application wires it in a few lines and two gunicorn hooks::

    db = SQLAlchemy(session_options={"class_": PinnedSession})
    db.init_app(app)
    rotation.init_app(app, db, RotationSettings(secret_id=..., service="orders", ...))

    @app.post("/orders")
    @rotation.retry_on_disconnect
    def create_order(): ...

    # gunicorn.conf.py: post_worker_init -> start_background(worker.wsgi)
    #                   worker_exit      -> stop_background(worker.wsgi)

Nothing here imports the host application: it is handed the app, the extension and
the settings, and keeps its state in ``app.extensions["commng_rotation"]``. The names in
``__all__`` are the public API (SemVer applies to them); submodules are not.
"""

__version__ = "2.1.0"

from commng_rotation import bounds
from commng_rotation.credentials import (
    Credentials,
    InvalidSecret,
    SecretsManagerSource,
    SecretsUnavailable,
    make_secrets_client,
)
from commng_rotation.engines import (
    ManagedEngine,
    NoCredentials,
    caller_retries,
    describe_error,
    error_code,
    is_auth_failure,
    probe,
    refusal_cause,
)
from commng_rotation.events import Outcome, RotationEvent, Trigger, worker_name
from commng_rotation.extension import ConnectionCheckFailed, init_app
from commng_rotation.fanout import FanOut
from commng_rotation.fleet import (
    STALE_INTERVALS,
    FleetReporter,
    WorkerState,
    list_workers,
    recent_rotations,
    rotation_workers,
)
from commng_rotation.history import (
    InvalidCursor,
    RotationRecord,
    count_by_trigger,
    list_events,
    metadata,
    rotation_events,
)
from commng_rotation.iam import IamTokenSource, IssuedToken
from commng_rotation.push import PushConsumer
from commng_rotation.reads import reading
from commng_rotation.retry import MAX_ATTEMPTS, CommitOutcomeUnknown, retry_on_disconnect
from commng_rotation.runtime import REPLICA_BIND, Runtime, get_runtime, start_background, stop_background
from commng_rotation.session import PinnedSession
from commng_rotation.settings import InvalidSettings, RotationSettings
from commng_rotation.status import (
    BindStatus,
    EngineStatus,
    FanOutStatus,
    PoolFigures,
    PushStatus,
    RuntimeStatus,
    WatcherStatus,
)
from commng_rotation.watcher import CheckResult
from commng_rotation.xid import WriteInReadBlock, XidConnection, witness

__all__ = [
    "MAX_ATTEMPTS",
    "REPLICA_BIND",
    "STALE_INTERVALS",
    "BindStatus",
    "CheckResult",
    "CommitOutcomeUnknown",
    "ConnectionCheckFailed",
    "Credentials",
    "EngineStatus",
    "FanOut",
    "FanOutStatus",
    "FleetReporter",
    "IamTokenSource",
    "InvalidCursor",
    "InvalidSecret",
    "InvalidSettings",
    "IssuedToken",
    "ManagedEngine",
    "NoCredentials",
    "Outcome",
    "PinnedSession",
    "PoolFigures",
    "PushConsumer",
    "PushStatus",
    "RotationEvent",
    "RotationRecord",
    "RotationSettings",
    "Runtime",
    "RuntimeStatus",
    "SecretsManagerSource",
    "SecretsUnavailable",
    "Trigger",
    "WatcherStatus",
    "WorkerState",
    "WriteInReadBlock",
    "XidConnection",
    "__version__",
    "bounds",
    "caller_retries",
    "count_by_trigger",
    "describe_error",
    "error_code",
    "get_runtime",
    "init_app",
    "is_auth_failure",
    "list_events",
    "list_workers",
    "make_secrets_client",
    "metadata",
    "probe",
    "reading",
    "recent_rotations",
    "refusal_cause",
    "retry_on_disconnect",
    "rotation_events",
    "rotation_workers",
    "start_background",
    "stop_background",
    "witness",
    "worker_name",
]
