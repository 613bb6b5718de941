"""The FastAPI application factory.

Run with ``uvicorn --factory segassist.server.main:create_app`` (settings from ``SEGASSIST_*``), or build
an app for tests with ``create_app(Settings(...))``. Startup upgrades the database schema.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware

from segassist.models.runtime._atomic import set_file_modes
from segassist.server.audit import AuditMiddleware, keep_audit_retention, prune_for_retention
from segassist.server.auth import require_role
from segassist.server.db.session import migrate, session_factory
from segassist.server.db.tables import Role
from segassist.server.errors import install_error_handlers
from segassist.server.methods import AllowHeaderMiddleware
from segassist.server.monailabel import monailabel_routers
from segassist.server.openapi import install_openapi
from segassist.server.page import install_page
from segassist.server.queue import make_celery
from segassist.server.routes import (
    assist,
    audit,
    datasets,
    dicomweb,
    health,
    images,
    jobs,
    labels,
    models,
    predictions,
)
from segassist.server.settings import Settings, get_settings
from segassist.server.storage import Storage

__all__ = ["API_PREFIX", "create_app"]

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v1"


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for ``settings`` (default: :func:`get_settings`)."""
    settings = settings or get_settings()
    set_file_modes(settings.file_mode, settings.dir_mode)

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(migrate, settings.database_url)
        await run_in_threadpool(app.state.storage.remove_stale_uploads)
        await run_in_threadpool(app.state.storage.remove_stale_staging)
        if settings.audit_retention_days is None:
            yield
            return
        # pruned before the first request is served, then daily
        await prune_for_retention(app.state.session_factory, settings.audit_retention_days)
        retention = asyncio.create_task(
            keep_audit_retention(app.state.session_factory, settings.audit_retention_days)
        )
        try:
            yield
        finally:
            retention.cancel()

    app = FastAPI(
        title="segassist",
        summary="Self-hosted annotation assistant: few-shot segmentation of medical volumes",
        version="0.1.0",
        openapi_url=f"{API_PREFIX}/openapi.json",
        lifespan=lifespan,
    )
    app.state.settings = settings
    app.state.storage = Storage(settings.data_dir)
    app.state.session_factory = session_factory(settings)
    app.state.celery = make_celery(settings)
    install_error_handlers(app)

    api = APIRouter(prefix=API_PREFIX)
    api.include_router(health.router)
    # Reading needs a viewer; writes declare more on their route (segassist.server.auth.route_role).
    protected = APIRouter(dependencies=[Depends(require_role(Role.viewer))])
    # dicomweb before predictions: its segmentation.dcm route precedes the generic file route.
    for module in (datasets, assist, images, labels, jobs, models, dicomweb, predictions, audit):
        protected.include_router(module.router)
    api.include_router(protected)
    app.include_router(api)
    for router in monailabel_routers():  # 3D Slicer / OHIF: at the root and per dataset
        app.include_router(router)
    install_page(app)  # the browser annotator at "/"
    app.add_middleware(AuditMiddleware)
    app.add_middleware(AllowHeaderMiddleware)
    install_openapi(app, settings)
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    return app
