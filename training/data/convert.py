"""Bring your own data: an image folder in the Hugging Face ``imagefolder`` convention -> raw-sample shards.

The folder holds images and a ``metadata.jsonl`` with one JSON object per line::

    {"file_name": "cat.png", "caption": "a cat on a mat", "qa": [{"question": "what animal?", "answer": "cat"}],
     "depth_file": "cat_depth.npy", "semseg_file": "cat_seg.png",
     "boxes": [{"box": [10, 20, 50, 60], "label": "cat"}]}

Only ``file_name`` is required; every other field is optional, so a sample may carry any subset of modalities:

- ``caption`` (or ``text``): a string.
- ``qa``: a list of ``{"question": str, "answer": str}``.
- ``depth_file``: a ``.npy`` array (H, W) of depth in metres, or a 16-bit PNG of depth in millimetres
  (divided by 1000). Must match the image size.
- ``semseg_file``: an 8-bit PNG (mode L or palette P) whose pixel values are class ids, 0 = background.
  Must match the image size.
- ``boxes``: a list of ``{"box": [x0, y0, x1, y1], "label": str}`` in pixels (x1, y1 exclusive).

``metadata.csv`` works too (one row per image, a ``file_name`` column): ``caption``/``text``, ``depth_file`` and
``semseg_file`` columns as above; ``question`` + ``answer`` columns give one QA pair, and ``qa`` / ``boxes``
columns hold the JSON of the fields above. Empty cells are absent fields.

Other fields are ignored. Paths are relative to the folder. Without ``metadata.jsonl`` every image of the folder
becomes an rgb-only sample. Rows with a missing or unreadable file, wrong types or a depth / semseg map of the
wrong size are skipped and reported with their line number and reason; a malformed JSON line is reported the
same way. The conversion fails (``ValueError``) only if no valid sample remains.

``convert_dataset`` takes any layout of ``training.data.layout`` (one folder, or Hugging Face ``train/``,
``validation/``, ``test/`` split folders): each split folder is converted into ``OUT/<split>`` (``validation`` ->
``val``), never merged, and ``OUT/meta.json`` describes them all.
"""

from __future__ import annotations

import csv
import json
import logging
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError

from training.data.reader import resize_sample
from training.data.shards import validate_sample, write_meta, write_shards

__all__ = ["ConversionReport", "convert_image_folder", "convert_dataset", "IMAGE_EXTENSIONS"]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")


@dataclass
class ConversionReport:
    """What ``convert_image_folder`` did.

    written: number of samples written. skipped: ``(line_no, file_name, reason)`` per skipped row (line_no is
    the 1-based line of metadata.jsonl, 0 without metadata). shards: written shard paths.
    modality_counts: samples carrying each modality."""

    out_dir: Path
    written: int = 0
    skipped: list[tuple[int, str, str]] = field(default_factory=list)
    shards: list[Path] = field(default_factory=list)
    modality_counts: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [f"wrote {self.written} sample(s) to {len(self.shards)} shard(s) in {self.out_dir}"]
        if self.modality_counts:
            lines.append("modalities: " + ", ".join(f"{k} {v}" for k, v in sorted(self.modality_counts.items())))
        lines.append(f"skipped {len(self.skipped)} row(s)" + (":" if self.skipped else ""))
        lines += [f"  line {n}: {name or '?'}: {reason}" for n, name, reason in self.skipped]
        return "\n".join(lines)


class _RowError(Exception):
    """A metadata row that cannot become a sample (reason in the message)."""


def _sample_key(file_name: str, used: set[str]) -> str:
    """A webdataset-safe unique key from a file name ("dir/cat.v2.png" -> "dir_cat_v2")."""
    stem = str(Path(file_name).with_suffix(""))
    base = re.sub(r"[^A-Za-z0-9_-]+", "_", stem).strip("_") or "sample"
    key, n = base, 1
    while key in used:
        n += 1
        key = f"{base}_{n}"
    used.add(key)
    return key


def _resolve(root: Path, rel: Any, what: str) -> Path:
    if not isinstance(rel, str) or not rel:
        raise _RowError(f"{what} must be a non-empty string, got {type(rel).__name__}")
    path = (root / rel).resolve()
    if root.resolve() not in path.parents:
        raise _RowError(f"{what} {rel!r} points outside the folder")
    if not path.is_file():
        raise _RowError(f"{what} {rel!r} not found")
    return path


def _load_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            im.load()
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (UnidentifiedImageError, OSError, ValueError) as err:
        raise _RowError(f"unreadable image ({type(err).__name__}: {err})") from err


def _load_depth(path: Path) -> np.ndarray:
    try:
        if path.suffix.lower() == ".npy":
            depth = np.load(path, allow_pickle=False)
            if depth.ndim == 3 and depth.shape[-1] == 1:
                depth = depth[..., 0]
            if depth.ndim != 2 or not np.issubdtype(depth.dtype, np.number):
                raise _RowError(f"depth .npy must be a numeric (H, W) array, got {depth.dtype} {depth.shape}")
            depth = depth.astype(np.float32)
        elif path.suffix.lower() == ".png":
            with Image.open(path) as im:
                if im.mode not in ("I;16", "I;16B", "I;16L", "I"):
                    raise _RowError(f"depth png must be 16-bit millimetres, got mode {im.mode}")
                depth = np.asarray(im, dtype=np.float32) / 1000.0
        else:
            raise _RowError(f"depth_file must be .npy (metres) or 16-bit .png (millimetres), got {path.name}")
    except _RowError:
        raise
    except (OSError, ValueError, UnidentifiedImageError) as err:
        raise _RowError(f"unreadable depth file ({type(err).__name__}: {err})") from err
    if not np.isfinite(depth).all() or (depth < 0).any():
        raise _RowError("depth must be finite and >= 0 metres")
    return depth


def _load_semseg(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            if im.mode not in ("L", "P"):
                raise _RowError(f"semseg png must be 8-bit class ids (mode L or P), got mode {im.mode}")
            return np.array(im, dtype=np.uint8)
    except _RowError:
        raise
    except (OSError, ValueError, UnidentifiedImageError) as err:
        raise _RowError(f"unreadable semseg file ({type(err).__name__}: {err})") from err


def _row_to_sample(root: Path, row: Any, used_keys: set[str]) -> dict[str, Any]:
    if not isinstance(row, dict):
        raise _RowError(f"a metadata row must be a JSON object, got {type(row).__name__}")
    image_path = _resolve(root, row.get("file_name"), "file_name")
    sample: dict[str, Any] = {"rgb": _load_image(image_path)}
    h, w = sample["rgb"].shape[:2]
    caption = row.get("caption", row.get("text"))
    if caption is not None:
        if not isinstance(caption, str):
            raise _RowError(f"caption must be a string, got {type(caption).__name__}")
        sample["caption"] = caption
    if row.get("qa") is not None:
        qa = row["qa"]
        if not isinstance(qa, list) or not all(
            isinstance(p, dict) and isinstance(p.get("question"), str) and isinstance(p.get("answer"), str) for p in qa
        ):
            raise _RowError('qa must be a list of {"question": str, "answer": str}')
        sample["qa"] = [{"question": p["question"], "answer": p["answer"]} for p in qa]
    if row.get("depth_file") is not None:
        depth = _load_depth(_resolve(root, row["depth_file"], "depth_file"))
        if depth.shape != (h, w):
            raise _RowError(f"depth is {depth.shape[0]}x{depth.shape[1]} but the image is {h}x{w}")
        sample["depth"] = depth
    if row.get("semseg_file") is not None:
        semseg = _load_semseg(_resolve(root, row["semseg_file"], "semseg_file"))
        if semseg.shape != (h, w):
            raise _RowError(f"semseg is {semseg.shape[0]}x{semseg.shape[1]} but the image is {h}x{w}")
        sample["semseg"] = semseg
    if row.get("boxes") is not None:
        sample["boxes"] = row["boxes"]
    sample["__key__"] = _sample_key(row["file_name"], used_keys)
    try:
        validate_sample(sample)
    except (ValueError, TypeError) as err:
        used_keys.discard(sample["__key__"])
        raise _RowError(str(err).split(": ", 1)[-1]) from err
    for b in sample.get("boxes", []):
        x0, y0, x1, y1 = b["box"]
        if x0 < 0 or y0 < 0 or x1 > w or y1 > h:
            used_keys.discard(sample["__key__"])
            raise _RowError(f"box {b['box']} lies outside the {w}x{h} image")
    return sample


def _csv_row(row: dict[str, str | None]) -> dict[str, Any]:
    """A metadata.csv row -> the metadata.jsonl row it stands for (JSON cells decoded, empty cells dropped)."""
    out: dict[str, Any] = {k: v for k, v in row.items() if k and v not in (None, "")}
    for name in ("qa", "boxes"):
        if name in out:
            try:
                out[name] = json.loads(out[name])
            except json.JSONDecodeError as err:
                raise _RowError(f"{name} column must hold JSON ({err.msg})") from err
    if "question" in out or "answer" in out:
        if "question" not in out or "answer" not in out:
            raise _RowError("question and answer columns must be filled together")
        out.setdefault("qa", []).append({"question": out.pop("question"), "answer": out.pop("answer")})
    return out


def _rows(images_dir: Path) -> Iterator[tuple[int, Any, str | None]]:
    """(line_no, parsed row or None, error) per metadata line; image files as rows without metadata."""
    meta = images_dir / "metadata.jsonl"
    meta_csv = images_dir / "metadata.csv"
    if meta_csv.is_file() and not meta.is_file():
        with meta_csv.open(encoding="utf-8", errors="replace", newline="") as f:
            for line_no, row in enumerate(csv.DictReader(f), start=2):  # line 1 is the header
                try:
                    yield line_no, _csv_row(row), None
                except _RowError as err:
                    yield line_no, None, str(err)
        return
    if not meta.is_file():
        logger.info("no metadata.jsonl in %s: converting every image as an rgb-only sample", images_dir)
        for path in sorted(images_dir.rglob("*")):
            if path.is_file() and path.suffix.lower() in IMAGE_EXTENSIONS:
                yield 0, {"file_name": str(path.relative_to(images_dir))}, None
        return
    with meta.open(encoding="utf-8", errors="replace") as f:
        for line_no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                yield line_no, json.loads(line), None
            except json.JSONDecodeError as err:
                yield line_no, None, f"malformed JSON ({err.msg} at column {err.colno})"


def convert_image_folder(
    images_dir: str | Path,
    out_dir: str | Path,
    resolution: int | None = None,
    samples_per_shard: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
) -> ConversionReport:
    """Convert an imagefolder (see the module docstring) into ``out_dir/shard-NNNNNN.tar`` + ``meta.json``.

    resolution: resize every sample to ``resolution x resolution`` (shorter side scaled, centre crop; see
    ``training.data.reader.resize_sample``); None keeps native sizes. Shards are written crash-safe
    (temporary name, renamed when complete). Raises ``FileNotFoundError`` if ``images_dir`` does not exist and
    ``ValueError`` if no row is valid (nothing is written then)."""
    root = Path(images_dir)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {root} does not exist")
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 1):
        raise ValueError(f"resolution must be a positive int or None, got {resolution!r}")
    out = Path(out_dir)
    if out.resolve() == root.resolve():
        raise ValueError("out_dir must differ from images_dir")
    from training.data.layout import detect_layout

    layout = detect_layout(root)
    if layout.kind != "imagefolder":
        raise ValueError(f"{root} is a {layout.kind.replace('_', ' ')} dataset (splits: {sorted(layout.splits)}), "
                         "not one image folder: use convert_dataset (`onemodel data convert`), which converts each "
                         "split into OUT/<split>")
    report = ConversionReport(out_dir=out)
    used_keys: set[str] = set()
    counts: dict[str, int] = {}
    labels: set[str] = set()
    max_class = -1

    def samples() -> Iterator[dict[str, Any]]:
        nonlocal max_class
        for line_no, row, error in _rows(root):
            name = row.get("file_name") if isinstance(row, dict) else None
            name = name if isinstance(name, str) else ""
            try:
                if error is not None:
                    raise _RowError(error)
                sample = _row_to_sample(root, row, used_keys)
                if resolution is not None:
                    sample = resize_sample(sample, resolution)
            except _RowError as err:
                report.skipped.append((line_no, name, str(err)))
                logger.debug("skipping line %d (%s): %s", line_no, name, err)
                continue
            for k in sample:
                if not k.startswith("__"):
                    counts[k] = counts.get(k, 0) + 1
            labels.update(b["label"] for b in sample.get("boxes", []))
            if "semseg" in sample:
                max_class = max(max_class, int(sample["semseg"].max()))
            report.written += 1
            yield sample

    # write_shards opens a shard only when the first valid sample arrives: an all-bad folder writes nothing.
    shards = write_shards(
        samples(), out, samples_per_shard=samples_per_shard, progress=progress, desc="converting", overwrite=overwrite
    )
    report.shards = shards
    report.modality_counts = counts
    if report.written == 0:
        reasons = "; ".join(f"line {n} {f or '?'}: {r}" for n, f, r in report.skipped[:5])
        raise ValueError(f"no valid sample in {root}" + (f" ({len(report.skipped)} skipped: {reasons})" if reasons else ""))
    write_meta(
        out,
        {
            "name": root.resolve().name,
            "source": str(root.resolve()),
            "resolution": resolution,
            "semseg_classes": [str(i) for i in range(max_class + 1)] if max_class >= 0 else [],
            "box_classes": sorted(labels),
            "splits": {},
            "num_samples": report.written,
            "modalities": counts,
            "skipped": len(report.skipped),
            "shards": [p.name for p in shards],
            "samples_per_shard": samples_per_shard,
            "complete": True,
        },
    )
    return report


def convert_dataset(
    images_dir: str | Path,
    out_dir: str | Path,
    resolution: int | None = None,
    samples_per_shard: int = 1000,
    overwrite: bool = False,
    progress: bool = True,
) -> dict[str, ConversionReport]:
    """Convert a dataset folder in any image-folder layout (see ``training.data.layout``): one folder ->
    ``out_dir`` (report key ``"all"``); split folders -> ``out_dir/<split>`` each, plus ``out_dir/meta.json`` with
    the split sizes and the union of the classes. Returns ``{split: ConversionReport}``. Shard layouts are already
    converted (``ValueError`` saying so); a folder that is no layout gets the expected layouts in its error."""
    from training.data.layout import detect_layout
    from training.data.shards import read_meta

    layout = detect_layout(images_dir)
    if layout.is_shards:
        raise ValueError(f"{images_dir} already holds webdataset shards (splits: {sorted(layout.splits)}); "
                         "there is nothing to convert: use it directly")
    if layout.kind == "imagefolder":
        return {"all": convert_image_folder(images_dir, out_dir, resolution, samples_per_shard, overwrite, progress)}
    out = Path(out_dir)
    reports: dict[str, ConversionReport] = {}
    for split, folder in layout.splits.items():
        logger.info("converting split %s (%s) -> %s", split, folder, out / split)
        reports[split] = convert_image_folder(folder, out / split, resolution, samples_per_shard, overwrite, progress)
    metas = {split: read_meta(out / split) for split in reports}
    max_classes = max((len(m.get("semseg_classes", [])) for m in metas.values()), default=0)
    write_meta(out, {
        "name": Path(images_dir).resolve().name,
        "source": str(Path(images_dir).resolve()),
        "resolution": resolution,
        "semseg_classes": [str(i) for i in range(max_classes)],
        "box_classes": sorted({c for m in metas.values() for c in m.get("box_classes", [])}),
        "splits": {split: r.written for split, r in reports.items()},
        "num_samples": sum(r.written for r in reports.values()),
        "modalities": {split: r.modality_counts for split, r in reports.items()},
        "shards": [f"{split}/{p.name}" for split, r in reports.items() for p in r.shards],
        "samples_per_shard": samples_per_shard,
        "complete": True,
    })
    return reports
