"""What the background refinement (``worker/refine.py``) gives an annotator after the assist.

``python -m segassist.bench.refinement [--sets ...] [--seeds N] [--report-only]`` writes
``bench/results/refinement/refinement.{md,jsonl}`` (the jsonl row by row; ``--report-only``
rewrites the table from it).

The protocol of :mod:`segassist.bench.default_path` (slice propagation, k ∈ {3, 5} slices spread
over the structures, the refinement needing 3; Dice on the unlabelled slices; the modality's
100-step pool encoder) and the refinement's own steps, with the functions the worker calls:
hide the middle labelled slice (:func:`~segassist.models.held_out_slice.hold_out_middle_slice`);
train a scratch network on the others (``FewShotConfig.for_scratch(**REFINE_SCRATCH)``, one
thread, seed s); build the candidates (:func:`~segassist.models.refinement.candidates`) from the
propagation and the network, correct each as the assist does (slice prior at the default
strength for propagated probabilities, by leave-one-out for the network's; seeded components);
score them on the hidden slice and :func:`~segassist.models.refinement.choose`. Then the same
from all k slices, each candidate's Dice on the unlabelled slices: ``pick`` is the chosen
one's, what the annotator ends with. ``refine s``: the refinement's compute (two fits, the
candidates and their corrections), not counting reading the maps.

``--objective O`` pretrains every modality's pool encoder with ``O``, ``--pretrain-steps N``
longer; ``--scratch-max-side N`` pools the scratch network on slices over N pixels a side
(:func:`~segassist.models.fewshot.network_pool`); with ``--refit-of FILE`` (the jsonl of a run
on the shorter encoders, same sets and seeds) the report adds what a refit gives the annotator:
the service answers on a short encoder, refits on the longer background one, and the
refit's refinement keeps the earlier answer unless its own best held-out score is higher
(:data:`~segassist.models.refinement.PREVIOUS`; the same seed trains the same scratch network in
both runs, as in the service, so only the propagation differs).
"""

from __future__ import annotations

import argparse
import json
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from segassist.bench.default_answer import OBJECTIVE_PER_MODALITY, default_answer
from segassist.bench.fewshot import (
    PROFILES,
    RESULTS,
    EncoderCache,
    _pool_encoder,
    _Run,
    _Volume,
    add_pretrain_steps_argument,
    with_pretrain_steps,
)
from segassist.bench.protocol import mean_dice, slice_propagation_dice, sparse_labels, spread_slices
from segassist.bench.report import machine_text, regenerate_command
from segassist.models.datasets import cache_dir, load_set
from segassist.models.features import compute_feature_maps
from segassist.models.objectives import OBJECTIVES
from segassist.models.pretrain import Encoder
from segassist.models.refinement import CANDIDATES, PREFERENCE, PREVIOUS, choose

__all__ = ["main"]

OUT = RESULTS / "refinement"


def _row(
    encoder: Encoder,
    maps: Any,
    volume: _Volume,
    k: int,
    seed: int,
    scratch: dict[str, Any],
) -> dict[str, Any]:
    case = volume.case
    labelled = spread_slices(volume.label, case.axis, k)
    sparse = sparse_labels(volume.label, case.axis, labelled)
    answer = default_answer(encoder, maps, volume.image, sparse, case, seed, scratch)
    if answer.held_out is None:
        raise ValueError(f"k = {k}: nothing to hold out")
    dice = {
        name: mean_dice(
            slice_propagation_dice(labels, volume.label, case.axis, labelled, list(case.classes))
        )
        for name, labels in answer.candidates.items()
    }
    return {
        "volume": case.name,
        "k": k,
        "seed": seed,
        "labelled": labelled,
        "held_out": answer.held_out,
        "validation": answer.validation,
        "winner": answer.method,
        "dice": dice,
        "pick": dice[answer.method],
        "refine_seconds": answer.refine_seconds,
    }


def _mean_std(values: list[float]) -> str:
    return f"{np.mean(values):.3f} ± {np.std(values):.3f}"


def report(rows: list[dict[str, Any]], command: str, first: list[dict[str, Any]]) -> str:
    """The markdown table of ``rows`` (one line per volume and k, seeds pooled); with the rows
    of a run on shorter encoders (``first``), also :func:`refit_report`."""
    cells: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for row in rows:
        cells.setdefault((row["volume"], row["k"]), []).append(row)
    names = " | ".join(CANDIDATES)
    lines = [
        f"| volume | k | {names} | held-out Dice ({', '.join(CANDIDATES)}) | picks | pick "
        "| best in hindsight | refine s |",
        "|---|---|" + "---|" * len(CANDIDATES) + "---|---|---|---|---|",
    ]
    for (volume, k), group in cells.items():
        dice = " | ".join(_mean_std([r["dice"][n] for r in group]) for n in CANDIDATES)
        held = "/".join(f"{np.mean([r['validation'][n] for r in group]):.2f}" for n in CANDIDATES)
        picks = " ".join(r["winner"] for r in group)
        best = _mean_std([max(r["dice"].values()) for r in group])
        seconds = np.mean([r["refine_seconds"] for r in group])
        lines.append(
            f"| {volume} | {k} | {dice} | {held} | {picks} | "
            f"{_mean_std([r['pick'] for r in group])} | {best} | {seconds:.0f} |"
        )
    chosen = [r["pick"] for r in rows]
    summary = [
        f"Over {len(rows)} (volume, k, seed) runs: the pick's mean Dice {np.mean(chosen):.3f}; "
        + ", ".join(f"always {n} {np.mean([r['dice'][n] for r in rows]):.3f}" for n in CANDIDATES)
        + f"; best in hindsight {np.mean([max(r['dice'].values()) for r in rows]):.3f}. "
        f"The pick was the best candidate in "
        f"{sum(r['pick'] == max(r['dice'].values()) for r in rows)}/{len(rows)}.",
    ]
    machine = machine_text()
    return "\n".join(
        [
            "# The background refinement: propagation, a scratch network, or their blend",
            "",
            f"Regenerate: `{command}`",
            "",
            f"Machine: {machine}. Mean Dice over classes on the unlabelled slices, mean ± std "
            "over seeds (propagation is deterministic). `pick`: the candidate chosen on the "
            "held-out middle labelled slice, what the annotator ends with.",
            "",
            *lines,
            "",
            *summary,
            "",
            *(["## After a refit", "", *refit_report(first, rows), ""] if first else []),
        ]
    )


class _Refit(NamedTuple):
    """One run's Dice: the first answer, the refit's pick unchecked and checked."""

    first: float
    unchecked: float
    checked: float
    verdict: str  # "earlier", or the refit's winner


def refit_report(first: list[dict[str, Any]], refit: list[dict[str, Any]]) -> list[str]:
    """Markdown lines: per (volume, k) what the annotator ends with after a refit (rows of
    ``refit``) of the answers in ``first`` (matched by volume, k and seed), without and with
    the comparison against the earlier answer's held-out score."""
    earlier = {(r["volume"], r["k"], r["seed"]): r for r in first}
    cells: dict[tuple[str, int], list[_Refit]] = {}
    for row in refit:
        before = earlier.get((row["volume"], row["k"], row["seed"]))
        if before is None:
            continue
        bar = max(v for name, v in before["validation"].items() if name in PREFERENCE)
        kept = choose({PREVIOUS: bar} | row["validation"]) == PREVIOUS
        cells.setdefault((row["volume"], row["k"]), []).append(
            _Refit(
                before["pick"],
                row["pick"],
                before["pick"] if kept else row["pick"],
                "earlier" if kept else row["winner"],
            )
        )
    runs = [run for group in cells.values() for run in group]
    if not runs:
        return []
    lines = [
        "| volume | k | first answer | refit, unchecked | refit, checked | kept by the check |",
        "|---|---|---|---|---|---|",
    ]
    for (volume, k), group in cells.items():
        columns = [
            _mean_std([run.first for run in group]),
            _mean_std([run.unchecked for run in group]),
            _mean_std([run.checked for run in group]),
        ]
        verdicts = " ".join(run.verdict for run in group)
        lines.append(f"| {volume} | {k} | {' | '.join(columns)} | {verdicts} |")
    lower_unchecked = sum(run.unchecked < run.first - 0.005 for run in runs)
    lower_checked = sum(run.checked < run.first - 0.005 for run in runs)
    return [
        *lines,
        "",
        f"Over {len(runs)} runs: first answer {np.mean([r.first for r in runs]):.3f}, refit "
        f"unchecked {np.mean([r.unchecked for r in runs]):.3f} (below the first answer by "
        f"more than 0.005 in {lower_unchecked}), refit checked "
        f"{np.mean([r.checked for r in runs]):.3f} (in {lower_checked}).",
    ]


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m segassist.bench.refinement", description=__doc__
    )
    parser.add_argument(
        "--sets", nargs="*", default=["tptbox-spine", "totalseg-ct", "totalseg-mr", "mni-tissue"]
    )
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument(
        "--objective",
        choices=sorted(OBJECTIVES),
        help="the pool encoders' objective on every modality (default: OBJECTIVE_PER_MODALITY)",
    )
    add_pretrain_steps_argument(parser)
    parser.add_argument(
        "--refit-of", type=Path, help="jsonl of a run on shorter encoders: report the refit"
    )
    parser.add_argument(
        "--scratch-max-side",
        type=int,
        help="the network's FewShotConfig.scratch_max_side (default: the config's)",
    )
    parser.add_argument(
        "--report-only", action="store_true", help="rewrite the table from the jsonl, run nothing"
    )
    args = parser.parse_args(argv)
    command = regenerate_command("segassist.bench.refinement", argv)
    first = [] if args.refit_of is None else _read_rows(args.refit_of)
    if args.report_only:
        done = _read_rows(args.out / "refinement.jsonl")
        command = command.replace(" --report-only", "")
        (args.out / "refinement.md").write_text(report(done, command, first))
        return 0
    scratch = {} if args.scratch_max_side is None else {"scratch_max_side": args.scratch_max_side}
    profile = with_pretrain_steps(PROFILES["default"], args.pretrain_steps)
    state = _Run(profile, EncoderCache(cache_dir() / "encoders"), extras=False)
    args.out.mkdir(parents=True, exist_ok=True)
    raw = args.out / "refinement.jsonl"
    raw.write_text("")
    rows: list[dict[str, Any]] = []
    for set_name in args.sets:
        for case in load_set(set_name):
            volume = _Volume.load(case)
            objective = args.objective or OBJECTIVE_PER_MODALITY[case.modality]
            encoder = _pool_encoder(state, case.modality, objective)
            with tempfile.TemporaryDirectory() as tmp:
                maps = compute_feature_maps(encoder, volume.image, case.axis, Path(tmp))
                for k in (3, 5):
                    for seed in range(args.seeds):
                        row = _row(encoder, maps, volume, k, seed, scratch)
                        rows.append(row)
                        with raw.open("a") as f:
                            f.write(json.dumps(row) + "\n")
                        print(json.dumps(row), flush=True)
    (args.out / "refinement.md").write_text(report(rows, command, first))
    print(f"wrote {args.out / 'refinement.md'}")
    return 0


def _read_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    raise SystemExit(main())
