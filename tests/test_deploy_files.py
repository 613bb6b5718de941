"""Deployment files checked statically (there is no Docker engine on the test machines).

Dockerfile: hadolint-clean, non-root, the API image without torch. Compose: valid against the
compose-spec schema, refers only to what it defines, refuses to start without a database password,
scales the worker. Makefile and .ci/run: ``make test`` runs lint, type checks and pytest.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from ruamel.yaml import YAML

ROOT = Path(__file__).resolve().parents[1]
COMPOSE = ROOT / "docker-compose.yml"
DOCKERFILE = ROOT / "Dockerfile"


def _tool(name: str) -> str:
    """A console script of the dev install (next to this interpreter), else from PATH."""
    local = Path(sys.executable).parent / name
    found = str(local) if local.exists() else shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is not installed: `pip install -e '.[dev]'` provides it")
    return found


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    return dict(YAML(typ="safe").load(COMPOSE.read_text()))


def _stages(text: str) -> dict[str, list[str]]:
    """Dockerfile instructions (continuations joined) per ``FROM … AS name`` stage."""
    joined = re.sub(r"\\\n", " ", text)
    stages: dict[str, list[str]] = {}
    current: list[str] = []
    for line in joined.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        match = re.match(r"FROM\s+(\S+)\s+AS\s+(\S+)", line, re.IGNORECASE)
        if match:
            current = stages.setdefault(match.group(2), [f"FROM {match.group(1)}"])
            continue
        current.append(line)
    return stages


# -- Dockerfile ------------------------------------------------------------------------------------
def test_dockerfile_passes_hadolint() -> None:
    done = subprocess.run(
        [_tool("hadolint"), str(DOCKERFILE)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_images_run_as_non_root_from_the_pinned_base() -> None:
    stages = _stages(DOCKERFILE.read_text())
    assert stages["base"][0] == "FROM python:3.11-slim"
    for target in ("api", "worker"):
        users = [line.split()[1] for line in stages[target] if line.startswith("USER ")]
        assert users, f"{target} image runs as root"
        assert users[-1].split(":")[0] not in ("root", "0")


def test_api_image_has_no_torch_and_a_healthcheck() -> None:
    stages = _stages(DOCKERFILE.read_text())
    api = " ".join(stages["api"])
    assert "[server]" in api
    assert "torch" not in api and "[worker]" not in api and "[dev]" not in api
    assert "HEALTHCHECK" in api and "/api/v1/health" in api
    worker = " ".join(stages["worker"])
    assert '"torch==2.13.0"' in worker and "[worker]" in worker
    # the GPU variant is a build argument of the worker image
    assert "ARG VARIANT=cpu" in worker and "onnxruntime-gpu" in worker


def test_docker_build_context_keeps_what_the_images_copy() -> None:
    ignored = {
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    }
    copied = re.findall(r"^COPY\s+(.+?)\s+\S+$", DOCKERFILE.read_text(), re.MULTILINE)
    sources = [s for line in copied for s in line.split()]
    assert sources, "Dockerfile copies nothing"
    for source in sources:
        assert (ROOT / source).exists() or source == "README.md", f"COPY {source}: missing"
        assert source not in ignored, f"{source} is copied but excluded by .dockerignore"
    assert ".venv" in ignored and ".git" in ignored and ".env" in ignored


# -- docker-compose.yml ----------------------------------------------------------------------------
def test_compose_file_matches_the_compose_spec() -> None:
    done = subprocess.run(
        [_tool("check-jsonschema"), "--builtin-schema", "vendor.compose-spec", str(COMPOSE)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stdout + done.stderr


def test_compose_refers_only_to_services_and_volumes_it_defines(compose: dict[str, Any]) -> None:
    services = compose["services"]
    volumes = set(compose.get("volumes") or {})
    assert {"redis", "postgres", "api", "worker"} <= set(services)
    for name, service in services.items():
        for dependency in service.get("depends_on") or {}:
            assert dependency in services, f"{name} depends on undefined service {dependency}"
        for mount in service.get("volumes") or []:
            source = mount.split(":")[0] if isinstance(mount, str) else mount["source"]
            if not source.startswith((".", "/", "~")):
                assert source in volumes, f"{name} mounts undefined volume {source}"


def test_services_wait_for_healthy_dependencies(compose: dict[str, Any]) -> None:
    services = compose["services"]
    for name in ("redis", "postgres", "api"):
        assert "healthcheck" in services[name], f"{name} has no healthcheck"
    for name in ("api", "worker", "worker-prediction", "worker-refinement", "worker-gpu"):
        depends = services[name]["depends_on"]
        assert {"redis", "postgres"} <= set(depends)
        for dependency, rule in depends.items():
            assert rule == {"condition": "service_healthy"}, f"{name} -> {dependency}: {rule}"
            assert "healthcheck" in services[dependency]


def test_compose_refuses_to_start_without_a_database_password() -> None:
    text = COMPOSE.read_text()
    uses = re.findall(r"\$\{POSTGRES_PASSWORD[^}]*\}", text)
    assert uses, "POSTGRES_PASSWORD is never used"
    assert all(use.startswith("${POSTGRES_PASSWORD:?") for use in uses), uses
    assert "POSTGRES_PASSWORD=" in (ROOT / ".env.example").read_text()


def test_api_and_workers_share_the_data_volume(compose: dict[str, Any]) -> None:
    services = compose["services"]
    mounts = {
        name: {m for m in services[name]["volumes"] if m.endswith(":/data")}
        for name in ("api", "worker", "worker-prediction", "worker-refinement", "worker-gpu")
    }
    assert len({frozenset(m) for m in mounts.values()}) == 1 and mounts["api"], mounts
    for name in ("api", "worker", "worker-prediction", "worker-refinement", "worker-gpu"):
        assert services[name]["environment"]["SEGASSIST_DATA_DIR"] == "/data"


def test_worker_scales_and_gpu_worker_is_an_optional_profile(compose: dict[str, Any]) -> None:
    services = compose["services"]
    worker = services["worker"]
    # --scale worker=N fails with a fixed container name or a published host port
    assert "container_name" not in worker and "ports" not in worker
    assert "profiles" not in worker
    gpu = services["worker-gpu"]
    assert gpu["profiles"] == ["gpu"]
    assert gpu["build"]["args"]["VARIANT"] == "gpu"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]


def test_cpu_workers_split_the_queues_and_training_yields(compose: dict[str, Any]) -> None:
    """Each worker's command, read by the CLI's own parser: the CPU workers split the three
    queues, training with the lowest CPU weight (Docker's default is 1024), refinement between;
    the GPU worker takes all."""
    from segassist.client.cli import build_parser
    from segassist.server.queue import PREDICTION_QUEUE, QUEUE_NAME, REFINEMENT_QUEUE
    from segassist.worker.serve import WORKER_QUEUES

    services = compose["services"]
    queues = {}
    for name in ("worker", "worker-prediction", "worker-refinement", "worker-gpu"):
        command = services[name]["command"]
        assert command[:2] == ["segassist", "worker"], command
        queues[name] = WORKER_QUEUES[build_parser().parse_args(command[1:]).queue]
    assert queues == {
        "worker": (QUEUE_NAME,),
        "worker-prediction": (PREDICTION_QUEUE,),
        "worker-refinement": (REFINEMENT_QUEUE,),
        "worker-gpu": (QUEUE_NAME, PREDICTION_QUEUE, REFINEMENT_QUEUE),
    }
    prediction_weight = services["worker-prediction"].get("cpu_shares", 1024)
    refinement_weight = services["worker-refinement"]["cpu_shares"]
    assert services["worker"]["cpu_shares"] < refinement_weight < prediction_weight
    assert "container_name" not in services["worker-prediction"]
    assert "ports" not in services["worker-prediction"]


def test_compose_settings_are_settings_the_service_reads(compose: dict[str, Any]) -> None:
    from segassist.server.settings import Settings

    fields = {f"SEGASSIST_{name.upper()}" for name in Settings.model_fields}
    for name in ("api", "worker", "worker-prediction", "worker-refinement", "worker-gpu"):
        for key in compose["services"][name]["environment"]:
            if key.startswith("SEGASSIST_"):
                assert key in fields, f"{name}: {key} is not a setting ({sorted(fields)})"
    compose_only = {"SEGASSIST_PORT", "SEGASSIST_IMAGE_TAG"}
    for line in (ROOT / ".env.example").read_text().splitlines():
        key = line.split("=", 1)[0].strip()
        if key.startswith("SEGASSIST_") and key not in compose_only:
            assert key in fields, f".env.example: {key} is not a setting"


def test_compose_database_url_names_an_installed_driver(compose: dict[str, Any]) -> None:
    from sqlalchemy.engine import make_url

    env = compose["services"]["api"]["environment"]
    url = env["SEGASSIST_DATABASE_URL"].replace("${POSTGRES_PASSWORD:?set me}", "secret")
    dialect = make_url(url).get_dialect()
    dialect.import_dbapi()  # raises if the driver of the URL is not installed


# -- Makefile and CI -------------------------------------------------------------------------------
def _make_dry_run(target: str) -> list[str]:
    make = shutil.which("make")
    if make is None:
        pytest.fail("make is not installed")
    done = subprocess.run(
        [make, "-n", "--no-print-directory", "-C", str(ROOT), target],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    return [line.strip() for line in done.stdout.splitlines() if line.strip()]


def test_make_test_lints_typechecks_and_runs_pytest_in_order() -> None:
    lines = _make_dry_run("test")
    wanted = ["ruff check", "ruff format --check", "mypy", "pytest"]
    positions = [next(i for i, line in enumerate(lines) if w in line) for w in wanted]
    assert positions == sorted(positions), lines
    # nothing masks pytest's exit code (exit 5, "no tests collected", must fail the target)
    pytest_line = lines[positions[-1]]
    assert "||" not in pytest_line and not pytest_line.startswith("-"), pytest_line


def test_make_demo_runs_the_demo_with_cpu_torch() -> None:
    text = (ROOT / "Makefile").read_text()
    assert '"torch==2.13.0"' in text
    lines = _make_dry_run("demo")
    assert lines[-1].endswith("segassist demo"), lines


def test_ci_script_runs_make_test_strictly() -> None:
    script = ROOT / ".ci" / "run"
    text = script.read_text()
    assert text.startswith("#!/usr/bin/env bash")
    assert "set -euo pipefail" in text and "CI=true" in text
    assert re.search(r"^make test$", text, re.MULTILINE)
    done = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True, check=False)
    assert done.returncode == 0, done.stderr


# -- README ----------------------------------------------------------------------------------------
def test_readme_opens_with_the_two_commands() -> None:
    text = (ROOT / "README.md").read_text()
    first_block = re.search(r"```bash\n(.*?)```", text, re.DOTALL)
    assert first_block is not None
    assert first_block.group(1).split("\n")[:2] == ["make demo", "make test"]
    assert text.index(first_block.group(0)) < text.index("\n## ")


def test_readme_documents_every_setting() -> None:
    from segassist.server.settings import Settings

    text = (ROOT / "README.md").read_text()
    missing = [n for n in Settings.model_fields if f"`SEGASSIST_{n.upper()}`" not in text]
    assert not missing, f"README configuration table lacks {missing}"
    assert "<!-- fewshot table -->" in text or "## Benchmarks" in text
