"""Webdataset tar shards of raw samples: encoding, validation, crash-safe writing, meta.json.

A shard is a plain tar file ``shard-NNNNNN.tar`` holding, per sample, the files ``{key}.rgb.png``,
``{key}.depth.npy``, ``{key}.semseg.png``, ``{key}.boxes.json``, ``{key}.caption.txt``, ``{key}.qa.json`` and
``{key}.scene.json`` (any subset; see docs/internals.md section 1). Shards are written under the temporary
name ``shard-NNNNNN.tar.incomplete`` and renamed only once complete, so an interrupted run never leaves a
partial file that looks like a shard (readers only pick up ``*.tar``).
"""

from __future__ import annotations

import io
import json
import logging
import math
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "MODALITY_FILES",
    "SHARD_PATTERN",
    "encode_sample",
    "decode_sample",
    "validate_sample",
    "write_shards",
    "write_meta",
    "read_meta",
]

logger = logging.getLogger(__name__)

# modality -> file suffix inside a shard
MODALITY_FILES: dict[str, str] = {
    "rgb": "rgb.png",
    "depth": "depth.npy",
    "semseg": "semseg.png",
    "boxes": "boxes.json",
    "caption": "caption.txt",
    "qa": "qa.json",
    "scene": "scene.json",
}
_SUFFIX_TO_MODALITY = {v: k for k, v in MODALITY_FILES.items()}
SHARD_PATTERN = "shard-{index:06d}.tar"
INCOMPLETE_SUFFIX = ".incomplete"
# Fixed mtime inside the tar: the same samples give byte-identical shards.
_TAR_MTIME = 0  # an int: a float mtime makes tarfile add a 1 KB pax header to every file
_PNG_COMPRESS_LEVEL = 3  # fast; flat synthetic images compress well anyway


def validate_sample(sample: dict[str, Any]) -> None:
    """Check a raw sample against docs/internals.md section 1; raise ``ValueError`` saying what is wrong.

    Checks types, dtypes and shapes of every modality present, that rgb/depth/semseg share one (H, W), that
    depth is finite and non-negative, and that boxes / qa / caption have the documented structure.
    """
    if not isinstance(sample, dict):
        raise TypeError(f"a sample must be a dict, got {type(sample).__name__}")
    key = sample.get("__key__")
    if not isinstance(key, str) or not key or "." in key:
        raise ValueError(f"sample __key__ must be a non-empty string without '.', got {key!r}")
    unknown = [k for k in sample if not k.startswith("__") and k not in MODALITY_FILES]
    if unknown:
        raise ValueError(f"sample {key}: unknown modality key(s) {unknown}; known: {list(MODALITY_FILES)}")
    sizes: dict[str, tuple[int, int]] = {}
    if "rgb" in sample:
        rgb = sample["rgb"]
        if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8 or rgb.ndim != 3 or rgb.shape[2] != 3:
            raise ValueError(f"sample {key}: rgb must be a uint8 array (H, W, 3), got {_describe(rgb)}")
        sizes["rgb"] = rgb.shape[:2]
    if "depth" in sample:
        depth = sample["depth"]
        if not isinstance(depth, np.ndarray) or depth.dtype != np.float32 or depth.ndim != 2:
            raise ValueError(f"sample {key}: depth must be a float32 array (H, W) in metres, got {_describe(depth)}")
        if not np.isfinite(depth).all() or (depth < 0).any():
            raise ValueError(f"sample {key}: depth must be finite and >= 0 metres")
        sizes["depth"] = depth.shape
    if "semseg" in sample:
        semseg = sample["semseg"]
        if not isinstance(semseg, np.ndarray) or semseg.dtype != np.uint8 or semseg.ndim != 2:
            raise ValueError(f"sample {key}: semseg must be a uint8 array (H, W) of class ids, got {_describe(semseg)}")
        sizes["semseg"] = semseg.shape
    if len(set(sizes.values())) > 1:
        raise ValueError(f"sample {key}: modalities disagree on the image size (H, W): {sizes}")
    if "caption" in sample and not isinstance(sample["caption"], str):
        raise ValueError(f"sample {key}: caption must be a str, got {type(sample['caption']).__name__}")
    if "boxes" in sample:
        boxes = sample["boxes"]
        if not isinstance(boxes, list):
            raise ValueError(f"sample {key}: boxes must be a list of {{'box': [x0, y0, x1, y1], 'label': str}}")
        for b in boxes:
            ok = isinstance(b, dict) and isinstance(b.get("label"), str) and isinstance(b.get("box"), (list, tuple))
            coords = b.get("box") if ok else None
            if not ok or len(coords) != 4 or not all(_is_number(c) for c in coords):
                raise ValueError(f"sample {key}: bad box {b!r}; expected {{'box': [x0, y0, x1, y1], 'label': str}}")
            if not (coords[0] <= coords[2] and coords[1] <= coords[3]):
                raise ValueError(f"sample {key}: box {coords} must have x0 <= x1 and y0 <= y1")
    if "qa" in sample:
        qa = sample["qa"]
        if not isinstance(qa, list) or not all(
            isinstance(p, dict) and isinstance(p.get("question"), str) and isinstance(p.get("answer"), str) for p in qa
        ):
            raise ValueError(f"sample {key}: qa must be a list of {{'question': str, 'answer': str}}")
    if "scene" in sample and not isinstance(sample["scene"], dict):
        raise ValueError(f"sample {key}: scene must be a dict")


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, bool) and math.isfinite(x)


def _describe(x: Any) -> str:
    if isinstance(x, np.ndarray):
        return f"{x.dtype} array of shape {x.shape}"
    return type(x).__name__


def _json_default(x: Any) -> Any:
    if isinstance(x, np.integer):
        return int(x)
    if isinstance(x, np.floating):
        return float(x)
    if isinstance(x, np.ndarray):
        return x.tolist()
    raise TypeError(f"cannot store {type(x).__name__} in JSON")


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="PNG", compress_level=_PNG_COMPRESS_LEVEL)
    return buf.getvalue()


def encode_sample(sample: dict[str, Any]) -> dict[str, Any]:
    """Raw sample -> ``{"__key__": str, "rgb.png": bytes, ...}`` ready for ``webdataset.TarWriter``.

    The sample is validated first (``ValueError`` if malformed)."""
    validate_sample(sample)
    out: dict[str, Any] = {"__key__": sample["__key__"]}
    for name, suffix in MODALITY_FILES.items():
        if name not in sample:
            continue
        value = sample[name]
        if name in ("rgb", "semseg"):
            out[suffix] = _png(value)
        elif name == "depth":
            buf = io.BytesIO()
            np.save(buf, value, allow_pickle=False)
            out[suffix] = buf.getvalue()
        elif name == "caption":
            out[suffix] = value.encode("utf-8")
        else:
            out[suffix] = json.dumps(value, default=_json_default, separators=(",", ":")).encode("utf-8")
    return out


def decode_sample(files: dict[str, Any]) -> dict[str, Any]:
    """``{"__key__", "rgb.png": bytes, ...}`` (as read from a shard) -> raw sample; ``ValueError`` if corrupt.

    Files with unknown suffixes are ignored; dunder entries (``__key__``, ``__url__``) are kept."""
    key = files.get("__key__")
    sample: dict[str, Any] = {k: v for k, v in files.items() if k.startswith("__")}
    for suffix, data in files.items():
        name = _SUFFIX_TO_MODALITY.get(suffix)
        if name is None:
            continue
        try:
            if name == "rgb":
                with Image.open(io.BytesIO(data)) as im:
                    sample[name] = np.asarray(im.convert("RGB"), dtype=np.uint8)
            elif name == "semseg":
                with Image.open(io.BytesIO(data)) as im:
                    if im.mode not in ("L", "P"):
                        raise ValueError(f"semseg png must be 8-bit (mode L or P), got mode {im.mode}")
                    sample[name] = np.array(im, dtype=np.uint8)
            elif name == "depth":
                sample[name] = np.load(io.BytesIO(data), allow_pickle=False).astype(np.float32, copy=False)
            elif name == "caption":
                sample[name] = bytes(data).decode("utf-8")
            else:
                sample[name] = json.loads(bytes(data).decode("utf-8"))
        except Exception as err:  # PIL / numpy / json raise many types for corrupt bytes
            raise ValueError(f"sample {key}: cannot decode {suffix}: {type(err).__name__}: {err}") from err
    validate_sample(sample)
    return sample


def _existing_shards(out: Path) -> list[Path]:
    return sorted(out.glob("shard-*.tar")) + sorted(out.glob("shard-*.tar" + INCOMPLETE_SUFFIX))


def write_shards(
    samples: Iterable[dict[str, Any]],
    out_dir: str | Path,
    samples_per_shard: int = 1000,
    progress: bool = True,
    total: int | None = None,
    desc: str = "writing shards",
    overwrite: bool = False,
) -> list[Path]:
    """Write raw samples to ``out_dir/shard-000000.tar``, ``shard-000001.tar``, ...; return the shard paths.

    All or nothing: each shard is written as ``shard-NNNNNN.tar.incomplete`` (fsynced), and only when every
    sample is written are the old shards removed (``overwrite``) and the new ones renamed to their final names.
    If ``samples`` raises or a write fails (full disk: a one-line ``OutputPathError``), the new files and the
    directories this call created are removed and the error propagates, so a failed call leaves nothing new
    behind (a process killed outright leaves ``*.incomplete`` files, which readers ignore and the next call
    removes). No sample: nothing is written, no directory created. ``out_dir`` must not already hold shards unless
    ``overwrite``. Duplicate ``__key__`` values are an error.
    """
    import webdataset as wds
    from tqdm.auto import tqdm

    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard must be an int >= 1, got {samples_per_shard!r}")
    from tokenizers_mm.io_atomic import STORAGE_ERRNOS, check_output_dir, make_dirs, output_error, remove_dirs

    out = check_output_dir(Path(out_dir))
    for stale in sorted(out.glob("shard-*.tar" + INCOMPLETE_SUFFIX)) if out.is_dir() else []:
        stale.unlink()  # left by a killed run
    existing = _existing_shards(out) if out.is_dir() else []
    if existing and not overwrite:
        raise ValueError(f"{out} already holds {len(existing)} shard file(s); choose an empty directory or overwrite")
    incomplete: list[Path] = []
    created: list[Path] = []
    seen: set[str] = set()
    writer = stream = tmp = None
    count = 0
    bar = tqdm(total=total, desc=desc, unit="sample", disable=not progress, mininterval=0.5)

    def finish() -> None:
        nonlocal writer, stream, tmp
        writer.close()
        stream.flush()
        os.fsync(stream.fileno())
        stream.close()
        incomplete.append(tmp)
        writer = stream = tmp = None

    ok = False
    try:
        for sample in samples:
            encoded = encode_sample(sample)
            key = encoded["__key__"]
            if key in seen:
                raise ValueError(f"duplicate sample key {key!r}: every sample needs a unique __key__")
            seen.add(key)
            if writer is None:
                if not incomplete:
                    created = make_dirs(out)
                tmp = out / (SHARD_PATTERN.format(index=len(incomplete)) + INCOMPLETE_SUFFIX)
                stream = open(tmp, "wb")  # noqa: SIM115 - closed in finish() or below
                writer = wds.TarWriter(stream, encoder=False, mtime=_TAR_MTIME)
            writer.write(encoded)
            count += 1
            bar.update(1)
            if count == samples_per_shard:
                finish()
                count = 0
        if writer is not None:
            finish()
        for path in existing:  # overwrite: the old shards go only now, when every new one is complete
            path.unlink()
        written = []
        for path in incomplete:
            final = path.with_name(path.name[: -len(INCOMPLETE_SUFFIX)])
            os.replace(path, final)
            written.append(final)
        ok = True
    except OSError as err:  # about the output (full disk, read-only, ...) -> one line naming it
        if err.errno in STORAGE_ERRNOS or str(out) in str(err.filename or ""):
            raise output_error(tmp or out, err) from err
        raise
    finally:
        bar.close()
        if not ok:  # failed or interrupted: drop every new file and the directories this call created
            if writer is not None:
                for close in (writer.close, stream.close):
                    try:
                        close()
                    except Exception:  # noqa: BLE001 - best effort (a full disk fails again): the file goes anyway
                        pass
                incomplete.append(tmp)
            for path in incomplete:
                path.unlink(missing_ok=True)
            remove_dirs(created)
            if incomplete:
                logger.warning("write failed or interrupted: removed %d unfinished shard(s) in %s", len(incomplete),
                               out)
    return written


def write_meta(directory: str | Path, meta: dict[str, Any]) -> Path:
    """Write ``directory/meta.json`` atomically (temporary file + rename); return its path."""
    from tokenizers_mm.io_atomic import write_json

    return write_json(Path(directory) / "meta.json", meta, default=_json_default)


def read_meta(directory: str | Path) -> dict[str, Any]:
    """Read ``directory/meta.json`` (``FileNotFoundError`` if absent, ``ValueError`` if not a JSON object)."""
    path = Path(directory) / "meta.json"
    if not path.is_file():
        raise FileNotFoundError(f"no meta.json in {directory}: is this a dataset directory written by onemodel data?")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(meta, dict):
        raise ValueError(f"{path} must hold a JSON object")
    return meta
