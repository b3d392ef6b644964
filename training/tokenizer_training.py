"""Training the modality tokenizers: VQ autoencoders (rgb / depth / semseg, optional rgb diffusion decoder)
and the text tokenizer.

``train_vq_tokenizer`` is a plain loop: load the modality of the training samples into memory, draw seeded random
batches (with horizontal flips), AdamW + warmup/cosine LR, save with ``save_pretrained``, then measure the
round trip on validation samples (PSNR / AbsRel + δ1 / pixel accuracy + mIoU, codebook usage).
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokenizers_mm.vq import VQTokenizerConfig

logger = logging.getLogger(__name__)

__all__ = ["load_modality_array", "load_texts", "train_vq_tokenizer", "evaluate_vq_tokenizer", "train_text_tokenizer",
           "VQTrainingOptions", "VQTrainingConfig", "RECOMMENDED", "recommended_vq_config", "load_vq_training_config",
           "train_tokenizer_bundle"]

Source = str | Path | Sequence[dict[str, Any]] | np.ndarray


def _iter_raw_samples(source: str | Path, split: str | None, limit: int | None,
                      modalities: Sequence[str] | None = None) -> Iterable[dict[str, Any]]:
    """Raw samples of a dataset directory (``split`` sub-directory if it has one) through the data reader."""
    from training.data.reader import iter_samples

    path = Path(source)
    if not path.exists():
        raise FileNotFoundError(f"dataset directory {str(path)!r} does not exist; make one with 'onemodel data shapes --out DIR'")
    if split is not None and (path / split).is_dir():
        path = path / split
    count = 0
    for sample in iter_samples(path, modalities=modalities):
        if limit is not None and count >= limit:
            break
        count += 1
        yield sample


def load_modality_array(source: Source, modality: str, split: str | None = None, limit: int | None = None) -> np.ndarray:
    """Stack one image-like modality of ``source`` into a numpy batch ``(N, H, W[, 3])``.

    ``source``: a dataset directory (its ``split`` sub-directory is used when present), a list of raw sample
    dicts, or an already-stacked array.
    """
    if isinstance(source, np.ndarray):
        arr = source
    else:
        samples = _iter_raw_samples(source, split, limit, [modality]) if isinstance(source, (str, Path)) else source
        items = []
        for sample in samples:
            if limit is not None and len(items) >= limit:
                break
            if modality in sample and sample[modality] is not None:
                items.append(np.asarray(sample[modality]))
        if not items:
            raise ValueError(f"no sample in {source if isinstance(source, (str, Path)) else 'the given samples'} has a {modality!r} image")
        arr = np.stack(items)
    if limit is not None:
        arr = arr[:limit]
    if len(arr) == 0:
        raise ValueError(f"no {modality} images to train or evaluate on")
    return arr


def load_texts(source: str | Path | Sequence[dict[str, Any]], num_bins: int = 64, split: str | None = "train",
               limit: int | None = None) -> list[str]:
    """All texts a text tokenizer must cover: captions, questions, answers and box strings of ``source``."""
    from tokenizers_mm.boxes import boxes_to_text

    samples = _iter_raw_samples(source, split, limit) if isinstance(source, (str, Path)) else source
    texts: list[str] = []
    for sample in samples:
        if sample.get("caption"):
            texts.append(sample["caption"])
        for pair in sample.get("qa") or []:
            texts += [pair["question"], pair["answer"]]
        if sample.get("boxes"):
            size = np.asarray(sample["rgb"]).shape[:2] if sample.get("rgb") is not None else None
            if size is not None:
                texts.append(boxes_to_text(sample["boxes"], size, num_bins))
    return texts


@dataclass
class VQTrainingOptions:
    """How to train an image tokenizer (the ``training:`` section of ``configs/tokenizers/*.yaml``)."""

    steps: int = 2000
    batch_size: int = 8
    lr: float = 3e-3
    seed: int = 0
    bf16: bool = False  # measured: no speed-up for these small conv nets on an AMX CPU
    max_train_samples: int | None = None
    max_val_samples: int = 256
    diffusion_steps: int = 400
    diffusion_lr: float = 2e-3


@dataclass
class VQTrainingConfig:
    """A tokenizer config file: ``tokenizer:`` (a ``VQTokenizerConfig``) + ``training:`` (``VQTrainingOptions``)."""

    tokenizer: VQTokenizerConfig = field(default_factory=VQTokenizerConfig)
    training: VQTrainingOptions = field(default_factory=VQTrainingOptions)


# Recommended configs for 64x64 images, per (modality, grid size); configs/tokenizers/*.yaml hold the same values.
# Measured numbers (held-out shapes) are in docs/tokenizers.md.
_SHAPES_DEPTH = {"depth_min": 0.5, "depth_max": 20.0}  # shapes depth is 1-10 m; set these for your data
RECOMMENDED: dict[tuple[str, int], dict[str, Any]] = {
    ("rgb", 16): {"tokenizer": {"modality": "rgb", "base_channels": 16, "channel_mult": [1, 2, 2]},
                  "training": {"steps": 2000, "batch_size": 8, "lr": 3e-3}},
    # 8x8 (the demo's grids): patch encoders, so that a patch always gets the same code (easy tokens for the model)
    ("rgb", 8): {"tokenizer": {"modality": "rgb", "base_channels": 16, "channel_mult": [1, 2, 2, 4], "encoder": "patch"},
                 "training": {"steps": 1500, "batch_size": 8, "lr": 3e-3}},
    ("depth", 16): {"tokenizer": {"modality": "depth", "base_channels": 16, "channel_mult": [1, 2, 2], **_SHAPES_DEPTH},
                    "training": {"steps": 2000, "batch_size": 8, "lr": 3e-3}},
    ("depth", 8): {"tokenizer": {"modality": "depth", "base_channels": 8, "channel_mult": [1, 2, 2, 4], "encoder": "patch",
                                 "codebook_size": 256, **_SHAPES_DEPTH},
                   "training": {"steps": 1000, "batch_size": 8, "lr": 3e-3}},
    ("semseg", 16): {"tokenizer": {"modality": "semseg", "base_channels": 16, "channel_mult": [1, 2, 2]},
                     "training": {"steps": 600, "batch_size": 8, "lr": 3e-3}},
    ("semseg", 8): {"tokenizer": {"modality": "semseg", "base_channels": 8, "channel_mult": [1, 2, 2, 4], "encoder": "patch",
                                  "codebook_size": 256},
                    "training": {"steps": 400, "batch_size": 8, "lr": 3e-3}},
}
DEFAULT_GRID_SIZE = 16


def recommended_vq_config(modality: str, grid_size: int = DEFAULT_GRID_SIZE, num_classes: int | None = None,
                          image_size: int = 64) -> VQTrainingConfig:
    """The recommended tokenizer + training config of ``modality`` for ``grid_size`` tokens per side.

    The configs were tuned for 64x64 images; for another ``image_size`` the downsampling factor is kept
    (``grid_size`` then scales with the image). semseg needs ``num_classes``.
    """
    import copy

    key = (modality, grid_size)
    if key not in RECOMMENDED:
        raise ValueError(f"no recommended config for {modality!r} with grid {grid_size}; known: {sorted(RECOMMENDED)}")
    data = copy.deepcopy(RECOMMENDED[key])
    data["tokenizer"]["image_size"] = image_size
    if modality == "semseg":
        if not num_classes:
            raise ValueError("a semseg tokenizer needs num_classes (the dataset's meta.json 'semseg_classes' gives it)")
        data["tokenizer"]["num_classes"] = int(num_classes)
    return _parse_training_config(data)


def _parse_training_config(data: dict[str, Any]) -> VQTrainingConfig:
    from onemodel.config import from_dict

    return from_dict(VQTrainingConfig, data)


def load_vq_training_config(
    modality: str,
    path: str | Path | None = None,
    overrides: Sequence[str] = (),
    data_dir: str | Path | None = None,
    grid_size: int | None = None,
    diffusion: bool = False,
) -> VQTrainingConfig:
    """Build the training config of an image tokenizer: the recommended one for ``modality`` / ``grid_size`` or the
    file ``path`` (YAML/JSON with ``tokenizer:`` and ``training:`` sections), then dotted ``overrides``
    (``tokenizer.codebook_size=512``). From ``data_dir/meta.json``: ``image_size`` (its ``resolution``) and, for
    semseg, ``num_classes`` (``len(semseg_classes)``) unless set. ``diffusion`` adds the default diffusion decoder."""
    from onemodel.config import apply_overrides, load_config_file, to_dict

    meta: dict[str, Any] = {}
    if data_dir is not None and (Path(data_dir) / "meta.json").is_file():
        meta = json.loads((Path(data_dir) / "meta.json").read_text())
    if path is not None:
        data = load_config_file(path)
    else:
        base = recommended_vq_config(modality, grid_size or DEFAULT_GRID_SIZE, num_classes=len(meta.get("semseg_classes", [])) or 2)
        data = to_dict(base)
    data = apply_overrides(data, list(overrides))
    tok = data.setdefault("tokenizer", {})
    if tok.get("modality", modality) != modality:
        raise ValueError(f"config is for modality {tok.get('modality')!r} but --modality is {modality!r}")
    tok["modality"] = modality
    if "resolution" in meta and not any(o.startswith("tokenizer.image_size=") for o in overrides):
        tok["image_size"] = int(meta["resolution"])
    if modality == "semseg" and not any(o.startswith("tokenizer.num_classes=") for o in overrides):
        if meta.get("semseg_classes"):
            tok["num_classes"] = len(meta["semseg_classes"])
        elif path is None:
            raise ValueError("a semseg tokenizer needs the number of classes: pass tokenizer.num_classes=K or use a "
                             "dataset whose meta.json lists semseg_classes")
    if diffusion:
        if modality != "rgb":
            raise ValueError("--diffusion-decoder is only available for --modality rgb")
        if tok.get("diffusion") is None:
            tok["diffusion"] = {}
    return _parse_training_config(data)


def _lr_at(step: int, steps: int, lr: float, warmup: int, min_ratio: float = 0.05) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return lr * (min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress)))


def _flip(batch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Random horizontal flips (W is axis 2 for (B, H, W[, C]))."""
    flip = rng.random(len(batch)) < 0.5
    out = batch.copy()
    out[flip] = out[flip][:, :, ::-1]
    return out


def evaluate_vq_tokenizer(tokenizer: Any, images: np.ndarray, batch_size: int = 128) -> dict[str, float]:
    """Round-trip metrics of a VQ tokenizer on a numpy batch in user units, plus codebook usage / perplexity."""
    from tokenizers_mm.metrics import codebook_usage, reconstruction_metrics

    ids = [tokenizer.encode(images[i:i + batch_size]) for i in range(0, len(images), batch_size)]
    recon = np.concatenate([tokenizer.decode(chunk) for chunk in ids])
    all_ids = np.concatenate([chunk.numpy() for chunk in ids])
    metrics = reconstruction_metrics(tokenizer.modality, recon, images, tokenizer.config.num_classes or None)
    usage = codebook_usage(all_ids, tokenizer.vocab_size)
    metrics.update(codebook_usage=usage["usage"], perplexity=usage["perplexity"])
    return metrics


def train_vq_tokenizer(
    config: Any,
    train_source: Source,
    val_source: Source | None,
    out_dir: str | Path | None,
    steps: int = 2000,
    batch_size: int = 8,
    lr: float = 3e-3,
    seed: int = 0,
    progress: bool = True,
    max_train_samples: int | None = None,
    max_val_samples: int = 256,
    bf16: bool = False,
    diffusion_steps: int = 0,
    diffusion_lr: float = 2e-3,
) -> dict[str, Any]:
    """Train a :class:`~tokenizers_mm.vq.VQTokenizer` and return metrics (also written to ``out_dir/metrics.json``).

    config: a ``VQTokenizerConfig``. train_source / val_source: dataset directories (``train`` / ``val`` split
    sub-directories are used when present), lists of raw samples, or stacked arrays in user units.
    steps, batch_size, lr, seed: optimisation (AdamW, 5% warmup then cosine to 5% of ``lr``).
    bf16: autocast the conv nets to bfloat16 on CPU (faster on CPUs with AMX/AVX512-BF16).
    diffusion_steps: when ``config.diffusion`` is set, train the diffusion decoder this many steps afterwards
        (encoder and codebook frozen) and report its PSNR too.
    Returns ``{"modality", "steps", "train_seconds", "final_loss", "val": {...metrics...}, ...}``.
    """
    import torch
    from tqdm.auto import tqdm

    from tokenizers_mm.vq import VQTokenizer

    if not isinstance(config, VQTokenizerConfig):
        raise TypeError(f"config must be a VQTokenizerConfig, got {type(config).__name__}")
    if steps < 1 or batch_size < 1 or lr <= 0:
        raise ValueError("steps and batch_size must be >= 1 and lr > 0")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    data = load_modality_array(train_source, config.modality, split="train", limit=max_train_samples)
    if data.shape[1:3] != (config.image_size, config.image_size):
        raise ValueError(
            f"training images are {data.shape[1]}x{data.shape[2]} but config.image_size is {config.image_size}; "
            f"set image_size={data.shape[1]}"
        )
    logger.info("training %s tokenizer on %d images (%s) for %d steps", config.modality, len(data), data.shape[1:], steps)
    if config.modality == "depth":
        outside = float(np.mean((data < config.depth_min) | (data > config.depth_max)))
        if outside > 0.01:
            logger.warning("%.1f%% of the training depth pixels are outside [depth_min, depth_max] = [%g, %g] m and "
                           "will be clamped; set tokenizer.depth_min / depth_max for this data",
                           100 * outside, config.depth_min, config.depth_max)

    model = VQTokenizer(config).train()
    params = [p for n, p in model.named_parameters() if not n.startswith("diffusion_decoder.") and p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0)
    warmup = max(1, steps // 20)
    start, cpu_start = time.perf_counter(), time.process_time()
    bar = tqdm(range(steps), desc=f"train {config.modality} tokenizer", disable=not progress, mininterval=1.0)
    ema_loss = None
    for step in bar:
        for group in opt.param_groups:
            group["lr"] = _lr_at(step, steps, lr, warmup)
        batch = _flip(data[rng.integers(0, len(data), batch_size)], rng)
        x = model.preprocess(batch)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = model(x)
        loss = out["loss"]
        if not torch.isfinite(loss):
            raise RuntimeError(f"loss became {loss.item()} at step {step}; lower the learning rate")
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        ema_loss = loss.item() if ema_loss is None else 0.95 * ema_loss + 0.05 * loss.item()
        if step % 10 == 0 or step == steps - 1:
            bar.set_postfix(loss=f"{ema_loss:.4f}", recon=f"{out['recon_loss'].item():.4f}")
    train_seconds = time.perf_counter() - start
    cpu_seconds = time.process_time() - cpu_start
    model.eval()

    result: dict[str, Any] = {
        "modality": config.modality, "steps": steps, "batch_size": batch_size, "lr": lr, "seed": seed,
        "train_images": int(len(data)), "train_seconds": round(train_seconds, 1),
        "train_cpu_seconds": round(cpu_seconds, 1), "threads": torch.get_num_threads(), "final_loss": ema_loss,
        "grid_size": config.grid_size, "vocab_size": config.vocab_size,
    }
    val = None
    if val_source is not None:
        val = load_modality_array(val_source, config.modality, split="val", limit=max_val_samples)
        result["val"] = evaluate_vq_tokenizer(model, val)
        result["val_images"] = int(len(val))
        logger.info("%s tokenizer val metrics: %s", config.modality, result["val"])

    if diffusion_steps > 0:
        if model.diffusion_decoder is None:
            raise ValueError("diffusion_steps > 0 needs config.diffusion (a diffusion decoder config); pass --diffusion-decoder")
        from tokenizers_mm.diffusion import train_diffusion_decoder

        result["diffusion"] = train_diffusion_decoder(
            model, data, val, steps=diffusion_steps, batch_size=batch_size, lr=diffusion_lr, seed=seed, progress=progress
        )

    if out_dir is not None:
        from tokenizers_mm.io_atomic import atomic_directory, write_json

        with atomic_directory(out_dir) as stage:  # weights, config and metrics together, or nothing
            model.save_pretrained(stage)
            write_json(stage / "metrics.json", result)
    result["tokenizer"] = model
    return result


def train_text_tokenizer(
    sources: str | Path | Sequence[str | Path | dict[str, Any]],
    out_dir: str | Path | None,
    vocab_size: int = 1024,
    num_sentinels: int = 32,
    num_loc_bins: int = 64,
    class_names: Sequence[str] | None = None,
    extra_texts: Sequence[str] = (),
    limit: int | None = None,
) -> Any:
    """Train a :class:`~tokenizers_mm.text.TextTokenizer` on the captions, questions, answers and box strings of
    ``sources`` (dataset directories, whose ``train`` split is read, and/or raw sample dicts) plus ``extra_texts``,
    and save it to ``out_dir`` (when not None). Returns the tokenizer.

    ``class_names`` default to the ``box_classes`` of the datasets' ``meta.json`` plus every box label seen.
    """
    from tokenizers_mm.text import TextTokenizer

    if isinstance(sources, (str, Path, dict)):
        sources = [sources]
    labels: set[str] = set()
    raw: list[dict[str, Any]] = []
    for src in sources:
        if isinstance(src, dict):
            raw.append(src)
        elif isinstance(src, (str, Path)):
            path = Path(src)
            meta_path = path / "meta.json"
            if meta_path.is_file():
                labels.update(json.loads(meta_path.read_text()).get("box_classes", []))
            raw += list(_iter_raw_samples(path, "train", limit, ["rgb", "boxes", "caption", "qa"]))
        else:
            raise TypeError(f"text tokenizer sources must be dataset paths or raw sample dicts, got {type(src).__name__}")
    for sample in raw:
        labels.update(b["label"] for b in sample.get("boxes") or [])
    texts = load_texts(raw, num_bins=num_loc_bins) + [t for t in extra_texts if t]
    if not texts:
        raise ValueError("no captions, questions, answers or boxes found to train the text tokenizer on")
    tokenizer = TextTokenizer.train(
        texts, vocab_size=vocab_size, num_sentinels=num_sentinels, num_loc_bins=num_loc_bins,
        class_names=sorted(class_names if class_names is not None else labels),
    )
    if out_dir is not None:
        tokenizer.save_pretrained(out_dir)
    return tokenizer


def train_tokenizer_bundle(
    data_dir: str | Path,
    out_dir: str | Path,
    grid_size: int = DEFAULT_GRID_SIZE,
    modalities: Sequence[str] = ("rgb", "depth", "semseg", "text"),
    steps_scale: float = 1.0,
    text_vocab_size: int = 1024,
    seed: int = 0,
    progress: bool = True,
) -> dict[str, Any]:
    """Train a whole tokenizer bundle (``out_dir/<modality>/``) on a dataset directory with the recommended configs.

    ``steps_scale`` multiplies every recommended step count (e.g. 0.5 for a quicker, slightly worse bundle).
    Returns ``{modality: metrics}`` (image tokenizers: the ``train_vq_tokenizer`` result without the model;
    text: ``{"vocab_size": V}``).
    """
    out_dir = Path(out_dir)
    results: dict[str, Any] = {}
    for modality in modalities:
        if modality == "text":
            tok = train_text_tokenizer(data_dir, out_dir / "text", vocab_size=text_vocab_size)
            results["text"] = {"vocab_size": tok.vocab_size}
            continue
        cfg = load_vq_training_config(modality, data_dir=data_dir, grid_size=grid_size)
        opts = cfg.training
        result = train_vq_tokenizer(
            cfg.tokenizer, data_dir, data_dir, out_dir / modality, steps=max(1, round(opts.steps * steps_scale)),
            batch_size=opts.batch_size, lr=opts.lr, seed=seed, progress=progress,
            max_train_samples=opts.max_train_samples, max_val_samples=opts.max_val_samples, bf16=opts.bf16,
        )
        result.pop("tokenizer", None)
        results[modality] = result
    return results
