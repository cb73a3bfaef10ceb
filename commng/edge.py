"""The edge, checked where the routing happens: the raw path of /admin and /metrics, and who asks.

The load balancer's rules match the path as the client sent it, case-sensitively and not
percent-decoded; gunicorn decodes ``PATH_INFO`` and Werkzeug's router ignores repeated
leading slashes. So ``//admin/api/status`` or ``/%61dmin/api/status`` reach the admin
blueprint past a rule on ``/admin*``. Here, an admin or metrics request whose raw path
(gunicorn's and Werkzeug's server's ``RAW_URI``) does not literally start with its prefix
is a 404, before any authentication (so it writes no failed-login line either).

The client address is the ``X-Forwarded-For`` entry the trusted proxies appended
(TRUSTED_PROXIES from the right, through Werkzeug's ``ProxyFix``); /admin answers only
addresses in ADMIN_ALLOWED_CIDRS when that is set. The load balancer's rules stay, as
defence in depth.
"""

from __future__ import annotations

import ipaddress

from flask import Flask, abort, current_app, request
from werkzeug.middleware.proxy_fix import ProxyFix

from config import Network, Settings

__all__ = ["client_allowed", "init_app", "raw_path"]

EXTENSION = "commng.edge"

# Blueprint (or endpoint) -> the prefix its raw path must start with.
_ADMIN_BLUEPRINT = "admin"
_METRICS_ENDPOINT = "metrics.metrics"
_PREFIXES = {_ADMIN_BLUEPRINT: "/admin", _METRICS_ENDPOINT: "/metrics"}


def raw_path() -> str:
    """The path as the client sent it: RAW_URI (or REQUEST_URI) without its query.

    Servers that set neither (the Flask test client) give the decoded PATH_INFO.
    """
    raw = request.environ.get("RAW_URI") or request.environ.get("REQUEST_URI")
    if raw is None:
        return request.script_root + str(request.environ.get("PATH_INFO", ""))
    return str(raw).split("?", 1)[0]


def _starts_with(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


def client_allowed(address: str | None, networks: tuple[Network, ...]) -> bool:
    """True when ``address`` (an IPv4 or IPv6 address, IPv4-mapped too) is in one of ``networks``."""
    if not address:
        return False
    try:
        ip = ipaddress.ip_address(address)
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return any(ip in network for network in networks)


def _guard() -> None:
    """before_request: 404 for an admin or metrics request past the prefix, or from outside the CIDRs."""
    key = _ADMIN_BLUEPRINT if request.blueprint == _ADMIN_BLUEPRINT else request.endpoint
    prefix = _PREFIXES.get(key or "")
    if prefix is None:
        return
    if not _starts_with(raw_path(), prefix):
        abort(404)
    settings: Settings = current_app.config["COMMNG_SETTINGS"]
    allowed = settings.admin_allowed_cidrs
    if key == _ADMIN_BLUEPRINT and allowed is not None and not client_allowed(request.remote_addr, allowed):
        abort(404)


def init_app(app: Flask) -> None:
    """Trust TRUSTED_PROXIES proxies for the client address; guard /admin and /metrics."""
    if EXTENSION in app.extensions:
        raise RuntimeError("commng.edge.init_app was already called for this app")
    settings: Settings = app.config["COMMNG_SETTINGS"]
    if settings.trusted_proxies:
        # Only X-Forwarded-For: the scheme, host and prefix stay what the server saw.
        app.wsgi_app = ProxyFix(app.wsgi_app, x_for=settings.trusted_proxies)  # type: ignore[method-assign]
    app.before_request(_guard)
    app.extensions[EXTENSION] = True
