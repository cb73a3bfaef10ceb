#!/bin/sh
# Container entrypoint: prepare the Prometheus multiprocess directory, then become the CMD.
#
# prometheus_client's multiprocess mode keeps one file per worker process in
# $PROMETHEUS_MULTIPROC_DIR. Files left by a previous run of the container would be summed
# into the new run's metrics, so the directory is emptied at every start (before gunicorn
# forks any worker). `exec` makes the CMD PID 1, so it receives ECS's SIGTERM directly.
set -eu

# gunicorn parses WEB_CONCURRENCY itself as it is imported, before gunicorn.conf.py runs
# (which checks everything else): junk there would end in gunicorn's traceback. The
# app's own coercer checks it first: one line `configuration error: ...`, exit code 2.
# Empty means unset, as for every variable (gunicorn itself would choke on it).
case "${1:-}" in
    gunicorn | */gunicorn)
        if [ -z "${WEB_CONCURRENCY:-}" ]; then
            unset WEB_CONCURRENCY
        fi
        python -c 'import config; config.check_or_exit(["WEB_CONCURRENCY"])'
        ;;
esac

if [ -n "${PROMETHEUS_MULTIPROC_DIR:-}" ]; then
    case "$PROMETHEUS_MULTIPROC_DIR" in
        /?*/?*) ;;
        *)
            echo "docker-entrypoint: refusing to wipe PROMETHEUS_MULTIPROC_DIR=$PROMETHEUS_MULTIPROC_DIR (need an absolute path at least two levels deep)" >&2
            exit 64
            ;;
    esac
    rm -rf "$PROMETHEUS_MULTIPROC_DIR"
    mkdir -p "$PROMETHEUS_MULTIPROC_DIR"
fi

exec "$@"
