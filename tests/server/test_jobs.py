"""Job creation, validation, queueing and cancellation."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import redis
from fastapi.testclient import TestClient
from sqlalchemy import update

from segassist.server.db.session import make_engine, session_factory
from segassist.server.db.tables import Job, JobStatus
from segassist.server.main import create_app
from segassist.server.settings import Settings
from tests.server.conftest import Api, nifti_bytes, sparse_label

UNKNOWN = "0123456789abcdef" * 2
"""A well-formed id that was never handed out."""


def _broker_messages(data_dir: Path) -> list[dict[str, Any]]:
    folder = data_dir / "broker" / "messages"
    return [json.loads(p.read_text()) for p in sorted(folder.glob("*.msg"))]


def test_queued_job_reaches_the_broker_and_can_be_cancelled(api: Api, settings: Settings) -> None:
    dataset = api.dataset()
    api.image(dataset["id"])
    created = api.client.post(
        "/api/v1/jobs",
        json={"kind": "pretrain", "dataset_id": dataset["id"], "params": {"objective": "pix2rep"}},
    )
    assert created.status_code == 202, created.text
    job = created.json()
    assert job["status"] == "queued"
    messages = _broker_messages(settings.data_dir)
    assert [(m["headers"]["task"], m["headers"]["id"]) for m in messages] == [
        ("segassist.pretrain", job["id"])
    ]

    cancelled = api.client.post(f"/api/v1/jobs/{job['id']}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"
    listed = api.client.get("/api/v1/jobs", params={"status": "cancelled"}).json()
    assert [j["id"] for j in listed] == [job["id"]]
    assert api.client.get(f"/api/v1/jobs/{job['id']}/logs").text == ""


def test_cancelling_a_running_job_asks_the_worker_to_stop(api: Api, settings: Settings) -> None:
    dataset = api.dataset()
    api.image(dataset["id"])
    job = api.client.post(
        "/api/v1/jobs",
        json={"kind": "pretrain", "dataset_id": dataset["id"], "params": {"objective": "pix2rep"}},
    ).json()
    with session_factory(settings)() as session, session.begin():
        session.execute(update(Job).where(Job.id == job["id"]).values(status=JobStatus.running))

    answer = api.client.post(f"/api/v1/jobs/{job['id']}/cancel").json()
    assert (answer["status"], answer["cancel_requested"]) == ("running", True)


def test_finetune_on_a_dataset_without_labels_is_refused(api: Api) -> None:
    dataset = api.dataset()
    api.image(dataset["id"])
    response = api.client.post(
        "/api/v1/jobs",
        json={"kind": "finetune", "dataset_id": dataset["id"], "params": {"method": "linear"}},
    )
    assert response.status_code == 409
    assert "no labels" in response.json()["detail"]


@pytest.mark.parametrize(
    ("params", "status", "needle"),
    [
        ({"method": "magic"}, 422, "params.method"),
        ({"encoder_id": UNKNOWN}, 404, f"'{UNKNOWN}'"),
        ({"label_ids": [UNKNOWN]}, 404, UNKNOWN),
        ({"encoder_id": "nope"}, 422, "params.encoder_id: String should match pattern"),
        ({"method": "linear", "steps": 3}, 422, "params.steps"),
    ],
)
def test_bad_finetune_params_name_the_problem(
    api: Api, params: dict[str, Any], status: int, needle: str
) -> None:
    dataset = api.dataset()
    image = api.image(dataset["id"])
    assert api.upload_label(image["id"], nifti_bytes(sparse_label())).status_code == 201
    response = api.client.post(
        "/api/v1/jobs", json={"kind": "finetune", "dataset_id": dataset["id"], "params": params}
    )
    assert response.status_code == status, response.text
    assert needle in response.json()["detail"]


def test_job_on_unknown_dataset_or_bad_kind_is_refused(api: Api) -> None:
    unknown = api.client.post(
        "/api/v1/jobs",
        json={"kind": "pretrain", "dataset_id": UNKNOWN, "params": {"objective": "pix2rep"}},
    )
    assert unknown.status_code == 404
    assert f"dataset '{UNKNOWN}'" in unknown.json()["detail"]
    dataset = api.dataset()
    bad = api.client.post(
        "/api/v1/jobs", json={"kind": "train", "dataset_id": dataset["id"], "params": {}}
    )
    assert bad.status_code == 422
    assert "kind" in bad.json()["detail"]


def test_jobs_are_enqueued_on_redis(settings: Settings, redis_url: str) -> None:
    redis_settings = settings.model_copy(update={"broker_url": redis_url})
    with TestClient(create_app(redis_settings)) as client:
        api = Api(client)
        dataset = api.dataset()
        api.image(dataset["id"])
        job = client.post(
            "/api/v1/jobs",
            json={
                "kind": "pretrain",
                "dataset_id": dataset["id"],
                "params": {"objective": "iic_boundary"},
            },
        ).json()
        assert client.get("/api/v1/health").json()["broker"] == "ok"
    make_engine(settings.database_url).dispose()
    queued = redis.Redis.from_url(redis_url).lrange("segassist", 0, -1)
    headers = [json.loads(m)["headers"] for m in queued]
    assert [(h["task"], h["id"]) for h in headers] == [("segassist.pretrain", job["id"])]
