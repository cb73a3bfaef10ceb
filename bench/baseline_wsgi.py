"""gunicorn entry of the yardstick (``bench/baseline.py``): gevent first, no access log.

Run with the project's gunicorn.conf.py like the service; only the access log differs:
``access()`` of gunicorn's logger classes is replaced in this worker, so no access line is built.
"""

from gevent import monkey

monkey.patch_all()

from bench.baseline import create_app  # noqa: E402
from bench.features import no_access_log  # noqa: E402

no_access_log()

app = create_app()
