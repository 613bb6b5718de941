"""The background refinement's candidates for a labelled image, and the choice between them.

Given ``P`` (``L×X×Y×Z``), the labels propagated from the labelled slices through the encoder's
maps (:mod:`segassist.models.propagation`), and ``N``, the softmax of a network trained from
scratch on the same slices:

- ``"propagation"``: ``P`` (what the assist returned);
- ``"blend"`` (:func:`span_blend`): ``N`` on the slices from the first labelled slice to the
  last (the labelled span), and beyond it the normalised geometric mean of the two experts,
  ``B_l = √(P_l·N_l) / Σ_m √(P_m·N_m)`` (log-linear pooling with equal weights; both floored at
  :data:`FLOOR`).

  Their errors differ, and by where a slice lies. Propagation drifts with the distance to a
  labelled slice. The network, with labelled slices on both sides of a slice between them,
  interpolates; beyond the last labelled slice it extrapolates, and there it finds the
  structure where it has ended (look-alike tissue). Measured per slice (``REFINE_SCRATCH``'s
  network, corrected by prior and components, seed 0, k = 3, Dice by distance ``d`` to the
  nearest labelled slice): between the labelled slices, spine CT propagation 0.83/0.68/0.53 at
  d = 1–2/3–4/5–7 against the network's 0.82/0.80/0.80, brain MR 0.86/0.78/0.74 against
  0.93/0.92/0.92, abdominal CT 0.91/0.85/0.82 against 0.89/0.86/0.83; beyond the span, on
  abdominal CT the network scored 0.52 at d = 8–11 where propagation kept 0.78, and it put the
  organs into the 58 slices past them where there are none; brain MR 0.73 against the
  blend's 0.83 at d = 12–16. Under the product a class needs the support of both experts, which
  removes the network's extrapolations; between the labelled slices it would also pull the
  network towards propagation's drift. Against the geometric mean everywhere (used until
  2026-12-07; 2 seeds, 5 volumes, k = 3/5, 17 runs, the pick on the held-out slice): mean
  0.844 → 0.855; spine CT 0.753/0.796 → 0.793/0.858 and spine MR 0.689/0.680 → 0.733/0.740 at
  k = 3 (seeds 0/1), brain MR +0.01, spine at k = 5 within ±0.01, abdominal CT −0.005 to
  −0.018, TotalSegmentator MR −0.002 to −0.005. The geometric mean had itself beaten the
  arithmetic mean ``(P + N)/2`` (0.828 vs 0.821 over 20 runs of the 100-step network): under
  the mean one confident expert outvotes a doubtful one.

Each is corrected by the image's own labels as the assist corrects (prior, components), scored
on a held-out labelled slice (:mod:`segassist.models.held_out_slice`), and :func:`choose` keeps
the better, a tie going to propagation (no network needed).

The network alone, on every slice, is no candidate, though on the spine it beats the
geometric mean: the held-out slice cannot judge it against propagation. Hiding the middle of k
labelled slices doubles the gap propagation must cross, and propagation decays with distance
far faster than a network does. Measured (``bench/results/refine_candidates/refine.md``, the
100-step network, 2 seeds): on abdominal CT at k = 3, propagation scored 0.25 on the hidden
slice and 0.85 on the unlabelled ones, the network 0.46 and 0.45, so the held-out choice would
have swapped 0.85 for 0.45. With the 300-step network the held-out slice still favours it
wrongly: offered as a third candidate (5 volumes, k = 3/5, 2 seeds), it won 15 of 20 choices,
on abdominal CT, TotalSegmentator MR and the brain as on the spine, and the pick's mean Dice
fell from 0.850 to 0.822. Trusting propagation less with the distance to the nearest labelled
slice (weight ``exp(−d/2)``, the network the rest, beyond the span as within it) helped the
spine (CT 0.774/0.837) but cost abdominal CT 0.16/0.12: the network's losses are beyond the
span, which :func:`span_blend` leaves to both experts.

With fewer than 3 labelled slices nothing can be held out, so the assist's answer stands. Always
blending there, unvalidated (k = 1/2, 2 seeds), gained 0.08 to 0.15 on the spine and the brain but
cost abdominal CT 0.17/0.10 and TotalSegmentator MR 0.07 at k = 1 (mean over the 5 volumes
0.691 → 0.702 at k = 1, 0.685 → 0.738 at k = 2): not done.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import numpy as np
import torch

from segassist.models.networks.segmenter import SegmenterNet
from segassist.models.runtime.predictor import softmax
from segassist.models.runtime.preprocess import crop_to, pad_to_multiple
from segassist.models.threads import torch_threads
from segassist.models.volumes import annotated_slices

__all__ = [
    "CANDIDATES",
    "FLOOR",
    "candidates",
    "choose",
    "geometric_mean",
    "network_probabilities",
    "span_blend",
]

CANDIDATES = ("propagation", "blend")
"""Every candidate, cheapest first."""


FLOOR = 1e-6
"""Smallest probability either expert contributes to the blend's product (a softmax that
underflows to 0 must not veto a class alone)."""


def geometric_mean(first: np.ndarray, second: np.ndarray) -> np.ndarray:
    """``√(a_l·b_l) / Σ_m √(a_m·b_m)`` over the class axis 0 of two ``L×…`` probability arrays
    (each floored at :data:`FLOOR`), float32."""
    pooled = np.maximum(first, FLOOR, dtype=np.float32)
    pooled *= np.maximum(second, FLOOR, dtype=np.float32)
    np.sqrt(pooled, out=pooled)
    pooled /= pooled.sum(axis=0, keepdims=True)
    return pooled


def span_blend(
    propagated: np.ndarray, network: np.ndarray, labelled: Sequence[int], axis: int
) -> np.ndarray:
    """The ``"blend"`` (module doc) of ``L×X×Y×Z`` probabilities: ``network`` on the slices along
    ``axis`` from the first to the last of the ``labelled`` slice indices, their
    :func:`geometric_mean` on the others; float32."""
    if propagated.shape != network.shape:
        raise ValueError(f"shapes differ: {propagated.shape} vs {network.shape}")
    if not labelled:
        raise ValueError("no labelled slice: the span between labelled slices is empty")
    blended = geometric_mean(propagated, network)
    span = [slice(None)] * blended.ndim
    span[axis + 1] = slice(min(labelled), max(labelled) + 1)
    blended[tuple(span)] = network[tuple(span)]
    return blended


def candidates(
    propagated: np.ndarray, network: np.ndarray, sparse: np.ndarray, axis: int
) -> dict[str, np.ndarray]:
    """Candidate name → ``L×X×Y×Z`` probabilities, from the propagated and the network's ones
    (same shape) and the ``X×Y×Z`` sparse labels both were made from (``IGNORE_INDEX`` =
    unlabelled) along ``axis``."""
    return {
        "propagation": propagated,
        "blend": span_blend(propagated, network, annotated_slices(sparse, axis), axis),
    }


def choose(scores: Mapping[str, float]) -> str:
    """The candidate with the highest score; on a tie the earliest in :data:`CANDIDATES`."""
    ranked = [name for name in CANDIDATES if name in scores]
    if not ranked:
        raise ValueError(f"no candidate among {sorted(scores)}")
    return max(ranked, key=lambda name: (scores[name], -ranked.index(name)))


@torch.no_grad()
def network_probabilities(
    segmenter: SegmenterNet,
    volume: np.ndarray,
    axis: int,
    batch_size: int = 8,
    before_batch: Callable[[], None] | None = None,
) -> np.ndarray:
    """``L×X×Y×Z`` softmax of ``segmenter`` over a normalised ``X×Y×Z`` volume, slice by slice
    along ``axis``, ``batch_size`` slices at a time; ``before_batch`` is called before each
    batch (the worker's cancellation check: a volume takes seconds on one thread)."""
    segmenter.eval().cpu()
    slices = np.ascontiguousarray(np.moveaxis(volume, axis, 0), dtype=np.float32)
    out = []
    with torch_threads(1):
        for start in range(0, len(slices), batch_size):
            if before_batch is not None:
                before_batch()
            batch, size = pad_to_multiple(
                slices[start : start + batch_size, None], segmenter.encoder.size_divisor
            )
            logits, _ = segmenter(torch.from_numpy(batch))
            out.append(softmax(crop_to(logits.numpy(), size)))
    return np.moveaxis(np.concatenate(out), 0, axis + 1)
