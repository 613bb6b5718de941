"""Client errors as ``{"detail": "<message naming the problem>"}`` with a 4xx status.

Request validation errors are flattened into one readable string (``"body.labels.1.color: …"``)
so every client mistake, whatever raised it, has the same shape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from fastapi import FastAPI, HTTPException, Request, status
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from segassist.server.ingest import IngestError
from segassist.server.storage import UploadTooLargeError

__all__ = ["format_errors", "install_error_handlers", "not_found", "unprocessable"]


def not_found(what: str, ident: str) -> HTTPException:
    """404 naming the missing resource, e.g. ``dataset 'abc' not found``."""
    return HTTPException(status.HTTP_404_NOT_FOUND, f"{what} {ident!r} not found")


def unprocessable(message: str) -> HTTPException:
    """422 with ``message``."""
    return HTTPException(status.HTTP_422_UNPROCESSABLE_CONTENT, message)


def format_errors(errors: Sequence[Any], prefix: str = "") -> str:
    """One line per pydantic error: ``location: message``."""
    lines = []
    for error in errors:
        location = ".".join(str(part) for part in error.get("loc", ()))
        if prefix:
            location = f"{prefix}.{location}" if location else prefix
        lines.append(f"{location}: {error.get('msg', 'invalid')}" if location else error["msg"])
    return "; ".join(lines)


def _without_union_tag(errors: Sequence[Any], body: Any) -> list[Any]:
    """``errors`` with the tag of a discriminated body (``POST /jobs``: one body per ``kind``)
    removed from their locations: pydantic says ``body.pretrain.dataset_id`` where the client
    sent ``body.dataset_id`` with ``"kind": "pretrain"``."""
    tag = body.get("kind") if isinstance(body, dict) else None
    if not isinstance(tag, str):
        return list(errors)
    cleaned = []
    for error in errors:
        loc = tuple(error.get("loc", ()))
        if len(loc) > 1 and loc[0] == "body" and loc[1] == tag and tag not in body:
            error = {**error, "loc": (loc[0], *loc[2:])}
        cleaned.append(error)
    return cleaned


def install_error_handlers(app: FastAPI) -> None:
    """Register the handlers mapping client mistakes to 4xx ``{"detail": str}``."""

    @app.exception_handler(RequestValidationError)
    async def _validation(_request: Request, exc: RequestValidationError) -> JSONResponse:
        return JSONResponse(
            {"detail": format_errors(_without_union_tag(exc.errors(), exc.body))},
            status.HTTP_422_UNPROCESSABLE_CONTENT,
        )

    @app.exception_handler(IngestError)
    async def _ingest(_request: Request, exc: IngestError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status.HTTP_422_UNPROCESSABLE_CONTENT)

    @app.exception_handler(UploadTooLargeError)
    async def _too_large(_request: Request, exc: UploadTooLargeError) -> JSONResponse:
        return JSONResponse({"detail": str(exc)}, status.HTTP_413_CONTENT_TOO_LARGE)
