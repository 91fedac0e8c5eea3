"""Automatic rules: a receiver that throttles (``sluice sink --respond``)
makes `sluice serve` suspend or bounce by itself, with ordinary rules."""

from __future__ import annotations

import datetime as dt
import json
import signal
import subprocess
from pathlib import Path

import pytest

from ..support import BIN, free_port, wait_for, wait_smtp

TSS04 = "421 4.7.0 [TSS04] Messages from 192.0.2.2 temporarily deferred"


class RespondingSink:
    """``sluice sink`` answering DATA for some domains with a given reply."""

    def __init__(self, tmp: Path, respond: dict[str, str], port: int | None = None) -> None:
        self.port = port or free_port()
        self.stats = tmp / f"sink-{self.port}-stats.json"
        self.record = tmp / f"sink-{self.port}.jsonl"
        args = [a for d, r in respond.items() for a in ("--respond", f"{d}={r}")]
        self.proc = subprocess.Popen(
            [BIN / "sluice", "sink", "--listen", f"127.0.0.1:{self.port}", "--stats",
             str(self.stats), "--record", str(self.record), *args],
            stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
        wait_smtp(self.port)

    def figures(self) -> dict:
        return json.loads(self.stats.read_text()) if self.stats.exists() else {}

    def recipients(self) -> list[str]:
        if not self.record.exists():
            return []
        return [r for line in self.record.read_text().splitlines() if line
                for r in json.loads(line)["recipients"]]

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.communicate(timeout=10)


@pytest.fixture
def sinks():
    started: list[RespondingSink] = []
    yield started
    for s in started:
        s.stop()


def _when(rfc3339: str) -> float:
    return dt.datetime.fromisoformat(rfc3339.replace("Z", "+00:00")).timestamp()


def automation(domain: str, action: str, duration: str, threshold: str = "",
               regex: str = r"^421 .*\\[TSS04\\]") -> str:
    return (f'[[shaping."{domain}".automation]]\nregex = "{regex}"\naction = "{action}"\n'
            f'duration = "{duration}"\n{threshold}\n')


def test_a_throttling_receiver_gets_its_domain_suspended_and_others_keep_flowing(
        make_serve, sinks, tmp_path):
    sink = RespondingSink(tmp_path, {"throttled.example": TSS04})
    sinks.append(sink)
    srv = make_serve(routes={"throttled.example": f"127.0.0.1:{sink.port}",
                             "fine.example": f"127.0.0.1:{sink.port}"},
                     extra=automation("throttled.example", "suspend", "4s")).start()
    srv.send([f"t{i}@throttled.example" for i in range(30)])
    srv.send([f"f{i}@fine.example" for i in range(30)])
    rules = wait_for(lambda: srv.api("GET", "/api/admin/suspend/v1").json())
    assert len(rules) == 1
    rule = rules[0]
    assert rule["domain"] == "throttled.example"
    assert rule["reason"] == r"automation: ^421 .*\[TSS04\]"
    # the rule is made within a second of the first deferral
    first = min(_when(r["event_time"]) for r in srv.records("TransientFailure"))
    entry = next(e for e in srv.api("GET", "/api/admin/audit/v1").json()
                 if e["action"] == "suspend-create")
    assert entry["actor"] == "automation:throttled.example#1"
    assert _when(entry["time"]) - first < 1.0
    # the other domain on the same sink flows
    wait_for(lambda: len([r for r in sink.recipients() if r.endswith("@fine.example")]) == 30)
    # nothing more is attempted to the suspended domain while the rule is in force
    # (the sink's figures are written every second)
    wait_for(lambda: sink.figures()["responded"] == len(srv.records("TransientFailure")))
    assert len(srv.records("TransientFailure")) < 30
    assert srv.kcli("suspend-list").stdout.count("throttled.example") == 1
    # the receiver recovers (a sink that accepts, same port) and the rule ends: delivered
    sink.stop()
    sinks.append(RespondingSink(tmp_path, {}, port=sink.port))
    wait_for(lambda: srv.api("GET", "/api/admin/suspend/v1").json() == [], timeout=30)
    wait_for(lambda: len(srv.by_recipient("Delivery")) == 60, timeout=60)


def test_a_threshold_waits_for_that_many_matches(make_serve, sinks, tmp_path):
    sink = RespondingSink(tmp_path, {"throttled.example": TSS04})
    sinks.append(sink)
    srv = make_serve(routes={"throttled.example": f"127.0.0.1:{sink.port}"},
                     queue='retry_interval = "1h"',
                     extra=automation("throttled.example", "suspend", "1h",
                                      'threshold = { count = 3, period = "10m" }')).start()
    for i in range(2):
        srv.send([f"t{i}@throttled.example"])
        wait_for(lambda i=i: len(srv.records("TransientFailure")) == i + 1)
    assert srv.api("GET", "/api/admin/suspend/v1").json() == []
    srv.send(["t2@throttled.example"])
    rules = wait_for(lambda: srv.api("GET", "/api/admin/suspend/v1").json())
    assert [r["domain"] for r in rules] == ["throttled.example"]


def test_bounce_tenant_bounces_only_that_tenants_mail(make_serve, sinks, tmp_path):
    sink = RespondingSink(tmp_path, {"throttled.example": "550 5.7.1 [TS03] Blocked"})
    sinks.append(sink)
    srv = make_serve(routes={"throttled.example": f"127.0.0.1:{sink.port}",
                             "held.example": f"127.0.0.1:{free_port()}"},
                     queue='retry_interval = "1h"',
                     extra=automation("throttled.example", "bounce_tenant", "1h",
                                      regex=r"^550 5\\.7\\.1 \\[TS03\\]")).start()
    # held.example's mail waits (nothing listens there), for both tenants
    srv.send(["a@held.example"], headers={"X-Tenant": "spammy"})
    srv.send(["b@held.example"], headers={"X-Tenant": "clean"})
    srv.send(["x@throttled.example"], headers={"X-Tenant": "spammy"})
    rule = wait_for(lambda: srv.api("GET", "/api/admin/bounce/v1").json())[0]
    assert (rule["domain"], rule["tenant"]) == ("throttled.example", "spammy")
    # the rule is for that domain and tenant: other mail of the tenant is untouched
    srv.send(["y@throttled.example"], headers={"X-Tenant": "spammy"})
    srv.send(["z@throttled.example"], headers={"X-Tenant": "clean"})
    wait_for(lambda: "y@throttled.example" in srv.by_recipient("AdminBounce"))
    assert "a@held.example" not in srv.by_recipient("AdminBounce")
    assert "z@throttled.example" not in srv.by_recipient("AdminBounce")
    entry = next(e for e in srv.api("GET", "/api/admin/audit/v1").json()
                 if e["action"] == "bounce-create")
    assert entry["actor"] == "automation:throttled.example#1"


def test_automation_entries_of_default_watch_every_domain(make_serve, sinks, tmp_path):
    sink = RespondingSink(tmp_path, {"one.example": TSS04, "two.example": TSS04})
    sinks.append(sink)
    srv = make_serve(routes={"one.example": f"127.0.0.1:{sink.port}",
                             "two.example": f"127.0.0.1:{sink.port}"},
                     queue='retry_interval = "1h"',
                     extra=automation("default", "suspend", "1h")).start()
    srv.send(["a@one.example"])
    srv.send(["b@two.example"])
    rules = wait_for(lambda: len(r := srv.api("GET", "/api/admin/suspend/v1").json()) == 2 and r)
    assert sorted(r["domain"] for r in rules) == ["one.example", "two.example"]
    actors = {e["actor"] for e in srv.api("GET", "/api/admin/audit/v1").json()}
    assert actors == {"automation:default#1"}


@pytest.mark.parametrize("extra,key", [
    ('[[shaping."x.example".automation]]\nregex = "("\naction = "suspend"\nduration = "1h"\n',
     'shaping."x.example".automation.0.regex'),
    ('[[shaping."x.example".automation]]\nregex = "x"\naction = "nuke"\nduration = "1h"\n',
     'shaping."x.example".automation.0.action'),
    ('[[shaping."x.example".automation]]\nregex = "x"\naction = "max_message_rate=fast"\n'
     'duration = "1h"\n', 'shaping."x.example".automation.0.action'),
    ('[[shaping."x.example".automation]]\nregex = "x"\naction = "suspend"\n',
     'shaping."x.example".automation.0.duration'),
    ('[[shaping."x.example".automation]]\nregex = "x"\naction = "suspend"\nduration = "1h"\n'
     'threshold = { count = 0, period = "1m" }\n',
     'shaping."x.example".automation.0.threshold.count'),
])
def test_bad_automation_config_stops_the_server_naming_the_key(make_serve, extra, key):
    srv = make_serve(extra=extra)
    r = subprocess.run([BIN / "sluice", "serve", "--config", str(srv.config)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2
    assert "bad configuration" in r.stderr and key in r.stderr


def test_a_rate_action_holds_the_site_to_that_rate_as_queue_summary_shows(
        make_serve, sinks, tmp_path):
    sink = RespondingSink(tmp_path, {"throttled.example": TSS04})
    sinks.append(sink)
    srv = make_serve(routes={"throttled.example": f"127.0.0.1:{sink.port}"},
                     queue='retry_interval = "1h"',
                     extra=automation("throttled.example", "max_message_rate=1/m", "1h")).start()
    srv.send(["t@throttled.example"])

    def throttled() -> dict | None:
        ready = json.loads(srv.kcli("queue-summary", "--json", check=True).stdout)["ready"]
        return next((s for s in ready.values() if s["throttled_until"]), None)

    site = wait_for(throttled)
    assert site["message_rate_limit"] == pytest.approx(1 / 60)
    assert site["throttled_until"] > 3000 + _when(srv.records("TransientFailure")[0]["event_time"])
    table = srv.kcli("queue-summary", check=True).stdout
    assert "1/m until" in table
    # a rate action makes no rule
    assert srv.api("GET", "/api/admin/suspend/v1").json() == []
    assert srv.api("GET", "/api/admin/bounce/v1").json() == []


def test_the_readme_example_is_a_valid_configuration_that_matches_tss04():
    import re
    import tomllib

    from sluice.config import settings_from_dict

    readme = (Path(__file__).resolve().parents[2] / "README.md").read_text()
    section = readme.split("### Automatic rules\n", 1)[1].split("\n## ", 1)[0]
    block = re.findall(r"```toml\n(.*?)```", section, re.S)[0]
    settings = settings_from_dict(tomllib.loads(block))
    (name, entry), (default_name, _) = settings.automation_for("yahoo.com")
    assert (name, default_name) == ("yahoo.com#1", "default#1")
    assert re.search(entry.regex, TSS04)
    assert entry.threshold is not None and entry.threshold.count == 10
