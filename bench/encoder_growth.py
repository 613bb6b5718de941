"""Whether an encoder should keep pretraining when new volumes of its modality arrive.

``python -m segassist.bench.encoder_growth [--sets ...] [--steps S] [--more G] [--seeds ...]
[--out FILE]`` writes ``bench/results/encoder_growth.md``.

Each labelled volume ``T`` of the sets plays the new arrival; its modality's pretraining pool
``P`` (:func:`segassist.models.datasets.load_pool`, which holds ``T``) plays the unit's images.
Three pix2rep encoders (the default profile's pretraining settings):

- **reused**: pretrained on ``P \\ {T}`` for ``S`` steps, what the service reuses for ``T``
  when nothing pretrains again;
- **+G, same volumes**: that run continued from its checkpoint (weights, optimiser state and
  step count, as the service's background continuation resumes) for ``G`` more steps on
  ``P \\ {T}``: longer pretraining alone;
- **+G, T added**: the same continuation on ``P``: pretraining again once the dataset grew.

Each is scored by the assist's chain on ``T`` (:func:`segassist.bench.default_path.chain_dice`:
propagation → slice prior → seeded components, k = 1/3/5 slices, Dice on the unlabelled
slices). The last two columns differ only by ``T`` being in the data. Every pretraining seed of
``--seeds`` (default 0 and 1) makes its own three encoders: how much two runs of one recipe
differ is the scale a difference between columns must beat. Encoders and checkpoints are kept
under ``<cache>/encoders/growth`` (an interrupted run resumes, a repeated one only scores).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shutil
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from segassist.bench.default_path import chain_dice
from segassist.bench.fewshot import PROFILES, RESULTS, _fingerprint, _Volume, pool_volumes
from segassist.bench.report import write_markdown
from segassist.models.datasets import cache_dir, load_set
from segassist.models.pretrain import CHECKPOINT_NAME, Encoder, PretrainConfig, pretrain

__all__ = ["main"]

logger = logging.getLogger(__name__)

VARIANTS = ("reused", "same volumes", "T added")


def _key(volumes: Sequence[np.ndarray], config: PretrainConfig, seed_key: str) -> str:
    """Cache key of a pretraining: its data, config and the checkpoint it resumes."""
    spec = {"data": _fingerprint(volumes), "config": config.to_dict(), "resumes": seed_key}
    return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]


def _pretrained(
    folder: Path, volumes: list[np.ndarray], config: PretrainConfig, seed: tuple[str, Path] | None
) -> tuple[str, Encoder, float]:
    """``(key, encoder, seconds)``: pretrained on ``volumes`` up to ``config.steps``, resuming
    from the checkpoint ``seed`` names (its key, its file) when given; cached in ``folder``,
    the run's checkpoint kept beside it for continuations."""
    key = _key(volumes, config, seed[0] if seed else "")
    weights, work = folder / f"{key}.pt", folder / f"{key}.work"
    seconds_file = folder / f"{key}.seconds"
    if weights.is_file() and (work / CHECKPOINT_NAME).is_file():
        return key, Encoder.load(weights), float(seconds_file.read_text())
    work.mkdir(parents=True, exist_ok=True)
    if seed is not None and not (work / CHECKPOINT_NAME).is_file():
        shutil.copy2(seed[1], work / CHECKPOINT_NAME)
    began = time.perf_counter()
    encoder = pretrain(volumes, config, work)
    seconds = time.perf_counter() - began
    encoder.save(weights)
    seconds_file.write_text(f"{seconds:.1f}")
    return key, encoder, seconds


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m segassist.bench.encoder_growth", description=__doc__
    )
    parser.add_argument(
        "--sets", nargs="*", default=["tptbox-spine", "totalseg-ct", "totalseg-mr", "mni-tissue"]
    )
    parser.add_argument("--steps", type=int, default=500, help="S, steps of the reused encoder")
    parser.add_argument("--more", type=int, default=500, help="G, steps of the continuation")
    parser.add_argument("--seeds", type=int, nargs="*", default=[0, 1], help="pretraining seeds")
    parser.add_argument("--out", type=Path, default=RESULTS / "encoder_growth.md")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    folder = cache_dir() / "encoders" / "growth"
    lines = [
        "| volume | seed | k | " + " | ".join(VARIANTS) + " | T added − same volumes |",
        "|---|---|---|" + "---|" * len(VARIANTS) + "---|",
    ]
    gains: dict[str, list[float]] = {}
    timings = []
    for set_name in args.sets:
        for case in load_set(set_name):
            pool = pool_volumes(case.modality)
            if case.image not in pool:
                raise ValueError(f"{case.name}: {case.image} is not in the {case.modality} pool")
            others = [v for path, v in pool.items() if path != case.image]
            volume = _Volume.load(case)
            for seed in args.seeds:
                config = PretrainConfig.from_dict(
                    PROFILES["default"].pretrain.to_dict()
                    | {"objective": "pix2rep", "axis": 2, "seed": seed, "modality": case.modality}
                )
                longer = config.model_copy(update={"steps": args.steps + args.more})
                key, reused, s0 = _pretrained(
                    folder, others, config.model_copy(update={"steps": args.steps}), None
                )
                start = (key, folder / f"{key}.work" / CHECKPOINT_NAME)
                _, same, s1 = _pretrained(folder, others, longer, start)
                _, grown, s2 = _pretrained(folder, list(pool.values()), longer, start)
                timings.append(f"{case.name} seed {seed}: {s0:.0f} s, {s1:.0f} s, {s2:.0f} s")
                scores = [
                    {k: dice[-1] for k, dice, _ in chain_dice(encoder, volume)}
                    for encoder in (reused, same, grown)
                ]
                for k in scores[0]:
                    cells = " | ".join(f"{s[k]:.3f}" for s in scores)
                    gain = scores[2][k] - scores[1][k]
                    gains.setdefault(case.name, []).append(gain)
                    lines.append(f"| {case.name} | {seed} | {k} | {cells} | {gain:+.3f} |")
                    print(lines[-1], flush=True)
    summary = "; ".join(
        f"{name} {np.mean(values):+.3f} (range {min(values):+.3f} to {max(values):+.3f})"
        for name, values in gains.items()
    )
    everything = [g for values in gains.values() for g in values]
    write_markdown(
        args.out,
        "Pretraining again when a volume arrives",
        "segassist.bench.encoder_growth",
        argv,
        f"pix2rep, S = {args.steps} steps on the pool without the volume (reused), then "
        f"G = {args.more} more from its checkpoint on the same volumes or with the volume "
        "added. Mean Dice over classes on the unlabelled slices after the assist's chain "
        "(propagation → prior → components).",
        [
            *lines,
            "",
            f"T added − same volumes, mean over seeds and k: {summary}; all "
            f"{np.mean(everything):+.3f} over {len(everything)} cells, "
            f"{sum(g > 0 for g in everything)} of them positive.",
            "",
            "Pretraining wall time (reused, then same volumes, then T added): "
            + "; ".join(timings),
        ],
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
