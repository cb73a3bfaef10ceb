"""Check an RDS IAM authentication token the way RDS does, with botocore's own SigV4 signer.

A token is what ``boto3.client("rds").generate_db_auth_token(host, port, user, region)``
returns: a SigV4 presigned ``connect`` request without its scheme,

    <host>:<port>/?Action=connect&DBUser=<user>&X-Amz-Algorithm=AWS4-HMAC-SHA256
        &X-Amz-Credential=<key>/<yyyymmdd>/<region>/rds-db/aws4_request
        &X-Amz-Date=<yyyymmddThhmmssZ>&X-Amz-Expires=900&X-Amz-SignedHeaders=host
        &X-Amz-Signature=<hex>

The check rebuilds the request a correct signer would have presigned for *this* endpoint
(our host name and port, the startup user, our region and access key, the token's own date
and expiry) and lets botocore's ``SigV4QueryAuth`` canonicalise and sign it; the signatures
are compared in constant time. Nothing here formats a canonical request or derives a key
by hand: a hand-rolled SigV4 would only prove that it agrees with itself.

The token is never logged or put in an exception: a refusal is a cause name.
"""

from __future__ import annotations

import calendar
import hmac
import time
import urllib.parse
from dataclasses import dataclass

from botocore.auth import SigV4QueryAuth
from botocore.awsrequest import AWSRequest
from botocore.credentials import Credentials

SERVICE = "rds-db"
ALGORITHM = "AWS4-HMAC-SHA256"
_AMZ_DATE = "%Y%m%dT%H%M%SZ"
# SigV4's own ceiling for a presigned request's X-Amz-Expires (7 days).
_MAX_EXPIRES_S = 604800
_EXPECTED_KEYS = {
    "Action",
    "DBUser",
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
}


@dataclass(frozen=True)
class TokenPolicy:
    """What a token must have been signed for, and how old it may be."""

    hostname: str
    port: int
    region: str
    access_key: str
    secret_key: str
    lifetime_s: float = 900.0
    skew_s: float = 60.0


@dataclass(frozen=True)
class _Parsed:
    host: str
    port: int
    params: dict[str, str]


def _parse(token: str) -> _Parsed | None:
    """The token's host, port and query parameters; None when it is not a presigned URL."""
    try:
        split = urllib.parse.urlsplit("https://" + token)
        port = split.port
        pairs = urllib.parse.parse_qsl(split.query, keep_blank_values=True, strict_parsing=True)
    except ValueError:
        return None
    params = dict(pairs)
    if split.hostname is None or port is None or split.path != "/" or split.username is not None:
        return None
    if len(params) != len(pairs) or set(params) - {"X-Amz-Security-Token"} != _EXPECTED_KEYS:
        return None
    return _Parsed(split.hostname, port, params)


def refusal(token: str, user: str, policy: TokenPolicy, now: float | None = None) -> str | None:
    """Why RDS would refuse ``token`` as the password of ``user``, or None when it is good.

    Causes: ``malformed``, ``host``, ``port``, ``user``, ``access_key``, ``region``,
    ``service``, ``future``, ``expired``, ``signature``. The cheap, specific checks come
    first so that a test (and an operator reading the counters) learns which field was
    wrong; the signature, checked last, covers every field at once.
    """
    now = time.time() if now is None else now
    parsed = _parse(token)
    if parsed is None:
        return "malformed"
    params = parsed.params
    if parsed.host != policy.hostname.lower():
        return "host"
    if parsed.port != policy.port:
        return "port"
    if params["Action"] != "connect" or params["X-Amz-Algorithm"] != ALGORITHM:
        return "malformed"
    if params["X-Amz-SignedHeaders"] != "host":
        return "malformed"
    if params["DBUser"] != user:
        return "user"
    scope = params["X-Amz-Credential"].split("/")
    if len(scope) != 5 or scope[4] != "aws4_request" or scope[1] != params["X-Amz-Date"][:8]:
        return "malformed"
    access_key, _, region, service, _ = scope
    if access_key != policy.access_key:
        return "access_key"
    if region != policy.region:
        return "region"
    if service != SERVICE:
        return "service"
    try:
        signed_at = calendar.timegm(time.strptime(params["X-Amz-Date"], _AMZ_DATE))
        expires = int(params["X-Amz-Expires"])
    except ValueError:
        return "malformed"
    if not 1 <= expires <= _MAX_EXPIRES_S:
        return "malformed"
    if signed_at > now + policy.skew_s:
        return "future"
    if now > signed_at + min(expires, policy.lifetime_s):
        return "expired"
    expected = _expected_signature(policy, user, params["X-Amz-Date"], expires)
    if not hmac.compare_digest(expected.encode(), params["X-Amz-Signature"].encode()):
        return "signature"
    return None


def _expected_signature(policy: TokenPolicy, user: str, amz_date: str, expires: int) -> str:
    """The signature botocore gives the presigned ``connect`` request this endpoint expects.

    The request is the one ``generate_db_auth_token`` presigns (GET https://host:port/ with
    Action and DBUser), carrying the X-Amz-* parameters its ``SigV4QueryAuth`` adds. The
    signing time comes from the token: ``SigV4QueryAuth.add_auth`` would take the clock's
    (and log the signature at DEBUG), so the public steps it runs are called one by one,
    with the time in ``request.context["timestamp"]``, where botocore keeps it.
    A token of another endpoint, user, region, key, date or expiry gets another signature.
    """
    auth = SigV4QueryAuth(Credentials(policy.access_key, policy.secret_key), SERVICE, policy.region, expires)
    request = AWSRequest(method="GET", url=f"https://{policy.hostname}:{policy.port}/")
    request.context["timestamp"] = amz_date
    request.params = {
        "Action": "connect",
        "DBUser": user,
        "X-Amz-Algorithm": ALGORITHM,
        "X-Amz-Credential": auth.scope(request),
        "X-Amz-Date": amz_date,
        "X-Amz-Expires": str(expires),
        "X-Amz-SignedHeaders": "host",
    }
    canonical = auth.canonical_request(request)
    return str(auth.signature(auth.string_to_sign(request, canonical), request))
