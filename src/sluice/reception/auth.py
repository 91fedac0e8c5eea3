"""SMTP AUTH credentials: the ``[smtp] auth_file`` and password hashes.

The file has one line per user, ``user:<hash>[:tenant]``, as ``sluice passwd``
prints them; blank lines and ``#`` comments are ignored. Hashes are argon2
(``$argon2id$...``, the default of ``sluice passwd``) or bcrypt (``$2b$...``).
A tenant on a user's line is forced onto every message the user submits.

Checking a password is deliberately slow (that is the point of these
hashes), so ``check`` runs in a thread, and a name that is not in the file
costs the same time as a wrong password, so that a client cannot tell which
names exist.
"""

from __future__ import annotations

import asyncio
import functools
from dataclasses import dataclass
from pathlib import Path

import bcrypt
from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError

from ..config import ConfigError
from ..message import normalize_label

_argon2 = PasswordHasher()


@dataclass(frozen=True, slots=True)
class User:
    name: str
    tenant: str | None


def hash_password(password: str, scheme: str = "argon2") -> str:
    """The hash of ``password`` for an auth_file line (argon2id or bcrypt)."""
    if scheme == "argon2":
        return _argon2.hash(password)
    if scheme == "bcrypt":
        return bcrypt.hashpw(password.encode(), bcrypt.gensalt()).decode()
    raise ValueError(f"unknown scheme {scheme!r}: use argon2 or bcrypt")


def _verify(stored: str, password: str) -> bool:
    if stored.startswith("$argon2"):
        try:
            return _argon2.verify(stored, password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return False
    try:
        return bcrypt.checkpw(password.encode(), stored.encode())
    except ValueError:
        return False


@functools.cache
def _dummy() -> str:
    """Verified when the user is unknown, so that it takes as long as a wrong
    password. Made on first use: hashing takes argon2's memory (64 MiB), which
    a process that never checks a password should not pay at import."""
    return _argon2.hash("not a password of anyone")


class Credentials:
    """The users of ``auth_file``, read once at start."""

    def __init__(self, users: dict[str, tuple[str, User]]) -> None:
        self._users = users

    @classmethod
    def load(cls, path: str) -> Credentials:
        """Read ``path``; ConfigError naming the file, the line and the problem
        (never the hash) for a line that cannot be used."""
        where = f"smtp.auth_file {path}"
        try:
            text = Path(path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigError(f"{where}: cannot read: {getattr(exc, 'strerror', None) or exc}") \
                from None
        users: dict[str, tuple[str, User]] = {}
        for n, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if not line or line.startswith("#"):
                continue
            parts = line.split(":")
            if len(parts) not in (2, 3) or not parts[0] or not parts[1]:
                raise ConfigError(f"{where}, line {n}: expected 'user:hash' or "
                                  "'user:hash:tenant' (see sluice passwd)")
            name, stored = parts[0], parts[1]
            if not (stored.startswith("$argon2") or stored.startswith("$2")):
                raise ConfigError(f"{where}, line {n}: user {name!r}: the password is not "
                                  "an argon2 or bcrypt hash (make one with sluice passwd)")
            tenant = normalize_label(parts[2]) if len(parts) == 3 and parts[2] else None
            if name in users:
                raise ConfigError(f"{where}, line {n}: user {name!r} is listed twice")
            users[name] = (stored, User(name, tenant))
        return cls(users)

    def __len__(self) -> int:
        return len(self._users)

    def check_blocking(self, name: str, password: str) -> User | None:
        entry = self._users.get(name)
        if entry is None:
            _verify(_dummy(), password)
            return None
        stored, user = entry
        return user if _verify(stored, password) else None

    async def check(self, name: str, password: str) -> User | None:
        """The user, when ``password`` is theirs; None otherwise."""
        return await asyncio.to_thread(self.check_blocking, name, password)
