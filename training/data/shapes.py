"""The built-in synthetic "shapes" multimodal dataset.

Every sample is a procedurally generated scene, fully determined by an integer seed
(``numpy.random.Generator(PCG64(seed))``): a plain dark background plus 1-4 flat-coloured shapes (circle,
square, triangle) in 8 named colours and two sizes, standing on a ground plane seen from above at an angle:
the lower a shape's base in the picture, the nearer it is (``shape_depth``), so depth can be read from the
image as in real photos (generator version 1 drew depths at random, which no model can infer from rgb:
perfect segmentation plus the best constant depth scores only delta1 ~0.91). Shapes may occlude each other,
but every shape keeps at least ``MIN_VISIBLE_FRACTION`` of its area (and ``MIN_VISIBLE_PIXELS`` pixels)
visible, so captions and answers only talk about things one can see. No two shapes of a scene share
both colour and shape type, so "the red circle" always names one shape, and shapes of the same colour never
touch, so their outlines stay visible in ``rgb``.

Exact ground truth for every modality (raw-sample format of docs/internals.md section 1):

- ``rgb`` (H, W, 3) uint8: crisp flat colours, no antialiasing.
- ``depth`` (H, W) float32 metres: each shape is a flat surface at its own depth in [1, 5] m (``shape_depth``
  of its base line), background at
  ``BACKGROUND_DEPTH``; shapes are painted far to near so the nearest surface wins, as in ``rgb``.
- ``semseg`` (H, W) uint8: 0 background, 1 circle, 2 square, 3 triangle (``SEMSEG_CLASSES``).
- ``boxes``: per shape, the tight box of its *visible* pixels ``[x0, y0, x1, y1]`` (x1, y1 exclusive) + label.
- ``caption``: templated English naming every shape (size, colour, type) and often one spatial relation.
- ``qa``: question/answer pairs computed from the scene graph (colour, size, shape, count, existence,
  "what is left of ..."). Answers are short: a word, a digit ("2") or "the red circle" / "nothing".
- ``scene``: the scene graph (see ``generate_sample``).

Splits come from disjoint seed ranges (``SPLIT_SEED_OFFSETS``).
"""

from __future__ import annotations

import logging
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "SHAPES",
    "COLORS",
    "SIZES",
    "SEMSEG_CLASSES",
    "BOX_CLASSES",
    "SPLITS",
    "SPLIT_SEED_OFFSETS",
    "BACKGROUND_DEPTH",
    "generate_sample",
    "generate_split",
    "split_seed",
    "shape_depth",
    "scene_attributes",
    "describe_shape",
    "mentioned_attributes",
    "relation",
    "make_shapes_dataset",
]

logger = logging.getLogger(__name__)

GENERATOR_VERSION = 2

SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SEMSEG_CLASSES: tuple[str, ...] = ("background", "circle", "square", "triangle")
BOX_CLASSES: tuple[str, ...] = SHAPES
SIZES: tuple[str, ...] = ("small", "large")
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (40, 70, 230),
    "yellow": (240, 220, 30),
    "purple": (150, 50, 200),
    "orange": (250, 140, 20),
    "cyan": (40, 210, 220),
    "white": (240, 240, 240),
}
# Half-size ("extent") of a shape, as a fraction of the image side, per size name.
SIZE_EXTENT: dict[str, tuple[float, float]] = {"small": (0.09, 0.12), "large": (0.17, 0.23)}
SHAPE_DEPTH_RANGE = (1.0, 5.0)
MIN_DEPTH_GAP = 0.25  # metres between any two shapes, so occlusion order is unambiguous
BACKGROUND_DEPTH = 10.0
MIN_VISIBLE_FRACTION = 0.4
MIN_VISIBLE_PIXELS = 6
MAX_SHAPES = 4
RELATION_MARGIN = 0.08  # centres closer than this fraction of the side along an axis are "not clearly" related
MAX_QA = 8

SPLITS: tuple[str, ...] = ("train", "val", "test")
SPLIT_SEED_OFFSETS: dict[str, int] = {"train": 0, "val": 10_000_000, "test": 20_000_000}
SPLIT_SIZE = 10_000_000

_NUMBER_WORDS = ("zero", "one", "two", "three", "four")
_RELATIONS = ("left of", "right of", "above", "below")


def split_seed(split: str, index: int) -> int:
    """Seed of sample ``index`` of ``split``; the three splits use disjoint seed ranges."""
    if split not in SPLIT_SEED_OFFSETS:
        raise ValueError(f"unknown split {split!r}: use one of {list(SPLIT_SEED_OFFSETS)}")
    if not 0 <= int(index) < SPLIT_SIZE:
        raise ValueError(f"sample index must be in [0, {SPLIT_SIZE}), got {index}")
    return SPLIT_SEED_OFFSETS[split] + int(index)


def _check_resolution(resolution: int) -> int:
    if isinstance(resolution, bool) or not isinstance(resolution, (int, np.integer)):
        raise TypeError(f"resolution must be an int, got {type(resolution).__name__}")
    if not 16 <= resolution <= 1024:
        raise ValueError(f"resolution must be between 16 and 1024 pixels, got {resolution}")
    return int(resolution)


def _shape_mask(shape: str, cx: float, cy: float, e: float, X: np.ndarray, Y: np.ndarray) -> np.ndarray:
    """Boolean (H, W) mask of a shape; X, Y hold pixel-centre coordinates."""
    if shape == "circle":
        return (X - cx) ** 2 + (Y - cy) ** 2 <= e * e
    if shape == "square":
        return (np.abs(X - cx) <= e) & (np.abs(Y - cy) <= e)
    if shape == "triangle":  # apex (cx, cy - e), base from (cx - e, cy + e) to (cx + e, cy + e)
        return (Y <= cy + e) & (2.0 * np.abs(X - cx) <= Y - (cy - e))
    raise AssertionError(shape)


def _sample_layout(rng: np.random.Generator, resolution: int, n: int) -> list[dict[str, Any]]:
    """Draw attributes and geometry of ``n`` shapes (not yet checked for visibility)."""
    pairs = [(c, s) for c in COLORS for s in SHAPES]
    chosen = rng.choice(len(pairs), size=n, replace=False)
    while True:  # redraw positions until the depths are at least MIN_DEPTH_GAP apart (unambiguous occlusion)
        shapes = []
        for k in chosen:
            color, shape = pairs[int(k)]
            size = SIZES[int(rng.integers(0, len(SIZES)))]
            lo, hi = SIZE_EXTENT[size]
            e = round(float(rng.uniform(lo, hi)) * resolution, 2)
            cx = round(float(rng.uniform(e + 1.0, resolution - e - 1.0)), 2)
            cy = round(float(rng.uniform(e + 1.0, resolution - e - 1.0)), 2)
            shapes.append({"shape": shape, "color": color, "size": size, "center": [cx, cy], "extent": e,
                           "depth": shape_depth(cy + e, resolution)})
        depths = np.sort([s["depth"] for s in shapes])
        if n == 1 or np.min(np.diff(depths)) >= MIN_DEPTH_GAP:
            return shapes


def shape_depth(base_y: float, resolution: int) -> float:
    """Depth (metres, 2 decimals) of a shape whose base line is at pixel row ``base_y``: the ground plane runs
    linearly from ``SHAPE_DEPTH_RANGE[1]`` at the top of the image to ``SHAPE_DEPTH_RANGE[0]`` at the bottom."""
    near, far = SHAPE_DEPTH_RANGE
    frac = min(max(float(base_y) / resolution, 0.0), 1.0)
    return round(far - (far - near) * frac, 2)


def _render(shapes: list[dict[str, Any]], resolution: int, background: tuple[int, int, int]):
    """Paint far to near. Returns rgb, depth, semseg and per-shape (full mask, visible mask), or None if some
    shape is not visible enough."""
    coords = np.arange(resolution, dtype=np.float32) + 0.5
    X, Y = np.meshgrid(coords, coords)  # (H, W) pixel centres
    rgb = np.empty((resolution, resolution, 3), dtype=np.uint8)
    rgb[:] = background
    depth = np.full((resolution, resolution), BACKGROUND_DEPTH, dtype=np.float32)
    semseg = np.zeros((resolution, resolution), dtype=np.uint8)
    owner = np.full((resolution, resolution), -1, dtype=np.int16)
    masks = []
    for i in sorted(range(len(shapes)), key=lambda j: -shapes[j]["depth"]):  # far to near
        s = shapes[i]
        m = _shape_mask(s["shape"], s["center"][0], s["center"][1], s["extent"], X, Y)
        rgb[m] = COLORS[s["color"]]
        depth[m] = s["depth"]
        semseg[m] = SEMSEG_CLASSES.index(s["shape"])
        owner[m] = i
        masks.append((i, m))
    areas = {i: int(m.sum()) for i, m in masks}
    full = dict(masks)
    for i in range(len(shapes)):  # same-coloured shapes must not touch: their outlines would merge in rgb
        for j in range(i + 1, len(shapes)):
            if shapes[i]["color"] == shapes[j]["color"] and (_dilate(full[i]) & full[j]).any():
                return None
    visible = [owner == i for i in range(len(shapes))]
    for i, v in enumerate(visible):
        n = int(v.sum())
        if n < MIN_VISIBLE_PIXELS or n < MIN_VISIBLE_FRACTION * areas[i]:
            return None
    return rgb, depth, semseg, visible, areas


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation (8-neighbourhood) of a (H, W) bool mask."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    rows = out.copy()
    out[:, 1:] |= rows[:, :-1]
    out[:, :-1] |= rows[:, 1:]
    return out


def _tight_box(mask: np.ndarray) -> list[float]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return [float(cols[0]), float(rows[0]), float(cols[-1] + 1), float(rows[-1] + 1)]


def relation(a: dict[str, Any], b: dict[str, Any], resolution: int) -> list[str]:
    """Clear spatial relations of shape ``a`` with respect to shape ``b`` ("left of", "above", ...), from the
    scene-graph centres; an axis whose centres differ by less than ``RELATION_MARGIN * resolution`` gives none."""
    margin = RELATION_MARGIN * resolution
    dx = a["center"][0] - b["center"][0]
    dy = a["center"][1] - b["center"][1]
    out = []
    if dx < -margin:
        out.append("left of")
    elif dx > margin:
        out.append("right of")
    if dy < -margin:
        out.append("above")
    elif dy > margin:
        out.append("below")
    return out


def _ambiguous(a: dict[str, Any], b: dict[str, Any], rel: str, resolution: int) -> bool:
    """True when ``a`` is neither clearly ``rel`` of ``b`` nor clearly not (centres within the margin)."""
    margin = RELATION_MARGIN * resolution
    axis = 0 if rel in ("left of", "right of") else 1
    return abs(a["center"][axis] - b["center"][axis]) <= margin


def describe_shape(s: dict[str, Any], with_size: bool = True) -> str:
    """The phrase "small red circle" for a scene-graph shape ("red circle" with ``with_size=False``)."""
    return f"{s['size']} {s['color']} {s['shape']}" if with_size else f"{s['color']} {s['shape']}"


def _article(phrase: str) -> str:
    return "an" if phrase[0] in "aeiou" else "a"


def _join(items: list[str]) -> str:
    if len(items) == 1:
        return items[0]
    return ", ".join(items[:-1]) + " and " + items[-1]


def _caption(shapes: list[dict[str, Any]], resolution: int, rng: np.random.Generator) -> str:
    n = len(shapes)
    order = [int(i) for i in rng.permutation(n)]
    by_x = sorted(range(n), key=lambda i: shapes[i]["center"][0])
    x_clear = all(
        shapes[by_x[k + 1]]["center"][0] - shapes[by_x[k]]["center"][0] > RELATION_MARGIN * resolution
        for k in range(n - 1)
    )
    templates = ["count", "picture", "image", "there"]
    if n >= 2 and x_clear:
        templates.append("left_to_right")
    template = templates[int(rng.integers(0, len(templates)))]
    if template == "left_to_right":
        order = by_x
    items = [f"{_article(describe_shape(shapes[i]))} {describe_shape(shapes[i])}" for i in order]
    listing = _join(items)
    if template == "count":
        text = f"{_NUMBER_WORDS[n]} shape{'s' if n > 1 else ''}: {listing}."
    elif template == "picture":
        text = f"a picture of {listing}."
    elif template == "image":
        text = f"an image with {listing} on a dark background."
    elif template == "there":
        text = f"there {'is' if n == 1 else 'are'} {listing}."
    else:
        text = f"from left to right: {listing}."
    # Often add one clear relation between two shapes.
    pairs = [(i, j, r) for i in range(n) for j in range(n) if i != j for r in relation(shapes[i], shapes[j], resolution)]
    if pairs and template != "left_to_right" and rng.random() < 0.75:
        i, j, r = pairs[int(rng.integers(0, len(pairs)))]
        a, b = describe_shape(shapes[i], False), describe_shape(shapes[j], False)
        text += f" the {a} is {r} the {b}."
    return text


def _questions(shapes: list[dict[str, Any]], resolution: int, rng: np.random.Generator) -> list[dict[str, str]]:
    """Candidate QA pairs per kind, all answerable without ambiguity from the scene graph; then a seeded pick
    of at most ``MAX_QA`` with one per kind first."""
    n = len(shapes)
    kinds: dict[str, list[tuple[str, str]]] = {k: [] for k in ("color", "size", "shape", "count", "yes", "no", "rel")}
    for s in shapes:
        same_size_shape = [t for t in shapes if t["shape"] == s["shape"] and t["size"] == s["size"]]
        same_shape = [t for t in shapes if t["shape"] == s["shape"]]
        if len(same_shape) == 1:
            kinds["color"].append((f"what color is the {s['shape']}?", s["color"]))
        elif len(same_size_shape) == 1:
            kinds["color"].append((f"what color is the {s['size']} {s['shape']}?", s["color"]))
        kinds["size"].append((f"what size is the {describe_shape(s, False)}?", s["size"]))
        if sum(t["color"] == s["color"] for t in shapes) == 1:
            kinds["shape"].append((f"what shape is the {s['color']} object?", s["shape"]))
        kinds["yes"].append((f"is there {_article(s['color'])} {describe_shape(s, False)}?", "yes"))
    for shape in SHAPES:
        kinds["count"].append((f"how many {shape}s are there?", str(sum(t["shape"] == shape for t in shapes))))
    kinds["count"].append(("how many shapes are there?", str(n)))
    present = {(s["color"], s["shape"]) for s in shapes}
    absent = [(c, s) for c in COLORS for s in SHAPES if (c, s) not in present]
    for c, s in [absent[int(k)] for k in rng.choice(len(absent), size=3, replace=False)]:
        kinds["no"].append((f"is there {_article(c)} {c} {s}?", "no"))
    for b in shapes:
        for rel in _RELATIONS:
            others = [a for a in shapes if a is not b]
            if any(_ambiguous(a, b, rel, resolution) for a in others):
                continue
            hits = [a for a in others if rel in relation(a, b, resolution)]
            if len(hits) > 1:
                continue
            answer = f"the {describe_shape(hits[0], False)}" if hits else "nothing"
            kinds["rel"].append((f"what is {rel} the {describe_shape(b, False)}?", answer))
    picked: list[tuple[str, str]] = []  # one question of each available kind first
    rest: list[tuple[str, str]] = []
    for cands in kinds.values():
        if cands:
            perm = [cands[int(k)] for k in rng.permutation(len(cands))]
            picked.append(perm[0])
            rest.extend(perm[1:])
    rest = [rest[int(k)] for k in rng.permutation(len(rest))]
    qa = (picked + rest)[:MAX_QA]
    qa = [qa[int(k)] for k in rng.permutation(len(qa))]
    return [{"question": q, "answer": a} for q, a in qa]


def generate_sample(seed: int, resolution: int = 64) -> dict[str, Any]:
    """One shapes scene (raw sample, docs/internals.md section 1), deterministic from ``seed``.

    Returns ``{"__key__", "rgb", "depth", "semseg", "boxes", "caption", "qa", "scene"}`` where ``scene`` is
    ``{"seed", "resolution", "background": {"color": [r, g, b], "depth": m}, "shapes": [{"shape", "color",
    "size", "center": [cx, cy] (pixels), "extent" (half-size, pixels), "depth" (metres), "area" (pixels),
    "visible_pixels", "box": [x0, y0, x1, y1]}, ...]}`` and ``boxes`` lists the same shapes in the same order.
    """
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative int, got {seed!r}")
    resolution = _check_resolution(resolution)
    rng = np.random.Generator(np.random.PCG64(int(seed)))
    grey = int(rng.integers(18, 48))
    tint = rng.integers(-6, 7, size=3)
    background = tuple(int(v) for v in np.clip(grey + tint, 0, 255))
    n = int(rng.integers(1, MAX_SHAPES + 1))
    rendered = None
    while rendered is None:  # reject layouts where some shape is mostly hidden; keep the drawn shape count
        for _attempt in range(100):
            shapes = _sample_layout(rng, resolution, n)
            rendered = _render(shapes, resolution, background)
            if rendered is not None:
                break
        else:  # pragma: no cover - practically never: fall back to one shape fewer
            n = max(1, n - 1)
    rgb, depth, semseg, visible, areas = rendered
    boxes = []
    for i, s in enumerate(shapes):
        s["area"] = areas[i]
        s["visible_pixels"] = int(visible[i].sum())
        s["box"] = _tight_box(visible[i])
        boxes.append({"box": list(s["box"]), "label": s["shape"]})
    caption = _caption(shapes, resolution, rng)
    qa = _questions(shapes, resolution, rng)
    scene = {
        "seed": int(seed),
        "resolution": resolution,
        "background": {"color": list(background), "depth": BACKGROUND_DEPTH},
        "shapes": shapes,
    }
    return {
        "__key__": f"shapes_{int(seed):09d}",
        "rgb": rgb,
        "depth": depth,
        "semseg": semseg,
        "boxes": boxes,
        "caption": caption,
        "qa": qa,
        "scene": scene,
    }


def generate_split(split: str, num: int, resolution: int = 64, start: int = 0) -> Iterator[dict[str, Any]]:
    """Samples ``start .. start + num - 1`` of ``split`` (lazily)."""
    if num < 0:
        raise ValueError(f"num must be >= 0, got {num}")
    for index in range(start, start + num):
        yield generate_sample(split_seed(split, index), resolution)


def scene_attributes(scene: dict[str, Any]) -> list[tuple[str, str, str]]:
    """``(color, size, shape)`` of every shape of a scene graph, in scene order."""
    return [(s["color"], s["size"], s["shape"]) for s in scene["shapes"]]


_ATTR_RE = re.compile(
    r"\b(?:(small|large)\s+)?(" + "|".join(COLORS) + r")\s+(" + "|".join(SHAPES) + r")s?\b"
)


def mentioned_attributes(text: str) -> set[tuple[str | None, str, str]]:
    """``(size or None, color, shape)`` of every "[size] colour shape" phrase in a caption (lower-cased)."""
    return {(m.group(1), m.group(2), m.group(3)) for m in _ATTR_RE.finditer(text.lower())}


# --------------------------------------------------------------------------------------------------------
# Dataset directories


def _dataset_config(num_train: int, num_val: int, num_test: int, resolution: int, samples_per_shard: int) -> dict:
    return {
        "name": "shapes",
        "generator_version": GENERATOR_VERSION,
        "resolution": resolution,
        "splits": {"train": num_train, "val": num_val, "test": num_test},
        "samples_per_shard": samples_per_shard,
        "split_seed_offsets": dict(SPLIT_SEED_OFFSETS),
    }


def make_shapes_dataset(
    out_dir: str | Path,
    num_train: int,
    num_val: int,
    num_test: int,
    resolution: int = 64,
    samples_per_shard: int = 1000,
    force: bool = False,
    progress: bool = True,
) -> dict[str, Any]:
    """Write ``out_dir/{train,val,test}/shard-NNNNNN.tar`` and ``out_dir/meta.json``; return the meta dict.

    Cached: if ``meta.json`` says a complete dataset with the same configuration is already there (and its
    shards exist), nothing is regenerated (unless ``force``). The returned meta has ``"cached": True/False``
    and ``"seconds"`` (generation time of this call).
    """
    from training.data.shards import read_meta, write_meta, write_shards

    resolution = _check_resolution(resolution)
    for name, value in (("num_train", num_train), ("num_val", num_val), ("num_test", num_test)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise ValueError(f"{name} must be an int >= 0, got {value!r}")
    if num_train + num_val + num_test == 0:
        raise ValueError("nothing to generate: all split sizes are 0; pass num_train >= 1 (CLI: --num)")
    if isinstance(samples_per_shard, bool) or not isinstance(samples_per_shard, int) or samples_per_shard < 1:
        raise ValueError(f"samples_per_shard (--samples-per-shard) must be an int >= 1, got {samples_per_shard!r}")
    out = Path(out_dir)
    config = _dataset_config(num_train, num_val, num_test, resolution, samples_per_shard)
    if not force and (out / "meta.json").exists():
        try:
            meta = read_meta(out)
        except ValueError:
            meta = {}
        same = meta.get("complete") and all(meta.get(k) == v for k, v in config.items())
        shards_ok = same and all((out / rel).is_file() for rel in meta.get("shards", []))
        if same and shards_ok:
            logger.info("shapes dataset in %s is complete with the same config: not regenerating", out)
            return {**meta, "cached": True, "seconds": 0.0}
    from tokenizers_mm.io_atomic import atomic_directory

    start = time.perf_counter()
    shard_paths: list[str] = []
    bytes_total = 0
    # staged beside out/ and moved in when complete: a failure (full disk, Ctrl-C) leaves out/ as it was
    with atomic_directory(out) as stage:
        for split, num in config["splits"].items():
            if num == 0:
                continue
            paths = write_shards(
                generate_split(split, num, resolution),
                stage / split,
                samples_per_shard=samples_per_shard,
                progress=progress,
                total=num,
                desc=f"shapes {split}",
            )
            shard_paths += [str(p.relative_to(stage)) for p in paths]
            bytes_total += sum(p.stat().st_size for p in paths)
        meta = {
            **config,
            "semseg_classes": list(SEMSEG_CLASSES),
            "box_classes": list(BOX_CLASSES),
            "colors": {k: list(v) for k, v in COLORS.items()},
            "num_samples": num_train + num_val + num_test,
            "shards": shard_paths,
            "bytes": bytes_total,
            "complete": True,
        }
        write_meta(stage, meta)
    for split, num in config["splits"].items():
        if num == 0 and (out / split).exists():
            shutil.rmtree(out / split)  # a split this dataset no longer has
    seconds = time.perf_counter() - start
    logger.info("wrote %d shapes samples to %s in %.1f s", meta["num_samples"], out, seconds)
    return {**meta, "cached": False, "seconds": seconds}
