"""Load and consistency checks for crash tests: many concurrent senders, and
the log-side check that no acknowledged message is missing and none has two
different terminal records."""

from __future__ import annotations

import re
import smtplib
import threading
import time

TERMINAL = {"Delivery", "Bounce", "Expiration", "AdminBounce"}
QUEUED_AS = re.compile(rb"queued as ([0-9a-f]{32})")


class Blaster:
    """Concurrent SMTP sessions sending one-recipient messages until told to stop."""

    def __init__(self, port: int, sessions: int, domain: str = "example.com") -> None:
        self.port = port
        self.domain = domain
        self.acked: list[str] = []
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, args=(k,), daemon=True)
                         for k in range(sessions)]

    def start(self) -> Blaster:
        for t in self._threads:
            t.start()
        return self

    def stop(self) -> list[str]:
        self._stop.set()
        for t in self._threads:
            t.join(15)
        return self.acked

    def _run(self, k: int) -> None:
        i = 0
        while not self._stop.is_set():
            try:
                with smtplib.SMTP("127.0.0.1", self.port, timeout=10) as s:
                    s.ehlo("blaster.test")
                    while not self._stop.is_set():
                        i += 1
                        s.mail("blaster@example.org")
                        s.rcpt(f"s{k}m{i}@{self.domain}")
                        code, msg = s.data(b"Subject: crash test\r\n\r\n" + (b"x" * 98 + b"\r\n") * 20)
                        if code == 250:
                            m = QUEUED_AS.search(msg)
                            assert m, msg
                            with self._lock:
                                self.acked.append(m.group(1).decode())
            except (OSError, smtplib.SMTPException):
                time.sleep(0.05)  # the server is down: try again


def terminal_by_id(srv) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for r in srv.records():  # json.loads of every line: a torn record fails here
        if r["type"] in TERMINAL:
            out.setdefault(r["id"], set()).add(r["type"])
    return out


def assert_consistent(srv, acked: list[str]) -> dict[str, set[str]]:
    received = {r["id"] for r in srv.records("Reception")}
    missing = [i for i in acked if i not in received]
    assert not missing, f"{len(missing)} acknowledged messages have no Reception record"
    terminal = terminal_by_id(srv)
    both = {i: t for i, t in terminal.items() if len(t) > 1}
    assert not both, f"messages with two different terminal records: {both}"
    return terminal
