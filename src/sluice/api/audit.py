"""``GET /api/admin/audit/v1``: who did what, newest first."""

from __future__ import annotations

import datetime as dt

import orjson
from fastapi import APIRouter, Depends, Query

from .deps import services
from .models import ERROR_RESPONSES, AuditEntry

router = APIRouter(tags=["audit"], responses=ERROR_RESPONSES)


@router.get("/api/admin/audit/v1", response_model=list[AuditEntry])
async def list_audit(since: dt.datetime | None = Query(
                         default=None, description="RFC 3339: only entries from then on."),
                     limit: int = Query(default=100, ge=1, le=10000),
                     svc=Depends(services)) -> list[dict]:
    """Every admin write (rule created, cancelled, applied, restored), newest first."""
    if since is not None and since.tzinfo is None:
        since = since.replace(tzinfo=dt.timezone.utc)
    rows = await svc.spool.list_audit(since.timestamp() if since else None, limit)
    return [orjson.loads(r) for r in rows]
