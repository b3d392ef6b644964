"""Benchmark-only baseline: a re-creation of the training hot path of the reference 4M implementation.

The reference (github.com/apple/ml-4m, package ``fourm``) cannot be installed here (it is not on PyPI and
this machine has no internet), so this file re-creates, from our reading of ``fourm/models/fm.py`` and
``fourm/models/fm_utils.py``, the parts that decide the speed of one training step, so that
``scripts/bench_model.py`` can time it side by side with ``onemodel.model.OneModel`` at the same width,
depth, heads, token counts, batch and optimizer. It was written by us for this comparison (no code is
copied) and is not a faithful port of every detail (no register tokens, no modality-specific
normalisation of the loss per sample, no drop-path). What it keeps, because those are the costs:

- per-modality encoder and decoder embedding modules called in a Python loop over modalities, each
  embedding *every* token of its modality (all h*w grid tokens, the full padded caption), then
  concatenation of all modalities;
- ``torch.argsort`` of the input / target masks (plus a tiny arange tie-breaker) and ``torch.gather`` to pick
  the ``num_encoder_tokens`` input and ``num_decoder_tokens`` target tokens;
- encoder padding mask ``(B, 1, N)`` broadcast over queries; decoder self-attention mask built dense
  ``(B, Nt, Nt)`` with the cumsum / repeat trick (``adapt_decoder_attention_mask``) and a modality
  separation mask from two ``repeat`` calls; cross-attention mask repeated to a dense ``(B, Nt, Ni)``;
- eager attention ``attn = (q @ k^T) * scale; attn.masked_fill(mask, -finfo.max); softmax; @ v``
  (masks with 4M's polarity: True = masked out);
- fused qkv for self-attention, separate ``q`` and ``kv`` projections for cross-attention, pre-norm blocks
  with GELU MLPs, a per-layer query norm and context norm, ``decoder_proj_context`` + encoder embeddings
  added to the context;
- loss: per modality, select its target slots with a boolean mask, its own ``to_logits`` linear, mean CE;
  mean over modalities.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from onemodel.model import sincos_1d, sincos_2d

__all__ = ["FourMBaseline", "make_mod_dict", "generate_sequence", "generate_maskgit", "generation_mod_dict"]


class Mlp(nn.Module):
    def __init__(self, dim, hidden):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class Attention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.qkv, self.proj = nn.Linear(dim, dim * 3, bias=qkv_bias), nn.Linear(dim, dim)

    def forward(self, x, mask=None):
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if mask is not None:
            mask = mask.unsqueeze(1)  # heads
            attn = attn.masked_fill(mask, -torch.finfo(attn.dtype).max)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class CrossAttention(nn.Module):
    def __init__(self, dim, num_heads, qkv_bias=True):
        super().__init__()
        self.num_heads, self.scale = num_heads, (dim // num_heads) ** -0.5
        self.q, self.kv = nn.Linear(dim, dim, bias=qkv_bias), nn.Linear(dim, dim * 2, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x, context, mask=None):
        B, N, C = x.shape
        _, M, _ = context.shape
        q = self.q(x).reshape(B, N, self.num_heads, C // self.num_heads).permute(0, 2, 1, 3)
        kv = self.kv(context).reshape(B, M, 2, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        k, v = kv.unbind(0)
        attn = (q @ k.transpose(-2, -1)) * self.scale
        if mask is not None:
            mask = mask.unsqueeze(1)
            attn = attn.masked_fill(mask, -torch.finfo(attn.dtype).max)
        attn = attn.softmax(dim=-1)
        x = (attn @ v).transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class Block(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, mask=None):
        x = x + self.attn(self.norm1(x), mask)
        return x + self.mlp(self.norm2(x))


class DecoderBlock(nn.Module):
    def __init__(self, dim, num_heads, mlp_ratio):
        super().__init__()
        self.norm1, self.self_attn = nn.LayerNorm(dim, eps=1e-6), Attention(dim, num_heads)
        self.query_norm, self.context_norm = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
        self.cross_attn = CrossAttention(dim, num_heads)
        self.norm2, self.mlp = nn.LayerNorm(dim, eps=1e-6), Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x, context, sa_mask=None, xa_mask=None):
        x = x + self.self_attn(self.norm1(x), sa_mask)
        x = x + self.cross_attn(self.query_norm(x), self.context_norm(context), xa_mask)
        return x + self.mlp(self.norm2(x))


class EncoderEmbedding(nn.Module):
    """Token embedding + fixed position embedding + learned modality embedding, for one modality."""

    def __init__(self, vocab, dim, pos):
        super().__init__()
        self.token_emb = nn.Embedding(vocab, dim)
        self.register_buffer("pos_emb", pos[None], persistent=False)  # (1, N, D)
        self.mod_emb = nn.Parameter(torch.zeros(1, 1, dim))
        nn.init.normal_(self.mod_emb, std=0.02)

    def forward(self, d):
        ids = d["tensor"]  # (B, N_mod)
        d = dict(d)
        d["x"] = self.token_emb(ids)
        d["emb"] = self.pos_emb[:, : ids.shape[1]] + self.mod_emb
        return d


class DecoderEmbedding(nn.Module):
    """Grid: mask token queries; sequence: shifted token embedding. Plus position / modality embedding, and
    the modality's output projection ``to_logits``."""

    def __init__(self, vocab, dim, pos, is_sequence):
        super().__init__()
        self.is_sequence = is_sequence
        self.token_emb = nn.Embedding(vocab, dim) if is_sequence else None
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.register_buffer("pos_emb", pos[None], persistent=False)
        self.mod_emb = nn.Parameter(torch.zeros(1, 1, dim))
        self.to_logits = nn.Linear(dim, vocab)
        nn.init.normal_(self.mod_emb, std=0.02)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward_embed(self, d):
        ids = d["tensor"]
        B, N = ids.shape
        d = dict(d)
        if self.is_sequence:
            shifted = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, :-1]], dim=1)
            x = self.token_emb(shifted)
            x[:, 0] = self.mask_token[:, 0]
        else:
            x = self.mask_token.expand(B, N, -1)
        d["x"] = x
        d["emb"] = self.pos_emb[:, :N] + self.mod_emb
        d["ids"] = ids
        return d

    def forward_logits(self, x):
        return self.to_logits(x)


class FourMBaseline(nn.Module):
    def __init__(self, modalities, dim=256, encoder_depth=4, decoder_depth=4, num_heads=4, mlp_ratio=4.0):
        super().__init__()
        self.modalities = list(modalities)
        self.mod_index = {m.name: i for i, m in enumerate(self.modalities)}
        pos = {m.name: sincos_2d(m.grid_size, dim) if m.is_grid else sincos_1d(m.max_length, dim) for m in self.modalities}
        self.encoder_embeddings = nn.ModuleDict({m.name: EncoderEmbedding(m.vocab_size, dim, pos[m.name]) for m in self.modalities})
        self.decoder_embeddings = nn.ModuleDict(
            {m.name: DecoderEmbedding(m.vocab_size, dim, pos[m.name], m.is_sequence) for m in self.modalities}
        )
        self.encoder = nn.ModuleList(Block(dim, num_heads, mlp_ratio) for _ in range(encoder_depth))
        self.encoder_norm = nn.LayerNorm(dim, eps=1e-6)
        self.decoder_proj_context = nn.Linear(dim, dim)
        self.decoder = nn.ModuleList(DecoderBlock(dim, num_heads, mlp_ratio) for _ in range(decoder_depth))
        self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
        for mod in self.modules():
            if isinstance(mod, nn.Linear):
                nn.init.trunc_normal_(mod.weight, std=0.02)
                nn.init.zeros_(mod.bias) if mod.bias is not None else None

    # --- encoder side
    def cat_encoder_tensors(self, mod_dict):
        tokens, emb, mask, mod_mask = [], [], [], []
        for name, d in mod_dict.items():
            tokens.append(d["x"])
            emb.append(d["emb"].expand_as(d["x"]))
            mask.append(d["input_mask"])
            mod_mask.append(torch.full_like(d["input_mask"], self.mod_index[name], dtype=torch.int16))
        return torch.cat(tokens, 1), torch.cat(emb, 1), torch.cat(mask, 1), torch.cat(mod_mask, 1)

    def forward_mask_encoder(self, mod_dict, num_encoder_tokens):
        tokens_all, emb_all, mask_all, mod_mask_all = self.cat_encoder_tensors(mod_dict)
        B, N, D = tokens_all.shape
        arange = torch.arange(N, device=tokens_all.device).unsqueeze(0) * 1e-6
        ids_shuffle = torch.argsort(mask_all.float() + arange, dim=1)
        ids_keep = ids_shuffle[:, :num_encoder_tokens]
        idx = ids_keep.unsqueeze(-1).expand(-1, -1, D)
        tokens = torch.gather(tokens_all, 1, idx)
        emb = torch.gather(emb_all, 1, idx)
        mask = torch.gather(mask_all, 1, ids_keep)
        mod_mask = torch.gather(mod_mask_all, 1, ids_keep)
        return tokens, emb, mask.unsqueeze(1), mod_mask  # mask (B, 1, Ni): True = padding

    # --- decoder side
    def cat_decoder_tensors(self, mod_dict):
        tokens, emb, mask, target_ids, attn, mod_mask = [], [], [], [], [], []
        for name, d in mod_dict.items():
            tokens.append(d["x"])
            emb.append(d["emb"].expand_as(d["x"]))
            mask.append(d["target_mask"])
            target_ids.append(d["ids"])
            attn.append(d["decoder_attention_mask"])
            mod_mask.append(torch.full_like(d["target_mask"], self.mod_index[name], dtype=torch.int16))
        cat = lambda xs: torch.cat(xs, 1)  # noqa: E731
        return cat(tokens), cat(emb), cat(mask), cat(target_ids), cat(attn), cat(mod_mask)

    def forward_mask_decoder(self, mod_dict, num_decoder_tokens):
        tokens_all, emb_all, mask_all, ids_all, attn_all, mod_mask_all = self.cat_decoder_tensors(mod_dict)
        B, N, D = tokens_all.shape
        arange = torch.arange(N, device=tokens_all.device).unsqueeze(0) * 1e-6
        ids_shuffle = torch.argsort(mask_all.float() + arange, dim=1)
        ids_keep = ids_shuffle[:, :num_decoder_tokens]
        idx = ids_keep.unsqueeze(-1).expand(-1, -1, D)
        tokens = torch.gather(tokens_all, 1, idx)
        emb = torch.gather(emb_all, 1, idx)
        mask = torch.gather(mask_all, 1, ids_keep)
        target_ids = torch.gather(ids_all, 1, ids_keep)
        attn = torch.gather(attn_all, 1, ids_keep)
        mod_mask = torch.gather(mod_mask_all, 1, ids_keep)
        attn = self.adapt_decoder_attention_mask(attn, mod_mask)
        return tokens, emb, mask, target_ids, attn, mod_mask

    @staticmethod
    def adapt_decoder_attention_mask(decoder_attention_mask, mod_mask):
        """Dense (B, Nt, Nt) mask, True = masked: cumsum causal-chunk trick + modality separation."""
        B, N = decoder_attention_mask.shape
        cum = torch.cumsum(decoder_attention_mask, dim=1)  # (B, N)
        cum = cum.unsqueeze(1).repeat(1, N, 1)  # (B, N1, N2)
        ar = (torch.arange(N, device=cum.device) + 1).view(1, N, 1).repeat(B, 1, N)
        adapted = cum > ar
        sep = mod_mask.unsqueeze(1).repeat(1, N, 1) != mod_mask.unsqueeze(2).repeat(1, 1, N)
        return adapted | sep

    # --- forward
    def forward(self, mod_dict, num_encoder_tokens, num_decoder_tokens):
        enc_dict = {m: self.encoder_embeddings[m](d) for m, d in mod_dict.items()}
        enc_tokens, enc_emb, enc_mask, _ = self.forward_mask_encoder(enc_dict, num_encoder_tokens)
        dec_dict = {m: self.decoder_embeddings[m].forward_embed(d) for m, d in mod_dict.items()}
        dec_tokens, dec_emb, dec_mask, target_ids, sa_mask, dec_mod_mask = self.forward_mask_decoder(dec_dict, num_decoder_tokens)

        x = enc_tokens + enc_emb
        for blk in self.encoder:
            x = blk(x, mask=enc_mask)
        x = self.encoder_norm(x)
        context = self.decoder_proj_context(x) + enc_emb
        y = dec_tokens + dec_emb
        xa_mask = enc_mask.repeat(1, y.shape[1], 1)  # (B, Nt, Ni)
        for blk in self.decoder:
            y = blk(y, context, sa_mask=sa_mask, xa_mask=xa_mask)
        y = self.decoder_norm(y)

        losses = {}
        for m in mod_dict:
            sel = (dec_mod_mask == self.mod_index[m]) & ~dec_mask
            logits = self.decoder_embeddings[m].forward_logits(y[sel])
            if logits.numel():
                losses[m] = F.cross_entropy(logits.float(), target_ids[sel].long())
        return sum(losses.values()) / len(losses), losses


def make_mod_dict(batch_spec, modalities):
    """4M-style ``mod_dict`` from the benchmark's per-sample spec (see ``bench_model.make_spec``).

    Per modality: ``tensor`` (B, N_mod) ids; ``input_mask`` / ``target_mask`` (B, N_mod) bool, True = *not*
    an input / target (4M polarity); ``decoder_attention_mask`` (B, N_mod) int: 0 for grid targets (they see
    each other), for a sequence target 1 per token with the first one carrying the number of target slots
    before it + 1, so that the cumsum trick makes it causal.
    """
    B = len(batch_spec)
    out = {}
    for mi, m in enumerate(modalities):
        N = m.num_tokens
        ids = torch.zeros(B, N, dtype=torch.long)
        inp = torch.ones(B, N, dtype=torch.bool)
        tgt = torch.ones(B, N, dtype=torch.bool)
        dam = torch.zeros(B, N, dtype=torch.long)
        for b, s in enumerate(batch_spec):
            ids[b, : s["ids"][mi].numel()] = s["ids"][mi]
            inp[b, s["inputs"][mi]] = False
            tgt[b, s["targets"][mi]] = False
            if m.is_sequence and s["targets"][mi].numel():
                before = sum(int(s["targets"][j].numel()) for j in range(mi))
                dam[b, s["targets"][mi]] = 1
                dam[b, s["targets"][mi][0]] = before + 1
        out[m.name] = {"tensor": ids, "input_mask": inp, "target_mask": tgt, "decoder_attention_mask": dam}
    return out


# ------------------------------------------------------------------------------------------ generation
# Re-creations of the reference's batched samplers (``fourm/models/generate.py``: ``autoregressive_step_batched``
# and ``maskgit_step_batched``), same work per token / step: the caption decoder re-runs every decoder layer over
# the whole prefix for each new token (cross-attention k/v of the context recomputed in every layer, logits for
# every prefix slot); MaskGIT re-embeds every modality, re-selects the input / target slots and re-runs the
# encoder and the decoder (over every still-masked slot) at each step.


def _encoder_inputs(model: FourMBaseline, mod_dict: dict):
    """forward_mask_encoder_generation: embed every modality, keep the real inputs (max count over the batch)."""
    enc = {m: model.encoder_embeddings[m](d) for m, d in mod_dict.items()}
    tokens_all, emb_all, mask_all, _ = model.cat_encoder_tensors(enc)
    B, N, D = tokens_all.shape
    num = int((~mask_all).sum(1).max())
    arange = torch.arange(N, device=tokens_all.device).unsqueeze(0) * 1e-6
    keep = torch.argsort(mask_all.float() + arange, dim=1)[:, :num]
    idx = keep.unsqueeze(-1).expand(-1, -1, D)
    tokens, emb = torch.gather(tokens_all, 1, idx), torch.gather(emb_all, 1, idx)
    mask = torch.gather(mask_all, 1, keep)
    tokens, emb = tokens.masked_fill(mask[..., None], 0.0), emb.masked_fill(mask[..., None], 0.0)
    return tokens, emb, mask.unsqueeze(1)  # mask (B, 1, Ni), True = padding


def _encode_context(model: FourMBaseline, mod_dict: dict):
    tokens, emb, mask = _encoder_inputs(model, mod_dict)
    x = tokens + emb
    for blk in model.encoder:
        x = blk(x, mask=mask)
    return model.decoder_proj_context(model.encoder_norm(x)) + emb, mask


def _decoder(model: FourMBaseline, y, context, sa_mask, xa_mask):
    for blk in model.decoder:
        y = blk(y, context, sa_mask=sa_mask, xa_mask=xa_mask)
    return model.decoder_norm(y)


@torch.no_grad()
def generate_sequence(model: FourMBaseline, mod_dict: dict, target: str, num_tokens: int) -> torch.Tensor:
    """Greedy autoregressive decoding of ``num_tokens`` tokens of ``target`` (B, num_tokens), as the reference does
    it: encoder once, then per token the whole decoder over the prefix with a dense causal mask."""
    context, enc_mask = _encode_context(model, mod_dict)
    B = context.shape[0]
    dec = model.decoder_embeddings[target]
    y_emb = dec.pos_emb[:, :num_tokens] + dec.mod_emb  # (1, L, D)
    out = torch.zeros(B, 1, dtype=torch.long, device=context.device)  # start token
    for _ in range(num_tokens):
        n = out.shape[1]
        y = dec.token_emb(out) + y_emb[:, :n]
        causal = torch.ones(n, n, dtype=torch.bool, device=y.device).triu(1)[None].repeat(B, 1, 1)  # True = masked
        y = _decoder(model, y, context, causal, enc_mask)
        logits = dec.forward_logits(y).reshape(B, n, -1)  # the reference computes every prefix slot's logits
        out = torch.cat([out, logits[:, -1].argmax(-1, keepdim=True)], 1)
    return out[:, 1:]


@torch.no_grad()
def generate_maskgit(model: FourMBaseline, mod_dict: dict, target: str, counts: list[int], temperature: float = 1.0,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """MaskGIT on grid ``target`` with ``counts[s]`` tokens kept at step s; ``mod_dict[target]`` starts fully
    masked (input_mask all True). Per step: encoder over the inputs + decoded tokens, decoder over every masked
    slot (no self-attention mask), sample every slot, keep the most confident."""
    mod_dict = {m: dict(d) for m, d in mod_dict.items()}
    d = mod_dict[target]
    dec = model.decoder_embeddings[target]
    B, N = d["tensor"].shape
    pos_all = torch.arange(N, device=d["tensor"].device).expand(B, N)
    for count in counts:
        context, enc_mask = _encode_context(model, mod_dict)
        masked = d["input_mask"]  # True = not decoded yet
        num = int(masked[0].sum())  # every sample has as many masked slots (one schedule)
        keep = torch.argsort((~masked).float() + torch.arange(N, device=masked.device) * 1e-6, dim=1)[:, :num]
        emb = dec.pos_emb.expand(B, -1, -1) + dec.mod_emb
        y = torch.gather(dec.mask_token.expand(B, N, -1) + emb, 1, keep[..., None].expand(-1, -1, emb.shape[-1]))
        y = _decoder(model, y, context, None, enc_mask)
        logits = dec.forward_logits(y)  # (B, num, V)
        probs = F.softmax(logits / temperature, dim=-1)
        samples = torch.multinomial(probs.reshape(B * num, -1), 1, generator=generator).reshape(B, num)
        conf = torch.gather(probs, -1, samples[..., None])[..., 0]
        top = torch.topk(conf, count, dim=-1).indices
        top_pos = torch.gather(torch.gather(pos_all, 1, keep), 1, top)
        d["tensor"] = torch.scatter(d["tensor"], -1, top_pos, torch.gather(samples, 1, top))
        d["input_mask"] = torch.scatter(d["input_mask"], -1, top_pos, False)
    return d["tensor"]


def generation_mod_dict(inputs: dict[str, torch.Tensor], target: str, modalities) -> dict:
    """mod_dict for generation: ``inputs`` name -> (B, N) ids (all real), and the empty ``target``."""
    B = next(iter(inputs.values())).shape[0]
    out = {}
    for m in modalities:
        if m.name in inputs:
            ids = inputs[m.name]
            out[m.name] = {"tensor": ids, "input_mask": torch.zeros_like(ids, dtype=torch.bool)}
        elif m.name == target and m.is_grid:
            out[m.name] = {"tensor": torch.zeros(B, m.num_tokens, dtype=torch.long),
                           "input_mask": torch.ones(B, m.num_tokens, dtype=torch.bool)}
    return out
