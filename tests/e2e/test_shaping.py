"""Traffic shaping as a destination sees it: ``sluice serve`` (several
reception processes and the delivery process) sending to ``sluice sink
--stats``, which counts the connections it has open at once and the
messages it accepts each second.

The limits hold per site for the node, however many reception processes
take the mail in; a domain without limits is not slowed by one with limits;
``queue-summary`` shows them; a bad value stops the start naming its key.
"""

from __future__ import annotations

import json
import os
import re
import smtplib
import subprocess
import threading
import tomllib
from pathlib import Path

import pytest

from sluice.config import settings_from_dict

from ..support import BIN, Sink, wait_for

README = Path(__file__).resolve().parents[2] / "README.md"

# Several reception processes: the default (one per core) wherever there
# are two cores or more.
WORKERS = max(2, os.cpu_count() or 1)


@pytest.fixture
def make_sink(tmp_path):
    started: list[Sink] = []

    def make() -> Sink:
        sink = Sink(tmp_path, stats=tmp_path / f"stats-{len(started)}.json").start()
        started.append(sink)
        return sink

    yield make
    for sink in started:
        sink.stop()


def figures(sink: Sink) -> dict:
    assert sink.stats is not None
    try:
        return json.loads(sink.stats.read_text())
    except (OSError, ValueError):
        return {}


def inject(port: int, recipients: list[str], sessions: int = 8) -> None:
    """Send one message per recipient, over ``sessions`` SMTP sessions at once."""
    errors: list[BaseException] = []

    def run(share: list[str]) -> None:
        try:
            with smtplib.SMTP("127.0.0.1", port, timeout=30) as s:
                for rcpt in share:
                    s.sendmail("sender@example.org", [rcpt],
                               b"Subject: shaping\r\n\r\nhello\r\n")
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(recipients[k::sessions],))
               for k in range(sessions)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors


def full_seconds(per_second: dict[str, int]) -> list[int]:
    """The counts of the seconds between the first and the last (both partial)."""
    counts = [n for _, n in sorted(per_second.items(), key=lambda x: int(x[0]))]
    return counts[1:-1]


def test_limits_hold_for_the_node_whatever_the_number_of_reception_processes(
        make_serve, make_sink):
    sink = make_sink()
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}"}, workers=WORKERS,
                     extra='[shaping."example.com"]\nmax_connections = 3\n'
                           'max_message_rate = "20/s"\n').start()
    site = f"127.0.0.1:{sink.port}"
    inject(srv.smtp_port, [f"r{i}@example.com" for i in range(200)])
    wait_for(lambda: len(srv.records("Delivery")) == 200, timeout=90)
    f = wait_for(lambda: (f := figures(sink)).get("accepted") == 200 and f)

    # never more connections than allowed, from all the reception processes' mail
    assert 1 <= f["peak_connections"] <= 3
    # 20/s: each second holds at most 21 starts; one more for the time a
    # message takes from its start to the sink's count
    assert max(f["per_second"].values()) <= 22, f["per_second"]
    inner = full_seconds(f["per_second"])
    assert len(inner) >= 6, f["per_second"]
    assert 16 <= sum(inner) / len(inner) <= 21, f["per_second"]

    # queue-summary shows the limits, in the table and as JSON
    summary = json.loads(srv.kcli("queue-summary", "--json", check=True).stdout)
    ready = summary["ready"][site]
    assert ready["max_connections"] == 3 and ready["max_message_rate"] == 20.0
    assert ready["message_rate_limit"] == 20.0 and ready["throttled_until"] is None
    assert ready["max_deliveries_per_connection"] == 100  # [delivery]'s
    assert ready["max_connection_rate"] is None
    assert ready["delivered"] == 200 and ready["rate"] > 0
    table = srv.kcli("queue-summary", check=True).stdout.splitlines()
    header = table[0].split()
    assert header[:5] == ["SITE", "DELIVERED", "FAILED", "CONNECTIONS", "QUEUED"]
    assert header[5:] == ["MAX-CONN", "PER-CONN", "MAX-RATE", "CONN-RATE", "THROTTLED", "RATE"]
    row = next(cells for line in table if (cells := line.split()) and cells[0] == site)
    assert row[1] == "200" and row[5:10] == ["3", "100", "20/s", "-", "-"]
    assert re.fullmatch(r"[0-9.]+/s", row[10])
    text = srv.api("GET", "/metrics").text
    assert f'sluice_site_max_connections{{site="{site}"}} 3.0' in text
    assert f'sluice_site_message_rate_limit{{site="{site}"}} 20.0' in text


def test_max_deliveries_per_connection(make_serve, make_sink):
    sink = make_sink()
    srv = make_serve(routes={"example.com": f"127.0.0.1:{sink.port}"}, workers=WORKERS,
                     extra='[shaping."example.com"]\nmax_deliveries_per_connection = 2\n').start()
    inject(srv.smtp_port, [f"r{i}@example.com" for i in range(10)], sessions=2)
    delivered = wait_for(lambda: len(d := srv.records("Delivery")) == 10 and d)
    # session_id: one UUID per outbound connection
    per_session: dict[str, int] = {}
    for r in delivered:
        assert r["session_id"]
        per_session[r["session_id"]] = per_session.get(r["session_id"], 0) + 1
    assert max(per_session.values()) <= 2
    assert len(per_session) >= 5
    assert sorted(sink.recipients()) == sorted(f"r{i}@example.com" for i in range(10))


def test_a_domain_without_limits_flows_at_full_speed_beside_a_limited_one(
        make_serve, make_sink):
    slow, fast = make_sink(), make_sink()
    srv = make_serve(routes={"slow.example": f"127.0.0.1:{slow.port}",
                             "fast.example": f"127.0.0.1:{fast.port}"}, workers=WORKERS,
                     extra='[shaping."slow.example"]\nmax_message_rate = "5/s"\n').start()
    inject(srv.smtp_port, [f"s{i}@slow.example" for i in range(50)], sessions=2)
    inject(srv.smtp_port, [f"f{i}@fast.example" for i in range(200)])
    wait_for(lambda: len(fast.recipients()) == 200, timeout=60)
    # all of the fast domain's mail arrived while the slow one's still trickles
    assert len(slow.recipients()) < 50
    f = wait_for(lambda: (f := figures(fast)).get("accepted") == 200 and f)
    assert f["rate"] > 20  # well above the other site's 5/s
    wait_for(lambda: len(slow.recipients()) == 50, timeout=60)
    s = wait_for(lambda: (s := figures(slow)).get("accepted") == 50 and s)
    assert max(s["per_second"].values()) <= 7, s["per_second"]
    inner = full_seconds(s["per_second"])
    assert inner and 4 <= sum(inner) / len(inner) <= 5.5, s["per_second"]


@pytest.mark.parametrize("lines,key", [
    ('max_message_rate = "fast"', 'shaping."x.example".max_message_rate'),
    ('max_message_rate = "0/s"', 'shaping."x.example".max_message_rate'),
    ('max_connection_rate = "5 per second"', 'shaping."x.example".max_connection_rate'),
    ("max_connections = 0", 'shaping."x.example".max_connections'),
    ("max_deliveries_per_connection = -1", 'shaping."x.example".max_deliveries_per_connection'),
    ('idle_timeout = "soon"', 'shaping."x.example".idle_timeout'),
    ("max_conections = 3", 'shaping."x.example".max_conections'),
])
def test_bad_shaping_config_stops_the_start_naming_the_key(make_serve, lines, key):
    srv = make_serve(extra=f'[shaping."x.example"]\n{lines}\n')
    r = subprocess.run([BIN / "sluice", "serve", "--config", str(srv.config)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2, r.stderr
    assert r.stderr.startswith(f"sluice: bad configuration: {srv.config}: "), r.stderr
    assert key in r.stderr
    assert not (Path(srv.data) / "logs").exists()


def test_the_readme_example_is_a_valid_configuration():
    section = README.read_text().split("## Traffic shaping\n", 1)[1].split("\n## ", 1)[0]
    toml = re.findall(r"```toml\n(.*?)```", section, re.S)[0]
    settings = settings_from_dict(tomllib.loads(toml))
    limits = settings.limits_for("example.com")
    assert (limits.max_connections, limits.max_deliveries_per_connection) == (5, 50)
    assert (limits.max_message_rate, limits.max_connection_rate) == (50.0, 10.0)
    assert (limits.connect_timeout, limits.idle_timeout) == (30.0, 5.0)
    other = settings.limits_for("other.example")
    assert other.max_connections == 32 and other.max_message_rate is None
