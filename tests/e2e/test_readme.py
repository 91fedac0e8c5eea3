"""The README's examples run as written.

Each test takes the code blocks straight from README.md and runs them in a
fresh directory where ``.venv`` points at this environment. The one thing
changed is the ports: the README's 2025 (SMTP), 8000 (HTTP) and 2526 (sink)
become free ones, so the tests can run beside anything else.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from pathlib import Path

import httpx

from ..support import free_port, wait_for, wait_port, wait_smtp

README = Path(__file__).resolve().parents[2] / "README.md"
VENV = Path(sys.executable).parent.parent


def block(after_heading: str, lang: str, index: int = 0) -> str:
    """The ``index``-th ```lang block of the README section ``after_heading``."""
    text = README.read_text()
    section = text.split(f"## {after_heading}\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(rf"```{lang}\n(.*?)```", section, re.S)
    return blocks[index]


def commands(console: str) -> list[str]:
    """The commands of a console block: ``$ `` lines, with their heredocs."""
    out: list[str] = []
    for line in console.splitlines():
        if line.startswith("$ "):
            out.append(line[2:].split("  #")[0].rstrip())
        elif out:
            out[-1] += "\n" + line
    return out


class Ports:
    def __init__(self) -> None:
        self.map = {"2025": str(free_port()), "8000": str(free_port()), "2526": str(free_port())}

    def __call__(self, text: str) -> str:
        return re.sub(r"\b(2025|8000|2526)\b", lambda m: self.map[m.group(1)], text)

    @property
    def http(self) -> int:
        return int(self.map["8000"])

    @property
    def smtp(self) -> int:
        return int(self.map["2025"])


def workdir(tmp_path: Path) -> Path:
    (tmp_path / ".venv").symlink_to(VENV)
    return tmp_path


def sh(command: str, cwd: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", command], cwd=cwd, capture_output=True, text=True,
                          timeout=60, env={**os.environ, **(env or {})})


def serve(args: str, cwd: Path) -> subprocess.Popen:
    return subprocess.Popen(["bash", "-c", f"exec {args}"], cwd=cwd,
                            stdout=open(cwd / "serve.log", "ab"), stderr=subprocess.STDOUT)


def stop(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    return proc.wait(timeout=20)


def test_configuration_example_starts_as_written(tmp_path):
    cwd = workdir(tmp_path)
    ports = Ports()
    (cwd / "sluice.toml").write_text(ports(block("Configuration", "toml")))
    make_tokens = re.search(r"`(echo '[^`]+' > tokens)`", README.read_text()).group(1)
    assert sh(make_tokens, cwd).returncode == 0
    proc = serve(".venv/bin/sluice serve --config sluice.toml", cwd)
    try:
        wait_port(ports.http, timeout=30)
        wait_smtp(ports.smtp)
        token = (cwd / "tokens").read_text().strip()
        r = httpx.get(f"http://127.0.0.1:{ports.http}/metrics.json",
                      headers={"Authorization": f"Bearer {token}"})
        assert r.status_code == 200
    finally:
        assert stop(proc) == 0, (cwd / "serve.log").read_text()
    assert (cwd / "var" / "node_id").exists()


def test_quickstart_first_mail_to_the_local_sink(tmp_path):
    cwd = workdir(tmp_path)
    ports = Ports()
    sink_cmd, write_config, serve_cmd = commands(ports(block("Quickstart", "console", 2)))
    send, summary, tail = commands(ports(block("Quickstart", "console", 1)))
    sink = serve(sink_cmd.removesuffix("&").strip(), cwd)
    try:
        wait_smtp(int(ports.map["2526"]))
        assert sh(write_config, cwd).returncode == 0
        with open(cwd / "sluice.toml", "a") as fh:  # the ports, as said above
            fh.write(f'\n[smtp]\nlisten = ["127.0.0.1:{ports.smtp}"]\n'
                     f'[http]\nlisten = ["127.0.0.1:{ports.http}"]\n')
        proc = serve(serve_cmd, cwd)
        try:
            wait_smtp(ports.smtp)
            assert sh(send, cwd).returncode == 0
            env = {"KUMO_KCLI_ENDPOINT": f"http://127.0.0.1:{ports.http}"}
            r = sh(summary, cwd, env)
            assert r.returncode == 0 and "QUEUE" in r.stdout, r.stderr
            wait_for(lambda: '"type":"Delivery"' in sh(tail, cwd).stdout, timeout=30)
        finally:
            assert stop(proc) == 0
    finally:
        stop(sink)


def test_undoing_a_mistake_runs_as_written(make_serve):
    srv = make_serve(routes={"example.com": f"127.0.0.1:{free_port()}"},
                     queue='retry_interval = "1h"').start()
    srv.send(["a@example.com", "b@example.com", "c@example.com"], headers={"X-Tenant": "acme"})
    srv.send(["d@example.com", "e@example.com"], headers={"X-Campaign": "Back to school"})
    wait_for(lambda: sum(srv.scheduled().values()) == 5)
    env = {"PATH": f"{VENV / 'bin'}:{os.environ['PATH']}", "KUMO_KCLI_ENDPOINT": srv.endpoint}
    walk, grace = (block("Undoing a mistake", "console", i) for i in (0, 1))

    out = sh("\n".join(commands(walk)), srv.dir, env)
    assert out.returncode == 0, out.stderr
    assert "TOTAL" in out.stdout and "bounce-restore" in out.stdout
    assert srv.scheduled() == {"acme@example.com": 3, "Back to school:@example.com": 2}
    assert len(srv.records("AdminBounce")) == 3 and len(srv.records("AdminRestore")) == 3

    out = sh("\n".join(commands(grace)), srv.dir, env)
    assert out.returncode == 0, out.stderr
    assert "pending" in out.stdout
    wait_for(lambda: len(srv.records("AdminBounce")) == 5)  # the applied one bounced them
    audit = srv.api("GET", "/api/admin/audit/v1").json()
    assert [e["action"] for e in audit[:3]] == ["bounce-apply", "bounce-create", "bounce-cancel"]
