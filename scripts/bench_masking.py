"""Masking throughput and role statistics (thin wrapper over onemodel.masking; CPU, one thread).

    python scripts/bench_masking.py [--samples 3000] [--json out.json]

Times ``mask_sample`` (incl. the per-sample ``masking_rng``) on a realistic token sample of the built-in
modalities (rgb / depth / semseg 16x16 grids + caption 20, question 10, answer 3, det 16 tokens) and
``collate`` of 64 masked samples, then reports how often each sequence modality ends up as whole input,
whole target, span-masked (both) or unused, and the mean tokens per modality, under the default config.
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from onemodel.batch import collate
from onemodel.masking import MaskingConfig, TextSpecialIds, mask_sample, masking_rng
from onemodel.modalities import DEFAULT_MODALITIES


def _token_sample(seed: int = 0) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    seq = lambda n: np.append(rng.integers(100, 1000, n - 1), 2).astype(np.int32)  # noqa: E731 (eos = 2)
    grids = {n: rng.integers(0, 1024, 256).astype(np.int32) for n in ("rgb", "depth", "semseg")}
    return {**grids, "caption": seq(20), "question": seq(10), "answer": seq(3), "det": seq(16)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=3000, help="masked samples to time")
    parser.add_argument("--json", default=None, help="also write the results to this JSON file")
    args = parser.parse_args()
    torch.set_num_threads(1)
    mods = DEFAULT_MODALITIES
    text = TextSpecialIds(eos_id=2, sentinel_ids=tuple(range(10, 42)), pad_id=0)
    cfg = MaskingConfig()
    full = _token_sample()
    grids = {k: full[k] for k in ("rgb", "depth", "semseg")}
    results: dict[str, object] = {}
    for name, tokens in (("3 grids 16x16 + 4 sequences", full), ("3 grids 16x16", grids)):
        for i in range(200):  # warm-up
            mask_sample(tokens, mods, cfg, masking_rng(0, i), text)
        start = time.perf_counter()
        for i in range(args.samples):
            mask_sample(tokens, mods, cfg, masking_rng(0, i), text)
        dt = (time.perf_counter() - start) / args.samples
        results[name] = {"masks_per_s": round(1 / dt), "us_per_sample": round(dt * 1e6, 1)}
    samples = [mask_sample(full, mods, cfg, masking_rng(0, i), text) for i in range(64)]
    start = time.perf_counter()
    for _ in range(200):
        collate(samples)
    results["collate 64 samples (ms)"] = round((time.perf_counter() - start) / 200 * 1e3, 3)

    n = args.samples
    enc_tokens, dec_tokens = np.zeros(len(mods)), np.zeros(len(mods))
    roles = {m.name: {"input": 0, "target": 0, "span": 0, "none": 0} for m in mods if m.is_sequence}
    for i in range(n):
        s = mask_sample(full, mods, cfg, masking_rng(1, i), text)
        e = np.bincount(s.enc_mod.numpy(), minlength=len(mods))
        d = np.bincount(s.dec_mod.numpy(), minlength=len(mods))
        enc_tokens += e
        dec_tokens += d
        for j, m in enumerate(mods):
            if m.is_sequence:
                role = "span" if e[j] and d[j] else "input" if e[j] else "target" if d[j] else "none"
                roles[m.name][role] += 1
    results["mean input tokens"] = {m.name: round(float(v) / n, 1) for m, v in zip(mods, enc_tokens)}
    results["mean target tokens"] = {m.name: round(float(v) / n, 1) for m, v in zip(mods, dec_tokens)}
    results["sequence roles"] = {k: {r: round(c / n, 3) for r, c in v.items()} for k, v in roles.items()}

    print(f"{'sample':32s} {'masks/s':>9s} {'us/sample':>10s}")
    for name in ("3 grids 16x16 + 4 sequences", "3 grids 16x16"):
        r = results[name]
        print(f"{name:32s} {r['masks_per_s']:>9d} {r['us_per_sample']:>10.1f}")
    print(f"collate 64 samples: {results['collate 64 samples (ms)']} ms")
    print(f"{'modality':10s} {'in tok':>7s} {'tgt tok':>7s}   roles (input / target / span / none)")
    for m in mods:
        n_in, n_tgt = results["mean input tokens"][m.name], results["mean target tokens"][m.name]
        line = f"{m.name:10s} {n_in:>7.1f} {n_tgt:>7.1f}"
        if m.is_sequence:
            r = results["sequence roles"][m.name]
            line += f"   {r['input']:.0%} / {r['target']:.0%} / {r['span']:.0%} / {r['none']:.0%}"
        print(line)
    if args.json:
        from tokenizers_mm.io_atomic import write_json

        write_json(args.json, results)


if __name__ == "__main__":
    main()
