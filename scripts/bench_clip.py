"""Benchmark the contrastive image-text encoder: training samples/s for each loss, and encode images/s.

    python scripts/bench_clip.py                       # the configs/clip_shapes.yaml model, 1 thread
    python scripts/bench_clip.py --threads 2 --batch-size 128 --steps 10 --losses clip siglip coca
    python scripts/bench_clip.py --no-negatives        # without the config's hard-negative captions

Prints one line per measurement: wall samples/s and CPU samples/s (CPU seconds of this process: on a shared
machine, wall time depends on the other jobs; CPU time is what the work costs, and with N idle cores the wall
rate approaches N x the CPU rate only as far as the threads scale). Data: in-memory synthetic shapes scenes.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="configs/clip_shapes.yaml", help="train-clip config (its model section)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=8, help="timed training steps per loss (after 2 warm-up)")
    parser.add_argument("--losses", nargs="+", default=["clip", "siglip"], choices=["clip", "siglip", "coca"],
                        help="coca = the CLIP loss + the CoCa captioning loss (weight 1)")
    parser.add_argument("--encode-images", type=int, default=1024, help="images for the encode benchmark")
    parser.add_argument("--precision", choices=["config", "no", "bf16"], default="config",
                        help="bf16 autocast or fp32 ('config': the config's optim.mixed_precision)")
    parser.add_argument("--attention", choices=["config", "sdpa", "eager"], default="config",
                        help="transformers attention kernel ('config': the config's model.attention)")
    parser.add_argument("--no-negatives", action="store_true",
                        help="leave out the config's hard-negative captions (negatives.swap_groups)")
    args = parser.parse_args()

    import torch

    from onemodel.contrastive import ContrastiveConfig, ImageTextEncoder
    from tokenizers_mm.text import TextTokenizer
    from training.data.shapes import generate_split
    from training.hard_negatives import negative_captions
    from training.train_clip import load_clip_config

    torch.set_num_threads(args.threads)
    train_config = load_clip_config(args.config)
    base, negatives = train_config.model, train_config.negatives
    use_negatives = negatives.enabled and not args.no_negatives
    precision = train_config.optim.mixed_precision if args.precision == "config" else args.precision
    attention = base.attention if args.attention == "config" else args.attention
    samples = list(generate_split("train", max(args.batch_size, 256), resolution=base.image_size))
    texts = [s["caption"] for s in samples]
    tokenizer = TextTokenizer.train(texts, vocab_size=4096, num_sentinels=1, num_loc_bins=2)
    batch = samples[: args.batch_size]
    print(f"torch {torch.__version__}, {args.threads} thread(s), batch {args.batch_size}, image {base.image_size}px, "
          f"config {args.config}, precision {precision}, attention {attention}, "
          f"hard negatives: {negatives.swap_groups if use_negatives else 'none'}")
    for name in args.losses:
        overrides = {"loss": "clip" if name == "coca" else name, "coca_weight": 1.0 if name == "coca" else 0.0,
                     "attention": attention}
        config = ContrastiveConfig.from_dict({**base.to_dict(), **overrides})
        torch.manual_seed(0)
        model = ImageTextEncoder.from_config(config, tokenizer)
        model.train()
        opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
        pixels = model.preprocess([s["rgb"] for s in batch])
        captions = [s["caption"] for s in batch]
        inputs = [pixels, *model.tokenize(captions)]
        for step in range(args.steps + 2):
            if step == 2:
                t0, c0 = time.perf_counter(), time.process_time()
            negs = []
            if use_negatives:  # drawn and tokenized every step, as train-clip does
                negs = negative_captions(captions, range(step * len(captions), (step + 1) * len(captions)),
                                         negatives, seed=0)
                negs = [*model.tokenize([n or t for n, t in zip(negs, captions * negatives.per_caption)]),
                        torch.tensor([n is not None for n in negs])]
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=precision == "bf16"):
                out = model(*inputs, *negs)
            out.loss.backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        wall, cpu = time.perf_counter() - t0, time.process_time() - c0
        n = args.steps * args.batch_size
        print(f"train {name:7s}: {n / wall:8.1f} samples/s wall, {n / cpu:8.1f} samples/s per CPU second "
              f"({model.num_params() / 1e6:.2f}M parameters)")
    model.eval()
    images = [samples[i % len(samples)]["rgb"] for i in range(args.encode_images)]
    model.encode_image(images[:64])  # warm-up
    t0, c0 = time.perf_counter(), time.process_time()
    model.encode_image(images)
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    print(f"encode images: {len(images) / wall:8.1f} images/s wall, {len(images) / cpu:8.1f} images/s per CPU second "
          "(preprocessing included)")
    t0 = time.perf_counter()
    model.encode_text(texts)
    print(f"encode texts:  {len(texts) / (time.perf_counter() - t0):8.1f} texts/s wall")
    return 0


if __name__ == "__main__":
    sys.exit(main())
