"""Every command of the operator guide (cancelling-queued-messages.md), verbatim.

The guide's commands address ``http://localhost:8000`` (curl) and kcli's
default endpoint (the same). The one thing the test changes is the port, so
that it runs beside anything else: curl's URL names the server's free port,
and kcli finds it in ``KUMO_KCLI_ENDPOINT`` (its documented override).
Mail is held in the queue (its route points at a closed port) so that each
step can be checked message by message: which got AdminBounce, which are
still queued.
"""

from __future__ import annotations

import os
import subprocess

import pytest

from ..support import BIN, free_port, wait_for

KCLI = str(BIN / "kcli")

GUIDE = {
    "kcli": {
        "domain": f"""{KCLI} bounce --domain yahoo.com \\
       --reason 'felt like it'""",
        "campaign": f"""{KCLI} bounce --campaign 'Back to school' \\
        --reason 'felt like it'""",
        "everything": f"""{KCLI} bounce --everything \\
      --reason 'PURGING ALL THE QUEUES!'""",
    },
    "curl": {
        "domain": """curl -i 'http://localhost:8000/api/admin/bounce/v1' \\
      -H 'Content-Type: application/json' \\
      -d '{"domain": "yahoo.com", "reason":"felt like it"}'""",
        "campaign": """curl -i 'http://localhost:8000/api/admin/bounce/v1' \\
       -H 'Content-Type: application/json' \\
       -d '{"campaign": "Back to school", "reason":"felt like it"}'""",
        "everything": """curl -i 'http://localhost:8000/api/admin/bounce/v1' \\
     -H 'Content-Type: application/json' \\
     -d '{"reason":"PURGING ALL THE QUEUES!"}'""",
    },
}

# recipient -> (campaign, tenant)
MAIL = {
    "a1@yahoo.com": ("Back to school", "acme"),
    "a2@YAHOO.com": (None, "acme"),
    "a3@yahoo.com": (None, None),
    "b1@gmail.com": ("Back to school", "acme"),
    "b2@gmail.com": ("Back to school", None),
    "b3@gmail.com": ("back to school", "acme"),
    "c1@example.net": ("Summer", "globex"),
    "c2@example.net": (None, "globex"),
    "c3@example.net": (None, None),
}


def _run(command: str, port: int) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "KCLI_TOKEN"}
    env["KUMO_KCLI_ENDPOINT"] = f"http://127.0.0.1:{port}"
    return subprocess.run(["bash", "-c", command.replace("localhost:8000", f"localhost:{port}")],
                          capture_output=True, text=True, env=env, timeout=60)


@pytest.mark.parametrize("form", ["kcli", "curl"])
def test_operator_guide_verbatim(make_serve, form):
    dead = free_port()
    srv = make_serve(routes={d: f"127.0.0.1:{dead}" for d in
                             ("yahoo.com", "gmail.com", "example.net")},
                     queue='retry_interval = "1h"').start()

    for rcpt, (campaign, tenant) in MAIL.items():
        headers = {}
        if campaign:
            headers["X-Campaign"] = campaign
        if tenant:
            headers["X-Tenant"] = tenant
        assert srv.send([rcpt], headers=headers) == {}
    wait_for(lambda: len(srv.records("TransientFailure")) == len(MAIL))
    assert sum(srv.scheduled().values()) == len(MAIL)

    def bounced() -> set[str]:
        return {r["recipient"] for r in srv.records("AdminBounce")}

    def check(expected: set[str]) -> None:
        wait_for(lambda: bounced() == expected)
        still = sum(srv.scheduled().values())
        assert still == len(MAIL) - len(expected)

    steps = [
        ("domain", {"a1@yahoo.com", "a2@YAHOO.com", "a3@yahoo.com"}),
        ("campaign", {"a1@yahoo.com", "a2@YAHOO.com", "a3@yahoo.com", "b1@gmail.com",
                      "b2@gmail.com"}),
        ("everything", set(MAIL)),
    ]
    for step, expected in steps:
        out = _run(GUIDE[form][step], srv.http_port)
        assert out.returncode == 0, out.stderr
        if form == "kcli":
            rule_id = out.stdout.strip()
            assert len(rule_id) == 36
            assert "background" in out.stderr
        else:
            assert out.stdout.startswith("HTTP/1.1 200")
            assert '"id":' in out.stdout and '"total_bounced":0' in out.stdout
        check(expected)

    records = srv.records("AdminBounce")
    by_rcpt = {r["recipient"]: r for r in records}
    assert len(records) == len(MAIL)  # one record per message, none twice
    assert by_rcpt["a1@yahoo.com"]["response"] == {
        "code": 551, "enhanced_code": {"class": 5, "subject": 7, "detail": 1},
        "content": "Administrator bounced with reason: felt like it", "command": None}
    assert by_rcpt["c3@example.net"]["response"]["content"] == (
        "Administrator bounced with reason: PURGING ALL THE QUEUES!")
    # the wrong-case campaign was left for the "everything" step
    assert by_rcpt["b3@gmail.com"]["response"]["content"].endswith("PURGING ALL THE QUEUES!")
    assert not srv.records("Delivery")

    listed = srv.api("GET", "/api/admin/bounce/v1").json()
    assert len(listed) == 3
    assert sum(e["total_bounced"] for e in listed) == len(MAIL)
    camp = next(e for e in listed if e["campaign"] == "Back to school")
    assert camp["bounced"] == {"Back to school:acme@gmail.com": 1, "Back to school:@gmail.com": 1}
