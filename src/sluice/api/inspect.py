"""``GET /api/admin/inspect-message/v1``: one queued message, optionally with its body."""

from __future__ import annotations

from fastapi import APIRouter, Depends, HTTPException, Query

from ..logs import rfc3339
from .deps import services
from .models import ERROR_RESPONSES, ErrorResponse, InspectResponse

router = APIRouter(tags=["inspect"], responses=ERROR_RESPONSES)


@router.get("/api/admin/inspect-message/v1", response_model=InspectResponse,
            response_model_exclude_none=True, responses={404: {"model": ErrorResponse}})
async def inspect_message(id: str = Query(min_length=1, max_length=64, description="Message id"),
                          want_body: bool = False, svc=Depends(services)) -> dict:
    """Where a queued message stands: its queue, attempts and next due time."""
    msg = await svc.spool.get_message(id)
    if msg is None:
        raise HTTPException(status_code=404, detail=f"no queued message with id {id}")
    out = {"id": msg.id, "sender": msg.sender, "recipient": msg.recipient, "queue": msg.queue,
           "meta": svc.spool.index.parts(msg.queue).meta(),
           "created": rfc3339(msg.created), "attempts": msg.attempts, "due": rfc3339(msg.due)}
    if want_body:
        try:
            out["body"] = (await svc.spool.load_body(msg.body_id)).decode("utf-8", "replace")
        except KeyError:
            raise HTTPException(status_code=404, detail=f"no queued message with id {id}") from None
    return out
