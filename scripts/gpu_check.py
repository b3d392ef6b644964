"""The GPU checks of ``scripts/gpu_check.sh``, one section per call, each appending one JSON line to ``--out``.

Sections (``--section``):

- ``attention``: sdpa / xformers (when importable) / eager at the model config's shapes (batch ``--batch``, heads
  and width of the config, ``input_budget`` tokens): max |difference| to eager of the output and of the q/k/v
  gradients (no mask, key padding, causal), and forward + backward ms per backend (bf16 on CUDA).
- ``train``: bf16-autocast training steps of the config's model (random tokens, ``input_budget`` inputs +
  ``target_budget`` targets per sample, micro batch of the config, fused AdamW): tokens/s and MFU against the
  bf16 matmul peak measured in the same run (goal on CUDA: >= 45%).
- ``fsdp``: the same model wrapped by ``accelerate`` with the FSDP plugin of ``configs/accelerate_fsdp.yaml``
  (run under ``accelerate launch --num_processes 1``): three steps, the loss must be finite and fall.
- ``generate``: caption tokens/s (KV cache) and MaskGIT seconds per image at batch 1 and 8.

``--tiny`` shrinks the model and batch so that every section except ``fsdp`` runs in seconds on a CPU (the test
suite runs it that way); the numbers are then meaningless, only the plumbing is checked.

    python scripts/gpu_check.py --section attention --config configs/base.yaml --out runs/gpu_check/results.jsonl
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from onemodel.attention import attention, available_backends  # noqa: E402
from onemodel.modalities import default_modalities  # noqa: E402
from onemodel.model import OneModel, OneModelConfig  # noqa: E402


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _timed(fn, device: str, repeats: int) -> float:
    """Median seconds of ``fn`` over ``repeats`` calls after one warm-up call."""
    fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def model_setup(args) -> tuple[OneModelConfig, dict]:
    """OneModelConfig and sizes (batch, input / target tokens) from the training config (or tiny ones)."""
    from training.config import load_train_config

    cfg = load_train_config(args.config)
    m = cfg.model
    if args.tiny:
        mods = default_modalities(image_vocab=64, grid_size=4, text_vocab=50, caption_length=8)
        model_cfg = OneModelConfig(modalities=mods, dim=32, encoder_depth=1, decoder_depth=1, num_heads=2)
        return model_cfg, {"batch": 2, "inputs": 8, "targets": 8}
    mods = default_modalities(image_vocab=1024, grid_size=16, text_vocab=1000, caption_length=64)
    fields = {k: getattr(m, k) for k in ("dim", "encoder_depth", "decoder_depth", "num_heads", "mlp_ratio", "attention",
                                         "aligned_context")}
    model_cfg = OneModelConfig(modalities=mods, **fields)
    return model_cfg, {"batch": args.batch or cfg.optim.micro_batch_size, "inputs": cfg.masking.input_budget,
                       "targets": cfg.masking.target_budget}


def random_batch(model_cfg: OneModelConfig, batch: int, n_in: int, n_tgt: int, device: str, seed: int = 0):
    """A MultimodalBatch of random grid tokens: n_in rgb inputs and n_tgt depth targets per sample."""
    from onemodel.batch import MaskedSample, collate

    g = torch.Generator().manual_seed(seed)
    rgb, depth = model_cfg.modality_index("rgb"), model_cfg.modality_index("depth")
    n = model_cfg.modalities[rgb].num_tokens
    samples = []
    for _ in range(batch):
        pin, ptg = torch.randperm(n, generator=g)[:n_in].sort().values, torch.randperm(n, generator=g)[:n_tgt].sort().values
        vin, vtg = model_cfg.modalities[rgb].vocab_size, model_cfg.modalities[depth].vocab_size
        samples.append(MaskedSample(torch.randint(0, vin, (n_in,), generator=g), torch.full((n_in,), rgb), pin,
                                    torch.randint(0, vtg, (n_tgt,), generator=g), torch.full((n_tgt,), depth), ptg))
    return collate(samples).to(device)


def matmul_peak(dtype: torch.dtype, device: str, n: int) -> float:
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    return 2 * n**3 / _timed(lambda: a @ b, device, 5)


def section_attention(args) -> dict:
    model_cfg, sizes = model_setup(args)
    dev = args.device
    dtype = torch.bfloat16 if dev.startswith("cuda") else torch.float32
    B, H, N, Dh = sizes["batch"], model_cfg.num_heads, sizes["inputs"], model_cfg.dim // model_cfg.num_heads
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(B, H, N, Dh, generator=g).to(dev, dtype) for _ in range(3))
    keep = torch.ones(B, N, dtype=torch.bool)
    keep[0, N // 2 :] = False  # one padded sample
    cases = {"none": (None, False), "key padding": (keep[:, None, None, :].to(dev), False), "causal": (None, True)}
    out = {"shape": [B, H, N, Dh], "dtype": str(dtype), "backends": available_backends(dev), "cases": {}}
    for case, (mask, causal) in cases.items():
        ref_grads = None
        res = {}
        for backend in out["backends"][::-1]:  # eager first: the reference
            qq, kk, vv = (t.clone().requires_grad_(True) for t in (q, k, v))

            def run():
                o = attention(qq, kk, vv, mask=mask, is_causal=causal, backend=backend)
                o.float().square().mean().backward()
                return o

            o = run()
            grads = [o.detach().float().clone(), *(t.grad.float().clone() for t in (qq, kk, vv))]
            if ref_grads is None:
                ref_grads = grads
            diff = max(float((a - b).abs().max()) for a, b in zip(grads, ref_grads))
            res[backend] = {"max_abs_diff_vs_eager": diff, "fwd_bwd_ms": 1000 * _timed(run, dev, args.repeats)}
        out["cases"][case] = res
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    out["ok"] = all(r["max_abs_diff_vs_eager"] <= tol for c in out["cases"].values() for r in c.values())
    return out


def section_train(args) -> dict:
    model_cfg, sizes = model_setup(args)
    dev = args.device
    torch.manual_seed(0)
    model = OneModel(model_cfg).to(dev).train()
    batch = random_batch(model_cfg, sizes["batch"], sizes["inputs"], sizes["targets"], dev)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    amp = torch.autocast(dev.split(":")[0], dtype=torch.bfloat16)

    def step():
        with amp:
            loss = model(batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        return loss

    first = float(step().detach())
    sec = _timed(step, dev, args.repeats)
    tokens = sizes["batch"] * (sizes["inputs"] + sizes["targets"])
    flops = model.flops_per_token(sizes["inputs"], sizes["targets"]) * tokens / sec
    peak = matmul_peak(torch.bfloat16, dev, 256 if args.tiny else 8192)
    mfu = flops / peak
    return {"params_M": model.num_params() / 1e6, "batch": sizes["batch"], "tokens_per_step": tokens,
            "ms_per_step": 1000 * sec, "tokens_per_s": tokens / sec, "model_tflops": flops / 1e12,
            "bf16_matmul_peak_tflops": peak / 1e12, "mfu": mfu, "goal_mfu": 0.45, "first_loss": first,
            "ok": math.isfinite(first)}


def section_fsdp(args) -> dict:
    from accelerate import Accelerator

    model_cfg, sizes = model_setup(args)
    acc = Accelerator()  # FSDP plugin and mixed precision from `accelerate launch --config_file ...`
    torch.manual_seed(0)
    model = OneModel(model_cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model, opt = acc.prepare(model, opt)
    batch = random_batch(model_cfg, min(sizes["batch"], 8), sizes["inputs"], sizes["targets"], str(acc.device))
    losses = []
    for _ in range(3):
        loss = model(batch).loss
        acc.backward(loss)
        opt.step()
        opt.zero_grad()
        losses.append(float(loss))
    return {"distributed_type": str(acc.distributed_type), "num_processes": acc.num_processes, "losses": losses,
            "ok": all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]}


def section_generate(args) -> dict:
    from onemodel.generation import AutoregressiveSchedule, MaskGITSchedule, SamplingOptions, generate

    model_cfg, _ = model_setup(args)
    dev = args.device
    torch.manual_seed(0)
    model = OneModel(model_cfg).to(dev).eval()
    rgb_m, cap_m = (model_cfg.modalities[model_cfg.modality_index(n)] for n in ("rgb", "caption"))
    n_cap = min(32, cap_m.max_length)
    out = {}
    for batch in (1, 8):
        rgb = torch.randint(0, rgb_m.vocab_size, (batch, rgb_m.num_tokens))
        cap = torch.randint(4, cap_m.vocab_size, (batch, n_cap))
        opts = SamplingOptions(schedule=AutoregressiveSchedule(max_length=n_cap))
        sec = _timed(lambda: generate(model, {"rgb": rgb}, ["caption"], opts, eos_id=None), dev, args.repeats)
        out[f"caption_tokens_per_s_b{batch}"] = batch * n_cap / sec
        mg = SamplingOptions(temperature=1.0, schedule=MaskGITSchedule(steps=min(8, rgb_m.num_tokens)))
        sec = _timed(lambda: generate(model, {"caption": list(cap)}, ["rgb"], mg), dev, args.repeats)
        out[f"maskgit_s_per_image_b{batch}"] = sec / batch
    out["ok"] = True
    return out


SECTIONS = {"attention": section_attention, "train": section_train, "fsdp": section_fsdp, "generate": section_generate}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--section", choices=sorted(SECTIONS), required=True)
    p.add_argument("--config", default="configs/base.yaml")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--batch", type=int, default=None, help="micro batch (default: the config's micro_batch_size)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tiny", action="store_true", help="tiny model and batch (CPU plumbing test)")
    p.add_argument("--out", default="runs/gpu_check/results.jsonl")
    args = p.parse_args(argv)
    t = time.perf_counter()
    try:
        res = SECTIONS[args.section](args)
    except Exception as err:  # one failing section must not hide the others' results
        res = {"ok": False, "error": f"{type(err).__name__}: {err}"}
    res = {"section": args.section, "device": args.device, "tiny": args.tiny, "torch": torch.__version__,
           "gpu": torch.cuda.get_device_name() if args.device.startswith("cuda") else None,
           "seconds": time.perf_counter() - t, **res}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    with open(args.out, "a") as f:
        f.write(json.dumps(res) + "\n")
    print(json.dumps(res, indent=1))
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
