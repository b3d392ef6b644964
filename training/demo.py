"""``onemodel demo``: the whole path on the synthetic shapes data, in one command.

Stages (each cached: a finished stage is recorded in ``OUT/demo_state.json`` with the settings it ran with, and
skipped when the demo is run again with the same settings; changing a stage's settings re-runs it and
everything after it):

1. ``data``       shapes train/val/test shards (training.data.shapes.make_shapes_dataset)
2. ``tokenizers`` rgb, depth and semseg VQ tokenizers + the text tokenizer -> ``OUT/tokenizers`` (a bundle)
3. ``tokenize``   pre-tokenized token shards -> ``OUT/tokens``
4. ``train``      one model on all tasks (configs/demo.yaml) -> ``OUT/run`` (checkpoints, model/, metrics.jsonl);
                  an interrupted training resumes from its last checkpoint
5. ``eval``       every task scored on the held-out test split -> ``OUT/eval/results.json`` + ``metrics.md``,
                  and the report: HTML page + PNG grids + training curves -> ``OUT/report/report.html``

``--quick`` runs the same stages at toy size (about a minute) into a separate directory; the test suite uses it.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

STAGES = ("data", "tokenizers", "tokenize", "train", "eval")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"


@dataclass
class DemoSettings:
    """Sizes of one demo run (``full`` and ``quick`` presets below)."""

    resolution: int = 64
    num_train: int = 4000
    num_val: int = 200
    num_test: int = 200
    grid_size: int = 8  # tokens per side of the image tokenizers (8 or 16 for 64x64 images)
    # per tokenizer dotted overrides of the recommended config, e.g. {"rgb": {"training.steps": 40}}
    tokenizer_training: dict[str, dict[str, Any]] = field(default_factory=dict)
    text_vocab_size: int = 512
    train_config: str = str(CONFIG_DIR / "demo.yaml")
    train_overrides: list[str] = field(default_factory=list)
    eval_limit: int = 200
    eval_batch_size: int = 50
    seed: int = 0


PRESETS: dict[str, DemoSettings] = {
    "full": DemoSettings(),
    "quick": DemoSettings(
        num_train=160, num_val=16, num_test=16,
        tokenizer_training={m: {"training.steps": 15, "training.batch_size": 4, "training.max_val_samples": 16,
                                "tokenizer.base_channels": 8, "tokenizer.codebook_size": 128}
                            for m in ("rgb", "depth", "semseg")},
        text_vocab_size=256,
        train_overrides=[
            "optim.max_steps=30", "optim.warmup_steps=5", "optim.batch_size=16",
            "checkpoint.every=15", "logging.eval_every=15", "logging.eval_batches=1", "logging.log_every=5",
            "model.dim=64", "model.num_heads=2", "model.encoder_depth=2", "model.decoder_depth=2",
        ],
        eval_limit=6, eval_batch_size=6,
    ),
}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


class StageState:
    """Which stages finished, with which settings; written atomically after every stage."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.data: dict[str, Any] = json.loads(path.read_text()) if path.is_file() else {}

    def done(self, stage: str, key: str) -> bool:
        entry = self.data.get(stage)
        return bool(entry and entry.get("key") == key and entry.get("done"))

    def record(self, stage: str, key: str, seconds: float, info: dict[str, Any] | None = None) -> None:
        self.data[stage] = {"key": key, "done": True, "seconds": round(seconds, 1), "info": info or {}}
        tmp = self.path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.data, indent=2, default=str) + "\n")
        os.replace(tmp, self.path)


def _tokenizer_configs(settings: DemoSettings, data_dir: Path) -> dict[str, Any]:
    """The VQ tokenizer training configs of the demo: the recommended ones for ``settings.grid_size``."""
    from training.tokenizer_training import load_vq_training_config

    out = {}
    for modality in ("rgb", "depth", "semseg"):
        overrides = [f"{k}={v}" for k, v in settings.tokenizer_training.get(modality, {}).items()]
        out[modality] = load_vq_training_config(modality, overrides=overrides, data_dir=data_dir,
                                                grid_size=settings.grid_size)
    return out


def run_demo(out_dir: str | Path, preset: str = "full", force: bool = False, progress: bool = True,
             stop_after: str | None = None, train_overrides: list[str] | tuple[str, ...] = ()) -> dict[str, Any]:
    """Run (or resume) the demo into ``out_dir``; returns ``{"stages": {name: seconds}, "results": {...},
    "report": path}``. ``force`` re-runs every stage; ``stop_after`` ends after the named stage;
    ``train_overrides``: extra dotted overrides of the training config (``optim.max_steps=100``)."""
    import dataclasses

    if preset not in PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; choose one of {sorted(PRESETS)}")
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {STAGES}, got {stop_after!r}")
    settings = PRESETS[preset]
    if train_overrides:
        settings = dataclasses.replace(settings, train_overrides=[*settings.train_overrides, *train_overrides])
        from training.config import load_train_config

        load_train_config(settings.train_config, list(settings.train_overrides))  # bad overrides fail now, not in stage 4
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = StageState(out / "demo_state.json")
    paths = {
        "data": out / "data", "tokenizers": out / "tokenizers", "tokens": out / "tokens", "run": out / "run",
        "eval": out / "eval", "report": out / "report",
    }
    # each stage's key covers its own settings and the keys of the stages before it
    keys: dict[str, str] = {}
    from training.data.shapes import GENERATOR_VERSION
    from training.tokenizer_training import RECOMMENDED

    recommended = {m: RECOMMENDED.get((m, settings.grid_size)) for m in ("rgb", "depth", "semseg")}
    stage_settings = {
        "data": [settings.resolution, settings.num_train, settings.num_val, settings.num_test, GENERATOR_VERSION],
        "tokenizers": [settings.grid_size, settings.tokenizer_training, settings.text_vocab_size, settings.seed,
                       recommended],
        "tokenize": [],
        "train": [Path(settings.train_config).read_text(), settings.train_overrides],
        "eval": [settings.eval_limit, settings.eval_batch_size, settings.seed],
    }
    previous = ""
    for stage in STAGES:
        keys[stage] = previous = _digest([previous, stage_settings[stage]])

    runners: dict[str, Callable[[], dict[str, Any]]] = {
        "data": lambda: _stage_data(settings, paths, progress),
        "tokenizers": lambda: _stage_tokenizers(settings, paths, progress),
        "tokenize": lambda: _stage_tokenize(paths, progress),
        "train": lambda: _stage_train(settings, paths, keys["train"], progress),
        "eval": lambda: _stage_eval(settings, paths, progress),
    }
    timings: dict[str, float] = {}
    for number, stage in enumerate(STAGES, 1):
        if not force and state.done(stage, keys[stage]):
            logger.info("stage %d/%d %-10s cached (%s)", number, len(STAGES), stage, state.data[stage]["seconds"])
            timings[stage] = 0.0
        else:
            logger.info("stage %d/%d %-10s running ...", number, len(STAGES), stage)
            start = time.perf_counter()
            info = runners[stage]()
            seconds = time.perf_counter() - start
            state.record(stage, keys[stage], seconds, info)
            timings[stage] = seconds
            logger.info("stage %d/%d %-10s done in %.1f s", number, len(STAGES), stage, seconds)
        if stage == stop_after:
            break
    results_path = paths["eval"] / "results.json"
    results = json.loads(results_path.read_text()) if results_path.is_file() else {}
    return {"stages": timings, "results": results, "report": str(paths["report"] / "report.html"),
            "out_dir": str(out), "state": state.data}


# ------------------------------------------------------------------------------------------------ stages


def _stage_data(settings: DemoSettings, paths: dict[str, Path], progress: bool) -> dict[str, Any]:
    from training.data.shapes import make_shapes_dataset

    meta = make_shapes_dataset(paths["data"], settings.num_train, settings.num_val, settings.num_test,
                               resolution=settings.resolution, progress=progress)
    return {"splits": meta.get("splits"), "seconds": meta.get("seconds")}


def _stage_tokenizers(settings: DemoSettings, paths: dict[str, Path], progress: bool) -> dict[str, Any]:
    import torch

    # these small conv nets train 3-17x faster on 1 thread than on 2 when anything else uses the CPU
    # (measured, docs: Tokenizers / Threads); the model stage sets its own threads from the train config
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _train_bundle(settings, paths, progress)
    finally:
        torch.set_num_threads(previous_threads)


def _one_torch_thread() -> None:
    """Worker initializer of ``_train_bundle``: each tokenizer worker uses one torch thread."""
    import torch

    torch.set_num_threads(1)


def _train_one_tokenizer(modality: str, cfg: Any, data: str, out: str, seed: int, progress: bool) -> dict[str, Any]:
    """Train one VQ tokenizer (in a worker process of ``_train_bundle``, or in-process on one core)."""
    from training.tokenizer_training import train_vq_tokenizer

    opts = cfg.training
    result = train_vq_tokenizer(
        cfg.tokenizer, data, data, out, steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr, seed=seed,
        progress=progress, bf16=opts.bf16, max_train_samples=opts.max_train_samples,
        max_val_samples=opts.max_val_samples,
    )
    return {k: v for k, v in result.items() if k != "tokenizer"}


def _train_bundle(settings: DemoSettings, paths: dict[str, Path], progress: bool) -> dict[str, Any]:
    """The three VQ tokenizers (+ the text one). With 2+ cores they train in two worker processes of one thread
    each: rgb (the longest) in one, depth and semseg in the other; same results as one after the other (each is
    seeded on its own), about half the wall time."""
    import multiprocessing
    import shutil
    from concurrent.futures import ProcessPoolExecutor

    from training.tokenizer_training import train_text_tokenizer

    bundle = paths["tokenizers"]
    if bundle.exists():
        shutil.rmtree(bundle)
    configs = _tokenizer_configs(settings, paths["data"])
    data = str(paths["data"])
    jobs = {m: (m, cfg, data, str(bundle / m), settings.seed) for m, cfg in configs.items()}
    info: dict[str, Any] = {}
    if (os.cpu_count() or 1) >= 2:
        # spawn: a fresh interpreter per worker (no forked torch thread pools); rgb (submitted first: configs
        # are in rgb, depth, semseg order) shows the progress bar
        with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_one_torch_thread) as pool:
            futures = {m: pool.submit(_train_one_tokenizer, *jobs[m], progress and m == "rgb") for m in configs}
            for m, future in futures.items():
                info[m] = future.result()
                logger.info("%s tokenizer: %s", m, info[m].get("val"))
    else:
        for m in configs:
            info[m] = _train_one_tokenizer(*jobs[m], progress)
    train_text_tokenizer(paths["data"], bundle / "text", vocab_size=settings.text_vocab_size)
    return info


def _stage_tokenize(paths: dict[str, Path], progress: bool) -> dict[str, Any]:
    from training.pretokenize import pretokenize

    result = pretokenize(paths["data"], paths["tokenizers"], paths["tokens"], progress=progress, overwrite=True)
    return {k: result[k] for k in ("splits", "num_samples", "seconds") if k in result}


def _stage_train(settings: DemoSettings, paths: dict[str, Path], key: str, progress: bool = True) -> dict[str, Any]:
    import shutil

    from training.config import load_train_config
    from training.train import train

    # checkpoints of a run with other settings (or on other tokens) must not be resumed: start that run afresh
    marker = paths["run"] / "demo_train_key.txt"
    if paths["run"].exists() and (not marker.is_file() or marker.read_text().strip() != key):
        shutil.rmtree(paths["run"])
    paths["run"].mkdir(parents=True, exist_ok=True)
    marker.write_text(key + "\n")

    overrides = [
        f"tokenizers={paths['tokenizers']}",
        f"data.sources=[{{path: '{paths['tokens']}'}}]",
        f"checkpoint.out_dir={paths['run']}",
        f"logging.heldout_data={paths['data']}",  # learning curves (logging.heldout_every) on this demo's val split
        f"seed={settings.seed}",
        *settings.train_overrides,
        *([] if progress else ["logging.progress_bar=false"]),
    ]
    config = load_train_config(settings.train_config, overrides)
    # resume=True continues an interrupted run from its last complete checkpoint (fresh start when none)
    summary = train(config, resume=True)
    return {k: summary.get(k) for k in ("start_step", "final_step", "steps", "tokens", "wall_time_s", "tokens_per_s",
                                        "train_loss", "val")}


def _stage_eval(settings: DemoSettings, paths: dict[str, Path], progress: bool) -> dict[str, Any]:
    from onemodel.pipeline import OneModelPipeline
    from training.evaluation.evaluate import evaluate
    from training.evaluation.report import metrics_markdown_table, write_report

    pipeline = OneModelPipeline.from_pretrained(paths["run"])
    evaluation = evaluate(pipeline, paths["data"], limit=settings.eval_limit, batch_size=settings.eval_batch_size,
                          progress=progress)
    out = paths["eval"]
    out.mkdir(parents=True, exist_ok=True)
    (out / "results.json").write_text(json.dumps(evaluation.results, indent=2, default=float) + "\n")
    (out / "metrics.md").write_text(metrics_markdown_table(evaluation.results) + "\n")
    log = paths["run"] / "metrics.jsonl"
    report = write_report(paths["report"], evaluation.results, evaluation.examples, log if log.is_file() else None,
                          title="onemodel demo: one model, every task (synthetic shapes)")
    return {"tasks": sorted(evaluation.results), "report": str(report)}




# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None, help="output directory (default: runs/demo, or runs/demo_quick with --quick)")
    parser.add_argument("--quick", action="store_true", help="toy-size smoke run of every stage (about a minute)")
    parser.add_argument("--force", action="store_true", help="re-run every stage instead of reusing finished ones")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides of the training config, e.g. optim.max_steps=200")


def run(args: argparse.Namespace) -> int:
    preset = "quick" if args.quick else "full"
    out = Path(args.out or ("runs/demo_quick" if args.quick else "runs/demo"))
    start = time.perf_counter()
    summary = run_demo(out, preset=preset, force=args.force, progress=not args.no_progress,
                       train_overrides=args.overrides)
    total = time.perf_counter() - start
    print("\nstage        seconds")
    for stage, seconds in summary["stages"].items():
        print(f"{stage:<12} {seconds:>7.1f}" + ("  (cached)" if seconds == 0.0 else ""))
    print(f"{'total':<12} {total:>7.1f}")
    metrics_md = out / "eval" / "metrics.md"
    if metrics_md.is_file():
        print("\n" + metrics_md.read_text())
    print(f"report: {summary['report']}")
    return 0
