"""``sluice sink`` as a receiver that throttles: --respond, and the figures
it reports (connections at most, messages per second)."""

from __future__ import annotations

import json
import signal
import smtplib
import subprocess

import pytest

from ..support import BIN, free_port, wait_for, wait_smtp


@pytest.fixture
def sink(tmp_path):
    port = free_port()
    stats = tmp_path / "stats.json"
    proc = subprocess.Popen(
        [BIN / "sluice", "sink", "--listen", f"127.0.0.1:{port}", "--stats", str(stats),
         "--respond", "throttled.example=421 4.7.0 [TSS04] Messages from 1.2.3.4 deferred",
         "--respond", "Gone.Example=550 5.7.1 go away"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    wait_smtp(port)
    yield port, stats, proc
    if proc.poll() is None:
        proc.kill()
        proc.wait()


def test_respond_answers_data_for_its_domain_only(sink):
    port, stats, proc = sink
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        with pytest.raises(smtplib.SMTPDataError) as exc:
            c.sendmail("a@example.org", ["x@throttled.example"], b"Subject: t\r\n\r\nx\r\n")
        assert exc.value.smtp_code == 421
        assert exc.value.smtp_error == b"4.7.0 [TSS04] Messages from 1.2.3.4 deferred"
    with smtplib.SMTP("127.0.0.1", port, timeout=10) as c:
        with pytest.raises(smtplib.SMTPDataError) as exc:
            c.sendmail("a@example.org", ["x@gone.example"], b"Subject: t\r\n\r\nx\r\n")
        assert exc.value.smtp_code == 550
        assert c.sendmail("a@example.org", ["x@fine.example"], b"Subject: t\r\n\r\nx\r\n") == {}
    proc.send_signal(signal.SIGTERM)
    out = proc.communicate(timeout=10)[0].decode()
    assert "accepted=1 " in out and "responded=2 " in out
    assert json.loads(stats.read_text())["responded"] == 2


def test_the_sink_reports_peak_connections_and_rate(sink):
    port, stats, proc = sink
    clients = [smtplib.SMTP("127.0.0.1", port, timeout=10) for _ in range(4)]
    for c in clients:
        c.ehlo("c.test")
    wait_for(lambda: stats.exists() and json.loads(stats.read_text())["connections"] == 4)
    for i, c in enumerate(clients):
        c.sendmail("a@example.org", [f"r{i}@fine.example"], b"Subject: t\r\n\r\nx\r\n")
        c.quit()
    figures = wait_for(lambda: (f := json.loads(stats.read_text()))["connections"] == 0 and f)
    assert figures["peak_connections"] == 4
    assert figures["accepted"] == 4
    assert sum(figures["per_second"].values()) == 4
    assert figures["peak_rate_1s"] == max(figures["per_second"].values())


@pytest.mark.parametrize("value", ["no-equals-sign", "example.com=hello", "example.com=600 x",
                                   "=421 x"])
def test_a_bad_respond_value_is_refused(value):
    r = subprocess.run([BIN / "sluice", "sink", "--respond", value], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and "--respond" in r.stderr
