"""``POST /datasets/{id}/assist``: the server resolves the request, or refuses it with a reason."""

from __future__ import annotations

import numpy as np

from segassist.server.db.tables import new_id
from segassist.server.queue import PREDICTION_QUEUE, QUEUE_NAME, queue_for
from tests.server.conftest import SHAPE, Api, nifti_bytes, sparse_label


def _labelled(api: Api) -> tuple[str, str, str]:
    dataset = api.dataset()
    image = api.image(dataset["id"])
    label = api.upload_label(image["id"], nifti_bytes(sparse_label()))
    assert label.status_code == 201, label.text
    return dataset["id"], image["id"], label.json()["id"]


def _assist(api: Api, dataset_id: str, **body: object) -> tuple[int, dict]:
    response = api.client.post(f"/api/v1/datasets/{dataset_id}/assist", json=body)
    return response.status_code, response.json()


def test_defaults_are_resolved_into_the_job(api: Api) -> None:
    dataset_id, image_id, label_id = _labelled(api)
    other = api.image(dataset_id, seed=1)
    status, job = _assist(api, dataset_id)
    assert status == 202, job
    assert job["kind"] == "assist" and job["status"] == "queued"
    params = job["params"]
    assert params["axis"] == 2  # the sparse labels annotate slices along axis 2
    assert params["label_ids"] == [label_id]
    assert params["image_ids"] == [image_id, other["id"]]
    assert params["method"] == "linear"
    assert queue_for("assist", params) == PREDICTION_QUEUE
    assert queue_for("assist", {**params, "method": "finetune"}) == QUEUE_NAME
    latest = api.client.get(f"/api/v1/datasets/{dataset_id}/assist").json()
    assert latest["id"] == job["id"]


def test_bad_requests_name_the_problem(api: Api) -> None:
    dataset_id, _, _ = _labelled(api)
    missing = new_id()
    status, body = _assist(api, dataset_id, image_ids=[missing])
    assert status == 404 and missing in body["detail"]
    status, body = _assist(api, missing)
    assert status == 404 and "dataset" in body["detail"]
    status, body = _assist(api, dataset_id, objective="none")
    assert status == 422 and "finetune" in body["detail"]
    status, body = _assist(api, dataset_id, bogus=1)
    assert status == 422 and "bogus" in str(body["detail"])
    status, body = _assist(api, dataset_id, config={"linear_steps": "many"})
    assert status == 422 and "linear_steps" in str(body["detail"])
    status, body = _assist(api, dataset_id, label_ids=[missing])
    assert status == 404 and missing in body["detail"]
    assert api.client.get(f"/api/v1/jobs?dataset_id={dataset_id}").json() == []


def test_labels_that_annotate_nothing_are_refused(api: Api) -> None:
    dataset = api.dataset()
    status, body = _assist(api, dataset["id"])
    assert status == 409 and "no labels" in body["detail"]
    image = api.image(dataset["id"])
    nothing = np.full(SHAPE, 255, dtype=np.uint8)
    assert api.upload_label(image["id"], nifti_bytes(nothing)).status_code == 201
    status, body = _assist(api, dataset["id"])
    assert status == 422 and "255" in body["detail"]
    background = sparse_label(values=())
    assert api.upload_label(image["id"], nifti_bytes(background)).status_code == 201
    status, body = _assist(api, dataset["id"])
    assert status == 422 and "background only" in body["detail"]


def test_labels_along_different_axes_are_refused(api: Api) -> None:
    dataset_id, _, _ = _labelled(api)
    second = api.image(dataset_id, seed=2)
    across = np.full(SHAPE, 255, dtype=np.uint8)
    across[3] = 0
    across[3, 2:5, 1:4] = 1
    assert api.upload_label(second["id"], nifti_bytes(across)).status_code == 201
    status, body = _assist(api, dataset_id)
    assert status == 422 and "different axes" in body["detail"]


def test_an_empty_schema_is_filled_by_the_first_label(api: Api) -> None:
    dataset = api.dataset(labels={})
    image = api.image(dataset["id"])
    assert api.upload_label(image["id"], nifti_bytes(sparse_label())).status_code == 201
    schema = api.client.get(f"/api/v1/datasets/{dataset['id']}").json()["labels"]
    assert {k: v["name"] for k, v in schema.items()} == {"1": "class 1", "2": "class 2"}
    unknown = sparse_label(values=(3,))
    response = api.upload_label(image["id"], nifti_bytes(unknown))
    assert response.status_code == 422 and "3" in response.json()["detail"]


def test_auto_is_accepted_with_any_objective_and_documented(api: Api) -> None:
    dataset_id, _, _ = _labelled(api)
    status, job = _assist(api, dataset_id, method="auto", config={"auto_budget_seconds": 2})
    assert status == 202, job
    assert job["params"]["method"] == "auto"
    assert job["params"]["config"] == {"auto_budget_seconds": 2}
    assert queue_for("assist", job["params"]) == PREDICTION_QUEUE  # within the default budget
    longer = {**job["params"], "config": {"auto_budget_seconds": 600}}
    assert queue_for("assist", longer) == QUEUE_NAME
    status, job = _assist(api, dataset_id, method="auto", objective="none")
    assert status == 202, job  # random initialisation: auto fits scratch only
    assert queue_for("assist", job["params"]) == QUEUE_NAME
    schemas = api.client.get("/api/v1/openapi.json").json()["components"]["schemas"]
    method = schemas["AssistCreate"]["properties"]["method"]
    assert "auto" in method["enum"] and "auto:" in method["description"]
    assert "auto_budget_seconds" in schemas["FewShotConfig"]["properties"]
