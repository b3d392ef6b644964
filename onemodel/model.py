"""OneModel: the masked multimodal encoder-decoder (4M-style), the whole forward pass in one file.

``forward(batch)`` reads as named stages:

1. ``encode``: embed the input tokens (token + modality + position embedding) and run pre-norm
   transformer blocks over them; padding is hidden with a key-padding mask.
2. ``decode``: one query per target slot (grid: a learned mask token; sequence: the previous target
   token, shifted inside the model, with a start embedding at position 0) + modality + position
   embedding. Decoder self-attention only sees targets of the same modality of the same sample
   (causally for sequences); cross-attention sees all encoder tokens of the sample.
3. ``loss_and_logits``: a head per modality over that modality's target slots, cross-entropy averaged
   per modality, then over the modalities present in the batch.

All modalities share one concatenated token table, indexed ``table[ids + vocab_offset[mod]]``, and one
position table, indexed ``pos_table[pos + pos_offset[mod]]``, so embedding a whole padded batch is one
gather with no Python loop over samples or modalities. The per-modality heads are slices of one
``(sum V, D)`` weight. Shapes: B batch, Ni input tokens, Nt target tokens, D width, H heads, V vocab.

Generation uses the same pieces: ``encode`` once, ``decode`` (optionally with a ``DecoderCache`` for
autoregressive sequences, one or more new slots per call), ``logits_for`` to read one modality's head.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch
import torch.nn as nn
import torch.nn.functional as F

from onemodel.attention import BACKENDS, AttentionMask
from onemodel.blocks import MLP, NO_MASK, CrossAttention, DecoderBlock, EncoderBlock, SelfAttention  # noqa: F401
from onemodel.config import from_dict, to_dict
from onemodel.input_embeddings import (CodebookEmbedding, ConvNetPatchEmbedding, ConvPatchEmbedding,
                                       FrozenFeatureEmbedding, check_feature_spec)
from onemodel.modalities import Modality, validate_modalities
from onemodel.model_outputs import DecoderCache, EncoderOutput, ModelOutput, StaticDecoderCache

__all__ = ["OneModelConfig", "OneModel", "ModelOutput", "EncoderOutput", "DecoderCache", "StaticDecoderCache",
           "CodebookEmbedding", "sincos_1d", "sincos_2d", "INPUT_EMBEDDINGS"]

logger = logging.getLogger(__name__)

# how a modality's input tokens are embedded (OneModelConfig.input_embeddings)
INPUT_EMBEDDINGS = ("table", "codebook", "codebook_trainable", "pixels", "pixels_conv", "pixels_cnn", "pixels_clip",
                    "pixels_and_clip")
FEATURE_INPUTS = ("pixels_clip", "pixels_and_clip")  # the kinds that read a frozen vision tower (feature_encoders)


# ----------------------------------------------------------------------------------------------------------
# Config


@dataclass
class OneModelConfig:
    """Architecture of a OneModel (saved as ``config.json`` beside the weights).

    modalities: the modalities the model reads and writes; their order defines the modality index used in
        ``MultimodalBatch.enc_mod`` / ``dec_mod``. Given as ``Modality`` objects or dicts of their fields.
    dim: width D (divisible by ``num_heads`` and by 4 for 2D sin-cos positions).
    encoder_depth / decoder_depth: number of transformer blocks.
    num_heads: attention heads H. mlp_ratio: MLP hidden width = ``mlp_ratio * dim``.
    dropout: dropout on attention probabilities and on residual branches (training only).
    attention: backend, "sdpa" (default), "xformers" (CUDA + xformers installed) or "eager" (reference).
    qkv_bias: bias in the q/k/v projections. norm_eps: LayerNorm epsilon. init_std: std of weight init.
    aligned_context: each grid target slot (depth at row r, column c) also receives, through a zero-initialised
        linear map, the mean encoder output of the input slots at the same position of grids of the same size
        (rgb at (r, c), and semseg at (r, c) when given). Cross-attention can learn this alignment itself, but
        only after a long plateau: measured on shapes rgb -> semseg (dim 192, 3+3 layers), the loss sat at the
        marginal for 200+ steps without it (docs/internals.md). Sequence slots have no match: they only get
        the projection's bias, a learned constant.
    init: weight init of the linear layers, "xavier" (default, MAE / 4M) or "trunc_normal" (N(0, init_std)).
    embed_init_std: std of the token table at init (default 1, the scale of the sin-cos positions it is added
        to). Measured on a position-copy task (target token p = input token p), dim 64, 1+1 layers: the former
        init (everything N(0, 0.02)) had not started to learn after 1000 steps; xavier + token std 1 + small
        constant embeddings learns it in ~300 (docs/internals.md). With ``tie_embeddings`` the token table
        keeps ``init_std`` (it is also the output head).
    learned_positions: start from the sin-cos tables but train them (default: fixed sin-cos).
    tie_embeddings: the output heads share their weight with the input token table.
    input_embeddings: how each modality's *input* tokens are embedded, modality name -> "table" (default for every
        modality not named: a row of the token table learned from scratch), "codebook" (the modality's tokenizer's
        own code vectors, frozen, through a learned linear projection) or "codebook_trainable" (the same, the code
        vectors fine-tuned too). Only for grid modalities. Measured on a small-data image classifier: VQ ids
        through a table learned from scratch 0.73 held-out accuracy (over-fits), through the frozen codebook +
        a linear map 0.98 (issue 12); on the shapes demo it gains nothing and the rgb loss is worse, since the
        8x8 tokens there lose objects before any embedding (docs/recipe.md). Targets (the heads) are unchanged.
        "pixels": the modality enters the encoder as normalised pixel patches (``onemodel.pixel_inputs``, one
        patch per grid slot) through a linear patch embedding, as 4M's ``rgb@224``; its tokens stay the target,
        and input slots of a sample that has no pixels (the decoded-so-far tokens of MaskGIT) use the token table.
        "pixels_conv": the same, through a small convolutional stem over the image (``ConvPatchEmbedding``);
        "pixels_cnn" through a deeper ConvNet (``ConvNetPatchEmbedding``; measured: it helps depth / semseg and
        starves the captions, docs/recipe.md).
        "pixels_clip": the same pixels through the frozen vision tower of a contrastive encoder
        (``onemodel.contrastive``) and a learned projection (``FrozenFeatureEmbedding``; needs ``feature_encoders``).
        "pixels_and_clip": both summed, the "pixels" linear patch embedding + the "pixels_clip" features (measured
        at 900 demo steps: the CLIP features' VQA / caption gains and the pixels' depth, docs/recipe.md).
    codebook_dims: width of the code vectors of each codebook-embedded modality (filled from the tokenizer by
        ``onemodel train``; the vectors are saved with the model, ``set_input_codebook`` loads them).
    value_dims: width F of one input patch row of each pixel-embedded modality (P * P * channels; filled from the
        tokenizer's image and grid size by ``onemodel train``).
    feature_encoders: the frozen vision tower of each "pixels_clip" / "pixels_and_clip" modality, name -> ``feature_encoder_spec(encoder)``
        (transformers vision config + pixel normalisation + layer; ``onemodel train`` makes it from the encoder
        directory named in the training config); its weights are saved in ``model.safetensors``. Its patch grid
        must equal the modality's token grid.
    """

    modalities: tuple[Modality, ...]
    dim: int = 256
    encoder_depth: int = 4
    decoder_depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attention: Literal["sdpa", "xformers", "eager"] = "sdpa"
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    init: Literal["xavier", "trunc_normal"] = "xavier"
    embed_init_std: float = 1.0
    aligned_context: bool = True
    learned_positions: bool = False
    tie_embeddings: bool = False
    input_embeddings: dict[str, str] = field(default_factory=dict)
    codebook_dims: dict[str, int] = field(default_factory=dict)
    value_dims: dict[str, int] = field(default_factory=dict)
    feature_encoders: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if isinstance(self.modalities, (str, bytes)) or not isinstance(self.modalities, (list, tuple)):
            raise TypeError("modalities must be a list of Modality objects or dicts")
        mods = []
        for i, m in enumerate(self.modalities):
            if isinstance(m, dict):
                m = from_dict(Modality, m, prefix=f"modalities[{i}]")
            if not isinstance(m, Modality):
                raise TypeError(f"modalities[{i}] must be a Modality or a dict, got {type(m).__name__}")
            mods.append(m)
        self.modalities = validate_modalities(mods)
        for name in ("dim", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        for name in ("encoder_depth", "decoder_depth"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must be >= 0, got {getattr(self, name)}")
        if self.dim % self.num_heads:
            raise ValueError(f"dim ({self.dim}) must be divisible by num_heads ({self.num_heads})")
        if self.dim % 4:
            raise ValueError(f"dim ({self.dim}) must be divisible by 4 (2D sin-cos positions)")
        if self.mlp_ratio <= 0:
            raise ValueError(f"mlp_ratio must be > 0, got {self.mlp_ratio}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.attention not in BACKENDS:
            raise ValueError(f"attention must be one of {list(BACKENDS)}, got {self.attention!r}")
        if self.norm_eps <= 0 or self.init_std <= 0 or self.embed_init_std <= 0:
            raise ValueError("norm_eps, init_std and embed_init_std must be > 0")
        if self.init not in ("xavier", "trunc_normal"):
            raise ValueError(f"init must be 'xavier' or 'trunc_normal', got {self.init!r}")
        self.input_embeddings, self.codebook_dims = dict(self.input_embeddings), dict(self.codebook_dims)
        self.value_dims, self.feature_encoders = dict(self.value_dims), dict(self.feature_encoders)
        by_name = {m.name: m for m in self.modalities}
        for name, kind in self.input_embeddings.items():
            if name not in by_name:
                raise ValueError(f"input_embeddings names {name!r}, which is not a modality of this model "
                                 f"({list(by_name)})")
            if kind not in INPUT_EMBEDDINGS:
                raise ValueError(f"input_embeddings[{name!r}] must be one of {list(INPUT_EMBEDDINGS)}, got {kind!r}")
            if kind != "table" and not by_name[name].is_grid:
                raise ValueError(f"input_embeddings[{name!r}] = {kind!r} needs a grid (image-like) modality; "
                                 f"{name!r} is a sequence: use 'table'")
            if kind.startswith("codebook") and self.codebook_dims.get(name, 0) < 1:
                raise ValueError(f"input_embeddings[{name!r}] = {kind!r} needs codebook_dims[{name!r}] >= 1 (the width "
                                 "of its tokenizer's code vectors; onemodel train fills it from the tokenizer)")
            if kind.startswith("pixels") and self.value_dims.get(name, 0) < 1:
                raise ValueError(f"input_embeddings[{name!r}] = {kind!r} needs value_dims[{name!r}] >= 1 (patch side**2 "
                                 "x channels; onemodel train fills it from the tokenizer)")
            if kind in FEATURE_INPUTS:  # the frozen tower's description: present, and on the token grid
                check_feature_spec(name, self.feature_encoders.get(name), by_name[name].grid_size)
        extra = sorted(set(self.feature_encoders) - {n for n, k in self.input_embeddings.items() if k in FEATURE_INPUTS})
        if extra:
            raise ValueError(f"feature_encoders names {extra}, which input_embeddings does not read as one of "
                             f"{FEATURE_INPUTS}")
        extra = sorted(set(self.value_dims) - set(self.value_modalities))
        if extra:
            raise ValueError(f"value_dims names {extra}, which input_embeddings does not embed from pixels")
        extra = sorted(set(self.codebook_dims) - set(self.codebook_modalities))
        if extra:
            raise ValueError(f"codebook_dims names {extra}, which input_embeddings does not embed by codebook")

    @property
    def codebook_modalities(self) -> list[str]:
        """Modalities whose input tokens are embedded through their tokenizer's code vectors, in model order."""
        return [m.name for m in self.modalities if self.input_embeddings.get(m.name, "table").startswith("codebook")]

    @property
    def value_modalities(self) -> list[str]:
        """Modalities whose inputs are pixel patches (``input_embeddings`` "pixels"), in model order."""
        return [m.name for m in self.modalities if self.input_embeddings.get(m.name, "table").startswith("pixels")]

    @property
    def modality_names(self) -> list[str]:
        return [m.name for m in self.modalities]

    def modality_index(self, name: str) -> int:
        """Index of modality ``name`` (the value used in ``enc_mod`` / ``dec_mod``)."""
        names = self.modality_names
        if name not in names:
            raise ValueError(f"unknown modality {name!r}; this model has {names}")
        return names.index(name)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "OneModelConfig":
        """Strict: unknown keys and wrong types raise ``ConfigError`` naming the key."""
        return from_dict(cls, data)


# ----------------------------------------------------------------------------------------------------------
# Positions


def sincos_1d(n: int, dim: int, temperature: float = 10000.0) -> torch.Tensor:
    """(n, dim) sin-cos embedding of positions 0..n-1 (first half sin, second half cos)."""
    omega = 1.0 / temperature ** (torch.arange(dim // 2, dtype=torch.float64) / (dim // 2))
    angles = torch.arange(n, dtype=torch.float64)[:, None] * omega[None, :]  # (n, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1).float()


def sincos_2d(grid_size: int, dim: int) -> torch.Tensor:
    """(grid_size**2, dim) embedding of flat position p = row * grid_size + col: half the dims for the row,
    half for the column (MAE / 4M style)."""
    rows = torch.arange(grid_size).repeat_interleave(grid_size)  # (g*g,)
    cols = torch.arange(grid_size).repeat(grid_size)
    table = sincos_1d(grid_size, dim // 2)  # (g, dim/2)
    return torch.cat([table[rows], table[cols]], dim=1)


# ----------------------------------------------------------------------------------------------------------
# Model


_NO_MASK = NO_MASK  # shared "every key visible" mask (onemodel.blocks)


def decoder_self_mask(q_mod, q_pos, k_mod, k_pos, k_mask, mod_is_grid) -> torch.Tensor:
    """(B, 1, Nq, Nk) bool: query sees key iff same modality, key present, and (grid, or key pos <= query pos).

    q_mod, q_pos (B, Nq); k_mod, k_pos, k_mask (B, Nk); mod_is_grid (M,) bool. Built by broadcasting.
    """
    same = q_mod[:, :, None] == k_mod[:, None, :]  # (B, Nq, Nk)
    order = mod_is_grid[q_mod][:, :, None] | (k_pos[:, None, :] <= q_pos[:, :, None])
    return (same & order & k_mask[:, None, :]).unsqueeze(1)


class OneModel(nn.Module):
    """The any-to-any encoder-decoder. See the module docstring; build with ``OneModel(OneModelConfig(...))``."""

    def __init__(self, config: OneModelConfig) -> None:
        super().__init__()
        if not isinstance(config, OneModelConfig):
            raise TypeError(f"OneModel needs a OneModelConfig, got {type(config).__name__}")
        self.config = cfg = config
        self.gradient_checkpointing = False  # set True to recompute block activations in backward
        mods = cfg.modalities
        D, M = cfg.dim, len(mods)
        vocab = torch.tensor([m.vocab_size for m in mods])
        lengths = torch.tensor([m.num_tokens for m in mods])
        # Per-modality lookup tables (non-persistent: derived from the config, never saved).
        self.register_buffer("vocab_size", vocab, persistent=False)  # (M,)
        self.register_buffer("vocab_offset", torch.cumsum(vocab, 0) - vocab, persistent=False)  # (M,)
        self.register_buffer("num_positions", lengths, persistent=False)  # (M,)
        self.register_buffer("pos_offset", torch.cumsum(lengths, 0) - lengths, persistent=False)  # (M,)
        self.register_buffer("mod_is_grid", torch.tensor([m.is_grid for m in mods]), persistent=False)
        # grid side per modality (0 for sequences): slots of two grids of the same size align position by position
        self.register_buffer("grid_side", torch.tensor([m.grid_size if m.is_grid else 0 for m in mods]), persistent=False)

        # Embeddings: one token table for all modalities (encoder inputs and shifted sequence targets).
        self.tok_emb = nn.Embedding(int(vocab.sum()), D)  # (sum V, D)
        # codebook-embedded inputs (config.input_embeddings): their rows of tok_emb are not used for inputs
        self.input_codebooks = nn.ModuleDict({
            m.name: CodebookEmbedding(m.vocab_size, cfg.codebook_dims[m.name], D,
                                      trainable=cfg.input_embeddings[m.name] == "codebook_trainable")
            for m in mods if m.name in cfg.codebook_modalities
        })
        # pixel-embedded inputs (config.input_embeddings "pixels"): a linear patch embedding per modality
        self.input_patches = nn.ModuleDict({name: self._patch_embedding(name) for name in cfg.value_modalities})
        self.enc_mod_emb = nn.Embedding(M, D)
        self.dec_mod_emb = nn.Embedding(M, D)
        pos = torch.cat([sincos_2d(m.grid_size, D) if m.is_grid else sincos_1d(m.max_length, D) for m in mods])
        if cfg.learned_positions:
            self.pos_table = nn.Parameter(pos)  # (sum N, D)
        else:
            self.register_buffer("pos_table", pos, persistent=False)
        self.mask_token = nn.Parameter(torch.zeros(D))  # decoder query of a grid target
        # aligned context (config.aligned_context): zero-initialised, so a new model starts without it
        self.aligned_proj = nn.Linear(D, D) if cfg.aligned_context else None
        self.start_emb = nn.Parameter(torch.zeros(M, D))  # decoder input at position 0 of a sequence target

        self.encoder = nn.ModuleList(EncoderBlock(cfg) for _ in range(cfg.encoder_depth))
        self.encoder_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        self.decoder = nn.ModuleList(DecoderBlock(cfg) for _ in range(cfg.decoder_depth))
        self.decoder_norm = nn.LayerNorm(D, eps=cfg.norm_eps)
        # Heads: modality m reads rows [vocab_offset[m], vocab_offset[m] + V_m) of one (sum V, D) weight.
        self.head_weight = self.tok_emb.weight if cfg.tie_embeddings else nn.Parameter(torch.empty(int(vocab.sum()), D))
        self.head_bias = nn.Parameter(torch.zeros(int(vocab.sum())))
        self._offsets = [(int(o), int(v)) for o, v in zip(self.vocab_offset, vocab)]  # python copy for slicing
        self.reset_parameters()

    def _patch_embedding(self, name: str) -> nn.Module:
        cfg, kind, dim = self.config, self.config.input_embeddings[name], self.config.value_dims[name]
        if kind == "pixels_conv":
            return ConvPatchEmbedding(dim, cfg.dim)
        if kind == "pixels_cnn":
            return ConvNetPatchEmbedding(dim, cfg.dim)
        if kind in FEATURE_INPUTS:
            grid = cfg.modalities[cfg.modality_index(name)].grid_size
            return FrozenFeatureEmbedding(cfg.feature_encoders[name], dim, grid, cfg.dim,
                                          with_pixels=kind == "pixels_and_clip")
        return nn.Linear(dim, cfg.dim)

    # ---------------------------------------------------------------------------------------------- init
    def reset_parameters(self) -> None:
        """Init (``init`` in the config): "xavier" (default): xavier-uniform linear layers (as MAE / 4M), with the
        fused q/k/v and k/v projections treated as separate square maps, except the last layer of every residual
        branch (attention output ``proj``, MLP ``fc2``), which starts at zero so that every block starts as the
        identity (as DiT's adaLN-zero; measured: a 3+3-layer model then picks up the aligned context within tens
        of steps instead of hundreds); "trunc_normal": every linear layer
        N(0, init_std) truncated at 2 std (timm ViT style). Both: the token table N(0, embed_init_std); modality
        embeddings, the mask token and the start embeddings N(0, init_std) (constant offsets: large ones would
        drown the positions after LayerNorm); output heads xavier per modality ("xavier") or N(0, init_std);
        LayerNorm 1 / 0; biases 0."""
        cfg = self.config
        std = cfg.init_std
        frozen = {id(m) for e in self.input_patches.values() if isinstance(e, FrozenFeatureEmbedding)
                  for part in (e.tower, e.stem) if part is not None
                  for m in part.modules()}  # pretrained towers (and their stems) keep their weights
        for name, module in self.named_modules():
            if id(module) in frozen:
                continue
            if isinstance(module, nn.Linear):
                if cfg.init == "xavier" and name.endswith((".proj", ".fc2")):
                    nn.init.zeros_(module.weight)  # residual branches start at zero: every block starts as identity
                elif cfg.init == "xavier":
                    fused = module.out_features // module.in_features if name.endswith(("qkv", "kv")) else 1
                    bound = math.sqrt(6.0 / (module.in_features + module.out_features // fused))
                    nn.init.uniform_(module.weight, -bound, bound)
                else:
                    nn.init.trunc_normal_(module.weight, std=std, a=-2 * std, b=2 * std)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        nn.init.normal_(self.tok_emb.weight, std=std if cfg.tie_embeddings else cfg.embed_init_std)
        for table in (self.enc_mod_emb.weight, self.dec_mod_emb.weight, self.mask_token, self.start_emb):
            nn.init.normal_(table, std=std)
        if not cfg.tie_embeddings:
            if cfg.init == "xavier":  # each modality's head is its own (V_m, D) linear map
                with torch.no_grad():
                    for off, v in self._offsets:
                        bound = math.sqrt(6.0 / (cfg.dim + v))
                        self.head_weight[off : off + v].uniform_(-bound, bound)
            else:
                nn.init.trunc_normal_(self.head_weight, std=std, a=-2 * std, b=2 * std)
        nn.init.zeros_(self.head_bias)
        if self.aligned_proj is not None:
            nn.init.zeros_(self.aligned_proj.weight)
            nn.init.zeros_(self.aligned_proj.bias)
        for codebook in self.input_codebooks.values():
            codebook.reset_parameters()

    def set_input_codebook(self, modality: str, vectors: torch.Tensor) -> None:
        """Load the code vectors (V, C) of a codebook-embedded modality (from its tokenizer's ``code_vectors()``)."""
        if modality not in self.input_codebooks:
            raise ValueError(f"modality {modality!r} is not codebook-embedded in this model "
                             f"(input_embeddings: {self.config.input_embeddings})")
        codes = self.input_codebooks[modality].codes
        if not isinstance(vectors, torch.Tensor) or tuple(vectors.shape) != tuple(codes.shape):
            shape = tuple(vectors.shape) if isinstance(vectors, torch.Tensor) else type(vectors).__name__
            raise ValueError(f"code vectors of {modality!r} must be a tensor of shape {tuple(codes.shape)} "
                             f"(vocab_size, codebook_dims[{modality!r}]), got {shape}")
        with torch.no_grad():
            codes.copy_(vectors.to(codes.dtype))

    def input_table(self) -> torch.Tensor:
        """(sum V, D) embedding table of input tokens: the token table, with the rows of codebook-embedded
        modalities replaced by their projected code vectors."""
        if not self.input_codebooks:
            return self.tok_emb.weight
        weight = self.tok_emb.weight
        parts = [self.input_codebooks[m.name]().to(weight.dtype) if m.name in self.input_codebooks
                 else weight[off : off + v] for m, (off, v) in zip(self.config.modalities, self._offsets)]
        return torch.cat(parts)

    # ------------------------------------------------------------------------------------------ helpers
    def num_params(self, exclude_embeddings: bool = False) -> int:
        """Number of parameters (shared tensors counted once); optionally without token/position tables."""
        n = sum(p.numel() for p in self.parameters())
        if exclude_embeddings:
            n -= self.tok_emb.weight.numel()
            if self.config.learned_positions:
                n -= self.pos_table.numel()
        return n

    def flops_per_token(self, num_inputs: int = 128, num_targets: int = 128, vocab: float | None = None) -> float:
        """Training FLOPs (forward + backward = 3x forward) per token, counting input + target tokens.

        Per sample, with Ni inputs, Nt targets, width D, MLP width F, mean head vocab V (matmuls: 2 FLOPs per
        multiply-add; embeddings, norms, softmax ignored; attention counted dense, over all Ni or Nt keys):
          encoder layer:  Ni * (8 D^2 + 4 D F) + 4 Ni^2 D
          decoder layer:  Nt * (12 D^2 + 4 D F) + 4 Ni D^2 (cross k/v) + 4 Nt^2 D + 4 Nt Ni D
          heads:          2 Nt D V
        flops_per_token = 3 * (sum of the above) / (Ni + Nt).
        """
        cfg = self.config
        D, F_, Ni, Nt = cfg.dim, int(cfg.dim * cfg.mlp_ratio), num_inputs, num_targets
        V = vocab if vocab is not None else sum(m.vocab_size for m in cfg.modalities) / len(cfg.modalities)
        enc = cfg.encoder_depth * (Ni * (8 * D * D + 4 * D * F_) + 4 * Ni * Ni * D)
        dec = cfg.decoder_depth * (Nt * (12 * D * D + 4 * D * F_) + 4 * Ni * D * D + 4 * Nt * Nt * D + 4 * Nt * Ni * D)
        head = 2 * Nt * D * V
        return 3.0 * (enc + dec + head) / (Ni + Nt)

    @staticmethod
    def shift_targets(dec_ids: torch.Tensor, dec_pos: torch.Tensor) -> torch.Tensor:
        """Decoder input ids from target ids: slot t gets the target of slot t-1 (0 where dec_pos == 0).

        Valid because sequence targets of one modality are contiguous and in order (docs/internals.md §4);
        grid slots and position-0 slots ignore their input id.
        """
        prev = torch.roll(dec_ids, shifts=1, dims=1)
        return prev.masked_fill(dec_pos == 0, 0)

    def _check_batch(self, ids, mod, pos, mask, where: str, check_ids: bool = True) -> None:
        """Clear errors for malformed batches (instead of an index error deep inside torch)."""
        if not (ids.shape == mod.shape == pos.shape == mask.shape) or ids.dim() != 2:
            raise ValueError(
                f"{where}: ids/mod/pos/mask must all be (B, N); got {tuple(ids.shape)}, {tuple(mod.shape)}, "
                f"{tuple(pos.shape)}, {tuple(mask.shape)}"
            )
        if mask.dtype != torch.bool:
            raise TypeError(f"{where}: mask must be bool (True = real token), got {mask.dtype}")
        if not mask.any():
            return
        m = mod[mask]
        if m.min() < 0 or m.max() >= len(self.config.modalities):
            raise ValueError(f"{where}: modality index out of range 0..{len(self.config.modalities) - 1}")
        if check_ids and ((ids[mask] < 0).any() or (ids[mask] >= self.vocab_size[m]).any()):
            raise ValueError(f"{where}: token id outside its modality's vocabulary (check the tokenizers)")
        if (pos[mask] < 0).any() or (pos[mask] >= self.num_positions[m]).any():
            raise ValueError(f"{where}: position outside its modality's grid_size**2 / max_length")

    def _run(self, block, *args):
        if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
            return torch.utils.checkpoint.checkpoint(block, *args, use_reentrant=False)
        return block(*args)

    # ---------------------------------------------------------------------------------------------- encode
    def embed_inputs(self, ids, mod, pos, mask, values=None, values_mask=None) -> torch.Tensor:
        """(B, Ni) ids/mod/pos/mask -> (B, Ni, D): token + modality + position embedding (0 at padding).

        values / values_mask: pixel patches of pixel-embedded modalities, name -> (B, N, F) / (B,) bool
        (``MultimodalBatch.enc_values``); a slot of such a modality in a sample that has them is embedded from the
        patch row at its position instead of its token id."""
        ids, mod, pos = ids.masked_fill(~mask, 0), mod.masked_fill(~mask, 0), pos.masked_fill(~mask, 0)
        x = F.embedding(ids + self.vocab_offset[mod], self.input_table())
        for name, t in (values or {}).items():
            if name not in self.input_patches:
                raise ValueError(f"values given for {name!r}, which this model does not embed from pixels "
                                 f"(input_embeddings: {self.config.input_embeddings})")
            m = self.config.modality_index(name)
            want = (self.config.modalities[m].num_tokens, self.config.value_dims[name])  # host ints: no device sync
            if tuple(t.shape[1:]) != want:
                raise ValueError(f"values[{name!r}] must be (B, {want[0]}, {want[1]}), got {tuple(t.shape)}")
            patches = self.input_patches[name](t.to(x.dtype))  # (B, N, D)
            rows = patches.gather(1, pos[..., None].expand(-1, -1, x.shape[-1]).clamp(max=t.shape[1] - 1))  # (B, Ni, D)
            use = (mod == m) & mask
            if values_mask is not None and name in values_mask:
                use = use & values_mask[name][:, None]
            x = torch.where(use[..., None], rows.to(x.dtype), x)
        x = x + self.enc_mod_emb(mod) + self.pos_table[pos + self.pos_offset[mod]]
        return x * mask[..., None]

    def encode(self, enc_ids, enc_mod, enc_pos, enc_mask, values=None, values_mask=None) -> EncoderOutput:
        """Encode the input tokens: (B, Ni) tensors -> ``EncoderOutput(states (B, Ni, D), mask (B, Ni))``.

        values / values_mask: pixel patches of pixel-embedded modalities (see ``embed_inputs``).
        A batch without any input slot (Ni = 0, e.g. the unconditional pass of classifier-free guidance) gets
        one padding slot; cross-attention over no real input contributes zeros.
        """
        self._check_batch(enc_ids, enc_mod, enc_pos, enc_mask, "encoder")
        if enc_ids.shape[1] == 0:
            enc_ids, enc_mod, enc_pos = (t.new_zeros(t.shape[0], 1) for t in (enc_ids, enc_mod, enc_pos))
            enc_mask = enc_mask.new_zeros(enc_mask.shape[0], 1)
        x = self.embed_inputs(enc_ids, enc_mod, enc_pos, enc_mask, values, values_mask)
        # prepared once for all layers (causal folding, empty rows, additive bias): no host sync per layer
        attn_mask = AttentionMask(self._key_padding_mask(enc_mask, num_queries=enc_mask.shape[1]))
        for block in self.encoder:
            x = self._run(block, x, attn_mask)
        return EncoderOutput(states=self.encoder_norm(x), mask=enc_mask, mod=enc_mod, pos=enc_pos)

    # ---------------------------------------------------------------------------------------------- decode
    def embed_targets(self, input_ids, mod, pos, mask) -> torch.Tensor:
        """Decoder queries (B, Nt, D): grid -> mask token; sequence -> start embedding at pos 0, else the
        embedding of ``input_ids`` (the previous target token); plus modality and position embeddings."""
        mod, pos = mod.masked_fill(~mask, 0), pos.masked_fill(~mask, 0)
        is_seq = ~self.mod_is_grid[mod]  # (B, Nt)
        use_tok = is_seq & (pos > 0) & mask
        if bool(((input_ids < 0) | (input_ids >= self.vocab_size[mod]))[use_tok].any()):
            raise ValueError("decoder input id outside its modality's vocabulary (dec_input_ids are the previous "
                             "target tokens; build them with OneModel.shift_targets)")
        tok = self.tok_emb(input_ids.masked_fill(~use_tok, 0) + self.vocab_offset[mod])
        seq_in = torch.where(use_tok[..., None], tok, self.start_emb[mod])
        x = torch.where(is_seq[..., None], seq_in, self.mask_token)
        x = x + self.dec_mod_emb(mod) + self.pos_table[pos + self.pos_offset[mod]]
        return x * mask[..., None]

    def aligned_context(self, enc_out: EncoderOutput, mod, pos, mask) -> torch.Tensor:
        """(B, Nt, D): for each grid target slot, the mean encoder output over the real input slots of grids of the
        same side at the same position (zeros where there is none, and for sequence slots)."""
        side = self.grid_side[mod]  # (B, Nt), 0 for sequences
        k_mod, k_pos = enc_out.mod.masked_fill(~enc_out.mask, 0), enc_out.pos.masked_fill(~enc_out.mask, 0)
        k_side = self.grid_side[k_mod].masked_fill(~enc_out.mask, -1)  # (B, Ni), -1 at padding
        match = (side[:, :, None] > 0) & mask[:, :, None] & (side[:, :, None] == k_side[:, None, :])
        match &= pos[:, :, None] == k_pos[:, None, :]  # (B, Nt, Ni)
        weights = match.to(enc_out.states.dtype)
        weights = weights / weights.sum(-1, keepdim=True).clamp(min=1.0)
        return weights @ enc_out.states

    def _key_padding_mask(self, mask: torch.Tensor, num_queries: int) -> torch.Tensor | None:
        """(B, N) presence -> (B, 1, 1, N) key mask broadcast over heads and all ``num_queries`` queries (not a
        dense Nq x N tensor); None when nothing is padded, so SDPA runs unmasked."""
        return None if bool(mask.all()) else mask[:, None, None, :]

    def _self_attention_plan(self, mod, pos, mask) -> tuple[torch.Tensor | None, bool]:
        """Cheapest exact decoder self-attention mask for a cache-free call: (mask or None, is_causal)."""
        first = mod[mask][:1]
        if first.numel() and bool(((mod == first) | ~mask).all()):  # one target modality in the whole batch
            if bool(self.mod_is_grid[first]):  # grid: every target sees every target (keys: padding only)
                return (None if bool(mask.all()) else mask[:, None, None, :]), False
            ar = torch.arange(mod.shape[1], device=mod.device).expand_as(pos)
            right_padded = bool((mask[:, 1:] <= mask[:, :-1]).all())
            if right_padded and bool(((pos == ar) | ~mask).all()):
                # one sequence per row starting at slot 0, padding after it: plain causal attention is exact
                # (real queries only see earlier, real keys; padded rows are never read).
                return None, True
        return decoder_self_mask(mod, pos, mod, pos, mask, self.mod_is_grid), False

    def new_cache(self, enc_out: EncoderOutput) -> DecoderCache:
        """An empty ``DecoderCache`` holding each decoder layer's cross-attention k/v of ``enc_out``."""
        kv = [block.cross_attn.context_kv(enc_out.states) for block in self.decoder]
        return DecoderCache(cross_kv=kv, enc_mask=enc_out.mask)

    def new_static_cache(self, enc_out: EncoderOutput, modality: str, max_length: int | None = None) -> StaticDecoderCache:
        """A ``StaticDecoderCache`` for decoding sequence ``modality`` after ``enc_out``, up to ``max_length`` slots
        (default: the modality's ``max_length``). Cross-attention k/v and masks are computed here, once."""
        m = self.config.modality_index(modality)
        mod = self.config.modalities[m]
        if not mod.is_sequence:
            raise ValueError(f"new_static_cache decodes sequences; {modality!r} is a grid (decode grids without a cache)")
        length = mod.max_length if max_length is None else max_length
        if not 1 <= length <= mod.max_length:
            raise ValueError(f"max_length must be in 1..{mod.max_length} for {modality!r}, got {length}")
        states = enc_out.states
        B, H = states.shape[0], self.config.num_heads
        kv = [tuple(t.contiguous() for t in block.cross_attn.context_kv(states)) for block in self.decoder]
        cross_mask = AttentionMask(self._key_padding_mask(enc_out.mask, num_queries=1))
        self_kv = states.new_zeros(len(self.decoder), B, length, 2, H, self.config.dim // H)
        off, (voff, v) = int(self.pos_offset[m]), self._offsets[m]
        bias = None
        if self.aligned_proj is not None and enc_out.mod is not None:  # what aligned_context gives a sequence slot
            bias = self.aligned_proj.bias if self.aligned_proj.bias is not None else torch.zeros_like(self.start_emb[m])
        return StaticDecoderCache(
            cross_kv=kv, cross_mask=cross_mask, self_kv=self_kv, modality=m, tok_rows=self.tok_emb.weight[voff : voff + v],
            mod_row=self.dec_mod_emb.weight[m], pos_rows=self.pos_table[off : off + length], start=self.start_emb[m],
            context_bias=bias,
        )

    def decode_next(self, cache: StaticDecoderCache, prev_ids: torch.Tensor) -> torch.Tensor:
        """Decode the next slot of every row: prev_ids (B, 1) = the token generated at the previous slot (ignored
        at slot 0) -> hidden (B, 1, D) after the final norm; the slot's keys/values are written into ``cache``.

        Same result as ``decode`` over the whole prefix (tests check it), at the cost of one slot: the embedding is
        a row lookup, every mask was prepared by ``new_static_cache``, each layer runs ``DecoderBlock.step`` (its
        weights called directly), and nothing here reads a tensor value on the host. Inference only (no dropout).
        """
        t = cache.length
        if t >= cache.max_length:
            raise ValueError(f"the cache holds {cache.max_length} slots; it is full")
        if t == 0:
            x = cache.start.expand(cache.self_kv.shape[1], 1, -1)
        else:
            x = F.embedding(prev_ids, cache.tok_rows)  # (B, 1, D)
        x = x + cache.mod_row + cache.pos_rows[t]  # the order of embed_targets' additions (same rounding)
        if cache.context_bias is not None:
            x = x + cache.context_bias
        for block, kv_buf, cross_kv in zip(self.decoder, cache.self_kv, cache.cross_kv):
            x = block.step(x, kv_buf, t, cross_kv, cache.cross_mask)
        cache.length = t + 1
        n = self.decoder_norm
        return F.layer_norm(x, (x.shape[-1],), n.weight, n.bias, n.eps)

    def decode(self, enc_out, dec_input_ids, dec_mod, dec_pos, dec_mask, cache: DecoderCache | None = None):
        """Run the decoder over target slots -> hidden (B, Nt, D) (after the final norm).

        dec_input_ids (B, Nt): the token *fed* at each slot: for a sequence slot at position p > 0 the target
        token at position p - 1 (``OneModel.shift_targets(dec_ids, dec_pos)`` builds it from targets); ignored
        at grid slots and at position 0. dec_mod, dec_pos, dec_mask (B, Nt): as in ``MultimodalBatch``.
        cache: None for a full decode; or a ``DecoderCache`` from ``new_cache(enc_out)``: the new slots attend to
        the cached slots as well and their keys/values are appended to the cache in place (autoregressive
        sequence decoding: pass one new slot per call, in order). Grid targets should be decoded without cache
        (a grid slot must see all slots of its modality, including later ones).
        """
        self._check_batch(dec_input_ids, dec_mod, dec_pos, dec_mask, "decoder", check_ids=False)
        x = self.embed_targets(dec_input_ids, dec_mod, dec_pos, dec_mask)
        mod, pos = dec_mod.masked_fill(~dec_mask, 0), dec_pos.masked_fill(~dec_mask, 0)
        if self.aligned_proj is not None and enc_out.mod is not None:
            x = x + self.aligned_proj(self.aligned_context(enc_out, mod, pos, dec_mask))
        enc_mask = enc_out.mask
        cross_mask = AttentionMask(self._key_padding_mask(enc_mask, num_queries=dec_mask.shape[1]))
        if cache is None:
            self_mask, is_causal = self._self_attention_plan(mod, pos, dec_mask)
            self_mask, is_causal = AttentionMask(self_mask, is_causal), False
            cross_kv = [None] * len(self.decoder)
        else:
            k_mod = mod if cache.mod is None else torch.cat([cache.mod, mod], 1)
            k_pos = pos if cache.pos is None else torch.cat([cache.pos, pos], 1)
            k_mask = dec_mask if cache.mask is None else torch.cat([cache.mask, dec_mask], 1)
            self_mask, is_causal = AttentionMask(decoder_self_mask(mod, pos, k_mod, k_pos, k_mask, self.mod_is_grid)), False
            cross_kv = cache.cross_kv
        new_kv = []
        for i, block in enumerate(self.decoder):
            kv = cross_kv[i] if cross_kv[i] is not None else block.cross_attn.context_kv(enc_out.states)
            past = cache.self_kv[i] if cache is not None and cache.self_kv else None
            x, self_kv = self._run(block, x, self_mask, is_causal, kv, cross_mask, past)
            new_kv.append(self_kv)
        if cache is not None:
            cache.self_kv, cache.mod, cache.pos, cache.mask = new_kv, k_mod, k_pos, k_mask
        return self.decoder_norm(x)

    def decode_grid(self, enc_out: EncoderOutput, modality: str, positions: torch.Tensor) -> torch.Tensor:
        """Decoder queries at ``positions`` (B, Nq) of grid ``modality`` (every slot real, one grid for the whole
        batch: MaskGIT / random-order generation) -> hidden (B, Nq, D) after the final norm.

        Same result as ``decode`` with those slots (tests check it), without its input checks and mask planning:
        the queries all see each other (no self-attention mask), so nothing here reads a tensor on the host.
        """
        m = self.config.modality_index(modality)
        if not self.config.modalities[m].is_grid:
            raise ValueError(f"decode_grid decodes grid targets; {modality!r} is a sequence")
        x = self.mask_token + self.dec_mod_emb.weight[m] + self.pos_table[positions + int(self.pos_offset[m])]
        if self.aligned_proj is not None and enc_out.mod is not None:
            mod, present = torch.full_like(positions, m), torch.ones_like(positions, dtype=torch.bool)
            x = x + self.aligned_proj(self.aligned_context(enc_out, mod, positions, present))
        cross_mask = AttentionMask(self._key_padding_mask(enc_out.mask, num_queries=positions.shape[1]))
        for block in self.decoder:
            x, _ = block(x, _NO_MASK, False, block.cross_attn.context_kv(enc_out.states), cross_mask)
        return self.decoder_norm(x)

    def logits_for(self, hidden: torch.Tensor, modality: str) -> torch.Tensor:
        """Head of ``modality``: hidden (..., D) -> logits (..., V_modality)."""
        off, v = self._offsets[self.config.modality_index(modality)]
        return F.linear(hidden, self.head_weight[off : off + v], self.head_bias[off : off + v])

    # ---------------------------------------------------------------------------------------------- loss
    def loss_and_logits(self, hidden, dec_ids, dec_mod, dec_mask) -> ModelOutput:
        """Per modality: gather its real target slots, apply its head, mean cross-entropy; then mean over the
        modalities that have targets in this batch. Loops over modalities only."""
        B, Nt, D = hidden.shape
        flat_h, flat_ids = hidden.reshape(B * Nt, D), dec_ids.reshape(B * Nt)
        flat_sel = (dec_mod.masked_fill(~dec_mask, -1)).reshape(B * Nt)  # (B*Nt,) modality or -1 for padding
        losses, logits, index = {}, {}, {}
        for m, modality in enumerate(self.config.modalities):
            idx = (flat_sel == m).nonzero().squeeze(1)  # (n_m,) batch-major
            if idx.numel() == 0:
                continue
            lg = self.logits_for(flat_h[idx], modality.name)  # (n_m, V_m)
            losses[modality.name] = F.cross_entropy(lg.float(), flat_ids[idx])
            logits[modality.name], index[modality.name] = lg, idx
        if losses:
            loss = torch.stack(list(losses.values())).mean()
        else:  # no targets at all: a zero loss that still has a graph
            loss = hidden.sum() * 0.0
        return ModelOutput(loss=loss, losses=losses, logits=logits, target_index=index, hidden=hidden)

    # ---------------------------------------------------------------------------------------------- forward
    def forward(self, batch) -> ModelOutput:
        """Training / evaluation pass over a ``MultimodalBatch`` (any object with its eight tensor fields)."""
        self._check_batch(batch.dec_ids, batch.dec_mod, batch.dec_pos, batch.dec_mask, "targets")
        enc_out = self.encode(batch.enc_ids, batch.enc_mod, batch.enc_pos, batch.enc_mask,
                              getattr(batch, "enc_values", None), getattr(batch, "enc_values_mask", None))
        dec_input = self.shift_targets(batch.dec_ids, batch.dec_pos)
        hidden = self.decode(enc_out, dec_input, batch.dec_mod, batch.dec_pos, batch.dec_mask)
        return self.loss_and_logits(hidden, batch.dec_ids, batch.dec_mod, batch.dec_mask)

    # ---------------------------------------------------------------------------------------------- save/load
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write ``config.json`` + ``model.safetensors`` to ``directory`` (see ``onemodel.hub``)."""
        from onemodel.hub import save_pretrained

        return save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "OneModel":
        """Load a model saved with ``save_pretrained`` (strict config and weights; never unpickles)."""
        from onemodel.hub import load_pretrained

        return load_pretrained(directory, map_location=map_location)
