"""The FastAPI application factory.

Run with ``uvicorn --factory server.main:create_app`` (settings from ``SEGASSIST_*``), or build
an app for tests with ``create_app(Settings(...))``. Startup upgrades the database schema.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import APIRouter, Depends, FastAPI
from fastapi.concurrency import run_in_threadpool
from fastapi.middleware.cors import CORSMiddleware

from server.db.session import migrate, session_factory
from server.deps import require_token
from server.errors import install_error_handlers
from server.monailabel import monailabel_routers
from server.queue import make_celery
from server.routes import assist, datasets, health, images, jobs, labels, models, predictions
from server.settings import Settings, get_settings
from server.storage import Storage

__all__ = ["API_PREFIX", "create_app"]

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v1"


def create_app(settings: Settings | None = None) -> FastAPI:
    """Build the API for ``settings`` (default: :func:`get_settings`)."""
    settings = settings or get_settings()

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        await run_in_threadpool(migrate, settings.database_url)
        yield

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
    protected = APIRouter(dependencies=[Depends(require_token)])
    for module in (datasets, assist, images, labels, jobs, models, predictions):
        protected.include_router(module.router)
    api.include_router(protected)
    app.include_router(api)
    for router in monailabel_routers():  # 3D Slicer / OHIF: at the root and per dataset
        app.include_router(router)
    if settings.cors_origin_list:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origin_list,
            allow_methods=["*"],
            allow_headers=["*"],
        )
    return app
