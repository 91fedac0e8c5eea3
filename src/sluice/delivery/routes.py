"""Next hop of a queue: a static route from ``[routes]`` or the MX hosts.

The key is the routing domain when one is set, else the recipient domain.
The site name identifies the ready queue: messages to different domains that
share the same hosts share connections and the per-site connection cap.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..config import split_host_port
from .mx import MxResolver


@dataclass(frozen=True, slots=True)
class NextHop:
    site: str
    hosts: tuple[tuple[str, int], ...]


class Router:
    def __init__(self, routes: dict[str, str], mx: MxResolver) -> None:
        self._routes = {domain: split_host_port(hp) for domain, hp in routes.items()}
        self._mx = mx

    async def next_hop(self, domain: str, routing_domain: str | None = None) -> NextHop:
        """Raises mx.DnsFailure when the hosts cannot be found."""
        key = routing_domain or domain
        static = self._routes.get(key)
        if static is not None:
            return NextHop(site=f"{static[0]}:{static[1]}", hosts=(static,))
        hosts = await self._mx.hosts(key)
        return NextHop(site="(" + "|".join(sorted(hosts)) + ")", hosts=tuple((h, 25) for h in hosts))
