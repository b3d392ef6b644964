"""Loss curves of the same training run in fp32 and in bf16 autocast (is bf16 as accurate on CPU?).

Two copies of one OneModel (reference config: width 256, 4 + 4 layers, rgb 16x16 V 1024 + caption 64 V 1000, the
library's default init) start from the same weights and train on the same sequence of batches (a fixed pool of
``--pool`` batches of ``scripts/bench_model.py``'s reference layout, cycled: the loss falls by memorising them),
one step each in turn; every ``--every`` steps both are evaluated in fp32 on the whole pool. Prints the two curves
side by side and the seconds per step of each, and writes JSON (``--json``).

    python scripts/compare_precision.py --steps 60 --threads 1
"""

from __future__ import annotations

import argparse
import copy
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--every", type=int, default=10)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--pool", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)

    import bench_model as bm

    from onemodel.model import OneModel, OneModelConfig

    spec_args = argparse.Namespace(batch=args.batch, grid_size=16, grid_vocab=1024, text_vocab=1000,
                                   caption_length=64, inputs=128, targets=128)
    pool = [bm.onemodel_batch(bm.make_spec(spec_args, seed=s)) for s in range(args.pool)]
    torch.manual_seed(0)
    fp32 = OneModel(OneModelConfig(modalities=bm.modalities(spec_args), dim=256, encoder_depth=4, decoder_depth=4,
                                   num_heads=4)).train()
    runs = {"fp32": fp32, "bf16": copy.deepcopy(fp32)}
    opts = {k: torch.optim.AdamW(m.parameters(), lr=args.lr, weight_decay=0.05, fused=True) for k, m in runs.items()}
    curves = {k: [] for k in runs}
    seconds = {k: 0.0 for k in runs}

    def evaluate(model):
        model.eval()
        with torch.no_grad():
            loss = sum(float(model(b).loss) for b in pool) / len(pool)
        model.train()
        return loss

    for step in range(args.steps + 1):
        if step % args.every == 0 or step == args.steps:
            for k, m in runs.items():
                curves[k].append((step, evaluate(m)))
            print(f"step {step:4d}  eval loss fp32 {curves['fp32'][-1][1]:.4f}  bf16 {curves['bf16'][-1][1]:.4f}",
                  flush=True)
        if step == args.steps:
            break
        batch = pool[step % len(pool)]
        for k, m in runs.items():
            t = time.perf_counter()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=k == "bf16"):
                loss = m(batch).loss
            loss.backward()
            opts[k].step()
            opts[k].zero_grad(set_to_none=True)
            seconds[k] += time.perf_counter() - t
    print("\n| step | eval loss fp32 | eval loss bf16 autocast | difference |\n| ---: | ---: | ---: | ---: |")
    for (s, a), (_, b) in zip(curves["fp32"], curves["bf16"]):
        print(f"| {s} | {a:.4f} | {b:.4f} | {b - a:+.4f} |")
    print(f"\ntraining seconds per step: fp32 {seconds['fp32'] / args.steps:.2f}, bf16 {seconds['bf16'] / args.steps:.2f} "
          f"({seconds['fp32'] / seconds['bf16']:.2f}x)")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "curves": curves, "seconds": seconds}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
