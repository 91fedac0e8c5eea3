"""Liveness and the queue summary behind ``kcli queue-summary``."""

from __future__ import annotations

from fastapi import APIRouter, Depends

from .deps import services
from .models import ERROR_RESPONSES

router = APIRouter(tags=["status"], responses=ERROR_RESPONSES)


@router.get("/api/check-liveness/v1")
async def liveness() -> dict:
    return {"status": "ok"}


@router.get("/metrics.json")
async def metrics_json(svc=Depends(services)) -> dict:
    """Scheduled queue sizes and per-site ready queue figures."""
    scheduled = svc.spool.index.counts()
    return {"scheduled": scheduled, "ready": await svc.manager.delivery.figures()}
