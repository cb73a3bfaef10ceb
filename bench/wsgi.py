"""gunicorn entry for the benchmark: the product's ``wsgi:app`` plus the /bench routes."""

from bench import routes
from wsgi import app  # patches gevent and psycopg2 first, then builds the product's app

routes.init_app(app)
