"""Database credentials that rotate without a failed request, for any Flask-SQLAlchemy app.

Each worker watches a Secrets Manager secret, builds and tests an engine with the new
login, swaps it in under a lock, drains the old pool for a grace period and closes it.
A login refused mid-rotation triggers an immediate refresh (AWSCURRENT, then AWSPENDING).

The host application wires it in three lines and two gunicorn hooks::

    db = SQLAlchemy(session_options={"class_": PinnedSession})
    db.init_app(app)
    rotation.init_app(app, db, RotationSettings(secret_id=..., ...))
    # gunicorn.conf.py: post_worker_init -> start_background(worker.wsgi)
    #                   worker_exit      -> stop_background(worker.wsgi)

Nothing here imports the host application: it is handed the app, the extension and
the settings, and keeps its state in ``app.extensions["commng_rotation"]``.
"""

__version__ = "1.0.0"

from commng_rotation import bounds
from commng_rotation.credentials import Credentials, InvalidSecret, SecretsUnavailable
from commng_rotation.engines import NoCredentials, describe_error, error_code, is_auth_failure, probe
from commng_rotation.events import Outcome, RotationEvent, Trigger
from commng_rotation.fanout import FanOut
from commng_rotation.fleet import FleetReporter, WorkerState, list_workers, recent_rotations
from commng_rotation.history import InvalidCursor, RotationRecord, count_by_trigger, list_events
from commng_rotation.push import PushConsumer
from commng_rotation.runtime import Runtime, get_runtime, init_app, start_background, stop_background
from commng_rotation.session import PinnedSession
from commng_rotation.settings import RotationSettings

__all__ = [
    "Credentials",
    "FanOut",
    "FleetReporter",
    "InvalidCursor",
    "InvalidSecret",
    "NoCredentials",
    "Outcome",
    "PinnedSession",
    "PushConsumer",
    "RotationEvent",
    "RotationRecord",
    "RotationSettings",
    "Runtime",
    "SecretsUnavailable",
    "Trigger",
    "WorkerState",
    "__version__",
    "bounds",
    "count_by_trigger",
    "describe_error",
    "error_code",
    "get_runtime",
    "init_app",
    "is_auth_failure",
    "list_events",
    "list_workers",
    "probe",
    "recent_rotations",
    "start_background",
    "stop_background",
]
