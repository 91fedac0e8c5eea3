"""``sluice passwd USER``: a ``user:hash[:tenant]`` line for ``[smtp] auth_file``."""

from __future__ import annotations

import getpass
import sys

from ..reception.auth import hash_password

_FORBIDDEN = set(":\r\n") | {" ", "\t"}


def _read_password() -> str | None:
    if sys.stdin.isatty():
        first = getpass.getpass("Password: ")
        if getpass.getpass("Again: ") != first:
            print("sluice passwd: the passwords differ", file=sys.stderr)
            return None
        return first
    line = sys.stdin.readline()
    return line[:-1] if line.endswith("\n") else line


def run(user: str, tenant: str | None, scheme: str) -> int:
    if not user or _FORBIDDEN & set(user) or not user.isprintable():
        print(f"sluice passwd: {user!r} cannot be a user name (no ':' or white space)",
              file=sys.stderr)
        return 2
    if tenant is not None and (not tenant.strip() or ":" in tenant or "\n" in tenant):
        print("sluice passwd: --tenant must be a non-empty name without ':'", file=sys.stderr)
        return 2
    password = _read_password()
    if password is None:
        return 1
    if not password:
        print("sluice passwd: empty password", file=sys.stderr)
        return 2
    line = f"{user}:{hash_password(password, scheme)}"
    print(line + (f":{tenant.strip()}" if tenant else ""))
    return 0
