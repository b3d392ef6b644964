"""Frozen vision encoders for the VLM family: images in, patch features ``(B, P, Dv)`` out.

One small interface, :class:`VisionBackbone` (an ``nn.Module``): ``forward(pixels)`` with ``pixels`` a float
tensor ``(B, 3, S, S)`` in ``[0, 1]`` at ``image_size`` -> ``(B, P, feature_dim)``; ``num_patches`` = P. Four
kinds, chosen by :class:`VisionSpec` (saved in the VLM config, so a run directory references the encoder by path):

- ``hf``: any Hugging Face vision model in a local directory (``CLIPVisionModel``, ``SiglipVisionModel``, or
  ``AutoModel`` for other ViTs; a full ``CLIPModel`` / ``SiglipModel`` directory gives its vision tower). The
  features are the last hidden state without the class token. Pixel normalisation from the directory's
  ``preprocessor_config.json`` when present, else the CLIP / SigLIP defaults.
- ``contrastive``: this project's contrastive image-text encoder (``onemodel.contrastive.ImageTextEncoder``),
  through its ``image_patch_features``.
- ``rgb_tokenizer``: the encoder of a trained rgb VQ tokenizer (``tokenizers_mm``), its latent grid before
  quantisation, flattened row-major.
- ``none``: no encoder at all (Fuyu): the raw pixel patches, ``patch_size x patch_size x 3`` values each,
  normalised to ``[-1, 1]``; the ``patches`` mapper projects them linearly into the language model.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = ["VisionSpec", "VisionBackbone", "load_vision_backbone", "VISION_KINDS"]

logger = logging.getLogger(__name__)

VISION_KINDS = ("hf", "contrastive", "rgb_tokenizer", "none")
_CLIP_MEAN, _CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)


@dataclass
class VisionSpec:
    """Which frozen vision encoder: ``kind`` in :data:`VISION_KINDS`, ``path`` its local directory (not for
    ``none``), ``image_size`` the pixel size images are resized to (``None``: the encoder's own), ``patch_size``
    for ``none`` (raw pixel patches)."""

    kind: str = "hf"
    path: str | None = None
    image_size: int | None = None
    patch_size: int = 8

    def __post_init__(self) -> None:
        if self.kind not in VISION_KINDS:
            raise ValueError(f"vision.kind must be one of {VISION_KINDS}, got {self.kind!r}")
        if self.kind != "none" and not self.path:
            raise ValueError(f"vision.kind={self.kind!r} needs vision.path (a local directory); use kind='none' for "
                             "raw pixel patches without an encoder")
        if self.patch_size < 1:
            raise ValueError(f"vision.patch_size must be >= 1, got {self.patch_size}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class VisionBackbone(nn.Module):
    """Base: a frozen module mapping ``(B, 3, S, S)`` pixels in [0, 1] to ``(B, P, feature_dim)``."""

    feature_dim: int
    num_patches: int
    image_size: int

    def freeze(self) -> "VisionBackbone":
        self.requires_grad_(False)
        self.eval()
        return self

    def train(self, mode: bool = True) -> "VisionBackbone":  # frozen: always in eval mode (no dropout)
        return super().train(False)

    def check_pixels(self, pixels: torch.Tensor) -> None:
        if pixels.dim() != 4 or pixels.shape[1] != 3 or pixels.shape[-1] != self.image_size or \
                pixels.shape[-2] != self.image_size:
            raise ValueError(f"the vision encoder expects pixels (B, 3, {self.image_size}, {self.image_size}), got "
                             f"{tuple(pixels.shape)}")


class HFVisionBackbone(VisionBackbone):
    """A Hugging Face vision transformer from a local directory; last hidden state minus the class token."""

    def __init__(self, path: str | Path, image_size: int | None = None) -> None:
        super().__init__()
        from transformers import AutoConfig

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"vision model directory {str(path)!r} has no config.json (write it with "
                                    "save_pretrained)")
        config = AutoConfig.from_pretrained(path)
        kind = config.model_type
        if kind in ("clip", "clip_vision_model"):
            from transformers import CLIPVisionModel as cls
        elif kind in ("siglip", "siglip_vision_model"):
            from transformers import SiglipVisionModel as cls
        else:
            from transformers import AutoModel as cls
        self.model = cls.from_pretrained(path)
        vcfg = getattr(self.model.config, "vision_config", self.model.config)
        native = int(getattr(vcfg, "image_size", 0) or 0)
        self.image_size = int(image_size or native)
        if not self.image_size:
            raise ValueError(f"{str(path)!r}: the config names no image_size; set vision.image_size")
        patch = int(getattr(vcfg, "patch_size", 1))
        self.feature_dim = int(vcfg.hidden_size)
        self.num_patches = (self.image_size // patch) ** 2
        # CLIP has a class token, SigLIP does not
        self.skip = 1 if kind.startswith("clip") or kind in ("vit", "dinov2", "deit") else 0
        mean, std = ((0.5,) * 3, (0.5,) * 3) if kind.startswith("siglip") else (_CLIP_MEAN, _CLIP_STD)
        pre = path / "preprocessor_config.json"
        if pre.is_file():
            data = json.loads(pre.read_text())
            mean, std = tuple(data.get("image_mean", mean)), tuple(data.get("image_std", std))
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1), persistent=False)
        self.interpolate = self.image_size != native
        self.freeze()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_pixels(pixels)
        x = (pixels - self.mean) / self.std
        kwargs = {"interpolate_pos_encoding": True} if self.interpolate else {}
        out = self.model(pixel_values=x, **kwargs)
        return out.last_hidden_state[:, self.skip:]


class ContrastiveBackbone(VisionBackbone):
    """This project's ``ImageTextEncoder`` (contrastive image-text encoder): its image patch features."""

    def __init__(self, path: str | Path, image_size: int | None = None) -> None:
        super().__init__()
        try:
            from onemodel.contrastive import ImageTextEncoder
        except ImportError as err:  # pragma: no cover - only in checkouts without the contrastive encoder
            raise ValueError("vision.kind='contrastive' needs onemodel.contrastive (the contrastive encoder)") from err
        self.encoder = ImageTextEncoder.from_pretrained(path)
        cfg = self.encoder.config
        if image_size is not None and image_size != cfg.image_size:
            raise ValueError(f"the contrastive encoder in {str(path)!r} works at {cfg.image_size} px, not "
                             f"vision.image_size={image_size}")
        self.image_size = int(cfg.image_size)
        self.register_buffer("mean", torch.tensor(cfg.image_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(cfg.image_std).view(1, 3, 1, 1), persistent=False)
        with torch.no_grad():
            feats = self._features(torch.zeros(1, 3, self.image_size, self.image_size))
        self.num_patches, self.feature_dim = int(feats.shape[1]), int(feats.shape[2])
        self.freeze()

    def _features(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.encoder.image_patch_features((pixels - self.mean) / self.std)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_pixels(pixels)
        return self._features(pixels)


class RGBTokenizerBackbone(VisionBackbone):
    """The encoder of a trained rgb VQ tokenizer: its latent grid ``(B, D, g, g)`` as ``(B, g*g, D)``."""

    def __init__(self, path: str | Path, image_size: int | None = None) -> None:
        super().__init__()
        from tokenizers_mm.base import load_tokenizer

        tok = load_tokenizer(path)
        if getattr(tok, "modality", None) != "rgb" or not hasattr(tok, "encoder"):
            raise ValueError(f"{str(path)!r} is not an rgb VQ tokenizer directory (vision.kind='rgb_tokenizer')")
        if image_size is not None and image_size != tok.image_size:
            raise ValueError(f"the rgb tokenizer in {str(path)!r} works at {tok.image_size} px, not "
                             f"vision.image_size={image_size}")
        self.encoder = tok.encoder
        self.image_size = int(tok.image_size)
        self.num_patches = int(tok.grid_size) ** 2
        self.feature_dim = int(tok.config.latent_dim)
        self.freeze()

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_pixels(pixels)
        z = self.encoder(pixels * 2.0 - 1.0)  # the tokenizer's rgb normalisation: [-1, 1]
        return z.flatten(2).transpose(1, 2)


class PixelPatches(VisionBackbone):
    """No encoder (Fuyu): non-overlapping ``p x p`` pixel patches, row-major, values in [-1, 1]."""

    def __init__(self, image_size: int, patch_size: int) -> None:
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"vision.image_size {image_size} is not a multiple of vision.patch_size {patch_size}")
        self.image_size, self.patch_size = int(image_size), int(patch_size)
        self.num_patches = (image_size // patch_size) ** 2
        self.feature_dim = 3 * patch_size * patch_size

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        self.check_pixels(pixels)
        p = self.patch_size
        x = F.unfold(pixels * 2.0 - 1.0, kernel_size=p, stride=p)  # (B, 3*p*p, P)
        return x.transpose(1, 2)


def load_vision_backbone(spec: VisionSpec) -> VisionBackbone:
    """Build the frozen backbone that ``spec`` names (no parameter of it will train)."""
    if not isinstance(spec, VisionSpec):
        raise TypeError(f"load_vision_backbone needs a VisionSpec, got {type(spec).__name__}")
    if spec.kind != "none" and not Path(spec.path).is_dir():
        raise FileNotFoundError(f"vision.path {spec.path!r} is not a directory")
    if spec.kind == "hf":
        backbone: VisionBackbone = HFVisionBackbone(spec.path, spec.image_size)
    elif spec.kind == "contrastive":
        backbone = ContrastiveBackbone(spec.path, spec.image_size)
    elif spec.kind == "rgb_tokenizer":
        backbone = RGBTokenizerBackbone(spec.path, spec.image_size)
    else:
        backbone = PixelPatches(spec.image_size or 64, spec.patch_size)
    logger.info("vision encoder %s: %d patches x %d features at %d px", spec.kind, backbone.num_patches,
                backbone.feature_dim, backbone.image_size)
    return backbone
