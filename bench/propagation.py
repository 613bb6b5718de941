"""Label propagation through feature affinity (:mod:`segassist.models.propagation`) against and
with the MLP probe and the slice prior.

``python -m segassist.bench.propagation [--sets ...] [--seeds N] [--out DIR]`` writes
``DIR/fewshot.{md,json,png}`` (default ``bench/results/propagation/``).

The protocol of :mod:`segassist.bench.slice_prior` (slice propagation, k ∈ {1, 3, 5} slices
spread over the structures, Dice on the unlabelled slices; the MLP probe head fitted on cached
decoder maps; a random-init encoder and the modality's pool encoder), with these rows per
(volume, k, encoder):

- ``<encoder> · mlp``: the probe alone; ``… + prior``: fused with the interpolation prior as
  the assist workflow does (:func:`segassist.models.slice_prior.fuse_with_prior`);
- ``… · propagation (fine)`` / ``(all maps)``: propagation alone on decoder map 0 / on every map
  upsampled (:func:`segassist.models.propagation.map_features`); deterministic, one row each;
- ``… propagation (…) × prior``: propagation fused with the interpolation prior (fixed scale 1:
  leave-one-out would score the propagation on the neighbours of the slice it starts from);
- ``… mlp × propagation (…)``: product of experts ``log p_probe + w(z)·log p_prop`` (scale 1);
  ``… mlp + prior × propagation (…)``: the same with the probe+prior fusion as the model.

The ``s`` column is the wall time of fitting the probe (probe rows) or of propagating
(propagation rows, both directions, whole volume).
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

from segassist.bench.baselines import warm_up
from segassist.bench.fewshot import PROFILES, RESULTS, EncoderCache, _Run, _Volume
from segassist.bench.fewshot_heads import _Cell
from segassist.bench.protocol import sparse_labels, spread_slices
from segassist.bench.report import machine_info, write_report
from segassist.bench.slice_prior import PRIOR_ALONE, _probabilities, encoders_of
from segassist.models.datasets import cache_dir, load_set
from segassist.models.features import FeatureMaps, compute_feature_maps
from segassist.models.fewshot import FewShotConfig, fit_probe
from segassist.models.pretrain import Encoder
from segassist.models.propagation import Propagation, map_features, propagate
from segassist.models.slice_prior import DEFAULT_SCALE, fuse, fuse_with_prior, safe_log

__all__ = ["main"]

logger = logging.getLogger(__name__)

FEATURES = {"fine": "fine", "all": "all maps"}
"""Features propagated (:func:`segassist.models.propagation.map_features`) → row label."""


def _product(model: np.ndarray, propagation: Propagation, axis: int) -> np.ndarray:
    """Argmax ``X×Y×Z`` of ``log p_model + w(z)·log p_prop`` (product of experts, scale 1)."""
    out = np.moveaxis(model, axis + 1, 1).copy()  # L×S×A×B
    prop = np.moveaxis(propagation.probabilities, axis + 1, 1)
    for z in range(out.shape[1]):
        weight = float(propagation.weight[z])
        if weight > 0:
            out[:, z] = fuse(safe_log(out[:, z]), safe_log(prop[:, z]), weight)
    return np.moveaxis(out.argmax(0).astype(np.uint8), 0, axis)


def _cells(
    state: _Run,
    timings: list[dict[str, object]],
    set_name: str,
    volume: _Volume,
    encoders: dict[str, Encoder],
) -> None:
    case = volume.case
    axis = case.axis
    group = f"{set_name} · {case.name} · slice propagation"
    with tempfile.TemporaryDirectory() as tmp:
        maps: dict[str, FeatureMaps] = {
            name: compute_feature_maps(encoder, volume.image, axis, Path(tmp) / name)
            for name, encoder in encoders.items()
        }
        for k in state.profile.ks:
            labelled = spread_slices(volume.label, axis, k)
            sparse = sparse_labels(volume.label, axis, labelled)
            cell = _Cell(set_name, group, volume, k, labelled)
            uniform = np.full((case.num_classes, *sparse.shape), 1 / case.num_classes, np.float32)
            alone = fuse_with_prior(uniform, sparse, axis, scale=DEFAULT_SCALE)
            state.record(cell.row(PRIOR_ALONE, 0, alone.labels, 0.0))
            for name, encoder in encoders.items():
                propagated: dict[str, Propagation] = {}
                for which in FEATURES:
                    began = time.perf_counter()
                    result = propagate(
                        map_features(maps[name], which), sparse, axis, case.num_classes
                    )
                    seconds = time.perf_counter() - began
                    propagated[which] = result
                    method = f"{name} · propagation ({FEATURES[which]})"
                    state.record(cell.row(method, 0, result.labels, seconds))
                    timings.append({"group": group, "encoder": name, "features": which, "k": k,
                                    "seconds": round(seconds, 3)})  # fmt: skip
                    with_prior = fuse_with_prior(result.probabilities, sparse, axis, DEFAULT_SCALE)
                    state.record(cell.row(f"{method} × prior", 0, with_prior.labels, seconds))
                for seed in range(state.profile.seeds):
                    config = FewShotConfig.from_dict(
                        state.profile.finetune.to_dict()
                        | {"head": "mlp", "seed": seed, "axis": axis}
                    )
                    began = time.perf_counter()
                    segmenter = fit_probe(encoder, [maps[name]], [sparse], case.num_classes, config)
                    fit_s = time.perf_counter() - began
                    probs = _probabilities(segmenter, maps[name], axis)
                    method = f"{name} · mlp"
                    state.record(cell.row(method, seed, probs.argmax(0), fit_s))
                    with_prior = fuse_with_prior(probs, sparse, axis)
                    state.record(cell.row(f"{method} + prior", seed, with_prior.labels, fit_s))
                    for which, prop in propagated.items():
                        fused = _product(probs, prop, axis)
                        label = f"propagation ({FEATURES[which]})"
                        state.record(cell.row(f"{method} × {label}", seed, fused, fit_s))
                        three = _product(with_prior.probabilities, prop, axis)
                        state.record(cell.row(f"{method} + prior × {label}", seed, three, fit_s))


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m segassist.bench.propagation", description=__doc__
    )
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--sets", nargs="*", default=["tptbox-spine", "totalseg-ct", "totalseg-mr"])
    parser.add_argument("--out", type=Path, default=RESULTS / "propagation")
    parser.add_argument("--no-pretrained", action="store_true", help="random-init encoder only")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    profile = replace(PROFILES["default"], seeds=args.seeds)
    state = _Run(profile, EncoderCache(cache_dir() / "encoders"), extras=False)
    timings: list[dict[str, object]] = []
    began = time.perf_counter()
    warm_up()
    for set_name in args.sets:
        for case in load_set(set_name):
            volume = _Volume.load(case)
            encoders = encoders_of(state, set_name, case, not args.no_pretrained)
            _cells(state, timings, set_name, volume, encoders)
    command = shlex.join(
        ["python", "-m", "segassist.bench.propagation", *(sys.argv[1:] if argv is None else argv)]
    )
    context = {
        "command": command,
        "profile": {
            "name": "default (mlp probe, slice prior, propagation)",
            "seeds": profile.seeds,
        },
        "wall_seconds": time.perf_counter() - began,
        "machine": machine_info(),
        "selected": state.selected,
        "finetune": profile.finetune.to_dict(),
        "propagation_seconds": timings,
    }
    per_volume: dict[str, list[float]] = {}
    for entry in timings:
        key = f"{str(entry['group']).split(' · ')[1]} ({entry['features']})"
        per_volume.setdefault(key, []).append(float(str(entry["seconds"])))
    notes = [
        "- Propagation: r = 4 (9×9 window), top-10, τ = 0.05, no distance limit, floor 0.01; "
        "`× …` rows fuse at scale 1; `mlp + prior`: the scale chosen by leave-one-out as in "
        "the workflow.",
        "- Propagation wall time per volume (mean over k and encoders; the machine was shared): "
        + ", ".join(f"{key}: {np.mean(v):.2f} s" for key, v in per_volume.items())
        + ".",
        "- ± is over probe seeds; propagation alone is deterministic (seed 0 only).",
    ]
    for path in write_report(args.out, state.rows, state.cache.records, context, notes).values():
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
