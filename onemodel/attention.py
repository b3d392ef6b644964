"""Scaled dot-product attention behind one entry point, with three interchangeable backends.

``attention(q, k, v, mask, is_causal, backend, dropout_p)`` computes ``softmax(q k^T / sqrt(Dh) + mask) v``:

- ``"sdpa"`` (default): ``torch.nn.functional.scaled_dot_product_attention`` (PyTorch's fused flash /
  memory-efficient / math kernels, CPU and GPU). Exception: reduced-precision (bf16 / fp16) tensors on CPU
  take the plain matmul-softmax-matmul path, because PyTorch's CPU flash kernel is ~4x slower there in
  forward + backward at the sequence lengths this model uses (``scripts/bench_model.py`` measures it).
- ``"xformers"``: ``xformers.ops.memory_efficient_attention`` (CUDA only). A boolean mask is turned into an
  additive bias (0 / -inf); a causal flag alone uses xformers' ``LowerTriangularMask``. Packed batches with
  block-diagonal structure can pass an ``xformers.ops.fmha.attn_bias`` object directly as ``mask``.
- ``"eager"``: the reference math written out in PyTorch ops (slow, for tests and debugging).

Shapes: q ``(B, H, Nq, Dh)``, k and v ``(B, H, Nk, Dh)``; ``mask`` is boolean and broadcastable to
``(B, H, Nq, Nk)`` with PyTorch polarity (True = may attend). ``is_causal`` means query i sees keys j <= i
(top-left aligned, so it needs Nq == Nk); with a mask as well, both must allow a key.

A model that runs many attention calls with the same mask (every layer of the encoder or decoder) prepares
it once with ``AttentionMask(mask, is_causal)`` and passes that object as ``mask``: the causal flag is folded
in, rows without any allowed key are found once (one host sync per forward instead of one per layer), and
the additive bias of the matmul path is built once per dtype.

Rows without any allowed key (the query slot of a padding token, or a sample with no input at all) would
give NaN (softmax over nothing) and NaN gradients. ``attention`` returns zeros for such rows (attention over
an empty set), with zero gradients, on every backend.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F

__all__ = ["attention", "attention_fast", "AttentionMask", "BACKENDS", "available_backends", "xformers_available"]

BACKENDS = ("sdpa", "xformers", "eager")


def xformers_available() -> bool:
    """True when ``xformers`` imports (it still needs CUDA tensors to run)."""
    try:
        import xformers.ops  # noqa: F401
    except Exception:  # ImportError, or a broken build raising at import
        return False
    return True


def available_backends(device: torch.device | str = "cpu") -> list[str]:
    """Backends that can run on ``device`` here (xformers needs CUDA and the package)."""
    out = ["sdpa", "eager"]
    if torch.device(device).type == "cuda" and xformers_available():
        out.insert(1, "xformers")
    return out


def _merge_causal(mask: torch.Tensor | None, nq: int, nk: int, device: torch.device) -> torch.Tensor:
    """Fold a causal (top-left aligned) constraint into a boolean mask."""
    causal = torch.ones(nq, nk, dtype=torch.bool, device=device).tril()  # (Nq, Nk)
    return causal if mask is None else mask & causal


def _no_empty_rows(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Open rows with no allowed key to all keys (so kernels stay finite) -> (mask, rows to zero or None)."""
    empty = ~mask.any(dim=-1, keepdim=True)  # (..., Nq, 1)
    if not bool(empty.any()):
        return mask, None
    return mask | empty, empty


class AttentionMask:
    """A boolean attention mask prepared once for many ``attention`` calls over the same queries and keys.

    mask: bool, broadcastable to (B, H, Nq, Nk), True = may attend; or None (only ``is_causal`` or nothing).
    is_causal: top-left causal constraint (folded into the mask when there is one).
    Rows with no allowed key are opened to all keys and remembered in ``empty`` (zeroed after attention).
    """

    def __init__(self, mask: torch.Tensor | None = None, is_causal: bool = False) -> None:
        self.empty: torch.Tensor | None = None
        if isinstance(mask, torch.Tensor):
            if mask.dtype != torch.bool:
                raise TypeError(f"attention mask must be a bool tensor (True = may attend), got {mask.dtype}")
            if mask.dim() < 2:
                raise ValueError(f"attention mask must be broadcastable to (B, H, Nq, Nk), got {tuple(mask.shape)}")
            if is_causal:
                n = mask.shape[-1]  # causal needs as many queries as keys
                mask, is_causal = _merge_causal(mask, n, n, mask.device), False
            mask, self.empty = _no_empty_rows(mask)
        elif mask is not None:
            raise TypeError(f"AttentionMask needs a bool tensor or None, got {type(mask).__name__}")
        self.mask, self.is_causal = mask, is_causal
        self._bias: dict[torch.dtype, torch.Tensor] = {}

    def bias(self, dtype: torch.dtype) -> torch.Tensor | None:
        """Additive form of the mask (0 where allowed, -inf elsewhere) in ``dtype``, built once per dtype."""
        if self.mask is None:
            return None
        if dtype not in self._bias:
            self._bias[dtype] = torch.zeros(self.mask.shape, dtype=dtype, device=self.mask.device).masked_fill_(
                ~self.mask, float("-inf"))
        return self._bias[dtype]


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: Any, is_causal: bool, backend: str) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {list(BACKENDS)}")
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ValueError(f"q, k, v must be (B, H, N, Dh); got shapes {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if k.shape != v.shape or q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} / k {tuple(k.shape)} / v {tuple(v.shape)} do not fit together")
    if is_causal and q.shape[2] != k.shape[2]:
        raise ValueError(
            f"is_causal needs as many queries as keys (got {q.shape[2]} and {k.shape[2]}); "
            "pass an explicit boolean mask for cached / offset decoding"
        )
    if isinstance(mask, AttentionMask) and mask.mask is not None and mask.mask.shape[-2:] not in (
            (q.shape[2], k.shape[2]), (1, k.shape[2])):
        raise ValueError(f"prepared mask {tuple(mask.mask.shape)} does not fit {q.shape[2]} queries / {k.shape[2]} keys")
    if isinstance(mask, torch.Tensor) and mask.dtype != torch.bool:
        raise TypeError(f"attention mask must be a bool tensor (True = may attend), got {mask.dtype}")


def _eager(q, k, v, mask, dropout_p):
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q * scale) @ k.transpose(-2, -1)  # (B, H, Nq, Nk); scaling q is cheaper than scaling scores
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1, dtype=torch.float32).to(v.dtype)  # softmax in fp32 for bf16 inputs
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v  # (B, H, Nq, Dh)


def _math(q, k, v, bias, is_causal, dropout_p):
    """Fast math path (used by ``sdpa`` for bf16 / fp16 on CPU): additive bias, softmax in the input dtype."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    scores = (q * scale) @ k.transpose(-2, -1)  # (B, H, Nq, Nk)
    if is_causal:
        bias = torch.zeros(q.shape[2], k.shape[2], dtype=q.dtype, device=q.device).masked_fill_(
            ~_merge_causal(None, q.shape[2], k.shape[2], q.device), float("-inf"))
    if bias is not None:
        scores = scores.add_(bias)  # in place: the matmul output is not needed by its backward
    probs = torch.softmax(scores, dim=-1)
    if dropout_p > 0.0:
        probs = F.dropout(probs, p=dropout_p)
    return probs @ v


def _xformers(q, k, v, mask, is_causal, dropout_p):
    try:
        import xformers.ops as xops
    except Exception as err:
        raise ValueError(
            "attention backend 'xformers' needs the xformers package (pip install 'onemodel[xformers]') "
            f"and a CUDA GPU; it is not importable here ({err}). Use attention='sdpa'."
        ) from err
    if not q.is_cuda:
        raise ValueError("attention backend 'xformers' runs on CUDA tensors only; use attention='sdpa' on CPU")
    B, H, Nq, Dh = q.shape
    Nk = k.shape[2]
    # xformers layout: (B, N, H, Dh)
    qx, kx, vx = (t.transpose(1, 2) for t in (q, k, v))
    if mask is not None and not isinstance(mask, torch.Tensor):
        bias = mask  # an xformers AttentionBias object (e.g. BlockDiagonalMask) passed through
    elif mask is None:
        bias = xops.LowerTriangularMask() if is_causal else None
    else:
        # Additive bias; its last dim must be stored with a stride that is a multiple of 8.
        padded = (Nk + 7) // 8 * 8
        storage = torch.zeros(B, H, Nq, padded, dtype=q.dtype, device=q.device)
        bias = storage[..., :Nk]
        bias.masked_fill_(~mask.expand(B, H, Nq, Nk), float("-inf"))
    out = xops.memory_efficient_attention(qx, kx, vx, attn_bias=bias, p=dropout_p)
    return out.transpose(1, 2)  # (B, H, Nq, Dh)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    mask: torch.Tensor | None = None,
    is_causal: bool = False,
    backend: str = "sdpa",
    dropout_p: float = 0.0,
) -> torch.Tensor:
    """Attention of q over (k, v) -> ``(B, H, Nq, Dh)``; see the module docstring for the conventions.

    ``dropout_p`` is applied as given: pass 0.0 at evaluation time.
    """
    _check(q, k, v, mask, is_causal, backend)
    if not isinstance(mask, AttentionMask):
        mask = AttentionMask(mask, is_causal)
    elif is_causal:
        raise ValueError("pass is_causal to AttentionMask(mask, is_causal), not to attention() with a prepared mask")
    is_causal, empty = mask.is_causal, mask.empty
    if is_causal and q.shape[2] != k.shape[2]:
        raise ValueError(f"is_causal needs as many queries as keys (got {q.shape[2]} and {k.shape[2]})")
    if backend == "sdpa" and q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16):
        out = _math(q, k, v, mask.bias(q.dtype), is_causal, dropout_p)
    elif backend == "sdpa":
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.mask, dropout_p=dropout_p, is_causal=is_causal)
    elif backend == "eager":
        bool_mask = _merge_causal(None, q.shape[2], k.shape[2], q.device) if is_causal else mask.mask
        out = _eager(q, k, v, bool_mask, dropout_p)
    else:
        out = _xformers(q, k, v, mask.mask, is_causal, dropout_p)
    return out if empty is None else out.masked_fill(empty, 0.0)


def attention_fast(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: AttentionMask, backend: str = "sdpa") -> torch.Tensor:
    """``attention`` with a prepared ``AttentionMask`` (no dropout) for hot loops such as a decode step: straight to
    PyTorch's SDPA kernel when that is what ``attention`` would run (``sdpa`` in fp32, or on GPU), without the shape
    checks; every other case goes through ``attention``. Same result."""
    if backend != "sdpa" or mask.is_causal or (q.device.type == "cpu" and q.dtype in (torch.bfloat16, torch.float16)):
        return attention(q, k, v, mask=mask, backend=backend)
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask.mask)
    return out if mask.empty is None else out.masked_fill(mask.empty, 0.0)
