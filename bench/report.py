"""Tables, JSON and plot of the few-shot benchmark (``bench/results/fewshot.{md,json,png}``)."""

from __future__ import annotations

import json
import math
import os
import platform
import shlex
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from segassist.models.runtime._atomic import atomic_path, atomic_write_bytes

__all__ = [
    "DEFAULT",
    "FINETUNE",
    "EncoderRecord",
    "Row",
    "machine_info",
    "machine_text",
    "regenerate_command",
    "summarise",
    "write_markdown",
    "write_report",
    "write_table",
]

RANDOM = "random-init"
FINETUNE = f"{RANDOM} · finetune"
ITK = "fill-between-slices (ITK)"
DEFAULT = "default (assist, then refinement)"
"""The product's answer: what ``bench/default_answer.py`` computes."""
ABDOMINAL_CT_SET = "totalseg-ct"


@dataclass(frozen=True)
class Row:
    """One fitted-and-scored segmenter (or the interpolation baseline).

    Attributes:
        set: benchmark set, e.g. ``"tptbox-spine"``.
        group: what a table holds, e.g. ``"tptbox-ct · slice propagation"``.
        setting: ``"slice propagation"`` or ``"cross-volume"``.
        method: row label, e.g. ``"pix2rep · finetune"``.
        k: labelled slices (slice propagation) or labelled volumes (cross-volume).
        seed: few-shot seed (also the init seed of the random-init rows).
        dice: class name → Dice (NaN when absent from truth and prediction).
        mean_dice: mean over the defined per-class values.
        fit_seconds: wall time of fitting (and interpolating), without prediction.
        labelled: the labelled slice or volume indices.
    """

    set: str
    group: str
    setting: str
    method: str
    k: int
    seed: int
    dice: dict[str, float]
    mean_dice: float
    fit_seconds: float
    labelled: list[int] = field(default_factory=list)


@dataclass(frozen=True)
class EncoderRecord:
    """A pretrained encoder used by the run (trained now or reused from the cache)."""

    name: str
    objective: str
    data: str
    volumes: int
    slices: int
    steps: int
    batch_size: int
    image_size: int
    channels: list[int]
    seconds: float
    slices_per_second: float
    peak_rss_mb: float
    cached: bool
    key: str


def machine_info() -> dict[str, Any]:
    """CPU, cores, memory and library versions of this machine."""
    import monai
    import psutil
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.is_file():
        for line in cpuinfo.read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "logical_cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gb": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "monai": monai.__version__,
        "platform": platform.platform(),
    }


def regenerate_command(module: str, argv: Sequence[str] | None) -> str:
    """The shell command that reran ``python -m module`` with this run's arguments (``argv``,
    or the process's own when ``None``)."""
    return shlex.join(["python", "-m", module, *(sys.argv[1:] if argv is None else argv)])


def machine_text() -> str:
    """:func:`machine_info` as one line of "key value" pairs."""
    return ", ".join(f"{key} {value}" for key, value in machine_info().items())


def write_markdown(
    out: Path, title: str, module: str, argv: Sequence[str] | None, setup: str, body: list[str]
) -> None:
    """Write a benchmark's page to ``out`` atomically and say so: ``# title``, the command that
    regenerates it (:func:`regenerate_command`), the machine followed by ``setup`` (what was
    measured, how), then the ``body`` lines."""
    text = "\n".join(
        [
            f"# {title}",
            "",
            f"Regenerate: `{regenerate_command(module, argv)}`",
            "",
            f"Machine: {machine_text()}. {setup}",
            "",
            *body,
            "",
        ]
    )
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_bytes(text.encode(), out)
    print(f"wrote {out}")


def _stats(values: Sequence[float]) -> tuple[float, float]:
    finite = [v for v in values if not math.isnan(v)]
    if not finite:
        return float("nan"), float("nan")
    return float(np.mean(finite)), float(np.std(finite))


def summarise(rows: Iterable[Row]) -> list[dict[str, Any]]:
    """Mean ± std over seeds of the mean Dice, per (group, method, k), with mean fit time."""
    cells: dict[tuple[str, str, str, int], list[Row]] = defaultdict(list)
    for row in rows:
        cells[(row.set, row.group, row.method, row.k)].append(row)
    summary = []
    for (set_name, group, method, k), members in cells.items():
        mean, std = _stats([r.mean_dice for r in members])
        per_class = {
            name: _stats([r.dice.get(name, float("nan")) for r in members])[0]
            for name in members[0].dice
        }
        summary.append(
            {
                "set": set_name,
                "group": group,
                "method": method,
                "k": k,
                "seeds": len(members),
                "mean_dice": mean,
                "std_dice": std,
                "dice_per_class": per_class,
                "fit_seconds": float(np.mean([r.fit_seconds for r in members])),
            }
        )
    return summary


def _fmt(mean: float, std: float) -> str:
    return "–" if math.isnan(mean) else f"{mean:.3f} ± {std:.3f}"


def _table(entries: list[dict[str, Any]]) -> list[str]:
    ks = sorted({e["k"] for e in entries})
    methods = list(dict.fromkeys(e["method"] for e in entries))
    by = {(e["method"], e["k"]): e for e in entries}
    head = ["method", *(f"k = {k}" for k in ks), f"fit s (k = {'/'.join(map(str, ks))})"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for m in methods:
        cells = [
            _fmt(by[m, k]["mean_dice"], by[m, k]["std_dice"]) if (m, k) in by else "n/a" for k in ks
        ]
        times = " / ".join(f"{by[m, k]['fit_seconds']:.1f}" if (m, k) in by else "–" for k in ks)
        lines.append(f"| {m} | " + " | ".join(cells) + f" | {times} |")
    return lines


def _targets(entries: list[dict[str, Any]]) -> list[str]:
    """Issue 10's targets, checked on one table (slice propagation only): the product's default
    against random init and fill-between-slices, and the best self-supervised row's one-shot
    gain."""

    def value(method: str, k: int) -> float:
        found = [e["mean_dice"] for e in entries if e["method"] == method and e["k"] == k]
        return found[0] if found else float("nan")

    def best(accept: Any, k: int) -> tuple[str, float]:
        found = [(m, value(m, k)) for m in dict.fromkeys(e["method"] for e in entries)]
        found = [(m, d) for m, d in found if accept(m) and not math.isnan(d)]
        return max(found, key=lambda c: c[1]) if found else ("none", float("nan"))

    def verdict(ok: bool) -> str:
        return "met" if ok else "missed"

    out = []
    _, random1 = best(lambda m: m.startswith(RANDOM), 1)
    for k in (3, 5):
        default, (base, base_dice) = value(DEFAULT, k), best(lambda m: m in (FINETUNE, ITK), k)
        if not math.isnan(default) and not math.isnan(base_dice):
            gap = default - base_dice
            out.append(
                f"- k = {k}: default {default:.3f} vs better of random-init fine-tune and "
                f"fill-between-slices ({base}) {base_dice:.3f}: {gap:+.3f} "
                f"(target ≥ +0.05: {verdict(gap >= 0.05)})"
            )
    default1 = value(DEFAULT, 1)
    if not math.isnan(default1) and not math.isnan(random1):
        gap = default1 - random1
        out.append(
            f"- k = 1: default {default1:.3f} vs best random-init {random1:.3f}: {gap:+.3f} "
            f"(target ≥ +0.05: {verdict(gap >= 0.05)})"
        )
    ssl1, ssl1_dice = best(lambda m: not m.startswith((RANDOM, ITK, DEFAULT)), 1)
    if not math.isnan(ssl1_dice) and not math.isnan(random1):
        gap = ssl1_dice - random1
        out.append(
            f"- k = 1: best self-supervised row ({ssl1}) {ssl1_dice:.3f} vs best random-init "
            f"{random1:.3f}: {gap:+.3f} (target ≥ +0.15: {verdict(gap >= 0.15)})"
        )
    itk5 = value(ITK, 5)
    if not math.isnan(default1) and not math.isnan(itk5):
        out.append(
            f"- k = 1 default {default1:.3f} vs fill-between-slices at k = 5 {itk5:.3f} "
            f"(target: reach it: {verdict(default1 >= itk5)})"
        )
    default3 = value(DEFAULT, 3)
    if entries and entries[0]["set"] == ABDOMINAL_CT_SET and not math.isnan(default3):
        out.append(
            f"- abdominal CT, k = 3: default {default3:.3f} (target ≥ 0.75: "
            f"{verdict(default3 >= 0.75)})"
        )
    return out


def _atomic_text(path: Path, text: str) -> None:
    atomic_write_bytes(text.encode(), path)


def write_table(path: Path, text: str) -> None:
    """Write a benchmark's markdown ``text`` to ``path`` atomically (folders created) and say
    where."""
    path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_text(path, text)
    print(f"wrote {path}")


def _plot(summary: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = list(dict.fromkeys(e["group"] for e in summary))
    cols = min(3, len(groups))
    rows = math.ceil(len(groups) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.2 * rows), squeeze=False)
    for ax, group in zip(axes.flat, groups, strict=False):
        entries = [e for e in summary if e["group"] == group]
        for method in dict.fromkeys(e["method"] for e in entries):
            pts = sorted(
                (e["k"], e["mean_dice"], e["std_dice"]) for e in entries if e["method"] == method
            )
            ks, means, stds = zip(*pts, strict=True)
            style = "--" if method.startswith((RANDOM, ITK)) else "-"
            ax.errorbar(ks, means, yerr=stds, label=method, linestyle=style, marker="o", capsize=3)
        ax.set_title(group, fontsize=10)
        ax.set_xlabel("k labelled")
        ax.set_ylabel("mean Dice (unlabelled)")
        ax.set_ylim(0, 1)
        ax.set_xticks(sorted({e["k"] for e in entries}))
        ax.grid(alpha=0.3)
        ax.legend(fontsize=6)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def write_report(
    out_dir: Path,
    rows: list[Row],
    encoders: list[EncoderRecord],
    context: dict[str, Any],
    notes: list[str],
) -> dict[str, Path]:
    """Write ``fewshot.md``, ``fewshot.json`` and ``fewshot.png`` into ``out_dir`` (atomically).

    Args:
        out_dir: target folder (created).
        rows: every scored row.
        encoders: the pretrained encoders used.
        context: ``command``, ``profile``, ``machine``, ``wall_seconds``, ``selected`` (best
            objective per set) and anything else worth keeping in the JSON.
        notes: extra markdown bullet lines (choices and caveats of this run).

    Returns:
        The three paths by suffix.
    """
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = summarise(rows)
    paths = {s: out_dir / f"fewshot.{s}" for s in ("md", "json", "png")}
    payload = {
        **context,
        "encoders": [asdict(e) for e in encoders],
        "summary": summary,
        "rows": [asdict(r) for r in rows],
    }
    _atomic_text(paths["json"], json.dumps(payload, indent=1, default=str, allow_nan=True) + "\n")
    machine = context.get("machine", {})
    lines = [
        "# Few-shot segmentation benchmark",
        "",
        f"Regenerate: `{context.get('command', '')}`",
        "",
        f"Profile `{context.get('profile', {}).get('name', '?')}`; total wall time "
        f"{context.get('wall_seconds', 0) / 60:.1f} min on {machine.get('cpu', '?')} "
        f"({machine.get('logical_cores', '?')} logical cores, torch {machine.get('torch', '?')}, "
        f"{machine.get('memory_gb', '?')} GB RAM).",
        "",
        "Cells: mean Dice over classes on the *unlabelled* slices (slice propagation) or the "
        "held-out volumes (cross-volume), mean ± std over seeds. `fit s`: mean wall time of "
        "fitting one segmenter at each k (pretraining excluded; see the encoder table).",
        "",
    ]
    for group in dict.fromkeys(e["group"] for e in summary):
        entries = [e for e in summary if e["group"] == group]
        lines += [f"## {group}", "", *_table(entries), ""]
        if "slice propagation" in group:
            checks = _targets(entries)
            if checks:
                lines += ["Targets (issue 10):", "", *checks, ""]
    lines += [
        "## Pretrained encoders",
        "",
        "| encoder | data | volumes | slices | steps × batch | crop | channels | time s | slices/s | peak RSS MB | reused from cache |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for e in encoders:
        lines.append(
            f"| {e.name} | {e.data} | {e.volumes} | {e.slices} | {e.steps} × {e.batch_size} | "
            f"{e.image_size} | {'-'.join(map(str, e.channels))} | {e.seconds:.0f} | "
            f"{e.slices_per_second:.1f} | {e.peak_rss_mb:.0f} | {'yes' if e.cached else 'no'} |"
        )
    lines += ["", "## Notes", "", *notes, ""]
    _atomic_text(paths["md"], "\n".join(lines))
    _plot(summary, paths["png"])
    return paths
