"""Service benchmark: the ``--quick`` profile runs against a real embedded service and reports
every measured row, with numbers, and a verdict per target, in both the markdown and the JSON it
writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import psutil
import pytest

from segassist.bench.service import (
    PROFILES,
    Table,
    Target,
    _Timeline,
    corrected_label,
    main,
    sparse_label,
    synthetic_ct,
)

_QUICK = PROFILES["quick"]
_ENDPOINTS = ("GET /datasets", "GET /jobs", "GET /images/{id}")
EXPECTED_ROWS = {
    "Upload throughput": {"nii", "nii.gz"},
    "Labels submitted → segmentation downloaded, encoder there": {"(a) run 1", "(b) run 1"},
    "First segmentation, no encoder yet": {"run 1"},
    "4 predictions in flight": {f"prediction {i}" for i in range(1, 5)},
    "Metadata latency, 50 concurrent clients": {
        f"{endpoint} · {condition}"
        for endpoint in _ENDPOINTS
        for condition in ("idle", "4 predictions")
    },
    "Inference: ONNX Runtime vs PyTorch eager": {"PyTorch eager", "ONNX Runtime"},
    "GEMM reference": {f"GEMM {_QUICK.gemm_size}²"},
    "Peak memory (RSS)": {
        "upload",
        "pretrain (untimed)",
        "assist, encoder there",
        "metadata, idle",
        "4 predictions + 50 clients",
        "assist, no encoder yet",
    },
}
_STAGED = (
    "Labels submitted → segmentation downloaded, encoder there",
    "First segmentation, no encoder yet",
)


def _markdown_rows(text: str) -> dict[str, list[str]]:
    """Row name → cells of every markdown table row (header and rule lines excluded)."""
    rows = {}
    for line in text.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if line.startswith("| ") and cells[0] and not set(line) <= set("|-: "):
            rows[cells[0]] = cells[1:]
    return rows


@pytest.mark.slow
def test_quick_profile_writes_every_measured_row_with_numbers(tmp_path: Path) -> None:
    before = {p.pid for p in psutil.Process().children(recursive=True)}

    assert main(["--quick", "--out", str(tmp_path)]) == 0

    payload = json.loads((tmp_path / "service.json").read_text(encoding="utf-8"))
    tables = {t["title"]: t for t in payload["tables"]}
    assert set(tables) == set(EXPECTED_ROWS)
    for title, names in EXPECTED_ROWS.items():
        rows = {row["name"]: row for row in tables[title]["rows"]}
        assert names <= set(rows), f"{title}: rows {sorted(rows)}"
        for row in rows.values():
            for key, _, _ in tables[title]["columns"]:
                value = row[key]
                assert isinstance(value, int | float) and math.isfinite(value), (title, row)
                assert value >= 0, (title, row)
    for title in _STAGED:
        for row in tables[title]["rows"]:
            stages = sum(v for k, v in row.items() if k not in ("name", "total", "onnx_x"))
            assert stages == pytest.approx(row["total"], abs=1e-6), (title, row)
            assert row["total"] > 0 and row["onnx_x"] > 0
    under_load = [
        row["in_flight_pct"]
        for row in tables["Metadata latency, 50 concurrent clients"]["rows"]
        if row["name"].endswith("· 4 predictions")
    ]
    assert len(under_load) == 3 and all(0 <= pct <= 100 for pct in under_load)
    first = tables["First segmentation, no encoder yet"]
    assert "background pretraining job" in first["note"]
    assert payload["machine"]["onnxruntime"] and payload["machine"]["logical_cores"] >= 1

    targets = payload["targets"]
    assert len(targets) == 4
    for target in targets:
        assert math.isfinite(target["measured"]) and target["measured"] >= 0, target
        assert target["met"] == (target["measured"] <= target["limit"]), target

    markdown = (tmp_path / "service.md").read_text(encoding="utf-8")
    md_rows = _markdown_rows(markdown)
    for title, table in tables.items():
        assert f"## {title}" in markdown
        for row in table["rows"]:
            cells = md_rows[row["name"]]
            assert len(cells) == len(table["columns"])
            assert all(math.isfinite(float(cell)) for cell in cells), (row["name"], cells)
    verdicts = [line for line in markdown.splitlines() if " vs target ≤ " in line]
    assert len(verdicts) == 4
    assert all(line.endswith(("**met**", "**missed**")) for line in verdicts)
    assert "onnxruntime" in markdown and "cpu" in markdown

    leftover = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not leftover, f"processes left running: {leftover}"


def test_timeline_stages_sum_to_the_total_even_with_missing_or_skewed_marks() -> None:
    t = _Timeline(submitted=100.0, label_stored=100.5, accepted=100.4, started=101.0)
    t.phases = {"encoder": 0.1, "features": 1.0, "export": 0.5, "predict": 0.2}
    t.finished, t.noticed, t.downloaded = 103.0, 103.1, 103.3
    stages = t.stages()
    assert stages["submit"] == 0.0  # accepted before label_stored (skewed): clipped
    assert stages["queue"] == pytest.approx(0.5)  # from the clipped accept, 100.5
    assert stages["fit"] == 0.0  # no fit phase reported: 0 s
    assert stages["features"] == pytest.approx(1.0) and stages["predict"] == pytest.approx(0.2)
    assert stages["other"] == pytest.approx(0.2)  # started + phases = 102.8; finished 103.0
    assert sum(v for k, v in stages.items() if k != "total") == pytest.approx(stages["total"])
    assert stages["total"] == pytest.approx(3.3)


def test_timeline_without_server_stamps_puts_the_job_in_the_poll_notice() -> None:
    t = _Timeline(submitted=10.0, label_stored=10.2, accepted=10.3, noticed=12.3, downloaded=12.4)
    stages = t.stages()
    assert stages["queue"] == 0.0 and stages["other"] == 0.0
    assert stages["notice"] == pytest.approx(2.0)
    assert stages["total"] == pytest.approx(2.4)


def test_synthetic_volume_and_sparse_label_keep_the_requested_slices() -> None:
    image, label = synthetic_ct((32, 32, 20), seed=0)
    assert image.dtype == np.int16 and image.shape == (32, 32, 20)
    assert image[label == 1].mean() > image[(label == 0) & (image > -500)].mean() + 50
    sparse = sparse_label(label, 3)
    kept = [k for k in range(20) if (sparse[:, :, k] != 255).any()]
    assert len(kept) == 3 and all(label[:, :, k].any() for k in kept)
    assert np.array_equal(sparse[:, :, kept], label[:, :, kept])


def test_corrected_label_adds_the_hinted_slice_or_an_unannotated_organ_slice() -> None:
    _, label = synthetic_ct((16, 16, 20), seed=0)
    sparse = sparse_label(label, 3)
    kept = {k for k in range(20) if (sparse[:, :, k] != 255).any()}

    hinted = corrected_label(sparse, label, 0)
    assert {k for k in range(20) if (hinted[:, :, k] != 255).any()} == kept | {0}
    assert np.array_equal(hinted[:, :, 0], label[:, :, 0])

    for hint in (None, min(kept)):  # no hint, or one already annotated: the tool picks
        fixed = corrected_label(sparse, label, hint)
        added = {k for k in range(20) if (fixed[:, :, k] != 255).any()} - kept
        assert len(added) == 1 and label[:, :, added.pop()].any()


def test_target_verdict_follows_the_limit_and_a_missing_value_is_missed() -> None:
    assert Target("t", 4.9, 5.0, "s").met and Target("t", 5.0, 5.0, "s").met
    assert not Target("t", 5.1, 5.0, "s").met
    assert not Target("t", math.nan, 5.0, "s").met
    assert Target("t", 5.1, 5.0, "s").line().endswith("**missed**")
    assert Target("t", 1.0, 5.0, "s").to_dict()["met"] is True


def test_markdown_table_formats_every_column() -> None:
    table = Table("T", [("a", "A", ".1f"), ("n", "N", "d")], note="why")
    table.add("row", a=1.25, n=3)
    assert table.markdown().splitlines()[-1] == "| row | 1.2 | 3 |"
