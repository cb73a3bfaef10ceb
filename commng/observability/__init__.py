"""Observability wiring: request ids in every log line, and Prometheus metrics."""

from __future__ import annotations

from flask import Flask

from commng.observability import metrics, request_context

__all__ = ["init_app"]


def init_app(app: Flask) -> None:
    """Request ids first (so metrics and errors log with them), then metrics and /metrics."""
    request_context.init_app(app)
    metrics.init_app(app)
