"""``/audit``: the log of write requests (admins only)."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query
from pydantic import AwareDatetime, BeforeValidator

from segassist.server.audit import query_events
from segassist.server.auth import require_role
from segassist.server.db.tables import Role
from segassist.server.deps import SessionDep
from segassist.server.schemas import AuditEventPublic

__all__ = ["router"]

_RFC3339 = re.compile(
    r"^\d{4}-\d{2}-\d{2}[Tt]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})$", re.ASCII
)


def _rfc3339(value: Any) -> Any:
    """Refuse what pydantic would also read as a time but is no RFC 3339 date-time (``0.5``)."""
    if isinstance(value, str) and not _RFC3339.match(value):
        raise ValueError(f"{value!r} is not an RFC 3339 date-time such as 2026-12-01T12:00:00Z")
    return value


router = APIRouter(
    prefix="/audit", tags=["audit"], dependencies=[Depends(require_role(Role.admin))]
)


@router.get("")
def list_audit_events(
    session: SessionDep,
    user: Annotated[str | None, Query(max_length=64, description="user name")] = None,
    since: Annotated[
        AwareDatetime | None,
        BeforeValidator(_rfc3339),
        Query(description="RFC 3339 date-time with offset; events at or after it"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
) -> list[AuditEventPublic]:
    """Recorded writes, newest first: who, what, when, from which address, with what status."""
    return [AuditEventPublic.model_validate(e) for e in query_events(session, user, since, limit)]
