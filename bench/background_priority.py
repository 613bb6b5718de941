"""What a background pretraining costs the annotator's interactive jobs, by threads and niceness.

``python -m segassist.bench.background_priority [--set S] [--steps N] [--out FILE]`` writes
``bench/results/background_priority.md``.

The service runs a background pretraining (the continuation after a modality's first assist)
on the training queue while the annotator's assists run on the prediction queue,
on the same cores. Two interactive workloads stand for those assists, on the set's first
volume: **short pretraining** (``N`` steps of the assist's inline pretraining, the first answer
on a new modality) and **features + propagation** (the decoder maps of every slice, then
propagation from 3 labelled slices: an assist on a new image). Each is timed alone and while a
pretraining of the service's settings runs in another process, on all threads or one, at
niceness 0 or 19 (the scheduler then gives the interactive process nearly all of a contended
core); that pretraining's step rate is read over the same window and alone.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from multiprocessing.synchronize import Event
from pathlib import Path

import numpy as np
import torch

from segassist.bench.fewshot import RESULTS, _Volume
from segassist.bench.protocol import sparse_labels, spread_slices
from segassist.bench.report import write_markdown
from segassist.models.datasets import load_set
from segassist.models.features import compute_feature_maps
from segassist.models.pretrain import Encoder, PretrainConfig, pretrain
from segassist.models.progress import Progress
from segassist.models.propagation import map_features, propagate
from segassist.worker.assist import _SHORT_PRETRAIN
from segassist.worker.serve import lower_priority

__all__ = ["main"]

SERVICE_PRETRAIN = {**_SHORT_PRETRAIN, "objective": "pix2rep", "axis": 2}
"""The assist's pretraining settings."""


def _backgrounds(cores: int) -> list[tuple[int, int]]:
    """(threads, niceness) of the background pretraining: as the service ran it before
    ``training_niceness`` (all cores, nice 0), on one thread, and yielding to the interactive
    jobs (nice 19, as the service runs it now) on all or one."""
    return [(cores, 0), (1, 0), (cores, 19), (1, 19)]


def _config(modality: str, steps: int) -> PretrainConfig:
    return PretrainConfig.from_dict(SERVICE_PRETRAIN | {"modality": modality, "steps": steps})


def _background(
    volume: np.ndarray, modality: str, threads: int, niceness: int, started: Event, steps_file: str
) -> None:
    """Pretrain until killed on ``threads`` threads in a session of its own at ``niceness``
    (:func:`~segassist.worker.serve.lower_priority`, as the service's training worker),
    appending each step's end time to ``steps_file``."""
    torch.set_num_threads(threads)
    os.setsid()  # its own session, as the service starts its workers
    lower_priority(niceness)
    with open(steps_file, "a") as out, tempfile.TemporaryDirectory() as work:

        def progress(_: Progress) -> None:
            out.write(f"{time.monotonic()}\n")
            out.flush()
            started.set()

        pretrain([volume], _config(modality, 10**6), work, progress)


def _steps_between(steps_file: Path, began: float, ended: float) -> float:
    """Background steps per second over ``[began, ended]``."""
    times = [float(t) for t in steps_file.read_text().split()]
    inside = [t for t in times if began <= t <= ended]
    return len(inside) / (ended - began)


def _short_pretraining(volume: _Volume, steps: int) -> Callable[[], None]:
    def run() -> None:
        with tempfile.TemporaryDirectory() as work:
            pretrain([volume.image], _config(volume.case.modality, steps), work)

    return run


def _features_and_propagation(volume: _Volume) -> Callable[[], None]:
    case = volume.case
    encoder = Encoder.random(_config(case.modality, 1))
    sparse = sparse_labels(volume.label, case.axis, spread_slices(volume.label, case.axis, 3))

    def run() -> None:
        with tempfile.TemporaryDirectory() as tmp:
            maps = compute_feature_maps(encoder, volume.image, case.axis, Path(tmp))
            propagate(map_features(maps), sparse, case.axis, case.num_classes)

    return run


def _timed(run: Callable[[], None]) -> tuple[float, float, float]:
    """``(seconds, start, end)`` of one run (monotonic clock)."""
    began = time.monotonic()
    run()
    ended = time.monotonic()
    return ended - began, began, ended


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m segassist.bench.background_priority", description=__doc__
    )
    parser.add_argument("--set", default="totalseg-mr", help="registry set of the volume")
    parser.add_argument("--steps", type=int, default=20, help="steps of the short pretraining")
    parser.add_argument("--out", type=Path, default=RESULTS / "background_priority.md")
    args = parser.parse_args(argv)
    volume = _Volume.load(load_set(args.set)[0])
    cores = os.cpu_count() or 1
    workloads = {
        f"short pretraining ({args.steps} steps)": _short_pretraining(volume, args.steps),
        "features + propagation (k = 3)": _features_and_propagation(volume),
    }
    for run in workloads.values():
        run()  # warm-up: imports, allocator, first-call costs
    alone = {name: _timed(run)[0] for name, run in workloads.items()}
    lines = [
        "| background pretraining | its steps/s | " + " | ".join(workloads) + " |",
        "|---|---|" + "---|" * len(workloads),
        "| none | — | " + " | ".join(f"{alone[name]:.1f} s" for name in workloads) + " |",
    ]
    print(lines[-1], flush=True)
    context = mp.get_context("spawn")
    for threads, niceness in _backgrounds(cores):
        with tempfile.TemporaryDirectory() as tmp:
            steps_file = Path(tmp) / "steps.txt"
            steps_file.touch()
            started = context.Event()
            worker = context.Process(
                target=_background,
                args=(
                    volume.image,
                    volume.case.modality,
                    threads,
                    niceness,
                    started,
                    str(steps_file),
                ),
            )
            worker.start()
            try:
                started.wait(timeout=600)
                time.sleep(5.0)
                settle = time.monotonic()
                time.sleep(10.0)
                rate_alone = _steps_between(steps_file, settle, time.monotonic())
                cells, rates = [], []
                for run in workloads.values():
                    seconds, began, ended = _timed(run)
                    cells.append(f"{seconds:.1f} s")
                    rates.append(_steps_between(steps_file, began, ended))
            finally:
                worker.kill()
                worker.join()
        during = " / ".join(f"{rate:.2f}" for rate in rates)
        lines.append(
            f"| {threads} thread{'s' if threads > 1 else ''}, nice {niceness} "
            f"| {rate_alone:.2f} alone, "
            f"{during} during | " + " | ".join(cells) + " |"
        )
        print(lines[-1], flush=True)
    write_markdown(
        args.out,
        "A background pretraining's threads and niceness against the annotator's interactive jobs",
        "segassist.bench.background_priority",
        argv,
        f"Volume: {volume.case.name} {'×'.join(map(str, volume.image.shape))}; pretraining of "
        "the service's settings (pix2rep, 4-slice batches). Wall time of each interactive "
        "workload alone and during the background pretraining; the background's steps per "
        "second alone and during each workload.",
        lines,
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
