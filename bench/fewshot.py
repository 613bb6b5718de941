"""Few-shot segmentation benchmark: does dense self-supervised pretraining save annotation?

``python -m bench.fewshot [--profile quick|default|full] [--sets ...] [--dataset DIR ...]``
(also ``segassist bench fewshot ...``) writes ``bench/results/fewshot.{md,json,png}``.

Protocol (DESIGN.md, :mod:`bench.protocol`):

- Slice propagation, per volume: label ``k ∈ {1, 3, 5}`` slices spread over the structures'
  extent, predict the rest; Dice per class on the unlabelled slices.
- Cross-volume, per group of ≥ 2 volumes sharing modality and classes (MSD folders; none of the
  three registry sets qualifies: TPTBox's CT and MR differ in modality and spine region, the
  TotalSegmentator CT is one scan, MNI is one template): label ``k`` volumes, predict the others.
- Rows, side by side: ``random-init · finetune`` (the same U-Net from scratch, strongly augmented,
  :meth:`FewShotConfig.for_scratch`) and ``random-init · linear`` (a probe on random features,
  the control of what pretraining adds to the probe); each objective × {linear probe,
  fine-tune}; Mean Teacher on the best objective; ITK's fill-between-slices for ``k ≥ 2``.
- Extra rows (METHODS.md, "Where the few-shot gain may come from"), with the set's best
  objective: an MLP head and a multi-scale head on the frozen encoder, a multi-scale fine-tune,
  and an encoder pretrained on the modality's whole pool (every registry volume of that
  modality, :func:`models.datasets.load_pool`) — the product's "reuse an encoder" path.
- "Best objective" of a set: highest mean Dice over its linear and fine-tune rows (all volumes,
  ``k`` and seeds) — chosen on the test slices, so the Mean Teacher and extra rows carry a
  mild selection bias in their favour; the table says which objective was chosen.
- Encoders are pretrained on the set's own volumes of the modality (what the product does with a
  unit's unlabelled uploads), with seed 0: the ± is over few-shot seeds (head init, batches,
  augmentation, and the random-init network), not over pretraining runs. They are cached under
  ``<cache>/encoders/<key>.pt``, ``key`` = hash of (normalised data, objective, full config),
  and reused by later runs; the encoder table reports the original pretraining time.

Budget of the default profile (≤ 90 min on 2 cores). Step times measured on this machine
(2 logical cores, torch 2.13 CPU, 2 threads, *while ~8 other processes shared the cores*, so
they are pessimistic), default network channels 16-32-64-128:

- pretraining, batch 8 (two views each), crops up to 128×128: 0.9–1.3 s/step on 128×104
  slices (TotalSegmentator CT), 1.0–1.4 s/step on 104×120 (MNI); ~0.5 s on 80×80 (TPTBox).
- fine-tune, batch 4: ~0.11 s/step on 128×104 (scratch and pretrained alike); Mean Teacher
  ~0.3 s/step (two more forward passes and a backward on unlabelled slices); linear probe:
  ~0.01 s/step plus ~1 s of feature caching.

Pretraining: 4 modality groups (TPTBox CT, TPTBox MR, TotalSegmentator CT, MNI MR) × 3
objectives + 2 pool encoders = 14 runs. At 300 steps: 12 × 300 × ~1 s ≈ 60 min — too much
next to the few-shot fits, so the default uses 150 steps (≈ 30 min for all 14, ~2.5 min each;
a ``--full`` run uses 1000). Few-shot fits per (volume, k, seed): 6 fine-tunes (scratch ≤ 300
steps with early stopping, 3 objectives, multi-scale, pool; pretrained ≤ 200 steps), 1 Mean
Teacher (≤ 200 steps), 6 linear probes: ≈ 6 × 20 s + 60 s + 6 × 4 s ≈ 3.4 min upper bound,
typically ~2 min with early stopping. 4 volumes × 3 k × 3 seeds = 36 cells ≈ 72 min upper
bound at the contended step times, ~45–55 min on an idle 2-core machine. Total ≈ 75–100 min
contended, ≤ 90 min alone; encoders cached by an earlier run cut ~30 min.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import shutil
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np
import psutil
import torch

from bench.baselines import fill_between_slices
from bench.protocol import (
    cross_volume_splits,
    dice_per_class,
    mean_dice,
    slice_propagation_dice,
    sparse_labels,
    spread_slices,
)
from bench.report import ITK, RANDOM, EncoderRecord, Row, machine_info, write_report
from models.datasets import SETS, Case, cache_dir, load_msd_folder, load_pool, load_set, slice_axis
from models.fewshot import FewShotConfig, Method, fit_segmenter
from models.networks.segmenter import SegmenterNet
from models.objectives import OBJECTIVES
from models.pretrain import Encoder, PretrainConfig, pretrain
from models.progress import Progress
from models.runtime.preprocess import crop_to, default_normalisation, normalise, pad_to_multiple
from models.volumes import load_volume

__all__ = ["PROFILES", "Profile", "main", "predict_volume", "run"]

logger = logging.getLogger(__name__)

DEFAULT_SETS = SETS[:3]
RESULTS = Path(__file__).resolve().parent / "results"


@dataclass(frozen=True)
class Profile:
    """Sizes of a benchmark run.

    Attributes:
        name: ``quick``, ``default`` or ``full``.
        sets: registry sets run when none are named on the command line.
        seeds: few-shot seeds per cell.
        ks: labelled slices per volume (slice propagation).
        cross_ks: labelled volumes (cross-volume).
        pretrain: pretraining settings (objective and modality are filled in per encoder).
        finetune: few-shot settings of the pretrained rows (axis and seed filled in).
        scratch: few-shot settings of the random-init fine-tune.
        extras: whether to run the METHODS.md hypothesis rows.
    """

    name: str
    sets: tuple[str, ...]
    seeds: int
    ks: tuple[int, ...]
    cross_ks: tuple[int, ...]
    pretrain: PretrainConfig
    finetune: FewShotConfig
    scratch: FewShotConfig
    extras: bool = True


PROFILES = {
    "quick": Profile(
        name="quick",
        sets=("tptbox-spine",),
        seeds=1,
        ks=(1, 3),
        cross_ks=(1,),
        pretrain=PretrainConfig(
            steps=2, batch_size=2, image_size=32, channels=(4, 8), num_clusters=4, kmeans_slices=2
        ),
        finetune=FewShotConfig(steps=2, linear_steps=2, eval_every=1, unlabelled_batch_size=1),
        scratch=FewShotConfig.for_scratch(steps=2, linear_steps=2, eval_every=1),
    ),
    "default": Profile(
        name="default",
        sets=DEFAULT_SETS,
        seeds=3,
        ks=(1, 3, 5),
        cross_ks=(1, 2),
        pretrain=PretrainConfig(steps=150, checkpoint_every=25),
        finetune=FewShotConfig(steps=200, eval_every=20, patience=4),
        scratch=FewShotConfig.for_scratch(steps=300, eval_every=20, patience=5),
    ),
    "full": Profile(
        name="full",
        sets=DEFAULT_SETS,
        seeds=3,
        ks=(1, 3, 5),
        cross_ks=(1, 2),
        pretrain=PretrainConfig(steps=1000, checkpoint_every=50),
        finetune=FewShotConfig(),
        scratch=FewShotConfig.for_scratch(),
    ),
}


@dataclass
class _Volume:
    """A case loaded for the benchmark: normalised image and full labels."""

    case: Case
    image: np.ndarray
    label: np.ndarray

    @classmethod
    def load(cls, case: Case) -> _Volume:
        raw, _ = load_volume(case.image)
        label, _ = load_volume(case.label)
        image = normalise(raw, default_normalisation(case.modality))
        return cls(case, image, np.rint(label).astype(np.uint8))


class _PeakRSS:
    """Peak resident memory of this process while the block runs (sampled every 50 ms)."""

    def __init__(self) -> None:
        self.process = psutil.Process()
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self.process.memory_info().rss)
            self._stop.wait(0.05)

    def __enter__(self) -> _PeakRSS:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self.process.memory_info().rss)


def _fingerprint(volumes: Sequence[np.ndarray]) -> str:
    digest = hashlib.sha256()
    for volume in volumes:
        digest.update(str(volume.shape).encode())
        digest.update(np.ascontiguousarray(volume, dtype=np.float32).tobytes())
    return digest.hexdigest()


class EncoderCache:
    """Pretrained encoders on disk, keyed by (data, objective, config); trains what is missing."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.records: list[EncoderRecord] = []

    def get(
        self, name: str, data: str, volumes: list[np.ndarray], config: PretrainConfig
    ) -> Encoder:
        """The encoder pretrained on ``volumes`` (slice axis 2) with ``config``."""
        norm = default_normalisation(config.modality)
        spec = {
            "format": 1,
            "data": _fingerprint(volumes),
            "config": config.to_dict(),
            "normalisation": norm.to_dict(),
        }
        key = hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()[:20]
        weights, meta_path = self.folder / f"{key}.pt", self.folder / f"{key}.json"
        if weights.is_file() and meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            encoder, cached = Encoder.load(weights), True
            logger.info("encoder %s: reused %s", name, weights)
        else:
            encoder, meta = self._train(name, volumes, config, key)
            encoder.save(weights)
            tmp = meta_path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(meta))
            tmp.replace(meta_path)
            cached = False
        self.records.append(
            EncoderRecord(
                name=name,
                objective=config.objective,
                data=data,
                volumes=len(volumes),
                slices=sum(v.shape[2] for v in volumes),
                steps=config.steps,
                batch_size=config.batch_size,
                image_size=config.image_size,
                channels=list(config.channels),
                seconds=meta["seconds"],
                slices_per_second=meta["slices_per_second"],
                peak_rss_mb=meta["peak_rss_mb"],
                cached=cached,
                key=key,
            )
        )
        return encoder

    def _train(
        self, name: str, volumes: list[np.ndarray], config: PretrainConfig, key: str
    ) -> tuple[Encoder, dict[str, float]]:
        workdir = self.folder / f"{key}.work"
        every = max(1, config.steps // 5)

        def progress(p: Progress) -> None:
            if p.step % every == 0:
                logger.info("pretrain %s: step %d/%d loss %.4f", name, p.step, p.total, p.loss)

        logger.info("pretraining %s (%d steps)", name, config.steps)
        with _PeakRSS() as peak:
            began = time.perf_counter()
            encoder = pretrain(volumes, config, workdir, progress)
            seconds = time.perf_counter() - began
        shutil.rmtree(workdir, ignore_errors=True)
        meta = {
            "seconds": seconds,
            "slices_per_second": config.steps * config.batch_size / seconds,
            "peak_rss_mb": peak.peak / 2**20,
        }
        return encoder, meta


@torch.no_grad()
def predict_volume(
    segmenter: SegmenterNet, image: np.ndarray, axis: int, batch_size: int = 16
) -> np.ndarray:
    """Label volume (argmax) of a normalised ``X×Y×Z`` image, slice by slice along ``axis``."""
    segmenter.eval()
    slices = np.ascontiguousarray(np.moveaxis(image, axis, 0), dtype=np.float32)
    padded, size = pad_to_multiple(slices, segmenter.encoder.size_divisor)
    out = []
    for i in range(0, len(padded), batch_size):
        logits, _ = segmenter(torch.from_numpy(padded[i : i + batch_size, None]))
        out.append(logits.argmax(dim=1).to(torch.uint8).numpy())
    return np.moveaxis(crop_to(np.concatenate(out), size), 0, axis)


@dataclass
class _Fit:
    """How one row's segmenter is made: encoder (None = random init), method, settings."""

    method: str
    encoder: Callable[[int], Encoder]
    kind: Method
    config: FewShotConfig


@dataclass
class _Run:
    """State of one benchmark run."""

    profile: Profile
    cache: EncoderCache
    extras: bool
    rows: list[Row] = field(default_factory=list)
    selected: dict[str, str] = field(default_factory=dict)

    def pretrain_config(self, objective: str, modality: str) -> PretrainConfig:
        return replace(self.profile.pretrain, objective=objective, modality=modality, axis=2)

    def random_encoder(self, modality: str) -> Callable[[int], Encoder]:
        def make(seed: int) -> Encoder:
            config = replace(self.profile.pretrain, modality=modality, seed=seed, axis=2)
            return Encoder.random(config)

        return make

    def record(self, row: Row) -> None:
        self.rows.append(row)
        logger.info(
            "%s | %s k=%d seed=%d: mean Dice %.3f (%.1f s)",
            row.group,
            row.method,
            row.k,
            row.seed,
            row.mean_dice,
            row.fit_seconds,
        )


def _axial_stack(volumes: Sequence[_Volume]) -> list[np.ndarray]:
    return [np.moveaxis(v.image, v.case.axis, 2) for v in volumes]


def _fit(
    fit: _Fit,
    seed: int,
    axis: int,
    images: list[np.ndarray],
    labels: list[np.ndarray],
    num_classes: int,
) -> tuple[SegmenterNet, float]:
    """The fitted segmenter and the fit's wall time."""
    config = replace(fit.config, seed=seed, axis=axis)
    began = time.perf_counter()
    segmenter = fit_segmenter(fit.encoder(seed), images, labels, num_classes, fit.kind, config)
    return segmenter, time.perf_counter() - began


def _slice_propagation(
    run: _Run, set_name: str, volume: _Volume, fits: list[_Fit], with_itk: bool
) -> None:
    for k in run.profile.ks:
        _propagate(run, set_name, volume, k, fits, with_itk and k >= 2)


def _propagate(
    run: _Run, set_name: str, volume: _Volume, k: int, fits: list[_Fit], with_itk: bool
) -> None:
    """Label ``k`` slices of ``volume``, fit every row, score on the other slices."""
    case = volume.case
    names = case.classes
    labelled = spread_slices(volume.label, case.axis, k)
    sparse = sparse_labels(volume.label, case.axis, labelled)

    def record(method: str, seed: int, prediction: np.ndarray, seconds: float) -> None:
        dice = slice_propagation_dice(prediction, volume.label, case.axis, labelled, list(names))
        by_name = {names[c]: v for c, v in dice.items()}
        group = f"{set_name} · {case.name} · slice propagation"
        setting = "slice propagation"
        row = Row(set_name, group, setting, method, k, seed, by_name, mean_dice(dice), seconds)
        run.record(replace(row, labelled=labelled))

    if with_itk:
        began = time.perf_counter()
        filled = fill_between_slices(sparse, case.axis)
        record(ITK, 0, filled, time.perf_counter() - began)
    for fit in fits:
        for seed in range(run.profile.seeds):
            images, labels = [volume.image], [sparse]
            segmenter, seconds = _fit(fit, seed, case.axis, images, labels, case.num_classes)
            record(fit.method, seed, predict_volume(segmenter, volume.image, case.axis), seconds)


def _cross_volume(run: _Run, set_name: str, volumes: list[_Volume], fits: list[_Fit]) -> None:
    case = volumes[0].case
    names = case.classes
    group = f"{set_name} · {case.modality} · cross-volume"
    images = _axial_stack(volumes)
    labels = [np.moveaxis(v.label, v.case.axis, 2) for v in volumes]
    for k in (k for k in run.profile.cross_ks if k < len(volumes)):
        for fit in fits:
            for seed in range(run.profile.seeds):
                train, test = cross_volume_splits(len(volumes), k, seed)
                extra = test if fit.kind == "mean_teacher" else []  # MT reads unlabelled volumes
                fit_images = [images[i] for i in train + extra]
                fit_labels = [labels[i] for i in train] + [
                    np.full_like(labels[i], 255) for i in extra
                ]
                segmenter, seconds = _fit(fit, seed, 2, fit_images, fit_labels, case.num_classes)
                per_volume = [
                    dice_per_class(predict_volume(segmenter, images[i], 2), labels[i], list(names))
                    for i in test
                ]
                dice = {c: _nanmean([d[c] for d in per_volume]) for c in names}
                by_name = {names[c]: v for c, v in dice.items()}
                row = Row(
                    set_name,
                    group,
                    "cross-volume",
                    fit.method,
                    k,
                    seed,
                    by_name,
                    mean_dice(dice),
                    seconds,
                    train,
                )
                run.record(row)


def _nanmean(values: list[float]) -> float:
    finite = [v for v in values if not np.isnan(v)]
    return float(np.mean(finite)) if finite else float("nan")


def _best_objective(run: _Run, set_name: str) -> str:
    scores = {
        objective: [
            r.mean_dice
            for r in run.rows
            if r.set == set_name
            and r.method.split(" · ")[0] == objective
            and not np.isnan(r.mean_dice)
        ]
        for objective in OBJECTIVES
    }
    return max(OBJECTIVES, key=lambda o: float(np.mean(scores[o])) if scores[o] else -1.0)


def _run_set(run: _Run, set_name: str, cases: list[Case], pool: bool) -> None:
    volumes = [_Volume.load(c) for c in cases]
    profile = run.profile
    by_modality: dict[str, list[_Volume]] = {}
    for v in volumes:
        by_modality.setdefault(v.case.modality, []).append(v)
    encoders: dict[tuple[str, str], Encoder] = {}
    for modality, members in by_modality.items():
        for objective in OBJECTIVES:
            name = f"{objective} · {set_name}/{modality}"
            config = run.pretrain_config(objective, modality)
            data = ", ".join(v.case.name for v in members)
            encoders[modality, objective] = run.cache.get(name, data, _axial_stack(members), config)

    def pretrained(modality: str, objective: str) -> Callable[[int], Encoder]:
        return lambda seed: encoders[modality, objective]

    def main_fits(modality: str) -> list[_Fit]:
        fits = [
            _Fit(f"{RANDOM} · finetune", run.random_encoder(modality), "finetune", profile.scratch),
            _Fit(f"{RANDOM} · linear", run.random_encoder(modality), "linear", profile.finetune),
        ]
        kinds: tuple[Method, ...] = ("linear", "finetune")
        for objective in OBJECTIVES:
            encoder = pretrained(modality, objective)
            fits += [
                _Fit(f"{objective} · {kind}", encoder, kind, profile.finetune) for kind in kinds
            ]
        return fits

    groups = _cross_groups(volumes)
    for v in volumes:
        _slice_propagation(run, set_name, v, main_fits(v.case.modality), with_itk=True)
    for members in groups:
        _cross_volume(run, set_name, members, main_fits(members[0].case.modality))

    best = _best_objective(run, set_name)
    run.selected[set_name] = best
    logger.info("%s: best objective %s", set_name, best)

    def second_fits(modality: str) -> list[_Fit]:
        enc = pretrained(modality, best)
        fits = [_Fit(f"{best} · mean teacher", enc, "mean_teacher", profile.finetune)]
        if run.extras:
            fits += [
                _Fit(
                    f"{best} · linear, mlp head",
                    enc,
                    "linear",
                    replace(profile.finetune, head="mlp"),
                ),
                _Fit(
                    f"{best} · linear, multiscale",
                    enc,
                    "linear",
                    replace(profile.finetune, multiscale=True),
                ),
                _Fit(
                    f"{best} · finetune, multiscale",
                    enc,
                    "finetune",
                    replace(profile.finetune, multiscale=True),
                ),
            ]
            if pool:
                pooled = _pool_encoder(run, modality, best)
                fits += [
                    _Fit(f"{best} (modality pool) · linear", pooled, "linear", profile.finetune),
                    _Fit(
                        f"{best} (modality pool) · finetune", pooled, "finetune", profile.finetune
                    ),
                ]
        return fits

    for v in volumes:
        _slice_propagation(run, set_name, v, second_fits(v.case.modality), with_itk=False)
    for members in groups:
        _cross_volume(run, set_name, members, second_fits(members[0].case.modality)[:1])


def _pool_encoder(run: _Run, modality: str, objective: str) -> Callable[[int], Encoder]:
    paths = load_pool(modality)
    norm = default_normalisation(modality)
    volumes = []
    for path in paths:
        raw, affine = load_volume(path)
        volumes.append(np.moveaxis(normalise(raw, norm), slice_axis(affine), 2))
    name = f"{objective} · {modality} pool"
    data = ", ".join(p.name for p in paths)
    encoder = run.cache.get(name, data, volumes, run.pretrain_config(objective, modality))
    return lambda seed: encoder


def _cross_groups(volumes: list[_Volume]) -> list[list[_Volume]]:
    groups: dict[tuple[str, tuple[tuple[int, str], ...]], list[_Volume]] = {}
    for v in volumes:
        groups.setdefault((v.case.modality, tuple(sorted(v.case.classes.items()))), []).append(v)
    return [g for g in groups.values() if len(g) >= 2]


def run(
    profile: Profile,
    sets: Sequence[str],
    folders: Sequence[Path],
    out_dir: Path,
    encoder_dir: Path,
    command: str,
    extras: bool = True,
) -> dict[str, Path]:
    """Run the benchmark and write the report; returns the written paths."""
    began = time.perf_counter()
    state = _Run(profile, EncoderCache(encoder_dir), extras and profile.extras)
    for name in sets:
        _run_set(state, name, load_set(name), pool=True)
    for folder in folders:
        _run_set(state, f"msd:{folder.name}", load_msd_folder(folder), pool=False)
    context = {
        "command": command,
        "profile": {
            "name": profile.name,
            "seeds": profile.seeds,
            "ks": list(profile.ks),
            "cross_ks": list(profile.cross_ks),
            "pretrain": profile.pretrain.to_dict(),
            "finetune": profile.finetune.to_dict(),
            "scratch": profile.scratch.to_dict(),
        },
        "machine": machine_info(),
        "wall_seconds": time.perf_counter() - began,
        "selected": state.selected,
    }
    notes = [
        f"- Best objective per set (used by Mean Teacher and the extra rows; chosen on these test "
        f"slices): {', '.join(f'{s}: {o}' for s, o in state.selected.items()) or 'none'}.",
        "- Fill-between-slices only interpolates between the outermost labelled slices; beyond "
        "them it predicts background. It is deterministic (one run, ± 0).",
        "- ± is over few-shot seeds; every encoder was pretrained once (seed 0).",
        "- Slices are spread at the quantile mid-points of the union of the classes' extents; see "
        "`bench/protocol.py`.",
    ]
    return write_report(out_dir, state.rows, state.cache.records, context, notes)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="segassist bench fewshot", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--profile", choices=sorted(PROFILES), default="default")
    parser.add_argument("--full", action="store_true", help="same as --profile full")
    parser.add_argument(
        "--sets", nargs="*", choices=SETS, help="registry sets (default: profile's)"
    )
    parser.add_argument(
        "--dataset", type=Path, action="append", default=[], help="MSD/nnU-Net folder (repeatable)"
    )
    parser.add_argument("--seeds", type=int, help="override the profile's seed count")
    parser.add_argument("--no-extras", action="store_true", help="skip the hypothesis rows")
    parser.add_argument("--out", type=Path, default=RESULTS, help="output folder")
    parser.add_argument(
        "--encoder-cache", type=Path, help="pretrained encoder cache (default <cache>/encoders)"
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    import sys

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    profile = PROFILES["full" if args.full else args.profile]
    if args.seeds:
        profile = replace(profile, seeds=args.seeds)
    sets = args.sets if args.sets is not None else ([] if args.dataset else list(profile.sets))
    command = shlex.join(
        ["python", "-m", "bench.fewshot", *(sys.argv[1:] if argv is None else argv)]
    )
    paths = run(
        profile,
        sets,
        args.dataset,
        args.out,
        args.encoder_cache or cache_dir() / "encoders",
        command,
        extras=not args.no_extras,
    )
    for path in paths.values():
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
