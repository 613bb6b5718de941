"""``manifest.json``: the typed record of a model artifact folder.

A segmenter folder holds ``model.onnx`` and ``manifest.json``; an encoder folder ``encoder.pt``
and ``manifest.json``. The manifest is the configuration of record for inference: label names,
the slicing axis, the intensity normalisation, the ONNX file's checksum and I/O names, and the
lineage (dataset, encoder, labels) the registry shows.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from segassist.models.runtime._atomic import atomic_path
from segassist.models.runtime.configs import IGNORE_INDEX
from segassist.models.runtime.preprocess import Normalisation

__all__ = ["FORMAT_VERSION", "MANIFEST_NAME", "Manifest"]

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_KINDS = ("segmenter", "encoder")
# Labels are stored as uint8 and IGNORE_INDEX (255) is the "unannotated" value of sparse labels.
_MAX_CLASSES = IGNORE_INDEX
_MAX_CLUSTERS = 256


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Manifest:
    """What a model artifact is and how to run it.

    Attributes:
        kind: ``"segmenter"`` (ONNX, labels + clusters) or ``"encoder"`` (``encoder.pt``).
        labels: class index → name, background ``0`` included; keys are ``0…num_classes-1``
            (empty for an encoder).
        num_classes: L, the number of output classes of the segmenter (0 for an encoder).
        num_clusters: K, the number of cluster channels.
        axis: the volume axis (0, 1 or 2) along which 2D slices are taken.
        normalisation: intensity normalisation applied to the whole raw volume.
        objective: self-supervised objective of the encoder (``None``: random initialisation).
        method: few-shot method (``"linear"``, ``"finetune"``, ``"mean_teacher"``) or ``None``.
        lineage: provenance ids: ``dataset_id``, ``encoder_id``, ``label_ids``, ``image_ids``…
        metrics: evaluation numbers (e.g. Dice per class), JSON-able.
        onnx_file: file name of the ONNX graph in the folder (segmenter only).
        onnx_sha256: hex SHA-256 of ``onnx_file``.
        opset: ONNX opset of the graph.
        size_divisor: H and W given to the network must be multiples of this.
        input_name: ONNX input name (B×1×H×W float32 in [0, 1]).
        output_names: ONNX output names, ``("logits", "cluster_scores")``.
        parity_max_abs_diff: max |ONNX Runtime − PyTorch| of the logits measured at export.
        created_at: ISO 8601 UTC timestamp.
        format_version: version of this file's layout.
    """

    kind: Literal["segmenter", "encoder"]
    labels: dict[int, str]
    num_classes: int
    num_clusters: int
    axis: int
    normalisation: Normalisation
    size_divisor: int
    objective: str | None = None
    method: str | None = None
    lineage: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    onnx_file: str | None = None
    onnx_sha256: str | None = None
    opset: int | None = None
    input_name: str = "image"
    output_names: tuple[str, ...] = ("logits", "cluster_scores")
    parity_max_abs_diff: float | None = None
    created_at: str = field(default_factory=_now)
    format_version: int = FORMAT_VERSION

    def __post_init__(self) -> None:
        if self.format_version != FORMAT_VERSION:
            raise ValueError(
                f"unsupported manifest format_version {self.format_version!r} "
                f"(this segassist reads version {FORMAT_VERSION})"
            )
        if self.kind not in _KINDS:
            raise ValueError(f"manifest kind must be one of {_KINDS}, got {self.kind!r}")
        if self.axis not in (0, 1, 2):
            raise ValueError(f"manifest axis must be 0, 1 or 2, got {self.axis!r}")
        if not 0 <= self.num_classes <= _MAX_CLASSES:
            raise ValueError(f"num_classes must be in [0, {_MAX_CLASSES}], got {self.num_classes}")
        if not 0 <= self.num_clusters <= _MAX_CLUSTERS:
            raise ValueError(
                f"num_clusters must be in [0, {_MAX_CLUSTERS}], got {self.num_clusters}"
            )
        if sorted(self.labels) != list(range(self.num_classes)):
            raise ValueError(
                f"label indices {sorted(self.labels)} must be exactly 0..{self.num_classes - 1} "
                f"(num_classes={self.num_classes}, background 0 included)"
            )
        if self.size_divisor < 1:
            raise ValueError(f"size_divisor must be a positive integer, got {self.size_divisor}")
        if self.kind == "segmenter":
            missing = [
                name
                for name in ("onnx_file", "onnx_sha256", "opset")
                if getattr(self, name) is None
            ]
            if missing:
                raise ValueError(f"segmenter manifest lacks {', '.join(missing)}")
            if self.num_classes < 1:
                raise ValueError("segmenter manifest needs at least one class")
            if len(self.output_names) != 2:
                raise ValueError(
                    f"segmenter output_names must name (logits, cluster_scores), "
                    f"got {list(self.output_names)}"
                )

    def to_dict(self) -> dict[str, Any]:
        """A JSON-able dict (label keys as strings, normalisation as a dict)."""
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        data["labels"] = {str(k): v for k, v in sorted(self.labels.items())}
        data["normalisation"] = self.normalisation.to_dict()
        data["output_names"] = list(self.output_names)
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Manifest:
        """Build and validate a manifest from its JSON form.

        Raises:
            ValueError: unknown format version, missing or unknown fields, or invalid values.
        """
        if not isinstance(data, dict):
            raise ValueError(f"manifest must be a JSON object, got {type(data).__name__}")
        if "format_version" not in data:
            raise ValueError("manifest lacks format_version")
        if data["format_version"] != FORMAT_VERSION:
            raise ValueError(
                f"unsupported manifest format_version {data['format_version']!r} "
                f"(this segassist reads version {FORMAT_VERSION})"
            )
        fields = {f.name: f for f in dataclasses.fields(cls)}
        required = [
            name
            for name, f in fields.items()
            if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        ]
        missing = [name for name in required if name not in data]
        if missing:
            raise ValueError(f"manifest lacks required field(s): {', '.join(missing)}")
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ValueError(f"manifest has unknown field(s): {', '.join(unknown)}")
        values = dict(data)
        try:
            values["labels"] = {int(k): str(v) for k, v in data["labels"].items()}
            values["normalisation"] = Normalisation.from_dict(data["normalisation"])
            values["output_names"] = tuple(data.get("output_names", cls.output_names))
            for name in ("num_classes", "num_clusters", "axis", "size_divisor"):
                values[name] = _as_int(name, data[name])
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise ValueError(f"invalid manifest: {error}") from error
        return cls(**values)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write ``manifest.json`` atomically; ``path`` is the file or its folder."""
        dest = Path(path)
        if dest.is_dir():
            dest = dest / MANIFEST_NAME
        text = json.dumps(self.to_dict(), indent=2, sort_keys=False) + "\n"
        with atomic_path(dest) as tmp:
            tmp.write_text(text, encoding="utf-8")
        return dest

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Manifest:
        """Read and validate ``manifest.json``; ``path`` is the file or its folder."""
        src = Path(path)
        if src.is_dir():
            src = src / MANIFEST_NAME
        try:
            data = json.loads(src.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ValueError(f"{src} is not valid JSON: {error}") from error
        try:
            return cls.from_dict(data)
        except ValueError as error:
            raise ValueError(f"{src}: {error}") from error


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an integer, got {value!r}")
    return value
