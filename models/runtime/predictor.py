"""Slice-wise segmentation of a volume with an exported segmenter on ONNX Runtime (no torch).

Usage::

    predictor = OnnxPredictor.from_folder("models/<id>", device="auto")
    prediction = predictor.predict(volume)  # X×Y×Z raw intensities
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
import onnxruntime as ort

from segassist.models.runtime._atomic import sha256_file
from segassist.models.runtime.manifest import Manifest
from segassist.models.runtime.preprocess import crop_to, normalise, pad_to_multiple

__all__ = ["Device", "OnnxPredictor", "Prediction", "normalised_entropy", "providers", "softmax"]

logger = logging.getLogger(__name__)

Device = Literal["auto", "cpu", "cuda"]
_CUDA = "CUDAExecutionProvider"
_CPU = "CPUExecutionProvider"


@dataclass(frozen=True)
class Prediction:
    """Outputs of :meth:`OnnxPredictor.predict`, all on the input's voxel grid.

    Attributes:
        labels: X×Y×Z uint8, argmax of the segmentation logits.
        clusters: X×Y×Z uint8, argmax of the cluster scores.
        probabilities: L×X×Y×Z float32 softmax, or ``None`` unless requested.
        uncertainty: X×Y×Z float32 entropy of the softmax divided by ``log L`` (in [0, 1]), or
            ``None`` unless requested.
    """

    labels: np.ndarray
    clusters: np.ndarray
    probabilities: np.ndarray | None = None
    uncertainty: np.ndarray | None = None


def softmax(logits: np.ndarray) -> np.ndarray:
    """Softmax over axis 1 of ``B×L×H×W`` logits, float32."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    np.exp(shifted, out=shifted)
    shifted /= shifted.sum(axis=1, keepdims=True)
    return shifted


def normalised_entropy(probs: np.ndarray) -> np.ndarray:
    """Entropy over axis 1 of ``B×L×H×W`` probabilities divided by ``log L``; ``B×H×W`` in [0, 1]."""
    num_classes = probs.shape[1]
    if num_classes < 2:
        return np.zeros((probs.shape[0], *probs.shape[2:]), dtype=np.float32)
    entropy = np.zeros((probs.shape[0], *probs.shape[2:]), dtype=np.float32)
    term = np.empty_like(entropy)
    for c in range(num_classes):  # a class at a time: no B×L×H×W temporaries
        share = probs[:, c]
        np.log(np.clip(share, 1e-12, 1.0, out=term), out=term)
        term *= share
        entropy -= term
    entropy /= np.float32(np.log(num_classes))
    return np.clip(entropy, 0.0, 1.0, out=entropy)


def providers(device: Device) -> list[str]:
    """ONNX Runtime providers for ``device``: CUDA first when asked for and present, then CPU."""
    if device == "cpu":
        return [_CPU]
    if device not in ("auto", "cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    available = ort.get_available_providers()
    if device == "cuda" and _CUDA not in available:
        logger.warning("CUDA requested but ONNX Runtime has no CUDA provider; using the CPU")
    return [p for p in (_CUDA, _CPU) if p in available]


class OnnxPredictor:
    """An ONNX Runtime session plus the manifest that says how to feed it.

    Build with :meth:`from_folder`; one instance may serve many volumes (the session is reused).
    """

    def __init__(self, session: ort.InferenceSession, manifest: Manifest) -> None:
        inputs = [i.name for i in session.get_inputs()]
        outputs = [o.name for o in session.get_outputs()]
        if inputs != [manifest.input_name]:
            raise ValueError(
                f"ONNX inputs {inputs} differ from the manifest's {manifest.input_name}"
            )
        if not set(manifest.output_names) <= set(outputs):
            raise ValueError(
                f"ONNX outputs {outputs} lack the manifest's {list(manifest.output_names)}"
            )
        self.session = session
        self.manifest = manifest

    @classmethod
    def from_folder(
        cls, folder: str | os.PathLike[str], device: Device = "auto", threads: int | None = None
    ) -> OnnxPredictor:
        """Load ``folder/manifest.json`` and its ONNX file after checking the file's SHA-256.

        Args:
            folder: a segmenter artifact folder (``model.onnx`` + ``manifest.json``).
            device: ``"cpu"``; ``"cuda"`` (falls back to the CPU with a warning when ONNX Runtime
                has no CUDA provider); ``"auto"`` (CUDA when available, else CPU).
            threads: intra-op threads of the CPU provider (default: ONNX Runtime's choice).

        Raises:
            ValueError: not a segmenter, missing ONNX file, checksum mismatch, or I/O names that
                differ from the manifest.
        """
        root = Path(folder)
        manifest = Manifest.load(root)
        if manifest.kind != "segmenter" or manifest.onnx_file is None:
            raise ValueError(f"{root} holds a {manifest.kind}, not an ONNX segmenter")
        onnx_path = root / manifest.onnx_file
        if not onnx_path.is_file():
            raise ValueError(f"{onnx_path} is missing")
        digest = sha256_file(onnx_path)
        if digest != manifest.onnx_sha256:
            raise ValueError(
                f"{onnx_path} has SHA-256 {digest}, the manifest expects {manifest.onnx_sha256}: "
                "the file is corrupt or was replaced"
            )
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
        session = ort.InferenceSession(
            os.fspath(onnx_path), sess_options=options, providers=providers(device)
        )
        predictor = cls(session, manifest)
        logger.info("loaded %s on %s", onnx_path, predictor.device)
        return predictor

    @property
    def device(self) -> Literal["cpu", "cuda"]:
        """The device of the provider the session actually runs on."""
        return "cuda" if self.session.get_providers()[0] == _CUDA else "cpu"

    def predict(
        self,
        volume: np.ndarray,
        with_probabilities: bool = False,
        batch_size: int = 8,
        with_uncertainty: bool | None = None,
    ) -> Prediction:
        """Segment a volume slice by slice along ``manifest.axis``.

        The whole volume is normalised once (``manifest.normalisation``), then batches of slices
        are zero-padded to multiples of ``manifest.size_divisor``, run, cropped back and reduced
        to labels and clusters, so memory beyond the outputs is one batch of logits.

        Args:
            volume: X×Y×Z raw intensities (any real dtype), in the NIfTI's voxel order.
            with_probabilities: also return the L×X×Y×Z float32 softmax.
            batch_size: slices per ONNX Runtime call.
            with_uncertainty: return the normalised entropy; defaults to ``with_probabilities``.

        Returns:
            A :class:`Prediction` on the input's grid.

        Raises:
            ValueError: if ``volume`` is not 3D, is empty, or holds NaN or infinite values.
        """
        data = np.asarray(volume)
        if data.ndim != 3 or 0 in data.shape:
            raise ValueError(f"volume must be a non-empty X×Y×Z array, got shape {data.shape}")
        if not np.all(np.isfinite(data)):
            raise ValueError("volume holds NaN or infinite values")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if with_uncertainty is None:
            with_uncertainty = with_probabilities
        manifest = self.manifest
        axis = manifest.axis
        slices = np.moveaxis(normalise(data, manifest.normalisation), axis, 0)

        labels = np.empty(data.shape, dtype=np.uint8)
        clusters = np.empty(data.shape, dtype=np.uint8)
        probs = (
            np.empty((manifest.num_classes, *data.shape), dtype=np.float32)
            if with_probabilities
            else None
        )
        uncertainty = np.empty(data.shape, dtype=np.float32) if with_uncertainty else None
        # Views with the slicing axis first: writes through them land in X×Y×Z order.
        labels_view = np.moveaxis(labels, axis, 0)
        clusters_view = np.moveaxis(clusters, axis, 0)
        probs_view = None if probs is None else np.moveaxis(probs, axis + 1, 0)
        uncertainty_view = None if uncertainty is None else np.moveaxis(uncertainty, axis, 0)

        for start in range(0, slices.shape[0], batch_size):
            stop = min(start + batch_size, slices.shape[0])
            batch, size = pad_to_multiple(
                np.ascontiguousarray(slices[start:stop, None]), manifest.size_divisor
            )
            logits, scores = self.session.run(
                list(manifest.output_names), {manifest.input_name: batch}
            )
            logits = crop_to(logits, size)
            labels_view[start:stop] = logits.argmax(axis=1)
            clusters_view[start:stop] = crop_to(scores, size).argmax(axis=1)
            if probs_view is not None or uncertainty_view is not None:
                batch_probs = softmax(np.array(logits, dtype=np.float32))
                if probs_view is not None:
                    probs_view[start:stop] = batch_probs
                if uncertainty_view is not None:
                    uncertainty_view[start:stop] = normalised_entropy(batch_probs)
        return Prediction(labels, clusters, probs, uncertainty)
