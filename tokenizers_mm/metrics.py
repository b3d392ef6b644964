"""Reconstruction and codebook metrics for tokenizers (numpy in, floats out).

All functions take batches in user units (docs/internals.md §1) and return plain floats:
- :func:`psnr`: rgb uint8, mean over images of the per-image PSNR (peak 255; an exact image counts as 100 dB).
- :func:`depth_abs_rel`, :func:`depth_delta1`: depth in metres, over pixels with ground truth > 0.
- :func:`pixel_accuracy`, :func:`mean_iou`: class-id maps; mIoU averages over classes present in prediction or
  ground truth.
- :func:`codebook_usage`: fraction of the vocabulary used and the perplexity of the code distribution.
"""

from __future__ import annotations

from typing import Any

import numpy as np

__all__ = ["psnr", "depth_abs_rel", "depth_delta1", "pixel_accuracy", "mean_iou", "codebook_usage",
           "reconstruction_metrics"]

PSNR_CAP = 100.0


def _pair(pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    pred, target = np.asarray(pred), np.asarray(target)
    if pred.shape != target.shape:
        raise ValueError(f"prediction shape {pred.shape} != target shape {target.shape}")
    if pred.size == 0:
        raise ValueError("empty arrays: nothing to score")
    return pred, target


def psnr(pred: Any, target: Any, peak: float = 255.0) -> float:
    """Mean per-image PSNR in dB of uint8 images ``(B, H, W, 3)`` (or one ``(H, W, 3)``)."""
    pred, target = _pair(pred, target)
    if pred.ndim == 3:
        pred, target = pred[None], target[None]
    diff = pred.astype(np.float64) - target.astype(np.float64)
    mse = (diff ** 2).reshape(diff.shape[0], -1).mean(axis=1)
    with np.errstate(divide="ignore"):
        values = np.where(mse > 0, 10.0 * np.log10(peak ** 2 / np.maximum(mse, 1e-300)), PSNR_CAP)
    return float(np.minimum(values, PSNR_CAP).mean())


def _valid_depth(pred: Any, target: Any) -> tuple[np.ndarray, np.ndarray]:
    pred, target = _pair(pred, target)
    pred, target = pred.astype(np.float64), target.astype(np.float64)
    valid = target > 0
    if not valid.any():
        raise ValueError("no pixel with ground-truth depth > 0")
    return np.maximum(pred[valid], 1e-6), target[valid]


def depth_abs_rel(pred: Any, target: Any) -> float:
    """Mean of |pred - gt| / gt over valid pixels (lower is better)."""
    p, t = _valid_depth(pred, target)
    return float(np.mean(np.abs(p - t) / t))


def depth_delta1(pred: Any, target: Any, threshold: float = 1.25) -> float:
    """Fraction of valid pixels with max(pred/gt, gt/pred) < 1.25 (higher is better)."""
    p, t = _valid_depth(pred, target)
    return float(np.mean(np.maximum(p / t, t / p) < threshold))


def pixel_accuracy(pred: Any, target: Any) -> float:
    """Fraction of pixels whose class id matches."""
    pred, target = _pair(pred, target)
    return float(np.mean(pred == target))


def mean_iou(pred: Any, target: Any, num_classes: int | None = None) -> float:
    """Mean IoU over classes that appear in the prediction or the ground truth."""
    pred, target = _pair(pred, target)
    pred, target = pred.astype(np.int64).ravel(), target.astype(np.int64).ravel()
    k = int(num_classes) if num_classes else int(max(pred.max(), target.max())) + 1
    conf = np.bincount(target * k + pred, minlength=k * k).reshape(k, k)  # rows: gt, cols: pred
    inter = np.diag(conf).astype(np.float64)
    union = conf.sum(0) + conf.sum(1) - np.diag(conf)
    present = union > 0
    return float(np.mean(inter[present] / union[present]))


def codebook_usage(ids: Any, vocab_size: int) -> dict[str, float]:
    """``{"usage": fraction of the vocab used at least once, "perplexity": exp(entropy of code frequencies)}``."""
    ids = np.asarray(ids).ravel().astype(np.int64)
    if ids.size == 0:
        raise ValueError("no token ids to measure codebook usage on")
    counts = np.bincount(ids, minlength=vocab_size).astype(np.float64)
    p = counts / counts.sum()
    nz = p[p > 0]
    return {"usage": float((counts > 0).sum() / vocab_size), "perplexity": float(np.exp(-(nz * np.log(nz)).sum()))}


def reconstruction_metrics(modality: str, recon: Any, target: Any, num_classes: int | None = None) -> dict[str, float]:
    """The standard round-trip metrics of one modality: rgb -> psnr; depth -> abs_rel, delta1; semseg ->
    pixel_accuracy, miou."""
    if modality == "rgb":
        return {"psnr": psnr(recon, target)}
    if modality == "depth":
        return {"abs_rel": depth_abs_rel(recon, target), "delta1": depth_delta1(recon, target)}
    if modality == "semseg":
        return {"pixel_accuracy": pixel_accuracy(recon, target), "miou": mean_iou(recon, target, num_classes)}
    raise ValueError(f"no reconstruction metrics for modality {modality!r}; use rgb, depth or semseg")
