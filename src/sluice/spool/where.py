"""Per-message criteria (``MessageFilter``) as SQL: the same matcher as
``message.glob_match``, behind a LIKE that SQLite runs first."""

from __future__ import annotations

from typing import Any

from .base import MessageFilter


def _like(pattern: str) -> str | None:
    """A LIKE pattern that selects at least every ASCII value the glob
    ``pattern`` matches (None for a pattern that is not ASCII)."""
    if not pattern.isascii():
        return None
    out, i = [], 0
    while i < len(pattern):
        c = pattern[i]
        if c == "[":  # a character class: any one character, the glob decides
            start = i + 2 if pattern[i + 1:i + 2] == "!" else i + 1
            end = pattern.find("]", start + 1)  # a "]" first in a class is literal
            if end > 0:
                out.append("_")
                i = end + 1
                continue
        out.append({"*": "%", "?": "_", "%": "\\%", "_": "\\_", "\\": "\\\\"}.get(c, c))
        i += 1
    return "".join(out)


def _glob_sql(column: str, pattern: str, params: list[Any]) -> str:
    """The glob check of ``column``: SQLite's own LIKE (case-insensitive for
    ASCII) first, for ASCII values, so that the exact matcher (a Python
    function) only runs for the rows LIKE lets through and for non-ASCII ones."""
    like = _like(pattern)
    params.append(pattern)
    if like is None:
        return f" AND sluice_glob(?, {column})"
    params.insert(len(params) - 1, like)
    return (f" AND (length(CAST({column} AS BLOB)) != length({column})"
            f" OR {column} LIKE ? ESCAPE '\\') AND sluice_glob(?, {column})")


def where_sql(f: MessageFilter | None) -> tuple[str, list[Any]]:
    """SQL for per-message criteria: `` AND ...`` and its parameters."""
    if f is None:
        return "", []
    sql, params = "", []
    if f.sender is not None:
        sql += _glob_sql("sender", f.sender, params)
    if f.recipient is not None:
        sql += _glob_sql("recipient", f.recipient, params)
    if f.created_before is not None:
        sql += " AND created < ?"
        params.append(f.created_before)
    return sql, params
