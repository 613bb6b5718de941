"""pretrain → finetune → predict through the API and a real worker process."""

from __future__ import annotations

import gzip
from collections.abc import Callable
from pathlib import Path

import nibabel as nib
import numpy as np

from tests.worker.conftest import (
    AFFINE,
    ANNOTATED,
    SHAPE,
    TINY_FEWSHOT,
    TINY_PRETRAIN,
    Service,
    Worker,
)


def _load(content: bytes) -> nib.Nifti1Image:
    return nib.Nifti1Image.from_bytes(gzip.decompress(content))


def test_pretrain_finetune_predict(service: Service, start_worker: Callable[[], Worker]) -> None:
    start_worker()
    dataset_id, image_id = service.dataset_with_labels()

    pretrain_id = service.job(
        "pretrain", dataset_id, objective="pix2rep", steps=3, config=TINY_PRETRAIN
    )
    pretrained = service.finished(pretrain_id)
    assert pretrained["status"] == "succeeded", pretrained
    assert pretrained["progress"]["step"] == pretrained["progress"]["total"] == 3
    assert pretrained["progress"]["phase"] == "pretrain"
    assert pretrained["attempts"] == 1
    encoder_id = pretrained["result"]["encoder_id"]
    encoder = service.get(f"/models/{encoder_id}")
    assert encoder["kind"] == "encoder"
    assert encoder["lineage"]["image_ids"] == [image_id]
    assert encoder["lineage"]["objective"] == "pix2rep"
    encoder_dir = Path(service.settings.data_dir) / "models" / encoder_id
    assert {p.name for p in encoder_dir.iterdir()} == {"encoder.pt", "manifest.json"}
    log = service.client.get(f"/api/v1/jobs/{pretrain_id}/logs").text
    assert "succeeded" in log

    finetune_id = service.job(
        "finetune", dataset_id, encoder_id=encoder_id, method="linear", config=TINY_FEWSHOT
    )
    finetuned = service.finished(finetune_id)
    assert finetuned["status"] == "succeeded", finetuned
    segmenter_id = finetuned["result"]["segmenter_id"]
    segmenter = service.get(f"/models/{segmenter_id}")
    assert segmenter["kind"] == "segmenter"
    assert segmenter["parent_id"] == encoder_id
    assert len(segmenter["lineage"]["label_ids"]) == 1
    assert segmenter["metrics"]["parity_max_abs_diff"] < 1e-4
    segmenter_dir = Path(service.settings.data_dir) / "models" / segmenter_id
    assert {p.name for p in segmenter_dir.iterdir()} == {"model.onnx", "manifest.json"}

    predict_id = service.job("predict", dataset_id, model_id=segmenter_id)
    predicted = service.finished(predict_id)
    assert predicted["status"] == "succeeded", predicted
    urls = predicted["result"]["predictions"][image_id]
    labels = _load(service.client.get(urls["labels"]).content)
    assert labels.shape == SHAPE
    stored = _load(service.client.get(f"/api/v1/images/{image_id}/file").content)
    np.testing.assert_array_equal(labels.affine, stored.affine)
    np.testing.assert_allclose(labels.affine, AFFINE, atol=1e-6)  # NIfTI keeps float32
    clusters = _load(service.client.get(urls["clusters"]).content)
    assert clusters.shape == SHAPE
    png = service.client.get(urls["clusters_png"])
    assert png.content[:8] == b"\x89PNG\r\n\x1a\n"
    # The box is learnt from two annotated slices: it is found on an unannotated one.
    unannotated = next(z for z in range(SHAPE[2]) if z not in ANNOTATED)
    predicted_box = np.asarray(labels.dataobj)[6:16, 5:14, unannotated]
    assert predicted_box.mean() > 0.5


def test_random_encoder_baseline(service: Service, start_worker: Callable[[], Worker]) -> None:
    """``encoder_id: null`` fits on a randomly initialised encoder (the ``none`` baseline)."""
    start_worker()
    dataset_id, _ = service.dataset_with_labels()
    config = {"encoder": {"channels": [4, 8], "num_clusters": 3}, **TINY_FEWSHOT}
    job = service.finished(
        service.job("finetune", dataset_id, encoder_id=None, method="linear", config=config)
    )
    assert job["status"] == "succeeded", job
    segmenter = service.get(f"/models/{job['result']['segmenter_id']}")
    assert segmenter["parent_id"] is None
    assert segmenter["lineage"]["encoder_id"] is None
