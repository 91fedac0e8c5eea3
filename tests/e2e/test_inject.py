"""HTTP injection (POST /api/inject/v1) end to end to a sink."""

from __future__ import annotations

import pytest

from ..support import wait_for


def test_inject_with_substitutions_delivers(make_serve, sink):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}"}).start()
    body = {
        "envelope_sender": "news@sender.example",
        "content": "Subject: Hello {{ name }}\nX-Campaign: {{ campaign }}\nX-Tenant: acme\n\n"
                   "Dear {{ name }}, your code is {{ code }}.\n",
        "recipients": [
            {"email": "ann@example.com", "name": "Ann", "substitutions": {"code": "A1"}},
            {"email": "bob@example.com", "name": "Bob", "substitutions": {"code": "B2"}},
        ],
        "substitutions": {"campaign": "Spring", "code": "default"},
    }
    r = srv.api("POST", "/api/inject/v1", body)
    assert r.status_code == 200, r.text
    assert r.json() == {"success_count": 2, "fail_count": 0, "failed_recipients": [], "errors": []}
    wait_for(lambda: len(sink.received()) == 2)
    subjects = sorted(m["headers"]["Subject"] for m in sink.received())
    assert subjects == ["Hello Ann", "Hello Bob"]
    rec = srv.by_recipient("Reception")
    assert rec["ann@example.com"]["reception_protocol"] == "HTTP"
    assert rec["ann@example.com"]["queue"] == "Spring:acme@example.com"
    delivered = srv.by_recipient("Delivery")
    assert set(delivered) == {"ann@example.com", "bob@example.com"}


def test_inject_builder_content(make_serve, sink):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}"}).start()
    body = {
        "envelope_sender": "news@sender.example",
        "content": {"subject": "Hi {{ name }}", "text_body": "plain {{ name }}",
                    "html_body": "<p>{{ name }}</p>", "from": {"email": "news@sender.example",
                                                              "name": "News"},
                    "headers": {"X-Campaign": "built"},
                    "attachments": [{"data": "aGVsbG8=", "base64": True,
                                     "content_type": "text/plain", "file_name": "a.txt"}]},
        "recipients": [{"email": "cy@example.com", "name": "Cy"}],
    }
    r = srv.api("POST", "/api/inject/v1", body)
    assert r.status_code == 200, r.text
    wait_for(lambda: sink.received())
    got = sink.received()[0]
    assert got["headers"]["Subject"] == "Hi Cy"
    assert got["headers"]["X-Campaign"] == "built"
    assert got["headers"]["Message-ID"]
    assert srv.by_recipient("Reception")["cy@example.com"]["queue"] == "built:@example.com"


def test_inject_reports_bad_recipients_and_queues_the_rest(make_serve, sink):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}"}).start()
    r = srv.api("POST", "/api/inject/v1", {
        "envelope_sender": "s@sender.example", "content": "Subject: x\n\nhi\n",
        "recipients": [{"email": "good@example.com"}, {"email": "not an address"}]})
    assert r.status_code == 200
    data = r.json()
    assert data["success_count"] == 1 and data["fail_count"] == 1
    assert data["failed_recipients"] == ["not an address"]
    assert "not an address" in data["errors"][0]
    wait_for(lambda: sink.recipients() == ["good@example.com"])


def test_inject_bounced_by_active_rule_still_counts_as_success(make_serve, sink):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}"}).start()
    srv.kcli("bounce", "--domain", "example.com", "--reason", "closed", check=True)
    r = srv.api("POST", "/api/inject/v1", {
        "envelope_sender": "s@sender.example", "content": "Subject: x\n\nhi\n",
        "recipients": [{"email": "a@example.com"}]})
    assert r.json()["success_count"] == 1
    rec = wait_for(lambda: srv.records("AdminBounce"))[0]
    assert rec["recipient"] == "a@example.com"
    assert sink.recipients() == []


@pytest.mark.parametrize("body,needle", [
    ({"content": "x", "recipients": [{"email": "a@example.com"}]}, "envelope_sender"),
    ({"envelope_sender": "s@x.example", "content": "x", "recipients": []}, "recipients"),
    ({"envelope_sender": "s@x.example", "recipients": [{"email": "a@example.com"}]}, "content"),
    ({"envelope_sender": "s@x.example", "content": "{{ broken", "recipients":
      [{"email": "a@example.com"}]}, "content"),
    ({"envelope_sender": "bad sender", "content": "x", "recipients":
      [{"email": "a@example.com"}]}, "envelope_sender"),
    ({"envelope_sender": "s@x.example", "content": {"subject": "no body"}, "recipients":
      [{"email": "a@example.com"}]}, "content"),
    ({"envelope_sender": "s@x.example", "content": "x", "recipients":
      [{"email": "a@example.com", "extra": 1}]}, "extra"),
    ({"envelope_sender": "s@x.example", "content": "x", "recipients": "a@example.com"},
     "recipients"),
])
def test_bad_inject_bodies(make_serve, body, needle):
    srv = make_serve().start()
    r = srv.api("POST", "/api/inject/v1", body)
    assert r.status_code == 422, r.text
    assert needle in r.json()["error"]
    assert srv.records("Reception") == []
