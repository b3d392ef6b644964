"""Modality tokenizers: discrete tokens for images, depth, segmentation, text and boxes.

- :class:`~tokenizers_mm.vq.VQTokenizer` (rgb / depth / semseg), :class:`~tokenizers_mm.text.TextTokenizer`,
- :func:`~tokenizers_mm.boxes.boxes_to_text` / :func:`~tokenizers_mm.boxes.text_to_boxes`,
- :class:`~tokenizers_mm.bundle.TokenizerBundle` (a directory of tokenizers) and :func:`load_tokenizer`.

Submodules are imported lazily (``import tokenizers_mm`` does not import torch).
"""

from __future__ import annotations

from typing import Any

from tokenizers_mm.base import ModalityTokenizer, load_tokenizer

__all__ = ["ModalityTokenizer", "load_tokenizer", "VQTokenizer", "VQTokenizerConfig", "TextTokenizer",
           "TokenizerBundle", "boxes_to_text", "text_to_boxes"]

_LAZY = {
    "VQTokenizer": "tokenizers_mm.vq",
    "VQTokenizerConfig": "tokenizers_mm.vq",
    "TextTokenizer": "tokenizers_mm.text",
    "TokenizerBundle": "tokenizers_mm.bundle",
    "boxes_to_text": "tokenizers_mm.boxes",
    "text_to_boxes": "tokenizers_mm.boxes",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'tokenizers_mm' has no attribute {name!r}")
