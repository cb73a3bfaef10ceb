# syntax=docker/dockerfile:1
# CommNG production image: gunicorn (gevent workers) serving wsgi:app on port 8000.
# Build: docker build -t commng .   (no compiler needed: every requirement ships a wheel or is
# pure Python)

# Both stages use the same pinned patch release (written out, not via ARG, so linters see the
# tag). Pin the digest too (python:3.11.15-slim-bookworm@sha256:...) once it is resolved from the
# registry you build from, and let Dependabot/Renovate bump both lines together.

# --- builder: a virtualenv with exactly requirements.txt ---------------------------------------
FROM python:3.11.15-slim-bookworm AS builder

ENV PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PIP_NO_CACHE_DIR=1 \
    PYTHONDONTWRITEBYTECODE=1

RUN python -m venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH

COPY requirements.txt /tmp/requirements.txt
RUN pip install --no-cache-dir --require-hashes -r /tmp/requirements.txt
# The rotation layer, its own distribution, installed as any adopter would (its
# dependencies are already in the hash-checked lock above). Built into a wheel by the
# hash-checked build backend in a venv of its own, without build isolation: an isolated
# build would download whatever setuptools is newest. The wheel needs no backend to install,
# so setuptools stays out of the image's venv.
COPY requirements-build.txt /tmp/requirements-build.txt
RUN python -m venv /opt/build \
    && /opt/build/bin/pip install --no-cache-dir --require-hashes -r /tmp/requirements-build.txt
COPY rotation/ /tmp/rotation/
RUN /opt/build/bin/pip wheel --no-cache-dir --no-deps --no-build-isolation --wheel-dir /tmp/wheels /tmp/rotation \
    && pip install --no-cache-dir --no-deps /tmp/wheels/commng_rotation-*.whl

# The RDS CA bundle (every region's roots), so that POSTGRES_SSL=verify-full authenticates the
# database. Fetched over HTTPS and checked against a SHA-256 the builder must supply: obtain it
# from a copy you trust (e.g. `curl -fsS https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem
# | sha256sum` from a workstation, compared with your organisation's pinned copy) and pass
# --build-arg RDS_CA_BUNDLE_SHA256=<hex>. The build fails without it, or on any mismatch.
ARG RDS_CA_BUNDLE_URL=https://truststore.pki.rds.amazonaws.com/global/global-bundle.pem
ARG RDS_CA_BUNDLE_SHA256
RUN python - <<'PY'
import hashlib, os, sys, urllib.request
expected = os.environ.get("RDS_CA_BUNDLE_SHA256", "").strip().lower()
if len(expected) != 64:
    sys.exit("RDS_CA_BUNDLE_SHA256 build argument is required (64 hex digits)")
url = os.environ["RDS_CA_BUNDLE_URL"]
if not url.startswith("https://"):
    sys.exit("RDS_CA_BUNDLE_URL must be https")
data = urllib.request.urlopen(url, timeout=30).read()
if hashlib.sha256(data).hexdigest() != expected:
    sys.exit("RDS CA bundle checksum mismatch: refusing to trust it")
os.makedirs("/opt/commng/certs", exist_ok=True)
with open("/opt/commng/certs/rds-global-bundle.pem", "wb") as out:
    out.write(data)
PY

# --- release: the venv and the application, run as an unprivileged numeric user -----------------
FROM python:3.11.15-slim-bookworm AS release

ENV PATH=/opt/venv/bin:$PATH \
    PYTHONUNBUFFERED=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/prometheus-multiproc \
    PORT=8000

# A passwd entry for the runtime UID (no home, no login shell), so tools that look the user up
# behave; the process itself only ever runs as the numeric 10001.
RUN groupadd --system --gid 10001 commng \
 && useradd --system --uid 10001 --gid 10001 --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin commng

WORKDIR /app

COPY --from=builder /opt/venv /opt/venv
COPY --from=builder /opt/commng/certs /opt/commng/certs
# Application files stay owned by root: the runtime user can read them, not change them.
COPY wsgi.py gunicorn.conf.py ./
COPY commng/ ./commng/
COPY config/ ./config/
COPY migrations/ ./migrations/
COPY --chmod=0755 docker-entrypoint.sh /usr/local/bin/docker-entrypoint.sh

# Bytecode compiled at build time; at run time nothing is written next to the code
# (PYTHONDONTWRITEBYTECODE), so the root filesystem can be read-only.
RUN python -m compileall -q /app

# The only writable path (Prometheus multiprocess files, gunicorn worker heartbeats). On ECS
# the task mounts a volume here over a read-only root filesystem; declaring it makes Fargate
# give that volume /tmp's permissions (1777) instead of root-only 0755.
VOLUME ["/tmp"]

USER 10001:10001

EXPOSE 8000

# ECS uses the task definition's own health check (same request); this one serves
# `docker run` and compose. No curl in a slim image: Python's urllib fails on non-2xx.
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/healthz' % os.environ.get('PORT', '8000'), timeout=3)"]

ENTRYPOINT ["/usr/local/bin/docker-entrypoint.sh"]
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
