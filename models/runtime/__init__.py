"""Inference without torch: ONNX Runtime predictor, model manifest, NIfTI I/O, montages.

Imports numpy, onnxruntime, nibabel and matplotlib only, so the API process stays light.
"""

from __future__ import annotations

from models.runtime.manifest import Manifest
from models.runtime.nifti import read_nifti, write_nifti_atomic
from models.runtime.predictor import OnnxPredictor, Prediction
from models.runtime.preprocess import Normalisation, normalise
from models.runtime.render import render_cluster_montage, render_label_montage

__all__ = [
    "Manifest",
    "Normalisation",
    "OnnxPredictor",
    "Prediction",
    "normalise",
    "read_nifti",
    "render_cluster_montage",
    "render_label_montage",
    "write_nifti_atomic",
]
