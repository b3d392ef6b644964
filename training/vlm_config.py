"""The ``onemodel train-vlm`` config: typed dataclasses loaded strictly from YAML/JSON with dotted overrides.

Sections: ``data`` (a shapes-style dataset directory, generated when missing), ``lm`` (the causal LM: a local
directory, or ``path: null`` to pre-train the demo's small Llama on the dataset's text), ``vision`` (the frozen
encoder: a local directory, or ``path: null`` to train a small contrastive encoder on the captions), ``model``
(mapper, injection, LoRA: :class:`onemodel.vlm.VLMConfig` without the backbone paths), ``stage1`` (alignment on
captions, mapper only), ``stage2`` (instruction tuning on questions and answers, + LoRA when ``model.lora`` is
set), ``eval``. Unknown keys and wrong types raise ``ValueError`` naming the key.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

from onemodel.config import apply_overrides, from_dict, load_config_file, to_dict
from onemodel.mappers import MapperConfig
from onemodel.vlm import LoraSpec
from training.hard_negatives import HardNegativeConfig

__all__ = ["VLMTrainConfig", "VLMData", "LMSection", "VisionSection", "VLMModelSection", "StageConfig",
           "VLMEvalConfig", "load_vlm_train_config"]


@dataclass
class VLMData:
    """path: dataset directory with ``train/`` and ``test/`` shard splits (raw samples with ``rgb``, ``caption``,
    ``qa``); when it has none, a shapes dataset of ``num_train`` / ``num_test`` scenes is generated there.
    ``limit_train``: use only the first N training scenes (null = all)."""

    path: str = "runs/vlm_shapes_data"
    num_train: int = 4000
    num_test: int = 500
    resolution: int = 64
    limit_train: Optional[int] = None

    def __post_init__(self) -> None:
        if self.num_train < 1 or self.num_test < 0:
            raise ValueError("data.num_train must be >= 1 and data.num_test >= 0")


@dataclass
class LMSection:
    """path: a Hugging Face causal LM directory (with its tokenizer); null = pre-train the demo LM (a small Llama
    from config, on the dataset's captions, questions and answers) into ``out_dir/lm``."""

    path: Optional[str] = None
    dim: int = 128
    layers: int = 3
    heads: int = 4
    vocab_size: int = 512
    steps: int = 500
    batch_size: int = 32
    lr: float = 3e-3


@dataclass
class VisionSection:
    """kind: ``hf`` | ``contrastive`` | ``rgb_tokenizer`` | ``none``; path: its directory; null with kind
    ``contrastive`` = train a small CLIP (``onemodel.contrastive``) on the captions into ``out_dir/vision``.

    The rest configures that pre-training: ``stem``: ``convnet`` (a small ConvNet in place of CLIP's linear patch
    embedding, ``ContrastiveConfig.vision_stem``; learns object shape on small images, docs/contrastive.md) or
    ``patch``; ``stem_width``: the ConvNet's channels at full resolution; ``negatives``: hard-negative captions
    (``training.hard_negatives``, one word of a ``swap_groups`` group swapped), empty groups = none."""

    kind: Literal["hf", "contrastive", "rgb_tokenizer", "none"] = "contrastive"
    path: Optional[str] = None
    image_size: Optional[int] = None
    patch_size: int = 8
    # pre-training of the demo encoder (path: null)
    stem: Literal["patch", "convnet"] = "patch"
    stem_width: int = 16
    negatives: HardNegativeConfig = field(default_factory=HardNegativeConfig)
    width: int = 64
    layers: int = 3
    steps: int = 300
    batch_size: int = 48
    lr: float = 2e-3

    def __post_init__(self) -> None:
        if self.stem not in ("patch", "convnet"):
            raise ValueError(f"vision.stem must be 'patch' or 'convnet', got {self.stem!r}")
        if self.stem_width < 1:
            raise ValueError(f"vision.stem_width must be >= 1, got {self.stem_width}")


@dataclass
class VLMModelSection:
    mapper: MapperConfig = field(default_factory=lambda: MapperConfig(kind="summary", num_tokens=4))
    injection: Literal["prefix", "xattn"] = "prefix"
    xattn_every: int = 1
    xattn_heads: int = 4
    lora: Optional[LoraSpec] = None
    caption_prompt: str = "<image> caption:"
    question_prompt: str = "<image> question: {question} answer:"
    max_new_tokens: int = 40


@dataclass
class StageConfig:
    """One training stage: ``steps`` optimizer steps of ``batch_size`` samples, AdamW ``lr`` with ``warmup_steps``
    and cosine decay to ``lr * min_lr_ratio``. ``caption_fraction`` (stage 2): share of caption samples mixed
    into the question-answer stream so captioning is kept."""

    steps: int = 300
    batch_size: int = 32
    lr: float = 1e-3
    warmup_steps: int = 20
    min_lr_ratio: float = 0.1
    weight_decay: float = 0.0
    grad_clip: float = 1.0
    caption_fraction: float = 0.0
    log_every: int = 20
    checkpoint_every: int = 0

    def __post_init__(self) -> None:
        if self.steps < 0 or self.batch_size < 1:
            raise ValueError("stage steps must be >= 0 and batch_size >= 1")
        if not 0.0 <= self.caption_fraction <= 1.0:
            raise ValueError(f"caption_fraction must be in [0, 1], got {self.caption_fraction}")


@dataclass
class VLMEvalConfig:
    limit: int = 200
    batch_size: int = 32


@dataclass
class VLMTrainConfig:
    out_dir: str = "runs/vlm_shapes"
    seed: int = 0
    num_threads: Optional[int] = 1
    cache_features: bool = True
    data: VLMData = field(default_factory=VLMData)
    lm: LMSection = field(default_factory=LMSection)
    vision: VisionSection = field(default_factory=VisionSection)
    model: VLMModelSection = field(default_factory=VLMModelSection)
    stage1: StageConfig = field(default_factory=lambda: StageConfig(steps=200, lr=1e-3))
    stage2: StageConfig = field(default_factory=lambda: StageConfig(steps=400, lr=1e-3, caption_fraction=0.2))
    eval: VLMEvalConfig = field(default_factory=VLMEvalConfig)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def load_vlm_train_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> VLMTrainConfig:
    """Read a YAML/JSON config (or the defaults when ``path`` is None) and apply dotted overrides."""
    data = load_config_file(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    return from_dict(VLMTrainConfig, data)
