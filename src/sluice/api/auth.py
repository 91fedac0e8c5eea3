"""Who may call the API, and who they are: trusted hosts, or a bearer token
from tokens_file.

The caller's identity (``audit.Actor``) is kept on the request for the audit
of admin writes: ``host:<ip>`` for a trusted host, ``token:<name>`` for a
token (named on its ``name:token`` line, else by the first 8 hex digits of
its SHA-256).
"""

from __future__ import annotations

import hashlib
import hmac
import re
from pathlib import Path

from fastapi import HTTPException, Request

from ..audit import Actor
from ..config import HttpSettings, IPNetwork, host_in

_NAMED = re.compile(r"^([A-Za-z0-9_.@-]{1,64}):(.+)$")


def read_tokens(path: str | None) -> dict[str, str]:
    """Token -> name. One token per line, ``name:token`` or a bare token;
    blank lines and ``#`` comments ignored."""
    if not path:
        return {}
    tokens = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        named = _NAMED.match(line)
        if named:
            tokens[named.group(2).strip()] = named.group(1)
        else:
            tokens[line] = hashlib.sha256(line.encode()).hexdigest()[:8]
    return tokens


class Access:
    def __init__(self, settings: HttpSettings) -> None:
        self.trusted: list[IPNetwork] = settings.trusted_networks()
        self.tokens = [(t.encode(), name) for t, name in read_tokens(settings.tokens_file).items()]

    def _token_name(self, header: str | None) -> str | None:
        if not header or not header.lower().startswith("bearer "):
            return None
        given = header[7:].strip().encode()
        found = None
        for token, name in self.tokens:  # no early exit: compare with every token
            if hmac.compare_digest(given, token):
                found = name
        return found

    def __call__(self, request: Request) -> None:
        """FastAPI dependency: raises 401 unless the caller may use the API;
        sets ``request.state.actor``."""
        host = request.client.host if request.client else None
        name = self._token_name(request.headers.get("authorization"))
        if name is not None:
            request.state.actor = Actor(f"token:{name}", host)
            return
        if host_in(host, self.trusted):
            request.state.actor = Actor(f"host:{host}", host)
            return
        raise HTTPException(status_code=401, detail="not authorized: a trusted host or a "
                            "valid 'Authorization: Bearer <token>' is required",
                            headers={"WWW-Authenticate": "Bearer"})


def actor_of(request: Request) -> Actor:
    return getattr(request.state, "actor", Actor("unknown", None))
