"""Train-step throughput of OneModel (per attention backend, fp32 / bf16) next to a 4M-style baseline.

    python scripts/bench_model.py                      # reference config, CPU, 2 threads
    python scripts/bench_model.py --device cuda --batch 64 --steps 20

For each variant it times full training steps (forward + backward + fused AdamW step) on one fixed batch,
all variants built in one process and stepped round-robin (so load from other processes on a shared machine
hits them alike), and reports ms/step (best of ``--steps`` timed steps; the median is in the JSON), tokens/s
(input + target tokens), model FLOPs per token (``OneModel.flops_per_token``), model FLOPs utilisation
against a matmul peak measured in the same run (fp32 and bf16 square matmuls), and
peak memory (CUDA: ``torch.cuda.max_memory_allocated``; CPU: growth of the peak resident set, VmHWM reset
after a warm-up step, so activations and gradients count, weights and optimizer state do not; each variant in
its own subprocess). ``fourm`` rows are ``scripts/fourm_baseline.py``, a
re-creation of the reference 4M implementation's hot path (the reference itself cannot be installed here).

Reference config: width 256, 4 + 4 layers, 4 heads, rgb 16x16 grid (V 1024) + caption (64 tokens, V 1000),
batch 16, 128 input and 128 target tokens per sample (half the samples have the caption as target, half as
input), fp32 and bf16 autocast, 2 threads. Prints a table and writes JSON (``--json``).
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))

from onemodel.batch import MaskedSample, collate  # noqa: E402
from onemodel.modalities import Modality  # noqa: E402
from onemodel.model import OneModel, OneModelConfig  # noqa: E402


class DenseMaskOneModel(OneModel):
    """Ablation: OneModel without its structured masks: every attention gets a dense (B, 1, Nq, Nk) bool mask
    (encoder and cross-attention padding expanded over queries, decoder rule always materialised)."""

    def _key_padding_mask(self, mask, num_queries):
        return mask[:, None, None, :].expand(-1, 1, num_queries, -1).contiguous()

    def _self_attention_plan(self, mod, pos, mask):
        from onemodel.model import decoder_self_mask

        return decoder_self_mask(mod, pos, mod, pos, mask, self.mod_is_grid), False


def modalities(args) -> tuple[Modality, ...]:
    return (
        Modality("rgb", "grid", args.grid_vocab, "rgb", grid_size=args.grid_size),
        Modality("caption", "sequence", args.text_vocab, "text", max_length=args.caption_length),
    )


def make_spec(args, seed: int = 0) -> list[dict]:
    """Per sample: full token ids per modality, input positions and target positions per modality.

    Even samples: caption (length L in [L/4, max]) is a target + (n_tgt - L) rgb targets, n_in rgb inputs.
    Odd samples: caption is an input + (n_in - L) rgb inputs, n_tgt rgb targets. Exactly n_in / n_tgt each.
    """
    g = torch.Generator().manual_seed(seed)
    n_grid, L_max = args.grid_size**2, args.caption_length
    if args.inputs + args.targets - max(1, L_max // 4) > n_grid or min(args.inputs, args.targets) < L_max:
        raise ValueError("--inputs/--targets do not fit the grid + caption token counts")
    spec = []
    for b in range(args.batch):
        L = int(torch.randint(max(1, L_max // 4), L_max + 1, (1,), generator=g))
        rgb = torch.randint(0, args.grid_vocab, (n_grid,), generator=g)
        cap = torch.randint(0, args.text_vocab, (L,), generator=g)
        perm = torch.randperm(n_grid, generator=g)
        cap_pos = torch.arange(L)
        if b % 2 == 0:
            n_in, n_tgt = args.inputs, args.targets - L
            inputs = [perm[:n_in].sort().values, cap_pos[:0]]
            targets = [perm[n_in : n_in + n_tgt].sort().values, cap_pos]
        else:
            n_in, n_tgt = args.inputs - L, args.targets
            inputs = [perm[:n_in].sort().values, cap_pos]
            targets = [perm[n_in : n_in + n_tgt].sort().values, cap_pos[:0]]
        spec.append({"ids": [rgb, cap], "inputs": inputs, "targets": targets})
    return spec


def onemodel_batch(spec):
    samples = []
    for s in spec:
        parts = {}
        for side in ("inputs", "targets"):
            ids = torch.cat([s["ids"][m][p] for m, p in enumerate(s[side])])
            mod = torch.cat([torch.full_like(p, m) for m, p in enumerate(s[side])])
            pos = torch.cat(list(s[side]))
            parts[side] = (ids, mod, pos)
        samples.append(MaskedSample(*parts["inputs"], *parts["targets"]))
    return collate(samples)


def matmul_peak(dtype: torch.dtype, device: str, n: int, reps: int = 3) -> float:
    """Best FLOP/s of an (n x n) @ (n x n) matmul in ``dtype``."""
    a = torch.randn(n, n, device=device).to(dtype)
    b = torch.randn(n, n, device=device).to(dtype)
    best = float("inf")
    for _ in range(reps + 1):
        _sync(device)
        t = time.perf_counter()
        a @ b
        _sync(device)
        best = min(best, time.perf_counter() - t)
    return 2 * n**3 / best


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _status_kb(field: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident) of this process, in kB (Linux /proc)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux >= 4.0). ru_maxrss cannot be used: it is inherited across fork."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def build_variant(args, impl: str, backend: str, dtype: str, compiled: str = "0"):
    """Model + fixed batch + AdamW for one variant -> (step function returning the loss, info dict).

    compiled == "1": every encoder / decoder block of the model (OneModel or the 4M-style baseline alike) is
    wrapped with ``torch.compile`` (inductor); embeddings, masks and loss stay eager."""
    if impl == "floor":
        return build_floor(args, dtype)
    torch.manual_seed(0)
    device = args.device
    mods = modalities(args)
    spec = make_spec(args)
    # init="trunc_normal": the same N(0, 0.02) init as the 4M-style baseline, so both start at loss ~ln(V)
    # (init does not change the speed; the default init starts residual branches at zero)
    cfg = OneModelConfig(modalities=mods, dim=args.dim, encoder_depth=args.depth, decoder_depth=args.depth,
                         num_heads=args.heads, attention=backend if impl.startswith("onemodel") else "sdpa",
                         init="trunc_normal", aligned_context=impl != "onemodel-matched")
    flops_model = OneModel(cfg)
    flops_per_token = flops_model.flops_per_token(args.inputs, args.targets,
                                                  vocab=(args.grid_vocab + args.text_vocab) / 2)
    if impl in ("onemodel", "onemodel-dense", "onemodel-matched", "onemodel-ckpt"):
        model = DenseMaskOneModel(cfg) if impl == "onemodel-dense" else flops_model
        model.gradient_checkpointing = impl == "onemodel-ckpt"
        model = model.to(device).train()
        batch = onemodel_batch(spec).to(device)
        forward = lambda: model(batch).loss  # noqa: E731
    else:
        from fourm_baseline import FourMBaseline, make_mod_dict

        del flops_model
        model = FourMBaseline(mods, args.dim, args.depth, args.depth, args.heads).to(device).train()
        mod_dict = {m: {k: v.to(device) for k, v in d.items()} for m, d in make_mod_dict(spec, mods).items()}
        forward = lambda: model(mod_dict, args.inputs, args.targets)[0]  # noqa: E731
    if compiled == "1":
        for block in [*model.encoder, *model.decoder]:
            block.compile(dynamic=False)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=True)  # one kernel for all params
    autocast = torch.autocast(device.split(":")[0], dtype=torch.bfloat16, enabled=dtype == "bf16")

    def step():
        with autocast:
            loss = forward()
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)  # gradients freed before the next forward (as training/train.py does)
        return loss.detach()

    label = {"onemodel": backend, "onemodel-dense": backend + " + dense masks", "fourm": "eager (4M-style)",
             "onemodel-matched": backend + ", aligned_context=False",
             "onemodel-ckpt": backend + " + gradient checkpointing"}[impl]
    label += " + compile" if compiled == "1" else ""
    info = {"impl": impl.split("-")[0], "backend": label, "dtype": dtype, "compiled": compiled == "1",
            "flops_per_token": flops_per_token, "params": sum(p.numel() for p in model.parameters())}
    return step, info


def build_floor(args, dtype: str):
    """The matrix products of one OneModel training step and nothing else (4M-matched config): every linear layer's
    forward product, its input-gradient and weight-gradient products and its bias-gradient sum, at the step's real
    shapes, with fused AdamW excluded, attention kernels, norms, GELU, embeddings and loss excluded. Any
    implementation that runs the same linear layers with the same kernels needs at least this time."""
    import torch.nn.functional as F

    torch.manual_seed(0)
    device, D = args.device, args.dim
    F_ = 4 * D
    batch = onemodel_batch(make_spec(args))
    n_in, n_tgt = batch.enc_mask.sum().item(), batch.dec_mask.sum().item()
    n_cap = int(((batch.dec_mod == 1) & batch.dec_mask).sum())
    shapes = [(n_in, D, 3 * D), (n_in, D, D), (n_in, D, F_), (n_in, F_, D)] * args.depth  # encoder
    shapes += [(n_tgt, D, 3 * D), (n_tgt, D, D), (n_tgt, D, D), (n_in, D, 2 * D), (n_tgt, D, D),
               (n_tgt, D, F_), (n_tgt, F_, D)] * args.depth  # decoder (self, cross q, cross k/v, proj, MLP)
    shapes += [(n_tgt - n_cap, D, args.grid_vocab), (n_cap, D, args.text_vocab)]  # heads
    dt = torch.bfloat16 if dtype == "bf16" else torch.float32  # autocast runs the products in bf16: so does this
    mats = [tuple(t.to(dt) for t in (torch.randn(m, k, device=device), torch.randn(n, k, device=device) * 0.02,
                                      torch.zeros(n, device=device), torch.randn(m, n, device=device)))
            for m, k, n in shapes]

    def step():
        for x, w, b, g in mats:
            F.linear(x, w, b)  # forward
            g.mm(w)  # input gradient
            g.t().mm(x)  # weight gradient
            g.sum(0)  # bias gradient
        return torch.zeros(())

    cfg = OneModelConfig(modalities=modalities(args), dim=D, encoder_depth=args.depth, decoder_depth=args.depth,
                         num_heads=args.heads, aligned_context=False)
    flops = OneModel(cfg).flops_per_token(args.inputs, args.targets, vocab=(args.grid_vocab + args.text_vocab) / 2)
    info = {"impl": "floor", "backend": "linear-layer products only", "dtype": dtype, "compiled": False,
            "flops_per_token": flops, "params": 0}
    return step, info


def measure_memory(args, impl: str, backend: str, dtype: str, compiled: str = "0") -> dict:
    """Memory (MB) of one variant in a fresh process, per section. CUDA: max allocated during the steps. CPU:
    resident set after the imports, after building model + batch + optimizer, the process's peak over three
    training steps (``total_peak_mb``, what the issue's RSS target is about) and the peak growth during the
    last two steps (activations + gradients: ``peak_mb``)."""
    out = {"import_mb": _status_kb("VmRSS") / 1024}
    step, _ = build_variant(args, impl, backend, dtype, compiled)
    out["built_mb"] = _status_kb("VmRSS") / 1024
    step()
    _sync(args.device)
    out["first_step_peak_mb"] = _status_kb("VmHWM") / 1024
    if args.device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        _reset_peak_rss()
    rss0 = _status_kb("VmRSS")
    for _ in range(2):
        step()
    _sync(args.device)
    if args.device.startswith("cuda"):
        out["peak_mb"] = torch.cuda.max_memory_allocated() / 2**20
    else:
        out["peak_mb"] = max(0, _status_kb("VmHWM") - rss0) / 1024
    out["total_peak_mb"] = max(out["first_step_peak_mb"], _status_kb("VmHWM") / 1024)
    return out


def time_variants(args, names, peaks: dict | None = None) -> list[dict]:
    """Build every variant, warm up, then time steps round-robin (A B C A B C ...) so that load changes on a
    shared machine hit all variants alike; report the median step time."""
    built = [build_variant(args, *name) for name in names]
    for step, info in built:
        t = time.perf_counter()
        step()  # first step: includes torch.compile's compilation for compiled variants
        info["first_step_s"] = time.perf_counter() - t
        for _ in range(args.warmup - 1):
            step()
    times = [[] for _ in built]
    for _ in range(args.steps):
        if peaks is not None:  # the matmul peak too is re-measured every round (best kept): load hits it alike
            for dt, torch_dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                peaks[dt] = max(peaks[dt], matmul_peak(torch_dt, args.device, args.peak_size, reps=1))
        for i, (step, _) in enumerate(built):
            _sync(args.device)
            t = time.perf_counter()
            loss = step()
            _sync(args.device)
            times[i].append(time.perf_counter() - t)
            built[i][1]["loss"] = float(loss)
    rows = []
    tokens = args.batch * (args.inputs + args.targets)
    for (_, info), ts in zip(built, times):
        # best step: on a shared CPU, other processes only ever add time, so the minimum is the steadiest
        # estimate of what the code costs; the median is kept in the JSON.
        ms = min(ts) * 1000
        rows.append({**info, "ms_per_step": ms, "ms_median": statistics.median(ts) * 1000,
                     "ms_all": [t * 1000 for t in ts], "tokens_per_s": tokens / (ms / 1000)})
    return rows


def variants(args) -> list[tuple[str, str, str]]:
    from onemodel.attention import available_backends

    backends = [b for b in args.backends.split(",") if b in available_backends(args.device)]
    out = []
    for dtype in args.dtypes.split(","):
        if not args.no_baseline:
            out.append(("fourm", "eager", dtype, "0"))
        if not args.no_floor:  # the linear layers' products alone: a floor for any implementation of this step
            out.append(("floor", "mm", dtype, "0"))
        if "sdpa" in backends:  # configured like 4M (no aligned context), next to the default configuration
            out.append(("onemodel-matched", "sdpa", dtype, "0"))
        out += [("onemodel", b, dtype, "0") for b in backends]
        if args.ablations and "sdpa" in backends:
            out.append(("onemodel-dense", "sdpa", dtype, "0"))
        if args.checkpointing and "sdpa" in backends:
            out.append(("onemodel-ckpt", "sdpa", dtype, "0"))
        if args.compile:  # compiled rows next to the eager ones, baseline compiled the same way
            if not args.no_baseline:
                out.append(("fourm", "eager", dtype, "1"))
            out += [("onemodel", b, dtype, "1") for b in backends[:1]]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--dim", type=int, default=256)
    p.add_argument("--depth", type=int, default=4, help="encoder depth = decoder depth")
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--grid-size", type=int, default=16)
    p.add_argument("--grid-vocab", type=int, default=1024)
    p.add_argument("--text-vocab", type=int, default=1000)
    p.add_argument("--caption-length", type=int, default=64)
    p.add_argument("--inputs", type=int, default=128, help="input tokens per sample")
    p.add_argument("--targets", type=int, default=128, help="target tokens per sample")
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--warmup", type=int, default=2, help="untimed steps per variant (at least 1)")
    p.add_argument("--backends", default="sdpa,eager,xformers")
    p.add_argument("--dtypes", default="fp32,bf16")
    p.add_argument("--ablations", action="store_true", help="add OneModel with dense masks (what structured masks give)")
    p.add_argument("--no-baseline", action="store_true", help="skip the 4M-style baseline rows")
    p.add_argument("--no-floor", action="store_true", help="skip the floor rows (the linear layers' products alone)")
    p.add_argument("--checkpointing", action="store_true",
                   help="add OneModel with gradient checkpointing (less activation memory, one more block forward)")
    p.add_argument("--compile", action="store_true",
                   help="add rows with torch.compile'd blocks (the baseline's and OneModel's first backend); "
                        "their compile time is the first step (first_step_s in the JSON)")
    p.add_argument("--peak-size", type=int, default=2048, help="matrix size of the peak matmul measurement")
    p.add_argument("--no-memory", action="store_true", help="skip the per-variant memory measurement subprocesses")
    p.add_argument("--json", default="runs/bench_model.json", help="where to write the results")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    if args.worker:  # child process: memory of one variant, printed as the last stdout line
        print(json.dumps(measure_memory(args, *args.worker.split(":"))))
        return 0

    peaks = {"fp32": matmul_peak(torch.float32, args.device, args.peak_size),
             "bf16": matmul_peak(torch.bfloat16, args.device, args.peak_size)}
    names = variants(args)
    rows = time_variants(args, names, peaks)
    for name, row in zip(names, rows):
        row["mfu"] = row["flops_per_token"] * row["tokens_per_s"] / peaks[row["dtype"]]
        row["peak_mem_mb"] = None
        if not args.no_memory and row["impl"] != "floor":
            cmd = [sys.executable, __file__, *(argv if argv is not None else sys.argv[1:]), "--worker", ":".join(name)]
            res = subprocess.run(cmd, capture_output=True, text=True)
            if res.returncode:
                raise RuntimeError(f"memory run {name} failed:\n{res.stderr[-3000:]}")
            mem = json.loads(res.stdout.strip().splitlines()[-1])
            row["peak_mem_mb"], row["memory"] = mem["peak_mb"], mem

    # vs the eager baseline of the same dtype, and vs the baseline with the same compile setting
    base = {(r["dtype"], r["compiled"]): r["ms_per_step"] for r in rows if r["impl"] == "fourm"}
    base_median = {(r["dtype"], r["compiled"]): r["ms_median"] for r in rows if r["impl"] == "fourm"}
    for r in rows:
        b = base_median.get((r["dtype"], False))
        r["speedup_vs_fourm_median"] = b / r["ms_median"] if b else None
    for r in rows:
        eager_base, same_base = base.get((r["dtype"], False)), base.get((r["dtype"], r["compiled"]))
        r["speedup_vs_fourm"] = eager_base / r["ms_per_step"] if eager_base else None
        r["speedup_vs_fourm_same_compile"] = same_base / r["ms_per_step"] if same_base else None

    print(f"\ndevice {args.device} ({platform.processor() or platform.machine()}), torch {torch.__version__}, "
          f"{args.threads} threads; batch {args.batch}, {args.inputs} input + {args.targets} target tokens/sample, "
          f"width {args.dim}, {args.depth}+{args.depth} layers, {args.heads} heads")
    print(f"matmul peak ({args.peak_size}^2): fp32 {peaks['fp32'] / 1e9:.1f} GFLOP/s, bf16 {peaks['bf16'] / 1e9:.1f} GFLOP/s")
    head = (f"| {'impl':8s} | {'attention':34s} | dtype | ms/step (best) | ms/step (median) | tokens/s | GFLOP/token "
            f"| MFU | peak mem MB | RSS MB import / built / peak | first step s | vs 4M-style | vs 4M-style (medians) "
            f"| vs 4M-style same compile |")
    print(head)
    print("|" + "|".join("-" * (len(c)) for c in head.split("|")[1:-1]) + "|")
    fmt = lambda x: f"{x:.2f}x" if x else "-"  # noqa: E731
    for r in rows:
        mem = "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"
        m = r.get("memory")
        rss = f"{m['import_mb']:.0f} / {m['built_mb']:.0f} / {m['total_peak_mb']:.0f}" if m else "-"
        print(f"| {r['impl']:8s} | {r['backend']:34s} | {r['dtype']:5s} | {r['ms_per_step']:14.0f} | {r['ms_median']:16.0f} "
              f"| {r['tokens_per_s']:8.0f} | {r['flops_per_token'] / 1e9:11.4f} | {r['mfu'] * 100:2.0f}% | {mem:>11s} "
              f"| {rss:>28s} "
              f"| {r['first_step_s']:12.1f} | {fmt(r['speedup_vs_fourm']):>11s} | {fmt(r['speedup_vs_fourm_median']):>21s} "
              f"| {fmt(r['speedup_vs_fourm_same_compile']):>24s} |")
    for r in rows:  # floors: no implementation of the same FLOPs runs above the matmul peak measured in this run, nor
        # (with the same kernels) faster than the linear layers' products alone, timed in the same rounds
        if r["impl"] == "fourm" and not r["compiled"]:
            r["max_speedup_same_flops"] = 1.0 / r["mfu"]
            print(f"{r['dtype']}: the 4M-style step runs at {r['mfu']:.0%} of the {r['dtype']} matmul peak measured in this "
                  f"run, so no implementation of the same FLOPs can be more than {1.0 / r['mfu']:.2f}x faster")
            fl = [f for f in rows if f["impl"] == "floor" and f["dtype"] == r["dtype"]]
            if fl:
                per_round = [a / b for a, b in zip(r["ms_all"], fl[0]["ms_all"])]
                r["max_speedup_same_products"] = statistics.median(per_round)
                print(f"{r['dtype']}: the linear layers' products alone take {fl[0]['ms_median']:.0f} ms (median), the "
                      f"4M-style step {r['ms_median']:.0f} ms: with the same products and kernels no step can be more than "
                      f"{r['max_speedup_same_products']:.2f}x faster (median over rounds of 4M-style / floor)")
    out = {"args": {k: v for k, v in vars(args).items() if k != "worker"}, "torch": torch.__version__,
           "peak_flops": peaks, "rows": rows}
    if args.json:
        from tokenizers_mm.io_atomic import write_json

        write_json(args.json, out)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
