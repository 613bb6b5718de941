"""Python client for the segassist REST API (``/api/v1``), over httpx.

Every method maps to one route of the REST table in ``docs/internals.md`` and returns the JSON
answer as a ``dict`` (or a path, for downloads). Client mistakes answered by the server with a 4xx
raise :class:`SegAssistAPIError` carrying the server's ``detail`` message.

Example::

    with SegAssistClient("http://127.0.0.1:8000") as api:
        ds = api.create_dataset("spine", "CT", {1: "vertebra"})
        img = api.upload_image(ds["id"], "ct.nii.gz")
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import httpx

__all__ = [
    "API_PREFIX",
    "TERMINAL_STATES",
    "JobFailedError",
    "SegAssistAPIError",
    "SegAssistClient",
    "job_status",
]

logger = logging.getLogger(__name__)

API_PREFIX = "/api/v1"
TERMINAL_STATES = frozenset({"succeeded", "failed", "cancelled"})

_PALETTE = (
    "#e6194b",
    "#3cb44b",
    "#ffe119",
    "#4363d8",
    "#f58231",
    "#911eb4",
    "#46f0f0",
    "#f032e6",
    "#bcf60c",
    "#fabebe",
)

JobCallback = Callable[[dict[str, Any]], None]


class SegAssistAPIError(RuntimeError):
    """The server answered a request with an error status.

    Attributes:
        status_code: HTTP status of the answer.
        detail: the server's message naming the problem (``{"detail": ...}``), or the raw body.
        method: HTTP method of the request.
        url: URL of the request.
    """

    def __init__(self, status_code: int, detail: str, method: str, url: str) -> None:
        super().__init__(f"{method} {url} -> {status_code}: {detail}")
        self.status_code = status_code
        self.detail = detail
        self.method = method
        self.url = url


class JobFailedError(RuntimeError):
    """A job ended in ``failed`` or ``cancelled`` while being waited for.

    Attributes:
        job: the job's last ``JobPublic`` answer.
    """

    def __init__(self, job: dict[str, Any]) -> None:
        status = job_status(job)
        error = job.get("error") or "no error message"
        super().__init__(f"{job.get('kind', 'job')} job {job.get('id')} {status}: {error}")
        self.job = job


def job_status(job: Mapping[str, Any]) -> str:
    """The state of a ``JobPublic`` answer (``queued``, ``running``, ``succeeded``, …)."""
    return str(job.get("status") or job.get("state") or "unknown")


def _detail(response: httpx.Response) -> str:
    try:
        body = response.json()
    except ValueError:
        return response.text.strip() or response.reason_phrase
    if isinstance(body, dict) and "detail" in body:
        detail = body["detail"]
        if isinstance(detail, list):  # FastAPI validation errors
            parts = []
            for item in detail:
                if isinstance(item, dict):
                    where = ".".join(str(p) for p in item.get("loc", ()))
                    parts.append(f"{where}: {item.get('msg', item)}")
                else:
                    parts.append(str(item))
            return "; ".join(parts)
        return str(detail)
    return str(body)


def _label_schema(labels: Mapping[int, Any] | Mapping[str, Any]) -> dict[str, dict[str, str]]:
    """Normalise ``{1: "liver"}`` or ``{"1": {"name": ..., "color": ...}}`` to the API's form."""
    schema: dict[str, dict[str, str]] = {}
    items = sorted(((int(k), v) for k, v in labels.items()), key=lambda kv: kv[0])
    for i, (key, value) in enumerate(items):
        if isinstance(value, Mapping):
            entry = {"name": str(value["name"]), "color": str(value.get("color", ""))}
        else:
            entry = {"name": str(value), "color": ""}
        if not entry["color"]:
            entry["color"] = _PALETTE[i % len(_PALETTE)]
        schema[str(key)] = entry
    return schema


class SegAssistClient:
    """Synchronous client of one segassist server.

    Args:
        base_url: server root, e.g. ``http://127.0.0.1:8000`` (the ``/api/v1`` prefix is added).
        timeout: seconds for connecting and for each read (long uploads and downloads read in
            chunks, so this bounds a stall, not a transfer).
        token: bearer token, for a server started with ``SEGASSIST_API_TOKEN``; default: that
            environment variable, if set.
        http: an existing ``httpx.Client`` whose ``base_url`` is the server root (for tests or
            custom transports); the client does not close a client it was given.
    """

    def __init__(
        self,
        base_url: str = "http://127.0.0.1:8000",
        timeout: float = 300.0,
        token: str | None = None,
        http: httpx.Client | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        token = token if token is not None else os.environ.get("SEGASSIST_API_TOKEN", "")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        self._owns_http = http is None
        self._http = http or httpx.Client(base_url=self.base_url, timeout=timeout, headers=headers)
        if http is not None and headers:
            self._http.headers.update(headers)

    # -- plumbing -------------------------------------------------------------------------------
    def close(self) -> None:
        """Close the underlying connection pool (if this client created it)."""
        if self._owns_http:
            self._http.close()

    def __enter__(self) -> SegAssistClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def url(self, path: str) -> str:
        """Absolute URL of an API path (``/jobs`` or an already prefixed ``/api/v1/...``)."""
        if path.startswith(("http://", "https://")):
            return path
        if not path.startswith(API_PREFIX):
            path = API_PREFIX + path
        return self.base_url + path

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        url = self.url(path)
        response = self._http.request(method, url, **kwargs)
        if response.is_error:
            raise SegAssistAPIError(response.status_code, _detail(response), method, url)
        return response

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        return self._request(method, path, **kwargs).json()

    # -- health ---------------------------------------------------------------------------------
    def health(self) -> dict[str, Any]:
        """``GET /health``: status of the API, its database and its broker."""
        return dict(self._json("GET", "/health"))

    def is_healthy(self) -> bool:
        """True when the server answers ``/health`` with ``status == "ok"``; never raises."""
        try:
            return self.health().get("status") == "ok"
        except (httpx.HTTPError, SegAssistAPIError, ValueError):
            return False

    # -- datasets -------------------------------------------------------------------------------
    def create_dataset(
        self, name: str, modality: str, labels: Mapping[int, Any] | Mapping[str, Any]
    ) -> dict[str, Any]:
        """``POST /datasets``. ``labels`` maps class index (≥ 1) to a name or ``{name, color}``."""
        body = {"name": name, "modality": modality, "labels": _label_schema(labels)}
        return dict(self._json("POST", "/datasets", json=body))

    def list_datasets(self) -> list[dict[str, Any]]:
        """``GET /datasets``."""
        return list(self._json("GET", "/datasets"))

    def get_dataset(self, dataset_id: str) -> dict[str, Any]:
        """``GET /datasets/{id}``."""
        return dict(self._json("GET", f"/datasets/{dataset_id}"))

    # -- images ---------------------------------------------------------------------------------
    def upload_image(
        self, dataset_id: str, path: str | os.PathLike[str], name: str | None = None
    ) -> dict[str, Any]:
        """``POST /datasets/{id}/images``: stream a NIfTI or a zipped DICOM series."""
        path = Path(path)
        data = {"name": name} if name else None
        with path.open("rb") as fh:  # httpx reads file objects in chunks: never whole in memory
            files = {"file": (path.name, fh, "application/octet-stream")}
            return dict(
                self._json("POST", f"/datasets/{dataset_id}/images", files=files, data=data)
            )

    def list_images(self, dataset_id: str) -> list[dict[str, Any]]:
        """``GET /datasets/{id}/images``."""
        return list(self._json("GET", f"/datasets/{dataset_id}/images"))

    def get_image(self, image_id: str) -> dict[str, Any]:
        """``GET /images/{id}``."""
        return dict(self._json("GET", f"/images/{image_id}"))

    def download_image(self, image_id: str, dest: str | os.PathLike[str]) -> Path:
        """``GET /images/{id}/file`` into ``dest``."""
        return self.download(f"/images/{image_id}/file", dest)

    # -- labels ---------------------------------------------------------------------------------
    def upload_label(
        self, image_id: str, path: str | os.PathLike[str], tag: str = "final"
    ) -> dict[str, Any]:
        """``POST /images/{id}/labels``: a label volume (255 = unannotated), a new version."""
        path = Path(path)
        with path.open("rb") as fh:
            files = {"file": (path.name, fh, "application/octet-stream")}
            return dict(
                self._json("POST", f"/images/{image_id}/labels", files=files, data={"tag": tag})
            )

    def list_labels(self, image_id: str) -> list[dict[str, Any]]:
        """``GET /images/{id}/labels``: every version, newest first."""
        return list(self._json("GET", f"/images/{image_id}/labels"))

    def download_label(self, label_id: str, dest: str | os.PathLike[str]) -> Path:
        """``GET /labels/{id}/file`` into ``dest``."""
        return self.download(f"/labels/{label_id}/file", dest)

    # -- jobs -----------------------------------------------------------------------------------
    def create_job(
        self, kind: str, dataset_id: str, params: Mapping[str, Any] | None = None
    ) -> dict[str, Any]:
        """``POST /jobs``: enqueue a ``pretrain``, ``finetune`` or ``predict`` job."""
        body = {"kind": kind, "dataset_id": dataset_id, "params": dict(params or {})}
        return dict(self._json("POST", "/jobs", json=body))

    def get_job(self, job_id: str) -> dict[str, Any]:
        """``GET /jobs/{id}``."""
        return dict(self._json("GET", f"/jobs/{job_id}"))

    def list_jobs(
        self, dataset_id: str | None = None, status: str | None = None
    ) -> list[dict[str, Any]]:
        """``GET /jobs`` filtered by dataset and/or status."""
        query = {k: v for k, v in {"dataset_id": dataset_id, "status": status}.items() if v}
        return list(self._json("GET", "/jobs", params=query))

    def cancel_job(self, job_id: str) -> dict[str, Any]:
        """``POST /jobs/{id}/cancel``."""
        return dict(self._json("POST", f"/jobs/{job_id}/cancel"))

    def job_logs(self, job_id: str) -> str:
        """``GET /jobs/{id}/logs`` as text."""
        return self._request("GET", f"/jobs/{job_id}/logs").text

    def wait_for_job(
        self,
        job_id: str,
        on_update: JobCallback | None = None,
        poll_interval: float = 0.5,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        """Poll a job until it is ``succeeded``; return its last ``JobPublic``.

        Args:
            job_id: the job to follow.
            on_update: called with every polled ``JobPublic`` (progress is under ``"progress"``).
            poll_interval: seconds between polls.
            timeout: give up (``TimeoutError``) after this many seconds; ``None`` waits forever.

        Raises:
            JobFailedError: the job ended ``failed`` or ``cancelled``.
        """
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            job = self.get_job(job_id)
            if on_update is not None:
                on_update(job)
            status = job_status(job)
            if status == "succeeded":
                return job
            if status in TERMINAL_STATES:
                raise JobFailedError(job)
            if deadline is not None and time.monotonic() > deadline:
                raise TimeoutError(f"job {job_id} still {status} after {timeout} s")
            time.sleep(poll_interval)

    # -- models and predictions -----------------------------------------------------------------
    def list_models(
        self, kind: str | None = None, dataset_id: str | None = None, modality: str | None = None
    ) -> list[dict[str, Any]]:
        """``GET /models`` filtered by kind (``encoder``/``segmenter``), dataset, modality."""
        query = {
            k: v
            for k, v in {"kind": kind, "dataset_id": dataset_id, "modality": modality}.items()
            if v
        }
        return list(self._json("GET", "/models", params=query))

    def get_model(self, model_id: str) -> dict[str, Any]:
        """``GET /models/{id}``."""
        return dict(self._json("GET", f"/models/{model_id}"))

    def predict(
        self,
        model_id: str,
        image_id: str,
        probabilities: bool = False,
        timeout: float | None = 3600.0,
    ) -> dict[str, Any]:
        """``POST /models/{id}/predict`` and wait: the prediction job, with the output URLs in
        ``result.predictions[image_id]`` (``TimeoutError`` after ``timeout`` seconds, e.g. when
        no prediction worker runs)."""
        body = {"image_id": image_id, "probabilities": probabilities}
        job = self._json("POST", f"/models/{model_id}/predict", json=body)
        return self.wait_for_job(job["id"], timeout=timeout)

    def assist(self, dataset_id: str, body: Mapping[str, Any] | None = None) -> dict[str, Any]:
        """``POST /datasets/{id}/assist``: start the assist workflow; returns the job.

        ``body`` (all optional): ``image_ids``, ``label_ids``, ``encoder_id``, ``objective``,
        ``method``, ``head``, ``axis``, ``probabilities``, ``config``. Follow the job with
        :meth:`wait_for_job`; its ``result`` names the segmenter and the outputs' URLs.
        """
        return dict(self._json("POST", f"/datasets/{dataset_id}/assist", json=dict(body or {})))

    def download_prediction(
        self, model_id: str, image_id: str, artifact: str, dest: str | os.PathLike[str]
    ) -> Path:
        """Download one prediction artifact into ``dest``.

        ``artifact`` is one of ``labels.nii.gz``, ``clusters.nii.gz``, ``clusters.png``,
        ``probabilities.nii.gz``, ``uncertainty.nii.gz``.
        """
        return self.download(f"/predictions/{model_id}/{image_id}/{artifact}", dest)

    def download(self, path: str, dest: str | os.PathLike[str]) -> Path:
        """Stream ``GET path`` into ``dest`` atomically (temporary file, fsync, rename), with the
        permissions ``open(dest, "wb")`` would give it (:func:`_new_file_mode`)."""
        dest = Path(dest)
        dest.parent.mkdir(parents=True, exist_ok=True)
        url = self.url(path)
        with self._http.stream("GET", url) as response:
            if response.is_error:
                response.read()
                raise SegAssistAPIError(response.status_code, _detail(response), "GET", url)
            fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
            try:
                with os.fdopen(fd, "wb") as out:
                    for chunk in response.iter_bytes():
                        out.write(chunk)
                    out.flush()
                    os.fsync(out.fileno())
                os.chmod(tmp, _new_file_mode())
                os.replace(tmp, dest)
            except BaseException:
                Path(tmp).unlink(missing_ok=True)
                raise
        logger.debug("downloaded %s to %s", url, dest)
        return dest


def _new_file_mode() -> int:
    """The mode a newly created file gets (``0o666`` less the process's umask); ``mkstemp``'s
    ``0o600`` would hide a downloaded segmentation from the annotator's group."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask
