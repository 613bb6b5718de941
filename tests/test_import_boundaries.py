"""The package boundaries of docs/internals.md, checked in fresh interpreters.

A user deploys the API image without torch and runs the ML core without the service stack: an
import that crosses a boundary breaks one of them at start-up.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

_PROBE = """
import importlib, json, pkgutil, sys
package = importlib.import_module({package!r})
for info in pkgutil.walk_packages(getattr(package, "__path__", []), package.__name__ + "."):
    if ".migrations" in info.name:
        continue  # Alembic scripts, loaded by Alembic itself
    importlib.import_module(info.name)
def unit(name):  # "segassist.server.auth" -> "segassist.server"; "torch.nn" -> "torch"
    parts = name.split(".")
    return ".".join(parts[:2]) if parts[0] == "segassist" else parts[0]
print(json.dumps(sorted({{unit(name) for name in sys.modules}})))
"""


_SERVICE_STACK = {"fastapi", "celery", "sqlalchemy", "segassist.server", "segassist.worker"}


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
        ("segassist.models", _SERVICE_STACK),
        ("segassist.server", {"torch", "monai", "segassist.worker"}),
        # The CLI and REST client: only what a client-only install (the base dependencies) has.
        ("segassist.client", {"torch", "monai", "onnxruntime", "matplotlib", *_SERVICE_STACK}),
        # Inference and job configs in the API process: no torch.
        ("segassist.models.runtime", {"torch", "monai", *_SERVICE_STACK}),
        # The job configs alone (the client's import): not even ONNX Runtime or matplotlib.
        (
            "segassist.models.runtime.configs",
            {"torch", "monai", "onnxruntime", "matplotlib", *_SERVICE_STACK},
        ),
    ],
)
def test_package_imports_stay_inside_their_boundary(package: str, forbidden: set[str]) -> None:
    loaded = _top_level_modules_after_importing(package)
    assert ".".join(package.split(".")[:2]) in loaded
    assert not loaded & forbidden, f"importing {package} loads {sorted(loaded & forbidden)}"
    # one namespace: a module imported as `server.x` besides `segassist.server.x` would be a
    # second copy (its own tables, settings, loggers)
    assert not loaded & {"server", "worker", "client", "models", "bench"}


def test_wheel_installs_one_namespace(tmp_path: Path) -> None:
    """The built wheel holds ``segassist/`` only (the folders it links in, copied), with the
    page's static files, the migrations and the CLI entry point. Built from a copy of the
    sources, so setuptools' ``build/`` folder stays out of the checkout."""
    root = Path(__file__).parents[1]
    source = tmp_path / "source"
    skip = shutil.ignore_patterns("__pycache__", "results", "cache", "*.pyc")
    for name in ("server", "worker", "client", "models", "bench"):
        shutil.copytree(root / name, source / name, ignore=skip)
    shutil.copytree(root / "segassist", source / "segassist", symlinks=True, ignore=skip)
    for name in ("pyproject.toml", "README.md"):
        shutil.copy2(root / name, source / name)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "--no-deps",
            "--no-build-isolation",
            "-q",
            "-w",
            str(tmp_path),
            str(source),
        ],
        check=True,
        capture_output=True,
    )
    (wheel,) = tmp_path.glob("segassist-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        entry_points = archive.read(next(n for n in names if n.endswith("entry_points.txt")))
    assert {name.split("/")[0] for name in names} == {
        "segassist",
        wheel.name.rsplit("-", 3)[0] + ".dist-info",
    }
    assert {name.split("/")[1] for name in names if name.count("/") > 1} == {
        "server",
        "worker",
        "client",
        "models",
        "bench",
    }
    for shipped in (
        "segassist/server/web/index.html",
        "segassist/server/web/vendor/niivue/niivue.js",
        "segassist/server/web/vendor/niivue/LICENSE",
        "segassist/server/db/migrations/versions/0001_initial.py",
        "segassist/py.typed",
    ):
        assert shipped in names, shipped
    assert b"segassist = segassist.client.cli:main" in entry_points


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
