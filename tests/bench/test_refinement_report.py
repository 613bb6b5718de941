"""The refinement benchmark's table (:func:`segassist.bench.refinement.report`)."""

from __future__ import annotations

from segassist.bench.refinement import report


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
    text = report(rows, "python -m segassist.bench.refinement")
    lines = text.splitlines()
    (a,) = [line for line in lines if line.startswith("| a | 3 |")]
    assert "0.600 ± 0.000 | 0.750 ± 0.050" in a  # propagation, blend over the 2 seeds
    assert "| blend blend |" in a and a.endswith("| 10 |")  # mean of 10.0 and 11.0, rounded
    (b,) = [line for line in lines if line.startswith("| b | 5 |")]
    assert "| propagation |" in b and "0.900 ± 0.000" in b
    # picks: 0.8, 0.7, 0.9 (all the best of the two) → mean 0.800
    assert "the pick's mean Dice 0.800" in text
    assert "the best candidate in 3/3" in text
