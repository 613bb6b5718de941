"""What the background refinement holds in memory on large images: its candidates made at once
(the code before 2026-12-08) against one at a time (the worker's, ``worker/refine.py``).

``python -m segassist.bench.refine_memory [--set totalseg-ct] [--zooms 1 2 4] [--k 5]`` writes
``bench/results/refine_memory.md``.

Each row is the set's first volume zoomed in-plane (image linear, labels nearest), ``k``
labelled slices spread over its structures, and the two phases of a refinement that hold whole
volumes of class probabilities, both with the functions the worker calls:

- **validate**: the middle labelled slice hidden, the propagation from the others, the
  network's softmax on every slice, both candidates corrected as the assist corrects (slice
  prior, seeded components) and scored on the hidden slice;
- **predict**: the same from every labelled slice, the blend corrected with its uncertainty
  (the network's softmax here from :func:`~segassist.models.refinement.network_probabilities`;
  the worker's ONNX predictor returns an array of the same size).

*At once*: :func:`~segassist.models.refinement.candidates` (a fresh blend), every array kept
until the end, and each candidate copied before the correction, as the prior copied its input
before (the blend itself is today's, one class at a time: the old one's full-size temporary is
not reproduced, so the prediction's old peak is understated); *one at a time*: the blend written over one expert's array, the prior
fusing over its input (``reuse``), each candidate scored and dropped before the next. Both give
the same scores and labels (checked per row). The encoder's maps and the network are untrained
(:meth:`Encoder.random`; a one-step fit builds the network the refinement would, pooled as
``scratch_max_side`` says): memory does not depend on their weights. Peak: the largest
NumPy allocation total :mod:`tracemalloc` saw during the phase, above what was held when it
began (the volume, its labels, the maps' memory map not counted), in GB and in bytes per voxel.
"""

from __future__ import annotations

import argparse
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TypeVar

import numpy as np

from segassist.bench.fewshot import RESULTS, _Volume
from segassist.bench.propagation_grid import _zoomed
from segassist.bench.protocol import sparse_labels, spread_slices
from segassist.bench.report import machine_text, regenerate_command, write_table
from segassist.models.datasets import load_set
from segassist.models.features import FeatureMaps, compute_feature_maps
from segassist.models.fewshot import fit_segmenter
from segassist.models.held_out_slice import hold_out_middle_slice
from segassist.models.networks.segmenter import SegmenterNet
from segassist.models.pretrain import Encoder
from segassist.models.propagation import map_features, propagate
from segassist.models.refinement import candidates, geometric_mean, network_probabilities
from segassist.models.runtime.configs import REFINE_SCRATCH, FewShotConfig, PretrainConfig
from segassist.worker.assist import _with_own_labels, propagation_settings
from segassist.worker.refine import _hidden_dice

__all__ = ["main"]

OUT = RESULTS / "refine_memory.md"

_T = TypeVar("_T")


def _peak(run: Callable[[], _T]) -> tuple[_T, float]:
    """``run()``'s result and the peak bytes NumPy allocated during it above the start."""
    tracemalloc.start()
    began, _ = tracemalloc.get_traced_memory()
    tracemalloc.reset_peak()
    try:
        result = run()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return result, float(peak - began)


def _as_before(probabilities: np.ndarray) -> np.ndarray:
    """A copy of ``probabilities`` in their layout: what the prior fused into before it could
    reuse its input."""
    return np.array(probabilities, dtype=np.float32)


def _phases(
    maps: FeatureMaps,
    network: SegmenterNet,
    volume: _Volume,
    sparse: np.ndarray,
    config: FewShotConfig,
    one_at_a_time: bool,
) -> tuple[dict[str, float], dict[str, float], np.ndarray]:
    """(peak bytes per phase, hidden-slice Dice per candidate, the final labels)."""
    case = volume.case
    hidden = hold_out_middle_slice(sparse, case.axis)
    if hidden is None:
        raise ValueError("fewer than 3 labelled slices: nothing to hold out")

    def spread(labels: np.ndarray) -> np.ndarray:
        return propagate(
            map_features(maps), labels, case.axis, case.num_classes, propagation_settings(config)
        ).probabilities

    def validate() -> dict[str, float]:
        propagated = spread(hidden.labels)
        network_says = network_probabilities(network, volume.image, case.axis)
        if not one_at_a_time:
            made = candidates(propagated, network_says)
            return {
                name: _hidden_dice(_as_before(p), hidden, case.axis, config, 0.0)
                for name, p in made.items()
            }
        blend = geometric_mean(propagated, network_says, out=network_says)
        del network_says
        scores = {"blend": _hidden_dice(blend, hidden, case.axis, config, 0.0)}
        del blend
        scores["propagation"] = _hidden_dice(propagated, hidden, case.axis, config, 0.0)
        return scores

    def predict() -> np.ndarray:
        network_says = network_probabilities(network, volume.image, case.axis)
        propagated = spread(sparse)
        if not one_at_a_time:  # both experts' arrays lived on through the correction
            blend = _as_before(candidates(propagated, network_says)["blend"])
            return _with_own_labels(blend, sparse, case.axis, config, 0.0)[0]
        blend = geometric_mean(propagated, network_says, out=propagated)
        del network_says, propagated
        return _with_own_labels(blend, sparse, case.axis, config, 0.0)[0]

    scores, validate_peak = _peak(validate)
    labels, predict_peak = _peak(predict)
    return {"validate": validate_peak, "predict": predict_peak}, scores, labels


def _rows(set_name: str, zooms: Sequence[int], k: int) -> list[str]:
    case = load_set(set_name)[0]
    base = _Volume.load(case)
    config = FewShotConfig(axis=case.axis)
    rows = []
    for zoom in zooms:
        volume = _zoomed(base, zoom)
        labelled = spread_slices(volume.label, case.axis, k)
        sparse = sparse_labels(volume.label, case.axis, labelled)
        encoder = Encoder.random(PretrainConfig(modality=case.modality))
        one_step = FewShotConfig.for_scratch(**(REFINE_SCRATCH | {"steps": 1}), axis=case.axis)
        network = fit_segmenter(
            Encoder.random(encoder.config, encoder.normalisation),
            [volume.image],
            [sparse],
            case.num_classes,
            "finetune",
            one_step,
        )
        with tempfile.TemporaryDirectory() as folder:
            began = time.perf_counter()
            maps = compute_feature_maps(encoder, volume.image, case.axis, Path(folder))
            print(f"×{zoom} {volume.image.shape}: maps in {time.perf_counter() - began:.0f} s")
            before, before_scores, before_labels = _phases(
                maps, network, volume, sparse, config, one_at_a_time=False
            )
            after, after_scores, after_labels = _phases(
                maps, network, volume, sparse, config, one_at_a_time=True
            )
        same = before_scores == after_scores and np.array_equal(before_labels, after_labels)
        voxels = volume.image.size
        for phase in ("validate", "predict"):
            cells = [
                f"{peak[phase] / 1e9:.2f} GB ({peak[phase] / voxels:.0f} B)"
                for peak in (before, after)
            ]
            rows.append(
                f"| {case.name} ×{zoom} ({'×'.join(map(str, volume.image.shape))}, "
                f"{voxels / 1e6:.1f} M) | {case.num_classes} | {phase} | {cells[0]} | "
                f"{cells[1]} | {'yes' if same else 'NO'} |"
            )
            print(rows[-1])
    return rows


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m segassist.bench.refine_memory", description=__doc__
    )
    parser.add_argument("--set", default="totalseg-ct")
    parser.add_argument("--zooms", nargs="*", type=int, default=[1, 2, 4])
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args(argv)
    rows = _rows(args.set, args.zooms, args.k)
    text = "\n".join(
        [
            "# The refinement's peak memory: candidates at once or one at a time",
            "",
            f"Regenerate: `{regenerate_command('segassist.bench.refine_memory', argv)}`",
            "",
            f"Machine: {machine_text()}. k = {args.k} labelled slices. Peak NumPy allocations "
            "during each phase above its start (tracemalloc), in GB and bytes per voxel; the "
            "classes include the background. 'same': both ways gave the same hidden-slice "
            "scores and final labels.",
            "",
            "| image | classes | phase | at once | one at a time | same |",
            "|---|---|---|---|---|---|",
            *rows,
            "",
        ]
    )
    write_table(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
