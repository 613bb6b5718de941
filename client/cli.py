"""The ``segassist`` console script: a thin argparse layer around plain functions.

Sub-commands: ``serve``, ``worker`` (start the service), ``segment`` (upload → pretrain or reuse →
few-shot fit → predict → download), ``pretrain``, ``jobs``, ``models``, ``demo``, ``bench``,
``users`` and ``audit`` (:mod:`segassist.client.admin`).
Server-side code (``worker``, ``bench``, ``models``) is imported lazily, only by the sub-commands that
need it, so the client runs with the base install.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import httpx
from rich.console import Console
from rich.logging import RichHandler
from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    SpinnerColumn,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)
from rich.table import Table

from segassist.client.admin import add_admin_parsers
from segassist.client.api import JobFailedError, SegAssistAPIError, SegAssistClient, job_status
from segassist.client.local import (
    DEFAULT_HOST,
    DEFAULT_PORT,
    ServiceStartError,
    default_data_dir,
    ensure_local_service,
)
from segassist.client.segment import (
    METHODS,
    OBJECTIVES,
    SegmentRequest,
    refinement_text,
    run_segment,
)

__all__ = ["build_parser", "main", "make_progress"]

console = Console()
err_console = Console(stderr=True)


def make_progress() -> Progress:
    """The progress bar shown while jobs run (on stderr, so stdout stays parseable)."""
    return Progress(
        SpinnerColumn(),
        TextColumn("[progress.description]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        console=err_console,
    )


def _json_arg(text: str) -> dict[str, Any]:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise argparse.ArgumentTypeError(f"not JSON: {exc}") from exc
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError("expected a JSON object")
    return value


def _names_arg(text: str) -> dict[int, str]:
    """``"1=L1,2=L2"`` or ``"liver,spleen"`` (classes 1, 2, …) → ``{1: "liver", …}``."""
    names: dict[int, str] = {}
    for i, part in enumerate(p for p in text.split(",") if p.strip()):
        key, sep, name = part.partition("=")
        if sep:
            names[int(key)] = name.strip()
        else:
            names[i + 1] = part.strip()
    return names


def _server_url(args: argparse.Namespace, start: bool) -> str:
    """``--server`` if given; else the local embedded service, started when ``start``."""
    if args.server:
        return str(args.server)
    if not start:
        return os.environ.get("SEGASSIST_SERVER", f"http://{DEFAULT_HOST}:{DEFAULT_PORT}")
    url, started = ensure_local_service(data_dir=args.data_dir)
    if started:
        err_console.print(f"started the local segassist service at {url} (data: {args.data_dir})")
    return url


_EXTRA_OF_MODULE = {
    **dict.fromkeys(
        ("fastapi", "uvicorn", "sqlalchemy", "alembic", "celery", "onnxruntime", "matplotlib"),
        "server,worker",
    ),
    **dict.fromkeys(("torch", "monai", "sklearn", "onnx"), "server,worker"),
    **dict.fromkeys(("psutil", "itk"), "bench"),
}
"""Modules of the extras (a client-only install has none): the extra that brings each."""


# -- sub-commands --------------------------------------------------------------------------------
def cmd_serve(args: argparse.Namespace) -> int:
    """Run the API and one embedded Celery worker in the foreground."""
    from segassist.worker.serve import run_embedded

    run_embedded(args.host, args.port, Path(args.data_dir))
    return 0


def cmd_worker(args: argparse.Namespace) -> int:
    """Run a Celery worker alone (deployment with Redis and PostgreSQL)."""
    from segassist.worker.serve import WORKER_QUEUES, run_worker

    run_worker(args.concurrency, queues=WORKER_QUEUES[args.queue])
    return 0


def cmd_segment(args: argparse.Namespace) -> int:
    """Upload the image and its sparse labels, run the server's assist workflow, download."""
    for path in (args.image, args.labels):
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such file")
    request = SegmentRequest(
        image=args.image,
        labels=args.labels,
        output=args.output,
        objective=args.objective,
        method=args.method,
        head=args.head,
        encoder_id=args.encoder,
        clusters=args.clusters,
        modality=args.modality,
        axis=args.axis,
        fit_config=args.fit_config or {},
        label_names=args.label_names or {},
        wait_for_refinement=not args.no_refinement_wait,
    )
    url = _server_url(args, start=True)
    with SegAssistClient(url) as api, make_progress() as progress:
        result = run_segment(api, request, progress)
    console.print(f"segmentation written to [bold]{result.output}[/bold]")
    if result.clusters is not None:
        console.print(f"cluster map written to [bold]{result.clusters}[/bold]")
    if result.clusters_png is not None:
        console.print(f"cluster montage written to [bold]{result.clusters_png}[/bold]")
    console.print(
        f"dataset {result.dataset_id} · image {result.image_id} · "
        f"encoder {result.encoder_id or 'none (random initialisation)'} · "
        f"segmenter {result.segmenter_id}"
    )
    if result.method is not None:
        console.print(f"method: {result.method}{_validation_text(result.validation)}")
    if corrections := _own_labels_text(result.own_labels):
        console.print(f"from your labelled slices: {corrections}")
    if result.refinement is not None:
        console.print(f"refinement: {refinement_text(result.refinement)}")
    if result.next_slice is not None:
        console.print(f"least certain unlabelled slice: {result.next_slice} (label it next)")
    return 0


def _own_labels_text(own_labels: dict[str, Any]) -> str:
    """``propagated (0.9 s), prior ×1.0, 8 stray objects removed`` or nothing: what the image's
    labelled slices changed in its prediction (the job result's entries of the image)."""
    parts = []
    if (own_labels.get("propagation") or {}).get("applied"):
        parts.append(f"propagated ({own_labels['propagation']['seconds']:.1f} s)")
    if (own_labels.get("slice_prior") or {}).get("applied"):
        parts.append(f"prior ×{own_labels['slice_prior']['scale']}")
    removed = sum(((own_labels.get("components") or {}).get("removed_objects") or {}).values())
    if removed:
        parts.append(f"{removed} stray object{'s' if removed != 1 else ''} removed")
    return ", ".join(parts)


def _validation_text(validation: dict[str, Any] | None) -> str:
    """`` (held-out Dice: probe-linear 0.610, finetune skipped, …)`` or nothing: the ``auto``
    record (candidate → ``{"dice", …}`` or ``{"skipped"}``) or head ``auto``'s (head → Dice)."""
    if not validation:
        return ""
    parts = []
    for candidate, entry in validation.items():
        if isinstance(entry, dict) and "skipped" in entry:
            parts.append(f"{candidate} skipped")
            continue
        score = entry.get("dice") if isinstance(entry, dict) else entry
        parts.append(f"{candidate} {'—' if score is None else f'{score:.3f}'}")
    return f" (held-out Dice: {', '.join(parts)})"


def cmd_pretrain(args: argparse.Namespace) -> int:
    """Pretrain an encoder on a dataset (existing, or made from uploaded images)."""
    url = _server_url(args, start=True)
    with SegAssistClient(url) as api, make_progress() as progress:
        dataset_id = args.dataset
        if dataset_id is None:
            if not args.images:
                raise ValueError("give IMAGE files to upload or --dataset ID")
            dataset = api.create_dataset(args.name, args.modality, {1: "foreground"})
            dataset_id = dataset["id"]
            upload = progress.add_task("upload", total=len(args.images))
            for image in args.images:
                api.upload_image(dataset_id, image)
                progress.advance(upload)
        params: dict[str, Any] = {"objective": args.objective}
        if args.steps is not None:
            params["steps"] = args.steps
        if args.config:
            params["config"] = args.config
        job = api.create_job("pretrain", dataset_id, params)
        task = progress.add_task(f"pretrain {args.objective}", total=None)

        def show(job: dict[str, Any]) -> None:
            info = job.get("progress") or {}
            if info.get("total"):
                progress.update(task, completed=info.get("step") or 0, total=info["total"])

        done = api.wait_for_job(job["id"], show)
    console.print(f"encoder [bold]{done['result']['encoder_id']}[/bold] (dataset {dataset_id})")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    """List jobs, or show one job's logs, or cancel one."""
    with SegAssistClient(_server_url(args, start=False)) as api:
        if args.logs:
            console.print(api.job_logs(args.logs), markup=False, highlight=False, end="")
            return 0
        if args.cancel:
            job = api.cancel_job(args.cancel)
            console.print(f"job {job['id']}: {job_status(job)}")
            return 0
        jobs = api.list_jobs(dataset_id=args.dataset, status=args.status)
    if args.json:
        console.print_json(data=jobs)
        return 0
    table = Table("id", "kind", "status", "progress", "dataset", "created", "error")
    for job in jobs:
        info = job.get("progress") or {}
        done = f"{info.get('step', 0)}/{info['total']}" if info.get("total") else ""
        table.add_row(
            str(job.get("id")),
            str(job.get("kind")),
            job_status(job),
            done,
            str(job.get("dataset_id", "")),
            str(job.get("created_at", "")),
            str(job.get("error") or ""),
        )
    console.print(table)
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """List the model registry."""
    with SegAssistClient(_server_url(args, start=False)) as api:
        models = api.list_models(kind=args.kind, dataset_id=args.dataset, modality=args.modality)
    if args.json:
        console.print_json(data=models)
        return 0
    table = Table("id", "kind", "modality", "dataset", "lineage", "metrics")
    for model in models:
        table.add_row(
            str(model.get("id")),
            str(model.get("kind")),
            str(model.get("modality", "")),
            str(model.get("dataset_id", "")),
            json.dumps(model.get("lineage") or {}, sort_keys=True),
            json.dumps(model.get("metrics") or {}, sort_keys=True),
        )
    console.print(table)
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    """Segment a real CT from three labelled slices and print the Dice."""
    from segassist.client.demo import run_demo

    data_dir = Path(args.data_dir)
    out_dir = Path(args.out_dir) if args.out_dir else data_dir / "demo"
    return run_demo(
        data_dir=data_dir, out_dir=out_dir, steps=args.steps, console=console, server=args.server
    )


def cmd_bench(args: argparse.Namespace) -> int:
    """Run a benchmark (``fewshot``, ``service`` or ``robustness``) with its own arguments."""
    if args.suite == "fewshot":
        from segassist.bench.fewshot import main as bench_main
    elif args.suite == "robustness":
        from segassist.bench.robustness import main as bench_main
    else:
        from segassist.bench.service import main as bench_main
    return int(bench_main(list(args.bench_args)) or 0)


# -- parser --------------------------------------------------------------------------------------
def _add_server(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--server",
        default=os.environ.get("SEGASSIST_SERVER"),
        help="server root URL (default: the local embedded service at "
        f"http://{DEFAULT_HOST}:{DEFAULT_PORT}, started if needed; env SEGASSIST_SERVER)",
    )
    p.add_argument(
        "--data-dir",
        type=Path,
        default=default_data_dir(),
        help="data directory of a local service started by this command",
    )


def build_parser() -> argparse.ArgumentParser:
    """The ``segassist`` argument parser."""
    parser = argparse.ArgumentParser(
        prog="segassist",
        description="Self-hosted annotation assistant: self-supervised pretraining and "
        "few-shot segmentation of medical volumes.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("serve", help="run the API and one embedded worker (SQLite, file broker)")
    p.add_argument("--host", default=DEFAULT_HOST)
    p.add_argument("--port", type=int, default=DEFAULT_PORT)
    p.add_argument("--data-dir", type=Path, default=default_data_dir())
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser("worker", help="run a Celery worker alone (settings from SEGASSIST_*)")
    p.add_argument(
        "--queue",
        choices=("all", "training", "prediction", "refinement"),
        default="all",
        help="training: pretraining, fine-tuning; prediction: predictions and the assists that "
        "fit a head; refinement: assists' background refinements; all (default): every queue, "
        "taking turns",
    )
    p.add_argument("--concurrency", type=int, default=1, help="tasks run at once")
    p.set_defaults(func=cmd_worker)

    p = sub.add_parser("segment", help="segment IMAGE from a few labelled slices")
    p.add_argument("image", type=Path, metavar="IMAGE", help=".nii, .nii.gz or DICOM .zip")
    p.add_argument("--labels", type=Path, required=True, metavar="SPARSE", help="255 = unannotated")
    p.add_argument("-o", "--output", type=Path, required=True, metavar="OUT")
    p.add_argument(
        "--objective",
        choices=OBJECTIVES,
        help="only reuse or pretrain an encoder of this objective (none: random init)",
    )
    p.add_argument(
        "--method",
        choices=METHODS,
        default="linear",
        help="auto: the best of the probe heads (and, within config auto_budget_seconds, "
        "fine-tuning and scratch) on a held-out labelled slice (tiles of it when only one)",
    )
    p.add_argument(
        "--head",
        choices=("linear", "mlp", "auto"),
        help="probe head (default: the server's, linear); mlp: better, ~6 s per fit on 2 cores; "
        "auto: the better of the two on held-out tiles",
    )
    p.add_argument("--encoder", metavar="ID", help="use this registered encoder")
    p.add_argument("--clusters", type=Path, metavar="CLUSTERS.nii.gz", help="also write clusters")
    p.add_argument("--modality", default="CT")
    p.add_argument(
        "--axis", type=int, choices=(0, 1, 2), help="slice axis (default: the labels' own)"
    )
    p.add_argument("--label-names", type=_names_arg, help='e.g. "1=L1,2=L2" or "liver,spleen"')
    p.add_argument("--fit-config", type=_json_arg, metavar="JSON")
    p.add_argument(
        "--no-refinement-wait",
        action="store_true",
        help="write the assist's segmentation without waiting for the background refinement "
        "(a network from scratch, tens of seconds; it still runs; "
        "--fit-config '{\"refine\": false}' turns it off)",
    )
    _add_server(p)
    p.set_defaults(func=cmd_segment)

    p = sub.add_parser("pretrain", help="pretrain an encoder on images or a dataset")
    p.add_argument("images", type=Path, nargs="*", metavar="IMAGE")
    p.add_argument("--dataset", metavar="ID", help="pretrain on this dataset's images")
    p.add_argument("--name", default="pretraining", help="name of the dataset created")
    p.add_argument("--objective", choices=OBJECTIVES[1:], default="pix2rep")
    p.add_argument("--modality", default="CT")
    p.add_argument("--steps", type=int)
    p.add_argument("--config", type=_json_arg, metavar="JSON")
    _add_server(p)
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("jobs", help="list jobs, show logs, cancel")
    p.add_argument("--dataset", metavar="ID")
    p.add_argument("--status")
    p.add_argument("--logs", metavar="JOB_ID", help="print a job's log")
    p.add_argument("--cancel", metavar="JOB_ID", help="cancel a job")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_server(p)
    p.set_defaults(func=cmd_jobs)

    p = sub.add_parser("models", help="list registered encoders and segmenters")
    p.add_argument("--kind", choices=("encoder", "segmenter"))
    p.add_argument("--dataset", metavar="ID")
    p.add_argument("--modality")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")
    _add_server(p)
    p.set_defaults(func=cmd_models)

    p = sub.add_parser("demo", help="segment a real spine CT from 3 labelled slices")
    p.add_argument("--data-dir", default=str(default_data_dir()), help="local service's data")
    p.add_argument("--out-dir", help="where outputs are written (default: DATA_DIR/demo)")
    p.add_argument("--steps", type=int, default=None, help="pretraining steps")
    p.add_argument("--server", help="use this server instead of the local embedded one")
    p.set_defaults(func=cmd_demo)

    p = sub.add_parser(
        "bench", help="benchmarks: fewshot, service or robustness (arguments passed on)"
    )
    p.add_argument("suite", choices=("fewshot", "service", "robustness"))
    p.add_argument("bench_args", nargs=argparse.REMAINDER)
    p.set_defaults(func=cmd_bench)

    add_admin_parsers(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``segassist`` console script; returns the exit code."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(message)s",
        handlers=[RichHandler(console=err_console, show_path=False)],
    )
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        return int(args.func(args))
    except SegAssistAPIError as exc:
        err_console.print(f"[red]error:[/red] the server refused: {exc.detail}", highlight=False)
        return 1
    except JobFailedError as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 1
    except (httpx.TransportError, ServiceStartError) as exc:
        err_console.print(f"[red]error:[/red] cannot reach the server: {exc}", highlight=False)
        return 2
    except (FileNotFoundError, ValueError) as exc:
        err_console.print(f"[red]error:[/red] {exc}", highlight=False)
        return 2
    except ModuleNotFoundError as exc:
        extra = _EXTRA_OF_MODULE.get((exc.name or "").split(".")[0])
        if extra is None:
            raise
        err_console.print(
            f"[red]error:[/red] this command needs {exc.name!r}, which a client-only install "
            f"lacks: pip install 'segassist[{extra}]'",
            highlight=False,
        )
        return 2
    except KeyboardInterrupt:
        err_console.print("interrupted")
        return 130


if __name__ == "__main__":
    sys.exit(main())
