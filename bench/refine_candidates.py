"""Can a network trained from scratch close the default path's gap at k ≥ 3, and can the
annotator's own slices tell when?

``python -m segassist.bench.refine_candidates [--sets ...] [--seeds N] [--resume]`` writes
``bench/results/refine_candidates/refine.{md,jsonl}`` (the jsonl row by row, as cells finish).

Protocol of :mod:`segassist.bench.default_path` (same volumes, pool encoders, k ∈ {1, 3, 5}
spread slices, Dice on the unlabelled slices). Per volume, k and seed:

- ``A``: the default chain (propagation on decoder map 0, prior at ``DEFAULT_SCALE``, seeded
  components); deterministic, computed once per k.
- ``B``: the fewshot bench's ``random-init · finetune`` row (``PROFILES["default"].scratch``,
  ``run.random_encoder``, seed s); ``B+pc``: its softmax fused with the prior, then components.
- ``C``: the same scratch fit on the labelled slices plus A's pseudo-labels (A's final label where
  A's fused probability max ≥ ``PSEUDO_THRESHOLD``, ignore elsewhere); ``C+c``: + components.
- ``D``: mean of A's fused probabilities and B's softmax, argmax, + components.
- k ≥ 3, leave the middle labelled slice out: A's chain and B (and C, pseudo-labels from the
  k−1-slice A) from the other k−1 slices; each scored on the held-out slice (mean Dice over the
  foreground classes present there). ``pick(A/B)`` = B if B_val > A_val else A, and its
  full-volume Dice (the candidate fitted on all k slices); likewise ``pick(A/C)`` with C+c.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from segassist.bench.default_answer import OBJECTIVE_PER_MODALITY
from segassist.bench.fewshot import (
    PROFILES,
    RESULTS,
    EncoderCache,
    _Fit,
    _fit,
    _pool_encoder,
    _Run,
    _Volume,
)
from segassist.bench.protocol import (
    dice_per_class,
    mean_dice,
    slice_propagation_dice,
    sparse_labels,
    spread_slices,
)
from segassist.bench.report import RANDOM, machine_text, regenerate_command
from segassist.models.datasets import Case, cache_dir, load_set
from segassist.models.features import compute_feature_maps
from segassist.models.propagation import map_features, propagate
from segassist.models.refinement import network_probabilities
from segassist.models.seeded_components import keep_seeded_components
from segassist.models.slice_prior import DEFAULT_SCALE, fuse_with_prior
from segassist.models.volumes import IGNORE_INDEX

__all__ = ["main"]

PSEUDO_THRESHOLD = 0.9
OUT = RESULTS / "refine_candidates"
ORDER = ("tptbox-spine", "mni-tissue", "totalseg-ct", "totalseg-mr")


class _Cell:
    """One volume's fixed inputs: case, volume, feature maps, scratch-fit recipe."""

    def __init__(self, volume: _Volume, maps: Any, fit: _Fit) -> None:
        self.volume, self.maps, self.fit = volume, maps, fit
        self.case: Case = volume.case

    def score(self, labels: np.ndarray, labelled: Sequence[int]) -> float:
        """Mean Dice over classes on the slices not in ``labelled``."""
        case = self.case
        dice = slice_propagation_dice(
            labels, self.volume.label, case.axis, labelled, list(case.classes)
        )
        return mean_dice(dice)

    def score_slice(self, labels: np.ndarray, j: int) -> float:
        """Mean Dice on slice ``j`` over the foreground classes present in its truth."""
        axis = self.case.axis
        truth = np.take(self.volume.label, j, axis=axis)
        present = [c for c in self.case.classes if (truth == c).any()]
        if not present:
            return float("nan")
        return mean_dice(dice_per_class(np.take(labels, j, axis=axis), truth, present))

    def chain_a(self, sparse: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A's fused probabilities and final labels from ``sparse``."""
        case = self.case
        spread = propagate(map_features(self.maps), sparse, case.axis, case.num_classes)
        fused = fuse_with_prior(spread.probabilities, sparse, case.axis, DEFAULT_SCALE)
        kept, _, _ = keep_seeded_components(fused.labels, sparse)
        return fused.probabilities, kept

    def scratch(self, labels: np.ndarray, seed: int) -> tuple[np.ndarray, float]:
        """Softmax of the random-init fine-tune fitted on ``labels``, and the fit's seconds."""
        case = self.case
        images = [self.volume.image]
        segmenter, seconds = _fit(self.fit, seed, case.axis, images, [labels], case.num_classes)
        return network_probabilities(segmenter, self.volume.image, case.axis), seconds

    def pseudo(self, sparse: np.ndarray, fused: np.ndarray, kept: np.ndarray) -> np.ndarray:
        """The annotator's labels, plus A's final label where A's fused max ≥ the threshold."""
        confident = fused.max(axis=0) >= PSEUDO_THRESHOLD
        out = np.where(confident, kept, IGNORE_INDEX).astype(np.uint8)
        drawn = sparse != IGNORE_INDEX
        out[drawn] = sparse[drawn]
        return out


def _components(
    probabilities: np.ndarray, sparse: np.ndarray, axis: int, prior: bool
) -> np.ndarray:
    """Argmax (after the prior at ``DEFAULT_SCALE`` if ``prior``), then seeded components."""
    labels = (
        fuse_with_prior(probabilities, sparse, axis, DEFAULT_SCALE).labels
        if prior
        else probabilities.argmax(axis=0).astype(np.uint8)
    )
    return keep_seeded_components(labels, sparse)[0]


def _run_k(
    cell: _Cell,
    k: int,
    seeds: Sequence[int],
    done: set[tuple[str, int, int]],
    sink: Any,
    with_c: bool = True,
) -> None:
    """Every seed's row at ``k`` labelled slices, appended to ``sink`` as it finishes."""
    case, volume = cell.case, cell.volume
    axis = case.axis
    labelled = spread_slices(volume.label, axis, k)
    sparse = sparse_labels(volume.label, axis, labelled)
    fused_a, kept_a = cell.chain_a(sparse)
    dice_a = cell.score(kept_a, labelled)
    pseudo = cell.pseudo(sparse, fused_a, kept_a)
    unl = ~np.isin(np.arange(volume.label.shape[axis]), labelled)
    pseudo_unl = np.moveaxis(pseudo, axis, 0)[unl]
    pseudo_share = float((pseudo_unl != IGNORE_INDEX).mean())
    pseudo_dice = cell.score(np.where(pseudo == IGNORE_INDEX, 0, pseudo).astype(np.uint8), labelled)
    val: dict[str, Any] = {}
    if k >= 3:
        held = labelled[len(labelled) // 2]
        rest = [s for s in labelled if s != held]
        sparse_v = sparse_labels(volume.label, axis, rest)
        fused_v, kept_v = cell.chain_a(sparse_v)
        val = {
            "held_out": held,
            "A_val": cell.score_slice(kept_v, held),
            "pseudo_v": cell.pseudo(sparse_v, fused_v, kept_v),
            "sparse_v": sparse_v,
        }
    for seed in seeds:
        if (case.name, k, seed) in done:
            continue
        began = time.perf_counter()
        probs_b, fit_b = cell.scratch(sparse, seed)
        labels_b = probs_b.argmax(axis=0).astype(np.uint8)
        b_pc = _components(probs_b, sparse, axis, prior=True)
        d = _components(0.5 * (fused_a + probs_b), sparse, axis, prior=False)
        row: dict[str, Any] = {
            "volume": case.name,
            "modality": case.modality,
            "k": k,
            "seed": seed,
            "labelled": labelled,
            "A": dice_a,
            "B": cell.score(labels_b, labelled),
            "B+pc": cell.score(b_pc, labelled),
            "D": cell.score(d, labelled),
            "fit_B_s": fit_b,
            "pseudo_share_unlabelled": pseudo_share,
            "pseudo_dice_ignore_as_background": pseudo_dice,
        }
        if with_c:
            probs_c, fit_c = cell.scratch(pseudo, seed)
            c_c = _components(probs_c, sparse, axis, prior=False)
            row |= {
                "C": cell.score(probs_c.argmax(axis=0).astype(np.uint8), labelled),
                "C+c": cell.score(c_c, labelled),
                "fit_C_s": fit_c,
            }
        if val:
            held, sparse_v = val["held_out"], val["sparse_v"]
            probs_bv, _ = cell.scratch(sparse_v, seed)
            b_val = cell.score_slice(probs_bv.argmax(axis=0).astype(np.uint8), held)
            bpc_val = cell.score_slice(_components(probs_bv, sparse_v, axis, prior=True), held)
            a_val = val["A_val"]
            row |= {
                "held_out": held,
                "A_val": a_val,
                "B_val": b_val,
                "B+pc_val": bpc_val,
                "pick_AB": "B" if b_val > a_val else "A",
            }
            row["pick_AB_dice"] = row["B"] if row["pick_AB"] == "B" else dice_a
            if with_c:
                probs_cv, _ = cell.scratch(val["pseudo_v"], seed)
                c_val = cell.score_slice(_components(probs_cv, sparse_v, axis, prior=False), held)
                row["C+c_val"] = c_val
                row["pick_AC"] = "C" if c_val > a_val else "A"
                row["pick_AC_dice"] = row["C+c"] if row["pick_AC"] == "C" else dice_a
        row["cell_s"] = time.perf_counter() - began
        sink.write(json.dumps(row) + "\n")
        sink.flush()
        print(
            " ".join(
                f"{key}={value:.3f}" if isinstance(value, float) else f"{key}={value}"
                for key, value in row.items()
                if key != "labelled"
            ),
            flush=True,
        )


def _ms(values: list[float], digits: int = 3) -> str:
    arr = np.array([v for v in values if v is not None and not np.isnan(v)], dtype=float)
    if arr.size == 0:
        return "–"
    if arr.size == 1:
        return f"{arr.mean():.{digits}f}"
    return f"{arr.mean():.{digits}f} ± {arr.std():.{digits}f}"


def report(rows: list[dict[str, Any]], command: str) -> str:
    """Markdown table (mean ± std over seeds) and the pick summary."""
    keys: list[tuple[str, int]] = []
    for r in rows:
        if (r["volume"], r["k"]) not in keys:
            keys.append((r["volume"], r["k"]))
    cols = (
        "A",
        "B",
        "B+pc",
        "C",
        "C+c",
        "D",
        "A_val",
        "B_val",
        "pick_AB_dice",
        "C+c_val",
        "pick_AC_dice",
    )
    headings = [{"pick_AB_dice": "pick(A/B)", "pick_AC_dice": "pick(A/C)"}.get(c, c) for c in cols]
    headings.insert(9, "picks")  # the choice per seed, after pick(A/B)
    head = ("volume", "k", *headings, "fit B s", "fit C s", "seeds")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for volume, k in keys:
        sel = [r for r in rows if r["volume"] == volume and r["k"] == k]
        cells = [_ms([r.get(c, float("nan")) for r in sel]) for c in cols]
        picks = "".join(r.get("pick_AB", "") for r in sel) or "–"
        cells.insert(9, picks)
        fits = [_ms([r.get(f"fit_{m}_s", np.nan) for r in sel], 1) for m in "BC"]
        fits = [f.replace(" ± ", "±") for f in fits]
        lines.append(f"| {volume} | {k} | " + " | ".join(cells + fits) + f" | {len(sel)} |")
    val = [r for r in rows if "pick_AB" in r]
    summary = []
    if val:

        def mean(key: str, sel: list[dict[str, Any]] = val) -> float:
            return float(np.mean([r[key] for r in sel]))

        val_c = [r for r in val if "pick_AC" in r]

        best_ab = [max(r["A"], r["B"]) for r in val]
        right_ab = sum((r["B"] > r["A"]) == (r["pick_AB"] == "B") or r["B"] == r["A"] for r in val)
        best_ac = [max(r["A"], r["C+c"]) for r in val_c]
        right_ac = sum((r["C+c"] > r["A"]) == (r["pick_AC"] == "C") for r in val_c)
        summary = [
            f"Over the {len(val)} (volume, k ≥ 3, seed) rows:",
            "",
            f"- pick(A/B) chose the better of A and B in {right_ab}/{len(val)}; mean Dice: "
            f"pick {mean('pick_AB_dice'):.3f}, A {mean('A'):.3f}, B {mean('B'):.3f}, "
            f"best in hindsight {np.mean(best_ab):.3f}.",
            f"- pick(A/C+c), over the {len(val_c)} rows with C, chose the better of A and C+c in "
            f"{right_ac}/{len(val_c)}; mean Dice: pick {mean('pick_AC_dice', val_c):.3f}, "
            f"A {mean('A', val_c):.3f}, C+c {mean('C+c', val_c):.3f}, "
            f"best in hindsight {np.mean(best_ac):.3f}.",
            f"- mean Dice of B+pc {mean('B+pc'):.3f}, D {mean('D'):.3f} (all {len(val)} rows).",
            "",
        ]
    machine = machine_text()
    return "\n".join(
        [
            "# Refining the default path with a scratch network (k labelled slices)",
            "",
            f"Regenerate: `{command}`",
            "",
            f"Machine: {machine}.",
            "",
            "Mean Dice over classes on the unlabelled slices (mean ± std over seeds; A is "
            "deterministic). A = default chain (propagation + prior + components); B = "
            "random-init · finetune as in the fewshot bench; B+pc = B's softmax + prior + "
            f"components; C = the same fit on the labelled slices + A's pseudo-labels (fused max "
            f"≥ {PSEUDO_THRESHOLD}), C+c = + components; D = mean(A fused, B softmax) + "
            "components. *_val: Dice on the middle labelled slice, held out, from the other k−1 "
            "(foreground classes present there). pick(A/B) = full-volume Dice of B if B_val > "
            "A_val else of A; picks = the choice per seed; pick(A/C) likewise with C+c.",
            "",
            *lines,
            "",
            *summary,
        ]
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the exit code."""
    parser = argparse.ArgumentParser(
        prog="python -m segassist.bench.refine_candidates", description=__doc__
    )
    parser.add_argument("--sets", nargs="*", default=list(ORDER))
    parser.add_argument("--seeds", type=int, default=2)
    parser.add_argument("--ks", type=int, nargs="*", default=[1, 3, 5])
    parser.add_argument("--out", type=Path, default=OUT)
    parser.add_argument("--no-c", action="store_true", help="skip C (pseudo-label fits, slow)")
    parser.add_argument("--resume", action="store_true", help="skip cells already in the jsonl")
    parser.add_argument("--report-only", action="store_true", help="rewrite the md from the jsonl")
    args = parser.parse_args(argv)
    command = regenerate_command("segassist.bench.refine_candidates", argv)
    args.out.mkdir(parents=True, exist_ok=True)
    jsonl, md = args.out / "refine.jsonl", args.out / "refine.md"
    done: set[tuple[str, int, int]] = set()
    if jsonl.is_file() and (args.resume or args.report_only):
        done = {(r["volume"], r["k"], r["seed"]) for r in _read(jsonl)}
    elif jsonl.is_file():
        jsonl.unlink()
    if args.report_only and not jsonl.is_file():
        parser.error(f"--report-only: no {jsonl}")
    if not args.report_only:
        profile = PROFILES["default"]
        state = _Run(profile, EncoderCache(cache_dir() / "encoders"), extras=False)
        with jsonl.open("a") as sink:
            for set_name in args.sets:
                for case in load_set(set_name):
                    volume = _Volume.load(case)
                    objective = OBJECTIVE_PER_MODALITY[case.modality]
                    encoder = _pool_encoder(state, case.modality, objective)
                    fit = _Fit(
                        f"{RANDOM} · finetune",
                        state.random_encoder(case.modality),
                        "finetune",
                        profile.scratch,
                    )
                    with tempfile.TemporaryDirectory() as tmp:
                        maps = compute_feature_maps(encoder, volume.image, case.axis, Path(tmp))
                        cell = _Cell(volume, maps, fit)
                        for k in args.ks:
                            _run_k(cell, k, range(args.seeds), done, sink, not args.no_c)
                    md.write_text(report(_read(jsonl), command))
    md.write_text(report(_read(jsonl), command))
    print(f"wrote {md}")
    return 0


def _read(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


if __name__ == "__main__":
    raise SystemExit(main())
