"""Boxes <-> text with location tokens (Pix2Seq / 4M style): ``<loc_x0> <loc_y0> <loc_x1> <loc_y1> label`` per box.

Quantisation: a coordinate ``c`` of an image side ``S`` maps to bin ``round(c / S * (N - 1))`` (clamped to
``[0, N-1]``) and back to ``bin * S / (N - 1)``, so the round-trip error is at most ``S / (2 (N - 1))`` pixels
(0.5 px for 64 px and 64 bins). Boxes are written sorted by ``(y0, x0, y1, x1, label)`` of their bins, so the
text of a scene does not depend on the order of its box list. Labels are lowercased and their whitespace collapsed.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

__all__ = ["boxes_to_text", "text_to_boxes", "LOC_RE"]

LOC_RE = re.compile(r"<loc_(\d+)>")
_TOKEN_RE = re.compile(r"<loc_\d+>|[^\s<]+|<")


def _size(image_size: int | Sequence[int]) -> tuple[float, float]:
    """``image_size`` (int or (height, width)) -> (width, height)."""
    if isinstance(image_size, (int, float)) and not isinstance(image_size, bool):
        h = w = float(image_size)
    elif isinstance(image_size, (list, tuple)) and len(image_size) >= 2:
        h, w = float(image_size[0]), float(image_size[1])
    else:
        raise TypeError(f"image_size must be an int or (height, width), got {image_size!r}")
    if h <= 0 or w <= 0:
        raise ValueError(f"image_size must be positive, got {image_size!r}")
    return w, h


def _check_bins(num_bins: int) -> int:
    if isinstance(num_bins, bool) or not isinstance(num_bins, int) or num_bins < 2:
        raise ValueError(f"num_bins must be an int >= 2, got {num_bins!r}")
    return num_bins


def _to_bin(c: float, side: float, num_bins: int) -> int:
    return int(min(max(round(float(c) / side * (num_bins - 1)), 0), num_bins - 1))


def boxes_to_text(boxes: Sequence[dict[str, Any]], image_size: int | Sequence[int], num_bins: int = 64) -> str:
    """``[{"box": [x0, y0, x1, y1], "label": str}, ...]`` (pixels) -> ``"<loc_a> <loc_b> <loc_c> <loc_d> label ..."``.

    ``image_size``: int (square) or ``(height, width)``. An empty box list gives ``""``.
    """
    w, h = _size(image_size)
    num_bins = _check_bins(num_bins)
    groups = []
    for i, item in enumerate(boxes):
        if not isinstance(item, dict) or "box" not in item or "label" not in item:
            raise ValueError(f"box {i} must be a dict with 'box' [x0, y0, x1, y1] and 'label', got {item!r}")
        box = item["box"]
        if len(box) != 4:
            raise ValueError(f"box {i}: expected 4 coordinates [x0, y0, x1, y1], got {box!r}")
        x0, y0, x1, y1 = (float(v) for v in box)
        if x1 < x0 or y1 < y0:
            raise ValueError(f"box {i}: need x0 <= x1 and y0 <= y1, got {box!r}")
        label = " ".join(str(item["label"]).lower().split())
        if not label or "<" in label:
            raise ValueError(f"box {i}: label must be a non-empty word without '<', got {item['label']!r}")
        bins = (_to_bin(x0, w, num_bins), _to_bin(y0, h, num_bins), _to_bin(x1, w, num_bins), _to_bin(y1, h, num_bins))
        groups.append((bins, label))
    groups.sort(key=lambda g: (g[0][1], g[0][0], g[0][3], g[0][2], g[1]))
    return " ".join(" ".join(f"<loc_{b}>" for b in bins) + " " + label for bins, label in groups)


def text_to_boxes(text: str, image_size: int | Sequence[int], num_bins: int = 64) -> list[dict[str, Any]]:
    """Parse (possibly malformed, model-generated) box text back to ``[{"box": [x0, y0, x1, y1], "label": str}]``.

    Tolerant: a group needs exactly four location tokens followed by at least one word; incomplete groups,
    location tokens out of range and stray words are skipped; swapped corners are put back in order.
    """
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    w, h = _size(image_size)
    num_bins = _check_bins(num_bins)
    out: list[dict[str, Any]] = []
    locs: list[int | None] = []
    words: list[str] = []

    def flush() -> None:
        if len(locs) == 4 and words and None not in locs:
            x0, y0, x1, y1 = (b * s / (num_bins - 1) for b, s in zip(locs, (w, h, w, h)))  # type: ignore[operator]
            out.append({"box": [min(x0, x1), min(y0, y1), max(x0, x1), max(y0, y1)], "label": " ".join(words)})

    for tok in _TOKEN_RE.findall(text):
        m = LOC_RE.fullmatch(tok)
        if m:
            if words:  # a new group starts
                flush()
                locs, words = [], []
            b = int(m.group(1))
            locs.append(b if b < num_bins else None)
        elif locs:
            if tok.startswith("[") or tok == "<":
                continue  # sentinel / special token noise
            words.append(tok)
        # words before any location token are ignored
    flush()
    return out
