"""gunicorn's entry point: gevent patches the standard library first, then the app is built.

The app's rotation layer installs psycopg2's wait callback (``commng_rotation.bounds``):
with ``select`` patched by gevent, every database wait yields to the other greenlets and
is bounded by a deadline.
"""

from gevent import monkey

monkey.patch_all()

from commng.app import create_app  # noqa: E402

app = create_app()
