"""The background refinement's candidates for a labelled image, and the choice between them.

Given ``P`` (``L×X×Y×Z``), the labels propagated from the labelled slices through the encoder's
maps (:mod:`segassist.models.propagation`), and ``N``, the softmax of a network trained from
scratch on the same slices:

- ``"propagation"``: ``P`` (what the assist returned);
- ``"blend"``: the normalised geometric mean of the two experts,
  ``B_l = √(P_l·N_l) / Σ_m √(P_m·N_m)`` (log-linear pooling with equal weights; both floored at
  :data:`FLOOR`). Their errors differ: propagation drifts with the distance to a labelled slice,
  the network confuses look-alike tissue anywhere; under the product a class needs the support
  of both, where under the mean ``(P + N)/2`` one confident expert outvotes a doubtful one.
  Measured (the 100-step network of :data:`~segassist.models.runtime.configs.QUICK_SCRATCH`,
  corrected by prior and components, 2 seeds, k = 3/5):
  the product beat the mean on the spine (CT 0.753/0.833 vs 0.734/0.822, MR 0.681/0.773 vs
  0.661/0.773) and the brain (0.854/0.833 vs 0.836/0.822), and was within 0.003 of it on
  abdominal CT and TotalSegmentator MR; mean over the 20 runs 0.828 vs 0.821.

Each is corrected by the image's own labels as the assist corrects (prior, components), scored
on a held-out labelled slice (:mod:`segassist.models.held_out_slice`), and :func:`choose` keeps
the better, a tie going to propagation (no network needed).

The network alone is no candidate, though on the spine it beats the blend: the held-out slice
cannot judge it against propagation. Hiding the middle of k labelled slices doubles the gap
propagation must cross, and propagation decays with distance far faster than a network does.
Measured (``bench/results/refine_candidates/refine.md``, 2 seeds): on abdominal CT at k = 3,
propagation scored 0.25 on the hidden slice and 0.85 on the unlabelled ones, the network 0.46 and 0.45, so
the held-out choice would have swapped 0.85 for 0.45; the blend costs 0.05 there, and
gains 0.04 to 0.13 on the spine and brain volumes at k = 3 and 5. With the 300-step network
the held-out slice still favours it wrongly: offered as a third candidate (corrected like the
network path, 5 volumes, k = 3/5, 2 seeds), it won 15 of 20 choices, on abdominal CT,
TotalSegmentator MR and the brain as on the spine, and the pick's mean Dice fell from 0.850 to
0.822 (it gained only on spine MR at k = 3, 0.685 → 0.746). Trusting propagation less
with the distance to the nearest labelled slice (weight ``exp(−d/2)``, the network the rest)
helped the spine more (CT 0.774/0.837) but cost abdominal CT 0.16/0.12: not used.

Keeping the network alone between the first and last labelled slice and the product only
beyond them (where the network extrapolates) was measured and not kept (2026-12-07). Slice by
slice, between the labelled slices the network held where propagation drifted (spine CT
0.80 vs 0.53 at 5–7 slices from a labelled one), and beyond them it found organs that had
ended (abdominal CT 0.52 vs 0.78). On the benchmark's volumes (3 seeds, 30 runs) the pick rose
from 0.846 to 0.856: spine CT 0.760 → 0.801 and spine MR 0.677 → 0.726 at k = 3, brain MR
+0.011/+0.019, abdominal CT −0.011/−0.003, TotalSegmentator MR −0.003/−0.008. On two tasks
outside the benchmark, both on CT with the service's own pix2rep encoder, the network alone
between the labelled slices confused look-alike classes that the product keeps apart:
lumbar vertebrae L2, L3 and L4 as three classes (TPTBox CT, 5 slices; 0.735/0.736 against
the product's 0.773/0.782, 2 seeds; the held-out slice chose it, so the annotator got 0.735
where propagation alone gave 0.777), and the aorta with the T12 vertebra (TotalSegmentator's
aorta-report CT, 6 slices; 0.631 against 0.708, propagation 0.796, kept by the held-out
slice). Letting the held-out slice choose among the three (propagation, product, network
between) gave 0.855 on the benchmark's 20 runs of 2 seeds (product 0.850, network between
0.861) and kept propagation on the vertebrae, but lost on a held-back task (below).

Measured and not kept (2026-12-07), first on saved probabilities (the benchmark's 5 volumes
and 4 tasks held back from it, k = 3/5, 2 seeds, the held-out choice as here; held back: the
aorta with the T12 vertebra and the aorta's true and false lumen on TotalSegmentator's
aorta-report CT, lumbar vertebrae L2/L3/L4 on TPTBox CT, vertebrae C5–C7 with two discs on
TPTBox MR, all with pix2rep pool encoders as the service pretrains):

- a third candidate, ``P^¼·N^¾`` from the first to the last labelled slice and the blend
  beyond: the benchmark's pick 0.850 → 0.856 (spine MR 0.685 → 0.720 at k = 3), the held-back
  tasks 0.662 → 0.658 (true/false lumen at k = 5 0.810 → 0.793: the held-out slice favours
  whatever leans on the network); with the network alone between the slices, 0.855 and 0.655;
- requiring the blend to beat propagation on the held-out slice by a margin (0.02 to 0.2):
  neither set gained;
- two networks of different seeds, their softmax averaged before the blend: on the saved
  probabilities 0.850 → 0.854 and 0.662 → 0.667 (one pair against the mean of its two
  networks), but through the refinement benchmark (3 seeds, pairs 0/1, 2/3, 4/5, 30 runs) the
  pick's mean was 0.844 against one network's 0.846 (always blending 0.847 vs 0.845): the
  blend's spread over seeds shrank in 9 of 10 cells (mean std 0.011 vs 0.015), its mean did
  not move, and the refinement took twice the fits (36–284 s under load, against 19–86 s);
- self-training the network on propagation's confident labels (≥ 0.9) within 2 or 5 slices
  of a labelled one: the network alone on spine CT at k = 3 fell from 0.810 to 0.760/0.745
  (seed 0), as self-training on every slice had (``bench/results/refine_candidates``);
- the network between the labelled slices with each of its 2D objects moved to the foreground
  class propagation gives most probability within it (the blend beyond), meant to keep the
  network's shapes and propagation's identities (2026-12-07, recomputed, 2 seeds): always
  0.845 on the benchmark and 0.653 held back (the product's pick 0.842 and 0.656); as a third
  candidate 0.844 and 0.661; against the blend alone 0.844 and 0.669. It won on the vertebrae
  as classes (L2/L3/L4 at k = 3 +0.05, C5–C7 at k = 5 +0.05) and lost on the aorta (−0.05
  at k = 5): within the spread, not kept (README).

With fewer than 3 labelled slices nothing can be held out, so the assist's answer stands. Always
blending there, unvalidated (k = 1/2, 2 seeds), gained 0.08 to 0.15 on the spine and the brain but
cost abdominal CT 0.17/0.10 and TotalSegmentator MR 0.07 at k = 1 (mean over the 5 volumes
0.691 → 0.702 at k = 1, 0.685 → 0.738 at k = 2): not done.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import torch

from segassist.models.networks.segmenter import SegmenterNet
from segassist.models.runtime.predictor import softmax
from segassist.models.runtime.preprocess import crop_to, pad_to_multiple
from segassist.models.threads import torch_threads

__all__ = [
    "CANDIDATES",
    "FLOOR",
    "PREFERENCE",
    "PREVIOUS",
    "candidates",
    "choose",
    "geometric_mean",
    "network_probabilities",
]

CANDIDATES = ("propagation", "blend")
"""Every candidate made here, cheapest first."""

PREVIOUS = "previous"
"""The answer a refit replaced (:mod:`segassist.worker.refine`), scored by its own refinement on
the same hidden slices: a refit on a longer-trained encoder is kept only if it does better."""

PREFERENCE = (PREVIOUS, *CANDIDATES)
"""The order ties are broken in: what the annotator already has first, then the cheapest."""


FLOOR = 1e-6
"""Smallest probability either expert contributes to the blend's product (a softmax that
underflows to 0 must not veto a class alone)."""


def geometric_mean(
    first: np.ndarray, second: np.ndarray, out: np.ndarray | None = None
) -> np.ndarray:
    """``√(a_l·b_l) / Σ_m √(a_m·b_m)`` over the class axis 0 of two ``L×…`` probability arrays
    (each floored at :data:`FLOOR`), float32, written into ``out`` when given (it may be
    ``first`` or ``second``: a refinement of a 512×512×300 CT then holds two such arrays, not
    three). One class at a time: the temporaries are one class's size."""
    if out is None:
        out = np.empty_like(first, dtype=np.float32)  # in ``first``'s layout
    term = np.empty(first.shape[1:], dtype=np.float32)
    for c in range(first.shape[0]):
        np.maximum(second[c], FLOOR, out=term)
        np.maximum(first[c], FLOOR, out=out[c])
        out[c] *= term
        np.sqrt(out[c], out=out[c])
    total = out.sum(axis=0)
    for c in range(out.shape[0]):
        out[c] /= total
    return out


def candidates(propagated: np.ndarray, network: np.ndarray) -> dict[str, np.ndarray]:
    """Candidate name → ``L×X×Y×Z`` probabilities, from the propagated and the network's ones
    (same shape)."""
    if propagated.shape != network.shape:
        raise ValueError(f"shapes differ: {propagated.shape} vs {network.shape}")
    return {"propagation": propagated, "blend": geometric_mean(propagated, network)}


def choose(scores: Mapping[str, float]) -> str:
    """The candidate with the highest score; on a tie the earliest in :data:`PREFERENCE`."""
    ranked = [name for name in PREFERENCE if name in scores]
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
    batch (the worker's cancellation check: a volume takes seconds on one thread). The array
    is a view of a slice-major one (:func:`~segassist.models.slice_prior.fuse_with_prior`
    reuses it without a copy)."""
    segmenter.eval().cpu()
    slices = np.moveaxis(volume, axis, 0)
    out = np.empty((slices.shape[0], segmenter.num_classes, *slices.shape[1:]), np.float32)
    with torch_threads(1):
        for start in range(0, len(slices), batch_size):
            if before_batch is not None:
                before_batch()
            batch, size = pad_to_multiple(
                np.ascontiguousarray(slices[start : start + batch_size, None], np.float32),
                segmenter.size_divisor,
            )
            logits, _ = segmenter(torch.from_numpy(batch))
            out[start : start + batch_size] = softmax(crop_to(logits.numpy(), size))
    return np.moveaxis(out, 0, axis + 1)
