"""Few-shot segmentation benchmark: does dense self-supervised pretraining save annotation?

``python -m segassist.bench.fewshot [--profile quick|default|full] [--sets ...] [--dataset DIR ...]``
(also ``segassist bench fewshot ...``) writes ``bench/results/fewshot.{md,json,png}``;
``--report-only`` rewrites the report from the JSON.

Protocol (DESIGN.md, :mod:`segassist.bench.protocol`):

- Slice propagation, per volume: label ``k ∈ {1, 3, 5}`` slices spread over the structures'
  extent, predict the rest; Dice per class on the unlabelled slices.
- Cross-volume, per group of ≥ 2 volumes sharing modality and classes (MSD folders; none of the
  three registry sets qualifies: TPTBox's CT and MR differ in modality and spine region, the
  TotalSegmentator CT is one scan, MNI is one template): label ``k`` volumes, predict the others.
- Rows, side by side: ``random-init · finetune`` (the same U-Net from scratch, strongly augmented,
  :meth:`FewShotConfig.for_scratch`) and ``random-init · linear`` (a probe on random features,
  the control of what pretraining adds to the probe); each objective × {linear probe,
  fine-tune} (the default profile fine-tunes only the best objective, see below); Mean Teacher on
  the best objective; ITK's fill-between-slices for ``k ≥ 2``; and the product's ``default``
  (:mod:`segassist.bench.default_answer`: the assist's propagation chain, then from k = 3 the
  background refinement's pick), on the modality's encoder of
  :data:`~segassist.bench.default_answer.OBJECTIVE_PER_MODALITY`.
- Encoders: for the registry sets, one encoder per (modality, objective) pretrained on the
  modality's whole pool — every registry volume of that modality, the evaluated one included,
  unlabelled (:func:`segassist.models.datasets.load_pool`): the product's "pretrain once per modality and
  reuse" path, and the most data we have. MSD folders pretrain on their own images. Seed 0: the ±
  is over few-shot seeds (head init, batches, augmentation, and the random-init network), not
  over pretraining runs. Encoders are cached under ``<cache>/encoders/<key>.pt``, ``key`` = hash
  of (normalised data, objective, full config), and reused by later runs; the encoder table
  reports the original pretraining time.
- "Best objective" of a set: highest mean Dice over its objective rows of the first pass (linear
  probes, plus fine-tunes when the profile fine-tunes all) — chosen on the test slices, so the
  rows built on it carry a mild selection bias in their favour; the report names it.
- Extra rows (METHODS.md, "Where the few-shot gain may come from"), with the best objective: an
  MLP head and a multi-scale head on the frozen encoder; in ``full`` (and ``quick``) also a
  multi-scale fine-tune and an encoder pretrained on the set's own volumes only (vs the pool).

Budget of the default profile (target ≤ 90 min on 2 cores). Measured on this machine (AMD EPYC,
2 logical cores, torch 2.13 CPU, 2 threads) while ~8 other processes saturated it (load 7–11), so
as CPU seconds per step; the idle wall time is estimated as CPU s / 1.5 (two threads, imperfect
scaling), an upper bound. Network channels 16-32-64-128 (the product default).

- Pretraining, batch 8 (two views each), 128×104 crops (TotalSegmentator CT): pix2rep 8.8,
  pix2rep_barlow 8.6, iic_boundary 4.1 CPU s/step (MNI 104×120: 8.6 / 9.2 / 3.8; TPTBox 80×80:
  5.8 / 5.9 / 3.3). pix2rep without projection head: 2.6 — the projection head, applied to every
  valid pixel before 1000 are sampled, is ~70 % of a pix2rep/barlow step. View sampling: 0.15.
- Few-shot on 128×104 slices, batch 4: fine-tune 1.85, Mean Teacher 3.4, linear probe 0.095
  CPU s/step (+0.4 s feature caching); predicting a 112-slice volume: 7.2 CPU s.

Pretraining: 2 modality pools × 3 objectives = 6 encoders. Crops of 64×64 (0.31× the pixels of
128×104, same pixel scale), measured directly as wall time at a lower load (≈ 5, i.e. ~2.5
runnable processes per core; an idle machine should be up to ~2× faster — not measurable here):
pix2rep 1.9, pix2rep_barlow 1.75, iic_boundary 0.7 s/step (the same run at 128×104: 9.9 / 10.8 /
2.4) → 4.3 s for one step of all three; 2 pools × 100 steps ≈ 870 s ≈ 15 min at that load,
≈ 8–15 min idle. 1000 steps at
128×128 (``--full``) take ≈ 6 h, hence the cache.

Few-shot, per (volume, k, seed) cell, batch 2: fine-tune measured 1.26 wall s/step at load ≈ 5
(predicting a 112-slice volume 5.6 s), taken as ≈ 0.62 s idle (the ~2× load factor above, and
half the batch-4 CPU cost); Mean Teacher ≈ 1.85× a fine-tune step. 6 linear probes × (60 ×
0.063 + 0.3 + 3 predict) ≈ 43 s; random-init fine-tune ≤ 100 × 0.62 ≈ 62 s; best-objective
fine-tune ≤ 50 × 0.62 ≈ 31 s; Mean Teacher ≤ 50 × 1.15 ≈ 58 s; predictions ≈ 9 s → ≈ 200 s on a
128×104×112 volume (TotalSegmentator, MNI), ≈ 95 s on TPTBox (80×80, ~50 slices). Cells: 4
volumes × 3 k × 3 seeds = 36 → 18 × 200 + 18 × 95 ≈ 88 min without early stopping; early
stopping should bring it to ≈ 55–65 min, ≈ 65–80 min in total with pretraining — inside 90 min
only on an idle machine, and the idle factor is an estimate. Check with the first real run (the
report gives the wall time of every fit and every encoder); if it runs over, cut ``--no-extras``
(−2 linear rows per cell) or the fine-tune steps, and say so in the table's command.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import shlex
import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import torch

from segassist.bench.baselines import fill_between_slices, warm_up
from segassist.bench.default_answer import (
    DEFAULT_OBJECTIVE,
    OBJECTIVE_PER_MODALITY,
    default_answer,
)
from segassist.bench.protocol import (
    cross_volume_splits,
    dice_per_class,
    mean_dice,
    slice_propagation_dice,
    sparse_labels,
    spread_slices,
)
from segassist.bench.report import (
    DEFAULT,
    FINETUNE,
    ITK,
    RANDOM,
    EncoderRecord,
    Row,
    machine_info,
    write_report,
)
from segassist.models.datasets import (
    SETS,
    Case,
    cache_dir,
    load_msd_folder,
    load_pool,
    load_set,
    slice_axis,
)
from segassist.models.features import compute_feature_maps
from segassist.models.fewshot import FewShotConfig, Method, fit_segmenter
from segassist.models.networks.segmenter import SegmenterNet
from segassist.models.objectives import OBJECTIVES
from segassist.models.pretrain import Encoder, PretrainConfig, pretrain
from segassist.models.progress import Progress
from segassist.models.runtime.configs import QUICK_SCRATCH
from segassist.models.runtime.preprocess import (
    crop_to,
    default_normalisation,
    normalise,
    pad_to_multiple,
)
from segassist.models.volumes import load_volume

__all__ = [
    "PROFILES",
    "Profile",
    "add_pretrain_steps_argument",
    "main",
    "pool_volumes",
    "predict_volume",
    "rewrite_report",
    "run",
    "with_pretrain_steps",
]

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
        finetune_all: fine-tune every objective's encoder; otherwise only the best objective's
            (best by the linear probe), to fit the time budget.
        extras: METHODS.md hypothesis rows to run: ``"mlp"`` and ``"single_scale"`` (linear
            probe with an MLP head / reading only the last decoder block, where the default head
            reads every decoder map), ``"single_scale_finetune"``, ``"own_volumes"`` (an
            encoder pretrained on the set's own volumes only, vs the modality pool).
    """

    name: str
    sets: tuple[str, ...]
    seeds: int
    ks: tuple[int, ...]
    cross_ks: tuple[int, ...]
    pretrain: PretrainConfig
    finetune: FewShotConfig
    scratch: FewShotConfig
    finetune_all: bool = True
    extras: tuple[str, ...] = ("mlp", "single_scale", "single_scale_finetune", "own_volumes")


PROFILES = {
    "quick": Profile(
        name="quick",
        sets=("tptbox-spine",),
        seeds=1,
        ks=(2,),
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
        pretrain=PretrainConfig(steps=100, batch_size=8, image_size=64, checkpoint_every=25),
        finetune=FewShotConfig(
            steps=50,
            batch_size=2,
            linear_steps=60,
            eval_every=10,
            patience=3,
            unlabelled_batch_size=2,
        ),
        scratch=FewShotConfig.for_scratch(**QUICK_SCRATCH),
        finetune_all=False,
        extras=("mlp", "single_scale"),
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
        self._loaded: dict[str, Encoder] = {}

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
        if key in self._loaded:
            return self._loaded[key]
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
        self._loaded[key] = encoder
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
    pools: dict[str, tuple[str, list[np.ndarray]]] = field(default_factory=dict)

    def pretrain_config(self, objective: str, modality: str) -> PretrainConfig:
        changes = {"objective": objective, "modality": modality, "axis": 2}
        return PretrainConfig.from_dict(self.profile.pretrain.to_dict() | changes)

    def random_encoder(self, modality: str) -> Callable[[int], Encoder]:
        def make(seed: int) -> Encoder:
            changes = {"modality": modality, "seed": seed, "axis": 2}
            config = PretrainConfig.from_dict(self.profile.pretrain.to_dict() | changes)
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
    config = FewShotConfig.from_dict(fit.config.to_dict() | {"seed": seed, "axis": axis})
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


def _default_rows(run: _Run, set_name: str, volume: _Volume, encoder: Encoder) -> None:
    """The product's answer (:func:`~segassist.bench.default_answer.default_answer`) per k and
    seed; its time is the assist's plus the refinement's."""
    case = volume.case
    names = case.classes
    group = f"{set_name} · {case.name} · slice propagation"
    with tempfile.TemporaryDirectory() as tmp:
        maps = compute_feature_maps(encoder, volume.image, case.axis, Path(tmp))
        for k in run.profile.ks:
            labelled = spread_slices(volume.label, case.axis, k)
            sparse = sparse_labels(volume.label, case.axis, labelled)
            for seed in range(run.profile.seeds):
                answer = default_answer(encoder, maps, volume.image, sparse, case, seed)
                dice = slice_propagation_dice(
                    answer.labels, volume.label, case.axis, labelled, list(names)
                )
                seconds = answer.assist_seconds + answer.refine_seconds
                by_name = {names[c]: v for c, v in dice.items()}
                row = Row(
                    set_name,
                    group,
                    "slice propagation",
                    DEFAULT,
                    k,
                    seed,
                    by_name,
                    mean_dice(dice),
                    seconds,
                    labelled,
                )
                run.record(row)
                logger.info("%s k=%d seed=%d: default picked %s", case.name, k, seed, answer.method)


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


def _run_set(run: _Run, set_name: str, cases: list[Case], registry: bool) -> None:
    """All rows of one set: cheap rows first, then those that use the set's best objective.

    Registry sets read encoders pretrained on the modality pool; MSD folders on their own images.
    """
    volumes = [_Volume.load(c) for c in cases]
    profile = run.profile
    by_modality: dict[str, list[_Volume]] = {}
    for v in volumes:
        by_modality.setdefault(v.case.modality, []).append(v)

    def encoder(
        modality: str, objective: str, own: bool = not registry
    ) -> Callable[[int], Encoder]:
        if own:
            members = by_modality[modality]
            name = f"{objective} · {set_name}/{modality}"
            data = ", ".join(v.case.name for v in members)
            config = run.pretrain_config(objective, modality)
            trained = run.cache.get(name, data, _axial_stack(members), config)
        else:
            trained = _pool_encoder(run, modality, objective)
        return lambda seed: trained

    def first_fits(modality: str) -> list[_Fit]:
        kinds: tuple[Method, ...] = ("linear", "finetune") if profile.finetune_all else ("linear",)
        fits = [
            _Fit(f"{RANDOM} · linear", run.random_encoder(modality), "linear", profile.finetune)
        ]
        for objective in OBJECTIVES:
            enc = encoder(modality, objective)
            fits += [_Fit(f"{objective} · {k}", enc, k, profile.finetune) for k in kinds]
        return fits

    groups = _cross_groups(volumes)
    for v in volumes:
        _slice_propagation(run, set_name, v, first_fits(v.case.modality), with_itk=True)
    for members in groups:
        _cross_volume(run, set_name, members, first_fits(members[0].case.modality))

    best = _best_objective(run, set_name)
    run.selected[set_name] = best
    logger.info("%s: best objective %s", set_name, best)

    def second_fits(modality: str, cross: bool) -> list[_Fit]:
        enc = encoder(modality, best)
        ft = profile.finetune
        fits = [_Fit(FINETUNE, run.random_encoder(modality), "finetune", profile.scratch)]
        if not profile.finetune_all:
            fits.append(_Fit(f"{best} · finetune", enc, "finetune", ft))
        fits.append(_Fit(f"{best} · mean teacher", enc, "mean_teacher", ft))
        if cross:
            return fits
        extras = set(profile.extras) if run.extras else set()
        if "mlp" in extras:
            mlp = FewShotConfig.from_dict(ft.to_dict() | {"head": "mlp"})
            fits.append(_Fit(f"{best} · linear, mlp head", enc, "linear", mlp))
        if "single_scale" in extras:
            single = FewShotConfig.from_dict(ft.to_dict() | {"multiscale": False})
            fits.append(_Fit(f"{best} · linear, last block only", enc, "linear", single))
        if "single_scale_finetune" in extras:
            single = FewShotConfig.from_dict(ft.to_dict() | {"multiscale": False})
            fits.append(_Fit(f"{best} · finetune, last block only", enc, "finetune", single))
        if "own_volumes" in extras and registry:
            own = encoder(modality, best, own=True)
            fits.append(_Fit(f"{best} (own volumes) · linear", own, "linear", ft))
            fits.append(_Fit(f"{best} (own volumes) · finetune", own, "finetune", ft))
        return fits

    for v in volumes:
        _slice_propagation(run, set_name, v, second_fits(v.case.modality, False), with_itk=False)
    for v in volumes:
        objective = OBJECTIVE_PER_MODALITY.get(v.case.modality, DEFAULT_OBJECTIVE)
        _default_rows(run, set_name, v, encoder(v.case.modality, objective)(0))
    for members in groups:
        _cross_volume(run, set_name, members, second_fits(members[0].case.modality, True))


def add_pretrain_steps_argument(parser: argparse.ArgumentParser) -> None:
    """``--pretrain-steps N``: the pool encoders' pretraining length (default: the default
    profile's); :func:`with_pretrain_steps` applies it."""
    parser.add_argument(
        "--pretrain-steps",
        type=int,
        default=PROFILES["default"].pretrain.steps,
        help="steps of the pool encoders' pretraining (default: the default profile's)",
    )


def with_pretrain_steps(profile: Profile, steps: int) -> Profile:
    """``profile`` with its encoders pretrained for ``steps`` steps."""
    return replace(profile, pretrain=profile.pretrain.model_copy(update={"steps": steps}))


def pool_volumes(modality: str) -> dict[Path, np.ndarray]:
    """Every pool volume of ``modality`` (:func:`load_pool`), normalised, slice axis last."""
    norm = default_normalisation(modality)
    volumes = {}
    for path in load_pool(modality):
        raw, affine = load_volume(path)
        volumes[path] = np.moveaxis(normalise(raw, norm), slice_axis(affine), 2)
    return volumes


def _pool_encoder(run: _Run, modality: str, objective: str) -> Encoder:
    """Encoder pretrained on every registry volume of ``modality`` (shared across sets)."""
    if modality not in run.pools:
        pool = pool_volumes(modality)
        data = ", ".join(f"{p.parent.name}/{p.name}" for p in pool)
        run.pools[modality] = (data, list(pool.values()))
    data, volumes = run.pools[modality]
    name = f"{objective} · {modality} pool"
    return run.cache.get(name, data, volumes, run.pretrain_config(objective, modality))


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
    """Run the benchmark and write the report; returns the written paths.

    The report is rewritten after each set, so a run stopped part-way still leaves the tables of
    the sets it finished.
    """
    began = time.perf_counter()
    state = _Run(profile, EncoderCache(encoder_dir), extras)
    if max(profile.ks) >= 2:
        warm_up()  # ITK loads its modules lazily (10–40 s): keep that out of the timings
    jobs: list[tuple[str, Callable[[], list[Case]], bool]] = [
        (name, partial(load_set, name), True) for name in sets
    ]
    jobs += [(f"msd:{f.name}", partial(load_msd_folder, f), False) for f in folders]
    written: dict[str, Path] = {}
    for set_name, load, registry in jobs:
        _run_set(state, set_name, load(), registry=registry)
        written = _write(state, profile, out_dir, command, time.perf_counter() - began)
    return written


def _write(
    state: _Run, profile: Profile, out_dir: Path, command: str, wall_seconds: float
) -> dict[str, Path]:
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
        "wall_seconds": wall_seconds,
        "selected": state.selected,
    }
    return write_report(out_dir, state.rows, state.cache.records, context, _notes(state.selected))


def _notes(selected: dict[str, str], default_rerun: dict[str, Any] | None = None) -> list[str]:
    """The report's notes: the choices and caveats of a run that picked ``selected`` (and whose
    default rows were recomputed by ``default_rerun``, :func:`rerun_default`)."""
    rerun = (
        [
            f"- The `{DEFAULT}` rows were recomputed on {default_rerun['date']} by "
            f"`{default_rerun['command']}` ({default_rerun['wall_seconds'] / 60:.1f} min) after "
            "a change to the product's answer; the other rows are the full run's."
        ]
        if default_rerun
        else []
    )
    return [
        *rerun,
        f"- Best objective per set (used by Mean Teacher and the extra rows; chosen on these test "
        f"slices): {', '.join(f'{s}: {o}' for s, o in selected.items()) or 'none'}.",
        "- Fill-between-slices only interpolates between the outermost labelled slices; beyond "
        "them it predicts background. It is deterministic (one run, ± 0).",
        f"- `{DEFAULT}`: what the assist workflow leaves the annotator with "
        "(`bench/default_answer.py`, the worker's functions): propagation, slice prior and "
        "seeded components on the modality pool's encoder (iic_boundary on CT, pix2rep on MR), "
        "replaced from k = 3 by the background refinement's pick (propagation or its blend "
        "with a scratch network, chosen on the held-out middle labelled slice). Its `fit s` is "
        "the assist's chain plus, from k = 3, the refinement (two network fits on one thread), "
        "which runs after the assist's answer is shown. At k = 1 it is deterministic (± 0).",
        "- ± is over few-shot seeds; every encoder was pretrained once (seed 0).",
        "- Slices are spread at the quantile mid-points of the union of the classes' extents; see "
        "`bench/protocol.py`.",
    ]


def _saved_run(out_dir: Path) -> tuple[dict[str, Any], list[Row], list[EncoderRecord]]:
    """``out_dir/fewshot.json`` as (its context, its rows, its encoders); the summary, which the
    report recomputes, dropped."""
    saved = json.loads((out_dir / "fewshot.json").read_text())
    rows = [Row(**row) for row in saved.pop("rows")]
    encoders = [EncoderRecord(**record) for record in saved.pop("encoders")]
    saved.pop("summary")
    return saved, rows, encoders


def rewrite_report(out_dir: Path) -> dict[str, Path]:
    """Rewrite ``fewshot.{md,png}`` (and the JSON) from ``out_dir/fewshot.json``: a run's rows
    and encoders as they were, the report as the code now writes it."""
    saved, rows, encoders = _saved_run(out_dir)
    return write_report(
        out_dir,
        rows,
        encoders,
        saved,
        _notes(saved.get("selected", {}), saved.get("default_rerun")),
    )


def rerun_default(out_dir: Path, encoder_dir: Path, command: str) -> dict[str, Path]:
    """Recompute the ``default`` rows of ``out_dir/fewshot.json``'s registry sets (its profile and
    seeds), keep its other rows, and rewrite the report: after a change to what the product
    answers, the baselines it is compared with have not changed. The rows of ``--dataset``
    folders stay as they were (the JSON does not record the folder)."""
    began = time.perf_counter()
    saved, rows, encoders = _saved_run(out_dir)
    kept = [row for row in rows if not (row.method == DEFAULT and row.set in SETS)]
    sets = list(dict.fromkeys(row.set for row in kept if row.set in SETS))
    profile = replace(PROFILES[saved["profile"]["name"]], seeds=saved["profile"]["seeds"])
    state = _Run(profile, EncoderCache(encoder_dir), extras=False)
    state.rows = kept
    for set_name in sets:
        for case in load_set(set_name):
            objective = OBJECTIVE_PER_MODALITY.get(case.modality, DEFAULT_OBJECTIVE)
            encoder = _pool_encoder(state, case.modality, objective)
            _default_rows(state, set_name, _Volume.load(case), encoder)
    saved["default_rerun"] = {
        "command": command,
        "date": time.strftime("%Y-%m-%d"),
        "wall_seconds": time.perf_counter() - began,
    }
    notes = _notes(saved.get("selected", {}), saved["default_rerun"])
    return write_report(out_dir, state.rows, encoders, saved, notes)


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
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the report from OUT/fewshot.json, run nothing",
    )
    parser.add_argument(
        "--default-only",
        action="store_true",
        help="recompute the default rows of OUT/fewshot.json's registry sets, keep the rest",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    import sys

    args = _parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    if args.report_only:
        for path in rewrite_report(args.out).values():
            logger.info("wrote %s", path)
        return 0
    command = shlex.join(
        ["python", "-m", "segassist.bench.fewshot", *(sys.argv[1:] if argv is None else argv)]
    )
    encoder_dir = args.encoder_cache or cache_dir() / "encoders"
    if args.default_only:
        for path in rerun_default(args.out, encoder_dir, command).values():
            logger.info("wrote %s", path)
        return 0
    profile = PROFILES["full" if args.full else args.profile]
    if args.seeds:
        profile = replace(profile, seeds=args.seeds)
    sets = args.sets if args.sets is not None else ([] if args.dataset else list(profile.sets))
    paths = run(
        profile, sets, args.dataset, args.out, encoder_dir, command, extras=not args.no_extras
    )
    for path in paths.values():
        logger.info("wrote %s", path)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
