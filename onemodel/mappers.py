"""Feature mappers: the small trained modules between a frozen vision encoder and a frozen language model.

Every mapper takes patch features ``(B, P, Dv)`` and returns visual tokens ``(B, T, Dlm)`` in the language
model's embedding width; ``num_tokens(P)`` says T. One module per design:

- ``mlp`` (LLaVA-1.5): a two-layer MLP (Linear, GELU, Linear) applied to every patch: T = P.
- ``perceiver`` (Flamingo / AnyMAL perceiver resampler): N learned latents; each layer cross-attends from the
  latents to [patches; latents] then a feed-forward block; T = N.
- ``qformer`` (BLIP-2's Q-Former idea): N learned queries through a small transformer whose layers do
  self-attention among the queries, cross-attention to the patches and a feed-forward block; the outputs are
  projected to the LM width; T = N.
- ``summary`` (DePALM / eP-ALM summary tokens): K learned queries pooling the patches with one multi-head
  attention, then a linear projection; T = K (K in {1, 4, 8} in the paper's study).
- ``patches`` (Fuyu): no vision encoder, the raw pixel patches linearly projected: T = P.

Shapes: B batch, P patches, Dv vision feature width, D mapper width, T visual tokens, Dlm LM width.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any

import torch
import torch.nn as nn

__all__ = ["MapperConfig", "MAPPER_KINDS", "build_mapper", "MLPMapper", "PerceiverMapper", "QFormerMapper",
           "SummaryMapper", "PatchMapper"]

MAPPER_KINDS = ("mlp", "perceiver", "qformer", "summary", "patches")


@dataclass
class MapperConfig:
    """``kind`` in :data:`MAPPER_KINDS`; ``num_tokens``: latents / queries / summary tokens (perceiver, qformer,
    summary); ``width``: hidden width of the mapper (``None``: the LM width); ``depth``: layers (perceiver,
    qformer); ``heads``: attention heads."""

    kind: str = "mlp"
    num_tokens: int = 4
    width: int | None = None
    depth: int = 2
    heads: int = 4

    def __post_init__(self) -> None:
        if self.kind not in MAPPER_KINDS:
            raise ValueError(f"mapper.kind must be one of {MAPPER_KINDS}, got {self.kind!r}")
        for name in ("num_tokens", "depth", "heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"mapper.{name} must be >= 1, got {getattr(self, name)}")
        if self.width is not None and self.width % self.heads:
            raise ValueError(f"mapper.width {self.width} must be a multiple of mapper.heads {self.heads}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class _Mapper(nn.Module):
    def __init__(self, in_dim: int) -> None:
        super().__init__()
        self.in_dim = in_dim

    def check(self, feats: torch.Tensor) -> None:
        if feats.dim() != 3 or feats.shape[-1] != self.in_dim:
            raise ValueError(f"the {type(self).__name__} expects vision features (B, P, {self.in_dim}), got "
                             f"{tuple(feats.shape)}: the vision encoder's width does not match the mapper's")

    def num_tokens(self, num_patches: int) -> int:
        raise NotImplementedError

    def output_layer(self) -> nn.Linear:
        """The last linear layer (its output is the visual tokens)."""
        raise NotImplementedError

    def init_output_scale(self, std: float) -> None:
        """Start the visual tokens at the LM's embedding scale: the last layer's weights drawn with standard
        deviation ``std / sqrt(fan_in)`` (unit-variance inputs then give tokens of std ``std``), bias 0. Without
        it the tokens start ~10x larger than the word embeddings and the frozen LM learns to ignore them."""
        layer = self.output_layer()
        with torch.no_grad():
            layer.weight.normal_(0.0, std / layer.in_features ** 0.5)
            if layer.bias is not None:
                layer.bias.zero_()


class MLPMapper(_Mapper):
    """LLaVA-1.5: Linear(Dv, Dlm) -> GELU -> Linear(Dlm, Dlm) on every patch."""

    def __init__(self, in_dim: int, out_dim: int, config: MapperConfig) -> None:
        super().__init__(in_dim)
        width = config.width or out_dim
        self.net = nn.Sequential(nn.Linear(in_dim, width), nn.GELU(), nn.Linear(width, out_dim))

    def num_tokens(self, num_patches: int) -> int:
        return num_patches

    def output_layer(self) -> nn.Linear:
        return self.net[2]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (B, P, Dv) -> (B, P, Dlm)
        self.check(feats)
        return self.net(feats)


class PatchMapper(_Mapper):
    """Fuyu: one linear projection of raw pixel patches into the LM."""

    def __init__(self, in_dim: int, out_dim: int, config: MapperConfig) -> None:
        super().__init__(in_dim)
        self.proj = nn.Linear(in_dim, out_dim)

    def num_tokens(self, num_patches: int) -> int:
        return num_patches

    def output_layer(self) -> nn.Linear:
        return self.proj

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        self.check(feats)
        return self.proj(feats)


class _FeedForward(nn.Sequential):
    def __init__(self, width: int, mult: int = 4) -> None:
        super().__init__(nn.LayerNorm(width), nn.Linear(width, mult * width), nn.GELU(), nn.Linear(mult * width, width))


class _CrossAttention(nn.Module):
    """Pre-norm multi-head attention from ``queries`` (B, N, D) to ``context`` (B, M, D)."""

    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm_q, self.norm_kv = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, heads, batch_first=True)

    def forward(self, queries: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        q, kv = self.norm_q(queries), self.norm_kv(context)
        return self.attn(q, kv, kv, need_weights=False)[0]


class SummaryMapper(_Mapper):
    """DePALM summary tokens: K learned queries, one multi-head attention pooling the patches, projected."""

    def __init__(self, in_dim: int, out_dim: int, config: MapperConfig) -> None:
        super().__init__(in_dim)
        width = config.width or out_dim
        self.k = config.num_tokens
        self.inp = nn.Linear(in_dim, width)
        self.queries = nn.Parameter(torch.randn(self.k, width) * 0.02)
        self.pool = _CrossAttention(width, config.heads)
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out_dim))

    def num_tokens(self, num_patches: int) -> int:
        return self.k

    def output_layer(self) -> nn.Linear:
        return self.out[1]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:  # (B, P, Dv) -> (B, K, Dlm)
        self.check(feats)
        x = self.inp(feats)
        q = self.queries.expand(x.shape[0], -1, -1)
        return self.out(q + self.pool(q, x))


class PerceiverMapper(_Mapper):
    """Flamingo's perceiver resampler: N latents; per layer cross-attention to [patches; latents] + FFN."""

    def __init__(self, in_dim: int, out_dim: int, config: MapperConfig) -> None:
        super().__init__(in_dim)
        width = config.width or out_dim
        self.n = config.num_tokens
        self.inp = nn.Linear(in_dim, width)
        self.latents = nn.Parameter(torch.randn(self.n, width) * 0.02)
        self.layers = nn.ModuleList(
            nn.ModuleList([_CrossAttention(width, config.heads), _FeedForward(width)]) for _ in range(config.depth)
        )
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out_dim))

    def num_tokens(self, num_patches: int) -> int:
        return self.n

    def output_layer(self) -> nn.Linear:
        return self.out[1]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        self.check(feats)
        x = self.inp(feats)
        lat = self.latents.expand(x.shape[0], -1, -1)
        for attn, ff in self.layers:
            lat = lat + attn(lat, torch.cat([x, lat], dim=1))
            lat = lat + ff(lat)
        return self.out(lat)


class _QFormerLayer(nn.Module):
    def __init__(self, width: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.self_attn = nn.MultiheadAttention(width, heads, batch_first=True)
        self.cross = _CrossAttention(width, heads)
        self.ff = _FeedForward(width)

    def forward(self, q: torch.Tensor, feats: torch.Tensor) -> torch.Tensor:
        h = self.norm(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        q = q + self.cross(q, feats)
        return q + self.ff(q)


class QFormerMapper(_Mapper):
    """BLIP-2 Q-Former idea: N learned queries through self-attention + cross-attention + FFN layers,
    projected to the LM width."""

    def __init__(self, in_dim: int, out_dim: int, config: MapperConfig) -> None:
        super().__init__(in_dim)
        width = config.width or out_dim
        self.n = config.num_tokens
        self.inp = nn.Linear(in_dim, width)
        self.queries = nn.Parameter(torch.randn(self.n, width) * 0.02)
        self.layers = nn.ModuleList(_QFormerLayer(width, config.heads) for _ in range(config.depth))
        self.out = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, out_dim))

    def num_tokens(self, num_patches: int) -> int:
        return self.n

    def output_layer(self) -> nn.Linear:
        return self.out[1]

    def forward(self, feats: torch.Tensor) -> torch.Tensor:
        self.check(feats)
        x = self.inp(feats)
        q = self.queries.expand(x.shape[0], -1, -1)
        for layer in self.layers:
            q = layer(q, x)
        return self.out(q)


_CLASSES = {"mlp": MLPMapper, "perceiver": PerceiverMapper, "qformer": QFormerMapper, "summary": SummaryMapper,
            "patches": PatchMapper}


def build_mapper(config: MapperConfig, in_dim: int, out_dim: int, out_std: float | None = None) -> _Mapper:
    """The mapper ``config`` names, from vision width ``in_dim`` to LM width ``out_dim``; ``out_std``: the LM's
    embedding scale to start the visual tokens at (see ``init_output_scale``)."""
    if not isinstance(config, MapperConfig):
        raise TypeError(f"build_mapper needs a MapperConfig, got {type(config).__name__}")
    width = config.width or out_dim
    if config.kind in ("perceiver", "qformer", "summary") and width % config.heads:
        raise ValueError(f"the {config.kind} mapper's width {width} is not a multiple of mapper.heads "
                         f"{config.heads}; set mapper.width or mapper.heads")
    mapper = _CLASSES[config.kind](in_dim, out_dim, config)
    if out_std is not None:
        mapper.init_output_scale(out_std)
    return mapper
