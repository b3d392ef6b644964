"""``onemodel fit DATA``: train one model for every task a dataset supports, in one command.

Stages (each cached: a finished stage is recorded in ``OUT/fit_state.json`` with the settings it ran with and
skipped when ``fit`` runs again with the same settings; changing a stage's settings re-runs it and everything
after it; an interrupted training resumes from its last checkpoint):

1. ``data``       the user's folder -> raw shards ``OUT/data/<split>`` (``training.data.layout`` lists the layouts;
                  image folders are converted at the chosen resolution, shard folders are used in place); a
                  validation split is made from train when there is none (seeded fraction); test is only scored
2. ``tokenizers`` a VQ tokenizer for rgb and for depth / semseg when the data has them, and a text tokenizer when
                  it has captions, questions or boxes -> ``OUT/tokenizers``
   ``clip``       only with ``FitSettings.clip_config`` (``--clip``; the demo's ``long`` preset) and captions in the
                  data: a contrastive image-text encoder (``onemodel train-clip``) -> ``OUT/clip``; the one model then
                  reads rgb through its frozen vision tower summed with the raw pixel patches
                  (``model.input_embeddings={rgb: pixels_and_clip}``). It reads the raw data only, so on 2+ cores
                  it trains on one thread beside the tokenizers (``_start_clip_early``) and its stage waits for it
3. ``tokenize``   (small data: augmented copies of the training images first) -> token shards ``OUT/tokens``
4. ``train``      one model on every task the data supports -> ``OUT/run``
5. ``eval``       every task scored on the test split (validation when there is no test split) -> ``OUT/eval``,
                  and the report -> ``OUT/report/report.html``

Sizing rules (applied when a setting is left at None, see ``plan_fit``):

- resolution: 64 when the images' median shorter side is >= 64, else 32 (tokenizers are 8x downsampling patch
  VQs, so 64 -> 8x8 tokens, 32 -> 4x4). Shard datasets keep their resolution (meta.json).
- text vocabulary: 320 + the number of distinct words of the training texts, rounded up to a multiple of 64,
  in [256, 8192] (a closed whole-word vocabulary when every word fits).
- tokenizer steps: 20 epochs of the training images (``tokenizer_steps``), at least 300, at most the recommended
  config's (1500 for rgb: reached from 600 training images up).
- depth tokenizer range: 0.9 x the smallest and 1.1 x the largest depth of up to 256 training maps.
- small data (< ``SMALL_DATA`` training images): the small-data recipe ``SMALL_DATA_RECIPE`` (augmented copies of
  every training image, dropout, weight decay, best-validation model), measured in docs/own-data.md.

``onemodel demo`` is this pipeline on generated shapes data (``training.demo``).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import logging
import os
import shutil
import tarfile
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

STAGES = ("data", "tokenizers", "clip", "tokenize", "train", "eval")
CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
CLIP_CONFIG = str(CONFIG_DIR / "clip_shapes.yaml")  # the clip stage's train-clip config (--clip)
SMALL_DATA = 2000  # training images below which the small-data recipe applies
# The small-data recipe (measured on 500 shapes images with captions + QA; docs/own-data.md has the table):
SMALL_DATA_RECIPE: dict[str, Any] = {
    "augment_copies": 4,
    "train_overrides": ["model.dropout=0.1", "optim.weight_decay=0.1", "checkpoint.keep_best=true",
                        "logging.eval_every=100"],
}
_SUFFIXES = {"rgb.png": "rgb", "depth.npy": "depth", "semseg.png": "semseg", "boxes.json": "boxes",
             "caption.txt": "caption", "qa.json": "qa"}


@dataclass
class FitSettings:
    """How ``fit`` runs. ``None`` = chosen from the data by the sizing rules of the module docstring."""

    resolution: int | None = None
    grid_size: int = 8  # the recommended tokenizer configs of training.tokenizer_training (8: patch VQs, 8x down)
    # per tokenizer dotted overrides of the recommended config, e.g. {"rgb": {"training.steps": 40}}
    tokenizer_training: dict[str, dict[str, Any]] = field(default_factory=dict)
    text_vocab_size: int | None = None
    depth_range: list[float] | None = None  # [min, max] metres of the depth tokenizer
    train_config: str = str(CONFIG_DIR / "demo.yaml")
    train_overrides: list[str] = field(default_factory=list)  # preset overrides (applied after the recipe)
    small_data: bool | None = None  # use SMALL_DATA_RECIPE (None: when there are < SMALL_DATA training images)
    augment_copies: int | None = None  # None: the recipe's (small data) or 0
    val_fraction: float = 0.1
    eval_limit: int = 200
    eval_batch_size: int = 50
    seed: int = 0
    # a train-clip config: when set (and the data has captions) the "clip" stage trains that contrastive encoder and
    # the one model reads rgb through its frozen vision tower + the pixels (pixels_and_clip); clip_overrides: its
    # dotted overrides
    clip_config: str | None = None
    clip_overrides: list[str] = field(default_factory=list)


QUICK_TRAIN = [
    "optim.max_steps=30", "optim.warmup_steps=5", "optim.batch_size=16",
    "checkpoint.every=15", "logging.eval_every=15", "logging.eval_batches=1", "logging.log_every=5",
    "model.dim=64", "model.num_heads=2", "model.encoder_depth=2", "model.decoder_depth=2",
    "num_threads=1",  # a toy model gains nothing from a second thread, and the test suite may share the cores
]
# the clip stage at toy size (with --clip): a 1-layer CLIP trained for 4 steps
QUICK_CLIP = ["model.vision_width=32", "model.vision_layers=1", "model.vision_heads=2", "model.text_width=32",
              "model.text_layers=1", "model.text_heads=2", "model.embed_dim=32", "model.vision_stem_width=4",
              "optim.max_steps=4", "optim.warmup_steps=1", "optim.batch_size=8", "checkpoint.every=0",
              "logging.eval_every=0", "data.val_samples=8", "num_threads=1"]
QUICK_TOKENIZERS = {m: {"training.steps": 15, "training.batch_size": 4, "training.max_val_samples": 16,
                        "tokenizer.base_channels": 8, "tokenizer.codebook_size": 128}
                    for m in ("rgb", "depth", "semseg")}
PRESETS: dict[str, FitSettings] = {
    "quick": FitSettings(tokenizer_training=QUICK_TOKENIZERS, train_overrides=QUICK_TRAIN, eval_limit=6,
                         eval_batch_size=6, clip_overrides=QUICK_CLIP),
    "default": FitSettings(),
    "long": FitSettings(train_overrides=["optim.max_steps=2400", "checkpoint.every=600", "logging.eval_every=300"]),
}


def _digest(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _stage_key(previous: str, stage: str, settings_of_stage: Any) -> str:
    """A stage's cache key: its settings chained on the previous stage's key (a changed stage re-runs all after it)."""
    return _digest([previous, stage, settings_of_stage])


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


# ------------------------------------------------------------------------------------------------ the plan


def _fingerprint(folder: Path) -> list[Any]:
    """Cheap identity of a folder's content: (relative path, size, mtime) of every file."""
    out = []
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            st = path.stat()
            out.append([str(path.relative_to(folder)), st.st_size, st.st_mtime_ns])
    return out


def _median_short_side(folder: Path, limit: int = 64) -> int | None:
    from PIL import Image

    from training.data.convert import IMAGE_EXTENSIONS

    sides = []
    for path in sorted(folder.rglob("*")):
        if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS and "depth" not in path.stem \
                and "seg" not in path.stem:
            try:
                with Image.open(path) as im:
                    sides.append(min(im.size))
            except OSError:
                continue
            if len(sides) >= limit:
                break
    return sorted(sides)[len(sides) // 2] if sides else None


def choose_resolution(median_short_side: int | None) -> int:
    """The resolution rule: 64 when the images' median shorter side is >= 64 (or unknown), else 32."""
    return 32 if median_short_side is not None and median_short_side < 64 else 64


def choose_text_vocab(num_distinct_words: int) -> int:
    """The text-vocabulary rule: 320 + distinct words, rounded up to a multiple of 64, in [256, 8192]."""
    return int(min(max(256, -(-(320 + num_distinct_words) // 64) * 64), 8192))


def tasks_for(modalities: set[str]) -> list[dict[str, Any]]:
    """Every task whose inputs and targets the data holds (rgb is required)."""
    tasks: list[dict[str, Any]] = []
    if "caption" in modalities:
        tasks.append({"inputs": ["rgb"], "targets": ["caption"]})
    if "qa" in modalities:
        tasks.append({"inputs": ["rgb", "question"], "targets": ["answer"], "weight": 2.0})
    for name, target in (("depth", "depth"), ("semseg", "semseg"), ("boxes", "det")):
        if name in modalities:
            tasks.append({"inputs": ["rgb"], "targets": [target]})
    if "caption" in modalities:
        tasks.append({"inputs": ["caption"], "targets": ["rgb"]})
    return tasks


def scan_split(split_dir: Path) -> dict[str, int]:
    """Samples carrying each modality in a split of raw shards (read from the tar listings, nothing decoded);
    ``"samples"``: the number of samples."""
    counts: Counter[str] = Counter()
    keys: set[str] = set()
    for shard in sorted(split_dir.glob("*.tar")):
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, suffix = member.name.partition(".")
                keys.add(key)
                if suffix in _SUFFIXES:
                    counts[_SUFFIXES[suffix]] += 1
    return {"samples": len(keys), **counts}


def plan_fit(data_dir: Path, settings: FitSettings) -> dict[str, Any]:
    """What ``fit`` will train on ``data_dir`` (prepared raw shards with train/ and val/): modalities, tasks,
    tokenizers, text vocabulary, depth range, recipe. Pure function of the data and the settings."""
    from training.data.reader import iter_samples
    from training.data.shards import read_meta

    counts = scan_split(data_dir / "train")
    modalities = {m for m in _SUFFIXES.values() if counts.get(m)}
    if "rgb" not in modalities:
        raise ValueError(f"the training split {data_dir / 'train'} has no images (rgb): onemodel needs an image "
                         "per sample")
    num_train = counts["samples"]
    small = settings.small_data if settings.small_data is not None else num_train < SMALL_DATA
    meta = read_meta(data_dir) if (data_dir / "meta.json").is_file() else {}
    text_vocab = settings.text_vocab_size
    depth_range = settings.depth_range
    if (text_vocab is None and modalities & {"caption", "qa", "boxes"}) or (depth_range is None and "depth" in modalities):
        words: set[str] = set()
        lo, hi, n_depth = float("inf"), 0.0, 0
        for sample in iter_samples(data_dir / "train", modalities=[m for m in ("caption", "qa", "depth") if m in modalities]
                                   or ["rgb"]):
            words.update(sample.get("caption", "").lower().split())
            for pair in sample.get("qa") or []:
                words.update(f"{pair['question']} {pair['answer']}".lower().split())
            if "depth" in sample and n_depth < 256:
                d = sample["depth"][sample["depth"] > 0]
                if d.size:
                    lo, hi, n_depth = min(lo, float(d.min())), max(hi, float(d.max())), n_depth + 1
        if text_vocab is None:
            text_vocab = choose_text_vocab(len(words) + len(meta.get("box_classes", [])))
        if depth_range is None and "depth" in modalities:
            if n_depth == 0:
                raise ValueError("the depth maps of the training split are all zero: cannot set the depth range")
            depth_range = [round(max(0.9 * lo, 1e-3), 4), round(1.1 * hi, 4)]
    tokenizers = ["rgb", *[m for m in ("depth", "semseg") if m in modalities]]
    if modalities & {"caption", "qa", "boxes"}:
        tokenizers.append("text")
    recipe = SMALL_DATA_RECIPE if small else {"augment_copies": 0, "train_overrides": []}
    copies = settings.augment_copies if settings.augment_copies is not None else recipe["augment_copies"]
    return {
        "num_train": num_train,
        "num_val": scan_split(data_dir / "val")["samples"] if (data_dir / "val").is_dir() else 0,
        "num_test": scan_split(data_dir / "test")["samples"] if (data_dir / "test").is_dir() else 0,
        "modalities": {m: counts[m] for m in sorted(modalities)},
        "tasks": tasks_for(modalities),
        "tokenizers": tokenizers,
        "resolution": meta.get("resolution"),
        "text_vocab_size": text_vocab,
        "depth_range": depth_range,
        "small_data": small,
        "augment_copies": int(copies),
        "recipe_overrides": list(recipe["train_overrides"]),
    }


def describe_plan(plan: dict[str, Any]) -> str:
    """The plan as the lines ``fit`` prints."""
    task_names = [f"{'+'.join(t['inputs'])} -> {'+'.join(t['targets'])}" for t in plan["tasks"]]
    lines = [
        f"data: {plan['num_train']} train, {plan['num_val']} validation, {plan['num_test']} test samples"
        f" at {plan['resolution']}x{plan['resolution']}",
        "modalities (train samples having each): " + ", ".join(f"{k} {v}" for k, v in plan["modalities"].items()),
        "tasks: " + "; ".join(task_names),
        "tokenizers: " + ", ".join(plan["tokenizers"])
        + (f" (text vocabulary {plan['text_vocab_size']})" if "text" in plan["tokenizers"] else "")
        + (f" (depth range {plan['depth_range'][0]}-{plan['depth_range'][1]} m)" if plan["depth_range"] else ""),
    ]
    if plan["small_data"]:
        lines.append(f"small data (< {SMALL_DATA} training images): {plan['augment_copies']} augmented copies per "
                     "training image; " + " ".join(plan["recipe_overrides"]))
    elif plan["augment_copies"]:
        lines.append(f"{plan['augment_copies']} augmented copies per training image")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------------ stages


def prepare_data(source: Path, out: Path, settings: FitSettings, progress: bool) -> dict[str, Any]:
    """The ``data`` stage of a user's folder: raw shards with train/ and val/ (and test/ when given) in ``out``;
    shard datasets that already have train and val are used in place (``out`` then holds only ``source.txt``)."""
    from training.data.convert import convert_dataset
    from training.data.layout import detect_layout, split_off_validation
    from training.data.shards import read_meta, write_meta

    layout = detect_layout(source)
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    info: dict[str, Any] = {"layout": layout.kind, "splits_given": sorted(layout.splits)}
    if "train" not in layout.splits and "all" not in layout.splits:
        raise ValueError(f"{source} has the splits {sorted(layout.splits)} but no train split: add a train/ folder "
                         "(test is only ever scored, never trained on)")
    if layout.is_shards and {"train", "val"} <= set(layout.splits):
        info["data_dir"] = str(source.resolve())
        (out / "source.txt").write_text(str(source.resolve()) + "\n")
        return info
    staging = out / "_staging"
    if layout.is_shards:
        staged = {s: p for s, p in layout.splits.items()}
        resolution = read_meta(source).get("resolution") if (source / "meta.json").is_file() else None
    else:
        resolution = settings.resolution or choose_resolution(_median_short_side(source))
        reports = convert_dataset(source, staging, resolution=resolution, overwrite=True, progress=progress)
        staged = {s: (staging if s == "all" else staging / s) for s in reports}
        info["skipped"] = {s: len(r.skipped) for s, r in reports.items()}
    train_src = staged.get("train", staged.get("all"))
    if "val" in staged:
        for split in ("train", "val"):
            shutil.copytree(staged[split], out / split, ignore=shutil.ignore_patterns("meta.json"))
        info["val"] = "given"
    else:
        made = split_off_validation(train_src, out / "train", out / "val", settings.val_fraction, settings.seed)
        info["val"] = f"made: {made['val']} of {made['train'] + made['val']} training samples " \
                      f"(fraction {settings.val_fraction}, seed {settings.seed})"
    if "test" in staged:
        shutil.copytree(staged["test"], out / "test", ignore=shutil.ignore_patterns("meta.json"))
    base_meta: dict[str, Any] = {}
    for candidate in (source, staging, staging / "all"):
        if (candidate / "meta.json").is_file():
            base_meta = read_meta(candidate)
            break
    if resolution is None:
        from training.data.reader import iter_samples

        first = next(iter(iter_samples(out / "train", modalities=["rgb"])))
        resolution = int(first["rgb"].shape[0])
    splits = {s: scan_split(out / s)["samples"] for s in ("train", "val", "test") if (out / s).is_dir()}
    write_meta(out, {"name": source.resolve().name, "source": str(source.resolve()), "resolution": resolution,
                     "semseg_classes": base_meta.get("semseg_classes", []),
                     "box_classes": base_meta.get("box_classes", []), "splits": splits, "complete": True})
    shutil.rmtree(staging, ignore_errors=True)
    info["data_dir"] = str(out)
    info["splits"] = splits
    return info


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


def tokenizer_steps(num_train: int, recommended: int, batch_size: int) -> int:
    """The tokenizer-steps rule: 20 epochs of the training images, at least 300 steps, at most the recommended."""
    return int(min(recommended, max(300, round(20 * num_train / batch_size))))


def tokenizer_configs(settings: FitSettings, plan: dict[str, Any], data_dir: Path) -> dict[str, Any]:
    """The VQ tokenizer training configs: the recommended ones for ``settings.grid_size`` + the depth range."""
    from training.tokenizer_training import load_vq_training_config

    out = {}
    for modality in [m for m in plan["tokenizers"] if m != "text"]:
        overrides = [f"{k}={v}" for k, v in settings.tokenizer_training.get(modality, {}).items()]
        recommended = load_vq_training_config(modality, data_dir=data_dir, grid_size=settings.grid_size).training
        steps = tokenizer_steps(plan["num_train"], recommended.steps, recommended.batch_size)
        if steps != recommended.steps:
            overrides = [f"training.steps={steps}", *overrides]
        if modality == "depth" and plan["depth_range"]:
            overrides = [f"tokenizer.depth_min={plan['depth_range'][0]}",
                         f"tokenizer.depth_max={plan['depth_range'][1]}", *overrides]
        out[modality] = load_vq_training_config(modality, overrides=overrides, data_dir=data_dir,
                                                grid_size=settings.grid_size)
    return out


def _stage_tokenizers(settings: FitSettings, plan: dict[str, Any], data_dir: Path, bundle: Path,
                      progress: bool) -> dict[str, Any]:
    """The VQ tokenizers (+ the text one). With 2+ cores they train in two worker processes of one thread each:
    rgb (the longest) in one, the others in the other; same results as one after the other (each is seeded on its
    own), about half the wall time. These small conv nets train 3-17x faster on 1 thread than on 2 when anything
    else uses the CPU (measured, docs: Tokenizers / Threads)."""
    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    import torch

    from training.tokenizer_training import train_text_tokenizer

    if bundle.exists():
        shutil.rmtree(bundle)
    configs = tokenizer_configs(settings, plan, data_dir)
    jobs = {m: (m, cfg, str(data_dir), str(bundle / m), settings.seed) for m, cfg in configs.items()}
    info: dict[str, Any] = {}
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        # worker processes cost seconds to start (torch import): only worth it for real training runs
        if (os.cpu_count() or 1) >= 2 and len(configs) > 1 and max(c.training.steps for c in configs.values()) >= 100:
            # spawn: a fresh interpreter per worker (no forked torch thread pools); rgb shows the progress bar
            with ProcessPoolExecutor(max_workers=2, mp_context=multiprocessing.get_context("spawn"),
                                     initializer=_one_torch_thread) as pool:
                futures = {m: pool.submit(_train_one_tokenizer, *jobs[m], progress and m == "rgb") for m in configs}
                for m, future in futures.items():
                    info[m] = future.result()
                    logger.info("%s tokenizer: %s", m, info[m].get("val"))
        else:
            for m in configs:
                info[m] = _train_one_tokenizer(*jobs[m], progress)
    finally:
        torch.set_num_threads(previous_threads)
    if "text" in plan["tokenizers"]:
        train_text_tokenizer(data_dir, bundle / "text", vocab_size=plan["text_vocab_size"])
    return info


def _stage_tokenize(data_dir: Path, paths: dict[str, Path], plan: dict[str, Any], seed: int,
                    progress: bool) -> dict[str, Any]:
    from training.data.augment import write_augmented_split
    from training.pretokenize import pretokenize

    source = data_dir
    if plan["augment_copies"] > 0:
        # the training split with augmented copies; validation and test stay as they are
        aug = paths["augmented"]
        if aug.exists():
            shutil.rmtree(aug)
        aug.mkdir(parents=True)
        write_augmented_split(data_dir / "train", aug / "train", plan["augment_copies"], seed=seed, progress=progress)
        for split in ("val", "test"):
            if (data_dir / split).is_dir():
                shutil.copytree(data_dir / split, aug / split)
        shutil.copy2(data_dir / "meta.json", aug / "meta.json")
        source = aug
    result = pretokenize(source, paths["tokenizers"], paths["tokens"], progress=progress, overwrite=True)
    return {k: result[k] for k in ("splits", "num_samples", "seconds") if k in result}


def uses_clip(settings: FitSettings, plan: dict[str, Any]) -> bool:
    """Whether the ``clip`` stage trains a contrastive encoder for this data (a clip config and captions)."""
    return bool(settings.clip_config) and "caption" in plan["modalities"]


def _stage_clip(settings: FitSettings, plan: dict[str, Any], data_dir: Path, paths: dict[str, Path], key: str,
                progress: bool = True) -> dict[str, Any]:
    if not uses_clip(settings, plan):
        return {"skipped": "no clip config" if not settings.clip_config else "the data has no captions"}
    from training.train_clip import load_clip_config, train_clip

    marker = paths["clip"] / "fit_clip_key.txt"  # as in the train stage: never resume another setting's run
    if paths["clip"].exists() and (not marker.is_file() or marker.read_text().strip() != key):
        shutil.rmtree(paths["clip"])
    paths["clip"].mkdir(parents=True, exist_ok=True)
    marker.write_text(key + "\n")
    # the encoder sees the images at the data's resolution, so its patch grid is the token grid (8x downsampling)
    size = [f"model.image_size={plan['resolution']}"] if plan.get("resolution") else []
    config = load_clip_config(settings.clip_config, [
        *size, f"data.path={data_dir}", "data.text_key=caption", f"checkpoint.out_dir={paths['clip']}",
        f"seed={settings.seed}", *settings.clip_overrides, *([] if progress else ["logging.progress_bar=false"])])
    summary = train_clip(config, resume=True)
    return {k: summary.get(k) for k in ("start_step", "final_step", "wall_time_s", "train_loss", "val")}


def train_overrides(settings: FitSettings, plan: dict[str, Any], paths: dict[str, Path],
                    progress: bool = True) -> list[str]:
    """The dotted overrides of ``settings.train_config`` for this data: paths, tasks, recipe, preset, user's."""
    tasks = json.dumps(plan["tasks"])
    present = set(plan["modalities"])
    # text modalities the data lacks get no slot in the model (else the bundle's default lengths would add them)
    absent = {name: 0 for name, needs in (("caption", "caption"), ("question", "qa"), ("answer", "qa"),
                                          ("det", "boxes")) if needs not in present}
    return [
        f"tokenizers={paths['tokenizers']}",
        *([f"model.max_lengths={json.dumps(absent)}"] if absent and "text" in plan["tokenizers"] else []),
        f"data.sources=[{{path: '{paths['tokens']}'}}]",
        f"checkpoint.out_dir={paths['run']}",
        f"logging.heldout_data={paths['data']}",  # learning curves (logging.heldout_every) on this data's val split
        f"seed={settings.seed}",
        f"masking.tasks={tasks}",
        *([f"model.input_embeddings={{rgb: pixels_and_clip}}", f"model.feature_encoders={{rgb: '{paths['clip'] / 'model'}'}}"]
          if uses_clip(settings, plan) else []),
        *plan["recipe_overrides"],
        *settings.train_overrides,
        *([] if progress else ["logging.progress_bar=false"]),
    ]


def _stage_train(settings: FitSettings, plan: dict[str, Any], paths: dict[str, Path], key: str,
                 progress: bool = True) -> dict[str, Any]:
    from training.config import load_train_config
    from training.train import train

    # checkpoints of a run with other settings (or on other tokens) must not be resumed: start that run afresh
    marker = paths["run"] / "fit_train_key.txt"
    if paths["run"].exists() and (not marker.is_file() or marker.read_text().strip() != key):
        shutil.rmtree(paths["run"])
    paths["run"].mkdir(parents=True, exist_ok=True)
    marker.write_text(key + "\n")
    config = load_train_config(settings.train_config, train_overrides(settings, plan, paths, progress))
    # resume=True continues an interrupted run from its last complete checkpoint (fresh start when none)
    summary = train(config, resume=True)
    return {k: summary.get(k) for k in ("start_step", "final_step", "steps", "tokens", "wall_time_s", "tokens_per_s",
                                        "train_loss", "val", "best_val_loss")}


def model_dir(run: Path) -> Path:
    """The model ``fit`` hands over: the best-validation one when the run kept it, else the last."""
    return run / "best_model" if (run / "best_model" / "config.json").is_file() else run / "model"


def _stage_eval(settings: FitSettings, data_dir: Path, paths: dict[str, Path], title: str,
                progress: bool) -> dict[str, Any]:
    from onemodel.pipeline import OneModelPipeline
    from training.evaluation.evaluate import evaluate
    from training.evaluation.report import metrics_markdown_table, write_report

    split = "test" if (data_dir / "test").is_dir() else "val"
    pipeline = OneModelPipeline.from_pretrained(model_dir(paths["run"]))
    evaluation = evaluate(pipeline, data_dir, limit=settings.eval_limit, batch_size=settings.eval_batch_size,
                          split=split, progress=progress)
    from tokenizers_mm.io_atomic import atomic_directory, write_json, write_text

    with atomic_directory(paths["eval"]) as out:  # both files, or neither
        write_json(out / "results.json", evaluation.results, default=float)
        write_text(out / "metrics.md", metrics_markdown_table(evaluation.results) + "\n")
    log = paths["run"] / "metrics.jsonl"
    report = write_report(paths["report"], evaluation.results, evaluation.examples, log if log.is_file() else None,
                          title=title)
    return {"tasks": sorted(evaluation.results), "report": str(report), "split": split,
            "model": str(model_dir(paths["run"]))}


# ------------------------------------------------------------------------------------------------ orchestrator


def run_fit(data: str | Path | None, out_dir: str | Path, settings: FitSettings | None = None, *,
            preset: str = "default", force: bool = False, progress: bool = True, stop_after: str | None = None,
            extra_overrides: list[str] | tuple[str, ...] = (), make_data: Callable[[Path], dict[str, Any]] | None = None,
            data_key: Any = None, state_name: str = "fit_state.json", title: str | None = None,
            echo: Callable[[str], None] | None = None) -> dict[str, Any]:
    """Run (or resume) the staged pipeline into ``out_dir``; returns ``{"stages": {name: seconds}, "results",
    "report", "out_dir", "plan", "model", "state"}``.

    data: the user's dataset folder (any layout of ``training.data.layout``). ``make_data`` replaces the data
    stage (it writes raw shards with train/val/test into the directory it is given; ``data_key`` identifies its
    output for caching): the demo generates its shapes data that way. settings: defaults to ``PRESETS[preset]``;
    ``extra_overrides``: dotted overrides of the training config, applied last. ``echo``: where the plan lines go
    (``print`` in the CLI; the log otherwise)."""
    from training.config import load_train_config

    if settings is None:
        if preset not in PRESETS:
            raise ValueError(f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        settings = PRESETS[preset]
    if stop_after is not None and stop_after not in STAGES:
        raise ValueError(f"stop_after must be one of {STAGES}, got {stop_after!r}")
    if not 0 < settings.val_fraction < 1:
        raise ValueError(f"--val-fraction must be in (0, 1), got {settings.val_fraction}")
    if settings.augment_copies is not None and settings.augment_copies < 0:
        raise ValueError(f"--augment-copies must be >= 0, got {settings.augment_copies}")
    if settings.resolution is not None and (not 16 <= settings.resolution <= 512 or settings.resolution % 8):
        raise ValueError(f"--resolution must be a multiple of 8 in [16, 512] (the tokenizers downsample 8x), "
                         f"got {settings.resolution}")
    if extra_overrides:
        settings = dataclasses.replace(settings, train_overrides=[*settings.train_overrides, *extra_overrides])
    load_train_config(settings.train_config, list(settings.train_overrides))  # bad overrides fail now, not in stage 4
    if make_data is None:
        if data is None:
            raise ValueError("fit needs a dataset folder")
        source = Path(data)
        if not source.is_dir():
            raise FileNotFoundError(f"dataset folder {source} does not exist")
        from training.data.layout import detect_layout

        detect_layout(source)  # an unknown layout fails before anything is written
        data_key = [str(source.resolve()), _fingerprint(source)]
    say = echo or (lambda line: logger.info("%s", line))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = StageState(out / state_name)
    paths = {"data": out / "data", "tokenizers": out / "tokenizers", "clip": out / "clip", "tokens": out / "tokens",
             "augmented": out / "augmented", "run": out / "run", "eval": out / "eval", "report": out / "report"}
    from training.tokenizer_training import RECOMMENDED

    timings: dict[str, float] = {}
    keys: dict[str, str] = {}
    plan: dict[str, Any] = {}
    data_dir = paths["data"]

    def run_stage(number: int, stage: str, settings_of_stage: Any, runner: Callable[[], dict[str, Any]]) -> None:
        keys[stage] = _stage_key(keys[STAGES[number - 2]] if number > 1 else "", stage, settings_of_stage)
        if not force and state.done(stage, keys[stage]):
            logger.info("stage %d/%d %-10s cached (%s)", number, len(STAGES), stage, state.data[stage]["seconds"])
            timings[stage] = 0.0
            return
        logger.info("stage %d/%d %-10s running ...", number, len(STAGES), stage)
        start = time.perf_counter()
        info = runner()
        seconds = time.perf_counter() - start
        state.record(stage, keys[stage], seconds, info)
        timings[stage] = seconds
        logger.info("stage %d/%d %-10s done in %.1f s", number, len(STAGES), stage, seconds)

    def finished() -> dict[str, Any]:
        results_path = paths["eval"] / "results.json"
        results = json.loads(results_path.read_text()) if results_path.is_file() else {}
        return {"stages": timings, "results": results, "report": str(paths["report"] / "report.html"),
                "out_dir": str(out), "plan": plan, "model": str(model_dir(paths["run"])), "state": state.data}

    if make_data is not None:
        run_stage(1, "data", data_key, lambda: make_data(paths["data"]))
    else:
        run_stage(1, "data", [data_key, settings.resolution, settings.val_fraction, settings.seed],
                  lambda: prepare_data(source, paths["data"], settings, progress))
    data_dir = Path(state.data["data"]["info"].get("data_dir") or paths["data"])
    plan = plan_fit(data_dir, settings)
    from tokenizers_mm.io_atomic import write_json

    write_json(out / "plan.json", plan)
    say(describe_plan(plan))
    val_info = state.data["data"]["info"].get("val")
    if val_info and val_info != "given":
        say(f"validation split {val_info}")
    if not plan["num_test"]:
        say("no test split: the eval scores the validation split")
    if stop_after == "data":
        return finished()
    from training.pretokenize import TOKEN_VERSION

    recommended = {m: RECOMMENDED.get((m, settings.grid_size)) for m in plan["tokenizers"]}
    tok_settings = [settings.grid_size, settings.tokenizer_training, plan["text_vocab_size"], plan["depth_range"],
                    plan["tokenizers"], settings.seed, recommended]
    clip_settings = ([Path(settings.clip_config).read_text(), settings.clip_overrides] if uses_clip(settings, plan)
                     else [None, None])
    stage_plan = [
        ("tokenizers", tok_settings, lambda: _stage_tokenizers(settings, plan, data_dir, paths["tokenizers"], progress)),
        # with an early start (below) the clip stage waits for the run begun beside the tokenizers
        ("clip", clip_settings, lambda: early_clip.result() if early_clip is not None
         else _stage_clip(settings, plan, data_dir, paths, keys["clip"], progress)),
        ("tokenize", [plan["augment_copies"], settings.seed, TOKEN_VERSION],
         lambda: _stage_tokenize(data_dir, paths, plan, settings.seed, progress)),
        ("train", [Path(settings.train_config).read_text(), train_overrides(settings, plan, paths)],
         lambda: _stage_train(settings, plan, paths, keys["train"], progress)),
        ("eval", [settings.eval_limit, settings.eval_batch_size, settings.seed],
         lambda: _stage_eval(settings, data_dir, paths, title or f"onemodel fit: {data_dir.name}", progress)),
    ]
    # the clip stage's key is known before the tokenizers run (it chains on theirs)
    early_clip = _start_clip_early(settings, plan, data_dir, paths, state, force, stop_after,
                                   _stage_key(_stage_key(keys["data"], "tokenizers", tok_settings), "clip",
                                              clip_settings))
    for number, (stage, stage_settings, runner) in enumerate(stage_plan, 2):
        run_stage(number, stage, stage_settings, runner)
        if stage == "clip" and early_clip is not None and keys["clip"] != early_clip.key:
            raise RuntimeError("internal: the clip stage started early under another key")
        if stage == stop_after:
            break
    return finished()


class _EarlyStage:
    """A stage run in a daemon thread (torch releases the GIL); ``result()`` waits and re-raises its error."""

    def __init__(self, key: str, job: Callable[[], dict[str, Any]]) -> None:
        self.key, self._job, self._out, self._error = key, job, None, None
        self._thread = threading.Thread(target=self._run, name="onemodel-early-stage", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        try:
            self._out = self._job()
        except BaseException as err:  # noqa: BLE001 - handed to the waiting stage
            self._error = err

    def result(self) -> dict[str, Any]:
        self._thread.join()
        if self._error is not None:
            raise self._error
        return self._out or {}


def _start_clip_early(settings: FitSettings, plan: dict[str, Any], data_dir: Path, paths: dict[str, Path],
                      state: Any, force: bool, stop_after: str | None, key: str) -> _EarlyStage | None:
    """The clip stage reads the raw data, not the tokenizers: with 2+ cores it trains on one torch thread while the
    tokenizers train in their worker processes (the rgb one is the longest), and its stage then only waits for it
    (docs/recipe.md: the long preset's clip stage, 229 s, hidden behind its 368 s tokenizer stage). None when the
    stage is cached, not wanted, or the machine has one core."""
    if (not uses_clip(settings, plan) or (os.cpu_count() or 1) < 2 or stop_after in ("data", "tokenizers")
            or (not force and state.done("clip", key))):
        return None
    one_thread = dataclasses.replace(settings, clip_overrides=[*settings.clip_overrides, "num_threads=1"])
    logger.info("stage 3/%d clip       starts beside the tokenizers (one thread)", len(STAGES))
    return _EarlyStage(key, lambda: _stage_clip(one_thread, plan, data_dir, paths, key, progress=False))


# ------------------------------------------------------------------------------------------------ CLI


def print_summary(summary: dict[str, Any], total: float) -> None:
    """The stage timings, the eval table, the report and what to do next (shared by ``fit`` and ``demo``)."""
    print("\nstage        seconds")
    for stage, seconds in summary["stages"].items():
        skipped = summary.get("state", {}).get(stage, {}).get("info", {}).get("skipped")
        note = f"  (skipped: {skipped})" if skipped else "  (cached)" if seconds == 0.0 else ""
        print(f"{stage:<12} {seconds:>7.1f}{note}")
    print(f"{'total':<12} {total:>7.1f}")
    metrics_md = Path(summary["out_dir"]) / "eval" / "metrics.md"
    if metrics_md.is_file():
        print("\n" + metrics_md.read_text())
    print(f"report: {summary['report']}")
    model = summary["model"]
    modalities = summary.get("plan", {}).get("modalities", {})
    print("\nnext:")
    if "caption" in modalities or not modalities:
        print(f"  onemodel caption --model {model} IMAGE.png")
    if "qa" in modalities or not modalities:
        print(f'  onemodel answer --model {model} IMAGE.png --question "what is in the image?"')
    print(f"  onemodel serve --model {model}")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("data", help="dataset folder: an image folder with metadata.jsonl / metadata.csv, Hugging Face "
                        "split folders (train/ validation/ test/), or webdataset shards of the raw format")
    parser.add_argument("--out", default=None, help="output directory (default: runs/<folder name>)")
    parser.add_argument("--preset", choices=sorted(PRESETS), default="default",
                        help="quick: toy sizes (about a minute); default: the demo recipe (900 steps); long: 2400 steps")
    parser.add_argument("--resolution", type=int, default=None, help="image side (default: 64, or 32 for smaller images)")
    parser.add_argument("--val-fraction", type=float, default=0.1,
                        help="fraction of train moved to validation when there is no validation split (default 0.1)")
    parser.add_argument("--small-data", choices=("auto", "on", "off"), default="auto",
                        help=f"small-data recipe (augmentation, dropout, weight decay, best-validation model); auto: "
                        f"on below {SMALL_DATA} training images")
    parser.add_argument("--augment-copies", type=int, default=None,
                        help="augmented copies of each training image (default: the recipe's)")
    parser.add_argument("--clip", action="store_true",
                        help="when the data has captions: first train a contrastive image-text encoder on them "
                             "(configs/clip_shapes.yaml) and feed the one model its frozen image features")
    parser.add_argument("--force", action="store_true", help="re-run every stage instead of reusing finished ones")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides of the training config, e.g. optim.max_steps=200")


def run(args: argparse.Namespace) -> int:
    settings = dataclasses.replace(
        PRESETS[args.preset], resolution=args.resolution, val_fraction=args.val_fraction,
        small_data={"auto": None, "on": True, "off": False}[args.small_data], augment_copies=args.augment_copies)
    if args.clip and not settings.clip_config:
        settings = dataclasses.replace(settings, clip_config=CLIP_CONFIG)
    out = Path(args.out or Path("runs") / Path(args.data).resolve().name)
    start = time.perf_counter()
    summary = run_fit(args.data, out, settings, force=args.force, progress=not args.no_progress,
                      extra_overrides=args.overrides, echo=print)
    print_summary(summary, time.perf_counter() - start)
    return 0
