"""The two hooks the rotation layer needs, and a gevent worker."""

worker_class = "gevent"
preload_app = False  # each worker imports the app (and boto3) after gevent has patched it


def post_worker_init(worker):
    """Start this worker's secret watcher."""
    from commng_rotation import start_background

    start_background(worker.wsgi)


def worker_exit(server, worker):
    """Stop the watcher, write the queued history, close every pool."""
    from commng_rotation import stop_background

    stop_background(worker.wsgi)
