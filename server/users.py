"""User management on the database of the configured settings (``segassist users …``).

Tokens are made here and returned once (:func:`add_user`, :func:`rotate_token`); only their
SHA-256 is stored (:func:`segassist.server.auth.hash_token`).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

from sqlalchemy import select
from sqlalchemy.orm import Session

from segassist.server.auth import ANONYMOUS_USER, API_TOKEN_USER, hash_token, new_token
from segassist.server.db.tables import Role, User, utcnow

__all__ = ["UserError", "add_user", "list_users", "revoke_user", "rotate_token", "set_role"]

_NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
_RESERVED = {API_TOKEN_USER, ANONYMOUS_USER}


class UserError(ValueError):
    """A user management request that cannot be done (the message says why)."""


def _get(session: Session, name: str) -> User:
    user = session.scalar(select(User).where(User.name == name))
    if user is None:
        raise UserError(f"no user named {name!r}")
    return user


def add_user(session: Session, name: str, role: Role | str) -> tuple[User, str]:
    """Create user ``name`` with ``role``; returns the row and its token (shown only now)."""
    if not _NAME.match(name) or name in _RESERVED:
        raise UserError(
            f"user name {name!r} must be 1-64 letters, digits, '_', '.', '@' or '-' "
            f"and not {sorted(_RESERVED)}"
        )
    if session.scalar(select(User.id).where(User.name == name)) is not None:
        raise UserError(f"user {name!r} already exists")
    token = new_token()
    user = User(name=name, role=Role(role), token_hash=hash_token(token))
    session.add(user)
    session.commit()
    return user, token


def list_users(session: Session) -> Sequence[User]:
    """Every user, revoked ones included, oldest first."""
    return session.scalars(select(User).order_by(User.created_at, User.name)).all()


def revoke_user(session: Session, name: str) -> User:
    """Make ``name``'s token stop working (the row stays, for the audit log)."""
    user = _get(session, name)
    if user.revoked_at is None:
        user.revoked_at = utcnow()
        session.commit()
    return user


def set_role(session: Session, name: str, role: Role | str) -> User:
    """Give ``name`` the role ``role`` (effective from the next request)."""
    user = _get(session, name)
    user.role = Role(role)
    session.commit()
    return user


def rotate_token(session: Session, name: str) -> tuple[User, str]:
    """Give ``name`` a new token (the old one stops working; a revoked user is restored)."""
    user = _get(session, name)
    token = new_token()
    user.token_hash = hash_token(token)
    user.revoked_at = None
    session.commit()
    return user, token
