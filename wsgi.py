"""gunicorn's entry point. gevent and psycogreen patch first, then the app is built."""

from gevent import monkey

monkey.patch_all()

from psycogreen.gevent import patch_psycopg  # noqa: E402

patch_psycopg()

from commng.app import create_app  # noqa: E402

app = create_app()
