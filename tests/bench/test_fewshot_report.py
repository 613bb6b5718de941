"""The few-shot report's target checks (:func:`segassist.bench.report.write_report`)."""

from __future__ import annotations

from pathlib import Path

from segassist.bench.report import DEFAULT, FINETUNE, ITK, RANDOM, Row, write_report

GROUP = "totalseg-ct · totalseg-ct · slice propagation"


def _rows(table: dict[str, dict[int, list[float]]]) -> list[Row]:
    """One row per (method, k, seed) of ``table``: method → k → Dice per seed."""
    return [
        Row("totalseg-ct", GROUP, "slice propagation", method, k, seed, {"liver": d}, d, 1.0)
        for method, by_k in table.items()
        for k, dice in by_k.items()
        for seed, d in enumerate(dice)
    ]


def _targets(tmp_path: Path, table: dict[str, dict[int, list[float]]]) -> list[str]:
    write_report(tmp_path, _rows(table), [], {"command": "x"}, [])
    lines = (tmp_path / "fewshot.md").read_text().splitlines()
    start = lines.index("Targets (issue 10):") + 2
    return lines[start : lines.index("", start)]


def test_targets_compare_the_default_with_the_stronger_baseline_and_pool_seeds(
    tmp_path: Path,
) -> None:
    checks = _targets(
        tmp_path,
        {
            f"{RANDOM} · linear": {1: [0.30, 0.30], 3: [0.4, 0.4], 5: [0.5, 0.5]},
            FINETUNE: {1: [0.40, 0.50], 3: [0.70, 0.70], 5: [0.80, 0.80]},
            ITK: {3: [0.72], 5: [0.85]},
            "pix2rep · linear": {1: [0.62, 0.60], 3: [0.6, 0.6], 5: [0.7, 0.7]},
            DEFAULT: {1: [0.86, 0.86], 3: [0.80, 0.76], 5: [0.89, 0.91]},
        },
    )
    assert checks == [
        "- k = 3: default 0.780 vs better of random-init fine-tune and fill-between-slices "
        f"({ITK}) 0.720: +0.060 (target ≥ +0.05: met)",
        "- k = 5: default 0.900 vs better of random-init fine-tune and fill-between-slices "
        f"({ITK}) 0.850: +0.050 (target ≥ +0.05: met)",
        "- k = 1: default 0.860 vs best random-init 0.450: +0.410 (target ≥ +0.05: met)",
        "- k = 1: best self-supervised row (pix2rep · linear) 0.610 vs best random-init 0.450: "
        "+0.160 (target ≥ +0.15: met)",
        "- k = 1 default 0.860 vs fill-between-slices at k = 5 0.850 (target: reach it: met)",
        "- abdominal CT, k = 3: default 0.780 (target ≥ 0.75: met)",
    ]


def test_a_missed_target_says_so_and_the_default_is_no_self_supervised_row(
    tmp_path: Path,
) -> None:
    checks = _targets(
        tmp_path,
        {
            FINETUNE: {1: [0.5], 3: [0.8], 5: [0.8]},
            ITK: {3: [0.4], 5: [0.9]},
            "iic_boundary · finetune": {1: [0.55], 3: [0.6], 5: [0.6]},
            DEFAULT: {1: [0.7], 3: [0.7], 5: [0.82]},
        },
    )
    assert "(target ≥ +0.05: missed)" in checks[0]  # 0.7 vs fine-tune's 0.8
    assert f"({FINETUNE}) 0.800: -0.100" in checks[0]
    assert "best self-supervised row (iic_boundary · finetune) 0.550" in checks[3]
    assert checks[4].endswith("(target: reach it: missed)")
    assert checks[5] == "- abdominal CT, k = 3: default 0.700 (target ≥ 0.75: missed)"


def test_report_only_rewrites_the_same_report_from_the_json(tmp_path: Path) -> None:
    from segassist.bench.fewshot import main

    rows = _rows({FINETUNE: {1: [0.5, 0.6], 3: [0.8]}, DEFAULT: {1: [0.7], 3: [0.9]}})
    context = {"command": "python -m segassist.bench.fewshot", "selected": {"totalseg-ct": "x"}}
    write_report(tmp_path, rows, [], context, [])
    first = (tmp_path / "fewshot.md").read_text()
    assert main(["--report-only", "--out", str(tmp_path)]) == 0
    again = (tmp_path / "fewshot.md").read_text()
    assert again.split("## Notes")[0] == first.split("## Notes")[0]
    assert (
        "Best objective per set (used by Mean Teacher and the extra rows; chosen on these "
        "test slices): totalseg-ct: x." in again
    )
    assert (
        "| default (assist, then refinement) | 0.700 ± 0.000 | 0.900 ± 0.000 | 1.0 / 1.0 |" in again
    )
