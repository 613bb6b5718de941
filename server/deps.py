"""FastAPI dependencies as ``Annotated`` aliases: settings, DB session, storage, Celery (the
caller and its role: :mod:`segassist.server.auth`)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Annotated

from celery import Celery
from fastapi import Depends, Path, Query, Request
from sqlalchemy.orm import Session, sessionmaker

from segassist.server.db.tables import ID_PATTERN
from segassist.server.settings import Settings
from segassist.server.storage import Storage

__all__ = [
    "CeleryDep",
    "IdPath",
    "IdQuery",
    "SessionDep",
    "SettingsDep",
    "StorageDep",
]


def get_app_settings(request: Request) -> Settings:
    """Settings the app was built with (``create_app(settings)``)."""
    settings: Settings = request.app.state.settings
    return settings


def get_session(request: Request) -> Iterator[Session]:
    """One session per request; the route commits what it wants kept."""
    factory: sessionmaker[Session] = request.app.state.session_factory
    with factory() as session:
        yield session


def get_storage(request: Request) -> Storage:
    """The datastore of the app's ``data_dir``."""
    storage: Storage = request.app.state.storage
    return storage


def get_celery(request: Request) -> Celery:
    """The client-only Celery app used to enqueue jobs."""
    celery: Celery = request.app.state.celery
    return celery


SettingsDep = Annotated[Settings, Depends(get_app_settings)]
SessionDep = Annotated[Session, Depends(get_session)]
StorageDep = Annotated[Storage, Depends(get_storage)]
CeleryDep = Annotated[Celery, Depends(get_celery)]

IdPath = Annotated[str, Path(pattern=ID_PATTERN, description="32 lowercase hex digits")]
"""An id in the URL path. Ids end up in file paths: anything but :data:`ID_PATTERN` (``..``,
``x/y``) is a 422 before any lookup or file access."""
IdQuery = Annotated[str | None, Query(pattern=ID_PATTERN, description="32 lowercase hex digits")]
"""An optional id in the query string (a filter), checked like :data:`IdPath`."""
