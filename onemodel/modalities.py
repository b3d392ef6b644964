"""The modality registry: what each modality is, declared once, immutably.

Two kinds:
- ``grid``: an image-like modality tokenized to an ``grid_size x grid_size`` token grid (rgb, depth, semseg).
- ``sequence``: a text-like modality of at most ``max_length`` tokens (caption, question, answer, det).

Adding a modality touches this registry (or a config that builds one) and a tokenizer config, nothing else.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

__all__ = ["Modality", "DEFAULT_MODALITIES", "default_modalities", "validate_modalities"]

Kind = Literal["grid", "sequence"]


@dataclass(frozen=True)
class Modality:
    """One modality as the model sees it.

    name: unique name ("rgb", "caption", ...).
    kind: "grid" or "sequence".
    vocab_size: number of token ids (V) of its tokenizer.
    tokenizer: name of the tokenizer (sub-directory of a tokenizer bundle) that produces its tokens;
        several sequence modalities share the "text" tokenizer.
    grid_size: tokens per side for a grid modality (h = w = grid_size); 0 for sequences.
    max_length: maximum number of tokens (eos included) for a sequence modality; 0 for grids.
    """

    name: str
    kind: Kind
    vocab_size: int
    tokenizer: str
    grid_size: int = 0
    max_length: int = 0

    def __post_init__(self) -> None:
        if not self.name or not self.name.replace("_", "").isalnum():
            raise ValueError(f"modality name {self.name!r} must be a non-empty identifier")
        if self.kind not in ("grid", "sequence"):
            raise ValueError(f"modality {self.name!r}: kind must be 'grid' or 'sequence', got {self.kind!r}")
        if self.vocab_size < 2:
            raise ValueError(f"modality {self.name!r}: vocab_size must be >= 2, got {self.vocab_size}")
        if self.kind == "grid" and self.grid_size < 1:
            raise ValueError(f"grid modality {self.name!r} needs grid_size >= 1")
        if self.kind == "sequence" and self.max_length < 1:
            raise ValueError(f"sequence modality {self.name!r} needs max_length >= 1")

    @property
    def is_grid(self) -> bool:
        return self.kind == "grid"

    @property
    def is_sequence(self) -> bool:
        return self.kind == "sequence"

    @property
    def num_tokens(self) -> int:
        """Maximum number of tokens of this modality in one sample (grid: h*w; sequence: max_length)."""
        return self.grid_size * self.grid_size if self.is_grid else self.max_length


def default_modalities(
    image_vocab: int = 1024,
    grid_size: int = 16,
    text_vocab: int = 1024,
    caption_length: int = 64,
    question_length: int = 24,
    answer_length: int = 8,
    det_length: int = 32,
) -> tuple[Modality, ...]:
    """The modalities of the built-in shapes setup (sizes overridable)."""
    return (
        Modality("rgb", "grid", image_vocab, "rgb", grid_size=grid_size),
        Modality("depth", "grid", image_vocab, "depth", grid_size=grid_size),
        Modality("semseg", "grid", image_vocab, "semseg", grid_size=grid_size),
        Modality("caption", "sequence", text_vocab, "text", max_length=caption_length),
        Modality("question", "sequence", text_vocab, "text", max_length=question_length),
        Modality("answer", "sequence", text_vocab, "text", max_length=answer_length),
        Modality("det", "sequence", text_vocab, "text", max_length=det_length),
    )


DEFAULT_MODALITIES = default_modalities()


def validate_modalities(modalities: tuple[Modality, ...] | list[Modality]) -> tuple[Modality, ...]:
    """Check names are unique and non-empty; return as a tuple."""
    mods = tuple(modalities)
    if not mods:
        raise ValueError("at least one modality is required")
    names = [m.name for m in mods]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"duplicate modality name(s): {dup}")
    return mods
