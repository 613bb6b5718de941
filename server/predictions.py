"""Prediction outputs on disk (no torch): what the workers write and the API serves.

:func:`predict_to_folder` runs an ONNX segmenter on a stored image and :func:`write_prediction`
writes any :class:`~segassist.models.runtime.predictor.Prediction`, every file atomically on the input's
grid::

    predictions/<model_id>/<image_id>/labels.nii.gz      uint8, the input's affine and header
                                      clusters.nii.gz    uint8 cluster index per voxel
                                      clusters.png       montage of slices with clusters overlaid
                                      probabilities.nii.gz  float32 X×Y×Z×L (when asked)
                                      uncertainty.nii.gz    float32 X×Y×Z (when asked)
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np

from segassist.models.runtime._atomic import link_atomic
from segassist.models.runtime.nifti import Reference, read_nifti, write_nifti_atomic
from segassist.models.runtime.predictor import OnnxPredictor, Prediction
from segassist.models.runtime.preprocess import Normalisation
from segassist.models.runtime.render import render_cluster_montage

__all__ = [
    "PREDICTION_FILES",
    "predict_to_folder",
    "prediction_urls",
    "write_prediction",
]

logger = logging.getLogger(__name__)

PREDICTION_FILES = {
    "labels": "labels.nii.gz",
    "clusters": "clusters.nii.gz",
    "clusters_png": "clusters.png",
    "probabilities": "probabilities.nii.gz",
    "uncertainty": "uncertainty.nii.gz",
}
"""Output name → file name in the prediction folder."""


def predict_to_folder(
    predictor: OnnxPredictor,
    image_path: Path,
    out_dir: Path,
    with_probabilities: bool = False,
    with_uncertainty: bool | None = None,
) -> list[str]:
    """Predict the NIfTI at ``image_path`` and write the outputs under ``out_dir``
    (``uncertainty.nii.gz`` when ``with_uncertainty``, default ``with_probabilities``).

    Returns:
        The output names written (keys of :data:`PREDICTION_FILES`).
    """
    volume, affine, header = read_nifti(image_path)
    if volume.ndim != 3:
        raise ValueError(f"expected a 3D volume, got shape {volume.shape}")
    prediction = predictor.predict(
        np.asarray(volume, dtype=np.float32),
        with_probabilities=with_probabilities,
        with_uncertainty=with_uncertainty,
    )
    manifest = predictor.manifest
    return write_prediction(
        prediction, volume, (affine, header), out_dir, manifest.axis, manifest.normalisation
    )


def write_prediction(
    prediction: Prediction,
    volume: np.ndarray,
    like: Reference,
    out_dir: Path,
    axis: int,
    normalisation: Normalisation,
    rendered: Path | None = None,
) -> list[str]:
    """Write ``prediction`` of ``volume`` (raw, ``X×Y×Z``) under ``out_dir``, file by file atomically.

    Args:
        like: affine and header of the input image; every output gets them.
        axis: slice axis of the montage.
        normalisation: intensity mapping of the montage's grey background.
        rendered: a folder already holding this prediction's ``clusters.nii.gz`` and
            ``clusters.png`` (the cluster map depends on the encoder and the image only): they
            are linked instead of written again (rendering the montage takes about a second).

    Returns:
        The output names written (keys of :data:`PREDICTION_FILES`).
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    write_nifti_atomic(prediction.labels, out_dir / PREDICTION_FILES["labels"], like, np.uint8)
    cluster_files = [PREDICTION_FILES[name] for name in ("clusters", "clusters_png")]
    if rendered is not None and all((rendered / name).is_file() for name in cluster_files):
        for name in cluster_files:
            link_atomic(rendered / name, out_dir / name)
    else:
        write_nifti_atomic(prediction.clusters, out_dir / cluster_files[0], like, np.uint8)
        render_cluster_montage(
            volume, prediction.clusters, axis, out_dir / cluster_files[1], image_norm=normalisation
        )
    written = ["labels", "clusters", "clusters_png"]
    if prediction.probabilities is not None:
        probabilities = np.moveaxis(prediction.probabilities, 0, -1)
        write_nifti_atomic(
            probabilities, out_dir / PREDICTION_FILES["probabilities"], like, np.float32
        )
        written.append("probabilities")
    if prediction.uncertainty is not None:
        write_nifti_atomic(
            prediction.uncertainty, out_dir / PREDICTION_FILES["uncertainty"], like, np.float32
        )
        written.append("uncertainty")
    return written


def prediction_urls(model_id: str, image_id: str, names: list[str]) -> dict[str, str]:
    """API paths of the outputs ``names`` of ``model_id`` on ``image_id``."""
    base = f"/api/v1/predictions/{model_id}/{image_id}"
    return {name: f"{base}/{PREDICTION_FILES[name]}" for name in names}
