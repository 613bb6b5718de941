"""The slice-interpolation prior fused with probe heads (:mod:`segassist.models.slice_prior`).

``python -m segassist.bench.slice_prior [--sets ...] [--heads linear mlp] [--seeds N] [--out DIR]``
writes ``DIR/fewshot.{md,json,png}`` (default ``bench/results/slice_prior/``).

The protocol of :mod:`segassist.bench.fewshot_heads` (slice propagation, k ∈ {1, 3, 5} slices
spread over the structures, Dice on the unlabelled slices; probe heads fitted on cached decoder
maps as the assist workflow does, with the assist workflow's probe steps unless ``--probe-steps``
says otherwise; the ``default`` profile's other probe and pretraining settings), with these rows
per (volume, k):

- ``<encoder> · <head>``: the probe alone (argmax of its softmax);
- ``… + prior``: fused with the prior of the labelled slices, the fusion scale chosen by
  leave-one-labelled-slice-out (:func:`segassist.models.slice_prior.choose_scale`; the default
  scale for ``k < 3``), as the assist workflow does;
- ``… + prior (s = 1)``: the same at the fixed default scale, to see what the choice adds;
- ``… + prior + components``: the ``+ prior`` labels with the objects the labelled voxels do not
  reach removed (:mod:`segassist.models.seeded_components`): the assist workflow's default;
- ``interpolation prior alone``: the prior's argmax (background where its weight is 0);
- fill-between-slices (ITK) for ``k ≥ 2``.

Encoders: a randomly initialised one (seed 0) and the modality's pool encoder (pretrained once,
cached; :data:`OBJECTIVE_PER_MODALITY`). The chosen scales are listed in the JSON
(``fusion_scales``) and the notes.
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import numpy as np

from segassist.bench.baselines import fill_between_slices, warm_up
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
from segassist.bench.fewshot_heads import HEAD_ROWS, _Cell
from segassist.bench.protocol import sparse_labels, spread_slices
from segassist.bench.report import ITK, RANDOM, machine_info, write_report
from segassist.models.datasets import Case, cache_dir, load_set
from segassist.models.features import FeatureMaps, apply_head, compute_feature_maps
from segassist.models.fewshot import FewShotConfig, fit_probe
from segassist.models.networks.segmenter import SegmenterNet
from segassist.models.pretrain import Encoder, PretrainConfig
from segassist.models.runtime.predictor import softmax
from segassist.models.seeded_components import keep_seeded_components
from segassist.models.slice_prior import DEFAULT_SCALE, fuse_with_prior

__all__ = ["OBJECTIVE_PER_MODALITY", "encoders_of", "main"]

logger = logging.getLogger(__name__)

PRIOR_ALONE = "interpolation prior alone"


def _probabilities(segmenter: SegmenterNet, features: FeatureMaps, axis: int) -> np.ndarray:
    """``L×X×Y×Z`` softmax of the head over every cached slice."""
    batches = [
        softmax(apply_head(segmenter, features, start, min(start + 16, features.num_slices)))
        for start in range(0, features.num_slices, 16)
    ]
    per_slice = np.concatenate(batches)  # S×L×A×B
    return np.moveaxis(np.swapaxes(per_slice, 0, 1), 1, axis + 1)


def _cells(
    state: _Run,
    scales: list[dict[str, object]],
    set_name: str,
    volume: _Volume,
    encoders: dict[str, Encoder],
    heads: Sequence[str],
) -> None:
    case = volume.case
    group = f"{set_name} · {case.name} · slice propagation"
    maps: dict[str, FeatureMaps] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, encoder in encoders.items():
            maps[name] = compute_feature_maps(encoder, volume.image, case.axis, Path(tmp) / name)
        for k in state.profile.ks:
            labelled = spread_slices(volume.label, case.axis, k)
            sparse = sparse_labels(volume.label, case.axis, labelled)
            cell = _Cell(set_name, group, volume, k, labelled)
            if k >= 2:
                began = time.perf_counter()
                filled = fill_between_slices(sparse, case.axis)
                state.record(cell.row(ITK, 0, filled, time.perf_counter() - began))
            uniform = np.full((case.num_classes, *sparse.shape), 1 / case.num_classes, np.float32)
            began = time.perf_counter()
            alone = fuse_with_prior(uniform, sparse, case.axis, scale=DEFAULT_SCALE)
            state.record(cell.row(PRIOR_ALONE, 0, alone.labels, time.perf_counter() - began))
            for name, encoder in encoders.items():
                for head in heads:
                    for seed in range(state.profile.seeds):
                        config = FewShotConfig.from_dict(
                            state.profile.finetune.to_dict()
                            | {"head": head, "seed": seed, "axis": case.axis}
                        )
                        began = time.perf_counter()
                        segmenter = fit_probe(
                            encoder, [maps[name]], [sparse], case.num_classes, config
                        )
                        fit_s = time.perf_counter() - began
                        probs = _probabilities(segmenter, maps[name], case.axis)
                        method = f"{name} · {HEAD_ROWS[head]}"
                        state.record(cell.row(method, seed, probs.argmax(0), fit_s))
                        began = time.perf_counter()
                        fused = fuse_with_prior(probs, sparse, case.axis)
                        fuse_s = time.perf_counter() - began
                        state.record(
                            cell.row(f"{method} + prior", seed, fused.labels, fit_s + fuse_s)
                        )
                        fixed = fuse_with_prior(probs, sparse, case.axis, scale=DEFAULT_SCALE)
                        state.record(
                            cell.row(f"{method} + prior (s = 1)", seed, fixed.labels, fit_s)
                        )
                        began = time.perf_counter()
                        kept, _, _ = keep_seeded_components(fused.labels, sparse)
                        seconds = fit_s + fuse_s + time.perf_counter() - began
                        state.record(
                            cell.row(f"{method} + prior + components", seed, kept, seconds)
                        )
                        scales.append(
                            {"group": group, "method": method, "k": k, "seed": seed,
                             "fusion_seconds": round(fuse_s, 3), **fused.choice.to_dict()}
                        )  # fmt: skip


def encoders_of(state: _Run, set_name: str, case: Case, pretrained: bool) -> dict[str, Encoder]:
    """A random-init encoder (seed 0) and, with ``pretrained``, the modality's pool encoder
    (:data:`OBJECTIVE_PER_MODALITY`), by row name."""
    changes = {"modality": case.modality, "seed": 0, "axis": 2}
    config = PretrainConfig.from_dict(state.profile.pretrain.to_dict() | changes)
    encoders = {RANDOM: Encoder.random(config)}
    if pretrained:
        objective = OBJECTIVE_PER_MODALITY[case.modality]
        state.selected[set_name] = objective
        encoders[objective] = _pool_encoder(state, case.modality, objective)
    return encoders


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m segassist.bench.slice_prior", description=__doc__
    )
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--sets", nargs="*", default=["tptbox-spine", "totalseg-ct", "totalseg-mr"])
    parser.add_argument("--heads", nargs="*", choices=list(HEAD_ROWS), default=["linear", "mlp"])
    parser.add_argument("--out", type=Path, default=RESULTS / "slice_prior")
    parser.add_argument("--no-pretrained", action="store_true", help="random-init encoder only")
    parser.add_argument(
        "--probe-steps",
        type=int,
        default=FewShotConfig().linear_steps,
        help="full-batch steps of each probe (default: the assist workflow's)",
    )
    add_pretrain_steps_argument(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    default = with_pretrain_steps(PROFILES["default"], args.pretrain_steps)
    probe = default.finetune.model_copy(update={"linear_steps": args.probe_steps})
    profile = replace(default, seeds=args.seeds, finetune=probe)
    state = _Run(profile, EncoderCache(cache_dir() / "encoders"), extras=False)
    scales: list[dict[str, object]] = []
    began = time.perf_counter()
    warm_up()
    for set_name in args.sets:
        for case in load_set(set_name):
            volume = _Volume.load(case)
            encoders = encoders_of(state, set_name, case, not args.no_pretrained)
            _cells(state, scales, set_name, volume, encoders, args.heads)
    command = shlex.join(
        ["python", "-m", "segassist.bench.slice_prior", *(sys.argv[1:] if argv is None else argv)]
    )
    context = {
        "command": command,
        "profile": {"name": "default (probe rows + slice prior)", "seeds": profile.seeds},
        "wall_seconds": time.perf_counter() - began,
        "machine": machine_info(),
        "selected": state.selected,
        "finetune": profile.finetune.to_dict(),
        "fusion_scales": scales,
    }
    chosen: dict[tuple[int, float], int] = {}
    for entry in scales:
        key = (int(str(entry["k"])), float(str(entry["scale"])))
        chosen[key] = chosen.get(key, 0) + 1
    notes = [
        "- `+ prior`: fused with the interpolation prior, scale by leave-one-labelled-slice-out "
        f"(k ≥ 3) or the default s = {DEFAULT_SCALE} (k < 3); `+ prior (s = 1)`: fixed scale.",
        "- Chosen scales (k, s: cells): "
        + ", ".join(f"k={k} s={s}: {n}" for (k, s), n in sorted(chosen.items()))
        + ".",
        "- Fusion wall time per volume (scale choice included): "
        + ", ".join(
            f"{g}: {np.mean([float(str(e['fusion_seconds'])) for e in scales if e['group'] == g]):.2f} s"
            for g in dict.fromkeys(str(e["group"]) for e in scales)
        )
        + ".",
        "- ± is over head seeds; every encoder was pretrained (or drawn) once.",
    ]
    for path in write_report(args.out, state.rows, state.cache.records, context, notes).values():
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
