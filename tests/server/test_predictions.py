"""Synchronous prediction through ONNX Runtime, served on the input's grid."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from segassist.models.runtime._atomic import sha256_file
from segassist.models.runtime.manifest import Manifest
from segassist.models.runtime.preprocess import Normalisation
from segassist.server.db.session import session_factory
from segassist.server.db.tables import ModelKind, ModelRecord, new_id
from segassist.server.queue import PREDICTION_QUEUE, queue_for
from segassist.server.settings import Settings
from tests.server.conftest import Api


def _threshold_segmenter(folder: Path, sign: float) -> None:
    """A 1×1-conv ONNX segmenter: class 2 where the normalised intensity is above 0.5 when
    ``sign`` is positive (below when negative), class 0 elsewhere; 2 clusters likewise."""
    seg_w = numpy_helper.from_array(
        np.array([-sign, 0.0, sign], np.float32).reshape(3, 1, 1, 1) * 10, "seg_w"
    )
    seg_b = numpy_helper.from_array(np.array([sign, 0.0, -sign], np.float32) * 5, "seg_b")
    clu_w = numpy_helper.from_array(np.array([-10.0, 10.0], np.float32).reshape(2, 1, 1, 1), "cw")
    clu_b = numpy_helper.from_array(np.array([5.0, -5.0], np.float32), "cb")
    dims: list[str | int] = ["B", 1, "H", "W"]
    graph = helper.make_graph(
        [
            helper.make_node("Conv", ["image", "seg_w", "seg_b"], ["logits"]),
            helper.make_node("Conv", ["image", "cw", "cb"], ["cluster_scores"]),
        ],
        "threshold",
        [helper.make_tensor_value_info("image", TensorProto.FLOAT, dims)],
        [
            helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["B", 3, "H", "W"]),
            helper.make_tensor_value_info("cluster_scores", TensorProto.FLOAT, ["B", 2, "H", "W"]),
        ],
        initializer=[seg_w, seg_b, clu_w, clu_b],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    folder.mkdir(parents=True, exist_ok=True)
    onnx.save(model, folder / "model.onnx")
    Manifest(
        kind="segmenter",
        labels={0: "background", 1: "liver", 2: "spleen"},
        num_classes=3,
        num_clusters=2,
        axis=2,
        normalisation=Normalisation(kind="percentile", low=0.5, high=99.5),
        size_divisor=1,
        onnx_file="model.onnx",
        onnx_sha256=sha256_file(folder / "model.onnx"),
        opset=17,
    ).save(folder)


def _register(settings: Settings, folder: Path, dataset_id: str) -> str:
    model_id = new_id()
    with session_factory(settings)() as session, session.begin():
        session.add(
            ModelRecord(
                id=model_id,
                kind=ModelKind.segmenter,
                dataset_id=dataset_id,
                modality="CT",
                method="linear",
                folder=str(folder),
            )
        )
    return model_id


def test_prediction_is_a_job_on_the_prediction_queue(api: Api, settings: Settings) -> None:
    """The API never runs a model: it queues a ``predict`` job for a worker."""
    dataset = api.dataset()
    image = api.image(dataset["id"])
    folder = settings.data_dir / "models" / "m1"
    _threshold_segmenter(folder, sign=1.0)
    model_id = _register(settings, folder, dataset["id"])

    answer = api.client.post(
        f"/api/v1/models/{model_id}/predict", json={"image_id": image["id"], "probabilities": True}
    )
    assert answer.status_code == 202, answer.text
    job = answer.json()
    assert job["kind"] == "predict" and job["status"] == "queued"
    assert job["params"] == {
        "model_id": model_id,
        "image_ids": [image["id"]],
        "probabilities": True,
    }
    assert queue_for(job["kind"], job["params"]) == PREDICTION_QUEUE
    assert not (settings.data_dir / "predictions").exists()


def test_predicting_with_an_encoder_is_refused(api: Api, settings: Settings) -> None:
    dataset = api.dataset()
    image = api.image(dataset["id"])
    with session_factory(settings)() as session, session.begin():
        encoder = ModelRecord(
            kind=ModelKind.encoder, dataset_id=dataset["id"], modality="CT", folder="/nowhere"
        )
        session.add(encoder)
    response = api.client.post(
        f"/api/v1/models/{encoder.id}/predict", json={"image_id": image["id"]}
    )
    assert response.status_code == 422
    assert "segmenter" in response.json()["detail"]
    listed = api.client.get("/api/v1/models", params={"kind": "encoder"}).json()
    assert [m["id"] for m in listed] == [encoder.id]
