"""Benchmark data: registry fetching, the real sets' label mappings, MSD folders."""

from __future__ import annotations

import json
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from segassist.models.datasets import (
    SETS,
    cache_dir,
    fetch_registry_file,
    load_msd_folder,
    load_pool,
    load_set,
    slice_axis,
)


def _img(path: Path) -> nib.Nifti1Image:
    image = nib.load(path)
    assert isinstance(image, nib.Nifti1Image)
    return image


def _array(path: Path) -> np.ndarray:
    return np.asanyarray(_img(path).dataobj)


@pytest.mark.parametrize("name", ["tptbox-spine", "totalseg-ct", "mni-tissue"])
def test_real_sets_have_aligned_labels_with_every_class(name: str) -> None:
    cases = load_set(name)
    assert cases
    for case in cases:
        image, label = _img(case.image), _img(case.label)
        assert image.shape == label.shape
        np.testing.assert_allclose(image.affine, label.affine, atol=1e-4)
        values = np.unique(_array(case.label))
        assert set(values.tolist()) == {0, *case.classes}, f"{case.name}: {values}"
        assert slice_axis(image.affine) == case.axis
        assert cache_dir() in case.label.parents  # derived files live in the cache, not the repo


def test_spine_classes_are_shared_by_ct_and_mr() -> None:
    cases = {c.name: c for c in load_set("tptbox-spine")}
    assert set(cases) == {"tptbox-ct", "tptbox-mr"}
    assert cases["tptbox-ct"].classes == cases["tptbox-mr"].classes
    assert cases["tptbox-ct"].classes == {1: "vertebral_body", 2: "posterior_elements"}
    assert {c.modality for c in cases.values()} == {"CT", "MR"}


def test_mni_tissue_is_downsampled_without_moving_the_brain() -> None:
    (case,) = load_set("mni-tissue")
    image = _img(case.image)
    assert np.allclose(np.abs(np.diag(image.affine)[:3]), 2.0)
    labels = _array(case.label)
    # the brain's centre of mass (white matter) stays near the MNI origin in world coordinates
    centre = np.argwhere(labels == 2).mean(axis=0)
    world = image.affine @ np.append(centre, 1.0)
    assert np.all(np.abs(world[:3]) < 25.0), world


def test_fetch_is_reused_without_the_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    member = "TPTBox/tests/sample_ct/sub-ct_seg-vert_label-22_msk.nii.gz"
    first = fetch_registry_file("tptbox", "1.1.0", [member])
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    again = fetch_registry_file("tptbox", "1.1.0", [member])
    assert again == first
    assert (again / member).is_file()


def test_unreachable_registry_gives_a_clear_error(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setenv("SEGASSIST_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")
    with pytest.raises(RuntimeError, match=r"could not download tptbox==1\.1\.0"):
        fetch_registry_file("tptbox", "1.1.0", ["TPTBox/__init__.py"])
    assert not list((tmp_path / "registry").glob("**/*.py"))


def test_unknown_set_names_the_choices() -> None:
    with pytest.raises(ValueError, match="tptbox-spine"):
        load_set("acdc")
    assert "mni-tissue" in SETS


def test_ct_pool_holds_only_ct() -> None:
    pool = load_pool("CT")
    assert len(pool) >= 3
    assert all(p.is_file() for p in pool)
    assert not any("T2w" in p.name or "mr" in p.name for p in pool)


def _write(path: Path, array: np.ndarray, affine: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(array, affine), path)


def test_msd_folder_pairs_images_and_reads_names(tmp_path: Path) -> None:
    affine = np.diag([1.0, 1.0, 2.0, 1.0])
    label = np.zeros((8, 8, 4), np.uint8)
    label[2:5, 2:5, 1:3] = 1
    label[5:7, 5:7, 1:3] = 2
    _write(tmp_path / "imagesTr" / "heart_001.nii.gz", np.zeros((8, 8, 4, 2), np.float32), affine)
    _write(tmp_path / "labelsTr" / "heart_001.nii.gz", label, affine)
    _write(tmp_path / "imagesTr" / "heart_002_0000.nii.gz", np.zeros((8, 8, 4), np.float32), affine)
    _write(tmp_path / "labelsTr" / "heart_002.nii.gz", label, affine)
    (tmp_path / "labelsTr" / "._heart_001.nii.gz").write_bytes(b"resource fork")
    meta = {"modality": {"0": "MRI"}, "labels": {"0": "background", "1": "lv", "2": "rv"}}
    (tmp_path / "dataset.json").write_text(json.dumps(meta))

    cases = load_msd_folder(tmp_path)

    assert [c.name for c in cases] == ["heart_001", "heart_002"]
    assert cases[0].classes == {1: "lv", 2: "rv"}
    assert cases[0].modality == "MRI"
    assert _img(cases[0].image).shape == (8, 8, 4)  # first channel of a 4D MSD image
    assert cases[1].image.name == "heart_002_0000.nii.gz"
    assert all(c.axis == 2 for c in cases)


def test_msd_folder_without_labels_fails_clearly(tmp_path: Path) -> None:
    (tmp_path / "imagesTr").mkdir()
    with pytest.raises(FileNotFoundError, match="labelsTr"):
        load_msd_folder(tmp_path)
