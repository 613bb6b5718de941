"""Schemathesis generators and filters for what JSON Schema cannot say.

An upload part is declared ``format: binary`` with the media types of a volume
(``segassist.server.uploads.UPLOAD_MEDIA_TYPES``); random bytes are rightly refused (422, "not a NIfTI").
Registered here, ``application/gzip`` parts are real gzipped NIfTI volumes on the test grid:
``uint8``, every slice along the last axis unannotated (255) or annotated (background 0 and a
square of class 1; at least one is), so the same bytes are a valid image and a valid sparse
label of any image the run uploaded (to a dataset whose schema has class 1 or is still open).
Used by ``test_schema_conformance.py`` and by a CLI run
(``SCHEMATHESIS_HOOKS=tests.server.schemathesis_hooks st run …``).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import schemathesis
from hypothesis import strategies as st

from tests.server.conftest import SHAPE, nifti_bytes

__all__ = ["volume_bytes"]


def _volume(annotated: list[bool]) -> bytes:
    data = np.full(SHAPE, 255, dtype=np.uint8)
    data[..., np.asarray(annotated)] = 0
    data[2:6, 2:6, np.asarray(annotated)] = 1
    return nifti_bytes(data)


volume_bytes = (
    st.lists(st.booleans(), min_size=SHAPE[2], max_size=SHAPE[2]).filter(any).map(_volume)
)
"""Gzipped NIfTI volumes of shape ``SHAPE`` (see the module docstring)."""

schemathesis.openapi.media_type("application/gzip", volume_bytes)


@schemathesis.hook
def before_load_schema(context: schemathesis.HookContext, raw_schema: dict[str, Any]) -> None:
    """No dataset backed by a DICOMweb server (``dicomweb`` only ``null``): creating one
    connects to its URL, a random host here; ``test_dicomweb.py`` covers those against a real
    DICOMweb server."""
    dataset = raw_schema["components"]["schemas"]["DatasetCreate"]
    dataset["properties"]["dicomweb"] = {"type": "null"}
