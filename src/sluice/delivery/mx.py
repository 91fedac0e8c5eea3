"""MX lookup with an A/AAAA fallback (RFC 5321 section 5.1) and a TTL cache.

Outcomes: a list of host names in preference order (equal preferences
shuffled), a permanent failure (NXDOMAIN, null MX) or a transient one
(timeouts, SERVFAIL). Host names are resolved to addresses when connecting.
"""

from __future__ import annotations

import random
import time
from typing import Any

import dns.asyncresolver
import dns.exception
import dns.nameserver
import dns.resolver

from ..config import split_host_port
from ..logs import Response


class DnsFailure(Exception):
    """Next hop cannot be found; ``response`` is what gets logged."""

    def __init__(self, response: Response, permanent: bool) -> None:
        super().__init__(response.text)
        self.response = response
        self.permanent = permanent


class MxResolver:
    """Resolves a domain to its mail hosts; ``resolver`` may be a fake in tests."""

    NEGATIVE_TTL = 60.0
    MAX_TTL = 3600.0

    def __init__(self, resolver: Any | None = None, nameservers: list[str] | None = None) -> None:
        self._resolver = resolver
        self._nameservers = nameservers or []
        self._cache: dict[str, tuple[float, list[str] | DnsFailure]] = {}

    def _get_resolver(self) -> Any:
        if self._resolver is None:
            if self._nameservers:
                resolver = dns.asyncresolver.Resolver(configure=False)
                resolver.nameservers = [
                    dns.nameserver.Do53Nameserver(*split_host_port(ns)) for ns in self._nameservers]
                resolver.lifetime = 5.0
            else:
                resolver = dns.asyncresolver.Resolver()
            self._resolver = resolver
        return self._resolver

    async def hosts(self, domain: str) -> list[str]:
        now = time.monotonic()
        hit = self._cache.get(domain)
        if hit and hit[0] > now:
            result = hit[1]
        else:
            result, ttl = await self._lookup(domain)
            self._cache[domain] = (now + ttl, result)
        if isinstance(result, DnsFailure):
            raise result
        return result

    async def _lookup(self, domain: str) -> tuple[list[str] | DnsFailure, float]:
        try:
            answer = await self._get_resolver().resolve(domain, "MX")
        except dns.resolver.NXDOMAIN:
            return DnsFailure(Response(550, f"domain {domain} does not exist (NXDOMAIN)",
                                       (5, 1, 2)), permanent=True), self.NEGATIVE_TTL
        except dns.resolver.NoAnswer:
            # No MX: the domain itself is the implicit MX (A/AAAA fallback).
            return [domain], self.NEGATIVE_TTL
        except (dns.exception.Timeout, dns.resolver.NoNameservers, dns.exception.DNSException) as exc:
            return DnsFailure(Response(451, f"MX lookup for {domain} failed: {exc}", (4, 4, 3)),
                              permanent=False), 5.0
        records = sorted(((r.preference, str(r.exchange).rstrip(".")) for r in answer),
                         key=lambda x: x[0])
        if len(records) == 1 and records[0][1] in ("", "."):
            return DnsFailure(Response(556, f"domain {domain} accepts no mail (null MX)",
                                       (5, 1, 10)), permanent=True), self.MAX_TTL
        by_pref: dict[int, list[str]] = {}
        for pref, host in records:
            if host:
                by_pref.setdefault(pref, []).append(host)
        hosts: list[str] = []
        for pref in sorted(by_pref):
            group = by_pref[pref]
            random.shuffle(group)
            hosts.extend(group)
        ttl = min(float(getattr(answer.rrset, "ttl", 300) or 300), self.MAX_TTL)
        return hosts, ttl
