"""``/api/admin/suspend/v1``: hold queued mail without bouncing it."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Request

from .auth import actor_of
from .bounce import body_of, criteria_of, list_entry
from .cluster_rules import before_change, cancel_everywhere, spread
from .deps import services
from .models import ERROR_RESPONSES, ErrorResponse, RuleId, RuleListEntry, SuspendRequest, SuspendResponse

router = APIRouter(prefix="/api/admin/suspend/v1", tags=["suspend"], responses=ERROR_RESPONSES)


@router.post("", response_model=SuspendResponse, response_model_exclude_none=True)
async def create_suspend(req: SuspendRequest, request: Request, svc=Depends(services)) -> dict:
    """Hold matching mail in its queue until the suspension ends."""
    await before_change(svc)
    actor = actor_of(request)
    rule = await svc.suspensions.create(criteria_of(req), req.reason, req.expires_at(),
                                        actor=actor, request=await body_of(request))
    nodes = await spread(svc, lambda: svc.cluster_rules.created(rule),
                         lambda: svc.suspensions.cancel(rule.id, actor,
                                                        action="cancel-for-cluster"))
    return {"id": rule.id, "nodes": nodes}


@router.get("", response_model=list[RuleListEntry])
async def list_suspends(svc=Depends(services)) -> list[dict]:
    """The suspensions in force."""
    return [list_entry(r) for r in svc.suspensions.active()]


@router.delete("", responses={404: {"model": ErrorResponse}})
async def cancel_suspend(req: RuleId, request: Request, svc=Depends(services)) -> dict:
    """End a suspension: held mail is delivered within seconds."""
    await before_change(svc)
    if await svc.suspensions.cancel(str(req.id), actor_of(request),
                                    await body_of(request)) is None:
        raise HTTPException(status_code=404, detail=f"no active suspension with id {req.id}")
    out: dict = {"id": str(req.id), "cancelled": True}
    if svc.cluster_rules is not None:
        out["nodes"] = await cancel_everywhere(svc, "suspend", str(req.id))
    return out
