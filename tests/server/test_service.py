"""Start-up behaviour: concurrent migrations, settings that fail fast, token, health."""

from __future__ import annotations

import fcntl
import threading
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


def test_sqlite_migration_connects_only_under_its_file_lock(tmp_path: Path) -> None:
    # A new SQLite file's first connection switches it to WAL, which needs an exclusive lock
    # that SQLite refuses at once ("database is locked") to a second connection doing the same.
    database = tmp_path / "segassist.db"
    url = f"sqlite:///{database}"
    with Path(f"{database}.migrate.lock").open("a") as lock_file:
        fcntl.flock(lock_file, fcntl.LOCK_EX)  # another process migrating
        waiting = threading.Thread(target=migrate, args=(url,))
        waiting.start()
        waiting.join(timeout=1.0)
        assert waiting.is_alive(), "migrate must wait for the lock"
        assert not database.exists(), "migrate connected before taking the lock"
        fcntl.flock(lock_file, fcntl.LOCK_UN)
    waiting.join()
    with make_engine(url).connect() as connection:
        assert MigrationContext.configure(connection).get_current_heads()
    make_engine(url).dispose()


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
