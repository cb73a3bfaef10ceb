"""The per-request features ``bench/feature_wsgi.py`` can take out (``BENCH_WITHOUT``)."""

from typing import Any

FEATURES = ("access_log", "metrics", "request_id", "preping", "xid", "retry", "pinned", "bounds")


def no_access_log() -> None:
    """No access line in this worker: gunicorn's Logger and every subclass (the project's
    ``logger_class``, built by gunicorn.conf.py in the master) skip ``access()``."""
    from gunicorn.glogging import Logger

    def skip(*args: Any, **kwargs: Any) -> None:
        return None

    for cls in (Logger, *Logger.__subclasses__()):
        cls.access = skip  # type: ignore[method-assign]
