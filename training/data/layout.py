"""The dataset folder layouts that ``onemodel data convert`` and ``onemodel fit`` accept, and the seeded
validation split made when a dataset has none.

Layouts (checked in this order):

- ``shard_splits``: ``DATA/train/*.tar`` (+ ``val/``, ``test/``): webdataset shards of the raw format, one
  sub-folder per split (what ``onemodel data shapes`` writes);
- ``shards``: ``DATA/*.tar``: raw shards of one set;
- ``imagefolder_splits``: ``DATA/train/``, ``DATA/validation/``, ``DATA/test/``, each an image folder
  (images + ``metadata.jsonl`` or ``metadata.csv``), the Hugging Face split layout;
- ``imagefolder``: ``DATA/metadata.jsonl`` (or ``metadata.csv``) + images, or images alone (rgb-only samples).

Split folder names are normalised: ``validation``, ``valid``, ``dev`` -> ``val``; ``training`` -> ``train``;
``testing`` -> ``test``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

__all__ = ["DataLayout", "detect_layout", "split_name", "expected_layouts", "split_off_validation",
           "validation_size", "METADATA_FILES"]

logger = logging.getLogger(__name__)

METADATA_FILES = ("metadata.jsonl", "metadata.csv")
_SPLIT_ALIASES = {"train": "train", "training": "train", "val": "val", "valid": "val", "validation": "val",
                  "dev": "val", "test": "test", "testing": "test"}
_IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


def expected_layouts(path: str | Path) -> str:
    """The accepted layouts, as shown in the error for a folder that is none of them."""
    return (
        f"{path} is not a dataset folder onemodel can read. Expected one of:\n"
        "  DATA/metadata.jsonl (or metadata.csv) + images        one set (a validation split is made)\n"
        "  DATA/train/metadata.jsonl, DATA/validation/..., DATA/test/...   Hugging Face split folders\n"
        "  DATA/*.tar  or  DATA/train/*.tar, DATA/val/*.tar ...  webdataset shards of the raw format\n"
        "metadata.jsonl: one JSON object per line, e.g. "
        '{"file_name": "cat.png", "caption": "a cat", "qa": [{"question": "what animal?", "answer": "cat"}]}'
    )


def split_name(folder_name: str) -> str | None:
    """The normalised split name of a folder name (``validation`` -> ``val``), or None if it is not a split."""
    return _SPLIT_ALIASES.get(folder_name.lower())


@dataclass
class DataLayout:
    """What ``detect_layout`` found: ``kind`` (see the module docstring) and ``splits``: normalised split name ->
    folder (a one-set layout has the single split ``"all"``)."""

    kind: Literal["shard_splits", "shards", "imagefolder_splits", "imagefolder"]
    root: Path
    splits: dict[str, Path] = field(default_factory=dict)

    @property
    def is_shards(self) -> bool:
        return self.kind in ("shards", "shard_splits")


def _has_metadata(folder: Path) -> bool:
    return any((folder / name).is_file() for name in METADATA_FILES)


def _has_images(folder: Path, recursive: bool) -> bool:
    paths = folder.rglob("*") if recursive else folder.iterdir()
    return any(p.is_file() and p.suffix.lower() in _IMAGE_EXTENSIONS for p in paths)


def detect_layout(path: str | Path) -> DataLayout:
    """Find the layout of a dataset folder; ``FileNotFoundError`` if it does not exist, ``ValueError`` (listing
    the expected layouts) if it is none of them or mixes them."""
    root = Path(path)
    if not root.is_dir():
        raise FileNotFoundError(f"dataset folder {root} does not exist")
    split_dirs: dict[str, Path] = {}
    for sub in sorted(p for p in root.iterdir() if p.is_dir()):
        name = split_name(sub.name)
        if name is None:
            continue
        if name in split_dirs:
            raise ValueError(f"{root} has two folders for the {name!r} split: {split_dirs[name].name}/ and {sub.name}/; "
                             "keep one")
        split_dirs[name] = sub
    if any(root.glob("*.tar")):
        return DataLayout("shards", root, {"all": root})
    shard_splits = {n: p for n, p in split_dirs.items() if any(p.glob("*.tar"))}
    if shard_splits:
        if len(shard_splits) != len(split_dirs):
            other = sorted(p.name for n, p in split_dirs.items() if n not in shard_splits)
            raise ValueError(f"{root}: split folders {other} hold no *.tar shards while the others do; "
                             "give every split the same format")
        return DataLayout("shard_splits", root, shard_splits)
    if _has_metadata(root):
        return DataLayout("imagefolder", root, {"all": root})
    image_splits = {n: p for n, p in split_dirs.items() if _has_metadata(p) or _has_images(p, recursive=True)}
    if image_splits:
        return DataLayout("imagefolder_splits", root, image_splits)
    if _has_images(root, recursive=True):
        return DataLayout("imagefolder", root, {"all": root})
    raise ValueError(expected_layouts(root))


def validation_size(num_samples: int, fraction: float) -> int:
    """Samples moved to the validation split: ``round(fraction * N)``, at least 1, at most 1000, leaving at least
    one training sample."""
    if num_samples < 2:
        raise ValueError(f"a dataset needs at least 2 samples to make a validation split, got {num_samples}")
    if not 0 < fraction < 1:
        raise ValueError(f"the validation fraction must be in (0, 1), got {fraction}")
    return int(min(max(1, round(fraction * num_samples)), 1000, num_samples - 1))


def split_off_validation(source: str | Path, train_out: str | Path, val_out: str | Path, fraction: float = 0.1,
                         seed: int = 0, progress: bool = False) -> dict[str, Any]:
    """Split the raw shards of ``source`` into ``train_out`` and ``val_out``: a seeded random ``fraction`` of the
    samples (see :func:`validation_size`) goes to validation. The same source, fraction and seed always give the
    same split. Returns ``{"train": N, "val": M, "val_keys": [...]}``."""
    from training.data.reader import iter_samples
    from training.data.shards import write_shards

    samples = list(iter_samples(Path(source)))
    n_val = validation_size(len(samples), fraction)
    order = np.random.default_rng(seed).permutation(len(samples))
    val_idx = set(order[:n_val].tolist())
    val = [s for i, s in enumerate(samples) if i in val_idx]
    train = [s for i, s in enumerate(samples) if i not in val_idx]
    write_shards(train, train_out, progress=progress, desc="train split", overwrite=True)
    write_shards(val, val_out, progress=progress, desc="validation split", overwrite=True)
    logger.info("validation split: %d of %d samples (fraction %.2f, seed %d)", n_val, len(samples), fraction, seed)
    return {"train": len(train), "val": len(val), "val_keys": sorted(s["__key__"] for s in val)}
