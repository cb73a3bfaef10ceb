"""Prometheus metrics: rotation, secret checks, pools, requests; and ``GET /metrics``.

Under gunicorn every worker writes its samples to ``PROMETHEUS_MULTIPROC_DIR`` and
``/metrics`` (answered by whichever worker gets the scrape) aggregates all of them with
prometheus_client's multiprocess collector; without that variable (the Flask test
client, a shell) the process-local default registry is served.

Metrics are fed through the rotation layer's public extension points, never by polling
it: ``Runtime.on_event`` / ``on_event_updated`` (refreshes and drains), ``on_check`` (the
watcher's results), ``on_engine``, ``on_auth_failure`` and ``on_login_refused`` (by cause),
``on_token`` (IAM tokens signed), ``on_upstream_failure``, and SQLAlchemy pool events on
each engine. Gauges are set from events with ``.set()`` (the pool gauge within a second of
its events, see ``pools``): ``Gauge.set_function`` exports 0 in prometheus_client's
multiprocess mode. No label ever holds a value read from a secret.
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Callable
from typing import Any

from flask import Blueprint, Flask, Response, current_app, g, request
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as prom_multiprocess

from commng import db as database
from commng.admin.auth import metrics_auth
from commng.errors import error_response
from commng.observability.pools import POOLS, pool_figures, track_engine
from commng_rotation import CheckResult, IssuedToken, Outcome, RotationEvent, Runtime, get_runtime
from config import Settings

__all__ = ["bp", "init_app", "pool_figures", "render", "track_engine"]

EXTENSION = "commng.metrics"

REFRESHES = Counter(
    "commng_db_credential_refreshes",
    "Credential refresh attempts, by what triggered them and how they ended.",
    ["trigger", "outcome"],
)
SECRET_CHECKS = Counter(
    "commng_secret_checks",
    "Watcher checks of the secret: unchanged, changed (a refresh ran) or error.",
    ["result"],
)
SECRET_FETCH_ERRORS = Counter(
    "commng_secret_fetch_errors",
    "Secrets Manager calls that failed, by AWS error code (or client error class).",
    ["code"],
)
DETECTION = Histogram(
    "commng_rotation_detection_seconds",
    "From the creation of the adopted secret version to its detection by this worker.",
    buckets=(1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600),
)
SWAP = Histogram(
    "commng_db_engine_swap_seconds",
    "Building, testing (SELECT 1) and swapping in a new engine.",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
)
DRAIN = Histogram(
    "commng_db_old_pool_drain_seconds",
    "From a swap until the old pool had nothing checked out (or the grace period ended).",
    buckets=(0.01, 0.1, 0.5, 1, 2.5, 5, 10, 20, 30, 60, 120),
)
AUTH_FAILURES = Counter(
    "commng_db_auth_failures",
    "New database connections refused with 'password authentication failed' (28P01).",
)
LOGINS_REFUSED = Counter(
    "commng_db_logins_refused",
    "New database connections whose login was refused, by credential source "
    "(secretsmanager, static, iam) and cause (the SQLSTATE's condition name).",
    ["source", "cause"],
)
# Issue 25: DB_AUTH=iam signs a token at most once per DB_IAM_TOKEN_REUSE_S per worker.
IAM_TOKENS = Counter(
    "commng_db_iam_tokens_signed",
    "IAM database authentication tokens signed (each logs in new connections for a while).",
)
IAM_SIGNING = Histogram(
    "commng_db_iam_token_signing_seconds",
    "Time to sign one IAM token (local SigV4; no network call once AWS credentials are loaded).",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.05, 0.25, 1),
)
ENGINES = Gauge(
    "commng_db_engines",
    "Engines held: the active one and the old ones still draining.",
    ["state"],
    multiprocess_mode="livesum",
)
# livemax: the worst watcher among the live workers is what an alert wants.
WATCHER_FAILURES = Gauge(
    "commng_secret_watcher_consecutive_failures",
    "Consecutive failed secret checks of the worst watcher (0 when the last check succeeded).",
    multiprocess_mode="livemax",
)
# Issue 13: RotationFailed/RotationAbandoned for the watched secret, as the push consumer saw them.
UPSTREAM_FAILURES = Counter(
    "commng_rotation_upstream_failures",
    "Rotations Secrets Manager reported as failed or abandoned (CloudTrail events via SQS).",
    ["event"],
)
DB_READS = Counter(
    "commng_db_reads",
    "Reads of the read-only routes, by the bind that served them (replica or primary).",
    ["bind"],
)
HTTP_REQUESTS = Counter(
    "commng_http_requests",
    "HTTP requests, by method, route (the URL rule, not the path) and status.",
    ["method", "route", "status"],
)
HTTP_DURATION = Histogram(
    "commng_http_request_duration_seconds",
    "Time to produce the response, by method and route.",
    ["method", "route"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)

_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})
_CODE_RE = re.compile(r"[^A-Za-z0-9_.:-]")
UNMATCHED_ROUTE = "<unmatched>"

bp = Blueprint("metrics", __name__)


# -- /metrics ---------------------------------------------------------------------------


def render() -> bytes:
    """The exposition text: every worker's samples in multiprocess mode, else this process's."""
    POOLS.publish()  # this worker's pools as they are now; the others' within pools.PUBLISH_DELAY_S
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        prom_multiprocess.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry)
    return generate_latest(REGISTRY)


@bp.get("/metrics")
def metrics() -> Any:
    """Prometheus text format; behind METRICS_TOKEN (not the admin token) unless METRICS_PUBLIC."""
    settings: Settings = current_app.config["COMMNG_SETTINGS"]
    if settings.metrics_public:
        return _exposition()
    if settings.metrics_token is None:  # no token configured: nobody may read private metrics
        return error_response(404, "not_found", "metrics are not public and METRICS_TOKEN is not set")
    return _private_exposition()


def _exposition() -> Response:
    return Response(render(), mimetype=CONTENT_TYPE_LATEST)


@metrics_auth
def _private_exposition() -> Response:
    return _exposition()


# -- requests ---------------------------------------------------------------------------


def _start_timer() -> None:
    g.commng_started = time.perf_counter()


# (method, route, status) -> the counter's and the histogram's labelled children: a
# request then costs a dict lookup instead of two ``labels()`` calls (each takes a lock
# and validates its values). Bounded: the methods are _METHODS plus OTHER, the routes
# the app's URL rules, the statuses the app's own.
_REQUEST_CHILDREN: dict[tuple[str, str, int], tuple[Any, Any]] = {}


def _observe_request(response: Response) -> Response:
    rule = request.url_rule  # request.endpoint is the rule's endpoint: one lookup for both
    if rule is not None and rule.endpoint == "metrics.metrics":
        return response  # a scrape is not traffic
    started: float | None = g.get("commng_started")
    route = rule.rule if rule is not None else UNMATCHED_ROUTE
    method = request.method
    if method not in _METHODS:
        method = "OTHER"
    key = (method, route, response.status_code)
    children = _REQUEST_CHILDREN.get(key)
    if children is None:
        children = _REQUEST_CHILDREN[key] = (
            HTTP_REQUESTS.labels(method, route, str(response.status_code)),
            HTTP_DURATION.labels(method, route),
        )
    children[0].inc()
    if started is not None:
        children[1].observe(time.perf_counter() - started)
    return response


# -- rotation, checks, engines ------------------------------------------------------------


def _label_code(raw: str) -> str:
    """An error code fit for a label: bounded length and alphabet (codes are class names)."""
    return _CODE_RE.sub("_", raw)[:64] or "unknown"


def _on_refresh(event: RotationEvent) -> None:
    REFRESHES.labels(event.trigger, event.outcome).inc()
    if event.error and event.error.startswith("SecretsUnavailable:"):
        SECRET_FETCH_ERRORS.labels(_label_code(event.error.partition(":")[2])).inc()
    if event.outcome != Outcome.ROTATED:
        return
    if event.swap_ms is not None:
        SWAP.observe(event.swap_ms / 1000)
    if event.detection_latency_ms is not None:
        DETECTION.observe(event.detection_latency_ms / 1000)


def _on_drained(event: RotationEvent) -> None:
    if event.drained_ms is not None:
        DRAIN.observe(event.drained_ms / 1000)


def _on_checks(results: list[CheckResult]) -> None:
    for result in results:
        SECRET_CHECKS.labels(result.change).inc()
        if result.unavailable and result.error:
            SECRET_FETCH_ERRORS.labels(_label_code(result.error)).inc()


def _on_auth_failure() -> None:
    AUTH_FAILURES.inc()


def _on_login_refused(source: str, cause: str) -> None:
    LOGINS_REFUSED.labels(_label_code(source), _label_code(cause)).inc()


def _on_token(issued: IssuedToken) -> None:
    IAM_TOKENS.inc()
    IAM_SIGNING.observe(issued.sign_us / 1_000_000)


def _on_upstream_failure(event_name: str) -> None:
    # The push consumer passes only RotationFailed or RotationAbandoned; bounded anyway.
    UPSTREAM_FAILURES.labels(_label_code(event_name)).inc()


def _engines_counter(runtime: Runtime) -> Callable[..., None]:
    def count(_: object = None) -> None:
        rotators = list(runtime.rotators.values())
        ENGINES.labels("active").set(sum(1 for r in rotators if r.active is not None))
        ENGINES.labels("draining").set(sum(len(r.draining) for r in rotators))

    return count


def _watcher_gauge(runtime: Runtime) -> Callable[..., None]:
    def update(_: object = None) -> None:
        watcher = runtime.watcher
        WATCHER_FAILURES.set(watcher.consecutive_failures if watcher is not None else 0)

    return update


# -- wiring -----------------------------------------------------------------------------


def init_app(app: Flask) -> None:
    """Register /metrics and the request hooks; hook into this app's rotation runtime."""
    if EXTENSION in app.extensions:
        raise RuntimeError("commng.metrics.init_app was already called for this app")
    runtime = get_runtime(app)
    count_engines = _engines_counter(runtime)
    watcher_gauge = _watcher_gauge(runtime)
    # Events recorded before we listened (the start-up refresh) count too.
    runtime.on_event(_on_refresh, replay=True)
    runtime.on_event(count_engines)
    runtime.on_event_updated(_on_drained)
    runtime.on_event_updated(count_engines)
    runtime.on_engine(track_engine)
    runtime.on_auth_failure(_on_auth_failure)
    runtime.on_login_refused(_on_login_refused)
    runtime.on_token(_on_token)
    runtime.on_check(_on_checks)
    runtime.on_check(watcher_gauge)
    runtime.on_upstream_failure(_on_upstream_failure)
    count_engines()
    watcher_gauge()
    if _on_read not in database.read_listeners:
        database.read_listeners.append(_on_read)
    app.before_request(_start_timer)
    app.after_request(_observe_request)
    app.register_blueprint(bp)
    app.extensions[EXTENSION] = True


_READ_CHILDREN: dict[str, Any] = {}  # bind -> its labelled child (two binds at most)


def _on_read(bind: str) -> None:
    child = _READ_CHILDREN.get(bind)
    if child is None:
        child = _READ_CHILDREN[bind] = DB_READS.labels(bind=bind)
    child.inc()
