"""Pre-tokenization: raw shards -> token shards (docs/internals.md §3), so training never re-runs the tokenizers.

For every split sub-directory of the dataset (``train/``, ``val/``, ``test/``; or the dataset directory itself
when it holds shards directly), each raw shard ``shard-NNNNNN.tar`` becomes a token shard of the same name
holding, per sample, ``{key}.{name}.npy`` (int32 1-D ids: ``rgb``, ``depth``, ``semseg``, ``caption``, ``det``),
``{key}.qa.json`` (``[[question_ids, answer_ids], ...]``) and ``{key}.pixels.rgb.png`` (the rgb image at the
tokenizer's size, for models that read rgb as pixel patches, ``model.input_embeddings: {rgb: pixels}``). Shards are written as ``*.tar.incomplete`` and
renamed when complete. ``out_dir/meta.json`` names the tokenizer bundle, the modality specs (with the
``max_length`` of each sequence modality = the longest sequence found in any split) and the sample counts.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

logger = logging.getLogger(__name__)

__all__ = ["pretokenize", "iter_token_samples", "encode_token_sample", "TOKEN_FORMAT", "TOKEN_VERSION"]

TOKEN_FORMAT = "onemodel-token-shards"
TOKEN_VERSION = 2  # 2: shards carry the rgb image (pixels.rgb.png) for pixel-patch inputs
SPLIT_NAMES = ("train", "val", "test")
_INCOMPLETE = ".incomplete"


def encode_token_sample(tokens: dict[str, Any]) -> dict[str, bytes | str]:
    """Token sample -> webdataset files ``{"__key__", "rgb.npy", ..., "qa.json"}``."""
    files: dict[str, bytes | str] = {"__key__": tokens["__key__"]}
    for name, value in tokens.items():
        if name == "__key__":
            continue
        if name.startswith("__pixels_"):  # PNG bytes of an image (onemodel.pixel_inputs.pixels_key)
            files[f"pixels.{name[len('__pixels_'):]}.png"] = value
        elif name == "qa":
            pairs = [[[int(i) for i in q], [int(i) for i in a]] for q, a in value]
            files["qa.json"] = json.dumps(pairs).encode("utf-8")
        else:
            buf = io.BytesIO()
            np.save(buf, np.asarray(value, dtype=np.int32), allow_pickle=False)
            files[f"{name}.npy"] = buf.getvalue()
    return files


def iter_token_samples(directory: str | Path, split: str | None = None) -> Iterator[dict[str, Any]]:
    """Read token samples back from a token-shard directory (its ``split`` sub-directory when given), in file order:
    ``{"__key__", name: int32 array, "qa": [[q_ids list, a_ids list], ...]}``."""
    path = Path(directory) / split if split else Path(directory)
    shards = sorted(path.glob("*.tar"))
    if not shards:
        raise FileNotFoundError(f"no token shards (*.tar) in {str(path)!r}")
    for shard in shards:
        current: dict[str, Any] | None = None
        with tarfile.open(shard) as tar:
            for member in tar:
                if not member.isfile():
                    continue
                key, _, suffix = member.name.partition(".")
                if current is None or current["__key__"] != key:
                    if current is not None:
                        yield current
                    current = {"__key__": key}
                data = tar.extractfile(member).read()  # type: ignore[union-attr]
                if suffix == "qa.json":
                    current["qa"] = json.loads(data.decode("utf-8"))
                elif suffix.startswith("pixels.") and suffix.endswith(".png"):
                    current[f"__pixels_{suffix[len('pixels.'):-len('.png')]}"] = data
                elif suffix.endswith(".npy"):
                    current[suffix[: -len(".npy")]] = np.load(io.BytesIO(data), allow_pickle=False)
        if current is not None:
            yield current


def _with_pixels(tokens: list[dict[str, Any]], raws: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Add the rgb image (PNG bytes, at the tokenizer's size) to each token sample that has rgb tokens."""
    from PIL import Image

    for t, raw in zip(tokens, raws):
        if "rgb" in t and raw.get("rgb") is not None:
            buf = io.BytesIO()
            Image.fromarray(np.asarray(raw["rgb"], dtype=np.uint8)).save(buf, format="PNG")
            t["__pixels_rgb"] = buf.getvalue()
    return tokens


def _split_dirs(data_dir: Path) -> list[tuple[str, Path]]:
    """[(split name or "", directory of raw shards)]."""
    if any(data_dir.glob("*.tar")):
        return [("", data_dir)]
    splits = [(p.name, p) for p in sorted(data_dir.iterdir()) if p.is_dir() and any(p.glob("*.tar"))]
    if not splits:
        raise FileNotFoundError(
            f"no raw shards in {str(data_dir)!r} or its sub-directories; make a dataset with 'onemodel data shapes --out DIR'"
        )
    order = {name: i for i, name in enumerate(SPLIT_NAMES)}
    return sorted(splits, key=lambda s: (order.get(s[0], len(order)), s[0]))


def _write_shard(path: Path, samples: list[dict[str, Any]]) -> None:
    import webdataset as wds

    tmp = path.with_name(path.name + _INCOMPLETE)
    try:
        with open(tmp, "wb") as stream:
            writer = wds.TarWriter(stream, encoder=False, mtime=0)
            for tokens in samples:
                writer.write(encode_token_sample(tokens))
            writer.close()
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def pretokenize(
    data_dir: str | Path,
    bundle_dir: str | Path,
    out_dir: str | Path,
    batch_size: int = 256,
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """Tokenize every raw shard of ``data_dir`` with the bundle in ``bundle_dir`` into ``out_dir``.

    Returns ``{"out_dir", "bundle", "splits": {split: num_samples}, "num_samples", "seconds", "samples_per_second",
    "max_lengths": {caption/question/answer/det: longest}, "modalities": [spec, ...]}`` (also in ``out_dir/meta.json``).
    """
    import torch
    from tqdm.auto import tqdm

    from tokenizers_mm.bundle import IMAGE_TOKENIZERS, TokenizerBundle
    from training.data.reader import iter_samples

    data_dir, bundle_dir, out_dir = Path(data_dir), Path(bundle_dir), Path(out_dir)
    if not data_dir.is_dir():
        raise FileNotFoundError(f"dataset directory {str(data_dir)!r} does not exist")
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if out_dir.resolve() == data_dir.resolve():
        raise ValueError("--out must differ from --data: token shards would overwrite the raw shards")
    from tokenizers_mm.io_atomic import atomic_directory, check_output_dir, write_json

    check_output_dir(out_dir, what="--out directory")
    bundle = TokenizerBundle.from_pretrained(bundle_dir)
    splits = _split_dirs(data_dir)
    existing = list(out_dir.glob("**/*.tar")) if out_dir.exists() else []
    if existing and not overwrite:
        raise ValueError(f"{str(out_dir)!r} already holds {len(existing)} token shard(s); choose an empty directory or pass --overwrite")
    for path in existing:
        path.unlink()
    sizes = {bundle[n].image_size for n in IMAGE_TOKENIZERS if n in bundle}  # type: ignore[attr-defined]
    resolution = sizes.pop() if len(sizes) == 1 else None
    raw_meta: dict[str, Any] = {}
    if (data_dir / "meta.json").is_file():
        raw_meta = json.loads((data_dir / "meta.json").read_text())
    total = sum(int(v) for v in raw_meta.get("splits", {}).values()) or None

    counts: dict[str, int] = {}
    longest = {"caption": 0, "question": 0, "answer": 0, "det": 0}
    start = time.perf_counter()
    bar = tqdm(total=total, desc="tokenizing", unit="sample", disable=not progress, mininterval=0.5)
    # staged beside out_dir and moved in when complete: a failure leaves nothing new behind
    with torch.inference_mode(), atomic_directory(out_dir) as stage:
        for split, split_dir in splits:
            target = stage / split if split else stage
            target.mkdir(parents=True, exist_ok=True)
            counts[split or "all"] = 0
            for shard in sorted(split_dir.glob("*.tar")):
                tokens: list[dict[str, Any]] = []
                batch: list[dict[str, Any]] = []
                for raw in iter_samples(str(shard), resolution=resolution):
                    batch.append(raw)
                    if len(batch) == batch_size:
                        tokens += _with_pixels(bundle.tokenize_samples(batch), batch)
                        bar.update(len(batch))
                        batch = []
                if batch:
                    tokens += _with_pixels(bundle.tokenize_samples(batch), batch)
                    bar.update(len(batch))
                for t in tokens:
                    for name in ("caption", "det"):
                        if name in t:
                            longest[name] = max(longest[name], len(t[name]))
                    for q, a in t.get("qa", []):
                        longest["question"] = max(longest["question"], len(q))
                        longest["answer"] = max(longest["answer"], len(a))
                _write_shard(target / shard.name, tokens)
                counts[split or "all"] += len(tokens)
        bar.close()
        seconds = time.perf_counter() - start
        num = sum(counts.values())
        max_lengths = {k: v for k, v in longest.items() if v > 0}
        specs = bundle.modalities({k: longest[k] for k in longest}) if "text" in bundle else bundle.modalities()
        meta = {
            "format": TOKEN_FORMAT,
            "version": TOKEN_VERSION,
            "bundle": str(bundle_dir.resolve()),
            "source": str(data_dir.resolve()),
            "splits": counts,
            "max_lengths": max_lengths,
            "modalities": list(specs),
            "source_meta": raw_meta,
        }
        write_json(stage / "meta.json", meta)
    result = {"out_dir": str(out_dir), "bundle": meta["bundle"], "splits": counts, "num_samples": num,
              "seconds": round(seconds, 2), "samples_per_second": round(num / max(seconds, 1e-9), 1),
              "max_lengths": max_lengths, "modalities": list(specs)}
    logger.info("pre-tokenized %d samples in %.1fs into %s", num, seconds, out_dir)
    return result
