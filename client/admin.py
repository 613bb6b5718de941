"""``segassist users …`` and ``segassist audit``: administration on the service's own database.

Like ``serve``, these run where the service runs and use its settings (``SEGASSIST_*``, or
``--data-dir`` for the embedded service), opening the database directly: no token is needed to
make the first one. ``server`` is imported lazily, so the client-only install still parses.
"""

from __future__ import annotations

import argparse
import getpass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from sqlalchemy.orm import Session, sessionmaker

__all__ = ["add_admin_parsers", "cmd_audit", "cmd_users"]

ROLES = ("viewer", "annotator", "admin")
console = Console()
err_console = Console(stderr=True)


def _factory(args: argparse.Namespace) -> sessionmaker[Session]:
    """Sessions on the configured database, migrated to the current schema."""
    from segassist.server.db.session import migrate, session_factory
    from segassist.server.settings import Settings

    settings = Settings(data_dir=args.data_dir) if args.data_dir else Settings()
    migrate(settings.database_url)
    return session_factory(settings)


def _session(args: argparse.Namespace) -> Session:
    """A session on the configured database, migrated to the current schema."""
    return _factory(args)()


def _when(value: datetime | None) -> str:
    return "" if value is None else value.isoformat(timespec="seconds")


def cmd_users(args: argparse.Namespace) -> int:
    """Add, list, revoke users, change a role or a token; a new token is printed once."""
    from segassist.server import users

    with _session(args) as session:
        try:
            if args.action == "list":
                table = Table("name", "role", "created", "revoked")
                for user in users.list_users(session):
                    table.add_row(
                        user.name, str(user.role), _when(user.created_at), _when(user.revoked_at)
                    )
                console.print(table)
                return 0
            if args.action in ("add", "rotate"):
                if args.action == "add":
                    user, token = users.add_user(session, args.name, args.role)
                else:
                    user, token = users.rotate_token(session, args.name)
                err_console.print(
                    f"token of {user.name} ({user.role}); it is shown only now, keep it safe:"
                )
                console.print(token, highlight=False, soft_wrap=True)
                return 0
            if args.action == "revoke":
                user = users.revoke_user(session, args.name)
                err_console.print(f"{user.name}: revoked at {_when(user.revoked_at)}")
                return 0
            user = users.set_role(session, args.name, args.role)
            err_console.print(f"{user.name}: role {user.role}")
            return 0
        except users.UserError as exc:
            err_console.print(f"[red]error:[/red] {exc}", highlight=False)
            return 2


def cmd_audit(args: argparse.Namespace) -> int:
    """Print the newest recorded writes (who, what, when, from where, status), or with
    ``--prune DAYS`` delete those older than that (recorded as an event of its own)."""
    from segassist.server.audit import prune_events, query_events
    from segassist.server.schemas import AuditEventPublic

    if args.prune is not None:
        before = datetime.now(UTC) - timedelta(days=args.prune)
        deleted = prune_events(_factory(args), before, f"cli:{getpass.getuser()}")
        err_console.print(
            f"deleted {deleted} audit events recorded before {before:%Y-%m-%d %H:%M} UTC"
        )
        return 0
    with _session(args) as session:
        events = [
            AuditEventPublic.model_validate(e).model_dump(mode="json")
            for e in query_events(session, args.user, args.since, args.limit)
        ]
    if args.json:
        console.print_json(data=events)
        return 0
    table = Table("at", "user", "role", "method", "path", "status", "client")
    for event in events:
        row: dict[str, Any] = event
        table.add_row(
            str(row["at"]),
            str(row["user_name"] or ""),
            str(row["role"] or ""),
            row["method"],
            row["path"],
            str(row["status_code"]),
            str(row["client"] or ""),
        )
    console.print(table)
    return 0


def _since(text: str) -> datetime:
    """An ISO 8601 time; without an offset, UTC (the log's clock)."""
    value = datetime.fromisoformat(text)
    return value if value.tzinfo is not None else value.replace(tzinfo=UTC)


def _positive_days(text: str) -> int:
    days = int(text)
    if days < 1:
        raise argparse.ArgumentTypeError(f"DAYS must be at least 1, got {days}")
    return days


def _add_data_dir(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--data-dir",
        type=Path,
        help="the embedded service's data directory (default: SEGASSIST_DATA_DIR and the other "
        "SEGASSIST_* settings)",
    )


def add_admin_parsers(sub: Any) -> None:
    """Add ``users`` and ``audit`` to the ``segassist`` sub-command parsers ``sub``."""
    users = sub.add_parser("users", help="manage users and their roles (on the service's database)")
    actions = users.add_subparsers(dest="action", required=True, metavar="ACTION")
    p = actions.add_parser("add", help="create a user and print its token (shown once)")
    p.add_argument("name", metavar="NAME")
    p.add_argument("--role", choices=ROLES, required=True)
    _add_data_dir(p)
    p = actions.add_parser("list", help="list users")
    _add_data_dir(p)
    p = actions.add_parser("revoke", help="make a user's token stop working")
    p.add_argument("name", metavar="NAME")
    _add_data_dir(p)
    p = actions.add_parser("set-role", help="change a user's role")
    p.add_argument("name", metavar="NAME")
    p.add_argument("role", choices=ROLES, metavar="ROLE")
    _add_data_dir(p)
    p = actions.add_parser("rotate", help="give a user a new token (printed once)")
    p.add_argument("name", metavar="NAME")
    _add_data_dir(p)
    users.set_defaults(func=cmd_users)

    p = sub.add_parser("audit", help="show the audit log of writes (on the service's database)")
    p.add_argument("--user", metavar="NAME", help="only this user's requests")
    p.add_argument("--since", type=_since, metavar="ISO8601", help="UTC unless an offset is given")
    p.add_argument("--limit", type=int, default=50)
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    p.add_argument(
        "--prune",
        type=_positive_days,
        metavar="DAYS",
        help="delete the events older than DAYS days instead of showing any",
    )
    _add_data_dir(p)
    p.set_defaults(func=cmd_audit)
