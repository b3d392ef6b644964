"""Transformer blocks of ``OneModel`` (``onemodel.model``): MLP, self- and cross-attention, encoder and decoder
blocks, and the cached decode step. Each block takes the model's ``OneModelConfig``."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn as nn
import torch.nn.functional as F

from onemodel.attention import AttentionMask, attention, attention_fast

if TYPE_CHECKING:
    from onemodel.model import OneModelConfig

__all__ = ["MLP", "SelfAttention", "CrossAttention", "EncoderBlock", "DecoderBlock", "NO_MASK"]

NO_MASK = AttentionMask(None)  # shared "every key visible" mask of the cached decode step


class _GeluLinear(torch.autograd.Function):
    """``F.linear(F.gelu(h), weight, bias)`` that keeps ``h`` for backward and recomputes ``gelu(h)`` there, instead of
    keeping both (autograd keeps h for the GELU and gelu(h) for the linear): one (tokens, mlp width) activation less
    per MLP, for one extra GELU. Same gradient ops as autograd (mm / sum / gelu_backward)."""

    @staticmethod
    def forward(ctx, h, weight, bias):
        ctx.save_for_backward(h, weight)
        return F.linear(F.gelu(h), weight, bias)

    @staticmethod
    def backward(ctx, grad):
        h, weight = ctx.saved_tensors
        g2 = grad.reshape(-1, grad.shape[-1])
        grad_weight = g2.t().mm(F.gelu(h).reshape(-1, h.shape[-1]))
        grad_h = torch.ops.aten.gelu_backward(grad.matmul(weight), h)
        return grad_h, grad_weight, g2.sum(0)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, dropout: float) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        if torch.is_grad_enabled() and h.requires_grad:  # training: GELU output recomputed in backward (less memory)
            w, b = self.fc2.weight, self.fc2.bias
            if w.dtype != h.dtype:  # autocast: the cast autocast would make, so _GeluLinear runs in h's dtype
                w, b = w.to(h.dtype), b.to(h.dtype)
            return self.drop(_GeluLinear.apply(h, w, b))
        return self.drop(self.fc2(F.gelu(h)))


class SelfAttention(nn.Module):
    """Multi-head self-attention with one fused qkv projection; optionally prepends cached keys/values."""

    def __init__(self, cfg: OneModelConfig) -> None:
        super().__init__()
        self.num_heads, self.backend, self.dropout = cfg.num_heads, cfg.attention, cfg.dropout
        self.qkv = nn.Linear(cfg.dim, 3 * cfg.dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.proj_drop = nn.Dropout(cfg.dropout)

    def forward(self, x, mask=None, is_causal=False, past_kv=None):
        """x (B, N, D) -> (out (B, N, D), (k, v) each (B, H, T+N, Dh) including ``past_kv``)."""
        B, N, D = x.shape
        # unbind the (B, N, 3, H, Dh) projection, then view as (B, H, N, Dh): the backward writes the q/k/v
        # gradients straight into one (B, N, 3D) buffer (one copy instead of cat + permute copy)
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x).view(B, N, 3, self.num_heads, D // self.num_heads).unbind(2))
        if past_kv is not None:
            k, v = torch.cat([past_kv[0], k], dim=2), torch.cat([past_kv[1], v], dim=2)
        p = self.dropout if self.training else 0.0
        out = attention(q, k, v, mask=mask, is_causal=is_causal, backend=self.backend, dropout_p=p)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, D))), (k, v)


class CrossAttention(nn.Module):
    """Queries from the decoder, keys/values from the encoder output (separate q and fused kv projections)."""

    def __init__(self, cfg: OneModelConfig) -> None:
        super().__init__()
        self.num_heads, self.backend, self.dropout = cfg.num_heads, cfg.attention, cfg.dropout
        self.q = nn.Linear(cfg.dim, cfg.dim, bias=cfg.qkv_bias)
        self.kv = nn.Linear(cfg.dim, 2 * cfg.dim, bias=cfg.qkv_bias)
        self.proj = nn.Linear(cfg.dim, cfg.dim)
        self.proj_drop = nn.Dropout(cfg.dropout)

    def context_kv(self, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """context (B, Ni, D) -> (k, v) each (B, H, Ni, Dh)."""
        B, N, D = context.shape
        k, v = (t.transpose(1, 2) for t in self.kv(context).view(B, N, 2, self.num_heads, D // self.num_heads).unbind(2))
        return k, v

    def forward(self, x, kv, mask=None):
        B, N, D = x.shape
        q = self.q(x).view(B, N, self.num_heads, D // self.num_heads).transpose(1, 2)  # (B, H, N, Dh)
        p = self.dropout if self.training else 0.0
        out = attention(q, kv[0], kv[1], mask=mask, backend=self.backend, dropout_p=p)
        return self.proj_drop(self.proj(out.transpose(1, 2).reshape(B, N, D)))


class EncoderBlock(nn.Module):
    def __init__(self, cfg: OneModelConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.dim, int(cfg.dim * cfg.mlp_ratio), cfg.dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        x = x + self.attn(self.norm1(x), mask=mask)[0]
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    def __init__(self, cfg: OneModelConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.self_attn = SelfAttention(cfg)
        self.norm2 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.cross_attn = CrossAttention(cfg)
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.norm_eps)
        self.mlp = MLP(cfg.dim, int(cfg.dim * cfg.mlp_ratio), cfg.dropout)

    def forward(self, x, self_mask, is_causal, cross_kv, cross_mask, past_kv=None):
        """x (B, Nt, D) -> (x, (k, v) of the self-attention, for the cache)."""
        h, kv = self.self_attn(self.norm1(x), mask=self_mask, is_causal=is_causal, past_kv=past_kv)
        x = x + h
        x = x + self.cross_attn(self.norm2(x), cross_kv, mask=cross_mask)
        return x + self.mlp(self.norm3(x)), kv

    def step(self, x, kv_buf, t: int, cross_kv, cross_mask: AttentionMask):
        """One new slot per row at cache row ``t``: x (B, 1, D); kv_buf (B, L, 2, H, Dh) gets the slot's key and value
        at row t (one copy) and the self-attention reads rows 0..t (strided views: every earlier slot of the same
        sequence is visible, no mask). The same arithmetic as ``forward`` in the same order, called on the weights
        directly (no module calls, no dropout modules, no per-call checks): a decode step is ~30 kernels per layer.
        """
        sa, ca, mlp = self.self_attn, self.cross_attn, self.mlp
        B, _, D = x.shape
        H = sa.num_heads
        qkv = F.linear(F.layer_norm(x, (D,), self.norm1.weight, self.norm1.bias, self.norm1.eps), sa.qkv.weight,
                       sa.qkv.bias).view(B, 3, H, D // H)
        kv_buf[:, t] = qkv[:, 1:]
        h = attention_fast(qkv[:, :1].transpose(1, 2), kv_buf[:, : t + 1, 0].transpose(1, 2),
                  kv_buf[:, : t + 1, 1].transpose(1, 2), NO_MASK, sa.backend)
        x = x + F.linear(h.view(B, 1, D), sa.proj.weight, sa.proj.bias)  # (B, H, 1, Dh) is (B, 1, D) in memory
        q = F.linear(F.layer_norm(x, (D,), self.norm2.weight, self.norm2.bias, self.norm2.eps), ca.q.weight, ca.q.bias)
        h = attention_fast(q.view(B, H, 1, D // H), cross_kv[0], cross_kv[1], cross_mask, ca.backend)
        x = x + F.linear(h.view(B, 1, D), ca.proj.weight, ca.proj.bias)
        h = F.layer_norm(x, (D,), self.norm3.weight, self.norm3.bias, self.norm3.eps)
        return x + F.linear(F.gelu(F.linear(h, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
