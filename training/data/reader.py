"""Stream raw samples from webdataset shards: resolve, decode, validate, resize; corrupt data is skipped.

``make_pipeline`` builds a ``webdataset.DataPipeline`` (a torch ``IterableDataset``):

    shard list (shuffled by ``shuffle_seed``) -> split by node (DDP rank) -> split by DataLoader worker
    -> tar -> sample files -> [seeded shuffle buffer] -> decode + validate + select modalities + resize

Use it directly (``iter_samples`` / ``load_samples``) or in a DataLoader::

    loader = torch.utils.data.DataLoader(make_pipeline("data/shapes/train", resolution=64, shuffle_seed=epoch),
                                         batch_size=None, num_workers=4)

With workers, each worker reads a disjoint subset of the shards (webdataset's ``split_by_worker``), and under
``torch.distributed`` / ``accelerate`` each rank reads a disjoint subset (``split_by_node``): give a dataset
at least ``num_workers * world_size`` shards, or some workers get nothing. Order is deterministic for a
given ``shuffle_seed`` and worker/rank layout; change the seed per epoch to reshuffle. ``shuffle_seed=None``
reads shards and samples in file order.

Resizing makes every spatial modality ``resolution x resolution``: the shorter side is scaled to
``resolution`` and the longer one centre-cropped (square inputs are simply scaled). rgb uses area averaging
when shrinking and bilinear when enlarging; semseg and depth use nearest neighbour, so class ids stay valid
and depth keeps exact surface values (no "flying pixels" between objects); boxes are scaled, shifted, clipped
and dropped if nothing is left. The shapes ``scene`` graph stays in its own coordinates
(``scene["resolution"]``).
"""

from __future__ import annotations

import glob
import logging
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from training.data.shards import MODALITY_FILES, decode_sample, validate_sample

__all__ = ["resolve_shards", "make_pipeline", "iter_samples", "load_samples", "resize_sample"]

logger = logging.getLogger(__name__)

Source = str | Path | Sequence[str | Path]


def _is_remote(s: str) -> bool:
    return "://" in s or s.startswith("pipe:")


def resolve_shards(source: Source) -> list[str]:
    """Shard paths of ``source``: a directory of ``*.tar`` shards (e.g. ``DATA/train``), a single ``.tar``,
    a glob (``DATA/train/shard-00000*.tar``), a brace pattern (``shard-{000000..000009}.tar``), a URL /
    ``pipe:`` spec (passed through to webdataset) or a list of any of these. Order: sorted within each entry.

    Raises ``FileNotFoundError`` when nothing matches and ``ValueError`` for a dataset root holding split
    sub-directories (pass one split, e.g. ``DATA/train``)."""
    if isinstance(source, (list, tuple)):
        if not source:
            raise ValueError("empty list of shard sources")
        return [shard for item in source for shard in resolve_shards(item)]
    if not isinstance(source, (str, Path)):
        raise TypeError(f"shard source must be a path, glob, or list of them, got {type(source).__name__}")
    s = str(source)
    if _is_remote(s):
        return [s]
    if "{" in s and ".." in s:
        import braceexpand  # a webdataset dependency

        return resolve_shards(list(braceexpand.braceexpand(s)))
    if any(ch in s for ch in "*?["):
        found = sorted(p for p in glob.glob(s) if Path(p).is_file())
        if not found:
            raise FileNotFoundError(f"no shard files match {s!r}")
        return found
    path = Path(s)
    if path.is_dir():
        shards = sorted(str(p) for p in path.glob("*.tar") if p.is_file())
        if shards:
            return shards
        splits = sorted(p.name for p in path.iterdir() if p.is_dir() and any(p.glob("*.tar")))
        if splits:
            raise ValueError(
                f"{path} is a dataset root with splits {splits}: pass one split directory, e.g. {path / splits[0]}"
            )
        raise FileNotFoundError(f"no *.tar shards in {path}: make some with `onemodel data shapes` or `data convert`")
    if path.is_file():
        if not s.endswith(".tar"):
            raise ValueError(f"{s} is not a .tar shard")
        return [s]
    raise FileNotFoundError(f"shard source {s} does not exist")


def _resize_image(array: np.ndarray, size: tuple[int, int], resample: Image.Resampling) -> np.ndarray:
    """Resize a (H, W[, C]) array to size=(width, height) with PIL; dtype preserved."""
    if array.dtype == np.float32:
        return np.asarray(Image.fromarray(array, mode="F").resize(size, resample), dtype=np.float32)
    return np.asarray(Image.fromarray(array).resize(size, resample), dtype=array.dtype)


def resize_sample(sample: dict[str, Any], resolution: int) -> dict[str, Any]:
    """A copy of ``sample`` with rgb/depth/semseg of size ``resolution x resolution`` and boxes adjusted
    (shorter side scaled to ``resolution``, longer side centre-cropped; see the module docstring)."""
    if isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1:
        raise ValueError(f"resolution must be a positive int, got {resolution!r}")
    out = dict(sample)
    sizes = [sample[k].shape[:2] for k in ("rgb", "depth", "semseg") if k in sample]
    if not sizes:
        return out
    h, w = sizes[0]
    if (h, w) == (resolution, resolution):
        return out
    scale = resolution / min(h, w)
    nw, nh = max(resolution, round(w * scale)), max(resolution, round(h * scale))
    left, top = (nw - resolution) // 2, (nh - resolution) // 2
    crop = (slice(top, top + resolution), slice(left, left + resolution))
    if "rgb" in sample:
        resample = Image.Resampling.BOX if nw < w else Image.Resampling.BILINEAR
        out["rgb"] = np.ascontiguousarray(_resize_image(sample["rgb"], (nw, nh), resample)[crop])
    for k in ("depth", "semseg"):
        if k in sample:
            out[k] = np.ascontiguousarray(_resize_image(sample[k], (nw, nh), Image.Resampling.NEAREST)[crop])
    if "boxes" in sample:
        sx, sy = nw / w, nh / h
        boxes = []
        for b in sample["boxes"]:
            x0, y0, x1, y1 = b["box"]
            x0, x1 = (min(max(x * sx - left, 0.0), resolution) for x in (x0, x1))
            y0, y1 = (min(max(y * sy - top, 0.0), resolution) for y in (y0, y1))
            if x1 > x0 and y1 > y0:
                boxes.append({**b, "box": [x0, y0, x1, y1]})
        out["boxes"] = boxes
    return out


def _log_and_continue(exn: Exception) -> bool:
    """webdataset handler: log a corrupt shard / file and go on."""
    logger.warning("skipping corrupt shard data: %s: %s", type(exn).__name__, exn)
    return True


def _check_modalities(modalities: Iterable[str] | None) -> frozenset[str] | None:
    if modalities is None:
        return None
    if isinstance(modalities, str):
        raise TypeError("modalities must be a list of names, e.g. ['rgb', 'caption'], not a string")
    names = frozenset(modalities)
    unknown = sorted(names - set(MODALITY_FILES))
    if unknown:
        raise ValueError(f"unknown modalities {unknown}: choose from {list(MODALITY_FILES)}")
    return names


class _Decode:
    """Pipeline stage: shard files -> validated, filtered, resized raw samples; corrupt samples are skipped."""

    def __init__(self, resolution: int | None, modalities: frozenset[str] | None, require: frozenset[str] | None):
        self.resolution = resolution
        self.modalities = modalities
        self.require = require

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        for files in src:
            key = files.get("__key__")
            try:
                sample = decode_sample(files)
                missing = sorted(self.require - set(sample)) if self.require else []
                if missing:
                    raise ValueError(f"missing required modalities {missing} (incomplete or truncated shard?)")
                sample = {k: v for k, v in sample.items() if k in ("__key__", "__url__") or k in MODALITY_FILES}
                if self.modalities is not None:
                    sample = {k: v for k, v in sample.items() if k.startswith("__") or k in self.modalities}
                if self.resolution is not None:
                    sample = resize_sample(sample, self.resolution)
                    validate_sample(sample)
            except Exception as err:  # noqa: BLE001 - any corrupt sample is skipped, never fatal
                logger.warning("skipping corrupt sample %s (%s): %s", key, files.get("__url__"), err)
                continue
            if not any(k in MODALITY_FILES for k in sample):
                logger.debug("sample %s has none of the requested modalities", key)
                continue
            yield sample


class _SeededShuffle:
    """Pipeline stage: shuffle buffer with an RNG seeded by (seed, rank, worker): deterministic per worker."""

    def __init__(self, bufsize: int, seed: int):
        self.bufsize = bufsize
        self.seed = seed

    def __call__(self, src: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        from webdataset.utils import pytorch_worker_info

        rank, _, worker, _ = pytorch_worker_info()
        rng = random.Random(f"{self.seed}-{rank}-{worker}")
        buf: list[dict[str, Any]] = []
        for item in src:
            if len(buf) < self.bufsize:
                buf.append(item)
                continue
            i = rng.randrange(len(buf))
            buf[i], item = item, buf[i]
            yield item
        rng.shuffle(buf)
        yield from buf


def make_pipeline(
    source: Source,
    resolution: int | None = None,
    shuffle_seed: int | None = None,
    modalities: Iterable[str] | None = None,
    shuffle_buffer: int = 0,
    require: Iterable[str] | None = None,
):
    """A ``webdataset.DataPipeline`` (torch ``IterableDataset``) yielding raw-sample dicts.

    source: see ``resolve_shards``. resolution: resize to this square size (None = keep). shuffle_seed: None =
    file order; an int shuffles the shard order with that seed and, if ``shuffle_buffer > 0``, samples within a
    buffer of that many samples. modalities: keep only these (None = all present); samples having none of them
    are skipped. require: samples lacking any of these modalities are logged and skipped (a sample cut short by
    a truncated shard loses its last files; Python's tarfile ends a shard cut at a file boundary silently)."""
    import webdataset as wds

    shards = resolve_shards(source)
    wanted = _check_modalities(modalities)
    required = _check_modalities(require)
    if wanted is not None and required is not None and not required <= wanted:
        raise ValueError(f"require {sorted(required)} must be a subset of modalities {sorted(wanted)}")
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
        raise ValueError(f"resolution must be a positive int or None, got {resolution!r}")
    if shuffle_buffer < 0:
        raise ValueError(f"shuffle_buffer must be >= 0, got {shuffle_buffer}")
    if shuffle_seed is not None:
        random.Random(shuffle_seed).shuffle(shards)
    select = None
    if wanted is not None:  # skip unread files early
        suffixes = tuple("." + MODALITY_FILES[m] for m in wanted)

        def select(name: str) -> bool:
            return name.endswith(suffixes)

    stages: list[Any] = [
        wds.SimpleShardList(shards),
        wds.split_by_node,
        wds.split_by_worker,
        wds.tarfile_to_samples(handler=_log_and_continue, select_files=select),
    ]
    if shuffle_seed is not None and shuffle_buffer > 0:
        stages.append(_SeededShuffle(shuffle_buffer, shuffle_seed))
    stages.append(_Decode(resolution, wanted, required))
    return wds.DataPipeline(*stages)


def iter_samples(
    source: Source,
    resolution: int | None = None,
    shuffle_seed: int | None = None,
    modalities: Iterable[str] | None = None,
    shuffle_buffer: int = 0,
    require: Iterable[str] | None = None,
) -> Iterator[dict[str, Any]]:
    """Stream raw samples (docs/internals.md section 1) from shards; see ``make_pipeline``."""
    yield from make_pipeline(source, resolution, shuffle_seed, modalities, shuffle_buffer, require)


def load_samples(
    source: Source,
    limit: int | None = None,
    resolution: int | None = None,
    shuffle_seed: int | None = None,
    modalities: Iterable[str] | None = None,
    shuffle_buffer: int = 0,
    require: Iterable[str] | None = None,
) -> list[dict[str, Any]]:
    """The first ``limit`` samples (all if None) of ``iter_samples(...)`` as a list."""
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0 or None, got {limit}")
    out = []
    if limit == 0:
        return out
    for sample in iter_samples(source, resolution, shuffle_seed, modalities, shuffle_buffer, require):
        out.append(sample)
        if limit is not None and len(out) >= limit:
            break
    return out
