"""The background refinement's candidates for a labelled image, and the choice between them.

Given ``P`` (``L×X×Y×Z``), the labels propagated from the labelled slices through the encoder's
maps (:mod:`segassist.models.propagation`), and ``N``, the softmax of a network trained from
scratch on the same slices:

- ``"propagation"``: ``P`` (what the assist returned);
- ``"scratch"``: ``N``;
- ``"blend"``: ``(P + N) / 2``, a mean of the two experts. Their errors differ (propagation drifts
  with the distance to a labelled slice, the network confuses look-alike tissue far from it),
  and on the spine and brain volumes of the benchmark the blend beat both at k = 1 and on brain
  at every k (``bench/results/refine/refine.md``).

Each is then corrected by the image's own labels as the assist corrects (prior, components) and
scored on a held-out labelled slice (:mod:`segassist.models.held_out_slice`); :func:`choose`
keeps the best, ties going to the earlier candidate (the cheaper one: propagation needs no
network).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

__all__ = ["CANDIDATES", "candidates", "choose"]

CANDIDATES = ("propagation", "scratch", "blend")
"""Every candidate, cheapest first."""


def candidates(propagated: np.ndarray, network: np.ndarray) -> dict[str, np.ndarray]:
    """Candidate name → ``L×X×Y×Z`` probabilities, from the propagated and the network's ones
    (same shape)."""
    if propagated.shape != network.shape:
        raise ValueError(f"shapes differ: {propagated.shape} vs {network.shape}")
    return {
        "propagation": propagated,
        "scratch": network,
        "blend": (0.5 * (propagated + network)).astype(np.float32),
    }


def choose(scores: Mapping[str, float]) -> str:
    """The candidate with the highest score; on a tie the earliest in :data:`CANDIDATES`."""
    ranked = [name for name in CANDIDATES if name in scores]
    if not ranked:
        raise ValueError(f"no candidate among {sorted(scores)}")
    return max(ranked, key=lambda name: (scores[name], -ranked.index(name)))
