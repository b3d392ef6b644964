"""Input embeddings that are not a token table learned from scratch (OneModelConfig.input_embeddings).

- ``CodebookEmbedding``: a grid modality's token ids embedded through its tokenizer's code vectors (frozen or
  fine-tuned) and a learned linear map (issue 12: a table learned from scratch over-fits on little data).
- Pixel patches: ``"pixels"`` uses a plain ``nn.Linear`` patch embedding (4M's ``rgb@224``), ``"pixels_conv"`` the
  ``ConvPatchEmbedding`` stem; both live in ``OneModel.input_patches``; the patches are cut by
  ``onemodel.pixel_inputs``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CodebookEmbedding", "ConvPatchEmbedding"]


class CodebookEmbedding(nn.Module):
    """Input embedding of one modality's token ids from its tokenizer's code vectors: ``codes`` (V, C), frozen (a
    saved buffer) or trainable, standardised per dimension, then a learned linear map to the model width.

    ``forward()`` returns the (V, D) embedding table of the modality (recomputed each call: V x C x D, tiny).
    """

    def __init__(self, vocab_size: int, code_dim: int, dim: int, trainable: bool = False) -> None:
        super().__init__()
        codes = torch.zeros(vocab_size, code_dim)
        if trainable:
            self.codes = nn.Parameter(codes)
        else:
            self.register_buffer("codes", codes)
        self.linear = nn.Linear(code_dim, dim)

    def reset_parameters(self) -> None:
        """N(0, 1/C) weights: unit-variance embeddings from standardised codes (the token table's scale)."""
        nn.init.normal_(self.linear.weight, std=self.linear.in_features ** -0.5)
        nn.init.zeros_(self.linear.bias)

    def forward(self) -> torch.Tensor:
        c = self.codes
        c = (c - c.mean(0)) / c.std(0).clamp(min=1e-6)
        return self.linear(c)


class ConvPatchEmbedding(nn.Module):
    """Pixel patches -> one embedding per patch through a small convolutional stem (``input_embeddings`` "pixels_conv").

    The patches of a sample are put back into its image, which goes through ``log2(P)`` 3x3 stride-2 convolutions
    (GroupNorm + GELU; widths 32, 64, 128, ... capped at the model width) and a 1x1 convolution to the model width:
    one output per P x P patch, in the token grid's row-major order. An early convolutional stem instead of one
    linear patch embedding makes a ViT train faster and more stably ("Early Convolutions Help Transformers See
    Better", Xiao et al. 2021); its receptive field reaches into the neighbouring patches, which is harmless here:
    a sample only gets pixels when the modality is not also one of its targets.

    values (B, N, F) with N = g * g and F = P * P * channels, P a power of two -> (B, N, D).
    """

    def __init__(self, patch_dim: int, dim: int, channels: int = 3) -> None:
        super().__init__()
        side = round((patch_dim / channels) ** 0.5)
        if side * side * channels != patch_dim or side < 1 or side & (side - 1):
            raise ValueError(f"pixels_conv needs square patches with a power-of-two side; a patch row of {patch_dim} "
                             f"values with {channels} channels is not one (use 'pixels')")
        self.patch, self.channels = side, channels
        layers: list[nn.Module] = []
        width_in = channels
        for i in range(side.bit_length() - 1):  # log2(P) stride-2 stages
            width = min(dim, 32 * 2**i)
            layers += [nn.Conv2d(width_in, width, 3, stride=2, padding=1), nn.GroupNorm(1, width), nn.GELU()]
            width_in = width
        layers.append(nn.Conv2d(width_in, dim, 1))
        self.stem = nn.Sequential(*layers)

    @property
    def in_features(self) -> int:
        return self.patch * self.patch * self.channels

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        B, N, _ = values.shape
        g, p, c = round(N**0.5), self.patch, self.channels
        images = values.view(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, g * p, g * p)
        out = self.stem(images)  # (B, D, g, g)
        return out.flatten(2).transpose(1, 2)  # (B, N, D) row-major, as the token grid
