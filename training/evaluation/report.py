"""The evaluation report: an HTML page with PNG grids (inputs | prediction | ground truth per task), the
metric table and the training curves, drawn with PIL only (no matplotlib).

Entry points: :func:`write_report` and :func:`metrics_markdown_table`. Lower-level pieces
(:func:`colorize_depth`, :func:`colorize_semseg`, :func:`draw_boxes`, :func:`example_grid`,
:func:`line_chart`, :func:`training_curves`) are public so notebooks and the demo can reuse them.
"""

from __future__ import annotations

import html
import json
import logging
import math
import textwrap
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw, ImageFont

__all__ = [
    "write_report",
    "metrics_markdown_table",
    "metrics_html_table",
    "flatten_metrics",
    "colorize_depth",
    "colorize_semseg",
    "draw_boxes",
    "example_grid",
    "line_chart",
    "training_curves",
    "learning_curves",
]

logger = logging.getLogger(__name__)

CELL = 192  # image side of one grid cell, pixels
TEXT_LINES = 4  # text lines under each cell
LINE_H = 14
PAD = 6
SERIES_COLORS = [
    (31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189),
    (140, 86, 75), (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207),
]  # fmt: skip
# Viridis at 0, 1/8, ..., 1 (matplotlib's values), linearly interpolated.
_VIRIDIS = np.array(
    [[68, 1, 84], [71, 44, 122], [59, 81, 139], [44, 113, 142], [33, 144, 141],
     [39, 173, 129], [92, 200, 99], [170, 220, 50], [253, 231, 37]], dtype=np.float64,
)  # fmt: skip


def _font(size: int = 12) -> ImageFont.ImageFont | ImageFont.FreeTypeFont:
    try:
        return ImageFont.load_default(size=size)
    except (TypeError, OSError):  # Pillow without FreeType: fixed bitmap font
        return ImageFont.load_default()


def _text_width(font: Any, text: str) -> int:
    box = font.getbbox(text)
    return int(box[2] - box[0])


# --------------------------------------------------------------------------------------------------------
# Rendering of modalities


def colorize_depth(depth: Any, vmin: float | None = None, vmax: float | None = None) -> np.ndarray:
    """Depth (H, W) metres -> uint8 (H, W, 3) viridis, near = bright yellow, far = dark purple; invalid
    (non-finite or <= 0) pixels black. vmin/vmax default to the valid range of ``depth``."""
    d = np.asarray(depth, dtype=np.float64)
    if d.ndim != 2:
        raise ValueError(f"depth must be (H, W), got shape {d.shape}")
    valid = np.isfinite(d) & (d > 0)
    if vmin is None or vmax is None:
        vals = d[valid] if valid.any() else np.array([0.0, 1.0])
        vmin = float(vals.min()) if vmin is None else vmin
        vmax = float(vals.max()) if vmax is None else vmax
    t = 1.0 - np.clip((d - vmin) / max(vmax - vmin, 1e-9), 0.0, 1.0)  # 1 = near
    t = np.where(valid, t, 0.0) * (len(_VIRIDIS) - 1)
    i = np.minimum(np.floor(t).astype(np.int64), len(_VIRIDIS) - 2)
    f = (t - i)[..., None]
    rgb = _VIRIDIS[i] * (1 - f) + _VIRIDIS[i + 1] * f
    rgb[~valid] = 0
    return np.round(rgb).astype(np.uint8)


def _palette(n: int) -> np.ndarray:
    """The PASCAL VOC label palette (class 0 black), n x 3 uint8."""
    out = np.zeros((n, 3), dtype=np.uint8)
    for k in range(n):
        c, r, g, b = k, 0, 0, 0
        for j in range(8):
            r |= ((c >> 0) & 1) << (7 - j)
            g |= ((c >> 1) & 1) << (7 - j)
            b |= ((c >> 2) & 1) << (7 - j)
            c >>= 3
        out[k] = (r, g, b)
    return out


def colorize_semseg(ids: Any, num_classes: int = 256) -> np.ndarray:
    """Class ids (H, W) -> uint8 (H, W, 3) with the PASCAL VOC palette (0 = black background)."""
    a = np.asarray(ids)
    if a.ndim != 2:
        raise ValueError(f"semseg must be (H, W), got shape {a.shape}")
    return _palette(max(num_classes, int(a.max(initial=0)) + 1))[np.clip(a.astype(np.int64), 0, None)]


def _to_rgb_array(image: Any) -> np.ndarray:
    if isinstance(image, Image.Image):
        return np.asarray(image.convert("RGB"))
    a = np.asarray(image)
    if a.ndim == 2:
        a = np.repeat(a[..., None], 3, axis=-1)
    if a.ndim != 3 or a.shape[-1] not in (3, 4):
        raise ValueError(f"expected an rgb image (H, W, 3), got shape {a.shape}")
    if np.issubdtype(a.dtype, np.floating):
        a = np.clip(a * 255.0 if a.max() <= 1.0 else a, 0, 255)
    return a[..., :3].astype(np.uint8)


def _fit_cell(image: np.ndarray, size: int = CELL) -> Image.Image:
    """Upscale (nearest, integer factor where possible) or downscale an image to fit a size x size cell."""
    im = Image.fromarray(image)
    scale = size / max(im.size)
    new = (max(1, round(im.width * scale)), max(1, round(im.height * scale)))
    return im.resize(new, Image.NEAREST if scale >= 1 else Image.BILINEAR)


def draw_boxes(image: Any, boxes: Sequence[dict[str, Any]], size: int = CELL) -> Image.Image:
    """Boxes ``[{"box": [x0, y0, x1, y1], "label", "score"?}]`` (pixels of ``image``) drawn with labels on the
    image scaled to ``size``."""
    rgb = _to_rgb_array(image)
    im = _fit_cell(rgb, size).convert("RGB")
    scale = im.width / rgb.shape[1]
    draw = ImageDraw.Draw(im)
    font = _font(11)
    for k, b in enumerate(boxes):
        color = SERIES_COLORS[k % len(SERIES_COLORS)]
        x0, y0, x1, y1 = (float(v) * scale for v in b["box"])
        draw.rectangle([x0, y0, max(x1 - 1, x0), max(y1 - 1, y0)], outline=color, width=2)
        label = str(b.get("label", ""))
        if "score" in b:
            label += f" {float(b['score']):.2f}"
        ty = max(y0 - 13, 0)
        draw.rectangle([x0, ty, x0 + _text_width(font, label) + 4, ty + 13], fill=color)
        draw.text((x0 + 2, ty), label, fill=(255, 255, 255), font=font)
    return im


def _infer_kind(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        return "text"
    if isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
        return "text"
    if isinstance(value, (list, tuple)):
        return "boxes" if all(isinstance(v, dict) for v in value) else None
    if isinstance(value, Image.Image):
        return "rgb"
    a = np.asarray(value)
    if a.ndim == 3:
        return "rgb"
    if a.ndim == 2:
        return "depth" if np.issubdtype(a.dtype, np.floating) else "semseg"
    return None


def _wrap(text: str, font: Any, width: int, max_lines: int) -> list[str]:
    chars = max(8, int(width / max(_text_width(font, "abcdefghij") / 10, 1)))
    lines = textwrap.wrap(text, chars) or [""]
    if len(lines) > max_lines:
        lines = lines[: max_lines - 1] + [lines[max_lines - 1][: max(chars - 3, 1)] + "..."]
    return lines


def _render(
    value: Any, kind: str | None, base_rgb: Any, depth_range: tuple[float, float] | None
) -> tuple[Image.Image | None, str]:
    """One cell: (picture or None, text shown under it)."""
    if value is None:
        return None, "(none)"
    if kind == "text":
        text = value if isinstance(value, str) else " | ".join(value)
        return None, text
    if kind == "rgb":
        return _fit_cell(_to_rgb_array(value)), ""
    if kind == "depth":
        lo, hi = depth_range if depth_range else (None, None)
        d = np.asarray(value, dtype=np.float64)
        ok = d[np.isfinite(d) & (d > 0)]
        text = f"{ok.min():.2f} - {ok.max():.2f} m" if ok.size else "no valid depth"
        return _fit_cell(colorize_depth(value, lo, hi)), text
    if kind == "semseg":
        return _fit_cell(colorize_semseg(value)), ""
    if kind == "boxes":
        if base_rgb is None:
            extent = max([max(b["box"][2], b["box"][3]) for b in value] + [16])
            base_rgb = np.zeros((int(math.ceil(extent)), int(math.ceil(extent)), 3), dtype=np.uint8)
        return draw_boxes(base_rgb, value), f"{len(value)} box{'es' if len(value) != 1 else ''}"
    raise ValueError(f"cannot render a value of kind {kind!r}: use one of text, rgb, depth, semseg, boxes")


def _depth_range(values: Sequence[Any]) -> tuple[float, float] | None:
    valid = []
    for v in values:
        if v is not None:
            a = np.asarray(v, dtype=np.float64)
            valid.append(a[np.isfinite(a) & (a > 0)])
    valid = [v for v in valid if v.size]
    if not valid:
        return None
    allv = np.concatenate(valid)
    return float(allv.min()), float(allv.max())


def example_grid(examples: Sequence[dict[str, Any]], title: str = "") -> Image.Image:
    """One row per example: its inputs, then prediction, then ground truth (see :func:`write_report` for the
    example format). Pictures are scaled to CELL x CELL pixels; text goes under each cell."""
    if not examples:
        raise ValueError("no examples to draw")
    input_keys: list[str] = []
    for ex in examples:
        if not isinstance(ex, dict) or "prediction" not in ex:
            raise TypeError("each example must be a dict with 'inputs', 'prediction' and 'target' (see write_report)")
        for k in ex.get("inputs", {}):
            if k not in input_keys:
                input_keys.append(k)
    columns = input_keys + ["prediction", "ground truth"]
    font, bold = _font(12), _font(14)
    col_w = CELL + 2 * PAD
    row_h = CELL + PAD + TEXT_LINES * LINE_H + PAD
    header_h = 24 + (22 if title else 0)
    canvas = Image.new("RGB", (col_w * len(columns), header_h + row_h * len(examples)), (255, 255, 255))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((PAD, 4), title, fill=(0, 0, 0), font=_font(16))
    for c, name in enumerate(columns):
        draw.text((c * col_w + PAD, header_h - 20), name, fill=(60, 60, 60), font=bold)
    for r, ex in enumerate(examples):
        inputs = ex.get("inputs", {})
        pred, target = ex.get("prediction"), ex.get("target")
        kind = ex.get("kind") or _infer_kind(pred) or _infer_kind(target)
        base_rgb = inputs.get("rgb")
        drange = _depth_range([pred, target]) if kind == "depth" else None
        cells = []
        for k in input_keys:
            v = inputs.get(k)
            input_kind = "text" if isinstance(v, str) else (k if k in ("rgb", "depth", "semseg") else _infer_kind(v))
            cells.append(_render(v, input_kind, None, None))
        pic, text = _render(pred, kind, base_rgb, drange)
        if ex.get("note"):
            text = (text + "  " if text else "") + str(ex["note"])
        cells.append((pic, text))
        cells.append(_render(target, kind, base_rgb, drange))
        y = header_h + r * row_h
        for c, (pic, text) in enumerate(cells):
            x = c * col_w + PAD
            if pic is not None:
                canvas.paste(pic, (x + (CELL - pic.width) // 2, y + (CELL - pic.height) // 2))
                lines = _wrap(text, font, CELL, TEXT_LINES) if text else []
                ty = y + CELL + PAD
            else:  # text-only cell: the text fills the picture area
                lines = _wrap(text, font, CELL, (CELL + TEXT_LINES * LINE_H) // LINE_H)
                ty = y + PAD
            for j, line in enumerate(lines):
                draw.text((x, ty + j * LINE_H), line, fill=(0, 0, 0), font=font)
        draw.line([(0, y + row_h - 1), (canvas.width, y + row_h - 1)], fill=(220, 220, 220))
    return canvas


# --------------------------------------------------------------------------------------------------------
# Training curves


def _nice_ticks(lo: float, hi: float, n: int = 5) -> list[float]:
    if hi <= lo:
        hi = lo + 1.0
    raw = (hi - lo) / n
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    start = math.ceil(lo / step) * step
    return [start + k * step for k in range(int((hi - start) / step + 1e-9) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.4g}"


def line_chart(
    series: dict[str, tuple[Sequence[float], Sequence[float | None]]],
    title: str = "",
    x_label: str = "step",
    size: tuple[int, int] = (520, 300),
    log_y: bool | None = None,
) -> Image.Image:
    """A line chart of ``{name: (xs, ys)}`` with axes, ticks, labels and a legend (``None`` ys are gaps).
    ``log_y=None`` picks a log y axis when all values are positive and span more than 30x."""
    pts = {
        k: [(float(x), float(y)) for x, y in zip(*v) if y is not None and math.isfinite(float(y))]
        for k, v in series.items()
    }
    pts = {k: v for k, v in pts.items() if v}
    font = _font(11)
    legend_rows = math.ceil(len(pts) / 2)
    w, h = size[0], size[1] + legend_rows * 15
    im = Image.new("RGB", (w, h), (255, 255, 255))
    draw = ImageDraw.Draw(im)
    draw.text((8, 4), title, fill=(0, 0, 0), font=_font(13))
    left, right, top, bottom = 62, w - 12, 26, size[1] - 38
    if not pts:
        draw.text((left, (top + bottom) // 2), "no data", fill=(120, 120, 120), font=font)
        return im
    xs = [x for v in pts.values() for x, _ in v]
    ys = [y for v in pts.values() for _, y in v]
    if log_y is None:
        log_y = min(ys) > 0 and max(ys) / min(ys) > 30
    ty = (lambda y: math.log10(y)) if log_y else (lambda y: y)
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_lo, y_hi = ty(min(ys)), ty(max(ys))
    if y_hi == y_lo:
        y_lo, y_hi = y_lo - 0.5, y_hi + 0.5
    pad = 0.05 * (y_hi - y_lo)
    y_lo, y_hi = y_lo - pad, y_hi + pad

    def px(x: float, y: float) -> tuple[float, float]:
        fx = (x - x_lo) / (x_hi - x_lo)
        fy = (ty(y) - y_lo) / (y_hi - y_lo)
        return left + fx * (right - left), bottom - fy * (bottom - top)

    draw.rectangle([left, top, right, bottom], outline=(0, 0, 0))
    for t in _nice_ticks(y_lo, y_hi):
        y = bottom - (t - y_lo) / (y_hi - y_lo) * (bottom - top)
        draw.line([(left, y), (right, y)], fill=(235, 235, 235))
        draw.line([(left - 4, y), (left, y)], fill=(0, 0, 0))
        label = _fmt(10**t if log_y else t)
        draw.text((left - 6 - _text_width(font, label), y - 6), label, fill=(0, 0, 0), font=font)
    for t in _nice_ticks(x_lo, x_hi):
        x = left + (t - x_lo) / (x_hi - x_lo) * (right - left)
        draw.line([(x, bottom), (x, bottom + 4)], fill=(0, 0, 0))
        label = _fmt(t)
        draw.text((x - _text_width(font, label) / 2, bottom + 6), label, fill=(0, 0, 0), font=font)
    draw.text(((left + right) / 2 - _text_width(font, x_label) / 2, bottom + 20), x_label, fill=(0, 0, 0), font=font)
    if log_y:
        draw.text((left + 4, top + 2), "log scale", fill=(120, 120, 120), font=font)
    for k, (name, v) in enumerate(pts.items()):
        color = SERIES_COLORS[k % len(SERIES_COLORS)]
        line = [px(x, y) for x, y in sorted(v)]
        if len(line) > 1:
            draw.line(line, fill=color, width=2)
        for x, y in line if len(line) <= 40 else line[-1:]:
            draw.ellipse([x - 2, y - 2, x + 2, y + 2], fill=color)
        lx = 12 + (k % 2) * (w // 2)
        ly = size[1] + (k // 2) * 15 - 6
        draw.rectangle([lx, ly + 3, lx + 14, ly + 9], fill=color)
        draw.text((lx + 20, ly), name, fill=(0, 0, 0), font=font)
    return im


_SKIP_SERIES = {"step", "time", "epoch"}


def _chart_groups(records: Sequence[dict[str, Any]]) -> dict[str, list[str]]:
    """Series names grouped into charts: "train/loss" + "val/loss" together, "train/loss/<modality>" per
    split, every other scalar on its own."""
    names: list[str] = []
    for r in records:
        for k, v in r.items():
            if k not in _SKIP_SERIES and k not in names and (v is None or isinstance(v, (int, float))):
                names.append(k)
    groups: dict[str, list[str]] = {}
    for k in names:
        parts = k.split("/")
        if parts[0] == "heldout":  # the learning curves of the real tasks, on one chart
            groups.setdefault("held-out task metrics", []).append(k)
            continue
        if len(parts) >= 3:
            group = f"{'/'.join(parts[:2])} per {'modality' if parts[1] == 'loss' else 'part'}"
        elif len(parts) == 2:
            group = parts[1]
        else:
            group = k
        groups.setdefault(group, []).append(k)
    return groups


def training_curves(records: Sequence[dict[str, Any]], columns: int = 2) -> Image.Image:
    """All charts of a metrics log (records as in ``training/run_log.py``: ``{"step": int, name: float}``)
    tiled ``columns`` wide."""
    groups = _chart_groups(records)
    if not groups:
        raise ValueError("the metrics log has no numeric series besides step/time")
    charts = []
    for title, names in groups.items():
        series = {}
        for name in names:
            rows = [(r["step"], r[name]) for r in records if name in r and "step" in r]
            series[name] = ([s for s, _ in rows], [v for _, v in rows])
        charts.append(line_chart(series, title=title))
    cw = max(c.width for c in charts)
    ch = max(c.height for c in charts)
    ncol = min(columns, len(charts))
    nrow = math.ceil(len(charts) / ncol)
    canvas = Image.new("RGB", (cw * ncol, ch * nrow), (255, 255, 255))
    for k, c in enumerate(charts):
        canvas.paste(c, ((k % ncol) * cw, (k // ncol) * ch))
    return canvas


def learning_curves(records: Sequence[dict[str, Any]]) -> Image.Image | None:
    """One chart of the held-out task metrics (``heldout/<metric>`` series) against step; None when the log has
    none."""
    series = {}
    for r in records:
        for k, v in r.items():
            if k.startswith("heldout/") and isinstance(v, (int, float)) and "step" in r:
                xs, ys = series.setdefault(k.split("/", 1)[1], ([], []))
                xs.append(r["step"])
                ys.append(v)
    return line_chart(series, title="held-out task metrics vs training step", log_y=False) if series else None


# --------------------------------------------------------------------------------------------------------
# Tables and the page


def flatten_metrics(results: dict[str, Any]) -> list[tuple[str, str, Any]]:
    """``(task, metric, value)`` rows: nested dicts become ``a/b`` metric names, lists of numbers ``a[i]``;
    other lists (e.g. error examples) are left out."""
    rows: list[tuple[str, str, Any]] = []

    def walk(task: str, prefix: str, v: Any) -> None:
        if isinstance(v, dict):
            for k, x in v.items():
                walk(task, f"{prefix}/{k}" if prefix else str(k), x)
        elif isinstance(v, (list, tuple)):
            if all(x is None or isinstance(x, (int, float)) for x in v):
                for i, x in enumerate(v):
                    walk(task, f"{prefix}[{i}]", x)
        else:
            rows.append((task, prefix, v))

    for task, metrics in results.items():
        if isinstance(metrics, dict):
            walk(str(task), "", metrics)
        else:
            walk(str(task), "value", metrics)
    return rows


def _format_value(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, bool):
        return str(v)
    if isinstance(v, int):
        return str(v)
    if isinstance(v, float):
        if not math.isfinite(v):
            return str(v)
        return f"{v:.1f}" if abs(v) >= 100 else f"{v:.4g}"
    return str(v)


def metrics_markdown_table(results: dict[str, Any]) -> str:
    """``results`` (``{task: {metric: value, ...}}``, nesting allowed) as a Markdown table
    ``| task | metric | value |``, one row per metric, in the order given."""
    lines = ["| task | metric | value |", "| --- | --- | --- |"]
    for task, metric, value in flatten_metrics(results):
        lines.append(f"| {task} | {metric} | {_format_value(value)} |")
    return "\n".join(lines) + "\n"


def metrics_html_table(results: dict[str, Any]) -> str:
    """The same table as :func:`metrics_markdown_table`, as an HTML ``<table>``."""
    rows = "".join(
        f"<tr><td>{html.escape(t)}</td><td>{html.escape(m)}</td>"
        f"<td class='num'>{html.escape(_format_value(v))}</td></tr>"
        for t, m, v in flatten_metrics(results)
    )
    return f"<table class='metrics'><tr><th>task</th><th>metric</th><th>value</th></tr>{rows}</table>"


def _json_default(o: Any) -> Any:
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    raise TypeError(f"not JSON serialisable: {type(o).__name__}")


_CSS = """body{font-family:sans-serif;margin:24px;max-width:1400px}table.metrics{border-collapse:collapse}
table.metrics td,table.metrics th{border:1px solid #ccc;padding:3px 10px;text-align:left}td.num{text-align:right;
font-family:monospace}img{max-width:100%;border:1px solid #eee}h2{margin-top:32px}"""


def _safe_name(task: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in task) or "task"


def write_report(
    out_dir: str | Path,
    results: dict[str, Any],
    examples: dict[str, list[dict[str, Any]]] | None = None,
    metrics_log: str | Path | None = None,
    title: str = "onemodel evaluation",
    images: dict[str, str] | None = None,
) -> Path:
    """Write ``report.html`` with its PNGs, ``metrics.md`` and ``results.json`` into ``out_dir``; return the
    path of ``report.html``.

    results: ``{task: {metric: value}}`` as returned by the metric functions (nested dicts and lists of
    numbers are flattened into the table; ``None`` shows as n/a).

    examples: ``{task: [example, ...]}``, one PNG grid per task (``<task>.png``, a row per example). An example
    is a dict, all values in raw-sample units (docs/internals.md section 1)::

        {"inputs": {"rgb": uint8 (H, W, 3) | PIL image,      # pictures by key: rgb / depth / semseg
                    "question": "what color is ...?"},       # strings are shown as text
         "prediction": value,                                # what the model produced
         "target": value | None,                             # ground truth (None: not available)
         "kind": "text" | "rgb" | "depth" | "semseg" | "boxes",   # optional, inferred from the values
         "note": "judge: red circle, small"}                 # optional text under the prediction

    where a value is a ``str`` (or a list of reference strings) for captions / answers, an rgb image, a depth
    map float32 (H, W) in metres (prediction and target share one colour scale), a semseg map of int class ids
    (H, W), or boxes ``[{"box": [x0, y0, x1, y1], "label", "score"?}]`` drawn on ``inputs["rgb"]``.

    metrics_log: a JSONL metrics log (``training/run_log.py`` format); its curves go to ``curves.png``.

    images: ``{heading: file name}`` of further PNGs already written in ``out_dir`` (e.g. a retrieval grid),
    shown after the examples.
    """
    from tokenizers_mm.io_atomic import atomic_directory, save_image, write_json, write_text
    from training.run_log import read_metrics

    out = Path(out_dir)
    examples = examples or {}
    with atomic_directory(out) as stage:  # every file of the report, or none
        write_json(stage / "results.json", results, default=_json_default)
        table_md = metrics_markdown_table(results) if results else "(no metrics)\n"
        write_text(stage / "metrics.md", f"# {title}\n\n{table_md}")
        parts = [
            f"<!DOCTYPE html><html><head><meta charset='utf-8'><title>{html.escape(title)}</title>",
            f"<style>{_CSS}</style></head><body><h1>{html.escape(title)}</h1>",
            "<h2 id='metrics'>Metrics</h2>",
            metrics_html_table(results) if results else "<p>No metrics.</p>",
        ]
        for task, task_examples in examples.items():
            if not task_examples:
                continue
            name = f"examples_{_safe_name(task)}.png"
            save_image(stage / name, example_grid(task_examples, title=task))
            parts.append(f"<h2 id='task-{html.escape(_safe_name(task))}'>{html.escape(task)}</h2>")
            parts.append("<p>inputs | prediction | ground truth</p>")
            parts.append(f"<img src='{name}' alt='{html.escape(task)} examples'>")
        for heading, name in (images or {}).items():
            parts.append(f"<h2>{html.escape(heading)}</h2>")
            parts.append(f"<img src='{html.escape(name)}' alt='{html.escape(heading)}'>")
        if metrics_log is not None and Path(metrics_log).is_file():
            curves = learning_curves(read_metrics(metrics_log))
            if curves is not None:
                save_image(stage / "learning_curves.png", curves)
                parts.append("<h2 id='learning-curves'>Learning curves</h2>")
                parts.append("<p>Task metrics on held-out samples during training "
                             "(<code>logging.heldout_every</code>).</p>")
                parts.append("<img src='learning_curves.png' alt='held-out task metrics against training step'>")
        parts.append("<h2 id='curves'>Training curves</h2>")
        if metrics_log is not None and Path(metrics_log).is_file() and read_metrics(metrics_log):
            try:
                save_image(stage / "curves.png", training_curves(read_metrics(metrics_log)))
                parts.append(f"<p>From <code>{html.escape(str(metrics_log))}</code>.</p>")
                parts.append("<img src='curves.png' alt='training curves'>")
            except ValueError as err:
                parts.append(f"<p>{html.escape(str(err))}</p>")
        else:
            parts.append("<p>No metrics log given.</p>")
        parts.append("</body></html>\n")
        write_text(stage / "report.html", "\n".join(parts))
    page = out / "report.html"
    logger.info("wrote the evaluation report to %s", page)
    return page
