"""Engines, sessions and schema migration for SQLite and PostgreSQL.

The worker uses the same functions as the API::

    from segassist.server.db.session import migrate, session_factory
    migrate(settings.database_url)
    SessionLocal = session_factory(settings)
    with SessionLocal() as session, session.begin():
        job = session.get(Job, job_id)
"""

from __future__ import annotations

import fcntl
import logging
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from alembic import command
from alembic.config import Config
from sqlalchemy import Engine, create_engine, event, text
from sqlalchemy.engine import make_url
from sqlalchemy.orm import Session, sessionmaker

if TYPE_CHECKING:
    from segassist.server.settings import Settings

__all__ = ["alembic_config", "make_engine", "migrate", "session_factory"]

logger = logging.getLogger(__name__)

MIGRATIONS_DIR = Path(__file__).parent / "migrations"
_PG_MIGRATION_LOCK = 0x5E6A5 + 1  # arbitrary application-wide advisory lock key


def _sqlite_pragmas(dbapi_connection: Any, _record: Any) -> None:
    # API and worker share the file: WAL lets readers run during a write, busy_timeout waits for
    # the writer instead of failing with "database is locked".
    cursor = dbapi_connection.cursor()
    cursor.execute("PRAGMA foreign_keys=ON")
    cursor.execute("PRAGMA journal_mode=WAL")
    cursor.execute("PRAGMA busy_timeout=30000")
    cursor.close()


@lru_cache(maxsize=8)
def make_engine(url: str) -> Engine:
    """A pooled engine for ``url`` (one per URL per process).

    SQLite files get their parent folder created, foreign keys on, WAL and a busy timeout.
    PostgreSQL URLs ``postgresql://`` are routed to psycopg 3.
    """
    sa_url = make_url(url)
    if sa_url.drivername in ("postgresql", "postgres"):
        sa_url = sa_url.set(drivername="postgresql+psycopg")
    if sa_url.get_backend_name() == "sqlite":
        if sa_url.database and sa_url.database != ":memory:":
            Path(sa_url.database).parent.mkdir(parents=True, exist_ok=True)
        engine = create_engine(sa_url, connect_args={"check_same_thread": False, "timeout": 30})
        event.listen(engine, "connect", _sqlite_pragmas)
        return engine
    return create_engine(sa_url, pool_pre_ping=True)


def session_factory(settings: Settings) -> sessionmaker[Session]:
    """Session maker bound to ``settings.database_url`` (``expire_on_commit=False``)."""
    return sessionmaker(make_engine(settings.database_url), expire_on_commit=False)


def alembic_config(url: str) -> Config:
    """Alembic configuration built in code (no ``alembic.ini`` needed)."""
    config = Config()
    config.set_main_option("script_location", str(MIGRATIONS_DIR))
    config.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return config


@contextmanager
def _migration_lock(engine: Engine) -> Iterator[Any]:
    """Serialise concurrent ``migrate`` calls across processes; yields the connection to use.

    SQLite takes its file lock *before* connecting: a connection's first act is
    ``PRAGMA journal_mode=WAL``, which on a new database file needs an exclusive lock, and SQLite
    answers "database is locked" at once (no busy wait) when two connections ask together.
    """
    if engine.dialect.name == "sqlite" and engine.url.database not in (None, "", ":memory:"):
        lock_path = Path(f"{engine.url.database}.migrate.lock")
        with lock_path.open("a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                with engine.connect() as connection:
                    yield connection
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)
        return
    with engine.connect() as connection:
        if engine.dialect.name == "postgresql":
            connection.execute(text("SELECT pg_advisory_lock(:key)"), {"key": _PG_MIGRATION_LOCK})
            connection.commit()
            try:
                yield connection
            finally:
                connection.execute(
                    text("SELECT pg_advisory_unlock(:key)"), {"key": _PG_MIGRATION_LOCK}
                )
                connection.commit()
        else:
            yield connection


def migrate(url: str) -> None:
    """Upgrade the database at ``url`` to the newest schema (Alembic ``upgrade head``).

    Safe to call from several processes at once (API and worker start together): PostgreSQL
    takes an advisory lock, SQLite a file lock next to the database file.
    """
    engine = make_engine(url)
    config = alembic_config(url)
    with _migration_lock(engine) as connection:
        config.attributes["connection"] = connection
        command.upgrade(config, "head")
        connection.commit()
    logger.info("database schema at head (%s)", engine.url.render_as_string(hide_password=True))
