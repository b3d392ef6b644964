"""Scoring a contrastive image-text encoder: retrieval recall, zero-shot attributes, a retrieval picture.

- :func:`retrieval_metrics`: image->text and text->image recall@1/5/10 over a held-out set, the gallery being the
  set's own captions / images. A hit is a retrieved caption *equal* to the query scene's caption (many scenes
  share one), or for text->image an image whose caption equals the query. On shapes, captions also vary by a
  random template, shape order and relation that the picture cannot tell, so ``*_content`` recalls count a hit
  when the retrieved caption names the same set of (size, colour, shape) as the query's.
- :func:`zero_shot_shapes`: single-object shapes scenes classified among the prompts "a picture of a {size}
  {colour} {shape}" (accuracy of each attribute) and "a picture of a {colour} {shape}" (``*_nosize``).
- :func:`retrieval_grid`: rows of query -> top-5 (image->text and text->image), hits outlined in green.
- :func:`evaluate_contrastive`: all of it for a run directory on a data split (what ``onemodel eval`` runs on a
  contrastive run), with results.json, report.html and retrieval.png.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Optional, Sequence

import numpy as np
from PIL import Image, ImageDraw

logger = logging.getLogger(__name__)

__all__ = ["retrieval_metrics", "zero_shot_shapes", "retrieval_grid", "evaluate_contrastive", "is_contrastive_run",
           "content_key"]

KS = (1, 5, 10)


def content_key(text: str) -> frozenset:
    """The set of "(size, colour, shape)" shapes a shapes caption lists (relation phrases like "the red circle"
    carry no size and are left out); empty for other captions."""
    from training.data.shapes import mentioned_attributes

    return frozenset(a for a in mentioned_attributes(text) if a[0] is not None)


def _recall(order, query_keys: Sequence[Any], gallery_keys: Sequence[Any], ks: Sequence[int]) -> dict[int, float]:
    """order: (Q, >=max k) gallery indices ranked per query; hit@k = a top-k item with the query's key."""
    gallery = np.asarray([hash(k) for k in gallery_keys])
    query = np.asarray([hash(k) for k in query_keys])
    match = gallery[order] == query[:, None]  # (Q, K)
    return {k: float(match[:, :k].any(axis=1).mean()) for k in ks}


def retrieval_metrics(image_embeds: Any, text_embeds: Any, texts: Sequence[str], ks: Sequence[int] = KS,
                      scenes: Optional[Sequence[Any]] = None) -> dict[str, float]:
    """Recall@k both ways for aligned ``image_embeds[i]`` / ``text_embeds[i]`` / ``texts[i]`` (L2-normalised).

    Returns ``{"i2t_r1", "i2t_r5", "i2t_r10", "t2i_r1", ..., "num"}`` plus ``*_content`` variants when the texts
    are shapes captions (``scenes`` given, or every text names a shape)."""
    import torch

    n = len(texts)
    if image_embeds.shape[0] != n or text_embeds.shape[0] != n:
        raise ValueError(f"retrieval_metrics: {image_embeds.shape[0]} images, {text_embeds.shape[0]} texts and "
                         f"{n} captions must be aligned")
    sims = image_embeds.float() @ text_embeds.float().t()
    top = min(max(ks), n)
    i2t = torch.topk(sims, top, dim=1).indices.cpu().numpy()
    t2i = torch.topk(sims.t(), top, dim=1).indices.cpu().numpy()
    ks = [k for k in ks if k <= n]
    out: dict[str, float] = {}
    for name, order in (("i2t", i2t), ("t2i", t2i)):
        for k, r in _recall(order, list(texts), list(texts), ks).items():
            out[f"{name}_r{k}"] = r
    keys = [content_key(t) for t in texts]
    if scenes is not None and any(s is not None for s in scenes) or all(keys):
        for name, order in (("i2t", i2t), ("t2i", t2i)):
            for k, r in _recall(order, keys, keys, ks).items():
                out[f"{name}_r{k}_content"] = r
    out["num"] = float(n)
    return out


def zero_shot_shapes(encoder: Any, rgb: Sequence[Any], scenes: Sequence[Optional[dict[str, Any]]],
                     template: str = "a picture of a {}") -> dict[str, float]:
    """Zero-shot attributes of the single-object scenes among ``rgb`` + ``scenes``.

    ``color_acc`` / ``shape_acc`` / ``size_acc``: the argmax over the 48 prompts "a picture of a {size} {colour}
    {shape}" (every shapes caption names the size, so this is the prompt form the encoder has seen);
    ``*_acc_nosize``: the argmax over the 24 prompts "a picture of a {colour} {shape}"."""
    from training.data.shapes import COLORS, SHAPES, SIZES

    singles = [i for i, s in enumerate(scenes) if s is not None and len(s.get("shapes", [])) == 1]
    if not singles:
        return {"num_single_object": 0.0}
    img = encoder.encode_image([rgb[i] for i in singles])
    truth = [scenes[i]["shapes"][0] for i in singles]

    def best(labels: list[tuple[str, ...]]) -> list[tuple[str, ...]]:
        txt = encoder.encode_text([template.format(" ".join(label)) for label in labels])
        return [labels[j] for j in (img @ txt.t()).argmax(dim=1).tolist()]

    joint = best([(z, c, h) for z in SIZES for c in COLORS for h in SHAPES])
    nosize = best([(c, h) for c in COLORS for h in SHAPES])

    def acc(preds: list[tuple[str, ...]], field_index: int, key: str) -> float:
        return float(np.mean([p[field_index] == t[key] for p, t in zip(preds, truth)]))

    return {"color_acc": acc(joint, 1, "color"), "shape_acc": acc(joint, 2, "shape"), "size_acc": acc(joint, 0, "size"),
            "color_acc_nosize": acc(nosize, 0, "color"), "shape_acc_nosize": acc(nosize, 1, "shape"),
            "num_single_object": float(len(singles))}


def retrieval_grid(rgb: Sequence[np.ndarray], texts: Sequence[str], image_embeds: Any, text_embeds: Any,
                   rows: int = 4, k: int = 5, cell: int = 112, seed: int = 0) -> Image.Image:
    """A picture of retrieval: ``rows`` image->text rows (query image, top-k captions) then ``rows``
    text->image rows (query caption, top-k images). Hits (same caption) are outlined in green, misses in red."""
    from training.evaluation.report import _font, _wrap

    n = len(texts)
    sims = (image_embeds.float() @ text_embeds.float().t()).cpu().numpy()
    queries = np.random.default_rng(seed).choice(n, size=min(rows, n), replace=False)
    font, small = _font(13), _font(11)
    text_w = int(cell * 1.6)
    width = 8 + cell + 8 + k * (max(cell, text_w) + 6)
    row_h = cell + 12
    height = 30 + 2 * len(queries) * row_h + 30
    page = Image.new("RGB", (width, height), (255, 255, 255))
    draw = ImageDraw.Draw(page)
    draw.text((8, 6), f"image -> text: query image, top-{k} captions", fill=(0, 0, 0), font=font)
    y = 26

    def tile(i: int) -> Image.Image:
        return Image.fromarray(np.asarray(rgb[i], dtype=np.uint8)).resize((cell, cell), Image.NEAREST)

    def caption_box(x: int, y: int, text: str, hit: bool, w: int) -> None:
        draw.rectangle([x, y, x + w, y + cell], outline=(0, 160, 0) if hit else (200, 0, 0), width=3)
        for j, line in enumerate(_wrap(text, small, w - 10, 8)):
            draw.text((x + 5, y + 5 + j * 13), line, fill=(0, 0, 0), font=small)

    col_w = max(cell, text_w) + 6
    for q in queries:
        page.paste(tile(q), (8, y))
        for r, j in enumerate(np.argsort(-sims[q])[:k]):
            caption_box(8 + cell + 8 + r * col_w, y, f"{r + 1}. {texts[j]}", texts[j] == texts[q], text_w)
        y += row_h
    draw.text((8, y + 4), f"text -> image: query caption, top-{k} images", fill=(0, 0, 0), font=font)
    y += 24
    for q in queries:
        caption_box(8, y, texts[q], True, cell)
        for r, j in enumerate(np.argsort(-sims[:, q])[:k]):
            x = 8 + cell + 8 + r * col_w
            page.paste(tile(j), (x, y))
            draw.rectangle([x, y, x + cell - 1, y + cell - 1], outline=(0, 160, 0) if texts[j] == texts[q]
                           else (200, 0, 0), width=3)
        y += row_h
    return page


def is_contrastive_run(path: str | Path) -> bool:
    """True for a contrastive run directory or its ``model/`` (an ImageTextEncoder save)."""
    from onemodel.contrastive import CONTRASTIVE_NAME

    path = Path(path)
    return (path / CONTRASTIVE_NAME).is_file() or (path / "model" / CONTRASTIVE_NAME).is_file()


def evaluate_contrastive(model: str | Path, data: str | Path, split: str = "test", limit: int | None = 1000,
                         out: str | Path | None = None, metrics_log: str | Path | None = None,
                         progress: bool = True) -> tuple[dict[str, Any], Path]:
    """Score a contrastive run on ``data/split`` (retrieval + zero-shot) and write the report into ``out``
    (default ``MODEL/eval``). Returns ``(results, report.html path)``."""
    import torch

    from onemodel.contrastive import CONTRASTIVE_NAME, ImageTextEncoder
    from training.evaluation.report import write_report
    from training.train_clip import load_clip_samples

    model = Path(model)
    model_dir = model if (model / CONTRASTIVE_NAME).is_file() else model / "model"
    data = Path(data)
    if not (data / split).is_dir():
        raise FileNotFoundError(f"{str(data / split)!r} does not exist: pass --data DATASET with a {split}/ split")
    encoder = ImageTextEncoder.from_pretrained(model_dir)
    samples = load_clip_samples(data, split, encoder.config.image_size, "caption", limit, progress=progress)
    with torch.no_grad():
        img = encoder.encode_image(list(samples.rgb))
        txt = encoder.encode_text(samples.texts)
    results: dict[str, Any] = {"retrieval": retrieval_metrics(img, txt, samples.texts, scenes=samples.scenes)}
    if any(s is not None for s in samples.scenes):
        results["zero_shot"] = zero_shot_shapes(encoder, list(samples.rgb), samples.scenes)
    out = Path(out) if out else (model if model_dir != model else model.parent) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    retrieval_grid(samples.rgb, samples.texts, img, txt).save(out / "retrieval.png")
    if metrics_log is None:
        candidate = model_dir.parent / "metrics.jsonl"
        metrics_log = candidate if candidate.is_file() else None
    page = write_report(out, results, None, metrics_log, title=f"contrastive evaluation: {model}",
                        images={"retrieval (query, top-5; green = same caption)": "retrieval.png"})
    return results, page
