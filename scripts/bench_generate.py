"""Generation speed at the reference model config (random weights: speed does not depend on training).

Measures, on one device:
- caption decoding tokens/s with and without the KV cache, batch 1 and 8, and the per-token cost at generated
  lengths 8 / 16 / 32 / 64 (average over the sequence, and marginal: the cost of the tokens between the previous
  length and this one, which is what "flat in the generated length" means);
- VQA answers/s (rgb + question -> answer of up to 8 tokens, batch 8);
- MaskGIT image generation (caption -> 16x16 rgb tokens) seconds per image for 8 and 16 steps, batch 1 and 8.

Sequences are generated to their full length (no eos) so every run does the same work.

``--vs-reference`` (the issue-17 targets) instead times, interleaved in one process, OneModel next to
``scripts/fourm_baseline.py``'s re-creation of the reference 4M samplers at the same config: B) 32 caption
tokens from 256 rgb tokens (greedy), batch 1 and 8; C) 256 rgb tokens in 8 MaskGIT steps from a 32-token caption,
batch 1 and 8. OneModel is timed as configured to match 4M (``aligned_context=False``) and in its default
configuration. Each row is the median over ``--repeats`` rounds (jobs run in turn inside a round).

    python scripts/bench_generate.py --json runs/bench_generate.json
    python scripts/bench_generate.py --quick           # fewer repeats, batch 1 only for the slow uncached runs
    python scripts/bench_generate.py --vs-reference --threads 2 --repeats 5
"""

from __future__ import annotations

import argparse
import json
import logging
import platform
import sys
import time
from functools import partial
from pathlib import Path

import torch

from onemodel.generation import AutoregressiveSchedule, MaskGITSchedule, SamplingOptions, generate
from onemodel.modalities import default_modalities
from onemodel.model import OneModel, OneModelConfig

logger = logging.getLogger("bench_generate")


def reference_model(device: str, dtype: torch.dtype, **overrides) -> OneModel:
    """Width 256, 4+4 layers, 4 heads; 16x16 grids with 1024 codes; captions of up to 64 tokens, text vocab 1000."""
    mods = default_modalities(image_vocab=1024, grid_size=16, text_vocab=1000, caption_length=64)
    torch.manual_seed(0)
    cfg = OneModelConfig(modalities=mods, dim=256, encoder_depth=4, decoder_depth=4, num_heads=4, **overrides)
    return OneModel(cfg).to(device=device, dtype=dtype).eval()


def maskgit_flops(cfg, n_cond: int, counts: list[int]) -> float:
    """Matmul FLOPs of one MaskGIT image (both implementations do this arithmetic): per step the encoder over the
    condition + the tokens decoded so far, the decoder over the still-masked slots (self-attention, cross-attention
    k/v of every encoder slot, MLP), and the head over the masked slots. 2 FLOPs per multiply-add."""
    D, F_, L_e, L_d = cfg.dim, int(cfg.dim * cfg.mlp_ratio), cfg.encoder_depth, cfg.decoder_depth
    V, n = cfg.modalities[cfg.modality_index("rgb")].vocab_size, sum(counts)
    known, macs = 0, 0
    for k in counts:
        ni, nq = n_cond + known, n - known
        macs += L_e * (ni * (4 * D * D + 2 * D * F_) + 2 * ni * ni * D)
        macs += L_d * (nq * (6 * D * D + 2 * D * F_) + ni * 2 * D * D + 2 * nq * nq * D + 2 * nq * ni * D) + nq * D * V
        known += k
    return 2.0 * macs


def step_matmuls(model, batch: int, tokens: int):
    """The matrix products of ``tokens`` cached caption steps and nothing else: per token, per decoder layer, the
    six linear maps on ``batch`` rows with the model's own weights (so they stream from memory as in the real step),
    and the head. Timing it gives a floor for the decode loop: no attention, norms, sampling or Python around it."""
    import torch.nn.functional as F

    maps = [(lin.weight, lin.bias) for blk in model.decoder
            for lin in (blk.self_attn.qkv, blk.self_attn.proj, blk.cross_attn.q, blk.cross_attn.proj, blk.mlp.fc1, blk.mlp.fc2)]
    off, v = model._offsets[model.config.modality_index("caption")]
    maps.append((model.head_weight[off : off + v], model.head_bias[off : off + v]))
    xs = {w.shape[1]: torch.randn(batch, w.shape[1], device=w.device) for w, _ in maps}

    def run():
        for _ in range(tokens):
            for w, b in maps:
                F.linear(xs[w.shape[1]], w, b)
    return run


def maskgit_matmuls(model, batch: int, n_cond: int, counts: list[int]):
    """The linear maps of one MaskGIT generation and nothing else, at their real shapes, with the model's weights: per
    step the encoder layers over the condition + decoded tokens, the decoder layers over the masked slots (and the
    cross-attention k/v of every encoder slot), the head over the masked slots. A floor for any implementation that
    runs the same products with the same kernels (no attention, norms, GELU, sampling or Python around them)."""
    import torch.nn.functional as F

    n, D, known, plan = sum(counts), model.config.dim, 0, []
    off, v = model._offsets[model.config.modality_index("rgb")]
    for k in counts:
        ni, nq = batch * (n_cond + known), batch * (n - known)
        for blk in model.encoder:
            plan += [(ni, blk.attn.qkv), (ni, blk.attn.proj), (ni, blk.mlp.fc1), (ni, blk.mlp.fc2)]
        for blk in model.decoder:
            plan += [(nq, blk.self_attn.qkv), (nq, blk.self_attn.proj), (nq, blk.cross_attn.q), (ni, blk.cross_attn.kv),
                     (nq, blk.cross_attn.proj), (nq, blk.mlp.fc1), (nq, blk.mlp.fc2)]
        plan.append((nq, None))
        known += k
    inputs = {(rows, lin.in_features if lin is not None else D): None for rows, lin in plan}
    inputs = {key: torch.randn(*key) for key in inputs}
    head_w, head_b = model.head_weight[off : off + v], model.head_bias[off : off + v]

    def run():
        for rows, lin in plan:
            if lin is None:
                F.linear(inputs[(rows, D)], head_w, head_b)
            else:
                F.linear(inputs[(rows, lin.in_features)], lin.weight, lin.bias)
    return run


def vs_reference(args) -> dict:
    """Issue-17 rows: OneModel (4M-matched and default config) vs the 4M re-creation, interleaved, medians; and per row
    a floor measured in the same rounds: the matrix products of onemodel's work alone (what no implementation of the
    same products with the same kernels can beat on this machine), and the fp32 matmul peak (re-measured every round,
    so load hits it like the jobs)."""
    import statistics

    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from bench_model import matmul_peak
    from fourm_baseline import FourMBaseline, generate_maskgit, generate_sequence, generation_mod_dict

    from onemodel.generation import encoder_batch
    from onemodel.sampling import step_counts

    dev = args.device
    matched, default = reference_model(dev, torch.float32, aligned_context=False), reference_model(dev, torch.float32)
    torch.manual_seed(0)
    base = FourMBaseline(matched.config.modalities, 256, 4, 4, 4).to(dev).eval()
    g = torch.Generator().manual_seed(0)
    n_cap, steps = 32, 8
    counts = step_counts(256, steps, cosine=True)
    rows = []
    for kind in ("caption", "maskgit"):
        for batch in (1, 8):
            if kind == "caption":
                rgb = torch.randint(0, 1024, (batch, 256), generator=g).to(dev)
                opts = SamplingOptions(schedule=AutoregressiveSchedule(max_length=n_cap))
                mod_dict = generation_mod_dict({"rgb": rgb}, "caption", base.modalities)
                enc_in = encoder_batch(matched, {"rgb": rgb}, None, batch, torch.device(dev))
                with torch.no_grad():
                    enc_once = matched.encode(*enc_in)
                jobs = {
                    "reference": partial(generate_sequence, base, mod_dict, "caption", n_cap),
                    "onemodel": partial(generate, matched, {"rgb": rgb}, ["caption"], opts, eos_id=None),
                    "onemodel default": partial(generate, default, {"rgb": rgb}, ["caption"], opts, eos_id=None),
                    # floor: the encoder pass, the cross-attention k/v of every decoder layer (once), and the decode
                    # steps' matrix products alone
                    "floor: encoder": partial(matched.encode, *enc_in),
                    "floor: cross k/v": partial(matched.new_static_cache, enc_once, "caption", n_cap),
                    "floor: step matmuls": step_matmuls(matched, batch, n_cap),
                }
                unit = batch * n_cap  # tokens
            else:
                cap = torch.randint(4, 1000, (batch, n_cap), generator=g).to(dev)
                opts = SamplingOptions(temperature=1.0, schedule=MaskGITSchedule(steps=steps))
                mod_dict = generation_mod_dict({"caption": cap}, "rgb", base.modalities)
                jobs = {
                    "reference": partial(generate_maskgit, base, mod_dict, "rgb", counts),
                    "onemodel": partial(generate, matched, {"caption": cap}, ["rgb"], opts),
                    "onemodel default": partial(generate, default, {"caption": cap}, ["rgb"], opts),
                    "floor: matmuls": maskgit_matmuls(matched, batch, n_cap, counts),
                }
                unit = batch  # images
            jobs["peak"] = partial(matmul_peak, torch.float32, dev, 2048, 1)
            times = {k: [] for k in jobs}
            peaks = []
            with torch.no_grad():
                for r in range(args.repeats + 1):
                    for key, fn in jobs.items():
                        _sync(dev)
                        t0 = time.perf_counter()
                        out = fn()
                        _sync(dev)
                        if key == "peak":
                            peaks.append(out) if r else None
                        elif r:
                            times[key].append(time.perf_counter() - t0)
            times.pop("peak")
            parts = [k for k in times if k.startswith("floor")]
            # the floor of each round (same load as that round's reference run); its median, and the median over rounds
            # of reference / floor: the largest ratio an implementation at the floor would have shown
            floors = [sum(times[k][i] for k in parts) for i in range(args.repeats)]
            med = {k: statistics.median(v) for k, v in times.items() if k not in parts}
            floor = statistics.median(floors)
            max_ratio = statistics.median(ref / f for ref, f in zip(times["reference"], floors))
            flops = maskgit_flops(matched.config, n_cap, counts) * batch if kind == "maskgit" else None
            peak = statistics.median(peaks)
            if kind == "caption":
                floor_note = "encoder pass + cross-attention k/v once + the decode steps' matrix products alone (measured)"
            else:
                floor_note = (f"the linear maps of the 8 steps alone (measured; {flops / 1e9:.1f} GFLOP in all, "
                              f"fp32 matmul peak {peak / 1e9:.1f} GFLOP/s)")
            row = {"kind": kind, "batch": batch, "seconds": med, "all_seconds": times, "floor_seconds": floor,
                   "floor": floor_note, "max_ratio": max_ratio, "peak_flops": peak}
            if flops:  # how close to the matmul peak each implementation runs (same arithmetic)
                row["matmul_peak_fraction"] = {k: flops / t / peak for k, t in med.items()}
            if kind == "caption":
                row["tokens_per_s"] = {k: unit / t for k, t in med.items()}
            else:
                row["seconds_per_image"] = {k: t / unit for k, t in med.items()}
            row["ratio"] = {k: med["reference"] / t for k, t in med.items() if k != "reference"}
            rows.append(row)
            logger.info("%s batch %d: %s; floor %.4f s (%s)", kind, batch, {k: round(v, 4) for k, v in med.items()},
                        floor, floor_note)
    return {"device": dev, "threads": torch.get_num_threads(), "repeats": args.repeats, "rows": rows}


def format_vs_reference(r: dict) -> str:
    lines = [f"vs the 4M re-creation (fp32, {r['threads']} threads, median of {r['repeats']} interleaved rounds)", "",
             "| measure | reference 4M (re-creation) | onemodel (aligned_context=False) | ratio | onemodel default | ratio "
             "| goal | onemodel floor | largest ratio possible |",
             "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for row in r["rows"]:
        if row["kind"] == "caption":
            v, name, fmt, goal = row["tokens_per_s"], f"B caption tokens/s, batch {row['batch']}", "{:.0f}", ">= 5x"
            fl = fmt.format(row["batch"] * 32 / row["floor_seconds"])
        else:
            v, name, fmt, goal = row["seconds_per_image"], f"C MaskGIT s/image, batch {row['batch']}", "{:.3f}", ">= 2x"
            fl = fmt.format(row["floor_seconds"] / row["batch"])
        ratio = row["ratio"]
        lines.append(f"| {name} | {fmt.format(v['reference'])} | {fmt.format(v['onemodel'])} | {ratio['onemodel']:.2f}x "
                     f"| {fmt.format(v['onemodel default'])} | {ratio['onemodel default']:.2f}x | {goal} | {fl} "
                     f"| {row['max_ratio']:.2f}x |")
    lines += ["", "floor: " + "; ".join(f"{row['kind']} batch {row['batch']}: {row['floor']}" for row in r["rows"])]
    for row in r["rows"]:
        if "matmul_peak_fraction" in row:
            frac = ", ".join(f"{k} {v:.0%}" for k, v in row["matmul_peak_fraction"].items())
            lines.append(f"MaskGIT batch {row['batch']}: share of the fp32 matmul peak reached: {frac}")
    return "\n".join(lines)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timeit_round_robin(jobs: dict, device: str, repeats: int) -> dict:
    """Fastest wall seconds of each job over ``repeats`` rounds, running the jobs in turn inside each round (after
    one warm-up round), so that load from other processes spreads over all jobs instead of hitting one; the
    minimum is the measurement least disturbed by them."""
    best = {k: float("inf") for k in jobs}
    for r in range(repeats + 1):
        for key, fn in jobs.items():
            _sync(device)
            t0 = time.perf_counter()
            fn()
            _sync(device)
            if r:  # round 0 is the warm-up
                best[key] = min(best[key], time.perf_counter() - t0)
    return best


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="1 repeat; skip batch-8 uncached runs")
    p.add_argument("--json", default=None, help="write the results here")
    p.add_argument("--vs-reference", action="store_true", help="only the issue-17 rows against the 4M re-creation")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.vs_reference:
        res = vs_reference(args)
        print(format_vs_reference(res))
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
            print(f"wrote {args.json}")
        return 0
    repeats = 1 if args.quick else args.repeats
    dev, dtype = args.device, getattr(torch, args.dtype)
    model = reference_model(dev, dtype)
    g = torch.Generator().manual_seed(0)
    rgb = lambda b: torch.randint(0, 1024, (b, 256), generator=g)  # noqa: E731
    text = lambda b, n: torch.cat([torch.randint(4, 1000, (b, n - 1), generator=g), torch.full((b, 1), 2)], 1)  # noqa: E731
    results: dict = {
        "device": torch.cuda.get_device_name() if dev.startswith("cuda") else f"cpu ({platform.processor() or 'x86'})",
        "threads": torch.get_num_threads(), "dtype": args.dtype, "torch": torch.__version__,
        "config": "dim 256, 4+4 layers, 4 heads, 16x16 grids vocab 1024, caption max 64 vocab 1000",
        "caption": [], "vqa": {}, "maskgit": [],
    }

    # ---- captions: cached vs uncached, per-token cost by length (one round-robin per batch size)
    lengths = (8, 16, 32, 64)
    for batch in (1, 8):
        inputs = {"rgb": rgb(batch)}
        jobs = {"encoder": lambda: model.encode(*_enc(model, inputs, batch, dev))}
        for length in lengths:
            for cache in (True, False):
                if not cache and args.quick and batch > 1:
                    continue
                opts = SamplingOptions(schedule=AutoregressiveSchedule(max_length=length, use_cache=cache))
                jobs[(length, cache)] = partial(generate, model, inputs, ["caption"], opts, eos_id=None)
        with torch.no_grad():
            best = timeit_round_robin(jobs, dev, repeats)
        enc_only = best["encoder"]
        prev_len, prev_t = 0, {True: enc_only, False: enc_only}
        for length in lengths:
            row = {"batch": batch, "length": length, "encoder_s": enc_only}
            for cache in (True, False):
                if (length, cache) not in best:
                    continue
                t = best[(length, cache)]
                key = "cached" if cache else "uncached"
                row[f"{key}_s"] = t
                row[f"{key}_tokens_per_s"] = batch * length / t
                row[f"{key}_ms_per_token"] = 1000 * t / length
                row[f"{key}_marginal_ms_per_token"] = 1000 * (t - prev_t[cache]) / (length - prev_len)
                prev_t[cache] = t
            if "uncached_s" in row:
                row["speedup"] = row["uncached_s"] / row["cached_s"]
                row["decode_speedup"] = (row["uncached_s"] - enc_only) / max(row["cached_s"] - enc_only, 1e-9)
            prev_len = length
            results["caption"].append(row)
            logger.info("caption %s", {k: round(v, 4) if isinstance(v, float) else v for k, v in row.items()})

    # ---- VQA: rgb + question -> answer (8 tokens), batch 8
    batch = 8
    inputs = {"rgb": rgb(batch), "question": list(text(batch, 12))}
    t = timeit_round_robin({"vqa": lambda: generate(model, inputs, ["answer"], eos_id=None)}, dev, repeats)["vqa"]
    results["vqa"] = {"batch": batch, "answer_tokens": 8, "seconds": t, "answers_per_s": batch / t}
    logger.info("vqa %s", results["vqa"])

    # ---- MaskGIT: caption -> rgb
    for batch in (1, 8):
        inputs = {"caption": list(text(batch, 16))}
        jobs = {
            steps: partial(generate, model, inputs, ["rgb"],
                           SamplingOptions(temperature=1.0, schedule=MaskGITSchedule(steps=steps)), seed=0)
            for steps in (8, 16)
        }
        best = timeit_round_robin(jobs, dev, repeats)
        for steps, t in best.items():
            row = {"batch": batch, "steps": steps, "seconds": t, "seconds_per_image": t / batch}
            results["maskgit"].append(row)
            logger.info("maskgit %s", row)

    print(format_table(results))
    if args.json:
        from tokenizers_mm.io_atomic import write_json

        write_json(args.json, results)
        print(f"wrote {args.json}")
    return 0


def _enc(model, inputs, batch, device):
    from onemodel.generation import encoder_batch

    return encoder_batch(model, inputs, None, batch, torch.device(device))


def format_table(r: dict) -> str:
    lines = [f"device: {r['device']}, threads {r['threads']}, {r['dtype']}, torch {r['torch']}; {r['config']}", "",
             "Caption decoding (rgb -> caption, full length, no eos):", ""]
    lines += [
        "| batch | tokens | cached tok/s | uncached tok/s | speedup (total / decoder only) "
        "| cached ms/token (avg / marginal) | uncached ms/token (avg / marginal) |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in r["caption"]:
        unc = (f"{row['uncached_tokens_per_s']:.0f}", f"{row['speedup']:.1f}x / {row['decode_speedup']:.1f}x",
               f"{row['uncached_ms_per_token']:.2f} / {row['uncached_marginal_ms_per_token']:.2f}") if "uncached_s" in row else ("-", "-", "-")
        lines.append(
            f"| {row['batch']} | {row['length']} | {row['cached_tokens_per_s']:.0f} | {unc[0]} | {unc[1]} | "
            f"{row['cached_ms_per_token']:.2f} / {row['cached_marginal_ms_per_token']:.2f} | {unc[2]} |"
        )
    lines.append("")
    lines.append(f"(encoder pass, computed once per caption batch: {1000 * r['caption'][0]['encoder_s']:.1f} ms at batch 1, "
                 f"{1000 * r['caption'][-1]['encoder_s']:.1f} ms at batch 8; marginal = cost of the tokens added since the "
                 "previous length)")
    v = r["vqa"]
    lines += ["", f"VQA (rgb + question -> 8-token answer, batch {v['batch']}): {v['answers_per_s']:.1f} answers/s", ""]
    lines += ["| MaskGIT caption -> rgb (256 tokens): batch | steps | s/image |", "| --- | --- | --- |"]
    for row in r["maskgit"]:
        lines.append(f"| {row['batch']} | {row['steps']} | {row['seconds_per_image']:.3f} |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
