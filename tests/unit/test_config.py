"""Configuration: embedded defaults, keys, errors."""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from sluice.config import (
    ConfigError,
    QueueSettings,
    ServerSettings,
    Settings,
    load_settings,
    settings_from_dict,
)

FULL = """\
[server]
data_dir = "/srv/sluice"
node_name = "mta1"

[smtp]
listen = ["127.0.0.1:2025", "[::1]:2025"]
hostname = "mta1.example.net"
relay_hosts = ["127.0.0.1", "::1", "10.0.0.0/8"]
max_message_size = 1048576
tenant_header = "X-Customer"
campaign_header = "X-Mailing"

[http]
listen = ["0.0.0.0:8080"]
trusted_hosts = ["127.0.0.1", "::1", "192.168.0.0/16"]
tokens_file = "/etc/sluice/tokens"

[queue]
retry_interval = "10m"
max_retry_interval = "4h"
max_age = "3 days"

[queue."example.com"]
max_age = "1d"

[queue."Slow.Example"]
retry_interval = "1h 30m"

[routes]
"example.com" = "127.0.0.1:2526"
"Sink.EXAMPLE" = "[::1]:2600"

[routing_domains]
"hotmail.com" = "outlook.com"
"Live.COM" = "OUTLOOK.com"
"""


def write(tmp_path: Path, text: str, name: str = "sluice.toml") -> Path:
    """Write a config file; the tokens file that the full example names is
    made beside it (a tokens_file that cannot be read stops the start)."""
    tokens = tmp_path / "tokens"
    tokens.write_text("ops:secret\n")
    p = tmp_path / name
    p.write_text(text.replace("/etc/sluice/tokens", str(tokens)), encoding="utf-8")
    return p


# ---- defaults ----------------------------------------------------------------

@pytest.mark.parametrize("settings", [load_settings(None), Settings(), settings_from_dict({})],
                         ids=["load_none", "Settings()", "empty_dict"])
def test_defaults_match_spec(settings):
    assert settings.smtp.listen == ["127.0.0.1:2025"]
    assert settings.http.listen == ["127.0.0.1:8000"]
    assert settings.server.data_dir == "var"
    assert settings.data_path == Path("var")
    assert settings.smtp.relay_hosts == ["127.0.0.1", "::1"]
    assert settings.http.trusted_hosts == ["127.0.0.1", "::1"]
    assert settings.smtp.relay_networks() == [ipaddress.ip_network("127.0.0.1/32"),
                                              ipaddress.ip_network("::1/128")]
    assert settings.http.trusted_networks() == [ipaddress.ip_network("127.0.0.1/32"),
                                                ipaddress.ip_network("::1/128")]
    assert settings.queue.retry_interval == 20 * 60
    assert settings.queue.max_retry_interval == 8 * 3600
    assert settings.queue.max_age == 7 * 86400
    assert settings.smtp.tenant_header == "X-Tenant"
    assert settings.smtp.campaign_header == "X-Campaign"
    assert settings.smtp.max_message_size == 20971520
    assert settings.http.tokens_file is None
    assert settings.routes == {}
    assert settings.routing_domains == {}
    assert settings.queue_settings_for("example.com") == QueueSettings()
    # one reception process per core (and a delivery process)
    assert settings.server.workers == min(os.cpu_count() or 1, 64)


def test_workers_default_follows_the_cores(monkeypatch):
    monkeypatch.setattr(os, "cpu_count", lambda: 8)
    assert ServerSettings().workers == 8
    monkeypatch.setattr(os, "cpu_count", lambda: 256)
    assert ServerSettings().workers == 64
    monkeypatch.setattr(os, "cpu_count", lambda: None)
    assert ServerSettings().workers == 1


def test_empty_file_gives_defaults(tmp_path):
    s = load_settings(write(tmp_path, ""))
    assert s == Settings()


# ---- full config -------------------------------------------------------------

def test_full_config_loads(tmp_path):
    s = load_settings(write(tmp_path, FULL))
    assert s.server.data_dir == "/srv/sluice"
    assert s.data_path == Path("/srv/sluice")
    assert s.server.node_name == "mta1"

    assert s.smtp.listen == ["127.0.0.1:2025", "[::1]:2025"]
    assert s.smtp.hostname == "mta1.example.net"
    assert s.smtp.relay_hosts == ["127.0.0.1", "::1", "10.0.0.0/8"]
    assert ipaddress.ip_network("10.0.0.0/8") in s.smtp.relay_networks()
    assert s.smtp.max_message_size == 1048576
    assert s.smtp.tenant_header == "X-Customer"
    assert s.smtp.campaign_header == "X-Mailing"

    assert s.http.listen == ["0.0.0.0:8080"]
    assert s.http.trusted_hosts == ["127.0.0.1", "::1", "192.168.0.0/16"]
    assert ipaddress.ip_network("192.168.0.0/16") in s.http.trusted_networks()
    assert s.http.tokens_file == str(tmp_path / "tokens")

    assert s.queue.retry_interval == 600
    assert s.queue.max_retry_interval == 4 * 3600
    assert s.queue.max_age == 3 * 86400

    assert s.routes == {"example.com": "127.0.0.1:2526", "sink.example": "[::1]:2600"}
    assert s.routing_domains == {"hotmail.com": "outlook.com", "live.com": "outlook.com"}


def test_queue_override_for_one_domain(tmp_path):
    s = load_settings(write(tmp_path, FULL))
    ex = s.queue_settings_for("example.com")
    assert ex.max_age == 86400
    # the rest comes from [queue]
    assert ex.retry_interval == 600
    assert ex.max_retry_interval == 4 * 3600

    slow = s.queue_settings_for("slow.example")  # key normalized to lower case
    assert slow.retry_interval == 5400
    assert slow.max_age == 3 * 86400

    other = s.queue_settings_for("other.example")
    assert other == s.queue
    assert other.max_age == 3 * 86400


def test_queue_override_on_top_of_embedded_defaults():
    s = settings_from_dict({"queue": {"example.com": {"max_age": "1d"}}})
    assert s.queue_settings_for("example.com") == QueueSettings(
        retry_interval=20 * 60, max_retry_interval=8 * 3600, max_age=86400)
    assert s.queue_settings_for("gmail.com") == QueueSettings()
    assert s.queue == QueueSettings()


def test_idna_keys_are_normalized():
    s = settings_from_dict({"routes": {"bücher.example": "127.0.0.1:25"},
                            "routing_domains": {"BÜCHER.example": "münchen.de"},
                            "queue": {"Bücher.Example": {"max_age": "2d"}}})
    assert s.routes == {"xn--bcher-kva.example": "127.0.0.1:25"}
    assert s.routing_domains == {"xn--bcher-kva.example": "xn--mnchen-3ya.de"}
    assert s.queue_settings_for("xn--bcher-kva.example").max_age == 2 * 86400


def test_numeric_durations_are_seconds():
    s = settings_from_dict({"queue": {"retry_interval": 90, "max_age": 3600.5}})
    assert s.queue.retry_interval == 90
    assert s.queue.max_age == 3600.5


# ---- errors ------------------------------------------------------------------

def _error(tmp_path: Path, text: str) -> tuple[Path, str]:
    p = write(tmp_path, text)
    with pytest.raises(ConfigError) as exc:
        load_settings(p)
    return p, str(exc.value)


@pytest.mark.parametrize("text,key,problem", [
    ("[smtp]\nlisten_on = ['127.0.0.1:25']\n", "smtp.listen_on", "unknown key"),
    ("[server]\ndata_dri = 'var'\n", "server.data_dri", "unknown key"),
    ("[smpt]\nlisten = ['127.0.0.1:25']\n", "smpt", "unknown key"),
    ("[queue]\nretry_intervall = '5m'\n", "queue.retry_intervall", "unknown key"),
    ("[queue.\"example.com\"]\nmax_ages = '1d'\n", "max_ages", "unknown key"),
    ("[queue]\nretry_interval = '5x'\n", "queue.retry_interval", "5x"),
    ("[queue]\nmax_retry_interval = 'soon'\n", "queue.max_retry_interval", "soon"),
    ("[queue]\nmax_age = '5'\n", "queue.max_age", "'5'"),
    ("[queue]\nmax_age = true\n", "queue.max_age", "duration"),
    ("[queue.\"example.com\"]\nmax_age = '1 fortnight'\n", "max_age", "fortnight"),
    ("[smtp]\nrelay_hosts = ['10.0.0.0/33']\n", "smtp.relay_hosts", "10.0.0.0/33"),
    ("[smtp]\nrelay_hosts = ['127.0.0.1', 'localhost']\n", "smtp.relay_hosts", "localhost"),
    ("[http]\ntrusted_hosts = ['300.1.1.1']\n", "http.trusted_hosts", "300.1.1.1"),
    ("[smtp]\nlisten = ['localhost']\n", "smtp.listen", "localhost"),
    ("[smtp]\nlisten = ['127.0.0.1:99999']\n", "smtp.listen", "99999"),
    ("[smtp]\nlisten = ['127.0.0.1:']\n", "smtp.listen", "127.0.0.1:"),
    ("[smtp]\nlisten = [':2025']\n", "smtp.listen", ":2025"),
    ("[http]\nlisten = ['127.0.0.1:http']\n", "http.listen", "127.0.0.1:http"),
    ("[smtp]\nlisten = '127.0.0.1:2025'\n", "smtp.listen", "list"),
    ("[smtp]\nmax_message_size = 0\n", "smtp.max_message_size", "greater than 0"),
    ("[routes]\n'example.com' = 'nohost'\n", 'routes."example.com"', "nohost"),
    ("[routes]\n'bad domain' = '127.0.0.1:25'\n", "routes.bad domain", "bad domain"),
    ("[routing_domains]\n'hotmail.com' = 'not a domain'\n", "routing_domains.hotmail.com",
     "not a domain"),
    ("[queue.\"bad domain\"]\nmax_age = '1d'\n", "queue.bad domain", "bad domain"),
    ("[server]\nworkers = -1\n", "server.workers", "greater than or equal to 0"),
    ("[server]\nworkers = 'two'\n", "server.workers", "integer"),
])
def test_config_errors_name_file_key_and_problem(tmp_path, text, key, problem):
    p, msg = _error(tmp_path, text)
    assert str(p) in msg
    assert key in msg
    assert problem in msg


def test_override_error_names_the_queue_domain(tmp_path):
    _, msg = _error(tmp_path, "[queue.\"example.com\"]\nmax_age = 'zz'\n")
    assert "queue" in msg and "example.com" in msg and "max_age" in msg


def test_bad_toml_syntax(tmp_path):
    p, msg = _error(tmp_path, "[smtp\nlisten = [\n")
    assert str(p) in msg
    assert "TOML" in msg


def test_bad_toml_duplicate_key(tmp_path):
    p, msg = _error(tmp_path, "[queue]\nmax_age = '1d'\nmax_age = '2d'\n")
    assert str(p) in msg


def test_missing_file(tmp_path):
    p = tmp_path / "nope" / "sluice.toml"
    with pytest.raises(ConfigError) as exc:
        load_settings(p)
    assert str(p) in str(exc.value)


def test_missing_file_as_string_path(tmp_path):
    p = str(tmp_path / "missing.toml")
    with pytest.raises(ConfigError) as exc:
        load_settings(p)
    assert p in str(exc.value)


def test_settings_from_dict_names_source():
    with pytest.raises(ConfigError) as exc:
        settings_from_dict({"queue": {"retry_interval": "5x"}}, "/etc/sluice.toml")
    assert "/etc/sluice.toml" in str(exc.value)
    assert "queue.retry_interval" in str(exc.value)


def test_several_problems_all_reported(tmp_path):
    _, msg = _error(tmp_path, "[smtp]\nfoo = 1\n[queue]\nmax_age = 'x'\n")
    assert "smtp.foo" in msg
    assert "queue.max_age" in msg


# ---- suspected bugs ----------------------------------------------------------

def test_negative_numeric_duration_rejected(tmp_path):
    """`-5m` is refused as a string, so `-5` as a number must be refused too.

    BUG (src/sluice/config.py `_duration`): numbers bypass any check, so a
    negative retry_interval/max_age is accepted.
    """
    p, msg = _error(tmp_path, "[queue]\nretry_interval = -5\n")
    assert "queue.retry_interval" in msg and str(p) in msg


def test_listen_bare_ipv6_without_port_rejected(tmp_path):
    """`::1` has no port; it must not be read as host ':' port 1.

    BUG (src/sluice/config.py `_host_port`): rpartition(':') on an
    unbracketed IPv6 address yields host ':' and port '1', which passes.
    """
    p, msg = _error(tmp_path, "[smtp]\nlisten = ['::1']\n")
    assert "smtp.listen" in msg and str(p) in msg
