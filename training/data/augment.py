"""Input-side image augmentation that keeps the labels true, applied to raw samples before tokenization.

``augment_sample`` draws a random resized crop (the same crop for rgb, depth, semseg and boxes, resized back to
the original size) and a small colour jitter of rgb (brightness, contrast, saturation). No flips by default:
captions and answers may name left and right. Crops are mild (at least ``min_scale`` of the area), so the
objects a caption or answer names stay in view in almost every copy.

``write_augmented_split`` writes a split's samples plus ``copies`` augmented copies of each (keys
``KEY_augN``) as raw shards; pre-tokenizing those shards gives the model several token versions of every
training image (token inputs cannot be augmented after tokenization). The copies are a pure function of
``(seed, sample index, copy)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = ["AugmentConfig", "augment_sample", "write_augmented_split"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AugmentConfig:
    """min_scale: smallest crop area as a fraction of the image; max_aspect: largest crop aspect-ratio change
    (log-uniform in [1/max_aspect, max_aspect]); brightness / contrast / saturation: largest relative change
    (factor drawn uniformly in [1 - x, 1 + x]); hflip: also mirror half of the copies (off: text may say
    left / right)."""

    min_scale: float = 0.7
    max_aspect: float = 4 / 3
    brightness: float = 0.1
    contrast: float = 0.1
    saturation: float = 0.1
    hflip: bool = False

    def __post_init__(self) -> None:
        if not 0 < self.min_scale <= 1:
            raise ValueError(f"augment min_scale must be in (0, 1], got {self.min_scale}")
        if self.max_aspect < 1:
            raise ValueError(f"augment max_aspect must be >= 1, got {self.max_aspect}")
        for name in ("brightness", "contrast", "saturation"):
            if not 0 <= getattr(self, name) < 1:
                raise ValueError(f"augment {name} must be in [0, 1), got {getattr(self, name)}")


def _crop_box(h: int, w: int, cfg: AugmentConfig, rng: np.random.Generator) -> tuple[int, int, int, int]:
    """(top, left, height, width) of a random crop of area in [min_scale, 1] and bounded aspect change."""
    for _ in range(10):
        area = rng.uniform(cfg.min_scale, 1.0) * h * w
        aspect = float(np.exp(rng.uniform(-np.log(cfg.max_aspect), np.log(cfg.max_aspect))))
        ch, cw = int(round(np.sqrt(area / aspect))), int(round(np.sqrt(area * aspect)))
        if 0 < ch <= h and 0 < cw <= w:
            return int(rng.integers(0, h - ch + 1)), int(rng.integers(0, w - cw + 1)), ch, cw
    return 0, 0, h, w


def _resize(array: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    if array.dtype == np.float32:
        return np.asarray(Image.fromarray(array, mode="F").resize(size, resample), dtype=np.float32)
    return np.asarray(Image.fromarray(array).resize(size, resample), dtype=array.dtype)


def _jitter(rgb: np.ndarray, cfg: AugmentConfig, rng: np.random.Generator) -> np.ndarray:
    x = rgb.astype(np.float32)
    b = rng.uniform(1 - cfg.brightness, 1 + cfg.brightness)
    c = rng.uniform(1 - cfg.contrast, 1 + cfg.contrast)
    s = rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
    x = x * b
    x = (x - x.mean()) * c + x.mean()
    grey = x @ np.array([0.299, 0.587, 0.114], dtype=np.float32)
    x = (x - grey[..., None]) * s + grey[..., None]
    return np.clip(np.rint(x), 0, 255).astype(np.uint8)


def augment_sample(sample: dict[str, Any], rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()) -> dict[str, Any]:
    """An augmented copy of a raw sample: one random resized crop for every spatial modality (rgb bilinear, depth
    and semseg nearest, boxes moved, clipped and dropped when less than a quarter of them stays in view), colour
    jitter on rgb; text is kept. The shapes ``scene`` graph (in original coordinates) is dropped."""
    out = {k: v for k, v in sample.items() if k != "scene"}
    spatial = [k for k in ("rgb", "depth", "semseg") if k in sample]
    if not spatial:
        return out
    h, w = np.asarray(sample[spatial[0]]).shape[:2]
    top, left, ch, cw = _crop_box(h, w, cfg, rng)
    flip = cfg.hflip and rng.random() < 0.5
    for name in spatial:
        arr = np.ascontiguousarray(np.asarray(sample[name])[top:top + ch, left:left + cw])
        resample = Image.Resampling.BILINEAR if name == "rgb" else Image.Resampling.NEAREST
        arr = _resize(arr, (w, h), resample)
        out[name] = np.ascontiguousarray(arr[:, ::-1]) if flip else arr
    if "rgb" in out:
        out["rgb"] = _jitter(out["rgb"], cfg, rng)
    if "boxes" in sample:
        sx, sy = w / cw, h / ch
        boxes = []
        for b in sample["boxes"]:
            x0, y0, x1, y1 = (float(v) for v in b["box"])
            area = max(x1 - x0, 0.0) * max(y1 - y0, 0.0)
            cx0, cy0 = max(x0, left), max(y0, top)
            cx1, cy1 = min(x1, left + cw), min(y1, top + ch)
            if cx1 <= cx0 or cy1 <= cy0 or (cx1 - cx0) * (cy1 - cy0) < 0.25 * area:
                continue
            nb = [(cx0 - left) * sx, (cy0 - top) * sy, (cx1 - left) * sx, (cy1 - top) * sy]
            if flip:
                nb = [w - nb[2], nb[1], w - nb[0], nb[3]]
            boxes.append({**b, "box": [min(max(v, 0.0), lim) for v, lim in zip(nb, (w, h, w, h))]})
        out["boxes"] = boxes
    return out


def write_augmented_split(source: str | Path, out_dir: str | Path, copies: int, seed: int = 0,
                          cfg: AugmentConfig = AugmentConfig(), progress: bool = False) -> int:
    """Write every sample of the raw shards ``source`` and ``copies`` augmented copies of it to ``out_dir``;
    returns the number of samples written."""
    from training.data.reader import iter_samples
    from training.data.shards import write_shards

    if copies < 0:
        raise ValueError(f"augmentation copies must be >= 0, got {copies}")

    def samples():
        for index, sample in enumerate(iter_samples(Path(source))):
            sample = {k: v for k, v in sample.items() if k != "__url__"}
            yield sample
            for copy in range(copies):
                rng = np.random.default_rng([seed, index, copy])
                aug = augment_sample(sample, rng, cfg)
                aug["__key__"] = f"{sample['__key__']}_aug{copy + 1}"
                yield aug

    paths = write_shards(samples(), out_dir, progress=progress, desc="augmenting", overwrite=True)
    count = 0
    for p in paths:
        import tarfile

        with tarfile.open(p) as tar:
            count += len({m.name.split(".", 1)[0] for m in tar if m.isfile()})
    logger.info("wrote %d samples (%d augmented copies each) to %s", count, copies, out_dir)
    return count
