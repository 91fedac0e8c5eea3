"""Hostile HTTP input on the admin and inject endpoints: 4xx, never 5xx, nothing partial."""

from __future__ import annotations

import httpx
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from ..support import Serve, free_port

ENDPOINTS = ["/api/admin/bounce/v1", "/api/admin/suspend/v1", "/api/inject/v1"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("hostile-http")
    srv = Serve(tmp, extra=f'[delivery]\nnameservers = ["127.0.0.1:{free_port()}"]\n')
    srv.config.write_text(srv.config.read_text().replace(
        'hostname = "mta.test"', 'hostname = "mta.test"\nmax_message_size = 100000'))
    srv.start()
    yield srv
    srv.stop()


TEXT = st.text(alphabet=st.characters(codec="utf-8"), max_size=40)
VALUE = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False, allow_infinity=False), TEXT,
                  st.lists(TEXT, max_size=3), st.dictionaries(TEXT, TEXT, max_size=3))
FIELDS = st.sampled_from(["reason", "campaign", "tenant", "domain", "routing_domain",
                          "queue_names", "duration", "expires", "suppress_logging", "dry_run",
                          "envelope_sender", "recipients", "content", "substitutions", "id"])
BODY = st.one_of(st.dictionaries(FIELDS, VALUE, max_size=6),
                 st.fixed_dictionaries({"reason": TEXT, "domain": TEXT, "campaign": TEXT}),
                 st.fixed_dictionaries({"envelope_sender": TEXT, "content": TEXT,
                                        "recipients": st.lists(st.fixed_dictionaries(
                                            {"email": TEXT}), min_size=1, max_size=2)}),
                 VALUE)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(ENDPOINTS), body=BODY, method=st.sampled_from(["POST", "DELETE"]))
def test_unicode_and_wrong_types_never_5xx(server, path, body, method):
    r = server.api(method, path, body)
    assert r.status_code < 500, r.text
    if r.status_code >= 400:
        assert "error" in r.json()


@pytest.mark.parametrize("raw", [b"{", b"[]", b"null", b'"text"', b"\xff\xfe", b"{\"reason\": }",
                                 b'{"reason": "x", "reason": 5}', b"1e999999"])
@pytest.mark.parametrize("path", ENDPOINTS)
def test_malformed_json(server, path, raw):
    r = server.api("POST", path, content=raw, headers={"content-type": "application/json"})
    assert 400 <= r.status_code < 500, r.text
    assert "error" in r.json()


def test_huge_body_refused_with_413(server):
    rules_before = server.api("GET", "/api/admin/bounce/v1").json()
    huge = b'{"reason": "' + b"x" * 300_000 + b'"}'
    for path in ENDPOINTS:
        r = server.api("POST", path, content=huge, headers={"content-type": "application/json"})
        assert r.status_code == 413 and "larger than" in r.json()["error"]

    def chunks():  # no Content-Length: the limit holds while the body streams
        yield b'{"reason": "'
        for _ in range(50):
            yield b"y" * 10_000
        yield b'"}'
    r = httpx.post(server.endpoint + "/api/admin/bounce/v1", content=chunks(),
                   headers={"content-type": "application/json"}, timeout=30)
    assert r.status_code == 413
    assert [e["id"] for e in server.api("GET", "/api/admin/bounce/v1").json()] == [
        e["id"] for e in rules_before]


def test_nothing_partial_after_the_storm(server):
    # the fuzzing above may have created valid rules; every one listed is whole
    for path in ("/api/admin/bounce/v1", "/api/admin/suspend/v1"):
        for rule in server.api("GET", path).json():
            assert rule["id"] and rule["reason"].strip() and rule["duration"]
    assert server.api("GET", "/api/check-liveness/v1").status_code == 200


@pytest.mark.parametrize("raw,where", [
    (b'{"reason": "x",\n "domain": }', "line 2, column 12"),
    (b'{"reason": "x"', "line 1, column 15"),
    (b"not json", "line 1, column 1"),
])
def test_malformed_json_names_the_problem_and_where(server, raw, where):
    r = server.api("POST", "/api/admin/bounce/v1", content=raw,
                   headers={"content-type": "application/json"})
    assert r.status_code == 422
    body = r.json()
    assert body["detail"][0]["field"] == "body"
    assert body["error"].startswith("body: invalid JSON: ")
    assert body["error"].endswith(where)
