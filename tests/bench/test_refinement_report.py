"""The refinement benchmark's table (:func:`segassist.bench.refinement.report`)."""

from __future__ import annotations

from segassist.bench.refinement import refit_report, report


def _row(volume: str, k: int, seed: int, dice: dict[str, float], held: dict[str, float]) -> dict:
    winner = max(held, key=lambda n: (held[n], n == "propagation"))
    return {
        "volume": volume,
        "k": k,
        "seed": seed,
        "validation": held,
        "winner": winner,
        "dice": dice,
        "pick": dice[winner],
        "refine_seconds": 10.0 + seed,
    }


def test_the_table_pools_seeds_and_the_summary_counts_right_picks() -> None:
    rows = [
        _row("a", 3, 0, {"propagation": 0.6, "blend": 0.8}, {"propagation": 0.3, "blend": 0.5}),
        _row("a", 3, 1, {"propagation": 0.6, "blend": 0.7}, {"propagation": 0.3, "blend": 0.4}),
        _row("b", 5, 0, {"propagation": 0.9, "blend": 0.8}, {"propagation": 0.6, "blend": 0.5}),
    ]
    text = report(rows, "python -m segassist.bench.refinement", [])
    assert "After a refit" not in text
    lines = text.splitlines()
    (a,) = [line for line in lines if line.startswith("| a | 3 |")]
    assert "0.600 ± 0.000 | 0.750 ± 0.050" in a  # propagation, blend over the 2 seeds
    assert "| blend blend |" in a and a.endswith("| 10 |")  # mean of 10.0 and 11.0, rounded
    (b,) = [line for line in lines if line.startswith("| b | 5 |")]
    assert "| propagation |" in b and "0.900 ± 0.000" in b
    # picks: 0.8, 0.7, 0.9 (all the best of the two) → mean 0.800
    assert "the pick's mean Dice 0.800" in text
    assert "the best candidate in 3/3" in text


def test_the_refit_table_keeps_the_earlier_answer_where_it_scored_higher() -> None:
    first = [
        _row("a", 3, 0, {"propagation": 0.6, "blend": 0.8}, {"propagation": 0.3, "blend": 0.5}),
        _row("a", 3, 1, {"propagation": 0.6, "blend": 0.7}, {"propagation": 0.3, "blend": 0.4}),
    ]
    refit = [  # seed 0: lower held-out score than before (0.45 < 0.5); seed 1: higher (0.6)
        _row("a", 3, 0, {"propagation": 0.7, "blend": 0.75}, {"propagation": 0.2, "blend": 0.45}),
        _row("a", 3, 1, {"propagation": 0.7, "blend": 0.9}, {"propagation": 0.2, "blend": 0.6}),
        _row("b", 3, 0, {"propagation": 0.1, "blend": 0.1}, {"propagation": 0.1, "blend": 0.1}),
    ]
    lines = refit_report(first, refit)
    (a,) = [line for line in lines if line.startswith("| a | 3 |")]
    # first 0.8/0.7, unchecked 0.75/0.9, checked 0.8 (earlier kept)/0.9 (the refit's blend)
    assert a == "| a | 3 | 0.750 ± 0.050 | 0.825 ± 0.075 | 0.850 ± 0.050 | earlier blend |"
    assert not [line for line in lines if line.startswith("| b |")]  # no first run to match
    assert lines[-1] == (
        "Over 2 runs: first answer 0.750, refit unchecked 0.825 (below the first answer by "
        "more than 0.005 in 1), refit checked 0.850 (in 0)."
    )
