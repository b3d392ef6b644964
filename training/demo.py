"""``onemodel demo``: the whole path on the synthetic shapes data, in one command: ``onemodel fit``
(``training.fit``, the one orchestrator) on generated shapes data with the recipe of ``configs/demo.yaml``.

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
import dataclasses
import logging
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from training.fit import CLIP_CONFIG

logger = logging.getLogger(__name__)

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
    clip_config: str | None = None  # a train-clip config: the "clip" stage trains it, the model reads rgb through it
    clip_overrides: list[str] = field(default_factory=list)

    def fit_settings(self) -> Any:
        """The ``fit`` settings of this demo: the demo's sizes, no small-data recipe (4000 images)."""
        from training.fit import FitSettings

        return FitSettings(
            resolution=self.resolution, grid_size=self.grid_size, tokenizer_training=self.tokenizer_training,
            text_vocab_size=self.text_vocab_size, depth_range=[0.5, 20.0], train_config=self.train_config,
            train_overrides=list(self.train_overrides), small_data=False, augment_copies=0,
            eval_limit=self.eval_limit, eval_batch_size=self.eval_batch_size, seed=self.seed,
            clip_config=self.clip_config, clip_overrides=list(self.clip_overrides),
        )


# ``long``: the same data; an rgb tokenizer with a 15360-code FSQ (levels 8,8,8,6,5) instead of the 1024-code VQ,
# trained 4x longer (PSNR 29.7 dB against 24.8, text->image round-trip ceiling 0.91 against 0.56: docs/recipe.md
# "Ceilings"; ~6 min on one core); the clip stage (beside the tokenizers); then 4x the steps (3600) with held-out
# curves of every task every 600 steps, for the targets the 10-minute default does not reach.
LONG_TOKENIZERS: dict[str, dict[str, Any]] = {
    "rgb": {"tokenizer.quantizer": "fsq", "tokenizer.fsq_levels": [8, 8, 8, 6, 5], "training.steps": 6000}}
LONG_TRAIN = ["optim.max_steps=3600", "optim.warmup_steps=100", "logging.heldout_every=600", "checkpoint.every=600",
              "logging.heldout_tasks=[vqa, caption, depth, semseg, detection, text_to_image]"]
PRESETS: dict[str, DemoSettings] = {
    "full": DemoSettings(),
    "quick": DemoSettings(num_train=160, num_val=16, num_test=16, text_vocab_size=256),
    # + the clip stage: a contrastive encoder on the captions (configs/clip_shapes.yaml, ~4 min on 2 threads), read
    # by the one model as pixels + frozen CLIP features (pixels_and_clip)
    "long": DemoSettings(tokenizer_training=LONG_TOKENIZERS, train_overrides=list(LONG_TRAIN), clip_config=CLIP_CONFIG,
                         clip_overrides=["num_threads=2"]),
}
DEFAULT_OUT = {"full": "runs/demo", "quick": "runs/demo_quick", "long": "runs/demo_long"}


def _quick_preset() -> DemoSettings:
    from training.fit import QUICK_CLIP, QUICK_TOKENIZERS, QUICK_TRAIN

    return dataclasses.replace(PRESETS["quick"], tokenizer_training=QUICK_TOKENIZERS, train_overrides=QUICK_TRAIN,
                               eval_limit=6, eval_batch_size=6, clip_overrides=QUICK_CLIP)


def run_demo(out_dir: str | Path, preset: str = "full", force: bool = False, progress: bool = True,
             stop_after: str | None = None, train_overrides: list[str] | tuple[str, ...] = (),
             clip: bool = False) -> dict[str, Any]:
    """Run (or resume) the demo into ``out_dir``; returns ``{"stages": {name: seconds}, "results": {...},
    "report": path}``. ``force`` re-runs every stage; ``stop_after`` ends after the named stage;
    ``train_overrides``: extra dotted overrides of the training config (``optim.max_steps=100``); ``clip``: train
    the contrastive encoder first (``CLIP_CONFIG``) and feed the one model its features (the long preset does)."""
    from training.data.shapes import GENERATOR_VERSION
    from training.fit import run_fit

    if preset not in PRESETS:
        raise ValueError(f"unknown demo preset {preset!r}; choose one of {sorted(PRESETS)}")
    settings = _quick_preset() if preset == "quick" else PRESETS[preset]
    if clip and not settings.clip_config:
        settings = dataclasses.replace(settings, clip_config=CLIP_CONFIG)

    def make_data(out: Path) -> dict[str, Any]:
        from training.data.shapes import make_shapes_dataset

        meta = make_shapes_dataset(out, settings.num_train, settings.num_val, settings.num_test,
                                   resolution=settings.resolution, progress=progress)
        return {"splits": meta.get("splits"), "seconds": meta.get("seconds")}

    data_key = [settings.resolution, settings.num_train, settings.num_val, settings.num_test, GENERATOR_VERSION]
    return run_fit(None, out_dir, settings.fit_settings(), force=force, progress=progress, stop_after=stop_after,
                   extra_overrides=train_overrides, make_data=make_data, data_key=data_key,
                   state_name="demo_state.json", title="onemodel demo: one model, every task (synthetic shapes)")


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", default=None,
                        help="output directory (default: runs/demo, runs/demo_quick with --quick, runs/demo_long with "
                             "--preset long)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="full",
                        help="full: the default 10-minute demo; long: a finer (FSQ) rgb tokenizer and a contrastive encoder "
                             "(the clip stage), then 4x the steps reading its features (about 43 minutes idle); quick: "
                             "toy size (about a minute)")
    parser.add_argument("--quick", action="store_true", help="the same as --preset quick")
    parser.add_argument("--clip", action="store_true",
                        help="first train a contrastive image-text encoder (configs/clip_shapes.yaml) and feed the one "
                             "model its frozen features (the long preset always does)")
    parser.add_argument("--force", action="store_true", help="re-run every stage instead of reusing finished ones")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides of the training config, e.g. optim.max_steps=200")


def run(args: argparse.Namespace) -> int:
    from training.fit import print_summary

    if args.quick and args.preset not in ("full", "quick"):
        raise ValueError(f"--quick and --preset {args.preset} contradict each other; pass one of them")
    preset = "quick" if args.quick else args.preset
    out = Path(args.out or DEFAULT_OUT[preset])
    start = time.perf_counter()
    summary = run_demo(out, preset=preset, force=args.force, progress=not args.no_progress,
                       train_overrides=args.overrides, clip=args.clip)
    print_summary(summary, time.perf_counter() - start)
    return 0
