"""Job ``config`` is checked at submission (422 naming the key) and stored as the user wrote it."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from segassist.server.settings import Settings
from tests.server.conftest import Api, nifti_bytes, sparse_label


def _broker_messages(data_dir: Path) -> list[dict[str, Any]]:
    return [json.loads(p.read_text()) for p in (data_dir / "broker" / "messages").glob("*.msg")]


def _labelled_dataset(api: Api) -> str:
    dataset = api.dataset()
    image = api.image(dataset["id"])
    assert api.upload_label(image["id"], nifti_bytes(sparse_label())).status_code == 201
    return str(dataset["id"])


def _submit(api: Api, kind: str, dataset_id: str, params: dict[str, Any]) -> Any:
    return api.client.post(
        "/api/v1/jobs", json={"kind": kind, "dataset_id": dataset_id, "params": params}
    )


@pytest.mark.parametrize(
    ("kind", "params", "needle"),
    [
        ("finetune", {"config": {"bogus_key": 1}}, "params.config.bogus_key: Extra inputs"),
        ("finetune", {"config": {"steps": "many"}}, "params.config.steps: Input should be a valid"),
        ("finetune", {"config": {"holdout_fraction": 1}}, "params.config.holdout_fraction"),
        (
            "finetune",
            {"config": {"encoder": {"chanels": [4, 8]}}},
            "params.config.encoder.chanels: Extra inputs",
        ),
        (
            "finetune",
            {"config": {"encoder": {"channels": [4]}}},
            "params.config.encoder.channels: Value error, channels needs at least two levels",
        ),
        (
            "pretrain",
            {"objective": "pix2rep", "config": {"bogus_key": 1}},
            "params.config.bogus_key",
        ),
        ("pretrain", {"objective": "pix2rep", "config": {"steps": "many"}}, "params.config.steps"),
        (
            "pretrain",
            {"objective": "pix2rep", "config": {"objective": "simclr"}},
            "config.objective",
        ),
        ("pretrain", {"objective": "pix2rep", "config": [1, 2]}, "params.config: Input should be"),
    ],
)
def test_bad_job_config_is_422_naming_the_key_and_nothing_is_queued(
    api: Api, settings: Settings, kind: str, params: dict[str, Any], needle: str
) -> None:
    dataset_id = _labelled_dataset(api)
    response = _submit(api, kind, dataset_id, params)
    assert response.status_code == 422, response.text
    assert needle in response.json()["detail"]
    assert api.client.get("/api/v1/jobs").json() == []
    assert _broker_messages(settings.data_dir) == []


def test_valid_configs_are_queued_with_only_the_keys_given(api: Api) -> None:
    """The worker's defaults (e.g. the scratch settings of a random encoder) fill the rest."""
    dataset_id = _labelled_dataset(api)
    fit = {"linear_steps": 5, "head": "mlp", "encoder": {"channels": [4, 8], "num_clusters": 3}}
    finetune = _submit(api, "finetune", dataset_id, {"method": "finetune", "config": fit})
    assert finetune.status_code == 202, finetune.text
    assert finetune.json()["params"]["config"] == fit

    pretrain = {"channels": [4, 8], "lr": 0.01, "objective_overrides": {"temperature": 0.3}}
    params = {"objective": "pix2rep", "steps": 3, "config": pretrain}
    response = _submit(api, "pretrain", dataset_id, params)
    assert response.status_code == 202, response.text
    job = api.client.get(f"/api/v1/jobs/{response.json()['id']}").json()
    assert job["params"]["config"] == pretrain
    assert job["params"]["steps"] == 3

    plain = _submit(api, "finetune", dataset_id, {})
    assert plain.status_code == 202, plain.text
    assert plain.json()["params"]["config"] is None
