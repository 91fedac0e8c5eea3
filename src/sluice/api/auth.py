"""Who may call the API: trusted hosts, or a bearer token from tokens_file."""

from __future__ import annotations

import hmac
from pathlib import Path

from fastapi import HTTPException, Request

from ..config import HttpSettings, IPNetwork, host_in


def read_tokens(path: str | None) -> list[str]:
    """One token per line; blank lines and ``#`` comments ignored."""
    if not path:
        return []
    tokens = []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            tokens.append(line)
    return tokens


class Access:
    def __init__(self, settings: HttpSettings) -> None:
        self.trusted: list[IPNetwork] = settings.trusted_networks()
        self.tokens = [t.encode() for t in read_tokens(settings.tokens_file)]

    def _token_ok(self, header: str | None) -> bool:
        if not header or not header.lower().startswith("bearer "):
            return False
        given = header[7:].strip().encode()
        ok = False
        for token in self.tokens:  # no early exit: compare with every token
            ok |= hmac.compare_digest(given, token)
        return ok

    def __call__(self, request: Request) -> None:
        """FastAPI dependency: raises 401 unless the caller may use the API."""
        host = request.client.host if request.client else None
        if host_in(host, self.trusted) or self._token_ok(request.headers.get("authorization")):
            return
        raise HTTPException(status_code=401, detail="not authorized: a trusted host or a "
                            "valid 'Authorization: Bearer <token>' is required",
                            headers={"WWW-Authenticate": "Bearer"})
