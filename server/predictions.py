"""Synchronous predictions through ONNX Runtime (no torch), shared by the API and the worker.

:class:`PredictorCache` keeps one :class:`~models.runtime.predictor.OnnxPredictor` per model
folder and reloads it when the folder's ``manifest.json`` changes (a new model version).
:func:`predict_to_folder` writes every output atomically on the input's grid::

    predictions/<model_id>/<image_id>/labels.nii.gz      uint8, the input's affine and header
                                      clusters.nii.gz    uint8 cluster index per voxel
                                      clusters.png       montage of slices with clusters overlaid
                                      probabilities.nii.gz  float32 X×Y×Z×L (when asked)
                                      uncertainty.nii.gz    float32 X×Y×Z (when asked)
"""

from __future__ import annotations

import hashlib
import logging
import threading
from collections import OrderedDict
from pathlib import Path

import numpy as np

from models.runtime.manifest import MANIFEST_NAME
from models.runtime.nifti import read_nifti, write_nifti_atomic
from models.runtime.predictor import Device, OnnxPredictor
from models.runtime.render import render_cluster_montage

__all__ = ["PREDICTION_FILES", "PredictorCache", "predict_to_folder", "prediction_urls"]

logger = logging.getLogger(__name__)

PREDICTION_FILES = {
    "labels": "labels.nii.gz",
    "clusters": "clusters.nii.gz",
    "clusters_png": "clusters.png",
    "probabilities": "probabilities.nii.gz",
    "uncertainty": "uncertainty.nii.gz",
}
"""Output name → file name in the prediction folder."""


class PredictorCache:
    """Thread-safe LRU of loaded predictors keyed by model folder and manifest checksum.

    Args:
        device: ``"auto"``, ``"cpu"`` or ``"cuda"`` (ONNX Runtime provider choice).
        max_entries: loaded models kept at once.
    """

    def __init__(self, device: Device = "auto", max_entries: int = 4) -> None:
        self.device = device
        self.max_entries = max_entries
        self._entries: OrderedDict[tuple[str, str], OnnxPredictor] = OrderedDict()
        self._lock = threading.Lock()

    def get(self, folder: Path) -> OnnxPredictor:
        """The predictor of ``folder``, loading it if new or if its manifest changed."""
        manifest = (folder / MANIFEST_NAME).read_bytes()
        key = (str(folder.resolve()), hashlib.sha256(manifest).hexdigest())
        with self._lock:
            if key in self._entries:
                self._entries.move_to_end(key)
                return self._entries[key]
            stale = [k for k in self._entries if k[0] == key[0]]
            for k in stale:
                del self._entries[k]
            predictor = OnnxPredictor.from_folder(folder, device=self.device)
            self._entries[key] = predictor
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)
            logger.info("loaded ONNX model from %s", folder)
            return predictor


def predict_to_folder(
    predictor: OnnxPredictor, image_path: Path, out_dir: Path, with_probabilities: bool = False
) -> list[str]:
    """Predict the NIfTI at ``image_path`` and write the outputs under ``out_dir``.

    Returns:
        The output names written (keys of :data:`PREDICTION_FILES`).
    """
    volume, affine, header = read_nifti(image_path)
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
    prediction = predictor.predict(
        np.asarray(volume, dtype=np.float32), with_probabilities=with_probabilities
    )
    like = (affine, header)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_nifti_atomic(prediction.labels, out_dir / PREDICTION_FILES["labels"], like, np.uint8)
    write_nifti_atomic(prediction.clusters, out_dir / PREDICTION_FILES["clusters"], like, np.uint8)
    render_cluster_montage(
        volume,
        prediction.clusters,
        predictor.manifest.axis,
        out_dir / PREDICTION_FILES["clusters_png"],
        image_norm=predictor.manifest.normalisation,
    )
    written = ["labels", "clusters", "clusters_png"]
    if with_probabilities and prediction.probabilities is not None:
        probabilities = np.moveaxis(prediction.probabilities, 0, -1)
        write_nifti_atomic(
            probabilities, out_dir / PREDICTION_FILES["probabilities"], like, np.float32
        )
        written.append("probabilities")
    if with_probabilities and prediction.uncertainty is not None:
        write_nifti_atomic(
            prediction.uncertainty, out_dir / PREDICTION_FILES["uncertainty"], like, np.float32
        )
        written.append("uncertainty")
    return written


def prediction_urls(model_id: str, image_id: str, names: list[str]) -> dict[str, str]:
    """API paths of the outputs ``names`` of ``model_id`` on ``image_id``."""
    base = f"/api/v1/predictions/{model_id}/{image_id}"
    return {name: f"{base}/{PREDICTION_FILES[name]}" for name in names}
