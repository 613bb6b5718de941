"""The audit log: one ``audit_events`` row per write request, written once its status is known.

:class:`AuditMiddleware` is a plain ASGI middleware: it lets the request through untouched
(uploads keep streaming, no database connection is held meanwhile), remembers the response's
status code as it is sent, and then records who (the :class:`~segassist.server.auth.Principal` the role
dependency left in the request's state), what (method, route template, concrete path, path
parameters), when and from where, in a short session of its own. Refused writes (401, 403, 4xx)
are recorded too; a write that crashed is recorded as 500.
"""

from __future__ import annotations

import asyncio
import logging
import re
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from typing import Any, cast
from urllib.parse import unquote

from sqlalchemy import CursorResult, delete, select
from sqlalchemy.orm import Session, sessionmaker
from starlette.concurrency import run_in_threadpool
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from segassist.server.db.tables import AuditEvent

__all__ = [
    "WRITE_METHODS",
    "AuditMiddleware",
    "keep_audit_retention",
    "prune_events",
    "prune_for_retention",
    "query_events",
    "record_event",
    "route_template",
]

logger = logging.getLogger(__name__)

WRITE_METHODS = frozenset({"POST", "PUT", "PATCH", "DELETE"})
_DAY_SECONDS = 24 * 3600
_PARAM = re.compile(r"^[A-Za-z0-9_.-]{1,128}$")


def record_event(factory: sessionmaker[Session], event: AuditEvent) -> None:
    """Store ``event`` in a transaction of its own."""
    with factory() as session, session.begin():
        session.add(event)


def query_events(
    session: Session, user: str | None, since: datetime | None, limit: int
) -> Sequence[AuditEvent]:
    """The newest ``limit`` events, of user name ``user`` and at or after ``since`` if given."""
    query = select(AuditEvent).order_by(AuditEvent.at.desc(), AuditEvent.id.desc()).limit(limit)
    if user is not None:
        query = query.where(AuditEvent.user_name == user)
    if since is not None:
        query = query.where(AuditEvent.at >= since)
    return session.scalars(query).all()


def prune_events(factory: sessionmaker[Session], before: datetime, by: str) -> int:
    """Delete the events recorded before ``before``; the deletion itself is recorded as an event
    (``DELETE audit``, user name ``by``, the count and the cut-off in ``object_ids``).

    Returns:
        How many events were deleted.
    """
    with factory() as session, session.begin():
        result = session.execute(delete(AuditEvent).where(AuditEvent.at < before))
        deleted = cast(CursorResult[Any], result).rowcount
        session.add(
            AuditEvent(
                user_name=by[:64],
                method="DELETE",
                path="audit",
                status_code=200,
                object_ids={"deleted": str(deleted), "before": before.isoformat()},
            )
        )
    return int(deleted)


async def keep_audit_retention(factory: sessionmaker[Session], days: int) -> None:
    """Forever: a day after the last pruning, prune events older than ``days`` days again (the
    API's lifespan prunes once before it serves, then runs this as a task and cancels it at
    shutdown)."""
    while True:
        await asyncio.sleep(_DAY_SECONDS)
        await prune_for_retention(factory, days)


async def prune_for_retention(factory: sessionmaker[Session], days: int) -> None:
    """Prune events older than ``days`` days as ``retention``; a failure is logged, not raised."""
    before = datetime.now(UTC) - timedelta(days=days)
    try:
        deleted = await run_in_threadpool(prune_events, factory, before, "retention")
        logger.info("audit retention: deleted %d events before %s", deleted, before)
    except Exception:
        logger.exception("audit retention: could not prune events before %s", before)


def route_template(path: str, params: dict[str, Any]) -> str:
    """``path`` with the segment holding each path parameter's value replaced by ``{name}``, in
    the parameters' order: ``/api/v1/jobs/3f…/cancel`` with ``{"job_id": "3f…"}`` →
    ``/api/v1/jobs/{job_id}/cancel``."""
    segments = path.split("/")
    start = 0
    for name, value in params.items():
        for i in range(start, len(segments)):
            if unquote(segments[i]) == str(value):
                segments[i] = f"{{{name}}}"
                start = i + 1
                break
    return "/".join(segments)


def _event(scope: Scope, status_code: int) -> AuditEvent:
    principal = scope.get("state", {}).get("principal")
    client = scope.get("client")
    params: dict[str, Any] = scope.get("path_params") or {}
    matched = scope.get("route") is not None
    return AuditEvent(
        user_id=getattr(principal, "user_id", None),
        user_name=getattr(principal, "name", None),
        role=None if principal is None else str(principal.role),
        method=scope["method"],
        route=route_template(scope["path"], params)[:255] if matched else None,
        path=scope["path"][:2048],
        status_code=status_code,
        client=None if not client else str(client[0])[:64],
        object_ids={k: str(v) for k, v in params.items() if _PARAM.match(str(v))},
    )


class AuditMiddleware:
    """Record every POST, PUT, PATCH and DELETE of the wrapped app (module docstring)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] not in WRITE_METHODS:
            await self.app(scope, receive, send)
            return
        scope.setdefault("state", {})
        status_code = 500

        async def remember_status(message: Message) -> None:
            nonlocal status_code
            if message["type"] == "http.response.start":
                status_code = int(message["status"])
            await send(message)

        try:
            await self.app(scope, receive, remember_status)
        finally:
            factory = scope["app"].state.session_factory
            try:
                await run_in_threadpool(record_event, factory, _event(scope, status_code))
            except Exception:
                logger.exception("could not record %s %s in the audit log", *_what(scope))


def _what(scope: Scope) -> tuple[str, str]:
    return scope["method"], scope["path"]
