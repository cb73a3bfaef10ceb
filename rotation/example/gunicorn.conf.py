"""gunicorn for the notes example: an explicit bind, gevent workers, the layer's two hooks."""

import os

# Loopback and a port of its own: CommNG's `make run` serves on 8000. `--bind` overrides it.
bind = "127.0.0.1:8100"
workers = int(os.environ.get("WEB_CONCURRENCY", "2"))
worker_class = "gevent"  # needs gunicorn[gevent] (requirements.txt)
preload_app = False  # each worker imports the app (and boto3) after gevent has patched it
# gunicorn 27's control socket is not used; several gunicorns on one host would share it.
control_socket_disable = True
# keepalive stays at gunicorn's 2 s: a stopping gevent worker waits for its idle keep-alive
# connections, and worker_exit (the history flush) must run before graceful_timeout (30 s)
# ends it. Behind a load balancer that wants longer keep-alive, close idle connections at
# shutdown as CommNG's gunicorn.conf.py does.


def post_worker_init(worker):
    """Start this worker's secret watcher (and push, fan-out, fleet row)."""
    from commng_rotation import start_background

    start_background(worker.wsgi)


def worker_exit(server, worker):
    """Stop the watcher, write the queued history, close every pool."""
    from commng_rotation import stop_background

    stop_background(worker.wsgi)
