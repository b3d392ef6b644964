"""``onemodel eval``: score a trained model on every task of a held-out split and write the report.

    onemodel eval --model runs/demo --data data/shapes --limit 200
    # -> runs/demo/eval/{results.json, metrics.md, report.html, examples_*.png, curves.png}
"""

from __future__ import annotations

import argparse
import logging
import time
from pathlib import Path

logger = logging.getLogger(__name__)

__all__ = ["add_arguments", "run"]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from training.evaluation.evaluate import TASKS

    parser.add_argument("--model", required=True, help="training run directory (or its model/ directory)")
    parser.add_argument("--data", required=True, help="dataset directory (with train/val/test) or a shard directory")
    parser.add_argument("--split", default="test", help="split sub-directory to score (default: test)")
    parser.add_argument(
        "--tasks", nargs="+", choices=TASKS, default=None, metavar="TASK",
        help=f"tasks to score, from {', '.join(TASKS)} (default: all the data and model support)",
    )  # fmt: skip
    parser.add_argument("--limit", type=int, default=None, help="score only the first N samples")
    parser.add_argument("--out", default=None, help="output directory (default: MODEL/eval)")
    parser.add_argument(
        "--metrics-log", default=None, help="metrics JSONL for the curves (default: MODEL/metrics.jsonl)"
    )
    parser.add_argument("--batch-size", type=int, default=16, help="samples per pipeline call")
    parser.add_argument("--examples", type=int, default=4, help="examples per task in the report")
    parser.add_argument("--steps", type=int, default=None, help="grid decoding steps (depth, semseg, text->image)")
    parser.add_argument("--guidance-scale", type=float, default=None, help="text->image guidance scale")
    parser.add_argument("--seed", type=int, default=0, help="text->image sampling seed")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")


def run(args: argparse.Namespace) -> int:
    import json

    from onemodel.pipeline import OneModelPipeline
    from training.evaluation.evaluate import evaluate
    from training.evaluation.report import metrics_markdown_table, write_report

    if args.limit is not None and args.limit < 1:
        raise ValueError(f"--limit must be >= 1, got {args.limit}")
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    start = time.perf_counter()
    model = Path(args.model)
    if not model.exists():
        raise FileNotFoundError(f"no model at {model}: train one with `onemodel train` (or run `onemodel demo`)")
    from training.evaluation.contrastive import is_contrastive_run

    if is_contrastive_run(model):  # a contrastive image-text encoder (onemodel train-clip): retrieval + zero-shot
        from training.evaluation.contrastive import evaluate_contrastive

        results, page = evaluate_contrastive(model, args.data, args.split, args.limit, args.out, args.metrics_log,
                                             progress=not args.no_progress)
        print(metrics_markdown_table(results))
        print(f"report:  {page}")
        print(f"evaluated in {time.perf_counter() - start:.1f} s")
        return 0
    out = Path(args.out) if args.out else model / "eval"
    from tokenizers_mm.io_atomic import check_output_dir

    check_output_dir(out, what="--out directory")  # before the (long) evaluation
    log = Path(args.metrics_log) if args.metrics_log else next(
        (p for p in (model / "metrics.jsonl", model.parent / "metrics.jsonl") if p.is_file()), None
    )
    sampling: dict[str, dict] = {}
    if args.steps is not None:
        for task in ("depth", "semseg", "text_to_image"):
            sampling.setdefault(task, {})["steps"] = args.steps
    if args.guidance_scale is not None:
        sampling.setdefault("text_to_image", {})["guidance_scale"] = args.guidance_scale
    sampling.setdefault("text_to_image", {})["seed"] = args.seed
    pipeline = OneModelPipeline.from_pretrained(model, device=args.device)
    ev = evaluate(
        pipeline,
        args.data,
        args.tasks,
        args.limit,
        split=args.split,
        num_examples=args.examples,
        batch_size=args.batch_size,
        sampling=sampling,
        progress=not args.no_progress,
    )
    page = write_report(out, ev.results, ev.examples, log, title=f"onemodel evaluation: {model}")
    print(metrics_markdown_table(ev.results))
    print(f"results: {out / 'results.json'}")
    print(f"report:  {page}")
    print(f"evaluated in {time.perf_counter() - start:.1f} s")
    logger.debug("results: %s", json.dumps(ev.results, default=str))
    return 0
