"""Alembic environment: runs on the connection that :func:`segassist.server.db.session.migrate` passes in."""

from __future__ import annotations

from alembic import context
from sqlalchemy import Connection

from segassist.server.db.session import make_engine
from segassist.server.db.tables import Base

config = context.config
target_metadata = Base.metadata


def _run(connection: Connection) -> None:
    context.configure(
        connection=connection,
        target_metadata=target_metadata,
        render_as_batch=connection.dialect.name == "sqlite",
        compare_type=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_offline() -> None:
    """Emit SQL to stdout (``alembic upgrade --sql``)."""
    context.configure(
        url=config.get_main_option("sqlalchemy.url"),
        target_metadata=target_metadata,
        literal_binds=True,
    )
    with context.begin_transaction():
        context.run_migrations()


def run_migrations_online() -> None:
    """Upgrade through the given connection, or one opened from ``sqlalchemy.url``."""
    connection = config.attributes.get("connection")
    if connection is not None:
        _run(connection)
        return
    url = config.get_main_option("sqlalchemy.url")
    if url is None:
        raise RuntimeError("sqlalchemy.url is not set in the Alembic configuration")
    with make_engine(url).connect() as fresh:
        _run(fresh)
        fresh.commit()


if context.is_offline_mode():
    run_migrations_offline()
else:
    run_migrations_online()
