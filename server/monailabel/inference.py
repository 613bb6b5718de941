"""``POST /infer/{model}``: a stored prediction, or one made by a worker, encoded for a viewer.

The API never runs a model. ``segmentation`` serves ``labels.nii.gz`` and ``clusters`` serves
``clusters.nii.gz`` (values shifted to 1…K: viewers treat 0 as "no segment") of the dataset's
newest segmenter on the image (:func:`~segassist.server.monailabel.apps.serving_segmenter`: a
background refinement's network serves only the images it refined), written by the assist job
that trained it or by an earlier ``infer``. When that file does not exist yet, a ``predict`` job
(with probabilities, so the ``uncertainty`` strategy can rank the image) is queued, or an
identical queued one reused, and the request waits for it without holding a thread. Before any
training there is no segmenter: 409, "train first".

The answer is what 3D Slicer parses (``cgi.FieldStorage`` on the raw socket): a
``multipart/form-data`` body with a fixed ``Content-Length``, a ``params`` part (JSON, no file
name; ``label_names`` maps segment names to values) and an ``image`` part whose file name carries
the result's extension. ``output=image`` answers the file alone (OHIF), ``output=json`` the params.
For OHIF (``output`` given), an NRRD result of an image that came from DICOM is in the series'
own voxel order (OHIF copies it straight into the series as it stacks it: :func:`series_order`),
its geometry unchanged; the params carry each segment's ``centroids`` (OHIF's extension reads
them).
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nibabel as nib
import numpy as np
from celery import Celery
from fastapi import HTTPException, status
from fastapi.concurrency import run_in_threadpool
from sqlalchemy import select
from sqlalchemy.orm import Session

from segassist.models.runtime.manifest import Manifest
from segassist.models.runtime.nifti import open_nifti
from segassist.server.db.tables import Image, Job, JobKind, JobStatus
from segassist.server.errors import not_found, unprocessable
from segassist.server.monailabel import sessions
from segassist.server.monailabel.apps import (
    CLUSTERS_MODEL,
    MODELS,
    SEGMENTATION_MODEL,
    App,
    file_name,
    find_image,
    serving_segmenter,
    unknown,
)
from segassist.server.monailabel.volumes import RESULT_DTYPES, RESULT_EXTENSIONS, encode_result
from segassist.server.routes.jobs import submit_job
from segassist.server.schemas import PredictParams
from segassist.server.storage import Storage

__all__ = [
    "INFER_TIMEOUT_SECONDS",
    "OHIF_OUTPUTS",
    "Result",
    "centroids",
    "encode",
    "multipart",
    "plan",
    "series_order",
    "wait_for_job",
]

INFER_TIMEOUT_SECONDS = 600.0
"""How long one infer request waits for its prediction job before answering 504."""
_POLL_SECONDS = 0.2
_FILES = {SEGMENTATION_MODEL: "labels.nii.gz", CLUSTERS_MODEL: "clusters.nii.gz"}
OHIF_OUTPUTS = ("image", "all")
"""``output`` values of OHIF's infer calls (Slicer sends none)."""


@dataclass
class Result:
    """What an infer request serves: the prediction file, and the job making it (if any)."""

    image: Image
    segmenter_id: str
    segmenter_folder: str
    path: Path
    job_id: str | None


def _image(
    session: Session, storage: Storage, app: App, ref: str | None, session_id: str | None
) -> Image:
    dataset = app.require()
    if session_id:
        record = sessions.get(storage, session_id, touch=True)
        image = session.get(Image, record.image_id) if record is not None else None
        if image is None or image.dataset_id != dataset.id:
            raise not_found("session", session_id)
        return image
    if not ref:
        raise unprocessable("say which image to segment: ?image=<id or name> or ?session_id=")
    return find_image(session, dataset, ref, storage=storage)


def _pending_prediction(
    session: Session, dataset_id: str, model_id: str, image_id: str
) -> Job | None:
    jobs = session.scalars(
        select(Job).where(
            Job.dataset_id == dataset_id,
            Job.kind == JobKind.predict,
            Job.status.in_([JobStatus.queued, JobStatus.running]),
        )
    )
    for job in jobs:
        params = job.params or {}
        if params.get("model_id") == model_id and params.get("image_ids") == [image_id]:
            return job
    return None


def plan(
    session: Session,
    storage: Storage,
    celery: Celery,
    app: App,
    model: str,
    image_ref: str | None,
    session_id: str | None,
) -> Result:
    """Check the request and find (or start making) the prediction it serves."""
    if model not in MODELS:
        raise unknown("model", model, MODELS)
    image = _image(session, storage, app, image_ref, session_id)
    dataset = app.require()
    segmenter = serving_segmenter(session, storage, dataset, image)
    if segmenter is None:
        raise HTTPException(
            status.HTTP_409_CONFLICT,
            f"no segmenter has been trained on dataset {dataset.id!r} yet: train first (save a "
            "label with a few painted slices, then POST /train/segmentation), then infer",
        )
    path = storage.prediction_dir(segmenter.id, image.id) / _FILES[model]
    if path.is_file():
        return Result(image, segmenter.id, segmenter.folder, path, None)
    if not (Path(segmenter.folder) / "manifest.json").is_file():
        raise HTTPException(
            status.HTTP_409_CONFLICT, f"artifacts of segmenter {segmenter.id!r} are missing"
        )
    job = _pending_prediction(session, dataset.id, segmenter.id, image.id)
    if job is None:
        params = PredictParams(model_id=segmenter.id, image_ids=[image.id], probabilities=True)
        job_id = submit_job(
            session, celery, JobKind.predict, dataset, params.model_dump(mode="json")
        ).id
    else:
        job_id = job.id
    return Result(image, segmenter.id, segmenter.folder, path, job_id)


def _job_state(session: Session, job_id: str) -> tuple[JobStatus, str | None]:
    session.commit()  # end the read transaction: see the worker's updates
    row = session.execute(select(Job.status, Job.error).where(Job.id == job_id)).one()
    return JobStatus(row[0]), row[1]


async def wait_for_job(
    session: Session, job_id: str, timeout: float = INFER_TIMEOUT_SECONDS
) -> None:
    """Poll the job row until it succeeded (asyncio sleeps: no thread is held while waiting).

    Raises:
        HTTPException: 500 when the job failed or was cancelled, 504 after ``timeout``.
    """
    deadline = time.monotonic() + timeout
    while True:
        state, error = await run_in_threadpool(_job_state, session, job_id)
        if state == JobStatus.succeeded:
            return
        if state.finished:
            raise HTTPException(
                status.HTTP_500_INTERNAL_SERVER_ERROR,
                f"prediction job {job_id} {state}: {error or 'no error recorded'}",
            )
        if time.monotonic() > deadline:
            raise HTTPException(
                status.HTTP_504_GATEWAY_TIMEOUT,
                f"prediction job {job_id} still {state} after {timeout:.0f} s: try again later",
            )
        await asyncio.sleep(_POLL_SECONDS)


def _option(params: dict[str, Any], key: str, default: Any) -> Any:
    value = params.get(key)
    return default if value is None or value == "" else value


def encode(
    result: Result, model: str, params: dict[str, Any], output: str | None = None
) -> tuple[bytes, str, dict[str, Any]]:
    """The result file's bytes, its file name and the response params.

    ``params`` may hold ``result_extension`` (``.nrrd`` default, ``.nii.gz``, ``.nii``),
    ``result_dtype`` (``uint8`` default) and ``result_compress`` (default true). With OHIF's
    ``output`` (``image``, or ``all`` in its newer extension), an NRRD of an image that came
    from DICOM is in the series' voxel order (:func:`series_order`); Slicer (no ``output``) gets
    the stored image's order. Both place every voxel at the same position.
    """
    extension = str(_option(params, "result_extension", ".nrrd")).lower()
    extension = extension if extension.startswith(".") else f".{extension}"
    dtype = str(_option(params, "result_dtype", "uint8")).lower()
    compress = _option(params, "result_compress", True)
    if extension not in RESULT_EXTENSIONS:
        raise unprocessable(
            f"result_extension {extension!r} is not one of {list(RESULT_EXTENSIONS)}"
        )
    if dtype not in RESULT_DTYPES:
        raise unprocessable(f"result_dtype {dtype!r} is not one of {list(RESULT_DTYPES)}")
    reference = open_nifti(result.path)
    data = np.asarray(reference.dataobj, dtype=np.uint16)
    if model == CLUSTERS_MODEL:
        data = data + 1
        label_names = {f"cluster {k}": k for k in range(1, int(data.max(initial=0)) + 1)}
    else:
        manifest = Manifest.load(Path(result.segmenter_folder) / "manifest.json")
        label_names = {name: int(value) for value, name in sorted(manifest.labels.items())}
    if output in OHIF_OUTPUTS and extension == ".nrrd" and result.image.source != "nifti":
        data, reference = series_order(data, reference)
    content = encode_result(data, reference, extension, dtype, compress=bool(compress))
    name = file_name(result.image, "")
    response = {
        "label_names": label_names,
        "model": model,
        "image": result.image.id,
        "segmenter_id": result.segmenter_id,
        "prediction_job_id": result.job_id,
        "result_extension": extension,
        "result_dtype": dtype,
        "centroids": centroids(data, label_names),
    }
    return content, f"{name}-{model}{extension}", response


def centroids(data: np.ndarray, label_names: dict[str, int]) -> dict[str, list[int]]:
    """``{name: [value, i, j, k]}``: the mean voxel index (in the result's order) of each
    segment present, as OHIF's extension reads it to jump to a segment."""
    found = {}
    for name, value in label_names.items():
        where = np.argwhere(data == value) if value > 0 else np.empty((0, 3))
        if len(where):
            found[name] = [int(value), *(int(v) for v in np.rint(where.mean(axis=0)))]
    return found


def series_order(
    data: np.ndarray, reference: nib.Nifti1Image
) -> tuple[np.ndarray, nib.Nifti1Image]:
    """A volume of a DICOM-sourced image in the series' own voxel order, for NRRD results.

    The stored layout (:mod:`segassist.server.dicom`) runs its second axis against the DICOM rows (row
    ``R−1`` first); OHIF copies a result's voxels straight into the series as it stacks it
    (columns fastest, then rows from row 0, then instances along the slice normal). Reversing
    the second axis gives that order; the affine follows (``A' = A · F`` with ``F`` mapping
    ``y → R−1−y``), so the NRRD's geometry still places every voxel where it was.
    """
    rows = data.shape[1]
    flip = np.eye(4)
    flip[1, 1] = -1.0
    flip[1, 3] = rows - 1
    affine = np.asarray(reference.affine, dtype=np.float64) @ flip
    flipped = np.ascontiguousarray(data[:, ::-1, :])
    return flipped, nib.Nifti1Image(flipped, affine, reference.header)


def multipart(params: dict[str, Any], filename: str, content: bytes) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body: ``params`` (JSON) then ``image`` (the file); returns
    ``(body, content type)``."""
    boundary = uuid.uuid4().hex
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="params"\r\n'
        "Content-Type: application/json\r\n\r\n"
        f"{json.dumps(params)}\r\n"
        f"--{boundary}\r\n"
        f'Content-Disposition: form-data; name="image"; filename="{filename}"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    body = head + content + f"\r\n--{boundary}--\r\n".encode()
    return body, f"multipart/form-data; boundary={boundary}"
