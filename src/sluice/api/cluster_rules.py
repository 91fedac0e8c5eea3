"""What the rule endpoints add in a cluster (``cluster.rules``): Redis must
answer before a change (503 otherwise, nothing done), and the answer says
which nodes confirmed it."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import HTTPException

from ..cluster.link import ClusterUnavailable


async def before_change(svc: Any) -> None:
    """503 unless the cluster's Redis answers (a node without a cluster: nothing)."""
    if svc.cluster_rules is None:
        return
    try:
        await svc.cluster_rules.check()
    except ClusterUnavailable as exc:
        raise HTTPException(status_code=503, detail=f"cluster: {exc}; nothing was changed") \
            from None


async def spread(svc: Any, publish: Callable[[], Awaitable[dict[str, str]]],
                 undo: Callable[[], Awaitable[Any]]) -> dict[str, str] | None:
    """Publish a change made here; if Redis fails now, ``undo`` it and answer 503."""
    if svc.cluster_rules is None:
        return None
    try:
        return await publish()
    except ClusterUnavailable as exc:
        await undo()
        raise HTTPException(status_code=503, detail=f"cluster: {exc}; the change was undone") \
            from None


async def publish_or_503(svc: Any, publish: Callable[[], Awaitable[dict[str, str]]]
                         ) -> dict[str, str]:
    """Publish a change made here that cannot be undone (a cancel, an apply,
    a restore): if Redis fails now, the answer says it was made on this node
    only (503)."""
    try:
        return await publish()
    except ClusterUnavailable as exc:
        raise HTTPException(status_code=503, detail=f"cluster: done on this node only: "
                            f"{exc}") from None


async def cancel_everywhere(svc: Any, kind: str, rule_id: str) -> dict[str, str]:
    """Publish a cancel made here (see ``publish_or_503``)."""
    return await publish_or_503(svc, lambda: svc.cluster_rules.cancelled(kind, rule_id))


async def cluster_counts(svc: Any) -> dict[str, dict[str, Any]] | None:
    """Each live node's published bounce counts, by node (None outside a
    cluster, or while Redis does not answer: the list shows this node's)."""
    if svc.cluster is None:
        return None
    try:
        nodes = await svc.cluster.nodes()
    except ClusterUnavailable:
        return None
    return {n["name"]: n["figures"].get("bounced", {}) for n in nodes}


def summed(rule_id: str, published: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """A rule's counts over the nodes: per queue and in total, and each node's."""
    per_node = {node: counts.get(rule_id, {"bounced": {}, "total_bounced": 0})
                for node, counts in published.items()}
    bounced: dict[str, int] = {}
    for counts in per_node.values():
        for queue, n in counts["bounced"].items():
            bounced[queue] = bounced.get(queue, 0) + n
    return {"bounced": bounced, "total_bounced": sum(c["total_bounced"] for c in per_node.values()),
            "nodes": per_node}
