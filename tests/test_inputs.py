"""No input reaches a 500: every route answers JSON below 500, whatever the request holds.

The property test walks ``app.url_map`` and sends each route generated requests (any
method; path parameters that are ids, huge, negative or not numbers at all; query
strings; ``Authorization``, ``Content-Type`` with charsets, ``X-Request-ID``; bodies that
are JSON, broken JSON, deep nesting, NUL, lone surrogates or random bytes) through the
Flask test client, against the real PostgreSQL of the suite. The examples after it pin
each case that used to end in a 500, and each refusal's status and code.
"""

from __future__ import annotations

import base64
import json
import re
import time
import urllib.parse
from typing import Any

import pytest
from flask import Flask
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from werkzeug.test import TestResponse

from commng.admin import HSTS
from commng.api import MAX_JSON_DEPTH
from commng.app import create_app
from commng_rotation.runtime import get_runtime
from config import Settings
from tests.helpers import Database

TOKEN = "inputs-Token_0123456789.~+/"
MAX_BODY_BYTES = 64 * 1024  # the app's MAX_CONTENT_LENGTH
# The only answers that are not JSON: the admin page and the Prometheus text, both 200.
NOT_JSON = {"/admin/": "text/html", "/metrics": "text/plain"}
REQUEST_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._:/+=-]{0,127}")
# str.isdigit() says yes to all, int() reads some (Arabic-Indic three, fullwidth one, NKo
# one, mathematical bold nine) and raises on others (superscript two, circled one).
NON_ASCII_DIGITS = ["\u00b2", "\u2460", "\u0663", "\uff11", "\u07c1", "\U0001d7d7"]


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def admin_app(database: Database, make_app: Any) -> Flask:
    """An app with ADMIN_TOKEN set (so /admin and /metrics check credentials), two channels, one message."""
    app: Flask = make_app(database.settings(admin_token=TOKEN))
    client = app.test_client()
    for name in ("alpha", "bravo"):
        channel = client.post("/api/channels", json={"name": name}).json
        assert client.post(f"/api/channels/{channel['id']}/messages", json={"body": "hi"}).status_code == 201
    return app


# -- strategies ----------------------------------------------------------------------------

# Strings with what breaks naive code: NUL, lone surrogates, line separators, a BOM.
NASTY = ["\x00", "\ud800", "\udfff", "\ud83d", "\u2028", "\ufeff", "\uffff", "\\", '"', "%", "é", "😀"]
text = st.text(max_size=40) | st.text(st.characters() | st.sampled_from(NASTY), max_size=40)
# What a WSGI server can hand over as a header value: latin-1, no CR/LF.
header_text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0xFF) | st.just("\t"), max_size=60)
huge = st.integers(1_000, 40_000)


def _often(strategy: st.SearchStrategy[Any], *others: st.SearchStrategy[Any]) -> st.SearchStrategy[Any]:
    """``strategy`` about half of the time, else one of ``others`` (one_of picks a branch evenly)."""
    return st.one_of(*[strategy] * len(others), *others)


ints = st.one_of(
    st.integers(1, 4),  # ids that exist (the fixture's channels and message, and those created)
    st.integers(0, 50),
    st.integers(-(10**6), -1),
    st.integers(2**63 - 2, 2**63 + 2),
    st.integers(10**19, 10**40),
)
query_values = st.one_of(
    ints.map(str),
    st.sampled_from(["", "0", "00", "1e3", "1.0", " 1", "+1", "0x1f", "9" * 19, "9" * 20]),
    st.sampled_from(NON_ASCII_DIGITS),
    st.text("0123456789abcdef", min_size=32, max_size=32),  # the admin history's cursor
    text,
)


def _quote(value: str) -> str:
    return urllib.parse.quote(value, safe="", errors="surrogatepass")


@st.composite
def query_strings(draw: st.DrawFn, known_keys_only: bool = False) -> str:
    keys = st.sampled_from(["limit", "before_id", "after_id"])
    keys = keys if known_keys_only else keys | text
    pairs = draw(st.lists(st.tuples(keys, query_values), max_size=4))
    query = "&".join(f"{_quote(k)}={_quote(v)}" for k, v in pairs)
    # Escapes that are not UTF-8, or not escapes at all.
    return query + draw(st.sampled_from(["", "&limit=%ff", "&before_id=%", "&%zz=1", "&&=", ";limit=1"]))


path_values = _often(
    ints.map(str),
    st.sampled_from([*NON_ASCII_DIGITS, "", "0x10", "1e3", " 1", "-0"]),
    text,
).map(_quote) | st.sampled_from(["%ff", "%c3%28", "%00", "%2e%2e", ".."])

authorization = st.one_of(
    st.none(),
    st.just(f"Bearer {TOKEN}"),
    st.just(_basic("admin", TOKEN)),
    st.sampled_from(["Bearer", "Bearer ", "Basic", "Basic YWRtaW4=", "Bearer a=b", 'Digest username="a"']),
    header_text.map(lambda s: f"Bearer {s}"),
    header_text.map(lambda s: f"Basic {s}"),
    st.binary(max_size=60).map(lambda b: "Basic " + base64.b64encode(b).decode()),
    header_text,
    huge.map(lambda n: "Bearer " + "A" * n),
)
content_type = _often(
    st.just("application/json"),
    st.none(),
    st.sampled_from(
        [
            "application/json; charset=utf-8",
            'application/json; charset="UTF-8"',
            "application/json; charset=latin-1",
            "application/json; charset=utf-16",
            "application/json; charset=",
            "application/merge-patch+json",
            "text/plain",
            "multipart/form-data; boundary=x",
            "application/x-www-form-urlencoded",
        ]
    ),
    header_text.map(lambda s: f"application/json; charset={s}"),
    header_text,
)
request_id = st.none() | st.just("client-id-1") | header_text | huge.map(lambda n: "x" * n)


def _json_bytes(value: Any, ascii_only: bool) -> bytes:
    # ensure_ascii=False with a lone surrogate yields bytes that are not UTF-8: on purpose.
    return json.dumps(value, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


json_leaves = st.none() | st.booleans() | st.integers() | st.floats() | text
json_values = st.recursive(
    json_leaves,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(text, inner, max_size=3),
    max_leaves=8,
)
# What the API's two bodies hold: a name or a message body, right or wrong.
names = st.one_of(st.from_regex(r"[a-z0-9-]{1,64}", fullmatch=True), text, json_values)
message_bodies = _often(text, st.integers(3990, 4010).map(lambda n: "x" * n), st.just(" \t\n"), json_values)
api_objects = st.one_of(
    st.fixed_dictionaries({"name": names}),
    st.fixed_dictionaries({"body": message_bodies}),
    st.dictionaries(st.sampled_from(["name", "body"]) | text, names | message_bodies, max_size=3),
)
api_bodies = st.builds(_json_bytes, api_objects, st.booleans())
nesting = st.integers(1, MAX_BODY_BYTES // 2)
bodies = _often(
    api_bodies,
    st.none(),
    st.builds(_json_bytes, json_values, st.booleans()),
    nesting.map(lambda n: ("[" * n + "]" * n).encode()),
    nesting.map(lambda n: ('{"a":' * (n // 5) + "1" + "}" * (n // 5)).encode()),
    st.sampled_from(
        [
            b"",
            b"NaN",
            b'{"body": NaN}',
            b'{"name": Infinity}',
            b'{"body": -Infinity}',
            b'{"body": ' + b"9" * 5000 + b"}",
            b'\xef\xbb\xbf{"name": "bom"}',
            '{"body": "caf\u00e9"}'.encode("latin-1"),
            b'{"body": "\xed\xa0\x80"}',
            b'{"name": "a", "name": "b"}',
            b"x" * (MAX_BODY_BYTES + 1),
        ]
    ),
    st.binary(max_size=200),
)
METHODS = ["GET", "POST", "PUT", "PATCH", "DELETE", "HEAD", "OPTIONS", "TRACE", "PROPFIND", "get"]
_ARGUMENT = re.compile(r"<(?:[^:<>]+:)?([^<>]+)>")


def _own_body(rule: str) -> st.SearchStrategy[bytes]:
    """The object ``rule`` takes, its one field right or wrong (any object for other routes)."""
    field, values = {
        "/api/channels": ("name", names),
        "/api/channels/<int:channel_id>/messages": ("body", message_bodies),
    }.get(rule, ("name", names | message_bodies))
    return st.builds(_json_bytes, st.fixed_dictionaries({field: values}), st.booleans())


def _credentials(rule: str) -> str | None:
    """What a legitimate client of ``rule`` sends: Basic for the page, Bearer for the APIs."""
    if rule.startswith("/admin/api") or rule == "/metrics":
        return f"Bearer {TOKEN}"
    return _basic("admin", TOKEN) if rule.startswith("/admin") else None


@st.composite
def requests_for(draw: st.DrawFn, rule: str, methods: list[str]) -> dict[str, Any]:
    """A request to the URL rule ``rule``, whose views take ``methods``.

    Half of them are shaped like a client's (one of the route's methods, ids that exist,
    application/json, the right credentials) and only their query and body are odd: so
    that the odd payloads get past routing, media type and auth to the code that parses
    and stores them. The other half is odd everywhere.
    """
    shaped = draw(st.booleans())
    own_methods = st.sampled_from(methods)
    ids = st.integers(1, 4).map(str) if shaped else path_values
    path = _ARGUMENT.sub(lambda _: draw(ids), rule)
    query = draw(query_strings(known_keys_only=shaped))
    headers = {
        name: value
        for name, value in [
            ("Authorization", _credentials(rule) if shaped else draw(authorization)),
            ("Content-Type", "application/json" if shaped else draw(content_type)),
            ("X-Request-ID", draw(request_id)),
            ("X-Amzn-Trace-Id", draw(st.none() | header_text.map(lambda s: f"Root={s}"))),
            ("X-Forwarded-For", draw(st.none() | header_text)),
        ]
        if value is not None
    }
    return {
        "method": draw(own_methods if shaped else _often(own_methods, st.sampled_from(METHODS))),
        "path": f"{path}?{query}" if query else path,
        "headers": headers,
        "data": draw(_often(_own_body(rule), api_bodies, bodies) if shaped else bodies),
    }


def route_table(app: Flask) -> dict[str, list[str]]:
    """Every URL rule of ``app`` and the methods its views take (HEAD and OPTIONS aside)."""
    table: dict[str, set[str]] = {}
    for rule in app.url_map.iter_rules():
        table.setdefault(rule.rule, set()).update((rule.methods or set()) - {"HEAD", "OPTIONS"})
    return {rule: sorted(methods) for rule, methods in sorted(table.items())}


def _routes_at_collection() -> dict[str, list[str]]:
    """The table of an app built only to read its url_map (its database is never reached)."""
    app = create_app(
        Settings(postgres_user="nobody", postgres_password="unused", postgres_port=9, postgres_ssl="disable"),
        configure_logging=False,
    )
    try:
        return route_table(app)
    finally:
        get_runtime(app).stop()


ROUTES = _routes_at_collection()


# -- what every answer must be -----------------------------------------------------------


def assert_bounded(response: TestResponse, method: str, rule: str) -> None:
    """Below 500; JSON (an error object for 4xx) unless it is the page or the metrics text."""
    status = response.status_code
    assert status < 500, response.get_data()[:500]
    body = response.get_data()
    if NOT_JSON.get(rule) == response.mimetype and status == 200:
        return
    if status >= 400 or body:
        assert response.mimetype == "application/json", (status, response.mimetype, body[:200])
    if body and method != "HEAD":
        parsed = json.loads(body)
        if status >= 400:
            error = parsed["error"]
            assert isinstance(error["code"], str)
            assert isinstance(error["message"], str)
            assert error["message"]
    assert TOKEN not in body.decode("utf-8", "replace"), "the admin token was echoed"
    echoed = response.headers.get("X-Request-ID")
    assert echoed is None or REQUEST_ID.fullmatch(echoed), echoed
    if rule.startswith("/admin"):
        assert response.headers.get("Strict-Transport-Security") == HSTS


def test_the_property_test_drives_every_route(admin_app: Flask) -> None:
    assert route_table(admin_app) == ROUTES
    assert set(ROUTES) >= {
        "/api/channels",
        "/api/channels/<int:channel_id>/messages",
        "/api/messages/<int:message_id>",
        "/healthz",
        "/readyz",
        "/metrics",
        "/admin/",
        "/admin/api/status",
        "/admin/api/rotations",
        "/admin/api/rotations/check",
    }


# One property test per URL rule (each with its own database), so that every route gets
# its share: 24 examples per rule (11 rules today, 264 examples). Derandomized and
# without an example database: every run, CI's included, tries the same requests.
@pytest.mark.parametrize("rule", list(ROUTES))
@settings(
    max_examples=24,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@given(data=st.data())
def test_no_generated_request_gets_a_5xx_or_a_non_json_answer(
    admin_app: Flask, rule: str, data: st.DataObject
) -> None:
    request = data.draw(requests_for(rule, ROUTES[rule]))
    response = admin_app.test_client().open(
        request["path"], method=request["method"], headers=request["headers"], data=request["data"]
    )
    # `pytest --hypothesis-show-statistics` shows what the examples covered.
    event(f"{request['method']} -> {response.status_code}")
    assert_bounded(response, request["method"], rule)


WRITE_ROUTES = [rule for rule, methods in ROUTES.items() if "POST" in methods and rule.startswith("/api/")]


# The routes that take a body have the most to vary: 2 x 100 more examples.
@pytest.mark.parametrize("rule", WRITE_ROUTES)
@settings(
    max_examples=100,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[
        HealthCheck.function_scoped_fixture,
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.large_base_example,
    ],
)
@given(data=st.data())
def test_no_generated_body_gets_a_5xx(admin_app: Flask, rule: str, data: st.DataObject) -> None:
    request = data.draw(requests_for(rule, ["POST"]))
    response = admin_app.test_client().open(
        request["path"], method=request["method"], headers=request["headers"], data=request["data"]
    )
    body = response.get_json(silent=True) or {}
    event(f"{request['method']} -> {response.status_code} {body.get('error', {}).get('code', '')}")
    assert_bounded(response, request["method"], rule)


# -- the cases that used to be 500s, one by one ---------------------------------------------
# One test per kind of input, looping over its cases: each test costs a fresh database.


def _error(response: TestResponse, status: int, code: str, case: object = None) -> str:
    assert response.status_code == status, (case, response.get_data(as_text=True))
    assert response.mimetype == "application/json", case
    assert response.json is not None
    assert response.json["error"]["code"] == code, (case, response.json)
    message: str = response.json["error"]["message"]
    assert message, case
    return message


def _post(client: Any, path: str, data: bytes | str, content_type: str = "application/json") -> TestResponse:
    response: TestResponse = client.post(path, data=data, content_type=content_type)
    return response


@pytest.fixture
def channel_path(client: Any) -> str:
    channel = client.post("/api/channels", json={"name": "ops"}).json
    return f"/api/channels/{channel['id']}/messages"


def test_deeply_nested_json_is_400_not_a_recursion_error(client: Any, channel_path: str) -> None:
    for depth in [MAX_JSON_DEPTH + 1, 1_000, 10_000]:  # 10_000 objects: 60 kB, under the 64 kB cap
        for body in ["[" * depth + "]" * depth, '{"a":' * depth + "1" + "}" * depth]:
            for path in ["/api/channels", channel_path]:
                message = _error(_post(client, path, body), 400, "invalid_json", (depth, body[:6], path))
                assert f"deeper than {MAX_JSON_DEPTH} levels" in message


def test_the_nesting_scan_takes_linear_time_on_hostile_bodies(client: Any) -> None:
    """64 kB built to make a string-literal regex backtrack: answered at once, not in seconds."""
    bodies = ['\\"' * 31_000 + "[" * 40, '[""]' * 16_000, "[" * 40 + '"' + "\\" * 60_000, '"[' * 32_000]
    for body in bodies:
        started = time.monotonic()
        _error(_post(client, "/api/channels", body), 400, "invalid_json", body[:10])
        assert time.monotonic() - started < 2.0, body[:10]  # the quadratic scan took ~30 s


def test_nesting_up_to_the_limit_is_parsed_and_refused_for_its_shape(client: Any) -> None:
    inner = MAX_JSON_DEPTH - 1  # the object itself is one level
    body = '{"name": ' + "[" * inner + "]" * inner + "}"
    assert "name must be" in _error(_post(client, "/api/channels", body), 422, "invalid_name")
    # Brackets inside strings are text, not nesting.
    assert _post(client, "/api/channels", json.dumps({"name": "[" * 100})).status_code == 422
    assert _post(client, "/api/channels", json.dumps({"name": '\\"[' * 100})).status_code == 422


def test_nul_and_lone_surrogates_are_422_naming_the_field(client: Any, channel_path: str) -> None:
    cases = [
        ("name", "/api/channels", "ops\x00"),
        ("name", "/api/channels", "\ud800"),
        ("body", channel_path, "before\x00after"),
        ("body", channel_path, "lone \udfff surrogate"),
        ("body", channel_path, "\ud83d"),
    ]
    for field, path, value in cases:
        body = json.dumps({field: value})  # ensure_ascii: \u0000 and \ud800 escapes, valid UTF-8
        message = _error(_post(client, path, body), 422, f"invalid_{field}", value)
        assert message.startswith(f"{field} must not contain NUL"), message
    # An escaped surrogate pair is one character, and is stored.
    response = _post(client, channel_path, '{"body": "\\ud83d\\ude00 ok"}')
    assert response.status_code == 201
    assert response.json["body"] == "\U0001f600 ok"


def test_invalid_utf8_is_400(client: Any, channel_path: str) -> None:
    cases = [
        b'{"body": "\xff"}',
        b'{"body": "\xed\xa0\x80"}',  # a surrogate encoded as if it were a character
        b'{"body": "\xc3"}',  # a truncated sequence
        '{"body": "caf\u00e9"}'.encode("latin-1"),
    ]
    for raw in cases:
        message = _error(_post(client, channel_path, raw), 400, "invalid_encoding", raw)
        assert "not valid UTF-8" in message


def test_only_utf8_charsets_are_accepted(client: Any) -> None:
    """The choice: a JSON body is UTF-8; a charset that says otherwise is 415, never guessed."""
    refused = ["latin-1", "iso-8859-1", "utf-16", "utf-32", "ascii", "cp1252"]
    for charset in refused:
        response = _post(client, "/api/channels", b'{"name": "ops"}', f"application/json; charset={charset}")
        assert "UTF-8" in _error(response, 415, "unsupported_charset", charset)
    accepted = ["application/json", "application/json; charset=utf-8", 'application/json; charset="UTF-8"']
    for n, content_type in enumerate([*accepted, "application/json;charset=utf8"]):
        response = _post(client, "/api/channels", f'{{"name": "ops-{n}"}}', content_type)
        assert response.status_code == 201, (content_type, response.json)
    response = _post(client, "/api/channels", b'{"name": "ops"}', "text/plain; charset=utf-8")
    _error(response, 415, "unsupported_media_type")


def test_json_that_python_would_bend_is_400(client: Any) -> None:
    cases = [
        ("NaN", "NaN is not a JSON number"),
        ('{"name": Infinity}', "Infinity is not a JSON number"),
        ('{"name": -Infinity}', "-Infinity is not a JSON number"),
        ('{"name": ' + "9" * 5000 + "}", "too many digits"),
        ("", "not valid JSON"),
        ('{"name": "ops",}', "not valid JSON"),
        ('\ufeff{"name": "ops"}', "not valid JSON"),
    ]
    for body, needle in cases:
        assert needle in _error(_post(client, "/api/channels", body), 400, "invalid_json", body[:20])


def test_non_ascii_digits_in_paging_parameters_are_400(admin_app: Flask) -> None:
    client = admin_app.test_client()
    for digit in NON_ASCII_DIGITS:
        for path, param in [
            ("/api/channels/1/messages", "limit"),
            ("/api/channels/1/messages", "before_id"),
            ("/api/channels", "limit"),
            ("/api/channels", "after_id"),
            ("/admin/api/rotations", "limit"),
        ]:
            response = client.get(
                f"{path}?{param}={_quote(digit)}", headers={"Authorization": f"Bearer {TOKEN}"}
            )
            assert param in _error(response, 400, "invalid_parameter", (path, param, digit))


def test_non_ascii_digits_in_the_path_are_404(client: Any, channel_path: str) -> None:
    for digit in ["\u0661", "\uff11"]:  # int() reads both as 1: ids are ASCII digits only
        _error(client.get(f"/api/messages/{_quote(digit)}"), 404, "not_found", digit)
        _error(client.get(f"/api/channels/{_quote(digit)}/messages"), 404, "not_found", digit)
    assert client.get(channel_path).status_code == 200  # the same channel by its ASCII id


HOSTILE_AUTHORIZATION = [
    "garbage",
    "Bearer",
    "Bearer ",
    "Bearer a=b, c",
    "Bearer \u00e9\u00ff\u00a0",  # latin-1: how a WSGI server hands over non-ASCII header bytes
    "Basic !!!",
    "Basic " + base64.b64encode(b"\xff\xfe:\xff").decode(),  # not UTF-8 once decoded
    "Basic " + base64.b64encode(b"no-colon").decode(),
    'Digest username="admin", realm="x", nonce="y"',
    "Bearer " + "A" * 100_000,
    "Basic " + "QUFB" * 25_000,
]
ADMIN_ROUTES = [
    ("GET", "/admin/"),
    ("GET", "/admin"),
    ("GET", "/admin/api/status"),
    ("GET", "/admin/api/rotations"),
    ("POST", "/admin/api/rotations/check"),
    ("GET", "/metrics"),
]


def test_hostile_authorization_headers_are_401_json(admin_app: Flask) -> None:
    client = admin_app.test_client()
    for header in HOSTILE_AUTHORIZATION:
        for method, path in ADMIN_ROUTES:
            response = client.open(path, method=method, headers={"Authorization": header})
            _error(response, 401, "unauthorized", (path, header[:30]))
            assert response.headers["WWW-Authenticate"].startswith(("Basic ", "Bearer "))


def test_hostile_authorization_headers_without_admin_token_are_404_json(client: Any) -> None:
    for header in HOSTILE_AUTHORIZATION:
        for method, path in ADMIN_ROUTES:
            response = client.open(path, method=method, headers={"Authorization": header})
            _error(response, 404, "not_found", (path, header[:30]))


def test_a_wrong_method_is_405_json_with_allow(client: Any) -> None:
    response = client.delete("/api/channels")
    _error(response, 405, "method_not_allowed")
    assert set(response.headers["Allow"].split(", ")) >= {"GET", "POST"}
