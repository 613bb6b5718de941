"""The package boundaries of docs/internals.md, checked in fresh interpreters.

A user deploys the API image without torch and runs the ML core without the service stack: an
import that crosses a boundary breaks one of them at start-up.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

_PROBE = """
import importlib, json, pkgutil, sys
package = importlib.import_module({package!r})
for info in pkgutil.walk_packages(getattr(package, "__path__", []), package.__name__ + "."):
    if ".migrations" in info.name:
        continue  # Alembic scripts, loaded by Alembic itself
    importlib.import_module(info.name)
print(json.dumps(sorted({{name.split(".")[0] for name in sys.modules}})))
"""


_SERVICE_STACK = {"fastapi", "celery", "sqlalchemy", "server", "worker"}


def _top_level_modules_after_importing(package: str) -> set[str]:
    result = subprocess.run(
        [sys.executable, "-c", _PROBE.format(package=package)],
        capture_output=True,
        text=True,
        check=True,
    )
    return set(json.loads(result.stdout.strip().splitlines()[-1]))


@pytest.mark.parametrize(
    ("package", "forbidden"),
    [
        ("models", {"fastapi", "celery", "sqlalchemy", "server", "worker"}),
        ("server", {"torch", "monai", "worker"}),
        # The CLI and REST client: only what a client-only install (the base dependencies) has.
        ("client", {"torch", "monai", "onnxruntime", "matplotlib", *_SERVICE_STACK}),
        # Inference and job configs in the API process: no torch.
        ("models.runtime", {"torch", "monai", *_SERVICE_STACK}),
        # The job configs alone (the client's import): not even ONNX Runtime or matplotlib.
        (
            "models.runtime.configs",
            {"torch", "monai", "onnxruntime", "matplotlib", *_SERVICE_STACK},
        ),
    ],
)
def test_package_imports_stay_inside_their_boundary(package: str, forbidden: set[str]) -> None:
    loaded = _top_level_modules_after_importing(package)
    assert package.split(".")[0] in loaded
    assert not loaded & forbidden, f"importing {package} loads {sorted(loaded & forbidden)}"


_CLIENT_ONLY = {"numpy", "nibabel", "pydantic", "httpx", "rich"}


def test_base_install_is_client_only() -> None:
    """``pip install segassist`` brings the client's dependencies and nothing of the service."""
    with open(Path(__file__).parents[1] / "pyproject.toml", "rb") as f:
        project = tomllib.load(f)["project"]
    names = {
        re.split(r"[<>=\[ ]", requirement, maxsplit=1)[0] for requirement in project["dependencies"]
    }
    assert names == _CLIENT_ONLY
    extras = project["optional-dependencies"]
    assert any(r.startswith("sqlalchemy") for r in extras["server"])
    assert "segassist[server]" in extras["worker"]
