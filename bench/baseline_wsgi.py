"""gunicorn entry of the yardstick (``bench/baseline.py``): gevent first, no access log.

Run with the project's gunicorn.conf.py like the service; only the access log differs:
gunicorn's ``Logger.access`` is replaced in this worker, so no access line is built.
"""

from gevent import monkey

monkey.patch_all()

from gunicorn.glogging import Logger  # noqa: E402

from bench.baseline import create_app  # noqa: E402

Logger.access = lambda *args, **kwargs: None  # type: ignore[method-assign]

app = create_app()
