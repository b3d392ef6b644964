"""Where a cached caption token's time goes (torch.profiler), before and after the static decode step.

Decodes 32 caption tokens (greedy) after one encoder pass at the reference config (width 256, 4 + 4 layers, 4
heads, 256 rgb tokens, caption vocab 1000), random weights, and profiles only the token loop of three
implementations, interleaved:

- ``growing cache``: ``OneModel.decode(..., cache=DecoderCache)``, the path generation used before: per token it
  rebuilds the self-attention mask from the cached modality / position tensors, concatenates the new keys and
  values onto a growing cache, runs the input checks (host syncs) and the aligned-context matching;
- ``static cache, module calls``: the first ``StaticDecoderCache`` step (re-created here): every layer through its
  modules, the checked ``attention``, separate k / v buffer writes, a copy of each attention output;
- ``static cache, weights called directly``: ``OneModel.decode_next`` now (what ``generate`` uses);
- ``4M re-creation``: ``scripts/fourm_baseline.py``'s decoder over the whole prefix for every token.

Then times the step's 25 matrix products alone with the model's own weights (streamed from memory every token) and
with one hot copy per shape: at batch 1 the difference is memory bandwidth, the floor of any fp32 decode step.

Prints, per implementation, profiled self CPU time per token grouped by kind of op, the op count per token and
the wall time per token, as a markdown table (``--json`` writes the raw numbers).

    python scripts/profile_decode.py --threads 1 --batch 1
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import defaultdict
from pathlib import Path

import torch
from torch.profiler import ProfilerActivity, profile

sys.path.insert(0, str(Path(__file__).resolve().parent))

KINDS = {
    "matmul": ("addmm", "aten::mm", "bmm", "matmul", "linear", "aten::mv"),
    "attention": ("scaled_dot_product", "softmax"),
    "layer norm": ("layer_norm",),
    "masks / indexing": ("masked_fill", "where", "index", "nonzero", "eq", "le", "ge", "lt", "any", "all", "tril",
                         "triu", "embedding", "gather", "select", "slice", "arange", "full", "ones", "zeros"),
    "copies": ("copy_", "cat", "repeat", "contiguous", "clone", "to", "expand", "_to_copy"),
    "elementwise": ("add", "mul", "gelu", "div", "sub", "neg", "exp"),
}


def kind_of(name: str) -> str:
    for kind, keys in KINDS.items():
        if any(k in name for k in keys):
            return kind
    return "other (views, dispatch)"


def _hot_matmuls(model, batch: int, tokens: int):
    """``bench_generate.step_matmuls`` with one weight per shape, reused: the same products from cache."""
    import torch.nn.functional as F

    blk = model.decoder[0]
    maps = [(lin.weight, lin.bias) for lin in (blk.self_attn.qkv, blk.self_attn.proj, blk.cross_attn.q,
                                              blk.cross_attn.proj, blk.mlp.fc1, blk.mlp.fc2)] * len(model.decoder)
    maps.append((model.head_weight[:1000], model.head_bias[:1000]))
    xs = {w.shape[1]: torch.randn(batch, w.shape[1]) for w, _ in maps}

    def run():
        for _ in range(tokens):
            for w, b in maps:
                F.linear(xs[w.shape[1]], w, b)
    return run


def compile_step(args) -> int:
    """A static-shape version of the decode step (attention over the whole buffer with a position mask, so one graph
    serves every slot), eager vs ``torch.compile(dynamic=False, fullgraph=True)``: compile time and ms per token."""
    import torch.nn.functional as F

    from bench_generate import reference_model

    from onemodel.generation import encoder_batch

    model = reference_model("cpu", torch.float32, aligned_context=False)
    B, T, D, H = args.batch, args.tokens, 256, 4
    rgb = torch.randint(0, 1024, (B, 256), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        enc = model.encode(*encoder_batch(model, {"rgb": list(rgb)}, None, B, torch.device("cpu")))
        cache = model.new_static_cache(enc, "caption", T)
    slots = torch.arange(T)

    def step(prev, t, kv):  # prev (B, 1) ids, t 0-d long tensor, kv (layers, B, T, 2, H, Dh)
        x = F.embedding(prev, cache.tok_rows) + cache.mod_row + cache.pos_rows.index_select(0, t.view(1))
        mask = (slots <= t)[None, None, None, :]
        for i, blk in enumerate(model.decoder):
            sa, ca, mlp = blk.self_attn, blk.cross_attn, blk.mlp
            qkv = F.linear(F.layer_norm(x, (D,), blk.norm1.weight, blk.norm1.bias, 1e-6), sa.qkv.weight, sa.qkv.bias)
            qkv = qkv.view(B, 3, H, D // H)
            kv[i].index_copy_(1, t.view(1), qkv[:, None, 1:])
            h = F.scaled_dot_product_attention(qkv[:, :1].transpose(1, 2), kv[i][:, :, 0].transpose(1, 2),
                                               kv[i][:, :, 1].transpose(1, 2), attn_mask=mask)
            x = x + F.linear(h.reshape(B, 1, D), sa.proj.weight, sa.proj.bias)
            q = F.linear(F.layer_norm(x, (D,), blk.norm2.weight, blk.norm2.bias, 1e-6), ca.q.weight, ca.q.bias)
            h = F.scaled_dot_product_attention(q.view(B, H, 1, D // H), *cache.cross_kv[i])
            x = x + F.linear(h.reshape(B, 1, D), ca.proj.weight, ca.proj.bias)
            h = F.layer_norm(x, (D,), blk.norm3.weight, blk.norm3.bias, 1e-6)
            x = x + F.linear(F.gelu(F.linear(h, mlp.fc1.weight, mlp.fc1.bias)), mlp.fc2.weight, mlp.fc2.bias)
        x = F.layer_norm(x, (D,), model.decoder_norm.weight, model.decoder_norm.bias, 1e-6)
        return model.logits_for(x, "caption").argmax(-1)

    compiled = torch.compile(step, dynamic=False, fullgraph=True)
    kv = torch.zeros(len(model.decoder), B, T, 2, H, D // H)
    with torch.no_grad():
        t0 = time.perf_counter()
        compiled(torch.zeros(B, 1, dtype=torch.long), torch.tensor(0), kv)
        compile_s = time.perf_counter() - t0
        ms = {"eager": [], "compiled": []}
        for _ in range(args.rounds):
            for name, fn in (("eager", step), ("compiled", compiled)):
                kv.zero_()
                prev = torch.zeros(B, 1, dtype=torch.long)
                t0 = time.perf_counter()
                for t in range(T):
                    prev = fn(prev, torch.tensor(t), kv)
                ms[name].append(1000 * (time.perf_counter() - t0) / T)
    print(f"static-shape decode step, batch {B}, {args.threads} thread(s): compile {compile_s:.1f} s; ms per token over "
          f"{args.rounds} alternating rounds: " + "; ".join(f"{k} median {sorted(v)[len(v) // 2]:.2f} (best {min(v):.2f})"
                                                         for k, v in ms.items()))
    return 0


def profile_maskgit(args) -> int:
    """Self CPU time of one MaskGIT generation (onemodel, configured like 4M) by kind of op, as shares."""
    from bench_generate import reference_model

    from onemodel.generation import MaskGITSchedule, SamplingOptions, generate

    model = reference_model("cpu", torch.float32, aligned_context=False)
    cap = torch.randint(4, 1000, (args.batch, 32), generator=torch.Generator().manual_seed(0))
    opts = SamplingOptions(temperature=1.0, schedule=MaskGITSchedule(steps=8))
    generate(model, {"caption": cap}, ["rgb"], opts)  # warm-up
    kinds: dict[str, float] = defaultdict(float)
    for _ in range(args.rounds):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            generate(model, {"caption": cap}, ["rgb"], opts)
        for e in prof.key_averages():
            if e.key.startswith("aten::"):
                kinds["gelu" if "gelu" in e.key else kind_of(e.key)] += e.self_cpu_time_total
    total = sum(kinds.values())
    print(f"MaskGIT caption -> rgb, batch {args.batch}, 8 steps, {args.threads} thread(s), {args.rounds} profiled runs: "
          "share of self CPU time")
    for kind, t in sorted(kinds.items(), key=lambda kv: -kv[1]):
        print(f"| {kind} | {100 * t / total:.1f}% |")
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--rounds", type=int, default=5, help="interleaved timing rounds (after one warm-up round)")
    p.add_argument("--json", default=None)
    p.add_argument("--compile", action="store_true",
                   help="instead: a static-shape decode step, eager vs torch.compile (inductor), and its compile time")
    p.add_argument("--maskgit", action="store_true",
                   help="instead: where one MaskGIT image (8 steps from a 32-token caption) spends its time")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    if args.maskgit:
        return profile_maskgit(args)
    if args.compile:
        return compile_step(args)

    from bench_generate import reference_model
    from fourm_baseline import FourMBaseline, generation_mod_dict
    from fourm_baseline import _decoder, _encode_context  # the re-created reference's own pieces

    from onemodel.attention import AttentionMask, attention
    from onemodel.generation import encoder_batch

    B, T = args.batch, args.tokens
    model = reference_model("cpu", torch.float32, aligned_context=False)
    torch.manual_seed(0)
    base = FourMBaseline(model.config.modalities, 256, 4, 4, 4).eval()
    rgb = torch.randint(0, 1024, (B, 256), generator=torch.Generator().manual_seed(0))
    m = model.config.modality_index("caption")

    with torch.no_grad():
        enc = model.encode(*encoder_batch(model, {"rgb": list(rgb)}, None, B, torch.device("cpu")))
        context, enc_mask = _encode_context(base, generation_mod_dict({"rgb": rgb}, "caption", base.modalities))

        def growing():
            cache, prev = model.new_cache(enc), torch.zeros(B, 1, dtype=torch.long)
            for t in range(T):
                pos = torch.full((B, 1), t)
                h = model.decode(enc, prev, torch.full_like(pos, m), pos, torch.ones_like(pos, dtype=torch.bool), cache=cache)
                prev = model.logits_for(h, "caption").argmax(-1)

        def static():
            cache, prev = model.new_static_cache(enc, "caption", T), torch.zeros(B, 1, dtype=torch.long)
            for _ in range(T):
                prev = model.logits_for(model.decode_next(cache, prev), "caption").argmax(-1)

        def static_modules():
            """The first static-cache step (before the step called the weights directly): module calls, the checked
            ``attention``, separate k and v buffers, a copy of every attention output."""
            cache, prev = model.new_static_cache(enc, "caption", T), torch.zeros(B, 1, dtype=torch.long)
            kb, vb = (torch.zeros(len(model.decoder), B, 4, T, 64) for _ in range(2))
            for t in range(T):
                x = cache.start.expand(B, 1, -1) if t == 0 else model.tok_emb(prev + model._offsets[m][0])
                x = x + cache.mod_row + cache.pos_rows[t]
                for i, blk in enumerate(model.decoder):
                    sa = blk.self_attn
                    q, k, v = (u.transpose(1, 2) for u in sa.qkv(blk.norm1(x)).view(B, 1, 3, 4, 64).unbind(2))
                    kb[i][:, :, t : t + 1], vb[i][:, :, t : t + 1] = k, v
                    h = attention(q, kb[i][:, :, : t + 1], vb[i][:, :, : t + 1], mask=AttentionMask(None))
                    x = x + sa.proj(h.transpose(1, 2).reshape(B, 1, 256))
                    x = x + blk.cross_attn(blk.norm2(x), cache.cross_kv[i], mask=cache.cross_mask)
                    x = x + blk.mlp(blk.norm3(x))
                prev = model.logits_for(model.decoder_norm(x), "caption").argmax(-1)

        def reference():
            dec = base.decoder_embeddings["caption"]
            y_emb = dec.pos_emb[:, :T] + dec.mod_emb
            out = torch.zeros(B, 1, dtype=torch.long)
            for _ in range(T):
                n = out.shape[1]
                causal = torch.ones(n, n, dtype=torch.bool).triu(1)[None].repeat(B, 1, 1)
                y = _decoder(base, dec.token_emb(out) + y_emb[:, :n], context, causal, enc_mask)
                out = torch.cat([out, dec.forward_logits(y).reshape(B, n, -1)[:, -1].argmax(-1, keepdim=True)], 1)

        impls = {"growing cache (first)": growing, "static cache, module calls (second)": static_modules,
                 "static cache, weights called directly (now)": static, "4M re-creation": reference}
        wall = {k: [] for k in impls}
        for r in range(args.rounds + 1):  # interleaved; round 0 warms up
            for k, fn in impls.items():
                t0 = time.perf_counter()
                fn()
                if r:
                    wall[k].append(1000 * (time.perf_counter() - t0) / T)
        rows = {}
        for k, fn in impls.items():
            with profile(activities=[ProfilerActivity.CPU]) as prof:
                fn()
            kinds: dict[str, float] = defaultdict(float)
            calls = 0
            for e in prof.key_averages():
                if e.key.startswith("aten::") or e.key.startswith("torch"):
                    kinds[kind_of(e.key)] += e.self_cpu_time_total / 1000 / T  # ms per token
                    calls += e.count
            rows[k] = {"ms_per_token_by_kind": dict(kinds), "ops_per_token": calls / T,
                       "profiled_ms_per_token": sum(kinds.values()),
                       "wall_ms_per_token": sorted(wall[k])[len(wall[k]) // 2], "best_wall_ms_per_token": min(wall[k])}

    # the step's matrix products alone: with the model's own weights (streamed from memory every token, as in the
    # step) and with one hot copy of each shape reused (what the same products cost from cache)
    from bench_generate import step_matmuls

    streamed, hot = step_matmuls(model, B, T), _hot_matmuls(model, B, T)
    best = {"streamed": float("inf"), "hot": float("inf")}
    with torch.no_grad():
        for r in range(args.rounds + 1):
            for k, fn in (("streamed", streamed), ("hot", hot)):
                t0 = time.perf_counter()
                fn()
                if r:
                    best[k] = min(best[k], 1000 * (time.perf_counter() - t0) / T)
    weights_mb = (sum(p.numel() for blk in model.decoder for p in blk.parameters() if p.dim() == 2) + 1000 * 256) * 4 / 2**20
    names = list(impls)
    print(f"caption decode, batch {B}, {T} tokens, {args.threads} thread(s); ms per token (profiled self CPU time)\n")
    print("| kind of op | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(names))
    for kind in [*KINDS, "other (views, dispatch)"]:
        print(f"| {kind} | " + " | ".join(f"{rows[n]['ms_per_token_by_kind'].get(kind, 0.0):.2f}" for n in names) + " |")
    print("| **total (profiled)** | " + " | ".join(f"**{rows[n]['profiled_ms_per_token']:.2f}**" for n in names) + " |")
    print("| aten ops per token | " + " | ".join(f"{rows[n]['ops_per_token']:.0f}" for n in names) + " |")
    print(f"| wall ms per token (median of {args.rounds}, unprofiled) | " + " | ".join(f"{rows[n]['wall_ms_per_token']:.2f}" for n in names) + " |")
    print(f"| wall ms per token (best of {args.rounds}, unprofiled) | " + " | ".join(f"{rows[n]['best_wall_ms_per_token']:.2f}" for n in names) + " |")
    print(f"\nthe step's 25 matrix products alone, ms per token: {best['streamed']:.2f} with the model's weights "
          f"({weights_mb:.1f} MB of decoder + head matrices, read from memory every token), {best['hot']:.2f} with one "
          "copy per shape reused (from cache)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows, "matmuls_ms_per_token": best,
                                               "decoder_weights_mb": weights_mb}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
