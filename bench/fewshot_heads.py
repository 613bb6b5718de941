"""Probe heads on frozen encoders: the rows of the few-shot benchmark that decide the default head.

``python -m segassist.bench.fewshot_heads [--heads linear mlp auto] [--seeds N] [--out DIR]`` writes
``DIR/fewshot.{md,json,png}`` (default ``bench/results/heads/``).

The protocol of :mod:`segassist.bench.fewshot` (slice propagation, k ∈ {1, 3, 5} slices spread over the
structures, Dice on the unlabelled slices), its ``default`` profile's probe settings, pool
encoders and encoder cache, but only the probe rows, run as the assist workflow runs them: the
encoder computes every slice's decoder maps once per volume (:func:`compute_feature_maps`), and
each (k, seed, head) cell fits the head on the cached maps (:func:`fit_probe`) and applies it to
them (:func:`apply_head`). Rows: each ``--heads`` entry on the modality's pool encoder
(``--pretrained`` modalities), on a randomly initialised encoder (the control; one draw, seed 0,
so ± is over head seeds only), and fill-between-slices for reference. The objective per set is
the one the last full default run selected as best (``bench/results/fewshot.md``;
``--objective`` overrides it), so no selection happens here.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from segassist.bench.baselines import fill_between_slices, warm_up
from segassist.bench.fewshot import PROFILES, RESULTS, EncoderCache, _pool_encoder, _Run, _Volume
from segassist.bench.protocol import mean_dice, slice_propagation_dice, sparse_labels, spread_slices
from segassist.bench.report import ITK, RANDOM, Row, write_report
from segassist.models.datasets import cache_dir, load_set
from segassist.models.features import FeatureMaps, apply_head, compute_feature_maps
from segassist.models.fewshot import FewShotConfig, fit_probe
from segassist.models.objectives import OBJECTIVES
from segassist.models.pretrain import Encoder, PretrainConfig

__all__ = ["OBJECTIVE_PER_SET", "main"]

logger = logging.getLogger(__name__)

OBJECTIVE_PER_SET = {
    "tptbox-spine": "iic_boundary",
    "totalseg-ct": "pix2rep_barlow",
    "mni-tissue": "pix2rep",
}
"""Best objective per set of the last full default run (``bench/results/fewshot.md``)."""

HEAD_ROWS = {"linear": "linear", "mlp": "linear, mlp head", "auto": "linear, auto head"}


def _predict(segmenter: object, features: FeatureMaps, axis: int, batch: int = 16) -> np.ndarray:
    """Argmax labels ``X×Y×Z`` of the head over every cached slice."""
    out = [
        apply_head(segmenter, features, start, min(start + batch, features.num_slices)).argmax(1)  # type: ignore[arg-type]
        for start in range(0, features.num_slices, batch)
    ]
    return np.moveaxis(np.concatenate(out).astype(np.uint8), 0, axis)


@dataclass(frozen=True)
class _Cell:
    """One (volume, k) cell of slice propagation."""

    set_name: str
    group: str
    volume: _Volume
    k: int
    labelled: list[int]

    def row(self, method: str, seed: int, prediction: np.ndarray, seconds: float) -> Row:
        case = self.volume.case
        dice = slice_propagation_dice(
            prediction, self.volume.label, case.axis, self.labelled, list(case.classes)
        )
        by_name = {case.classes[c]: v for c, v in dice.items()}
        return Row(self.set_name, self.group, "slice propagation", method, self.k, seed,
                   by_name, mean_dice(dice), seconds, self.labelled)  # fmt: skip


def _cells(
    state: _Run,
    set_name: str,
    volume: _Volume,
    encoder: Encoder,
    name: str,
    heads: Sequence[str],
    with_itk: bool,
) -> None:
    case = volume.case
    group = f"{set_name} · {case.name} · slice propagation"
    with tempfile.TemporaryDirectory() as tmp:
        features = compute_feature_maps(encoder, volume.image, case.axis, Path(tmp) / "maps")
        for k in state.profile.ks:
            labelled = spread_slices(volume.label, case.axis, k)
            sparse = sparse_labels(volume.label, case.axis, labelled)

            if with_itk and k >= 2:
                began = time.perf_counter()
                filled = fill_between_slices(sparse, case.axis)
                cell = _Cell(set_name, group, volume, k, labelled)
                state.record(cell.row(ITK, 0, filled, time.perf_counter() - began))
            for head in heads:
                for seed in range(state.profile.seeds):
                    config = FewShotConfig.from_dict(
                        state.profile.finetune.to_dict()
                        | {"head": head, "seed": seed, "axis": case.axis}
                    )
                    began = time.perf_counter()
                    segmenter = fit_probe(encoder, [features], [sparse], case.num_classes, config)
                    seconds = time.perf_counter() - began
                    prediction = _predict(segmenter, features, case.axis)
                    method = f"{name} · {HEAD_ROWS[head]}"
                    cell = _Cell(set_name, group, volume, k, labelled)
                    state.record(cell.row(method, seed, prediction, seconds))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m segassist.bench.fewshot_heads", description=__doc__
    )
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--sets", nargs="*", default=list(OBJECTIVE_PER_SET))
    parser.add_argument("--heads", nargs="*", choices=list(HEAD_ROWS), default=list(HEAD_ROWS))
    parser.add_argument("--out", type=Path, default=RESULTS / "heads")
    parser.add_argument(
        "--pretrained",
        nargs="*",
        default=["CT", "MR"],
        help="modalities whose pool encoder is pretrained (or reused) for the probe rows",
    )
    parser.add_argument("--no-random", action="store_true", help="skip the random-init rows")
    parser.add_argument(
        "--objective", choices=OBJECTIVES, help="one objective for every set (default: per set)"
    )
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    profile = replace(PROFILES["default"], seeds=args.seeds)
    state = _Run(profile, EncoderCache(cache_dir() / "encoders"), extras=False)
    began = time.perf_counter()
    warm_up()
    for set_name in args.sets:
        objective = args.objective or OBJECTIVE_PER_SET[set_name]
        state.selected[set_name] = objective
        for case in load_set(set_name):
            volume = _Volume.load(case)
            itk = True
            if not args.no_random:
                changes = {"modality": case.modality, "seed": 0, "axis": 2}
                random = Encoder.random(
                    PretrainConfig.from_dict(profile.pretrain.to_dict() | changes)
                )
                _cells(state, set_name, volume, random, RANDOM, args.heads, itk)
                itk = False
            if case.modality in args.pretrained:
                encoder = _pool_encoder(state, case.modality, objective)
                _cells(state, set_name, volume, encoder, objective, args.heads, itk)
    command = shlex.join(
        ["python", "-m", "segassist.bench.fewshot_heads", *(sys.argv[1:] if argv is None else argv)]
    )
    context = {
        "command": command,
        "profile": {"name": "default (probe rows)", "seeds": profile.seeds, "ks": [1, 3, 5]},
        "wall_seconds": time.perf_counter() - began,
        "selected": state.selected,
        "finetune": profile.finetune.to_dict(),
    }
    notes = [
        "- Probe rows only, fitted and applied on cached decoder maps as the assist workflow "
        "does; objective per set (fixed, not selected here): "
        + ", ".join(f"{s}: {o}" for s, o in state.selected.items())
        + ".",
        "- ± is over head seeds; every encoder was pretrained (or drawn) once.",
    ]
    for path in write_report(args.out, state.rows, state.cache.records, context, notes).values():
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
