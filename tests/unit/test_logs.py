"""Packed batches of records expand to exactly the records make_record writes."""

from __future__ import annotations

import orjson
from hypothesis import given, settings
from hypothesis import strategies as st

from sluice.logs import ADMIN_BOUNCE, PACKED, expand, make_record, pack_records
from sluice.rules.bounce import admin_bounce_response

text = st.text(min_size=0, max_size=40)
row = st.tuples(text, text, text, st.sampled_from(["a.com", "c1:t1@b.com", "ü%s@x.org"]),
                st.integers(0, 10**9), st.floats(0, 4e9, allow_nan=False),
                st.integers(0, 1000), st.sampled_from([None, "ESMTP", "HTTP", '"%s']))


def one_by_one(entry: bytes) -> bytes:
    batch = orjson.loads(entry[len(PACKED):])
    response = admin_bounce_response(batch["response"]["content"].partition(": ")[2])
    return b"\n".join(
        make_record(ADMIN_BOUNCE, msg_id=i, sender=s, recipient=r, queue=q,
                    meta=batch["meta"].get(q, {}), size=size, created=created,
                    num_attempts=attempts, nodeid=batch["nodeid"], response=response,
                    reception_protocol=proto, now=batch["now"])
        for i, s, r, q, size, created, attempts, proto in batch["rows"])


def pack(rows, reason, nodeid, meta):
    return pack_records(ADMIN_BOUNCE, admin_bounce_response(reason), nodeid, meta, rows)


@settings(max_examples=200, deadline=None)
@given(rows=st.lists(row, min_size=1, max_size=20), reason=text, nodeid=text)
def test_expansion_is_byte_for_byte_make_record(rows, reason, nodeid):
    meta = {"c1:t1@b.com": {"campaign": "c1", "tenant": "t1"}}
    entry = pack(rows, reason, nodeid, meta)
    out = expand(entry)
    assert out == one_by_one(entry)
    records = [orjson.loads(line) for line in out.split(b"\n")]
    assert [r["id"] for r in records] == [r[0] for r in rows]
    assert {r["type"] for r in records} == {"AdminBounce"}


def test_reason_that_looks_like_a_marker_still_expands_right():
    rows = [("id1", "s@x", "r@y", "a.com", 10, 1.5, 1, "ESMTP")]
    for reason in ["-9007199254740001", "\x00id\x00", "\x00ctime\x00", "%d %s %%",
                   '"quoted" \\ back']:
        entry = pack(rows, reason, "node", {})
        assert expand(entry) == one_by_one(entry)
        assert orjson.loads(expand(entry))["response"]["content"].endswith(reason)


def test_unpacked_entries_pass_through():
    rec = b'{"type":"Delivery"}'
    assert expand(rec) == rec


def test_packed_batches_of_an_older_version_still_expand():
    """AdminBounce batches written before batches named their kind and rows
    carried the reception protocol."""
    entry = b"\x00AB1" + orjson.dumps({"reason": "r", "nodeid": "n", "now": 5.0, "meta": {},
                                        "rows": [["id1", "s@x", "r@y", "a.com", 10, 1.5, 1]]})
    rec = orjson.loads(expand(entry))
    assert (rec["id"], rec["type"], rec["reception_protocol"], rec["created_time"]) == (
        "id1", "AdminBounce", None, "1970-01-01T00:00:01.500000Z")
    assert rec["response"]["content"] == "Administrator bounced with reason: r"
