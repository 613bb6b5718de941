"""``segassist demo``: segment a real spine CT from three labelled slices.

The CT of the ``tptbox-spine`` set (TPTBox's sample, fetched from the package registry by
:mod:`segassist.models.datasets`) is segmented into vertebral body and posterior elements from three
annotated axial slices spread over the spine through the server's assist workflow: with no
encoder for CT yet, the local embedded service pretrains one briefly on the volume
(``SEGASSIST_ASSIST_PRETRAIN_STEPS``, 60 steps of 4 slices: about two minutes on 2 CPU cores) and
continues in the background, fits a linear few-shot head, predicts every slice, and the demo prints
the Dice against the reference on the slices nobody labelled. The service is left running, with its
API documentation at ``http://127.0.0.1:8000/docs``; the demo ends with the address of the browser
annotator showing the result (``http://127.0.0.1:8000/?dataset=…&image=…``).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from rich.console import Console
from rich.table import Table

from segassist.client.api import SegAssistClient
from segassist.client.local import DEFAULT_HOST, DEFAULT_PORT, ensure_local_service
from segassist.client.segment import (
    SegmentRequest,
    SegmentResult,
    refinement_text,
    run_segment,
)
from segassist.models.runtime.configs import IGNORE_INDEX

__all__ = [
    "DemoScore",
    "annotator_url",
    "dice_on_unlabelled",
    "make_sparse_labels",
    "pick_slices",
    "run_demo",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class DemoScore:
    """Dice of one class on the unlabelled slices."""

    name: str
    dice: float
    reference_voxels: int


def pick_slices(label: np.ndarray, axis: int, k: int = 3) -> list[int]:
    """``k`` slice indices along ``axis`` spread evenly over the foreground's extent.

    The extent is cut into ``k`` equal parts and the middle slice of each is taken, so no pick
    sits on the structure's thin first or last slice.
    """
    moved = np.moveaxis(label, axis, -1)
    present = np.flatnonzero(moved.reshape(-1, moved.shape[-1]).any(axis=0))
    if present.size < k:
        raise ValueError(f"only {present.size} slices hold foreground; cannot pick {k}")
    first, last = int(present[0]), int(present[-1])
    width = (last - first + 1) / k
    return [int(first + width * (i + 0.5)) for i in range(k)]


def make_sparse_labels(label: np.ndarray, axis: int, slices: list[int]) -> np.ndarray:
    """A label volume with only ``slices`` (along ``axis``) annotated; 255 elsewhere."""
    sparse = np.full(label.shape, IGNORE_INDEX, dtype=np.uint8)
    index: list[slice | list[int]] = [slice(None)] * label.ndim
    index[axis] = slices
    sparse[tuple(index)] = label[tuple(index)].astype(np.uint8)
    return sparse


def dice_on_unlabelled(
    prediction: np.ndarray,
    reference: np.ndarray,
    axis: int,
    labelled: list[int],
    classes: dict[int, str],
) -> list[DemoScore]:
    """Dice per class over the slices along ``axis`` that were not in ``labelled``."""
    keep = np.ones(reference.shape[axis], dtype=bool)
    keep[labelled] = False
    pred = np.compress(keep, prediction, axis=axis)
    ref = np.compress(keep, reference, axis=axis)
    scores = []
    for value, name in sorted(classes.items()):
        p, r = pred == value, ref == value
        denominator = int(p.sum() + r.sum())
        dice = 2.0 * float(np.logical_and(p, r).sum()) / denominator if denominator else 1.0
        scores.append(DemoScore(name, dice, int(r.sum())))
    return scores


def annotator_url(server: str, dataset_id: str, image_id: str) -> str:
    """The browser annotator's address with an image (and its latest segmentation) open."""
    return f"{server.rstrip('/')}/?dataset={dataset_id}&image={image_id}"


def _save_like(array: np.ndarray, like: nib.Nifti1Image, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    header = like.header.copy()
    header.set_data_dtype(np.uint8)
    image = nib.Nifti1Image(array, like.affine, header)
    nib.save(image, str(path))
    return path


def run_demo(
    data_dir: Path,
    out_dir: Path,
    steps: int | None = None,
    console: Console | None = None,
    server: str | None = None,
) -> int:
    """Run the demo end to end; returns the process exit code.

    Args:
        data_dir: data directory of the local service (started if not already running).
        out_dir: where the sparse labels, segmentation and cluster maps are written.
        steps: steps of the short pretraining of a local service this demo starts (default:
            the service's ``assist_pretrain_steps``); a running service keeps its own.
        console: where the report is printed.
        server: use this server instead of the local embedded one.
    """
    from segassist.models.datasets import load_set  # lazy: the data cache is only needed here

    console = console or Console()
    console.rule("segassist demo: spine CT from 3 labelled slices")
    case = next(c for c in load_set("tptbox-spine") if c.modality == "CT")
    image = nib.load(str(case.image))
    reference_img = nib.load(str(case.label))
    reference = np.asanyarray(reference_img.dataobj).astype(np.uint8)  # type: ignore[attr-defined]
    slices = pick_slices(reference, case.axis, k=3)
    sparse_path = _save_like(
        make_sparse_labels(reference, case.axis, slices),
        reference_img,  # type: ignore[arg-type]
        out_dir / "sparse_labels.nii.gz",
    )
    console.print(
        f"image {case.image} {tuple(image.shape)}; "  # type: ignore[attr-defined]
        f"labelled slices {slices} along axis {case.axis}; classes "
        + ", ".join(f"{k}={v}" for k, v in case.classes.items())
    )

    if server is None:
        if steps is not None:
            os.environ["SEGASSIST_ASSIST_PRETRAIN_STEPS"] = str(steps)
        server, started = ensure_local_service(DEFAULT_HOST, DEFAULT_PORT, data_dir)
        if started:
            console.print(f"started the local service at {server} (data: {data_dir})")
    request = SegmentRequest(
        image=case.image,
        labels=sparse_path,
        output=out_dir / "segmentation.nii.gz",
        method="linear",
        clusters=out_dir / "clusters.nii.gz",
        modality=case.modality,
        label_names=dict(case.classes),
        dataset_name="demo tptbox-spine CT",
    )
    from segassist.client.cli import make_progress  # the CLI's progress bar, on stderr

    with SegAssistClient(server) as api, make_progress() as progress:
        result = run_segment(api, request, progress)
    _report(console, case.classes, reference, case.axis, slices, result, server)
    return 0


def _report(
    console: Console,
    classes: dict[int, str],
    reference: np.ndarray,
    axis: int,
    slices: list[int],
    result: SegmentResult,
    server: str,
) -> None:
    prediction = np.asanyarray(nib.load(str(result.output)).dataobj)  # type: ignore[attr-defined]
    scores = dice_on_unlabelled(prediction, reference, axis, slices, classes)
    table = Table(title=f"Dice on the {reference.shape[axis] - len(slices)} unlabelled slices")
    table.add_column("class")
    table.add_column("Dice", justify="right")
    table.add_column("reference voxels", justify="right")
    for score in scores:
        table.add_row(score.name, f"{score.dice:.3f}", str(score.reference_voxels))
    table.add_row("mean", f"{np.mean([s.dice for s in scores]):.3f}", "")
    console.print(table)
    console.print(f"segmentation: [bold]{result.output}[/bold]")
    if result.clusters is not None:
        console.print(f"cluster map: [bold]{result.clusters}[/bold]")
    if result.clusters_png is not None:
        console.print(f"cluster map picture: [bold]{result.clusters_png}[/bold]")
    if result.refinement is not None:
        console.print(f"refinement: {refinement_text(result.refinement)}")
    console.print(
        f"encoder {result.encoder_id}, segmenter {result.segmenter_id}; "
        f"the API stays up: [bold]{server}/docs[/bold]"
    )
    page = annotator_url(server, result.dataset_id, result.image_id)
    # the last line, whole (soft_wrap: no line break inside the address)
    console.print(f"see it in the browser, paint and correct: [bold]{page}[/bold]", soft_wrap=True)
