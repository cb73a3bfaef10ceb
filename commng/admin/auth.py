"""Who may open /admin: nobody unless ADMIN_TOKEN is set; Bearer for the APIs, Basic for the page.

Both schemes go through Flask-HTTPAuth and compare with ``hmac.compare_digest``. The
JSON APIs (and so the only POST) accept nothing but ``Authorization: Bearer``: a browser
never attaches that header by itself, unlike cookies or cached Basic credentials, so a
cross-site form cannot trigger a check. The HTML page takes Basic (user ``admin``, the
token as the password) so that a browser can open it.

A refusal is a JSON 401 (``{"error": {"code": "unauthorized", ...}}``) with the
scheme's ``WWW-Authenticate`` challenge, whatever the header held: garbage, another
scheme, bytes that are not UTF-8, or a megabyte of it.
"""

from __future__ import annotations

import hmac
from collections.abc import Callable
from typing import Any, TypeVar, cast

import structlog
from flask import abort, current_app, request
from flask_httpauth import HTTPBasicAuth, HTTPTokenAuth  # type: ignore[import-untyped]
from werkzeug.datastructures import Authorization

from commng.errors import error_response
from config import Settings

__all__ = ["ADMIN_USER", "api_auth", "closed_unless_configured", "metrics_auth", "page_auth", "remote_addr"]

log = structlog.get_logger("commng.admin")

ADMIN_USER = "admin"
REALM = "CommNG admin"

F = TypeVar("F", bound=Callable[..., Any])


def _authorization() -> tuple[str, str]:
    """The Authorization header as (scheme in lower case, the rest); ("", "") without one.

    Read here rather than through ``request.authorization``: werkzeug's parser raises
    ValueError (a 500) on a Basic header holding a non-ASCII character.
    """
    scheme, _, rest = request.headers.get("Authorization", "").partition(" ")
    return scheme.lower(), rest.strip(" \t")


class _BearerAuth(HTTPTokenAuth):  # type: ignore[misc]
    """Flask-HTTPAuth's token auth, with the header parsed by ``_authorization``."""

    def get_auth(self) -> Authorization | None:
        scheme, token = _authorization()
        return Authorization("bearer", token=token) if scheme == "bearer" else None


_basic: Any = HTTPBasicAuth(realm=REALM)
_bearer: Any = _BearerAuth(scheme="Bearer", realm=REALM)
_metrics_bearer: Any = _BearerAuth(scheme="Bearer", realm="CommNG metrics")


def _configured_token() -> str | None:
    settings: Settings = current_app.config["COMMNG_SETTINGS"]
    return settings.admin_token


def _same(given: str, expected: str) -> bool:
    """Constant-time equality for any text a header can carry.

    ``surrogatepass``: a credential decoded from a header may hold any code point, and
    none of them may turn a refusal into a 500. The token is ASCII (``config``), so no
    such credential can equal it.
    """
    return hmac.compare_digest(given.encode("utf-8", "surrogatepass"), expected.encode("utf-8"))


def _verify_basic(username: str, password: str) -> str | None:
    token = _configured_token()
    # Flask-HTTPAuth's Basic parser ignores the scheme: insist on it being Basic.
    if token is None or _authorization()[0] != "basic":
        return None
    user_ok = _same(username, ADMIN_USER)
    password_ok = _same(password, token)  # both compared, whatever the first said
    return ADMIN_USER if user_ok and password_ok else None


def _verify_bearer(token: str) -> str | None:
    expected = _configured_token()
    if expected is None or not token:
        return None
    return ADMIN_USER if _same(token, expected) else None


def _verify_metrics_bearer(token: str) -> str | None:
    settings: Settings = current_app.config["COMMNG_SETTINGS"]
    expected = settings.metrics_token
    if expected is None or not token:
        return None
    return "metrics" if _same(token, expected) else None


def remote_addr() -> dict[str, str | None]:
    """Who is asking: the peer address, and X-Forwarded-For as sent (the ALB sets it)."""
    forwarded = request.headers.get("X-Forwarded-For")
    return {"remote_addr": request.remote_addr, "forwarded_for": forwarded[:200] if forwarded else None}


def _log_refusal() -> None:
    log.warning("admin_auth_failed", method=request.method, path=request.path, **remote_addr())


def _api_unauthorized(status: int) -> Any:
    _log_refusal()
    return error_response(status, "unauthorized", "send Authorization: Bearer <ADMIN_TOKEN>")


def _page_unauthorized(status: int) -> Any:
    _log_refusal()
    return error_response(status, "unauthorized", "sign in as user 'admin' with ADMIN_TOKEN as the password")


def _metrics_unauthorized(status: int) -> Any:
    log.warning("metrics_auth_failed", method=request.method, path=request.path, **remote_addr())
    return error_response(status, "unauthorized", "send Authorization: Bearer <METRICS_TOKEN>")


_basic.verify_password(_verify_basic)
_basic.error_handler(_page_unauthorized)
_bearer.verify_token(_verify_bearer)
_bearer.error_handler(_api_unauthorized)
_metrics_bearer.verify_token(_verify_metrics_bearer)
_metrics_bearer.error_handler(_metrics_unauthorized)


def page_auth(view: F) -> F:
    """Require HTTP Basic (user ``admin``, password ADMIN_TOKEN)."""
    return cast(F, _basic.login_required(view))


def api_auth(view: F) -> F:
    """Require ``Authorization: Bearer <ADMIN_TOKEN>``."""
    return cast(F, _bearer.login_required(view))


def metrics_auth(view: F) -> F:
    """Require ``Authorization: Bearer <METRICS_TOKEN>`` (read-only: it opens nothing else)."""
    return cast(F, _metrics_bearer.login_required(view))


def closed_unless_configured() -> None:
    """before_request: with ADMIN_TOKEN unset, every admin route is 404 (closed by default)."""
    if not _configured_token():
        abort(404)
