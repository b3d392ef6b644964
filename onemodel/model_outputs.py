"""What ``OneModel`` returns and keeps between calls: encoder and model outputs, and the decoder caches used by
generation (``DecoderCache``: growing, any slots; ``StaticDecoderCache``: preallocated, one sequence token by token).
Split out of ``onemodel/model.py`` (which re-exports them) to keep that file readable.
Shapes: B batch, Ni input tokens, Nt target tokens, T cached slots, D width, H heads, Dh head width, V vocab.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from onemodel.attention import AttentionMask

__all__ = ["EncoderOutput", "ModelOutput", "DecoderCache", "StaticDecoderCache"]


@dataclass
class EncoderOutput:
    """states: (B, Ni, D) encoder output after the final norm; mask: (B, Ni) bool, True = real token;
    mod / pos: (B, Ni) modality index and position of each slot (for the aligned context; None = unknown)."""

    states: torch.Tensor
    mask: torch.Tensor
    mod: torch.Tensor | None = None
    pos: torch.Tensor | None = None


@dataclass
class ModelOutput:
    """What ``OneModel.forward`` returns.

    loss: scalar, mean over the modalities present of the per-modality mean cross-entropy.
    losses: modality name -> scalar mean cross-entropy over its target tokens (only modalities with targets).
    logits: modality name -> (n_m, V_m) logits of its real target slots, in batch-major order
        (sample 0's slots first, each sample's slots in ``dec_*`` order).
    target_index: modality name -> (n_m,) long, flat index ``b * Nt + t`` of each logits row in the batch.
    hidden: (B, Nt, D) final decoder states (after the last norm), for custom heads or generation.
    """

    loss: torch.Tensor
    losses: dict[str, torch.Tensor]
    logits: dict[str, torch.Tensor]
    target_index: dict[str, torch.Tensor]
    hidden: torch.Tensor

    def dense_logits(self, name: str, batch_size: int, num_targets: int, fill: float = 0.0) -> torch.Tensor:
        """Scatter modality ``name``'s logits back to (B, Nt, V) (slots of other modalities get ``fill``)."""
        lg = self.logits[name]
        out = lg.new_full((batch_size * num_targets, lg.shape[-1]), fill)
        out[self.target_index[name]] = lg
        return out.view(batch_size, num_targets, -1)


@dataclass
class DecoderCache:
    """Key/value cache for incremental (autoregressive) decoding; create it with ``OneModel.new_cache``.

    cross_kv: per decoder layer, the cross-attention (k, v), each (B, H, Ni, Dh), computed once from the
        encoder output. self_kv: per decoder layer, the self-attention (k, v) of the slots decoded so far,
        each (B, H, T, Dh). mod / pos / mask: (B, T) modality, position and presence of those slots (used to
        build the attention mask of later slots). ``decode(..., cache=cache)`` appends to it in place.
    """

    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]
    enc_mask: torch.Tensor
    self_kv: list[tuple[torch.Tensor, torch.Tensor]] = field(default_factory=list)
    mod: torch.Tensor | None = None
    pos: torch.Tensor | None = None
    mask: torch.Tensor | None = None

    @property
    def length(self) -> int:
        """Number of target slots already in the cache (T)."""
        return 0 if self.mod is None else self.mod.shape[1]


@dataclass
class StaticDecoderCache:
    """Preallocated cache for decoding one sequence modality token by token; create it with
    ``OneModel.new_static_cache`` and advance it with ``OneModel.decode_next``.

    Everything that does not change between tokens is prepared here once per generation: the cross-attention
    (k, v) of every decoder layer and the cross-attention mask, the modality embedding and position rows of the
    slots, and self-attention key/value buffers of the full length. A step writes its keys/values at row
    ``length`` and attends to rows ``0..length`` (a view of the buffer: no mask, no concatenation, no allocation of
    a growing cache, no host sync).

    self_kv: (layers, B, max_length, 2, H, Dh), keys [..., 0, :, :] and values [..., 1, :, :] of the decoded slots
    (one copy per layer and step writes both). tok_rows: (V, D) the modality's rows of the token table.
    modality: the modality index. length: slots decoded so far.
    """

    cross_kv: list[tuple[torch.Tensor, torch.Tensor]]
    cross_mask: AttentionMask
    self_kv: torch.Tensor
    modality: int
    tok_rows: torch.Tensor  # (V, D) token-table rows of the modality (prev ids index it directly)
    mod_row: torch.Tensor  # (D,) decoder modality embedding
    pos_rows: torch.Tensor  # (max_length, D) position embedding of slots 0..max_length-1
    start: torch.Tensor  # (D,) decoder input at position 0
    context_bias: torch.Tensor | None  # (D,) aligned-context bias (sequence slots have no aligned grid slot)
    length: int = 0

    @property
    def max_length(self) -> int:
        return self.self_kv.shape[2]
