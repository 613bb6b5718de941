"""A real worker and the API on the embedded broker, started from different working directories."""

from __future__ import annotations

import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from segassist.server.queue import make_celery
from segassist.server.settings import Settings
from tests.worker.conftest import JOB_DEADLINE_SECONDS, Worker


@pytest.mark.parametrize("settings", ["embedded"], indirect=True)
def test_worker_started_elsewhere_answers_broadcasts_and_leaves_no_files(
    settings: Settings,
    start_worker: Callable[[], Worker],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Broadcasts (``celery inspect``, revocations) route through the transport's control folder:
    with kombu's default ``./control`` a worker and an API started from two folders never
    saw each other's bindings, and both left a ``control/`` folder behind."""
    worker_cwd, api_cwd = tmp_path / "worker-cwd", tmp_path / "api-cwd"
    for folder in (worker_cwd, api_cwd):
        folder.mkdir()
    monkeypatch.chdir(worker_cwd)
    worker = start_worker()
    monkeypatch.chdir(api_cwd)

    celery = make_celery(settings)
    replies: list[dict[str, Any]] = []
    end = time.monotonic() + JOB_DEADLINE_SECONDS
    while not replies:
        if not worker.alive() or time.monotonic() > end:
            pytest.fail(f"no ping reply from the worker; its log:\n{worker.log()}")
        replies = celery.control.ping(timeout=1.0) or []

    assert len(replies) == 1 and next(iter(replies[0].values())) == {"ok": "pong"}
    assert sorted(p.name for p in worker_cwd.rglob("*")) == []
    assert sorted(p.name for p in api_cwd.rglob("*")) == []
    assert any((settings.broker_dir / "control").glob("*.exchange"))
