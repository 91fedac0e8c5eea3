"""Stand-ins for a dispatcher's surroundings in unit tests: one next hop
for every domain, outcomes that stop every message before it is sent."""

from __future__ import annotations

from sluice.delivery.dispatch import Outcomes
from sluice.delivery.routes import NextHop
from sluice.spool import Stored


class OneHop:
    """Every domain's next hop is the same host: one site."""

    async def next_hop(self, domain: str, routing_domain: str | None = None) -> NextHop:
        return NextHop(site="mx.example:25", hosts=(("127.0.0.1", 9),))


class StopEverything(Outcomes):
    """Stops each message before a connection is opened (a rule would)."""

    def __init__(self, s) -> None:
        self.settings = s
        self.stopped: list[str] = []

    def may_send_data(self, msg: Stored) -> bool:
        return False

    async def dispose_stopped(self, msg: Stored) -> None:
        self.stopped.append(msg.id)


def stored(n: int, domain: str) -> Stored:
    return Stored(id=f"m{n}", queue=domain, sender="s@example.org", recipient=f"r@{domain}",
                  body_id=n, size=10, created=0.0, due=0.0, attempts=0)
