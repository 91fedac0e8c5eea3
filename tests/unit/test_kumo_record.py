"""Every kind of record Sluice writes parses as KumoMTA's ``JsonLogRecord``.

The end-to-end tests check the records of real sessions against the same
model (``tests/kumo_record.py``); these pin down each field's shape, and
that the model itself refuses what KumoMTA's deserializer refuses.
"""

from __future__ import annotations

import uuid

import orjson
import pytest
from pydantic import ValidationError

from sluice.logs import (
    ADMIN_BOUNCE,
    BOUNCE,
    DELIVERY,
    EXPIRATION,
    RECEPTION,
    REJECTION,
    TRANSIENT_FAILURE,
    Response,
    Tls,
    expand,
    make_record,
    pack_records,
)
from sluice.rules.bounce import admin_bounce_response

from ..support.kumo_record import parse

NODE = str(uuid.uuid4())
SESSION = str(uuid.uuid4())


def record(kind: str, **kw) -> bytes:
    args = dict(msg_id="0123abcd", sender="s@example.org", recipient="r@example.com",
                queue="c:t@example.com", meta={"campaign": "c", "tenant": "t"}, size=120,
                created=1_700_000_000.25, num_attempts=1, nodeid=NODE,
                response=Response(250, "OK", (2, 0, 0), "."))
    args.update(kw)
    return make_record(kind, **args)


@pytest.mark.parametrize("kind,kw", [
    (RECEPTION, dict(peer=("client.example", "127.0.0.1"), reception_protocol="ESMTP",
                     session_id=SESSION, num_attempts=0)),
    (RECEPTION, dict(peer=("", "::1"), reception_protocol="HTTP", num_attempts=0,
                     response=Response(250, "OK", (2, 0, 0), None))),
    (DELIVERY, dict(site="(mx1.example.com)", peer=("mx1.example.com", "192.0.2.1"),
                    delivery_protocol="ESMTP", reception_protocol="ESMTP", session_id=SESSION,
                    tls=Tls("TLS_AES_256_GCM_SHA384", "TLSv1.3", ("CN=mx1.example.com",)))),
    (TRANSIENT_FAILURE, dict(response=Response(451, "try later", (4, 3, 0), "RCPT TO"),
                             delivery_protocol="ESMTP", reception_protocol="SMTP")),
    (BOUNCE, dict(response=Response(553, "no SMTPUTF8", (5, 6, 7), "MAIL FROM"),
                  delivery_protocol="ESMTP", reception_protocol="ESMTP")),
    (EXPIRATION, dict(response=Response(551, "expired", (5, 4, 7)))),
    (ADMIN_BOUNCE, dict(response=admin_bounce_response("oops"))),
    (REJECTION, dict(msg_id="", queue="", meta={}, size=0, num_attempts=0,
                     peer=("helo.example", "10.0.0.1"),
                     response=Response(550, "Relaying denied", (5, 7, 1), "RCPT TO"))),
])
def test_each_record_kind_parses_as_kumomta_json_log_record(kind, kw):
    line = record(kind, **kw)
    parsed = parse(line)
    raw = orjson.loads(line)
    assert parsed.type == kind
    assert raw["bounce_classification"] == "Uncategorized"
    assert raw["headers"] == {}
    assert raw["nodeid"] == NODE
    assert raw["created_time"] == "2023-11-14T22:13:20.250000Z"
    assert raw["created"] == 1_700_000_000
    if "tls" in kw:
        assert (raw["tls_cipher"], raw["tls_protocol_version"], raw["tls_peer_subject_name"]) == (
            "TLS_AES_256_GCM_SHA384", "TLSv1.3", ["CN=mx1.example.com"])
    else:
        assert "tls_cipher" not in raw and "tls_protocol_version" not in raw


def test_expanded_admin_bounces_parse_as_kumomta_records():
    entry = pack_records(ADMIN_BOUNCE, admin_bounce_response("wrong campaign"), NODE, {},
                         [("id1", "s@x.org", "r@y.com", "y.com", 10, 1.5, 2, "ESMTP"),
                          ("id2", "", "r2@y.com", "y.com", 11, 2.5, 0, None)])
    lines = expand(entry).split(b"\n")
    assert [parse(line).id for line in lines] == ["id1", "id2"]
    assert orjson.loads(lines[0])["reception_protocol"] == "ESMTP"


@pytest.mark.parametrize("change", [
    {"nodeid": "mta1"},                       # a node name, not a UUID
    {"bounce_classification": None},          # required string
    {"timestamp": 1.5},                       # ts_seconds: integer
    {"peer_address": {"name": "mx", "addr": "mx.example.com"}},   # IpAddr, not a name
    {"session_id": "not-a-uuid"},
    {"num_attempts": 70000},                  # u16
    {"response": {"code": 250, "content": "OK", "command": ".",
                  "enhanced_code": {"class": 2, "subject": "0", "detail": 0}}},
])
def test_the_model_refuses_what_kumomta_refuses(change):
    rec = orjson.loads(record(DELIVERY))
    rec.update(change)
    with pytest.raises(ValidationError):
        parse(orjson.dumps(rec))


@pytest.mark.parametrize("missing", ["headers", "meta", "bounce_classification", "nodeid",
                                     "site", "response", "created"])
def test_the_model_requires_kumomta_required_fields(missing):
    rec = orjson.loads(record(DELIVERY))
    del rec[missing]
    with pytest.raises(ValidationError):
        parse(orjson.dumps(rec))
