"""The admin blueprint under /admin: rotation status, history and "check now".

Closed by default (404 without ADMIN_TOKEN). See ``auth`` for who may enter and
``views`` for the routes; the history itself lives in ``commng_rotation.history``.
"""

from __future__ import annotations

from flask import Flask, Response, request

from commng.admin.views import CHECK_MIN_INTERVAL_S, LIMITER, PAGE_TEMPLATE, CheckLimiter, bp

__all__ = ["HSTS", "init_app"]

# No script, no external resource: the page is HTML and inline CSS only.
PAGE_CSP = "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
# Browsers that once reached /admin over HTTPS never fall back to plain HTTP for the
# host (where a token or a Basic password would travel in clear) for a year.
HSTS = "max-age=31536000; includeSubDomains"


def _is_admin_path(path: str) -> bool:
    return path == "/admin" or path.startswith("/admin/")


def _protect(response: Response) -> Response:
    """Nothing under /admin is cached, framed, sniffed or sent over plain HTTP (a 401 or 404 included)."""
    if _is_admin_path(request.path):
        response.headers["Strict-Transport-Security"] = HSTS
        response.headers["Cache-Control"] = "no-store"
        response.headers["Pragma"] = "no-cache"
        response.headers["X-Content-Type-Options"] = "nosniff"
        response.headers["X-Frame-Options"] = "DENY"
        response.headers["Referrer-Policy"] = "no-referrer"
        if response.mimetype == "text/html":
            response.headers["Content-Security-Policy"] = PAGE_CSP
    return response


def init_app(app: Flask) -> None:
    """Register the blueprint, this worker's check rate limiter and the response headers."""
    if LIMITER in app.extensions:
        raise RuntimeError("commng.admin.init_app was already called for this app")
    app.extensions[LIMITER] = CheckLimiter(CHECK_MIN_INTERVAL_S)
    app.register_blueprint(bp)
    app.after_request(_protect)
    # Compiled now, while the worker starts, not by the first request that renders it:
    # compiling the page's template is CPU work of tens of milliseconds that holds the
    # worker's loop (gevent's monitor reported it past 100 ms on a loaded machine).
    app.jinja_env.get_template(PAGE_TEMPLATE)
