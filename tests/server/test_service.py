"""Start-up behaviour: concurrent migrations, settings that fail fast, token, health."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from alembic.migration import MigrationContext
from alembic.script import ScriptDirectory
from fastapi.testclient import TestClient
from pydantic import ValidationError

from segassist.server.db.session import alembic_config, make_engine, migrate
from segassist.server.main import create_app
from segassist.server.settings import DEFAULT_API_TOKEN, Settings


def test_api_and_worker_starting_together_migrate_once(database_url: str) -> None:
    with ThreadPoolExecutor(max_workers=3) as pool:
        list(pool.map(migrate, [database_url] * 3))
    with make_engine(database_url).connect() as connection:
        current = MigrationContext.configure(connection).get_current_heads()
    heads = ScriptDirectory.from_config(alembic_config(database_url)).get_heads()
    assert len(heads) == 1, f"migrations must form one line, found heads {heads}"
    assert list(current) == heads
    make_engine(database_url).dispose()


def test_settings_refuse_the_placeholder_token_in_production(tmp_path: Path) -> None:
    with pytest.raises(ValidationError, match="placeholder"):
        Settings(data_dir=tmp_path, environment="production", api_token=DEFAULT_API_TOKEN)
    with pytest.raises(ValidationError, match="task_hard_time_limit"):
        Settings(data_dir=tmp_path, task_soft_time_limit=10, task_hard_time_limit=5)
    defaults = Settings(data_dir=tmp_path)
    assert defaults.database_url == f"sqlite:///{tmp_path.resolve() / 'segassist.db'}"


def test_token_is_required_when_configured(settings: Settings) -> None:
    guarded = settings.model_copy(update={"api_token": "s3cret"})
    with TestClient(create_app(guarded)) as client:
        assert client.get("/api/v1/health").json()["status"] == "ok"
        assert client.get("/api/v1/datasets").status_code == 401
        authorised = client.get("/api/v1/datasets", headers={"Authorization": "Bearer s3cret"})
        assert authorised.status_code == 200
    make_engine(settings.database_url).dispose()
