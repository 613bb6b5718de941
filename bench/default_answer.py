"""What the assist workflow leaves an annotator with, computed with the worker's own functions.

For a labelled image within ``propagation_max_voxels`` the assist (``worker/assist.py``)
propagates the labelled slices through the encoder's maps
(:func:`~segassist.models.propagation.propagate`), fuses the result with the interpolation
prior (:func:`~segassist.models.slice_prior.fuse_with_prior`) and keeps the seeded components
(:func:`~segassist.models.seeded_components.keep_seeded_components`). With at least 3 labelled
slices (:data:`~segassist.models.held_out_slice.MIN_LABELLED_SLICES`) the background refinement (``worker/refine.py``) then trains a scratch network
(``REFINE_SCRATCH``, one thread) with the middle labelled slice hidden, scores each candidate of
:func:`~segassist.models.refinement.candidates` on it, :func:`~segassist.models.refinement.choose`
s, and rebuilds the winner from every labelled slice: that is the annotator's final answer.
"""

from __future__ import annotations

import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from segassist.models.chain_cache import ChainCache
from segassist.models.datasets import Case
from segassist.models.features import FeatureMaps
from segassist.models.fewshot import FewShotConfig, fit_segmenter
from segassist.models.held_out_slice import hold_out_middle_slice
from segassist.models.pretrain import Encoder
from segassist.models.propagation import map_features, propagate
from segassist.models.refinement import candidates, choose, network_probabilities
from segassist.models.runtime.configs import REFINE_SCRATCH
from segassist.models.seeded_components import keep_seeded_components
from segassist.models.slice_prior import DEFAULT_SCALE, fuse_with_prior
from segassist.models.threads import torch_threads

__all__ = [
    "DEFAULT_OBJECTIVE",
    "OBJECTIVE_PER_MODALITY",
    "DefaultAnswer",
    "default_answer",
]

OBJECTIVE_PER_MODALITY = {"CT": "iic_boundary", "MR": "pix2rep"}
"""Pool encoder per modality of the benchmarks of the default path: the objectives of the last
probe-head run (``bench/results/heads/fewshot.md``: iic_boundary on both CT sets, pix2rep on
MNI). The service itself pretrains :data:`DEFAULT_OBJECTIVE` unless a job names another."""

DEFAULT_OBJECTIVE = "pix2rep"
"""The service's pretraining objective (``worker/pipelines.py``), for other modalities."""


def _corrected(probabilities: np.ndarray, sparse: np.ndarray, axis: int) -> np.ndarray:
    """The assist's correction of propagated or blended probabilities (``X×Y×Z`` labels)."""
    fused = fuse_with_prior(probabilities, sparse, axis, DEFAULT_SCALE)
    return keep_seeded_components(fused.labels, sparse)[0]


def _propagated(
    maps: FeatureMaps, sparse: np.ndarray, case: Case, chains: ChainCache
) -> np.ndarray:
    """``L×X×Y×Z`` probabilities propagated from ``sparse`` (``X×Y×Z``, 255 = unlabelled),
    reading and storing ``chains`` as the worker does."""
    propagated = propagate(map_features(maps), sparse, case.axis, case.num_classes, chains=chains)
    return propagated.probabilities


def _candidate_labels(
    encoder: Encoder,
    image: np.ndarray,
    sparse: np.ndarray,
    propagated: np.ndarray,
    case: Case,
    seed: int,
    scratch: Mapping[str, Any],
) -> dict[str, np.ndarray]:
    """Each refinement candidate's corrected labels from ``sparse`` and its ``propagated``
    probabilities, the network being a scratch fit (``REFINE_SCRATCH`` with ``scratch`` on top,
    seed ``seed``, one thread) on the normalised ``image``."""
    config = FewShotConfig.for_scratch(
        **(REFINE_SCRATCH | dict(scratch)), axis=case.axis, seed=seed
    )
    initial = Encoder.random(
        encoder.config.model_copy(update={"seed": seed}), encoder.normalisation
    )
    with torch_threads(1):
        network = fit_segmenter(initial, [image], [sparse], case.num_classes, "finetune", config)
    made = candidates(propagated, network_probabilities(network, image, case.axis))
    return {name: _corrected(p, sparse, case.axis) for name, p in made.items()}


@dataclass(frozen=True)
class DefaultAnswer:
    """The annotator's final labels and how they were reached.

    Attributes:
        labels: ``X×Y×Z`` class indices.
        method: ``"propagation"`` (the assist's answer stands) or ``"blend"``.
        held_out: the hidden labelled slice's index (None below
            :data:`~segassist.models.held_out_slice.MIN_LABELLED_SLICES`).
        validation: candidate → Dice on the hidden labelled slice (empty below
            :data:`~segassist.models.held_out_slice.MIN_LABELLED_SLICES`).
        candidates: candidate → its labels from every labelled slice (empty below
            :data:`~segassist.models.held_out_slice.MIN_LABELLED_SLICES`).
        assist_seconds: wall time of the assist's propagation and corrections.
        refine_seconds: wall time of the refinement (two fits, candidates, corrections); 0 when
            none runs.
    """

    labels: np.ndarray
    method: str
    held_out: int | None
    validation: dict[str, float]
    candidates: dict[str, np.ndarray]
    assist_seconds: float
    refine_seconds: float


def default_answer(
    encoder: Encoder,
    maps: FeatureMaps,
    image: np.ndarray,
    sparse: np.ndarray,
    case: Case,
    seed: int,
    scratch: Mapping[str, Any] | None = None,
) -> DefaultAnswer:
    """The assist's answer for ``sparse``, replaced by the refinement's pick when it runs
    (``scratch``: few-shot settings of its network on top of ``REFINE_SCRATCH``). The
    propagation from every labelled slice is computed once, for the assist and the refinement's
    final candidates (the worker reads it back from the assist's stored chains), so
    ``refine_seconds`` leaves it out; the refinement's propagation without the hidden slice
    reads the assist's chains that do not cross it (:mod:`segassist.models.chain_cache`), as
    in the worker. Each call starts with no stored chains: labels the worker sees first."""
    with tempfile.TemporaryDirectory() as stored:  # these labels are new to the worker
        chains = ChainCache(Path(stored))
        began = time.perf_counter()
        propagated = _propagated(maps, sparse, case, chains)
        assisted = _corrected(propagated, sparse, case.axis)
        assist_seconds = time.perf_counter() - began
        hidden = hold_out_middle_slice(sparse, case.axis)
        if hidden is None:  # fewer than MIN_LABELLED_SLICES: no refinement
            return DefaultAnswer(assisted, "propagation", None, {}, {}, assist_seconds, 0.0)
        began = time.perf_counter()
        reduced = _propagated(maps, hidden.labels, case, chains)
        validation = {
            name: hidden.dice(labels)
            for name, labels in _candidate_labels(
                encoder, image, hidden.labels, reduced, case, seed, scratch or {}
            ).items()
        }
        winner = choose(validation)
        final = _candidate_labels(encoder, image, sparse, propagated, case, seed, scratch or {})
        refine_seconds = time.perf_counter() - began
        return DefaultAnswer(
            final[winner], winner, hidden.index, validation, final, assist_seconds, refine_seconds
        )
