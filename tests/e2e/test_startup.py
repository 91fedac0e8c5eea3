"""Starting up: listeners that are taken, files that are missing, the EHLO
name; every start-up error names the config file and the key."""

from __future__ import annotations

import re
import smtplib
import socket
import subprocess
from pathlib import Path

from sluice.config import default_hostname

from ..support import BIN, Serve, free_port, wait_for


def start_and_fail(config: Path, cwd: Path | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([BIN / "sluice", "serve", "--config", str(config)], cwd=cwd,
                          capture_output=True, text=True, timeout=60)


def test_second_instance_on_the_same_smtp_port_fails_and_the_first_keeps_all_mail(
        make_serve, tmp_path):
    first = make_serve().start()
    other = tmp_path / "other"
    other.mkdir()
    second = Serve(other)
    second.config.write_text(second.config.read_text().replace(
        f"127.0.0.1:{second.smtp_port}", f"127.0.0.1:{first.smtp_port}"))
    r = start_and_fail(second.config)
    assert r.returncode == 1
    assert (f"{second.config}: smtp.listen 127.0.0.1:{first.smtp_port}: address in use"
            in r.stderr), r.stderr
    for i in range(20):
        first.send([f"u{i}@example.com"])
    wait_for(lambda: len(first.records("Reception")) == 20)
    assert not (other / "var" / "logs").exists()


def test_http_port_held_by_another_program_fails_at_start(make_serve):
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        srv = make_serve(http_port=port)
        r = start_and_fail(srv.config)
    assert r.returncode == 1
    assert f"{srv.config}: http.listen 127.0.0.1:{port}: address in use" in r.stderr


def test_missing_tokens_file_names_the_file_and_the_key(make_serve, tmp_path):
    srv = make_serve(extra="")
    text = srv.config.read_text().replace(
        "[http]\n", f'[http]\ntokens_file = "{tmp_path}/no-such-tokens"\n')
    srv.config.write_text(text)
    r = start_and_fail(srv.config)
    assert r.returncode == 2
    assert str(srv.config) in r.stderr
    assert "http.tokens_file" in r.stderr and "no-such-tokens" in r.stderr
    assert "No such file or directory" in r.stderr


def test_default_ehlo_name_is_the_machine_name_never_localhost(tmp_path, sink):
    name = default_hostname()
    assert name and not name.startswith("localhost")
    smtp_port, http_port = free_port(), free_port()
    config = tmp_path / "sluice.toml"
    config.write_text(f"""
[server]
data_dir = "{tmp_path}/var"
workers = 0
[smtp]
listen = ["127.0.0.1:{smtp_port}"]
[http]
listen = ["127.0.0.1:{http_port}"]
[routes]
"example.com" = "127.0.0.1:{sink.port}"
""")
    log = tmp_path / "serve.log"
    with open(log, "w") as out:
        proc = subprocess.Popen([BIN / "sluice", "serve", "--config", str(config)],
                                stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for(lambda: "SMTP on" in log.read_text())
        with smtplib.SMTP("127.0.0.1", smtp_port) as s:
            code, banner = s.ehlo("client.example")
            assert code == 250
            assert s.ehlo_resp.split(b"\n")[0].decode() == name
            s.sendmail("me@example.org", ["you@example.com"], b"Subject: x\r\n\r\nhi\r\n")
        # a name without a dot is warned about at start (Postfix's practice)
        wait_for(lambda: sink.received())
        if "." not in name:
            assert re.search(rf"hostname '{re.escape(name)}' is not a fully qualified",
                             log.read_text())
    finally:
        proc.terminate()
        proc.wait(timeout=15)
