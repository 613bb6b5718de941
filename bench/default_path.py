"""What the assist workflow returns by default for a labelled image small enough to propagate.

``python -m segassist.bench.default_path [--sets ...] [--objective O] [--pretrain-steps N]
[--out FILE]`` writes ``bench/results/default_path.md``.

The protocol of :mod:`segassist.bench.slice_prior` (slice propagation, k ∈ {1, 3, 5} slices spread
over the structures, Dice on the unlabelled slices, the modality's 100-step pool encoder; another
objective for every modality with ``--objective``, a longer pretraining with
``--pretrain-steps``), and the
chain ``worker/assist.py`` runs on such an image: :func:`~segassist.models.propagation.propagate`
on decoder map 0, :func:`~segassist.models.slice_prior.fuse_with_prior` at the default strength,
:func:`~segassist.models.seeded_components.keep_seeded_components`. Deterministic: one run. Each
step's Dice is listed, and the wall time of the propagation.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path

from segassist.bench.default_answer import OBJECTIVE_PER_MODALITY
from segassist.bench.fewshot import (
    PROFILES,
    RESULTS,
    EncoderCache,
    _pool_encoder,
    _Run,
    _Volume,
    add_pretrain_steps_argument,
    with_pretrain_steps,
)
from segassist.bench.protocol import mean_dice, slice_propagation_dice, sparse_labels, spread_slices
from segassist.bench.report import write_markdown
from segassist.models.datasets import cache_dir, load_set
from segassist.models.features import compute_feature_maps
from segassist.models.objectives import OBJECTIVES
from segassist.models.pretrain import Encoder
from segassist.models.propagation import map_features, propagate
from segassist.models.seeded_components import keep_seeded_components
from segassist.models.slice_prior import DEFAULT_SCALE, fuse_with_prior

__all__ = ["STEPS", "chain_dice", "main"]

STEPS = ("propagation", "+ prior", "+ components")


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m segassist.bench.default_path", description=__doc__
    )
    parser.add_argument(
        "--sets", nargs="*", default=["tptbox-spine", "totalseg-ct", "totalseg-mr", "mni-tissue"]
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "default_path.md")
    parser.add_argument(
        "--objective",
        choices=sorted(OBJECTIVES),
        help="the pool encoders' objective on every modality (default: OBJECTIVE_PER_MODALITY)",
    )
    add_pretrain_steps_argument(parser)
    args = parser.parse_args(argv)
    profile = with_pretrain_steps(PROFILES["default"], args.pretrain_steps)
    state = _Run(profile, EncoderCache(cache_dir() / "encoders"), extras=False)
    lines = [
        "| volume | encoder | k | " + " | ".join(STEPS) + " | propagation s |",
        "|---|---|---|" + "---|" * len(STEPS) + "---|",
    ]
    for set_name in args.sets:
        for case in load_set(set_name):
            volume = _Volume.load(case)
            objective = args.objective or OBJECTIVE_PER_MODALITY[case.modality]
            encoder = _pool_encoder(state, case.modality, objective)
            for k, dice, seconds in chain_dice(encoder, volume):
                cells = " | ".join(f"{d:.3f}" for d in dice)
                lines.append(
                    f"| {case.name} | {objective} · {case.modality} pool, "
                    f"{args.pretrain_steps} steps | {k} | {cells} | {seconds:.1f} |"
                )
                print(lines[-1], flush=True)
    write_markdown(
        args.out,
        "The assist workflow's default for a labelled image within `propagation_max_voxels`",
        "segassist.bench.default_path",
        argv,
        "Mean Dice over classes on the unlabelled slices; the last Dice column is what the "
        "annotator gets.",
        lines,
    )
    return 0


def chain_dice(
    encoder: Encoder, volume: _Volume, ks: Sequence[int] = (1, 3, 5)
) -> Iterator[tuple[int, list[float], float]]:
    """``(k, Dice after each of STEPS, propagation seconds)`` of the assist's chain on
    ``volume`` with ``k`` labelled slices spread over its structures, for each k in ``ks``.
    Dice: mean over classes on the unlabelled slices."""
    case = volume.case
    with tempfile.TemporaryDirectory() as tmp:
        maps = compute_feature_maps(encoder, volume.image, case.axis, Path(tmp))
        for k in ks:
            labelled = spread_slices(volume.label, case.axis, k)
            sparse = sparse_labels(volume.label, case.axis, labelled)
            began = time.perf_counter()
            spread = propagate(map_features(maps), sparse, case.axis, case.num_classes)
            seconds = time.perf_counter() - began
            fused = fuse_with_prior(spread.probabilities, sparse, case.axis, DEFAULT_SCALE)
            kept, _, _ = keep_seeded_components(fused.labels, sparse)
            dice = [
                mean_dice(
                    slice_propagation_dice(
                        labels, volume.label, case.axis, labelled, list(case.classes)
                    )
                )
                for labels in (spread.labels, fused.labels, kept)
            ]
            yield k, dice, seconds


if __name__ == "__main__":
    raise SystemExit(main())
