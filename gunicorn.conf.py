"""gunicorn settings for CommNG. Every non-default has a comment saying why.

Command-line flags and GUNICORN_CMD_ARGS (e.g. "--bind 127.0.0.1:9000 --workers 2")
override the names below, as gunicorn documents.
"""

import importlib.util
import os
import sys

# Nothing here imports boto3 or the app: gevent must patch ssl before botocore loads
# ("Monkey-patching ssl after ssl has already been imported" otherwise), and that happens
# in each worker, after fork.

_ROOT = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, _ROOT)

from config import check_or_exit  # noqa: E402 - the standard library and click only

# The variables read below go through the same coercers as the app's settings before
# anything uses them: junk stops start-up with one line and exit code 2, not a
# traceback. on_starting checks the rest. (gunicorn itself parses WEB_CONCURRENCY when
# it is imported, before this file runs: the image's entrypoint checks it first.)
check_or_exit(("PORT", "WEB_CONCURRENCY", "LOG_LEVEL", "LOG_FORMAT"))


def _load_logs():
    """commng/observability/logs.py on its own (stdlib + structlog only).

    ``import commng.observability.logs`` would run that package's __init__, loading
    Flask, SQLAlchemy and prometheus_client into the master before gevent patches the
    workers.
    """
    path = os.path.join(_ROOT, "commng", "observability", "logs.py")
    spec = importlib.util.spec_from_file_location("_commng_logs", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _env_choice(name, default, choices):
    # on_starting validates every variable and stops start-up on junk; until then, default.
    value = os.environ.get(name, default).strip()
    return value if value.lower() in choices else default


class _IdleWait:
    """A keep-alive connection's wait for its next request, ended early when the worker stops.

    gunicorn's own wait is ``gevent.Timeout(keepalive, False)``: when it fires, the
    connection's loop ends quietly and the connection is closed. Stopping fires it at once
    (``_GracefulGeventWorker.close_idle``). A wait that begins while the worker stops (a
    connection accepted in the last second before the listener closed) gets
    ``SHUTDOWN_IDLE_S`` for its request.
    """

    SHUTDOWN_IDLE_S = 1.0

    def __init__(self, worker, seconds):
        import gevent

        self.worker = worker
        self.greenlet = gevent.getcurrent()
        self.timeout = gevent.Timeout(seconds if worker.alive else self.SHUTDOWN_IDLE_S, False)

    def __enter__(self):
        self.timeout.start()
        self.worker.idle[self.greenlet] = self.timeout
        return self.timeout

    def __exit__(self, typ, value, tb):
        self.worker.idle.pop(self.greenlet, None)
        return self.timeout.__exit__(typ, value, tb)


def _graceful_gevent_worker():
    """gunicorn's gevent worker that closes idle keep-alive connections when it stops.

    gunicorn's own waits for every connection to go (graceful_timeout) and an idle
    keep-alive connection only goes after keepalive (75 s): the master kills the worker at
    graceful_timeout (25 s), and worker_exit (rotation history flush, fleet row, pools)
    never runs. Requests in progress finish as before, answered with Connection: close.
    Imported here, in the master, as gunicorn itself does to load its worker class; gevent
    patches each worker after the fork all the same.
    """
    import gevent
    from gunicorn.workers.ggevent import GeventWorker

    class GracefulGeventWorker(GeventWorker):
        def __init__(self, *args, **kwargs):
            super().__init__(*args, **kwargs)
            # Greenlet -> the timeout of the keep-alive wait it is in (none: in a request).
            self.idle = {}
            self.quitting = False

        def timeout_ctx(self):
            return _IdleWait(self, self.cfg.keepalive)

        def handle_exit(self, sig, frame):
            super().handle_exit(sig, frame)  # SIGTERM: stop accepting, finish requests
            gevent.spawn(self.close_idle)  # out of the signal handler, as gunicorn's handle_quit

        def handle_quit(self, sig, frame):
            """SIGINT or SIGQUIT: a quick stop, once.

            A terminal's Ctrl-C reaches the master and the workers alike, and the master
            then sends each worker SIGQUIT: two quits. gunicorn's ends in ``sys.exit(0)``
            in a greenlet, which gevent throws into the main greenlet; the second one
            landed while the first was unwinding through ``worker_exit`` and cut it short
            (no history flush, fleet row left behind, pools not disposed), or during
            interpreter shutdown, where gevent prints "<greenlet ... main> failed with
            SystemExit". The first quit is the one acted on.
            """
            if not self.quitting:
                self.quitting = True
                super().handle_quit(sig, frame)

        def close_idle(self):
            """Fire the timeout of every keep-alive wait now: those connections close quietly."""
            idle = list(self.idle.items())
            self.log.info("Closing %d idle keep-alive connection(s) (pid:%s)", len(idle), self.pid)
            loop = gevent.get_hub().loop
            for greenlet, timeout in idle:
                loop.run_callback(self._expire, greenlet, timeout)

        def _expire(self, greenlet, timeout):
            # Run by the hub, as gevent runs a timeout: the greenlet is suspended in its wait
            # unless it has left that wait meanwhile (a request came): then it is left alone.
            if self.idle.get(greenlet) is timeout:
                greenlet.throw(timeout)

    return GracefulGeventWorker


# gevent workers: a request waiting on PostgreSQL or Secrets Manager yields to others;
# idle keep-alive connections are closed at shutdown, so that worker_exit runs.
worker_class = _graceful_gevent_worker
# Listen on all interfaces inside the container; the port comes from $PORT.
bind = f"0.0.0.0:{int(os.environ.get('PORT') or 8000)}"
# Two workers per core is plenty for an I/O-bound gevent app; ECS sets WEB_CONCURRENCY.
workers = int(os.environ.get("WEB_CONCURRENCY") or 2)
# Each gevent worker multiplexes this many connections (gunicorn's default, explicit).
worker_connections = 1000
# Never preload: each worker must import the app (and boto3) after gevent patched it.
preload_app = False
# ECS sends SIGTERM and waits stopTimeout (30 s) before SIGKILL: finish requests in 25 s.
graceful_timeout = 25
# A gevent worker that blocks the loop this long is stuck; restart it.
timeout = 30
# Behind the ALB, keep-alive must outlast the ALB's 60 s idle timeout.
keepalive = 75
# Logs go to stdout/stderr, collected by awslogs.
accesslog = "-"
errorlog = "-"
# gunicorn's own error and access logs through the app's structlog formatter: one JSON
# object per line (LOG_FORMAT=json) from the master's first line on, or console text.
# The loggers have no handlers of their own and propagate to the root handler, which
# each worker's app replaces with an identical one (no line is written twice).
_log_format = _env_choice("LOG_FORMAT", "json", {"json", "console"}).lower()
_log_level = _env_choice("LOG_LEVEL", "INFO", {"debug", "info", "warning", "error"}).upper()
_logs = _load_logs()
logconfig_dict = {
    "version": 1,
    "disable_existing_loggers": False,
    "formatters": {"structlog": {"()": _logs.formatter, "log_format": _log_format}},
    "handlers": {
        "stdout": {"class": "logging.StreamHandler", "formatter": "structlog", "stream": "ext://sys.stdout"}
    },
    "root": {"level": _log_level, "handlers": ["stdout"]},
    "loggers": {
        "gunicorn.error": {"level": _log_level, "handlers": [], "propagate": True},
        # The access log is kept at INFO whatever LOG_LEVEL says: it is the request record.
        "gunicorn.access": {"level": "INFO", "handlers": [], "propagate": True},
        # botocore, boto3, urllib3, SQLAlchemy's engine and pool (and alembic's chatter)
        # stay at WARNING even under LOG_LEVEL=DEBUG: at DEBUG botocore would log the
        # secret's value and the AWS session token (logs.QUIET_LOGGERS says why each).
        **{name: {"level": level} for name, level in _logs.QUIET_LOGGERS.items()},
    },
}
# The access record gets only the atoms the JSON line keeps (logs.access_logger_class
# says why): gunicorn's stock access() builds every header and environ atom per request.
logger_class = _logs.access_logger_class()
# The control socket (gunicorn 27) is not used; several gunicorns on one host would share it.
control_socket_disable = True


def on_starting(server):
    """Validate the whole configuration once, in the master, before any worker starts."""
    check_or_exit()


def post_worker_init(worker):
    """Start this worker's secret watcher.

    Not post_fork: there the sockets are not patched yet and the app is not loaded; a
    greenlet spawned in post_fork only runs after this hook anyway.
    """
    from commng_rotation import start_background

    start_background(worker.wsgi)


def worker_exit(server, worker):
    """Stop the watcher, cancel drain timers and dispose every engine of this worker."""
    app = getattr(worker, "wsgi", None)
    if app is not None and hasattr(app, "extensions"):
        from commng_rotation import stop_background

        stop_background(app)


def child_exit(server, worker):
    """Drop the dead worker's live gauges; its counters and histograms stay in the sums.

    prometheus_client's multiprocess mode keeps a dead process's counter files, so totals
    survive worker restarts; PROMETHEUS_MULTIPROC_DIR is wiped before gunicorn starts.
    """
    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        from prometheus_client import multiprocess

        multiprocess.mark_process_dead(worker.pid)
