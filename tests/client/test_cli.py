"""The ``segassist`` command line against a real embedded service, as a user runs it."""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest

from segassist.client.api import SegAssistClient
from segassist.client.demo import dice_on_unlabelled, make_sparse_labels, pick_slices
from tests.client.conftest import (
    OBLIQUE_AFFINE,
    TINY_FIT,
    TINY_PRETRAIN,
    Service,
    Volume,
    load_nifti,
    make_volume,
    save_nifti,
)


def segassist(*args: str, timeout: float = 900) -> subprocess.CompletedProcess[str]:
    """Run ``segassist ARGS`` in a subprocess (``timeout`` only guards against a hang)."""
    return subprocess.run(
        [sys.executable, "-m", "segassist.client.cli", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


@dataclass(frozen=True)
class Segmented:
    run: subprocess.CompletedProcess[str]
    output: Path
    clusters: Path


@pytest.fixture(scope="module")
def segmented(
    service: Service, volume: Volume, tmp_path_factory: pytest.TempPathFactory
) -> Segmented:
    out = tmp_path_factory.mktemp("cli")
    run = segassist(
        "segment",
        str(volume.image),
        "--labels",
        str(volume.sparse),
        "-o",
        str(out / "seg.nii.gz"),
        "--clusters",
        str(out / "clusters.nii.gz"),
        "--server",
        service.url,
        "--objective",
        "pix2rep",
        "--fit-config",
        json.dumps(TINY_FIT),
        "--label-names",
        "bright,dark",
        "--no-refinement-wait",
    )
    return Segmented(run, out / "seg.nii.gz", out / "clusters.nii.gz")


def test_segment_writes_a_segmentation_on_the_inputs_grid(
    segmented: Segmented, volume: Volume
) -> None:
    assert segmented.run.returncode == 0, segmented.run.stderr
    assert str(segmented.output) in segmented.run.stdout.replace("\n", "")
    assert "method: probe-linear" in segmented.run.stdout  # the server's default head
    assert "from your labelled slices: propagated" in segmented.run.stdout
    assert "refinement:" not in segmented.run.stdout  # not waited for
    result = load_nifti(segmented.output)
    np.testing.assert_allclose(result.affine, OBLIQUE_AFFINE, atol=1e-6)
    labels = np.asanyarray(result.dataobj)
    assert labels.shape == volume.reference.shape
    assert set(np.unique(labels)) <= {0, 1, 2}
    # the bright structure annotated on 3 slices is found on the slices nobody labelled
    (bright,) = dice_on_unlabelled(
        labels, volume.reference, volume.axis, list(volume.labelled), {1: "bright"}
    )
    assert bright.dice > 0.5, bright


def test_segment_writes_the_cluster_map_and_its_picture(segmented: Segmented) -> None:
    assert segmented.run.returncode == 0, segmented.run.stderr
    clusters = load_nifti(segmented.clusters)
    np.testing.assert_allclose(clusters.affine, OBLIQUE_AFFINE, atol=1e-6)
    assert len(np.unique(np.asanyarray(clusters.dataobj))) > 1
    png = segmented.clusters.with_name("clusters.png")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_jobs_and_models_list_what_segment_created(segmented: Segmented, service: Service) -> None:
    assert segmented.run.returncode == 0, segmented.run.stderr
    table = segassist("jobs", "--server", service.url)
    assert table.returncode == 0, table.stderr
    assert "assist" in table.stdout
    listed = segassist("jobs", "--json", "--server", service.url)
    jobs = {j["kind"]: j for j in json.loads(listed.stdout) if j["status"] == "succeeded"}
    assert "assist" in jobs
    assert jobs["assist"]["result"]["axis"] == 2  # found by the server in the sparse labels
    models = segassist("models", "--kind", "segmenter", "--json", "--server", service.url)
    assert models.returncode == 0, models.stderr
    segmenters = {m["id"]: m for m in json.loads(models.stdout)}
    segmenter = segmented.run.stdout.split("segmenter ")[-1].split()[0]
    assert segmenter in segmenters
    assert segmenters[segmenter]["method"] == "probe-linear"


def test_cli_and_rest_give_the_same_segmentation(segmented: Segmented, service: Service) -> None:
    """The CLI holds no workflow: the same assist request over REST gives the same labels."""
    assert segmented.run.returncode == 0, segmented.run.stderr
    with SegAssistClient(service.url) as api:
        cli_job = next(
            j for j in api.list_jobs() if j["kind"] == "assist" and j["status"] == "succeeded"
        )
        body = {k: cli_job["params"][k] for k in ("image_ids", "label_ids", "method", "config")}
        body["encoder_id"] = cli_job["result"]["encoder_id"]
        done = api.wait_for_job(api.assist(cli_job["dataset_id"], body)["id"], timeout=600)
        (image_id,) = body["image_ids"]
        rest = api.download(
            done["result"]["predictions"][image_id]["labels"],
            segmented.output.with_name("rest.nii.gz"),
        )
    np.testing.assert_array_equal(
        np.asanyarray(load_nifti(rest).dataobj), np.asanyarray(load_nifti(segmented.output).dataobj)
    )


def test_random_initialisation_baseline_needs_no_pretraining(
    service: Service, volume: Volume, tmp_path: Path
) -> None:
    run = segassist(
        "segment",
        str(volume.image),
        "--labels",
        str(volume.sparse),
        "-o",
        str(tmp_path / "seg.nii.gz"),
        "--objective",
        "none",
        "--method",
        "finetune",
        "--fit-config",
        json.dumps(TINY_FIT),
        "--server",
        service.url,
    )
    assert run.returncode == 0, run.stderr
    assert "random initialisation" in run.stdout
    assert load_nifti(tmp_path / "seg.nii.gz").shape == volume.reference.shape


def test_label_of_the_wrong_shape_is_refused_with_the_servers_reason(
    service: Service, volume: Volume, tmp_path: Path
) -> None:
    image, _ = make_volume((32, 32, 12))
    wrong = save_nifti(np.zeros((16, 16, 12), dtype=np.uint8) + 1, tmp_path / "wrong.nii.gz")
    run = segassist(
        "segment",
        str(save_nifti(image, tmp_path / "ct.nii.gz")),
        "--labels",
        str(wrong),
        "-o",
        str(tmp_path / "seg.nii.gz"),
        "--server",
        service.url,
    )
    assert run.returncode == 1
    assert "shape" in run.stderr.lower()
    assert "Traceback" not in run.stderr
    assert not (tmp_path / "seg.nii.gz").exists()


def test_missing_input_file_and_unreachable_server_are_plain_errors(
    volume: Volume, tmp_path: Path
) -> None:
    missing = segassist(
        "segment", str(tmp_path / "nope.nii.gz"), "--labels", str(volume.sparse), "-o", "x.nii.gz"
    )
    assert missing.returncode == 2
    assert "nope.nii.gz" in missing.stderr and "Traceback" not in missing.stderr

    unreachable = segassist("jobs", "--server", "http://127.0.0.1:9")
    assert unreachable.returncode == 2
    assert "cannot reach" in unreachable.stderr and "Traceback" not in unreachable.stderr


def test_job_logs_and_cancel_from_the_command_line(
    segmented: Segmented, service: Service, volume: Volume
) -> None:
    from segassist.client.api import SegAssistClient

    with SegAssistClient(service.url) as api:
        ds = api.create_dataset("cancel me", "CT", {1: "bright"})
        api.upload_image(ds["id"], volume.image)
        job = api.create_job(
            "pretrain",
            ds["id"],
            {"objective": "pix2rep", "steps": 100_000, "config": TINY_PRETRAIN},
        )
    cancel = segassist("jobs", "--cancel", job["id"], "--server", service.url)
    assert cancel.returncode == 0, cancel.stderr
    assert job["id"] in cancel.stdout
    with SegAssistClient(service.url) as api:
        from segassist.client.api import JobFailedError

        with pytest.raises(JobFailedError):
            api.wait_for_job(job["id"], poll_interval=0.2, timeout=300)
    logs = segassist("jobs", "--logs", job["id"], "--server", service.url)
    assert logs.returncode == 0, logs.stderr


def test_demo_slices_are_spread_over_the_structure_and_scored_elsewhere() -> None:
    label = np.zeros((8, 8, 40), dtype=np.uint8)
    label[2:6, 2:6, 10:31] = 1  # structure on slices 10..30
    picks = pick_slices(label, axis=2, k=3)
    assert len(set(picks)) == 3 and all(10 < p < 30 for p in picks)
    assert picks[1] - picks[0] >= 5 and picks[2] - picks[1] >= 5
    sparse = make_sparse_labels(label, 2, picks)
    annotated = [z for z in range(40) if (sparse[:, :, z] != 255).any()]
    assert annotated == picks
    # a prediction wrong only on the labelled slices scores perfectly: they are not counted
    prediction = label.copy()
    prediction[:, :, picks] = 0
    (score,) = dice_on_unlabelled(prediction, label, 2, picks, {1: "box"})
    assert score.dice == pytest.approx(1.0)


def test_segment_waits_for_the_refinement_and_writes_the_winner(
    service: Service, volume: Volume, tmp_path: Path
) -> None:
    """3 labelled slices: the CLI waits for the background refinement and writes its
    segmentation if it scored better on the held-out slice, the assist's otherwise."""
    out = tmp_path / "seg.nii.gz"
    run = segassist(
        "segment",
        str(volume.image),
        "--labels",
        str(volume.sparse),
        "-o",
        str(out),
        "--server",
        service.url,
        "--fit-config",
        json.dumps({**TINY_FIT, "steps": 40}),
    )
    assert run.returncode == 0, run.stderr
    said = " ".join(run.stdout.split())  # the console wraps long lines
    assert "refinement: " in said and "held-out slice Dice" in said
    assert "random initialisation" not in said  # the encoder propagated through, refined or not
    assert "propagated (" in said
    if "replaced the segmentation" in said:
        assert "method: scratch" in said or "method: blend" in said
    else:
        assert "the propagated segmentation stands" in said
        assert "method: probe-linear" in said
    labels = np.asanyarray(load_nifti(out).dataobj)
    (bright,) = dice_on_unlabelled(
        labels, volume.reference, volume.axis, list(volume.labelled), {1: "class 1"}
    )
    assert bright.dice > 0.5, bright
