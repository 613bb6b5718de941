"""``method="auto"`` on registry sets: what it picks, its Dice against each candidate alone, and
what it costs the assist loop.

``python -m segassist.bench.method_selection [--sets S…] [--ks 1 3] [--cases N] [--budget S]
[--objective O] [--timing-only] [--out FILE]`` appends one JSON line per (case, k) to ``FILE`` (default
``bench/results/method_selection.jsonl``) and logs a table.

Protocol of :mod:`segassist.bench.fewshot_heads` (slice propagation, ``k`` slices spread over
the structures, Dice on the unlabelled slices, the modality's pool encoder of the set's
objective, the ``default`` profile's few-shot settings), seed 0. Per cell:

- every candidate alone, fitted as the assist job fits it: the probe heads with
  :func:`fit_probe` on the cached maps, ``finetune`` with :func:`fit_segmenter` on the pool
  encoder, ``scratch`` with :func:`fit_segmenter` on a random encoder of the same architecture
  and :meth:`FewShotConfig.for_scratch` (the profile's keys on top, as auto does);
- :func:`select_method` with ``--budget`` seconds (enough for every candidate): its pick, every
  candidate's held-out Dice, and the pick's Dice on the unlabelled slices;
- the fit phase of the assist job with its own defaults (``FewShotConfig()``: 300 probe
  steps): the default linear probe, head ``"auto"`` and method ``"auto"`` within the default
  budget, seconds and Dice each (``--timing-only``: this part alone).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segassist.bench.baselines import warm_up
from segassist.bench.fewshot import PROFILES, RESULTS, EncoderCache, _pool_encoder, _Run, _Volume
from segassist.bench.fewshot import predict_volume as predict_network
from segassist.bench.fewshot_heads import OBJECTIVE_PER_SET
from segassist.bench.fewshot_heads import _predict as predict_probe
from segassist.bench.protocol import mean_dice, slice_propagation_dice, sparse_labels, spread_slices
from segassist.models.datasets import cache_dir, load_set
from segassist.models.features import FeatureMaps, compute_feature_maps
from segassist.models.fewshot import FewShotConfig, fit_probe, fit_segmenter, select_probe_head
from segassist.models.method_selection import select_method
from segassist.models.networks.segmenter import SegmenterNet
from segassist.models.objectives import OBJECTIVES
from segassist.models.pretrain import Encoder

__all__ = ["main"]

logger = logging.getLogger(__name__)


def _cell(
    volume: _Volume,
    encoder: Encoder,
    k: int,
    base: FewShotConfig,
    budget: float,
    timing_only: bool,
) -> dict[str, Any]:
    case = volume.case
    axis = case.axis
    labelled = spread_slices(volume.label, axis, k)
    sparse = sparse_labels(volume.label, axis, labelled)
    config = base.model_copy(update={"axis": axis})
    scratch_config = FewShotConfig.for_scratch(
        **config.model_dump(mode="json", include=config.model_fields_set | {"axis"})
    )
    random = Encoder.random(encoder.config, encoder.normalisation)
    classes = list(case.classes)
    out: dict[str, Any] = {"case": case.name, "k": k, "labelled": labelled}

    def dice(prediction: np.ndarray) -> float:
        scores = slice_propagation_dice(prediction, volume.label, axis, labelled, classes)
        return round(mean_dice(scores), 4)

    with tempfile.TemporaryDirectory() as tmp:
        maps = compute_feature_maps(encoder, volume.image, axis, Path(tmp) / "maps")
        if timing_only:
            out["assist_fit_seconds"] = _assist_fit(volume, encoder, random, maps, sparse, labelled)
            return out
        alone: dict[str, dict[str, float]] = {}
        for head in ("linear", "mlp"):
            began = time.perf_counter()
            probe = fit_probe(encoder, [maps], [sparse], case.num_classes, config.model_copy(
                update={"head": head}))  # fmt: skip
            seconds = time.perf_counter() - began
            alone[f"probe-{head}"] = {
                "dice": dice(predict_probe(probe, maps, axis)),
                "seconds": seconds,
            }
        for name, start, fit_config in (
            ("finetune", encoder, config),
            ("scratch", random, scratch_config),
        ):
            began = time.perf_counter()
            network = fit_segmenter(
                start, [volume.image], [sparse], case.num_classes, "finetune", fit_config
            )
            seconds = time.perf_counter() - began
            alone[name] = {
                "dice": dice(predict_network(network, volume.image, axis)),
                "seconds": seconds,
            }
        out["alone"] = {c: {k_: round(v, 4) for k_, v in r.items()} for c, r in alone.items()}

        began = time.perf_counter()
        choice = select_method(
            encoder, random, [volume.image], [sparse], case.num_classes,
            config.model_copy(update={"auto_budget_seconds": budget}), [maps],
        )  # fmt: skip
        out["auto"] = {
            "pick": choice.method,
            "seconds": round(time.perf_counter() - began, 3),
            "dice": dice(_predict(choice.segmenter, choice.method, maps, volume.image, axis)),
            "validation": choice.validation,
        }

        out["assist_fit_seconds"] = _assist_fit(volume, encoder, random, maps, sparse, labelled)
    return out


def _assist_fit(
    volume: _Volume,
    encoder: Encoder,
    random: Encoder,
    maps: FeatureMaps,
    sparse: np.ndarray,
    labelled: list[int],
) -> dict[str, Any]:
    """Seconds of the assist job's fit phase with its own defaults (:class:`FewShotConfig`, the
    slice axis set): the default linear probe, head ``"auto"`` (:func:`select_probe_head` then
    :func:`fit_probe`) and method ``"auto"`` within the default budget; each one's Dice."""
    case = volume.case
    config = FewShotConfig(axis=case.axis)
    classes = list(case.classes)

    def dice(prediction: np.ndarray) -> float:
        scores = slice_propagation_dice(prediction, volume.label, case.axis, labelled, classes)
        return round(mean_dice(scores), 4)

    began = time.perf_counter()
    linear = fit_probe(encoder, [maps], [sparse], case.num_classes, config)
    linear_seconds = time.perf_counter() - began
    began = time.perf_counter()
    head = select_probe_head(encoder, [maps], [sparse], case.num_classes, config).head
    auto_head = fit_probe(
        encoder, [maps], [sparse], case.num_classes, config.model_copy(update={"head": head})
    )
    head_seconds = time.perf_counter() - began
    began = time.perf_counter()
    quick = select_method(
        encoder, random, [volume.image], [sparse], case.num_classes, config, [maps]
    )
    return {
        "linear (default)": {
            "seconds": round(linear_seconds, 3),
            "dice": dice(predict_probe(linear, maps, case.axis)),
        },
        f"head auto ({head})": {
            "seconds": round(head_seconds, 3),
            "dice": dice(predict_probe(auto_head, maps, case.axis)),
        },
        f"method auto ({quick.method})": {
            "seconds": round(time.perf_counter() - began, 3),
            "dice": dice(_predict(quick.segmenter, quick.method, maps, volume.image, case.axis)),
            "validation": quick.validation,
        },
    }


def _predict(
    segmenter: SegmenterNet, method: str, maps: Any, image: np.ndarray, axis: int
) -> np.ndarray:
    """A probe on the cached maps (as the assist job predicts it), a network on the image."""
    if method.startswith("probe-"):
        return predict_probe(segmenter, maps, axis)
    return predict_network(segmenter, image, axis)


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m segassist.bench.method_selection", description=__doc__
    )
    parser.add_argument("--sets", nargs="*", default=["tptbox-spine"])
    parser.add_argument("--ks", nargs="*", type=int, default=[1, 3])
    parser.add_argument("--cases", type=int, default=1, help="cases per set (first N)")
    parser.add_argument("--budget", type=float, default=3600.0)
    parser.add_argument(
        "--timing-only", action="store_true", help="only the assist fit phase's seconds"
    )
    parser.add_argument(
        "--objective",
        choices=OBJECTIVES,
        help="pool encoder objective (default: the set's in OBJECTIVE_PER_SET)",
    )
    parser.add_argument("--out", type=Path, default=RESULTS / "method_selection.jsonl")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    profile = PROFILES["default"]
    state = _Run(profile, EncoderCache(cache_dir() / "encoders"), extras=False)
    warm_up()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    for set_name in args.sets:
        objective = args.objective or OBJECTIVE_PER_SET[set_name]
        for case in load_set(set_name)[: args.cases]:
            volume = _Volume.load(case)
            encoder = _pool_encoder(state, case.modality, objective)
            for k in args.ks:
                row = {
                    "set": set_name,
                    **_cell(volume, encoder, k, profile.finetune, args.budget, args.timing_only),
                }
                logger.info("%s", json.dumps(row))
                with args.out.open("a") as handle:
                    handle.write(json.dumps(row) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
