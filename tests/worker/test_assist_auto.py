"""``method="auto"`` through the API and a real worker: the winner is what the job reports, the
registry records and the prediction comes from."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from segassist.models.method_selection import CANDIDATES
from tests.worker.conftest import TINY_FEWSHOT, TINY_PRETRAIN, Service, Worker

TINY_NETWORKS = {**TINY_FEWSHOT, "steps": 6, "eval_every": 2, "patience": 2}


def _assist(service: Service, dataset_id: str, **body: object) -> dict:
    job = service.post(f"/datasets/{dataset_id}/assist", json=body)
    done = service.finished(job["id"])
    assert done["status"] == "succeeded", done
    return done


@pytest.mark.parametrize("settings", ["embedded"], indirect=True)
def test_auto_reports_the_winner_and_every_candidate(
    service: Service, start_worker: Callable[[], Worker]
) -> None:
    start_worker()
    dataset_id, image_id = service.dataset_with_labels()
    pretrain = service.job(
        "pretrain", dataset_id, objective="pix2rep", steps=3, config=TINY_PRETRAIN
    )
    assert service.finished(pretrain)["status"] == "succeeded"

    # the default budget (the interactive one): the probes compete, the networks are skipped
    quick = _assist(service, dataset_id, method="auto", config=TINY_FEWSHOT)["result"]
    assert quick["method"] in ("probe-linear", "probe-mlp"), quick["validation"]
    assert list(quick["validation"]) == list(CANDIDATES)
    assert quick["validation"]["probe-linear"]["dice"] is not None
    for network in ("finetune", "scratch"):
        assert "left" in quick["validation"][network]["skipped"]
    model = service.get(f"/models/{quick['segmenter_id']}")
    assert model["method"] == quick["method"]

    # a budget that holds every candidate: each scored on the same held-out pixels
    config = {**TINY_NETWORKS, "auto_budget_seconds": 3600}
    full = _assist(service, dataset_id, method="auto", config=config)["result"]
    validation = full["validation"]
    assert all(entry["dice"] is not None for entry in validation.values()), validation
    assert len({entry["held_out"] for entry in validation.values()}) == 1
    best = max(entry["dice"] for entry in validation.values())
    assert validation[full["method"]]["dice"] == best
    assert service.get(f"/models/{full['segmenter_id']}")["method"] == full["method"]
    assert "labels" in full["predictions"][image_id]

    # random initialisation: scratch is the only candidate, predicted through its ONNX export
    scratch = _assist(service, dataset_id, method="auto", objective="none", config=TINY_NETWORKS)
    result = scratch["result"]
    assert result["method"] == "scratch" and result["encoder_id"] is None
    assert result["validation"]["scratch"]["dice"] is not None
    for other in ("probe-linear", "probe-mlp", "finetune"):
        assert result["validation"][other] == {"skipped": "no pretrained encoder"}
    model = service.get(f"/models/{result['segmenter_id']}")
    assert model["method"] == "scratch" and model["parent_id"] is None
    assert "labels" in result["predictions"][image_id]
