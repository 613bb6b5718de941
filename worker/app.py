"""The worker's Celery app: configuration from :func:`segassist.server.queue.celery_config`, one task per
job kind (:mod:`segassist.worker.tasks`).

Run it with ``python -m celery -A segassist.worker.app worker -Q segassist,segassist-prediction --concurrency 1``. The app is built
on first access of ``segassist.worker.app.app`` (not at import), so the environment (``SEGASSIST_*``) can be
set first. Worker start-up migrates the database; once the worker consumes, a
:class:`segassist.worker.recovery.RecoverySweeper` re-enqueues jobs a dead worker took with it.
"""

from __future__ import annotations

import logging
from functools import lru_cache
from typing import Any

from celery import Celery, signals

from segassist.models.runtime._atomic import set_file_modes
from segassist.server.db import make_engine, migrate
from segassist.server.queue import celery_config
from segassist.server.settings import get_settings
from segassist.worker.recovery import RecoverySweeper

__all__ = ["TASK_NAMES", "get_app"]

logger = logging.getLogger(__name__)

TASK_NAMES = (
    "segassist.pretrain",
    "segassist.finetune",
    "segassist.predict",
    "segassist.assist",
    "segassist.features",
)
"""Names the API enqueues by (``segassist.server.queue.task_name``)."""

_sweepers: list[RecoverySweeper] = []


@lru_cache(maxsize=1)
def get_app() -> Celery:
    """The worker app for :func:`segassist.server.settings.get_settings` (built once per process).

    Its configuration is the API's (late acknowledgement, prefetch 1, reject on worker lost,
    soft/hard time limits, Redis visibility timeout above the hard limit) plus the tasks.
    """
    app = Celery("segassist-worker", include=["segassist.worker.tasks"])
    app.conf.update(celery_config(get_settings()))
    return app


def __getattr__(name: str) -> Any:
    # ``celery -A segassist.worker.app`` looks up ``segassist.worker.app.app``: build it lazily (PEP 562).
    if name == "app":
        return get_app()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@signals.worker_init.connect
def _file_modes(**_: Any) -> None:
    """Stored files get the configured permissions (``SEGASSIST_FILE_MODE``/``DIR_MODE``)."""
    settings = get_settings()
    set_file_modes(settings.file_mode, settings.dir_mode)


@signals.worker_init.connect
def _migrate_database(**_: Any) -> None:
    """Bring the schema to head before consuming (API and worker may start together)."""
    migrate(get_settings().database_url)


@signals.worker_process_init.connect
def _fresh_connections(**_: Any) -> None:
    """Pool processes must not share the parent's database connections."""
    make_engine(get_settings().database_url).dispose(close=False)


@signals.worker_process_init.connect
def _warm_up(**_: Any) -> None:
    """Import the ML stack before the first job, not while a user waits for it.

    The first optimiser step of a process imports ``torch._dynamo`` (~5 s on 2 cores), and
    torch + MONAI take seconds more: paid here once per pool process instead of in the first
    few-shot fit after labels are submitted.
    """
    import torch._dynamo  # noqa: F401

    import segassist.worker.pipelines  # noqa: F401


@signals.worker_ready.connect
def _start_recovery(sender: Any = None, **_: Any) -> None:
    """Re-enqueue jobs lost with a dead worker, now and periodically."""
    sweeper = RecoverySweeper(get_app(), get_settings())
    sweeper.start()
    _sweepers.append(sweeper)


@signals.worker_shutdown.connect
def _stop_recovery(**_: Any) -> None:
    while _sweepers:
        _sweepers.pop().stop()
