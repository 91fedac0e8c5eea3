"""``/api/admin/suspend/v1``: hold queued mail without bouncing it."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request

from .auth import actor_of
from .bounce import body_of, criteria_of, list_entry
from .deps import services
from .models import ERROR_RESPONSES, ErrorResponse, RuleId, RuleListEntry, SuspendRequest, SuspendResponse

router = APIRouter(prefix="/api/admin/suspend/v1", tags=["suspend"], responses=ERROR_RESPONSES)


@router.post("", response_model=SuspendResponse)
async def create_suspend(req: SuspendRequest, request: Request, svc=Depends(services)) -> dict:
    """Hold matching mail in its queue until the suspension ends."""
    rule = await svc.suspensions.create(criteria_of(req), req.reason, req.expires_at(),
                                        actor=actor_of(request), request=await body_of(request))
    return {"id": rule.id}


@router.get("", response_model=list[RuleListEntry])
async def list_suspends(svc=Depends(services)) -> list[dict]:
    """The suspensions in force."""
    return [list_entry(r) for r in svc.suspensions.active()]


@router.delete("", responses={404: {"model": ErrorResponse}})
async def cancel_suspend(req: RuleId, request: Request, svc=Depends(services)) -> dict:
    """End a suspension: held mail is delivered within seconds."""
    if await svc.suspensions.cancel(str(req.id), actor_of(request),
                                    await body_of(request)) is None:
        raise HTTPException(status_code=404, detail=f"no active suspension with id {req.id}")
    return {"id": str(req.id), "cancelled": True}
