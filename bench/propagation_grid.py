"""What propagating a large image on a pooled in-plane grid costs in Dice, and what it saves in time.

``python -m segassist.bench.propagation_grid [--sets ...] [--large-sets ...] [--large-zoom 4]``
writes
``bench/results/propagation_grid.md``.

The assist workflow propagates a labelled image on a grid of at most
``FewShotConfig.propagation_max_voxels`` voxels (:attr:`PropagationConfig.max_voxels`): slices
pooled in-plane by a factor ``f``, probabilities brought back to full resolution. Two tables:

1. **The benchmark's volumes at f = 1, 2, 3**: the protocol of
   :mod:`segassist.bench.default_path` (slice propagation, k ∈ {1, 3, 5}, Dice on the unlabelled
   slices, the modality's pool encoder) and the chain the assist runs (propagation, slice prior,
   seeded components), the budget set so that the grid factor is ``f``. These volumes are about
   120×100 in-plane: at f = 2–3 a structure spans 2–3× fewer grid pixels than a 512×512 CT does
   at the default budget (f = 5, 103×103), so this is the harsher case.
2. **Large images**: each volume of ``--large-sets`` zoomed ``--large-zoom``-fold in-plane
   (image linear, labels nearest), its maps computed at that size; the default budget (4 M
   voxels) against full resolution. Wall times of the encoder's maps and of the whole chain.

Deterministic: one run per cell.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from scipy import ndimage

from segassist.bench.default_answer import OBJECTIVE_PER_MODALITY
from segassist.bench.fewshot import PROFILES, RESULTS, EncoderCache, _pool_encoder, _Run, _Volume
from segassist.bench.protocol import mean_dice, slice_propagation_dice, sparse_labels, spread_slices
from segassist.bench.report import machine_text, regenerate_command, write_table
from segassist.models.datasets import Case, cache_dir, load_set
from segassist.models.features import FeatureMaps, compute_feature_maps
from segassist.models.pretrain import Encoder
from segassist.models.propagation import PropagationConfig, grid_factor, map_features, propagate
from segassist.models.runtime.configs import FewShotConfig
from segassist.models.seeded_components import keep_seeded_components
from segassist.models.slice_prior import DEFAULT_SCALE, fuse_with_prior

__all__ = ["main"]

FACTORS = (1, 2, 3)


def _budget(shape: tuple[int, ...], axis: int, factor: int) -> int:
    """The voxel budget whose grid factor is ``factor`` for a volume of ``shape``."""
    h, w = (size for i, size in enumerate(shape) if i != axis)
    return int(shape[axis] * -(-h // factor) * -(-w // factor))


def _default_chain(
    maps: FeatureMaps,
    volume: _Volume,
    case: Case,
    k: int,
    max_voxels: int | None,
) -> tuple[float, float]:
    """(Dice on the unlabelled slices, seconds) of propagation → prior → components."""
    labelled = spread_slices(volume.label, case.axis, k)
    sparse = sparse_labels(volume.label, case.axis, labelled)
    began = time.perf_counter()
    spread = propagate(
        map_features(maps),
        sparse,
        case.axis,
        case.num_classes,
        PropagationConfig(max_voxels=max_voxels),
    )
    fused = fuse_with_prior(spread.probabilities, sparse, case.axis, DEFAULT_SCALE)
    kept, _, _ = keep_seeded_components(fused.labels, sparse)
    seconds = time.perf_counter() - began
    per_class = slice_propagation_dice(kept, volume.label, case.axis, labelled, list(case.classes))
    return mean_dice(per_class), seconds


def _zoomed(volume: _Volume, zoom: int) -> _Volume:
    """``volume`` zoomed ``zoom``-fold along both in-plane axes (image linear, labels
    nearest)."""
    factors = [1.0 if i == volume.case.axis else float(zoom) for i in range(3)]
    image = ndimage.zoom(volume.image, factors, order=1).astype(np.float32)
    label = ndimage.zoom(volume.label, factors, order=0).astype(np.uint8)
    return _Volume(volume.case, image, label)


def _factor_rows(state: _Run, sets: list[str]) -> list[str]:
    lines = [
        "| volume | k | " + " | ".join(f"f = {f}" for f in FACTORS) + " | seconds |",
        "|---|---|" + "---|" * len(FACTORS) + "---|",
    ]
    for set_name in sets:
        for case in load_set(set_name):
            volume = _Volume.load(case)
            encoder = _pool_encoder(state, case.modality, OBJECTIVE_PER_MODALITY[case.modality])
            with tempfile.TemporaryDirectory() as tmp:
                maps = compute_feature_maps(encoder, volume.image, case.axis, Path(tmp))
                for k in (1, 3, 5):
                    runs = [
                        _default_chain(
                            maps, volume, case, k, _budget(volume.image.shape, case.axis, f)
                        )
                        for f in FACTORS
                    ]
                    dice = " | ".join(f"{d:.3f}" for d, _ in runs)
                    seconds = " / ".join(f"{s:.1f}" for _, s in runs)
                    shape = "×".join(str(n) for n in volume.image.shape)
                    lines.append(f"| {case.name} ({shape}) | {k} | {dice} | {seconds} |")
                    print(lines[-1], flush=True)
    return lines


def _large_rows(state: _Run, sets: list[str], zoom: int) -> list[str]:
    default = FewShotConfig().propagation_max_voxels
    lines = [
        "| volume | k | grid | maps s | Dice (default budget) | chain s | Dice (full) "
        "| chain s (full) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for case in (case for set_name in sets for case in load_set(set_name)):
        volume = _zoomed(_Volume.load(case), zoom)
        encoder: Encoder = _pool_encoder(
            state, case.modality, OBJECTIVE_PER_MODALITY[case.modality]
        )
        h, w = (n for i, n in enumerate(volume.image.shape) if i != case.axis)
        factor = grid_factor(volume.image.shape[case.axis], (h, w), default)
        with tempfile.TemporaryDirectory() as tmp:
            began = time.perf_counter()
            maps = compute_feature_maps(encoder, volume.image, case.axis, Path(tmp))
            maps_seconds = time.perf_counter() - began
            for k in (1, 3, 5):
                pooled, pooled_s = _default_chain(maps, volume, case, k, default)
                full, full_s = _default_chain(maps, volume, case, k, None)
                shape = "×".join(str(n) for n in volume.image.shape)
                lines.append(
                    f"| {case.name} ×{zoom} ({shape}) | {k} | f = {factor} ({-(-h // factor)}×"
                    f"{-(-w // factor)}) | {maps_seconds:.1f} | {pooled:.3f} | {pooled_s:.1f} "
                    f"| {full:.3f} | {full_s:.1f} |"
                )
                print(lines[-1], flush=True)
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m segassist.bench.propagation_grid", description=__doc__
    )
    parser.add_argument(
        "--sets", nargs="*", default=["tptbox-spine", "totalseg-ct", "totalseg-mr", "mni-tissue"]
    )
    parser.add_argument(
        "--large-sets", nargs="*", default=["totalseg-ct", "tptbox-spine", "mni-tissue"]
    )
    parser.add_argument("--large-zoom", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS / "propagation_grid.md")
    args = parser.parse_args(argv)
    state = _Run(PROFILES["default"], EncoderCache(cache_dir() / "encoders"), extras=False)
    factors = _factor_rows(state, args.sets)
    large = _large_rows(state, args.large_sets, args.large_zoom) if args.large_zoom > 1 else []
    command = regenerate_command("segassist.bench.propagation_grid", argv)
    machine = machine_text()
    text = "\n".join(
        [
            "# Propagation on a pooled in-plane grid",
            "",
            f"Regenerate: `{command}`",
            "",
            f"Machine: {machine}. Mean Dice over classes on the unlabelled slices after the "
            "assist's chain (propagation, slice prior, seeded components); seconds: the chain's "
            "wall time.",
            "",
            "## The benchmark's volumes, slices pooled f-fold",
            "",
            *factors,
            "",
            *(
                [
                    f"## Large images: {', '.join(args.large_sets)} zoomed ×{args.large_zoom} "
                    "in-plane, "
                    f"default budget ({FewShotConfig().propagation_max_voxels:,} voxels) "
                    "against full resolution",
                    "",
                    *large,
                    "",
                ]
                if large
                else []
            ),
        ]
    )
    write_table(args.out, text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
