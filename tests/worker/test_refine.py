"""The background refinement behind an assist (:mod:`segassist.worker.refine`), through the API
and a real worker."""

from __future__ import annotations

import gzip
import io
from collections.abc import Callable

import nibabel as nib
import numpy as np
import pytest

from tests.worker.conftest import (
    LABEL_SCHEMA,
    SHAPE,
    TINY_FEWSHOT,
    Service,
    Worker,
    nifti_bytes,
    sparse_label,
)

LABELLED = (1, 3, 4)
FEWSHOT = {**TINY_FEWSHOT, "steps": 30, "eval_every": 10, "patience": 2}
"""Tiny fits: the scratch network trains at most 30 steps in the tests."""

QUICK_ENCODER = ("embedded", {"assist_pretrain_steps": 2, "background_pretrain_steps": 0})


def _load(content: bytes) -> np.ndarray:
    return np.asarray(nib.Nifti1Image.from_bytes(gzip.decompress(content)).dataobj)


def _three_slices() -> np.ndarray:
    label = sparse_label()
    label[..., 3] = 0
    label[6:16, 5:14, 3] = 1
    return label


def _label_three_slices(service: Service, image_id: str) -> np.ndarray:
    label = _three_slices()
    files = {"file": ("label.nii.gz", io.BytesIO(nifti_bytes(label)), "x")}
    service.post(f"/images/{image_id}/labels", files=files)
    return label


def _assist(service: Service, dataset_id: str, config: dict) -> str:
    return str(service.post(f"/datasets/{dataset_id}/assist", json={"config": config})["id"])


@pytest.mark.parametrize("settings", [QUICK_ENCODER], indirect=True)
def test_refinement_validates_then_keeps_or_replaces(
    service: Service, start_worker: Callable[[], Worker]
) -> None:
    start_worker()
    dataset_id, image_id = service.dataset_with_labels()
    two = service.finished(_assist(service, dataset_id, FEWSHOT))
    assert two["status"] == "succeeded", two
    assert "refine_job_id" not in two["result"]  # 2 labelled slices: nothing to hold out
    label = _label_three_slices(service, image_id)
    off = service.finished(_assist(service, dataset_id, {**FEWSHOT, "refine": False}))
    assert "refine_job_id" not in off["result"]

    fast = service.finished(_assist(service, dataset_id, FEWSHOT))
    assert fast["status"] == "succeeded", fast
    assert fast["result"]["propagation"][image_id]["applied"]
    refine = service.finished(fast["result"]["refine_job_id"])
    assert refine["status"] == "succeeded", refine
    assert refine["kind"] == "refine" and refine["params"]["refine_of"] == fast["id"]
    result = refine["result"]
    validation = result["validation"]
    assert validation.pop("held_out_slices") == {image_id: 3}  # the middle of 1, 3, 4
    assert set(validation) == {"propagation", "blend"}
    assert all(0.0 <= v <= 1.0 for v in validation.values())
    assert {"features", "validate"} <= set(result["timings"])
    best = max(validation.values())
    if validation["propagation"] < best:  # ties go to propagation
        assert result["outcome"] == "refined"
        assert validation[result["method"]] == best and result["encoder_id"] is None
        model = service.get(f"/models/{result['segmenter_id']}")
        assert model["method"] == "scratch" and model["parent_id"] is None  # the network alone
        assert result["propagation"][image_id]["applied"]  # blended with the propagation
        labels = _load(service.client.get(result["predictions"][image_id]["labels"]).content)
        np.testing.assert_array_equal(labels[..., list(LABELLED)], label[..., list(LABELLED)])
        assert result["slice_prior"][image_id]["applied"]
        assert result["next_slice"][image_id] not in LABELLED
    else:
        assert result["outcome"] == "kept"
        assert "predictions" not in result and "segmenter_id" not in result
    # the refinement is not an assist: the dataset's latest assist is still the fast one
    assert service.get(f"/datasets/{dataset_id}/assist")["id"] == fast["id"]


def _jumping_box() -> tuple[np.ndarray, np.ndarray]:
    """(image, labels on :data:`LABELLED`): a bright box that sits on the left of every slice but
    slice 3, where it jumps to the right, 10 voxels away: no slice-to-slice propagation (its
    window reaches 4) can follow it, a network that learns "bright is the box" can."""
    rng = np.random.default_rng(3)
    image = rng.normal(-100.0, 30.0, SHAPE).astype(np.float32)
    truth = np.zeros(SHAPE, dtype=np.uint8)
    for z in range(SHAPE[2]):
        columns = slice(12, 18) if z == 3 else slice(2, 8)
        truth[6:16, columns, z] = 1
    image[truth == 1] += 400.0
    label = np.full(SHAPE, 255, dtype=np.uint8)
    label[..., list(LABELLED)] = truth[..., list(LABELLED)]
    return image, label


@pytest.mark.parametrize("settings", [QUICK_ENCODER], indirect=True)
def test_refinement_replaces_what_propagation_cannot_follow(
    service: Service, start_worker: Callable[[], Worker]
) -> None:
    start_worker()
    dataset = service.post(
        "/datasets", json={"name": "jump", "modality": "CT", "labels": LABEL_SCHEMA}
    )
    image, label = _jumping_box()
    files = {"file": ("ct.nii.gz", io.BytesIO(nifti_bytes(image)), "x")}
    image_id = service.post(f"/datasets/{dataset['id']}/images", files=files)["id"]
    files = {"file": ("label.nii.gz", io.BytesIO(nifti_bytes(label)), "x")}
    service.post(f"/images/{image_id}/labels", files=files)
    files = {"file": ("unlabelled.nii.gz", io.BytesIO(nifti_bytes(image[::-1].copy())), "x")}
    other_id = service.post(f"/datasets/{dataset['id']}/images", files=files)["id"]
    config = {**FEWSHOT, "steps": 200, "patience": 20}
    fast = service.finished(_assist(service, str(dataset["id"]), config))
    assert fast["status"] == "succeeded", fast
    refine = service.finished(fast["result"]["refine_job_id"])
    assert refine["status"] == "succeeded", refine
    result = refine["result"]
    validation = result["validation"]
    assert validation["blend"] > validation["propagation"], result
    assert result["outcome"] == "refined" and result["method"] == "blend"
    # the blend pools the network with the propagation of the labelled slices
    assert result["propagation"][image_id] == fast["result"]["propagation"][image_id]
    assert result["propagation"][image_id]["applied"]
    assert set(result["timings"]) == {"features", "validate", "fit", "export", "predict"}
    labels = _load(service.client.get(result["predictions"][image_id]["labels"]).content)
    np.testing.assert_array_equal(labels[..., list(LABELLED)], label[..., list(LABELLED)])
    # the unlabelled image keeps the assist's segmentation, now also under the new segmenter,
    # the one a viewer asking for the dataset's newest segmenter gets
    assert result["segmenter_id"] in result["predictions"][other_id]["labels"]
    assert fast["result"]["segmenter_id"] in fast["result"]["predictions"][other_id]["labels"]
    for name in ("labels", "clusters"):
        served = service.client.get(result["predictions"][other_id][name])
        assert served.status_code == 200, served.text
        before = service.client.get(fast["result"]["predictions"][other_id][name]).content
        assert served.content == before
    assert result["next_slice"][other_id] == fast["result"]["next_slice"][other_id]
    model = service.get(f"/models/{result['segmenter_id']}")
    assert model["lineage"]["refines"] == fast["result"]["segmenter_id"]

    # an image uploaded after the refinement: MONAI Label's infer runs the assist's segmenter
    # on it (the network was validated only blended with the refined image's propagation)
    files = {"file": ("later.nii.gz", io.BytesIO(nifti_bytes(image[:, ::-1].copy())), "x")}
    later_id = service.post(f"/datasets/{dataset['id']}/images", files=files)["id"]
    answer = service.client.post(
        f"/monailabel/{dataset['id']}/infer/segmentation", params={"image": later_id}
    )
    assert answer.status_code == 200, answer.text
    jobs = service.get(f"/jobs?dataset_id={dataset['id']}")
    (predict,) = [job for job in jobs if job["kind"] == "predict"]
    assert predict["params"]["model_id"] == fast["result"]["segmenter_id"]
    assert predict["params"]["image_ids"] == [later_id]
    # the refined image is still served by the refinement's segmenter (its file exists)
    answer = service.client.post(
        f"/monailabel/{dataset['id']}/infer/segmentation", params={"image": image_id}
    )
    assert answer.status_code == 200, answer.text
    assert [job["kind"] for job in service.get(f"/jobs?dataset_id={dataset['id']}")].count(
        "predict"
    ) == 1


@pytest.mark.parametrize("settings", [QUICK_ENCODER], indirect=True)
def test_refinement_of_an_older_assist_is_superseded(
    service: Service, start_worker: Callable[[], Worker]
) -> None:
    """Two assists submitted before a worker runs: the first one's refinement never trains.
    The second assist cancels it when it starts, or, had it started first, the refinement
    finds the second assist newer and ends as ``superseded``."""
    dataset_id, image_id = service.dataset_with_labels()
    _label_three_slices(service, image_id)
    first = _assist(service, dataset_id, FEWSHOT)
    second = _assist(service, dataset_id, {**FEWSHOT, "refine": False})
    start_worker()
    done = service.finished(first)
    assert done["status"] == "succeeded", done
    assert service.finished(second)["status"] == "succeeded"
    refine = service.finished(done["result"]["refine_job_id"])
    if refine["status"] == "cancelled":
        assert refine["result"] is None
    else:
        assert refine["status"] == "succeeded", refine
        assert refine["result"]["outcome"] == "superseded"
        assert refine["result"]["superseded_by"] == second
        assert "validation" not in refine["result"]


class _CancelledJob:
    """The two calls a refinement's loss tracker makes on its job context; the job was
    cancelled before the fit's first step."""

    def __init__(self) -> None:
        self.reports = 0

    def progress(self, progress: object) -> None:
        self.reports += 1

    def check_cancelled(self) -> None:
        from segassist.worker.jobs import JobCancelled

        raise JobCancelled("cancellation requested")


def test_the_refinements_fit_reads_its_cancellation_at_its_first_step() -> None:
    """A correction submitted while the refinement starts up cancels it: the fit's first step
    reads the cancellation instead of waiting for the poll interval to pass."""
    from segassist.models.progress import Progress
    from segassist.worker.jobs import JobCancelled
    from segassist.worker.refine import _CancellableLosses

    job = _CancelledJob()
    losses = _CancellableLosses(job)  # type: ignore[arg-type]
    with pytest.raises(JobCancelled):
        losses(Progress(1, 300, 0.5, 0.0, "fit"))
    assert job.reports == 1 and losses.last == 0.5


def _refit(service: Service, assist: dict) -> str:
    """Queue a refit of the finished ``assist`` as the background pretraining does
    (:func:`segassist.worker.assist.refit_after_pretraining`), on the same encoder: what is under
    test is the comparison with the answer it replaces, not the encoder."""
    from segassist.server.db import Dataset, JobKind
    from segassist.server.routes.jobs import submit_job

    state = service.client.app.state  # type: ignore[attr-defined]
    with state.session_factory() as session:
        dataset = session.get(Dataset, assist["dataset_id"])
        params = {**assist["params"], "refit_of": assist["id"]}
        return str(submit_job(session, state.celery, JobKind.assist, dataset, params).id)


def _score_refinement(service: Service, job_id: str, score: float) -> None:
    """Set every candidate's held-out Dice of the refinement ``job_id`` to ``score``."""
    from segassist.server.db import Job

    with service.client.app.state.session_factory() as session:  # type: ignore[attr-defined]
        job = session.get(Job, job_id)
        validation = dict(job.result["validation"])
        validation |= {name: score for name in validation if name != "held_out_slices"}
        job.result = {**job.result, "validation": validation}
        session.commit()


@pytest.mark.parametrize("settings", [QUICK_ENCODER], indirect=True)
def test_a_refit_keeps_the_earlier_answer_unless_it_scores_better(
    service: Service, start_worker: Callable[[], Worker]
) -> None:
    """A refit's refinement scores the answer the refit replaced (its refinement's winner, on
    the same hidden slice) beside its own candidates: an earlier answer that scored 1.0 comes
    back as the newest segmenter; one that scored 0.0 gives way."""
    start_worker()
    dataset_id, image_id = service.dataset_with_labels()
    _label_three_slices(service, image_id)
    first = service.finished(_assist(service, dataset_id, FEWSHOT))
    assert first["status"] == "succeeded", first
    earlier = service.finished(first["result"]["refine_job_id"])
    assert earlier["status"] == "succeeded", earlier
    answer = earlier if earlier["result"]["outcome"] == "refined" else first
    shown = answer["result"]["predictions"][image_id]
    before = {name: service.client.get(shown[name]).content for name in ("labels", "clusters")}
    _score_refinement(service, earlier["id"], 1.0)

    refit = service.finished(_refit(service, first))
    assert refit["status"] == "succeeded", refit
    refinement = service.finished(refit["result"]["refine_job_id"])
    assert refinement["status"] == "succeeded", refinement
    result = refinement["result"]
    assert result["validation"]["previous"] == 1.0
    assert result["validation"]["held_out_slices"] == {image_id: 3}
    assert result["outcome"] == "restored", result
    assert result["restores"] == answer["result"]["segmenter_id"]
    assert result["method"] == answer["result"]["method"]
    assert result["encoder_id"] == answer["result"]["encoder_id"]
    for name, content in before.items():
        served = service.client.get(result["predictions"][image_id][name])
        assert served.status_code == 200, served.text
        assert served.content == content
    for key in ("next_slice", "uncertainty", "slice_prior", "components", "propagation"):
        assert result[key][image_id] == answer["result"][key][image_id]
    # the earlier segmenter is the dataset's newest again, for MONAI Label and DICOMweb
    newest = service.get(f"/models?kind=segmenter&dataset_id={dataset_id}")[0]
    assert newest["id"] == result["segmenter_id"] != answer["result"]["segmenter_id"]
    assert newest["lineage"]["restores"] == answer["result"]["segmenter_id"]
    assert newest["method"] == service.get(f"/models/{result['restores']}")["method"]

    _score_refinement(service, refinement["id"], 0.0)
    again = service.finished(_refit(service, refit))
    assert again["status"] == "succeeded", again
    second = service.finished(again["result"]["refine_job_id"])
    assert second["status"] == "succeeded", second
    assert second["result"]["validation"]["previous"] == 0.0
    assert second["result"]["outcome"] in ("kept", "refined"), second


@pytest.mark.parametrize("settings", [QUICK_ENCODER], indirect=True)
def test_a_refit_leaves_the_refinement_it_must_beat_to_finish(
    service: Service, start_worker: Callable[[], Worker]
) -> None:
    """A refit queued while the refitted assist's refinement has yet to finish neither cancels
    nor supersedes it (a new assist would), so the refit's refinement has a score to beat."""
    dataset_id, image_id = service.dataset_with_labels()
    _label_three_slices(service, image_id)
    start_worker()
    first = service.finished(_assist(service, dataset_id, FEWSHOT))
    assert first["status"] == "succeeded", first
    refit = _refit(service, first)  # the one worker has not finished the refinement yet
    earlier = service.finished(first["result"]["refine_job_id"])
    assert earlier["status"] == "succeeded", earlier
    assert earlier["result"]["outcome"] in ("refined", "kept"), earlier
    done = service.finished(refit)
    assert done["status"] == "succeeded", done
    refinement = service.finished(done["result"]["refine_job_id"])
    assert refinement["status"] == "succeeded", refinement
    scores = refinement["result"]["validation"]
    earlier_scores = earlier["result"]["validation"]
    assert scores["previous"] == max(earlier_scores[name] for name in ("propagation", "blend"))
