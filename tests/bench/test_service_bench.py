"""Service benchmark: the ``--quick`` profile runs against a real embedded service and reports
every measured row, with numbers, in both the markdown and the JSON it writes."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import psutil
import pytest

from bench.service import PROFILES, Table, _Timeline, main, sparse_label, synthetic_ct

EXPECTED_ROWS = {
    "Upload throughput": {"nii", "nii.gz"},
    "Labels submitted → prediction downloaded": {"run 1"},
    "Metadata latency, 50 concurrent clients": {
        "GET /datasets",
        "GET /jobs",
        "GET /images/{id}",
    },
    "Inference: ONNX Runtime vs PyTorch eager": {"PyTorch eager", "ONNX Runtime"},
    "GEMM reference": {f"GEMM {PROFILES['quick'].gemm_size}²"},
    "Peak memory (RSS)": {"upload", "pretrain (untimed)", "labels → prediction", "metadata"},
}


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
    e2e = tables["Labels submitted → prediction downloaded"]["rows"][0]
    stages = sum(v for k, v in e2e.items() if k not in ("name", "total"))
    assert stages == pytest.approx(e2e["total"], abs=1e-6)
    assert e2e["total"] > 0
    assert payload["machine"]["onnxruntime"] and payload["machine"]["logical_cores"] >= 1

    markdown = (tmp_path / "service.md").read_text(encoding="utf-8")
    md_rows = _markdown_rows(markdown)
    for title, table in tables.items():
        assert f"## {title}" in markdown
        for row in table["rows"]:
            cells = md_rows[row["name"]]
            assert len(cells) == len(table["columns"])
            assert all(math.isfinite(float(cell)) for cell in cells), (row["name"], cells)
    assert "onnxruntime" in markdown and "cpu" in markdown

    leftover = [p for p in psutil.Process().children(recursive=True) if p.pid not in before]
    assert not leftover, f"processes left running: {leftover}"


def test_timeline_stages_sum_to_the_total_even_with_missing_or_skewed_marks() -> None:
    t = _Timeline(submitted=100.0, label_stored=100.5, created=100.4, started=101.0)
    t.fit_start, t.published, t.finished = 102.0, 104.0, 104.2
    t.noticed, t.predicted, t.downloaded = 104.3, 106.0, 106.1
    stages = t.stages()
    assert stages["submit"] == 0.0  # created (server clock) before label_stored: clipped
    # fit_end unknown: the fit counts as 0 s and the next stage (export) takes its time
    assert stages["fit"] == 0.0 and stages["export"] == pytest.approx(2.0)
    assert sum(v for k, v in stages.items() if k != "total") == pytest.approx(stages["total"])
    assert stages["total"] == pytest.approx(6.1)


def test_synthetic_volume_and_sparse_label_keep_the_requested_slices() -> None:
    image, label = synthetic_ct((32, 32, 20), seed=0)
    assert image.dtype == np.int16 and image.shape == (32, 32, 20)
    assert image[label == 1].mean() > image[(label == 0) & (image > -500)].mean() + 50
    sparse = sparse_label(label, 3)
    kept = [k for k in range(20) if (sparse[:, :, k] != 255).any()]
    assert len(kept) == 3 and all(label[:, :, k].any() for k in kept)
    assert np.array_equal(sparse[:, :, kept], label[:, :, kept])


def test_markdown_table_formats_every_column() -> None:
    table = Table("T", [("a", "A", ".1f"), ("n", "N", "d")], note="why")
    table.add("row", a=1.25, n=3)
    assert table.markdown().splitlines()[-1] == "| row | 1.2 | 3 |"
