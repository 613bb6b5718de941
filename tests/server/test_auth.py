"""Users, roles and the audit log: every route refuses a missing token and a too weak role."""

from __future__ import annotations

import re
import uuid
from collections.abc import Iterator
from datetime import timedelta
from pathlib import Path

import pytest
from fastapi import FastAPI
from fastapi.routing import APIRoute, RouteContext, iter_route_contexts
from fastapi.testclient import TestClient
from sqlalchemy import select

from segassist.client.cli import main as cli_main
from segassist.server.auth import ANONYMOUS_USER, route_role
from segassist.server.db.session import make_engine, session_factory
from segassist.server.db.tables import AuditEvent, Dataset, Job, JobKind, Role, User, utcnow
from segassist.server.main import create_app
from segassist.server.settings import Settings
from segassist.server.users import add_user, revoke_user, set_role

PUBLIC = {
    ("GET", "/"),  # the browser page: static HTML, no data (its API calls carry the token)
    ("GET", "/api/v1/health"),
    ("GET", "/auth/"),
    ("POST", "/auth/token"),
    ("GET", "/monailabel/{dataset_id}/auth/"),
    ("POST", "/monailabel/{dataset_id}/auth/token"),
}
"""Routes anyone may call, in production too: health and the MONAI Label login."""
WEAKER = {Role.annotator: Role.viewer, Role.admin: Role.annotator}
_PARAM = re.compile(r"\{(\w+)(:\w+)?\}")


def _bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def _routes(app: FastAPI) -> Iterator[tuple[str, str, RouteContext]]:
    """Every (method, full path, route) of ``app``, included routers' routes too."""
    for route in iter_route_contexts(app.routes):
        if isinstance(route.original_route, APIRoute):
            for method in sorted(set(route.methods or ()) - {"HEAD", "OPTIONS"}):
                yield method, str(route.path), route


def _concrete(path: str) -> str:
    """``path`` with every parameter filled by a well-formed id that names nothing."""
    return _PARAM.sub(lambda m: uuid.uuid4().hex, path)


@pytest.fixture
def production(settings: Settings) -> Iterator[tuple[TestClient, dict[Role, str]]]:
    """A production app (no API token) with one user per role: (client, role → token)."""
    prod = settings.model_copy(update={"environment": "production"})
    with TestClient(create_app(prod)) as client:
        with session_factory(prod)() as session:
            tokens = {role: add_user(session, f"user-{role}", role)[1] for role in Role}
        yield client, tokens
    make_engine(settings.database_url).dispose()


def test_every_route_needs_a_token_and_its_role_in_production(
    production: tuple[TestClient, dict[Role, str]],
) -> None:
    client, tokens = production
    app = client.app
    assert isinstance(app, FastAPI)
    public, checked, forbidden = set(), 0, 0
    for method, path, route in _routes(app):
        role = route_role(route)
        if role is None:
            public.add((method, path))
            continue
        url = _concrete(path)
        anonymous = client.request(method, url)
        assert anonymous.status_code == 401, (method, path, anonymous.text)
        assert anonymous.headers["www-authenticate"] == "Bearer"
        wrong = client.request(method, url, headers=_bearer("sa_not-a-token"))
        assert wrong.status_code == 401, (method, path)
        checked += 1
        if role in WEAKER:
            weak = client.request(method, url, headers=_bearer(tokens[WEAKER[role]]))
            assert weak.status_code == 403, (method, path, weak.text)
            assert str(role) in weak.json()["detail"]
            forbidden += 1
    assert public == PUBLIC
    assert checked > 60 and forbidden > 20, (checked, forbidden)
    roles = {(m, p): route_role(r) for m, p, r in _routes(app)}
    assert roles["GET", "/api/v1/datasets"] == Role.viewer
    assert roles["POST", "/api/v1/datasets/{dataset_id}/images"] == Role.annotator
    assert roles["PUT", "/monailabel/{dataset_id}/datastore/label"] == Role.annotator
    assert roles["GET", "/api/v1/audit"] == Role.admin
    # the right role passes the gate (and meets the real 404 behind it)
    missing = client.get(
        f"/api/v1/datasets/{uuid.uuid4().hex}", headers=_bearer(tokens[Role.viewer])
    )
    assert missing.status_code == 404


def test_open_in_development_until_a_token_or_a_user_exists(settings: Settings) -> None:
    with TestClient(create_app(settings)) as client:
        assert (
            client.post("/api/v1/datasets", json={"name": "a", "modality": "CT"}).status_code == 201
        )
        assert client.get("/auth/").status_code == 404  # MONAI Label clients: no login
        with session_factory(settings)() as session:
            _, token = add_user(session, "ann", Role.annotator)
        assert client.get("/api/v1/datasets").status_code == 401
        assert client.get("/api/v1/datasets", headers=_bearer(token)).status_code == 200
        assert client.get("/auth/").json()["enabled"] is True
        with session_factory(settings)() as session:
            revoke_user(session, "ann")
        assert client.get("/api/v1/datasets", headers=_bearer(token)).status_code == 401
        assert client.get("/api/v1/datasets").status_code == 401  # revoking does not reopen
    shared = settings.model_copy(update={"api_token": "s3cret"})
    with TestClient(create_app(shared)) as client:
        assert client.get("/api/v1/audit", headers=_bearer("s3cret")).status_code == 200
    make_engine(settings.database_url).dispose()


def test_annotators_cancel_their_own_jobs_admins_any(
    production: tuple[TestClient, dict[Role, str]], settings: Settings
) -> None:
    client, tokens = production
    with session_factory(settings)() as session:
        _, other = add_user(session, "other-annotator", Role.annotator)
        owner_id = session.scalar(select(User.id).where(User.name == "user-annotator"))
        dataset = Dataset(name="d", modality="CT", labels={})
        session.add(dataset)
        session.flush()
        jobs = [
            Job(kind=JobKind.pretrain, dataset_id=dataset.id, created_by=owner_id) for _ in "ab"
        ]
        session.add_all(jobs)
        session.commit()
    first, second = (f"/api/v1/jobs/{job.id}/cancel" for job in jobs)
    refused = client.post(first, headers=_bearer(other))
    assert refused.status_code == 403 and "only its owner or an admin" in refused.json()["detail"]
    own = client.post(first, headers=_bearer(tokens[Role.annotator]))
    assert own.status_code == 200 and own.json()["status"] == "cancelled"
    assert client.post(second, headers=_bearer(tokens[Role.admin])).json()["status"] == "cancelled"


def test_every_write_is_audited_and_admins_query_the_log(
    production: tuple[TestClient, dict[Role, str]], settings: Settings
) -> None:
    client, tokens = production
    before = utcnow() - timedelta(seconds=1)
    body = {"name": "spine", "modality": "CT"}
    created = client.post("/api/v1/datasets", json=body, headers=_bearer(tokens[Role.annotator]))
    assert created.status_code == 201
    dataset_id = created.json()["id"]
    assert (
        client.post("/api/v1/datasets", json=body, headers=_bearer(tokens[Role.viewer])).status_code
        == 403
    )
    assert client.post("/api/v1/datasets", json=body).status_code == 401
    job = uuid.uuid4().hex
    assert (
        client.post(f"/api/v1/jobs/{job}/cancel", headers=_bearer(tokens[Role.admin])).status_code
        == 404
    )
    client.get("/api/v1/datasets", headers=_bearer(tokens[Role.viewer]))  # reads are not logged

    admin = _bearer(tokens[Role.admin])
    assert client.get("/api/v1/audit", headers=_bearer(tokens[Role.annotator])).status_code == 403
    events = client.get("/api/v1/audit", headers=admin, params={"since": before.isoformat()}).json()
    assert [(e["method"], e["user_name"], e["status_code"]) for e in events] == [
        ("POST", "user-admin", 404),
        ("POST", None, 401),
        ("POST", "user-viewer", 403),
        ("POST", "user-annotator", 201),
    ]
    cancel, *_, create = events
    assert cancel["route"] == "/api/v1/jobs/{job_id}/cancel"
    assert cancel["path"] == f"/api/v1/jobs/{job}/cancel"
    assert cancel["object_ids"] == {"job_id": job} and cancel["role"] == "admin"
    assert create["route"] == "/api/v1/datasets" and create["client"] == "testclient"
    assert create["user_id"] is not None
    mine = client.get("/api/v1/audit", headers=admin, params={"user": "user-annotator"}).json()
    assert [e["status_code"] for e in mine] == [201]
    assert len(client.get("/api/v1/audit", headers=admin, params={"limit": 2}).json()) == 2
    with session_factory(settings)() as session:
        set_role(session, "user-viewer", Role.annotator)
    promoted = client.post("/api/v1/datasets", json=body, headers=_bearer(tokens[Role.viewer]))
    assert promoted.status_code == 201
    assert dataset_id != promoted.json()["id"]


def test_monailabel_login_is_a_user_name_and_its_token(
    production: tuple[TestClient, dict[Role, str]],
) -> None:
    client, tokens = production
    token = tokens[Role.annotator]
    assert client.get("/auth/").json()["enabled"] is True
    login = client.post("/auth/token", data={"username": "user-annotator", "password": token})
    assert login.status_code == 200 and login.json()["access_token"] == token
    wrong_name = client.post("/auth/token", data={"username": "user-admin", "password": token})
    assert wrong_name.status_code == 401
    valid = client.get("/auth/token/valid", headers=_bearer(token))
    assert valid.json() == {"valid": True, "username": "user-annotator"}
    # production: Slicer's header-less download by image id needs a token too
    assert client.get("/datastore/image", params={"image": uuid.uuid4().hex}).status_code == 401


def test_users_cli_prints_the_token_once_and_works_on_the_database(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert (
        cli_main(["users", "add", "alice", "--role", "annotator", "--data-dir", str(data_dir)]) == 0
    )
    token = capsys.readouterr().out.strip()
    assert token.startswith("sa_") and len(token) > 40
    assert cli_main(["users", "add", "alice", "--role", "viewer", "--data-dir", str(data_dir)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert cli_main(["users", "set-role", "alice", "admin", "--data-dir", str(data_dir)]) == 0
    assert cli_main(["users", "list", "--data-dir", str(data_dir)]) == 0
    listing = capsys.readouterr().out
    assert "alice" in listing and "admin" in listing and token not in listing
    settings = Settings(data_dir=data_dir, device="cpu")
    with TestClient(create_app(settings)) as client:
        assert client.get("/api/v1/audit", headers=_bearer(token)).status_code == 200
        assert (
            client.post(
                "/api/v1/datasets", json={"name": "x", "modality": "CT"}, headers=_bearer(token)
            ).status_code
            == 201
        )
    assert cli_main(["audit", "--json", "--data-dir", str(data_dir)]) == 0
    assert '"user_name": "alice"' in capsys.readouterr().out
    assert cli_main(["users", "revoke", "alice", "--data-dir", str(data_dir)]) == 0
    with TestClient(create_app(settings)) as client:
        assert client.get("/api/v1/audit", headers=_bearer(token)).status_code == 401
    make_engine(settings.database_url).dispose()


def test_audit_retention_prunes_old_events_at_start_and_on_demand(
    data_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``audit_retention_days`` deletes older events when the API starts; ``segassist audit
    --prune DAYS`` does it on demand; each deletion is itself an event, recent ones stay."""
    settings = Settings(data_dir=data_dir, device="cpu")
    with TestClient(create_app(settings)) as client:  # migrates; an open service
        for name in ("old", "recent"):
            client.post("/api/v1/datasets", json={"name": name, "modality": "CT"})
    factory = session_factory(settings)
    with factory() as session, session.begin():
        old, recent = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
        old.at = utcnow() - timedelta(days=40)
        recent.at = utcnow() - timedelta(days=5)

    kept = Settings(data_dir=data_dir, device="cpu", audit_retention_days=30)
    with TestClient(create_app(kept)) as client:
        events = client.get("/api/v1/audit").json()
    assert [(e["method"], e["path"], e["user_name"]) for e in events] == [
        ("DELETE", "audit", "retention"),
        ("POST", "/api/v1/datasets", ANONYMOUS_USER),
    ]
    assert events[0]["object_ids"]["deleted"] == "1"

    with pytest.raises(SystemExit) as refused:
        cli_main(["audit", "--prune", "0", "--data-dir", str(data_dir)])
    assert refused.value.code == 2
    assert "at least 1" in capsys.readouterr().err
    assert cli_main(["audit", "--prune", "3", "--data-dir", str(data_dir)]) == 0
    assert "deleted 1 audit events" in capsys.readouterr().err
    with factory() as session:
        left = session.scalars(select(AuditEvent).order_by(AuditEvent.id)).all()
    assert [(e.path, e.user_name) for e in left][-1][0] == "audit"
    assert all(e.path == "audit" for e in left)  # only the two deletions' own records
    make_engine(settings.database_url).dispose()
