"""``segassist segment``: upload an image and its sparse labels, run the assist job, download.

Used by ``segassist segment`` and the demo. Talks to the server through :class:`SegAssistClient`
only and holds no workflow logic: the server's assist workflow (``POST /datasets/{id}/assist``)
decides the slice axis, the classes and the encoder, fits and predicts.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.progress import Progress, TaskID

from segassist.client.api import JobFailedError, SegAssistClient, job_status

__all__ = [
    "METHODS",
    "OBJECTIVES",
    "SegmentRequest",
    "SegmentResult",
    "refinement_text",
    "run_segment",
]

logger = logging.getLogger(__name__)

OBJECTIVES = ("pix2rep", "pix2rep_barlow", "iic_boundary", "none")
"""What ``--objective`` accepts (the server's vocabulary; ``none`` = random initialisation)."""
METHODS = ("linear", "finetune", "mean_teacher", "auto")
"""What ``--method`` accepts (the server's :data:`Method`; ``auto``: the best on held-out labels)."""


@dataclass
class SegmentRequest:
    """What ``segassist segment`` was asked to do.

    Attributes:
        image: the volume to segment (.nii, .nii.gz or a zipped DICOM series).
        labels: sparse label volume on the image's grid; 255 marks unannotated voxels.
        output: where the label volume is written (NIfTI on the input's affine).
        objective: reuse or pretrain only an encoder of this objective; ``"none"``: random
            initialisation; ``None``: the server's choice (any encoder of the modality).
        method: few-shot method (``linear``, ``finetune``, ``mean_teacher``, ``auto``).
        head: probe head (``linear``, ``mlp`` or ``auto``); ``None``: the server's default.
        encoder_id: use this registered encoder.
        clusters: also write the cluster map here (and its PNG montage beside it, ``.png``).
        modality: dataset modality (``CT``, ``MR``, …).
        axis: slice axis (``None``: the server takes it from the labels).
        fit_config: expert overrides of the few-shot fit (``FewShotConfig`` fields).
        label_names: class index → name (default: the server names them ``class <i>``).
        dataset_name: name of the dataset created for this run (default: the image's stem).
        wait_for_refinement: when the assist queues a background refinement (a network
            trained from scratch, kept if it scores better on a held-out labelled slice), wait
            for it and write its segmentation instead when it wins.
    """

    image: Path
    labels: Path
    output: Path
    objective: str | None = None
    method: str = "linear"
    head: str | None = None
    encoder_id: str | None = None
    clusters: Path | None = None
    modality: str = "CT"
    axis: int | None = None
    fit_config: dict[str, Any] = field(default_factory=dict)
    label_names: dict[int, str] = field(default_factory=dict)
    dataset_name: str | None = None
    wait_for_refinement: bool = True


@dataclass
class SegmentResult:
    """Ids created by one segment run, the files written, and what the fit chose.

    Attributes:
        method: the fitted method as the registry names it (``probe-linear``, ``finetune``, …;
            for ``auto`` the winner).
        validation: ``auto`` (or head ``auto``): each candidate's held-out Dice, or why it was
            skipped; None otherwise.
        encoder_id: the encoder the assist propagated through (None: random initialisation).
        own_labels: what the image's labelled slices changed in its prediction: the job
            result's ``propagation``, ``slice_prior`` and ``components`` entries of the image.
        refinement: the background refinement's job ``id``, ``status`` and its result's
            ``outcome``, ``method`` and ``validation`` (None: none was queued, or not waited
            for). When its outcome is ``refined``, ``segmenter_id``, ``job_id``,
            ``next_slice``, ``method`` and the files describe its segmentation (a blend of the
            assist's propagation with a network trained from scratch, which is the segmenter).
    """

    dataset_id: str
    image_id: str
    label_id: str
    encoder_id: str | None
    segmenter_id: str
    job_id: str
    output: Path
    next_slice: int | None = None
    method: str | None = None
    validation: dict[str, Any] | None = None
    own_labels: dict[str, Any] = field(default_factory=dict)
    refinement: dict[str, Any] | None = None
    clusters: Path | None = None
    clusters_png: Path | None = None


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".zip"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


class _JobBar:
    """Mirrors a job's progress (its phase, step/total, loss, ETA) into a rich progress bar."""

    def __init__(self, progress: Progress | None, label: str) -> None:
        self.progress = progress
        self.label = label
        self.task: TaskID | None = None
        if progress is not None:
            self.task = progress.add_task(f"{label}: queued", total=None)

    def __call__(self, job: dict[str, Any]) -> None:
        if self.progress is None or self.task is None:
            return
        state = job_status(job)
        info = job.get("progress") or {}
        step, total = info.get("step"), info.get("total")
        text = f"{self.label}: {info.get('phase') or state}"
        if info.get("loss"):
            text += f" loss {float(info['loss']):.4f}"
        if total:
            self.progress.update(self.task, description=text, completed=step or 0, total=total)
        else:
            self.progress.update(self.task, description=text)
        if state == "succeeded":
            done = total or 1
            self.progress.update(self.task, completed=done, total=done)


def run_segment(
    api: SegAssistClient, request: SegmentRequest, progress: Progress | None = None
) -> SegmentResult:
    """Upload the image and labels, run the server's assist workflow, download the outputs.

    The server decides everything else (slice axis, classes, encoder reuse or pretraining, fit,
    prediction): this is what every client does.

    Raises:
        SegAssistAPIError: the server refused a request (its message names the problem).
        JobFailedError: the assist job failed or was cancelled.
    """
    task = progress.add_task(f"upload {request.image.name}", total=1) if progress else None
    names = {c: {"name": n} for c, n in request.label_names.items()}
    dataset = api.create_dataset(
        request.dataset_name or _stem(request.image), request.modality, names
    )
    image = api.upload_image(dataset["id"], request.image)
    label = api.upload_label(image["id"], request.labels, tag="final")
    if progress is not None and task is not None:
        progress.update(task, completed=1)
    body: dict[str, Any] = {"image_ids": [image["id"]], "method": request.method}
    optional = {
        "objective": request.objective,
        "encoder_id": request.encoder_id,
        "axis": request.axis,
        "head": request.head,
        "config": request.fit_config or None,
    }
    body |= {k: v for k, v in optional.items() if v is not None}
    job = api.assist(dataset["id"], body)
    done = api.wait_for_job(job["id"], _JobBar(progress, "assist"))
    image_id = image["id"]
    assisted = done["result"]  # its encoder is behind any refinement too
    output = api.download(assisted["predictions"][image_id]["labels"], request.output)
    refinement = None
    refine_id = done["result"].get("refine_job_id")
    if refine_id is not None and request.wait_for_refinement:
        try:  # the assist's segmentation is written already: an interrupted wait loses nothing
            refined = api.wait_for_job(refine_id, _JobBar(progress, "refinement"))
        except JobFailedError as exc:  # the assist's segmentation stands
            logger.warning("%s", exc)
            refined = exc.job
        outcome = (refined.get("result") or {}).get("outcome")
        refinement = {
            "id": refine_id,
            "status": refined["status"],
            "outcome": outcome,
            "method": (refined.get("result") or {}).get("method"),
            "validation": (refined.get("result") or {}).get("validation"),
        }
        if outcome == "refined":
            done = refined
            urls = done["result"]["predictions"][image_id]
            output = api.download(urls["labels"], request.output)
    result = done["result"]
    urls = result["predictions"][image_id]
    segment = SegmentResult(
        dataset_id=dataset["id"],
        image_id=image["id"],
        label_id=label["id"],
        encoder_id=assisted.get("encoder_id"),
        segmenter_id=result["segmenter_id"],
        job_id=done["id"],
        output=output,
        next_slice=(result.get("next_slice") or {}).get(image["id"]),
        method=result.get("method"),
        validation=None if refinement and done["id"] == refine_id else result.get("validation"),
        own_labels={
            key: (result.get(key) or {}).get(image["id"])
            for key in ("propagation", "slice_prior", "components")
            if (result.get(key) or {}).get(image["id"])
        },
        refinement=refinement,
    )
    if request.clusters is not None:
        png = request.clusters.with_name(_stem(request.clusters) + ".png")
        segment.clusters = api.download(urls["clusters"], request.clusters)
        segment.clusters_png = api.download(urls["clusters_png"], png)
    return segment


def refinement_text(refinement: dict[str, Any]) -> str:
    """``held-out slice Dice: propagation 0.703, blend 0.790 → blend replaced the
    segmentation`` or why there is no decision (the job's state)."""
    outcome, validation = refinement.get("outcome"), refinement.get("validation") or {}
    if outcome not in ("refined", "kept", "restored"):
        return f"job {refinement['id']} {refinement['status']} {outcome or ''}".rstrip()
    scores = ", ".join(
        f"{name} {value:.3f}" for name, value in validation.items() if isinstance(value, float)
    )
    decision = {
        "refined": f"{refinement.get('method')} replaced the segmentation",
        "restored": "the segmentation before the refit is back",
    }.get(outcome, "the propagated segmentation stands")
    return f"held-out slice Dice: {scores} → {decision}"
