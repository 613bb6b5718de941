"""The one-command segment flow: upload → (pretrain or reuse) → few-shot fit → predict → download.

Used by ``segassist segment`` and the demo. Talks to the server through :class:`SegAssistClient`
only; reads the local sparse label volume with nibabel to learn which classes it holds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from rich.progress import Progress, TaskID

from client.api import SegAssistAPIError, SegAssistClient, job_status

__all__ = [
    "IGNORE_INDEX",
    "METHODS",
    "OBJECTIVES",
    "SegmentRequest",
    "SegmentResult",
    "annotated_axis",
    "classes_in_label_file",
    "find_reusable_encoder",
    "run_segment",
]

logger = logging.getLogger(__name__)

IGNORE_INDEX = 255
OBJECTIVES = ("none", "pix2rep", "pix2rep_barlow", "iic_boundary")
METHODS = ("linear", "finetune", "mean_teacher")


@dataclass
class SegmentRequest:
    """What ``segassist segment`` was asked to do.

    Attributes:
        image: the volume to segment (.nii, .nii.gz or a zipped DICOM series).
        labels: sparse label volume on the image's grid; 255 marks unannotated voxels.
        output: where the label volume is written (NIfTI on the input's affine).
        objective: SSL objective to pretrain with, or ``"none"`` (random initialisation).
        method: few-shot method (``linear``, ``finetune``, ``mean_teacher``).
        encoder_id: reuse this registered encoder instead of pretraining.
        reuse: reuse the newest registered encoder of the same modality and objective, if any.
        clusters: also write the cluster map here (and its PNG montage beside it, ``.png``).
        modality: dataset modality (``CT``, ``MR``, …).
        axis: slice axis for pretraining and fitting; ``None``: the axis along which the sparse
            labels annotate the fewest (whole) slices.
        steps: pretraining steps (``None``: the server's default).
        pretrain_config: extra ``PretrainConfig`` fields.
        fit_config: extra ``FewShotConfig`` fields.
        label_names: class index → name; unnamed classes are called ``class <i>``.
        dataset_name: name of the dataset created for this run (default: the image's stem).
    """

    image: Path
    labels: Path
    output: Path
    objective: str = "pix2rep"
    method: str = "linear"
    encoder_id: str | None = None
    reuse: bool = False
    clusters: Path | None = None
    modality: str = "CT"
    axis: int | None = None
    steps: int | None = None
    pretrain_config: dict[str, Any] = field(default_factory=dict)
    fit_config: dict[str, Any] = field(default_factory=dict)
    label_names: dict[int, str] = field(default_factory=dict)
    dataset_name: str | None = None


@dataclass
class SegmentResult:
    """Ids created by one segment run and the files written."""

    dataset_id: str
    image_id: str
    label_id: str
    encoder_id: str | None
    segmenter_id: str
    output: Path
    clusters: Path | None = None
    clusters_png: Path | None = None
    job_ids: list[str] = field(default_factory=list)


def _stem(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".zip"):
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return path.stem


def classes_in_label_file(path: str | Path) -> list[int]:
    """Class indices (≥ 1, ≠ 255) present in a label volume."""
    data = np.asanyarray(nib.load(str(path)).dataobj)  # type: ignore[attr-defined]
    values = np.unique(data)
    if not np.all(np.equal(np.mod(values, 1), 0)):
        raise ValueError(f"{path}: label volume holds non-integer values")
    classes = sorted(int(v) for v in values if v not in (0, IGNORE_INDEX))
    if not classes:
        raise ValueError(f"{path}: no annotated foreground voxels (values other than 0 and 255)")
    return classes


def annotated_axis(label: Mapping[str, Any], shape: Sequence[int]) -> int | None:
    """The slice axis of a sparse annotation, from a ``LabelPublic`` answer.

    The axis along which the fewest slices hold annotated voxels, provided that is fewer than
    the volume's extent along it (a fully annotated volume has no slice axis: ``None``).
    """
    counts = {
        int(axis): len(indices) for axis, indices in (label.get("annotated_slices") or {}).items()
    }
    sparse = {a: n for a, n in counts.items() if 0 < n < shape[a]}
    return min(sparse, key=lambda a: (sparse[a], -a)) if sparse else None


def _model_objective(model: Mapping[str, Any]) -> str | None:
    for source in (model, model.get("lineage") or {}, model.get("config") or {}):
        if isinstance(source, Mapping) and source.get("objective"):
            return str(source["objective"])
    return None


def find_reusable_encoder(api: SegAssistClient, modality: str, objective: str) -> str | None:
    """Newest registered encoder of ``modality`` trained with ``objective``, or ``None``."""
    encoders = api.list_models(kind="encoder", modality=modality)
    matching = [m for m in encoders if _model_objective(m) == objective]
    matching.sort(key=lambda m: str(m.get("created_at", "")), reverse=True)
    return str(matching[0]["id"]) if matching else None


class _JobBar:
    """Mirrors a job's progress into a rich progress bar task."""

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
        if info.get("loss") is not None:
            text += f" loss {float(info['loss']):.4f}"
        if total:
            self.progress.update(self.task, description=text, completed=step or 0, total=total)
        else:
            self.progress.update(self.task, description=text)
        if state == "succeeded":
            done = total or 1
            self.progress.update(self.task, completed=done, total=done)


def _step(progress: Progress | None, text: str) -> TaskID | None:
    return progress.add_task(text, total=1) if progress is not None else None


def _done(progress: Progress | None, task: TaskID | None) -> None:
    if progress is not None and task is not None:
        progress.update(task, completed=1)


def run_segment(
    api: SegAssistClient, request: SegmentRequest, progress: Progress | None = None
) -> SegmentResult:
    """Run the whole flow against ``api`` and write the requested files.

    Raises:
        SegAssistAPIError: the server refused a request (its message names the problem).
        JobFailedError: a pretrain or finetune job failed or was cancelled.
        ValueError: the label volume holds no annotation.
    """
    if request.objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {request.objective!r}")
    if request.method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {request.method!r}")
    classes = classes_in_label_file(request.labels)
    names = {c: request.label_names.get(c, f"class {c}") for c in classes}
    job_ids: list[str] = []

    task = _step(progress, f"upload {request.image.name}")
    dataset = api.create_dataset(
        request.dataset_name or _stem(request.image), request.modality, names
    )
    image = api.upload_image(dataset["id"], request.image)
    label = api.upload_label(image["id"], request.labels, tag="final")
    _done(progress, task)
    axis = request.axis
    if axis is None:
        axis = annotated_axis(label, image["shape"])
    pretrain_config = dict(request.pretrain_config)
    fit_config = dict(request.fit_config)
    if axis is not None:
        pretrain_config.setdefault("axis", axis)
        fit_config.setdefault("axis", axis)

    encoder_id = request.encoder_id
    if encoder_id is None and request.objective != "none":
        if request.reuse:
            encoder_id = find_reusable_encoder(api, request.modality, request.objective)
            if encoder_id is not None:
                logger.info("reusing encoder %s", encoder_id)
        if encoder_id is None:
            params: dict[str, Any] = {"objective": request.objective, "image_ids": [image["id"]]}
            if request.steps is not None:
                params["steps"] = request.steps
            if pretrain_config:
                params["config"] = pretrain_config
            job = api.create_job("pretrain", dataset["id"], params)
            job_ids.append(job["id"])
            done = api.wait_for_job(job["id"], _JobBar(progress, f"pretrain {request.objective}"))
            encoder_id = str(done["result"]["encoder_id"])

    if encoder_id is None and pretrain_config:
        # random initialisation: the worker builds the untrained encoder from this config
        fit_config.setdefault("encoder", pretrain_config)
    fit_params: dict[str, Any] = {
        "encoder_id": encoder_id,
        "method": request.method,
        "label_ids": [label["id"]],
    }
    if fit_config:
        fit_params["config"] = fit_config
    job = api.create_job("finetune", dataset["id"], fit_params)
    job_ids.append(job["id"])
    done = api.wait_for_job(job["id"], _JobBar(progress, f"few-shot {request.method}"))
    segmenter_id = str(done["result"]["segmenter_id"])

    task = _step(progress, "predict and download")
    api.predict(segmenter_id, image["id"])
    output = api.download_prediction(segmenter_id, image["id"], "labels.nii.gz", request.output)
    result = SegmentResult(
        dataset_id=dataset["id"],
        image_id=image["id"],
        label_id=label["id"],
        encoder_id=encoder_id,
        segmenter_id=segmenter_id,
        output=output,
        job_ids=job_ids,
    )
    if request.clusters is not None:
        png = request.clusters.with_name(_stem(request.clusters) + ".png")
        try:
            result.clusters = api.download_prediction(
                segmenter_id, image["id"], "clusters.nii.gz", request.clusters
            )
            result.clusters_png = api.download_prediction(
                segmenter_id, image["id"], "clusters.png", png
            )
        except SegAssistAPIError as exc:
            if exc.status_code != 404:
                raise
            logger.warning("no cluster map for this model: %s", exc.detail)
    _done(progress, task)
    return result
