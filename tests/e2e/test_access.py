"""Access control of the admin and inject API."""

from __future__ import annotations

import pytest

ENDPOINTS = [
    ("POST", "/api/admin/bounce/v1", {"reason": "x", "domain": "example.com"}),
    ("GET", "/api/admin/bounce/v1", None),
    ("POST", "/api/admin/suspend/v1", {"reason": "x", "domain": "example.com"}),
    ("GET", "/metrics.json", None),
    ("GET", "/metrics", None),
    ("GET", "/api/check-liveness/v1", None),
    ("POST", "/api/inject/v1", {"envelope_sender": "s@x.example", "content": "x",
                                "recipients": [{"email": "a@example.com"}]}),
]


@pytest.fixture
def locked(make_serve, tmp_path):
    tokens = tmp_path / "tokens"
    tokens.write_text("# operators\n\ngood-token-1\n  good-token-2  \n")
    srv = make_serve(extra="")
    srv.config.write_text(srv.config.read_text().replace(
        "[http]\n", f'[http]\ntrusted_hosts = []\ntokens_file = "{tokens}"\n'))
    return srv.start()


@pytest.mark.parametrize("method,path,body", ENDPOINTS)
def test_no_token_or_wrong_token_is_refused(locked, method, path, body):
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "good-token-1"}):
        r = locked.api(method, path, body, headers=headers)
        assert r.status_code == 401, (headers, r.text)
        assert "error" in r.json()
    # nothing happened
    ok = {"Authorization": "Bearer good-token-1"}
    assert locked.api("GET", "/api/admin/bounce/v1", headers=ok).json() == []
    assert locked.api("GET", "/api/admin/suspend/v1", headers=ok).json() == []
    assert locked.records("Reception") == []


def test_listed_tokens_work(locked):
    for token in ("good-token-1", "good-token-2"):
        r = locked.api("POST", "/api/admin/bounce/v1", {"reason": token, "domain": "example.com"},
                       headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
    out = locked.kcli("--token", "good-token-2", "bounce-list", "--json")
    assert out.returncode == 0 and '"reason": "good-token-2"' in out.stdout
    env_out = locked.kcli("bounce-list", env={"KCLI_TOKEN": "good-token-1"})
    assert env_out.returncode == 0
    refused = locked.kcli("bounce-list")
    assert refused.returncode == 1 and "401" in refused.stderr


def test_trusted_cidr(make_serve):
    srv = make_serve()
    srv.config.write_text(srv.config.read_text().replace(
        "[http]\n", '[http]\ntrusted_hosts = ["127.0.0.0/8"]\n'))
    srv.start()
    assert srv.api("GET", "/api/admin/bounce/v1").status_code == 200


def test_openapi_document_describes_admin_endpoints(make_serve):
    srv = make_serve().start()
    doc = srv.api("GET", "/api-docs/openapi.json").json()
    for path in ("/api/admin/bounce/v1", "/api/admin/suspend/v1", "/api/inject/v1",
                 "/api/admin/inspect-message/v1"):
        assert path in doc["paths"]
    post = doc["paths"]["/api/admin/bounce/v1"]["post"]
    assert "requestBody" in post and "200" in post["responses"]
    assert srv.api("GET", "/api-docs").status_code == 200
