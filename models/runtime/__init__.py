"""Inference without torch: ONNX Runtime predictor, model manifest, NIfTI I/O, montages; and the
job configs (:mod:`segassist.models.runtime.configs`) every layer validates against.

Imports numpy, onnxruntime, nibabel, matplotlib and pydantic only, so the API process stays
light. The names below are loaded on first use, so importing one submodule (the client imports
:mod:`segassist.models.runtime.configs`) does not load onnxruntime and matplotlib.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from segassist.models.runtime.manifest import Manifest
    from segassist.models.runtime.nifti import read_nifti, write_nifti_atomic
    from segassist.models.runtime.predictor import OnnxPredictor, Prediction
    from segassist.models.runtime.preprocess import Normalisation, normalise
    from segassist.models.runtime.render import render_cluster_montage, render_label_montage

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

_MODULES = {
    "Manifest": "manifest",
    "Normalisation": "preprocess",
    "OnnxPredictor": "predictor",
    "Prediction": "predictor",
    "normalise": "preprocess",
    "read_nifti": "nifti",
    "render_cluster_montage": "render",
    "render_label_montage": "render",
    "write_nifti_atomic": "nifti",
}


def __getattr__(name: str) -> Any:
    # PEP 562: import the submodule of ``name`` on first access.
    if name not in _MODULES:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_MODULES[name]}"), name)
