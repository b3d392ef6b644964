"""A judge for text -> image on shapes: which (colour, shape, size) objects does an image show?

The judge is independent of the generator: it knows only the dataset's public vocabulary (the named colours
of ``training.data.shapes.COLORS``, the three shape types and the two sizes) and analyses pixels exactly:

1. Colours: the background colour is the median of the image border; every pixel gets the nearest named
   colour (RGB distance), or "background" when the background colour is nearer, or "unknown" when no named
   colour is within ``JudgeConfig.max_color_distance`` (noise, blurred edges).
2. Regions: 4-connected components of each colour; components smaller than ``min_region_fraction`` of the
   image or with no interior pixel (1-2 px wide strips, typical of blurred edges between two colours) are
   ignored.
3. Shapes, by analysis-by-synthesis: for each region, every shape template (circle, axis-aligned square,
   upward triangle, each with centre and half-size ``e``) is scored by ``sum over its pixels of w`` with
   ``w = -1`` on pixels of the region's colour, ``+1`` on background and ``occluder_weight`` elsewhere
   (pixels of other colours may hide part of a shape that lies behind them). The best template gives the
   shape type, and its half-size the size (``e / side < size_threshold`` -> small). Occlusion, two touching
   shapes of one colour and a shape split in two by an occluder are handled because the region's colour
   pixels left unexplained by the fitted templates are fitted again.

Template costs are sums of ``w`` over row intervals, computed from row prefix sums for thousands of
candidate templates at once (numpy only; no scipy).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

__all__ = ["JudgeConfig", "judge_image", "attribute_accuracy", "judge_accuracy_on_real", "requested_objects"]

logger = logging.getLogger(__name__)

SHAPE_TYPES = ("circle", "square", "triangle")
MAX_CANDIDATES = 40_000  # templates per shape type in the coarse search


@dataclass(frozen=True)
class JudgeConfig:
    """Judge tolerances (defaults tuned on real shapes images and on noisy/blurred copies of them).

    max_color_distance: RGB distance beyond which a pixel matches no named colour (named colours are >= 81
        apart, so 60 tolerates strong noise without confusing yellow and orange).
    min_region_fraction: regions smaller than this fraction of H*W are noise (0.004 = 16 px at 64x64).
    size_threshold: half-size / image side separating "small" (< threshold) from "large"; the shapes
        generator draws small in [0.09, 0.12] and large in [0.17, 0.23].
    occluder_weight: cost of a template pixel that lies on another colour (a possible occluder).
    max_fits_per_color: at most this many shapes are read from one colour.
    """

    max_color_distance: float = 60.0
    min_region_fraction: float = 0.004
    size_threshold: float = 0.145
    occluder_weight: float = 0.05
    max_fits_per_color: int = 6

    def __post_init__(self) -> None:
        if self.max_color_distance <= 0:
            raise ValueError("max_color_distance must be > 0")
        if not 0 <= self.min_region_fraction < 1:
            raise ValueError("min_region_fraction must be in [0, 1)")
        if not 0 < self.size_threshold < 1:
            raise ValueError("size_threshold must be in (0, 1)")
        if self.max_fits_per_color < 1:
            raise ValueError("max_fits_per_color must be >= 1")


def _palette() -> tuple[list[str], np.ndarray]:
    from training.data.shapes import COLORS

    return list(COLORS), np.array(list(COLORS.values()), dtype=np.float64)


def _as_rgb(image: Any) -> np.ndarray:
    a = np.asarray(image)
    if a.ndim != 3 or a.shape[2] not in (3, 4):
        raise ValueError(f"expected an rgb image (H, W, 3), got shape {a.shape}")
    a = a[..., :3]
    if np.issubdtype(a.dtype, np.floating):
        if a.max() <= 1.0 + 1e-6:  # float images in [0, 1]
            a = a * 255.0
        a = np.clip(np.round(a), 0, 255)
    if min(a.shape[:2]) < 8:
        raise ValueError(f"image too small to judge: {a.shape[:2]}")
    return a.astype(np.float64)


# --------------------------------------------------------------------------------------------------------
# Binary morphology and connected components (numpy)


def _shift(mask: np.ndarray, dy: int, dx: int, fill: bool | int) -> np.ndarray:
    """``out[y, x] = mask[y + dy, x + dx]`` (``fill`` outside the image)."""
    out = np.full_like(mask, fill)
    h, w = mask.shape
    ys, yd = (slice(dy, h), slice(0, h - dy)) if dy >= 0 else (slice(0, h + dy), slice(-dy, h))
    xs, xd = (slice(dx, w), slice(0, w - dx)) if dx >= 0 else (slice(0, w + dx), slice(-dx, w))
    out[yd, xd] = mask[ys, xs]
    return out


def _erode(mask: np.ndarray) -> np.ndarray:
    """3x3 binary erosion (outside the image counts as False)."""
    out = mask.copy()
    for dy in (-1, 0, 1):
        for dx in (-1, 0, 1):
            if dy or dx:
                out &= _shift(mask, dy, dx, False)
    return out


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, largest first (boolean masks)."""
    if not mask.any():
        return []
    h, w = mask.shape
    big = h * w
    labels = np.where(mask, np.arange(big).reshape(h, w), big)
    while True:  # min-label propagation with pointer jumping: O(log diameter) rounds in practice
        new = labels
        for dy, dx in ((-1, 0), (1, 0), (0, -1), (0, 1)):
            new = np.minimum(new, np.where(mask, _shift(labels, dy, dx, big), big))
        flat = new.ravel()
        jumped = np.where(mask.ravel(), flat[np.minimum(flat, big - 1)], big).reshape(h, w)
        new = np.minimum(new, jumped)
        if np.array_equal(new, labels):
            break
        labels = new
    ids, counts = np.unique(labels[mask], return_counts=True)
    return [labels == ids[k] for k in np.argsort(-counts, kind="stable")]


# --------------------------------------------------------------------------------------------------------
# Template fitting


def _half_widths(shape: str, dy: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Half-width of a template's row at vertical offset ``dy`` (pixel centre - cy); NaN outside the shape."""
    if shape == "square":
        return np.where(np.abs(dy) <= e, e, np.nan)
    if shape == "circle":
        r2 = e * e - dy * dy
        return np.where(r2 >= 0, np.sqrt(np.maximum(r2, 0.0)), np.nan)
    if shape == "triangle":  # apex at cy - e, base at cy + e (width 2e)
        t = dy + e
        return np.where((t >= 0) & (dy <= e), t / 2.0, np.nan)
    raise AssertionError(shape)


def _template_costs(prefix: np.ndarray, shape: str, cx: np.ndarray, cy: np.ndarray, e: np.ndarray) -> np.ndarray:
    """Sum of weights under each candidate template. prefix: (H, W + 1) row prefix sums of the weights;
    cx, cy, e: (K,) candidate centres (pixels, continuous) and half-sizes. Returns (K,)."""
    h, w1 = prefix.shape
    w = w1 - 1
    n_rows = int(np.ceil(2 * e.max())) + 3
    rows = np.floor(cy - e - 0.5)[:, None] + np.arange(n_rows)[None, :]  # (K, R) candidate row indices
    dy = rows + 0.5 - cy[:, None]
    hw = _half_widths(shape, dy, e[:, None])
    ok = ~np.isnan(hw) & (rows >= 0) & (rows < h)
    hw = np.nan_to_num(hw)
    lo = np.clip(np.ceil(cx[:, None] - hw - 0.5), 0, w)
    hi = np.clip(np.floor(cx[:, None] + hw - 0.5) + 1, 0, w)  # exclusive
    ok &= hi > lo
    r = np.clip(rows, 0, h - 1).astype(np.int64)
    sums = prefix[r, hi.astype(np.int64)] - prefix[r, lo.astype(np.int64)]
    return np.where(ok, sums, 0.0).sum(axis=1)


def _template_mask(shape: str, cx: float, cy: float, e: float, h: int, w: int) -> np.ndarray:
    ys, xs = np.mgrid[0:h, 0:w]
    dy = ys + 0.5 - cy
    hw = _half_widths(shape, dy, np.full_like(dy, e, dtype=np.float64))
    return ~np.isnan(hw) & (np.abs(xs + 0.5 - cx) <= np.nan_to_num(hw, nan=-1.0))


def _box(mask: np.ndarray) -> tuple[int, int, int, int]:
    rows = np.flatnonzero(mask.any(axis=1))
    cols = np.flatnonzero(mask.any(axis=0))
    return int(cols[0]), int(cols[-1] + 1), int(rows[0]), int(rows[-1] + 1)


Fit = tuple[str, float, float, float, float]  # shape, cx, cy, e, cost


def _best(prefix: np.ndarray, shapes: Sequence[str], cand: np.ndarray, best: Fit | None) -> Fit | None:
    """Lowest-cost template among candidates ``cand`` (K, 3) = (cx, cy, e) for each shape type."""
    for shape in shapes:
        for k0 in range(0, len(cand), 8192):
            chunk = cand[k0 : k0 + 8192]
            costs = _template_costs(prefix, shape, chunk[:, 0], chunk[:, 1], chunk[:, 2])
            k = int(np.argmin(costs))
            if best is None or costs[k] < best[4] - 1e-9:
                best = (shape, float(chunk[k, 0]), float(chunk[k, 1]), float(chunk[k, 2]), float(costs[k]))
    return best


def _grid(cx_range, cy_range, es: np.ndarray, step: float) -> np.ndarray:
    """Candidates (K, 3) = (cx, cy, e); cx_range / cy_range map e -> (lo, hi) (inclusive)."""
    cand = []
    for e in es:
        cxs = np.arange(cx_range(e)[0], cx_range(e)[1] + 1e-9, step)
        cys = np.arange(cy_range(e)[0], cy_range(e)[1] + 1e-9, step)
        if cxs.size and cys.size:
            gx, gy = np.meshgrid(cxs, cys)
            cand.append(np.stack([gx.ravel(), gy.ravel(), np.full(gx.size, e)], axis=1))
    return np.concatenate(cand) if cand else np.zeros((0, 3))


def _fit(weights: np.ndarray, seed: np.ndarray, support: np.ndarray | None, max_extent: float) -> Fit:
    """Best template whose box contains the seed region's box (1 px tolerance) and lies in the box of the
    support (the non-background area around the seed, 1.5 px tolerance; None = anywhere). Coarse grid
    (0.5 px, coarser if that exceeds MAX_CANDIDATES) over shape type, centre and half-size, then finer grids
    around the optimum down to 0.125 px."""
    h, w = weights.shape
    prefix = np.zeros((h, w + 1))
    np.cumsum(weights, axis=1, out=prefix[:, 1:])
    x0, x1, y0, y1 = _box(seed)
    sx0, sx1, sy0, sy1 = _box(support) if support is not None else (0, w, 0, h)
    span = max(x1 - x0, y1 - y0)
    e_lo = max(span / 2.0 - 1.0, 1.0)
    # A shape is at most twice as wide as its visible part (it shows at least ~40% of itself).
    e_hi = max(min(max(sx1 - sx0, sy1 - sy0) / 2.0 + 1.5, max_extent, span + 1.0), e_lo + 0.5)
    for step in (0.5, 1.0, 2.0):  # coarser when the search space is large (big cluttered support)
        coarse = _grid(
            lambda e: (max(x1 - 0.5 - e - 1.0, sx0 - 1.5 + e), min(x0 + 0.5 + e + 1.0, sx1 + 1.5 - e)),
            lambda e: (max(y1 - 0.5 - e - 1.0, sy0 - 1.5 + e), min(y0 + 0.5 + e + 1.0, sy1 + 1.5 - e)),
            np.arange(e_lo, e_hi + 1e-9, step),
            step,
        )
        if len(coarse) <= MAX_CANDIDATES:
            break
    best = _best(prefix, SHAPE_TYPES, coarse, None)
    if best is None:  # the support box cannot hold the seed (noisy image): search the whole image
        assert support is not None, "the whole-image search always has candidates (e_lo fits the seed box)"
        return _fit(weights, seed, None, max_extent)
    while step > 0.125:  # refine around the optimum: +-step at step / 4
        shape, cx, cy, e, _ = best
        r, step = step, step / 4
        es = np.arange(max(e - r, 0.5), e + r + 1e-9, step)
        fine = _grid(lambda _e: (cx - r, cx + r), lambda _e: (cy - r, cy + r), es, step)
        best = _best(prefix, (shape,), fine, best)
        assert best is not None
    return best


def judge_image(image: Any, config: JudgeConfig | None = None) -> list[dict[str, Any]]:
    """The objects an rgb image shows: ``[{"color", "shape", "size", "center": [cx, cy], "extent",
    "pixels", "fit"}]`` sorted by pixel count (largest first).

    image: ``(H, W, 3)`` uint8 (or float in [0, 1], or a PIL image). ``extent`` is the fitted half-size in
    pixels, ``pixels`` the number of the object's colour pixels explained by it, ``fit`` the fraction of the
    fitted template that lies on its colour or on possible occluders (1.0 = perfect).
    """
    cfg = config or JudgeConfig()
    rgb = _as_rgb(image)
    h, w = rgb.shape[:2]
    side = float(min(h, w))
    names, palette = _palette()
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    background = np.median(border, axis=0)
    dist = np.linalg.norm(rgb[:, :, None, :] - palette[None, None], axis=-1)  # (H, W, K)
    nearest = dist.argmin(axis=-1)
    nearest_d = dist.min(axis=-1)
    is_bg = np.linalg.norm(rgb - background, axis=-1) <= nearest_d
    named = ~is_bg & (nearest_d <= cfg.max_color_distance)
    min_pixels = max(4, int(round(cfg.min_region_fraction * h * w)))
    max_extent = 0.35 * side
    objects: list[dict[str, Any]] = []
    supports = _components(~is_bg)  # connected non-background areas: a shape lies inside one of them
    for k, color in enumerate(names):
        color_mask = named & (nearest == k)
        if color_mask.sum() < min_pixels:
            continue
        remaining = color_mask.copy()
        for _ in range(cfg.max_fits_per_color):
            seeds = [c for c in _components(remaining) if c.sum() >= min_pixels and _erode(c).any()]
            if not seeds:
                break
            seed = seeds[0]
            weights = np.where(is_bg, 1.0, cfg.occluder_weight)
            weights[remaining] = -1.0
            support = next(c for c in supports if (c & seed).any())
            shape, cx, cy, e, _cost = _fit(weights, seed, support, max_extent)
            template = _template_mask(shape, cx, cy, e, h, w)
            explained = remaining & template
            if not (explained & seed).any():  # cannot happen with a containing box; guard against loops
                remaining &= ~seed
                continue
            remaining &= ~template
            area = max(int(template.sum()), 1)
            objects.append(
                {
                    "color": color,
                    "shape": shape,
                    "size": "small" if e / side < cfg.size_threshold else "large",
                    "center": [cx, cy],
                    "extent": e,
                    "pixels": int(explained.sum()),
                    "fit": float(1.0 - (template & is_bg).sum() / area),
                }
            )
    objects.sort(key=lambda o: -o["pixels"])
    return objects


# --------------------------------------------------------------------------------------------------------
# Scoring


def requested_objects(scene_or_prompt: dict[str, Any] | str) -> list[tuple[str, str | None, str]]:
    """(colour, size or None, shape) requested by a shapes scene graph or a prompt (parsed like a caption)."""
    if isinstance(scene_or_prompt, str):
        from training.evaluation.metrics import parse_shapes_caption

        return list(parse_shapes_caption(scene_or_prompt)["objects"])
    if isinstance(scene_or_prompt, dict) and "shapes" in scene_or_prompt:
        return [(s["color"], s["size"], s["shape"]) for s in scene_or_prompt["shapes"]]
    raise TypeError("expected a prompt string or a shapes scene graph (dict with a 'shapes' list)")


def attribute_accuracy(
    images: Sequence[Any], scenes_or_prompts: Sequence[dict[str, Any] | str], config: JudgeConfig | None = None
) -> dict[str, Any]:
    """Score generated images against what was asked for, with :func:`judge_image`.

    Returns (all in [0, 1]):
    ``accuracy``: fraction of images in which every requested (colour, shape) pair is present;
    ``exact_accuracy``: fraction whose judged objects equal the request exactly (colour, shape, size, nothing
    extra; requests without a size match any size);
    ``object_accuracy``: fraction of requested objects found with the right colour and shape;
    ``size_accuracy``: of those found, the fraction with the requested size (over requests naming a size);
    ``color_accuracy`` / ``shape_accuracy``: fraction of requested colours / shape types present (multiset);
    ``count_accuracy``: fraction of images with as many objects as requested; plus ``num_images``,
    ``num_objects``.
    """
    if len(images) != len(scenes_or_prompts):
        raise ValueError(f"got {len(images)} images but {len(scenes_or_prompts)} scenes/prompts: one each")
    if len(images) == 0:
        raise ValueError("no images to judge")
    all_ok = exact_ok = count_ok = 0
    n_obj = found = size_total = size_ok = color_ok = shape_ok = 0
    for image, req in zip(images, scenes_or_prompts):
        want = requested_objects(req)
        got = [(o["color"], o["size"], o["shape"]) for o in judge_image(image, config)]
        got_cs = Counter((c, s) for c, _, s in got)
        hits = 0
        pool = list(got)
        for c, z, s in sorted(want, key=lambda t: t[1] is None):  # sized requests claim objects first
            match = next((g for g in pool if g[0] == c and g[2] == s and (z is None or g[1] == z)), None)
            if match is None:
                match = next((g for g in pool if g[0] == c and g[2] == s), None)
            if match is None:
                continue
            pool.remove(match)
            hits += 1
            if z is not None:
                size_total += 1
                size_ok += int(match[1] == z)
        n_obj += len(want)
        found += hits
        want_cs = Counter((c, s) for c, _, s in want)
        all_ok += int(not (want_cs - got_cs))
        color_ok += sum((Counter(c for c, _, _ in want) & Counter(c for c, _, _ in got)).values())
        shape_ok += sum((Counter(s for _, _, s in want) & Counter(s for _, _, s in got)).values())
        count_ok += int(len(got) == len(want))
        exact_ok += int(len(got) == len(want) and hits == len(want) and not pool and _sizes_match(want, got))
    n = len(images)
    return {
        "accuracy": all_ok / n,
        "exact_accuracy": exact_ok / n,
        "object_accuracy": found / n_obj if n_obj else 0.0,
        "size_accuracy": size_ok / size_total if size_total else None,
        "color_accuracy": color_ok / n_obj if n_obj else 0.0,
        "shape_accuracy": shape_ok / n_obj if n_obj else 0.0,
        "count_accuracy": count_ok / n,
        "num_images": n,
        "num_objects": n_obj,
    }


def _sizes_match(want: list[tuple[str, str | None, str]], got: list[tuple[str, str, str]]) -> bool:
    sized = Counter(t for t in want if t[1] is not None)
    return not (sized - Counter(got))


def judge_accuracy_on_real(samples: Iterable[dict[str, Any]], config: JudgeConfig | None = None) -> dict[str, Any]:
    """How often the judge is right on real shapes images (raw samples with ``rgb`` and ``scene``).

    Returns ``{"scene_accuracy": fraction of images whose judged (colour, shape, size) multiset equals the
    scene graph's, "object_precision", "object_recall" (multiset matches over judged / true objects),
    "num_images", "errors": up to 10 ``{"key", "expected", "judged"}`` of the images it got wrong}``.
    """
    n = ok = tp = n_pred = n_true = 0
    errors = []
    for sample in samples:
        if "rgb" not in sample or "scene" not in sample:
            raise ValueError("judge_accuracy_on_real needs raw shapes samples with 'rgb' and 'scene'")
        true = Counter(requested_objects(sample["scene"]))
        got = Counter((o["color"], o["size"], o["shape"]) for o in judge_image(sample["rgb"], config))
        n += 1
        ok += int(true == got)
        tp += sum((true & got).values())
        n_pred += sum(got.values())
        n_true += sum(true.values())
        if true != got and len(errors) < 10:
            errors.append(
                {"key": sample.get("__key__"), "expected": sorted(true.elements()), "judged": sorted(got.elements())}
            )
    if n == 0:
        raise ValueError("no samples given")
    return {
        "scene_accuracy": ok / n,
        "object_precision": tp / n_pred if n_pred else 0.0,
        "object_recall": tp / n_true if n_true else 0.0,
        "num_images": n,
        "errors": errors,
    }
