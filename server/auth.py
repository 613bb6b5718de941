"""Who is calling and what they may do: bearer tokens, users, roles.

A request carries ``Authorization: Bearer <token>``. The token is either the shared
``SEGASSIST_API_TOKEN`` (an admin: the deployment's bootstrap credential) or a user's token,
looked up by its SHA-256 (:func:`hash_token`). Routes declare the least role they need once, with
``dependencies=[require_role(Role.annotator)]`` on the route or its router (:func:`route_role`
reads it back); the dependency answers 401 without a valid token and 403 with too weak a role.

Authentication is off (every caller is an anonymous admin) only while the service is a local,
single-user one: ``environment="development"``, no ``api_token`` and no user in the database. In
``production`` every route that declares a role requires a token, even before the first user
exists (``segassist users add`` makes one).
"""

from __future__ import annotations

import hashlib
import secrets
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import cache
from typing import Annotated, Any

from fastapi import Depends, HTTPException, Request, status
from fastapi.routing import APIRoute, RouteContext
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import exists, select
from sqlalchemy.orm import Session, sessionmaker

from segassist.server.db.tables import Role, User
from segassist.server.settings import Settings

__all__ = [
    "ANONYMOUS_USER",
    "API_TOKEN_USER",
    "Credentials",
    "CurrentPrincipal",
    "Principal",
    "authentication_required",
    "authorise",
    "find_principal",
    "hash_token",
    "new_token",
    "require_role",
    "route_role",
]

API_TOKEN_USER = "api-token"
"""``Principal.name`` of a caller holding the shared ``SEGASSIST_API_TOKEN``."""
ANONYMOUS_USER = "anonymous"
"""``Principal.name`` of every caller while authentication is off."""

_bearer = HTTPBearer(auto_error=False, description="a user's token or SEGASSIST_API_TOKEN")


@dataclass(frozen=True)
class Principal:
    """The caller of a request: a user (``user_id`` set), the shared token or anonymous."""

    user_id: str | None
    name: str
    role: Role

    def may(self, role: Role) -> bool:
        """Whether this caller's role includes ``role``."""
        return self.role.rank >= role.rank


def new_token() -> str:
    """A fresh user token: 256 random bits, URL-safe (``sa_`` + 43 characters)."""
    return "sa_" + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """SHA-256 of ``token`` (64 hex digits), the form in which user tokens are stored.

    A plain, unsalted hash suffices because the tokens are 256-bit random strings, not
    passwords: nothing smaller than the whole space can be searched, so the slow, salted hashes
    made for guessable passwords (bcrypt, Argon2) would add ~0.1 s to every request and protect
    nothing more. Being deterministic, it is also the lookup key (a unique index).
    """
    return hashlib.sha256(token.encode()).hexdigest()


def _same(a: str, b: str) -> bool:
    return secrets.compare_digest(a.encode(), b.encode())


def authentication_required(settings: Settings, session: Session) -> bool:
    """Whether callers must present a token: in production, with an API token, or once any
    user exists (revoked ones included: revoking the last user does not open the service)."""
    if settings.environment == "production" or settings.api_token:
        return True
    return bool(session.scalar(select(exists().where(User.id.is_not(None)))))


def find_principal(settings: Settings, session: Session, token: str) -> Principal | None:
    """The caller holding ``token``: the shared API token, or a user who is not revoked."""
    if settings.api_token and _same(token, settings.api_token):
        return Principal(None, API_TOKEN_USER, Role.admin)
    user = session.scalar(
        select(User).where(User.token_hash == hash_token(token), User.revoked_at.is_(None))
    )
    return None if user is None else Principal(user.id, user.name, user.role)


def _principal(request: Request, token: str | None) -> Principal:
    """Authenticate ``token`` with a short session of its own (closed before the route runs, so
    no database connection is held while an upload streams)."""
    settings: Settings = request.app.state.settings
    factory: sessionmaker[Session] = request.app.state.session_factory
    with factory() as session:
        if not authentication_required(settings, session):
            return Principal(None, ANONYMOUS_USER, Role.admin)
        found = None if token is None else find_principal(settings, session, token)
    if found is None:
        problem = "missing" if token is None else "unknown or revoked"
        raise HTTPException(
            status.HTTP_401_UNAUTHORIZED,
            f"{problem} token: send 'Authorization: Bearer <token>' with a user's token "
            "(segassist users add) or SEGASSIST_API_TOKEN",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return found


def authorise(request: Request, token: str | None, role: Role) -> Principal:
    """The caller of ``request`` if its role includes ``role`` (else 401/403); also kept in
    ``request.state.principal`` for the route and the audit log (and reused from there when a
    route declares a role on top of its router's)."""
    principal = getattr(request.state, "principal", None) or _principal(request, token)
    request.state.principal = principal
    if not principal.may(role):
        raise HTTPException(
            status.HTTP_403_FORBIDDEN,
            f"user {principal.name!r} has role {principal.role!s}; this needs {role!s}",
        )
    return principal


Credentials = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]
"""The bearer token of a request, if it sent one (documented as the ``HTTPBearer`` scheme)."""


@cache
def require_role(role: Role | str) -> Callable[..., Principal]:
    """The dependency admitting callers whose role includes ``role`` (one object per role, so
    :func:`route_role` can find it and FastAPI runs it once per request)."""
    needed = Role(role)

    def dependency(request: Request, credentials: Credentials) -> Principal:
        return authorise(request, None if credentials is None else credentials.credentials, needed)

    dependency.__name__ = f"require_{needed.value}"
    dependency.required_role = needed  # type: ignore[attr-defined]
    return dependency


def _current_principal(request: Request) -> Principal:
    principal: Principal | None = getattr(request.state, "principal", None)
    if principal is None:  # pragma: no cover - a route using it without a role dependency
        raise RuntimeError(f"{request.url.path}: route declares no role")
    return principal


CurrentPrincipal = Annotated[Principal, Depends(_current_principal)]
"""The authenticated caller, in a route that declares a role (:func:`require_role`)."""


def _calls(dependant: Any) -> Iterator[Any]:
    for sub in dependant.dependencies:
        yield sub.call
        yield from _calls(sub)


def route_role(route: APIRoute | RouteContext) -> Role | None:
    """The least role ``route`` declares (``None``: public), read from its dependencies (those of
    the routers it is included in too, when given the ``RouteContext`` that
    ``fastapi.routing.iter_route_contexts(app.routes)`` yields)."""
    roles = [
        call.required_role for call in _calls(route.dependant) if hasattr(call, "required_role")
    ]
    return max(roles, key=lambda r: r.rank) if roles else None
