#!/bin/sh
# Container entrypoint: prepare the Prometheus multiprocess directory, then become the CMD.
#
# prometheus_client's multiprocess mode keeps one file per worker process in
# $PROMETHEUS_MULTIPROC_DIR. Files left by a previous run of the container would be summed
# into the new run's metrics, so the directory is emptied at every start (before gunicorn
# forks any worker). `exec` makes the CMD PID 1, so it receives ECS's SIGTERM directly.
set -eu

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
