"""Where a cached caption token's time goes (torch.profiler), before and after the static decode step.

Decodes 32 caption tokens (greedy) after one encoder pass at the reference config (width 256, 4 + 4 layers, 4
heads, 256 rgb tokens, caption vocab 1000), random weights, and profiles only the token loop of three
implementations, interleaved:

- ``growing cache``: ``OneModel.decode(..., cache=DecoderCache)``, the path generation used before: per token it
  rebuilds the self-attention mask from the cached modality / position tensors, concatenates the new keys and
  values onto a growing cache, runs the input checks (host syncs) and the aligned-context matching;
- ``static cache``: ``OneModel.decode_next`` with a ``StaticDecoderCache`` (what ``generate`` uses now);
- ``4M re-creation``: ``scripts/fourm_baseline.py``'s decoder over the whole prefix for every token.

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


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--tokens", type=int, default=32)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    from bench_generate import reference_model
    from fourm_baseline import FourMBaseline, generation_mod_dict
    from fourm_baseline import _decoder, _encode_context  # the re-created reference's own pieces

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

        def reference():
            dec = base.decoder_embeddings["caption"]
            y_emb = dec.pos_emb[:, :T] + dec.mod_emb
            out = torch.zeros(B, 1, dtype=torch.long)
            for _ in range(T):
                n = out.shape[1]
                causal = torch.ones(n, n, dtype=torch.bool).triu(1)[None].repeat(B, 1, 1)
                y = _decoder(base, dec.token_emb(out) + y_emb[:, :n], context, causal, enc_mask)
                out = torch.cat([out, dec.forward_logits(y).reshape(B, n, -1)[:, -1].argmax(-1, keepdim=True)], 1)

        impls = {"growing cache (before)": growing, "static cache (now)": static, "4M re-creation": reference}
        wall = {k: [] for k in impls}
        for r in range(4):  # interleaved; round 0 warms up
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
                       "wall_ms_per_token": sorted(wall[k])[len(wall[k]) // 2]}

    names = list(impls)
    print(f"caption decode, batch {B}, {T} tokens, {args.threads} thread(s); ms per token (profiled self CPU time)\n")
    print("| kind of op | " + " | ".join(names) + " |")
    print("| --- |" + " ---: |" * len(names))
    for kind in [*KINDS, "other (views, dispatch)"]:
        print(f"| {kind} | " + " | ".join(f"{rows[n]['ms_per_token_by_kind'].get(kind, 0.0):.2f}" for n in names) + " |")
    print("| **total (profiled)** | " + " | ".join(f"**{rows[n]['profiled_ms_per_token']:.2f}**" for n in names) + " |")
    print("| aten ops per token | " + " | ".join(f"{rows[n]['ops_per_token']:.0f}" for n in names) + " |")
    print("| wall ms per token (median of 3, unprofiled) | " + " | ".join(f"{rows[n]['wall_ms_per_token']:.2f}" for n in names) + " |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
