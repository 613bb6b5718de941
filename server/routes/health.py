"""``/health``: database and broker reachability."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response, status
from sqlalchemy import text

from segassist.server.deps import CeleryDep, SessionDep
from segassist.server.queue import check_broker
from segassist.server.schemas import HealthPublic

__all__ = ["router"]

logger = logging.getLogger(__name__)

router = APIRouter(tags=["health"])


@router.get("/health")
def health(session: SessionDep, celery: CeleryDep, response: Response) -> HealthPublic:
    """``{"status": "ok", …}`` when the database and the broker answer; 503 otherwise."""
    checks = {"database": "ok", "broker": "ok"}
    try:
        session.execute(text("SELECT 1"))
    except Exception as exc:
        logger.warning("database check failed: %s", exc)
        checks["database"] = f"error: {exc}"
    try:
        check_broker(celery)
    except Exception as exc:
        logger.warning("broker check failed: %s", exc)
        checks["broker"] = f"error: {exc}"
    healthy = all(v == "ok" for v in checks.values())
    if not healthy:
        response.status_code = status.HTTP_503_SERVICE_UNAVAILABLE
    return HealthPublic(status="ok" if healthy else "degraded", **checks)
