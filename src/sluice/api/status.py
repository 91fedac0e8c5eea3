"""Liveness, the queue summary behind ``kcli queue-summary``, and the
cluster's views (``?cluster=true``, ``kcli cluster-status``)."""

from __future__ import annotations

from collections import Counter
from typing import Any

from fastapi import APIRouter, Depends, HTTPException

from ..cluster.link import ClusterLink, ClusterUnavailable
from ..logs import rfc3339
from .deps import services
from .models import ERROR_RESPONSES, ErrorResponse

router = APIRouter(tags=["status"], responses=ERROR_RESPONSES)

_COUNTS = ("delivered", "failed", "connections", "queued")  # what adds up over nodes


@router.get("/api/check-liveness/v1")
async def liveness() -> dict:
    return {"status": "ok"}


def _cluster(svc: Any) -> ClusterLink:
    if svc.cluster is None:
        raise HTTPException(status_code=400, detail="cluster: this node is not in a cluster "
                            "([cluster] redis_url is not set)")
    return svc.cluster


async def _live_nodes(svc: Any) -> list[dict[str, Any]]:
    try:
        return await _cluster(svc).nodes()
    except ClusterUnavailable as exc:
        raise HTTPException(status_code=503, detail=f"cluster: {exc}") from None


@router.get("/metrics.json", responses={400: {"model": ErrorResponse},
                                        503: {"model": ErrorResponse}})
async def metrics_json(cluster: bool = False, svc=Depends(services)) -> dict:
    """Scheduled queue sizes and per-site ready queue figures; with
    ``cluster=true``, summed over every live node of the cluster (each
    node's own figures under ``nodes``, as it last published them)."""
    if not cluster:
        return await svc.figures()
    nodes = await _live_nodes(svc)
    scheduled: Counter[str] = Counter()
    ready: dict[str, Counter[str]] = {}
    for node in nodes:
        scheduled.update(node["figures"]["scheduled"])
        for site, figures in node["figures"]["ready"].items():
            ready.setdefault(site, Counter()).update(
                {k: figures.get(k, 0) for k in _COUNTS})
    return {"scheduled": dict(scheduled), "ready": {s: dict(c) for s, c in ready.items()},
            "nodes": {n["name"]: n["figures"] for n in nodes}}


@router.get("/api/admin/cluster/v1/status", responses={400: {"model": ErrorResponse},
                                                      503: {"model": ErrorResponse}})
async def cluster_status(svc=Depends(services)) -> dict:
    """The live nodes of this node's cluster: name, id, HTTP endpoint, when
    each was last seen, and its queued totals."""
    nodes = await _live_nodes(svc)
    return {"nodes": [{
        "name": n["name"], "nodeid": n["nodeid"], "http": n["http"],
        "started": rfc3339(n["started"]), "last_seen": rfc3339(n["last_seen"]),
        "seconds_since": n["seconds_since"],
        "scheduled": sum(n["figures"]["scheduled"].values()),
        "ready": sum(s.get("queued", 0) for s in n["figures"]["ready"].values()),
    } for n in nodes]}
