"""The assist workflow (``POST /datasets/{id}/assist``) through the API and a real worker."""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from scipy import ndimage

from segassist.models.chain_cache import CHAINS_FOLDER
from segassist.models.runtime.configs import DEFAULT_HEAD
from tests.worker.conftest import (
    ANNOTATED,
    SHAPE,
    TINY_FEWSHOT,
    TINY_PRETRAIN,
    Service,
    Worker,
    nifti_bytes,
    sparse_label,
)


def _load(content: bytes) -> np.ndarray:
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(content)).dataobj)


def _pretrained_encoder(service: Service, dataset_id: str) -> str:
    job = service.finished(
        service.job("pretrain", dataset_id, objective="pix2rep", steps=3, config=TINY_PRETRAIN)
    )
    assert job["status"] == "succeeded", job
    return str(job["result"]["encoder_id"])


def _assist(service: Service, dataset_id: str, **body: object) -> dict:
    job = service.post(f"/datasets/{dataset_id}/assist", json=body)
    assert job["kind"] == "assist"
    return service.finished(job["id"])


def test_assist_reuses_encoder_and_caches_features(
    service: Service, start_worker: Callable[[], Worker]
) -> None:
    start_worker()
    dataset_id, image_id = service.dataset_with_labels()
    encoder_id = _pretrained_encoder(service, dataset_id)

    done = _assist(service, dataset_id, config=TINY_FEWSHOT)
    assert done["status"] == "succeeded", done
    result = done["result"]
    assert result["encoder_id"] == encoder_id  # the dataset's encoder, found by the server
    assert result["axis"] == 2  # from the sparse labels
    assert done["params"]["image_ids"] == [image_id]
    assert set(result["timings"]) == {"encoder", "features", "fit", "export", "predict"}
    assert result["next_slice"][image_id] not in ANNOTATED
    assert 0.0 <= result["uncertainty"][image_id] <= 1.0
    segmenter = service.get(f"/models/{result['segmenter_id']}")
    assert segmenter["parent_id"] == encoder_id
    assert segmenter["method"] == f"probe-{DEFAULT_HEAD}"
    urls = result["predictions"][image_id]
    labels = _load(service.client.get(urls["labels"]).content)
    assert labels.shape == SHAPE
    unannotated = [z for z in range(SHAPE[2]) if z not in ANNOTATED]
    assert labels[6:16, 5:14, unannotated].mean() > 0.5  # the box, learnt from 2 slices
    clusters = _load(service.client.get(urls["clusters"]).content)
    assert clusters.shape == SHAPE
    # a small labelled image: propagated from its own 2 labelled slices, fused with their prior
    # at the default scale (leaving one out cannot judge a propagation from those very slices);
    # the labelled slices come back as drawn
    assert result["propagation"][image_id]["applied"]
    assert result["propagation"][image_id]["seconds"] >= 0
    prior = result["slice_prior"][image_id]
    assert prior["applied"] and (prior["scale"], prior["source"]) == (1.0, "given")
    np.testing.assert_array_equal(labels[..., list(ANNOTATED)], sparse_label()[..., ANNOTATED])
    # then every predicted object its labelled voxels do not reach is gone: one box per class
    components = result["components"][image_id]
    assert components["applied"] and components["several_objects"] == []
    for c in np.unique(labels[labels > 0]):
        assert ndimage.label(labels == c, structure=np.ones((3, 3, 3)))[1] == 1

    # the propagation's chains are kept with the image's maps, for the next correction
    cached = Path(service.settings.data_dir) / "features" / encoder_id / image_id
    assert len(list((cached / CHAINS_FOLDER).glob("*.npy"))) >= 2  # ≥ 1 per labelled slice

    # The interactive loop: a corrected label, resubmitted, reuses the cached decoder maps.
    stamps = {p.name: p.stat().st_mtime_ns for p in cached.glob("map*.npy")}
    assert stamps
    label = sparse_label()
    label[..., 3] = 0
    label[6:16, 5:14, 3] = 1
    files = {"file": ("label.nii.gz", io.BytesIO(nifti_bytes(label)), "x")}
    service.post(f"/images/{image_id}/labels", files=files)
    no_propagation = {**TINY_FEWSHOT, "propagation_max_voxels": 0}
    again = _assist(service, dataset_id, head="auto", config=no_propagation)
    assert again["status"] == "succeeded", again
    # both probe heads validated on held-out tiles of the labelled slices; the winner recorded
    validation = again["result"]["validation"]
    assert set(validation) == {"linear", "mlp"}
    assert all(0.0 <= v <= 1.0 for v in validation.values())
    winner = max(validation, key=lambda head: (validation[head], head == "linear"))
    assert again["result"]["method"] == f"probe-{winner}"
    assert service.get(f"/models/{again['result']['segmenter_id']}")["method"] == f"probe-{winner}"
    assert again["result"]["segmenter_id"] != result["segmenter_id"]
    assert {p.name: p.stat().st_mtime_ns for p in cached.glob("map*.npy")} == stamps
    assert again["result"]["next_slice"][image_id] not in (*ANNOTATED, 3)
    # the probe's prediction (propagation off): three labelled slices (1, 3, 4), slice 3 left
    # out for the prior's strength, scored on its unlabelled neighbour 2
    assert again["result"]["propagation"][image_id] == {"applied": False}
    prior = again["result"]["slice_prior"][image_id]
    assert prior["applied"] and (prior["source"], prior["held_out"]) == ("leave-one-out", 1)
    assert prior["scale"] in {float(s) for s in prior["scores"]}
    # a budget a quarter of the image: propagated on slices pooled 2×2, back on the full grid
    pooled = {
        **TINY_FEWSHOT,
        "slice_prior": False,
        "propagation_max_voxels": label.size // 4,
        "refine_max_voxels": label.size - 1,
    }
    off = _assist(service, dataset_id, config=pooled)
    assert off["status"] == "succeeded", off
    assert off["result"]["propagation"][image_id]["applied"]
    assert "refine_job_id" not in off["result"]  # above refine_max_voxels
    assert off["result"]["slice_prior"][image_id] == {"applied": False}
    assert off["result"]["components"][image_id]["applied"]  # each step has its own switch
    off_labels = _load(service.client.get(off["result"]["predictions"][image_id]["labels"]).content)
    np.testing.assert_array_equal(off_labels[..., [1, 3, 4]], label[..., [1, 3, 4]])
    both = _assist(
        service,
        dataset_id,
        config={**TINY_FEWSHOT, "slice_prior": False, "seeded_components": False},
    )
    assert both["result"]["components"][image_id] == {"applied": False}
    assert "refine_job_id" in both["result"]  # at full resolution, 3 labelled slices: refined
    wrong = {"config": {**TINY_FEWSHOT, "slice_prior": "sometimes"}}
    assert (
        service.client.post(f"/api/v1/datasets/{dataset_id}/assist", json=wrong).status_code == 422
    )
    # the encoder's cluster map does not change with the labels: the same files are served
    second = again["result"]["predictions"][image_id]
    for name in ("clusters", "clusters_png"):
        assert service.client.get(second[name]).content == service.client.get(urls[name]).content


@pytest.mark.parametrize(
    "settings",
    [("embedded", {"assist_pretrain_steps": 2, "background_pretrain_steps": 4})],
    indirect=True,
)
def test_assist_without_encoder_pretrains_then_refits(
    service: Service, start_worker: Callable[[], Worker]
) -> None:
    """No encoder yet: a short pretraining, a longer one in the background, then a refit."""
    start_worker()
    dataset_id, image_id = service.dataset_with_labels(modality="MR")
    done = _assist(service, dataset_id, objective="pix2rep_barlow")
    assert done["status"] == "succeeded", done
    quick = service.get(f"/models/{done['result']['encoder_id']}")
    assert quick["kind"] == "encoder" and quick["objective"] == "pix2rep_barlow"
    assert quick["metrics"]["steps"] == 2
    background = service.finished(done["result"]["background_job_id"])
    assert background["status"] == "succeeded", background
    assert background["progress"]["total"] == 4
    assert background["progress"]["step"] == 4
    refit = service.finished(background["result"]["refit_job_id"])
    assert refit["status"] == "succeeded", refit
    assert refit["result"]["encoder_id"] == background["result"]["encoder_id"]
    assert refit["params"]["refit_of"] == done["id"]
    assert refit["result"].get("background_job_id") is None
    assert image_id in refit["result"]["predictions"]


@pytest.mark.parametrize("settings", ["embedded"], indirect=True)
def test_assist_finetune_from_random_init(
    service: Service, start_worker: Callable[[], Worker]
) -> None:
    start_worker()
    dataset_id, image_id = service.dataset_with_labels()
    # 40 steps: the path is under test, not the network's quality
    done = _assist(service, dataset_id, objective="none", method="finetune", config={"steps": 40})
    assert done["status"] == "succeeded", done
    assert done["result"]["encoder_id"] is None
    assert set(done["result"]["predictions"][image_id]) >= {"labels", "uncertainty"}
    assert "probabilities" not in done["result"]["predictions"][image_id]  # not asked for
    assert done["result"]["slice_prior"][image_id]["applied"]  # the network path fuses too
    assert done["result"]["components"][image_id]["applied"]
    labels = _load(service.client.get(done["result"]["predictions"][image_id]["labels"]).content)
    np.testing.assert_array_equal(labels[..., list(ANNOTATED)], sparse_label()[..., ANNOTATED])


@pytest.mark.parametrize(
    "settings",
    [("embedded", {"assist_pretrain_steps": 100, "background_pretrain_steps": 0})],
    indirect=True,
)
def test_assist_survives_a_killed_worker(
    service: Service, start_worker: Callable[[], Worker]
) -> None:
    """SIGKILL mid-job: the next worker takes the job over and resumes, nothing half-served."""
    first = start_worker()
    dataset_id, image_id = service.dataset_with_labels()
    job_id = service.post(f"/datasets/{dataset_id}/assist", json={"config": TINY_FEWSHOT})["id"]
    checkpoint = Path(service.settings.data_dir) / "jobs" / job_id / "work" / "checkpoint.pt"
    service.wait(job_id, lambda job: job["status"] == "running" and checkpoint.exists())
    first.kill()
    assert service.get(f"/jobs/{job_id}")["result"] is None
    assert service.get(f"/datasets/{dataset_id}/assist")["id"] == job_id

    start_worker()
    done = service.finished(job_id)
    assert done["status"] == "succeeded", done
    assert done["attempts"] == 2
    log = service.client.get(f"/api/v1/jobs/{job_id}/logs").text
    assert "was lost" in log
    assert "resuming pretraining" in log  # the short pretraining from its checkpoint
    labels = service.client.get(done["result"]["predictions"][image_id]["labels"])
    assert labels.status_code == 200
    assert _load(labels.content).shape == SHAPE
