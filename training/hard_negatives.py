"""Hard-negative captions for contrastive training: one word swapped for another of its group (NegCLIP-style).

A contrastive batch rarely holds two captions that differ in one attribute only, so an encoder can match most
pairs without ever reading that attribute (on shapes: with 128 scenes per batch, colours and sizes almost always
single out the caption, and the shape word goes unlearned). A swapped caption supplies exactly that missing
negative: "a small red circle and a large blue square" -> "a small red triangle and a large blue square" must
score below the true caption for this image.

::

    config = HardNegativeConfig(swap_groups=[["circle", "square", "triangle"]], per_caption=1)
    swap_word("a small red circle.", config.swap_groups, rng)   # -> "a small red square." (or triangle)
    negative_captions(texts, positions, config, seed)            # (texts x per_caption) strings or None
    tokenized_negatives(encoder, texts, positions, config, seed)  # (ids, mask, valid) for ImageTextEncoder.forward

The swap picks one occurrence of a group word (uniformly over all occurrences), and a different word of the same
group (uniformly); every occurrence of that word after the same preceding word is replaced, so a noun phrase
that a caption repeats ("... a small red circle ... the red circle is left of ...") changes everywhere. A
caption without any group word has no negative (``None``). The draws are a pure function of ``(seed, sample
position in the training stream, k)``: exact resume, and the same negatives however many processes share a
batch.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Optional, Sequence

import numpy as np

__all__ = ["HardNegativeConfig", "swap_word", "negative_captions", "tokenized_negatives"]


@dataclass
class HardNegativeConfig:
    """swap_groups: groups of interchangeable words (e.g. ``[[circle, square, triangle]]``); empty = no hard
    negatives. per_caption: negative captions drawn per training caption (each one more wrong answer for its
    image, scored against every image of the batch)."""

    swap_groups: list[list[str]] = field(default_factory=list)
    per_caption: int = 1

    def __post_init__(self) -> None:
        if self.per_caption < 1:
            raise ValueError(f"negatives.per_caption must be >= 1, got {self.per_caption}")
        seen: set[str] = set()
        for group in self.swap_groups:
            words = [w.strip().lower() for w in group]
            if len(words) < 2 or len(set(words)) != len(words) or not all(re.fullmatch(r"[\w'-]+", w) for w in words):
                raise ValueError(f"negatives.swap_groups: {group!r} must list at least 2 distinct single words")
            if seen & set(words):
                raise ValueError(f"negatives.swap_groups: {sorted(seen & set(words))} appear in two groups")
            seen |= set(words)

    @property
    def enabled(self) -> bool:
        return bool(self.swap_groups)


def _pattern(groups: Sequence[Sequence[str]]) -> re.Pattern:
    words = sorted({w.lower() for g in groups for w in g}, key=len, reverse=True)
    return re.compile(r"\b(" + "|".join(re.escape(w) for w in words) + r")\b", re.IGNORECASE)


def _previous_word(text: str, end: int) -> str:
    m = re.search(r"(\w+)\W*$", text[:end])
    return m.group(1).lower() if m else ""


def swap_word(text: str, groups: Sequence[Sequence[str]], rng: np.random.Generator,
              pattern: Optional[re.Pattern] = None) -> Optional[str]:
    """``text`` with one group word (and its repeats after the same preceding word) swapped for another word of
    its group; ``None`` when ``text`` holds no group word."""
    pattern = pattern or _pattern(groups)
    matches = list(pattern.finditer(text))
    if not matches:
        return None
    chosen = matches[int(rng.integers(0, len(matches)))]
    word = chosen.group(1).lower()
    group = next(g for g in groups if word in {w.lower() for w in g})
    others = [w.lower() for w in group if w.lower() != word]
    new = others[int(rng.integers(0, len(others)))]
    prev = _previous_word(text, chosen.start())
    out, last = [], 0
    for m in matches:
        if m.group(1).lower() == word and _previous_word(text, m.start()) == prev:
            out.append(text[last:m.start()])
            out.append(new)
            last = m.end()
    out.append(text[last:])
    return "".join(out)


def negative_captions(texts: Sequence[str], positions: Sequence[int], config: HardNegativeConfig,
                      seed: int) -> list[Optional[str]]:
    """``per_caption`` negatives of each text, grouped by k: ``[neg_k(text_i) for k in range(K) for i in ...]``
    (so the result is K blocks of ``len(texts)``). ``positions[i]``: the stream position of ``texts[i]``."""
    if len(texts) != len(positions):
        raise ValueError(f"negative_captions: {len(texts)} texts but {len(positions)} positions")
    pattern = _pattern(config.swap_groups)
    out: list[Optional[str]] = []
    for k in range(config.per_caption):
        for text, pos in zip(texts, positions):
            rng = np.random.default_rng([int(seed), 0x6E6567, int(pos), k])
            out.append(swap_word(text, config.swap_groups, rng, pattern))
    return out


def tokenized_negatives(encoder, texts: Sequence[str], positions: Sequence[int], config: HardNegativeConfig,
                        seed: int) -> tuple[Any, Any, Any]:
    """The negatives of :func:`negative_captions`, tokenized by ``encoder`` (an ``ImageTextEncoder``):
    ``(negative_ids, negative_mask, negative_valid)`` as its ``forward`` takes them. A caption with nothing to swap
    is tokenized in its own place and marked invalid (``negative_valid`` False: masked out of the loss)."""
    import torch

    negs = negative_captions(texts, positions, config, seed)
    placeholders = list(texts) * config.per_caption
    ids, mask = encoder.tokenize([n if n is not None else t for n, t in zip(negs, placeholders)])
    return ids, mask, torch.tensor([n is not None for n in negs], device=ids.device)
