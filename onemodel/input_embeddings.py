"""Input embeddings that are not a token table learned from scratch (OneModelConfig.input_embeddings).

- ``CodebookEmbedding``: a grid modality's token ids embedded through its tokenizer's code vectors (frozen or
  fine-tuned) and a learned linear map (issue 12: a table learned from scratch over-fits on little data).
- Pixel patches (``"pixels"``) use a plain ``nn.Linear`` patch embedding in ``OneModel.input_patches``; the patches
  themselves are cut by ``onemodel.pixel_inputs``.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["CodebookEmbedding"]


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
