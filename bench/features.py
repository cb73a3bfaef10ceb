"""The per-request features ``bench/feature_wsgi.py`` can take out (``BENCH_WITHOUT``)."""

FEATURES = ("access_log", "metrics", "request_id", "preping", "xid", "retry", "pinned", "bounds")
