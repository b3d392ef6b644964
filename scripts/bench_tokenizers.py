"""Benchmark tokenizer throughput: encode / decode images (or texts) per second, CPU.

    python scripts/bench_tokenizers.py --tokenizers BUNDLE_DIR [--batch-size 64 --threads 2 --repeats 5 --json out.json]
    python scripts/bench_tokenizers.py --untrained   # fresh recommended-config tokenizers (no bundle needed)

Prints a table (tokenizer, grid, vocab, encode/s, decode/s) and optionally writes the numbers as JSON. Timings
are wall-clock medians over ``--repeats`` runs after one warm-up; other processes on the machine make them noisy.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time


def _median_rate(fn, n_items: int, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return n_items / statistics.median(times)


def bench(tokenizers: dict, batch_size: int, repeats: int) -> list[dict]:
    import numpy as np
    import torch

    from training.data.shapes import generate_sample

    rows = []
    for name, tok in tokenizers.items():
        if name == "text":
            size = 64
            texts = [generate_sample(i, resolution=size)["caption"] for i in range(batch_size)]
            ids = tok.encode(texts)
            rows.append({"tokenizer": name, "grid": "-", "vocab": tok.vocab_size, "batch": batch_size,
                         "encode_per_s": _median_rate(lambda: tok.encode(texts), batch_size, repeats),
                         "decode_per_s": _median_rate(lambda: tok.decode(ids), batch_size, repeats)})
            continue
        size = tok.image_size
        images = np.stack([generate_sample(i, resolution=size)[name] for i in range(batch_size)])
        with torch.inference_mode():
            ids = tok.encode(images)
            rows.append({"tokenizer": name, "grid": f"{tok.grid_size}x{tok.grid_size}", "vocab": tok.vocab_size,
                         "batch": batch_size,
                         "encode_per_s": _median_rate(lambda: tok.encode(images), batch_size, repeats),
                         "decode_per_s": _median_rate(lambda: tok.decode(ids), batch_size, repeats)})
            if getattr(tok, "diffusion_decoder", None) is not None:  # 25 DDIM steps: slow, so a small batch
                few = ids[:8]
                rows.append({"tokenizer": f"{name}+diffusion", "grid": rows[-1]["grid"], "vocab": tok.vocab_size,
                             "batch": len(few), "encode_per_s": rows[-1]["encode_per_s"],
                             "decode_per_s": _median_rate(lambda: tok.decode(few, use_diffusion=True), len(few), 1)})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokenizers", default=None, help="tokenizer bundle directory")
    parser.add_argument("--untrained", action="store_true", help="bench fresh recommended-config tokenizers instead")
    parser.add_argument("--grid-size", type=int, default=16, help="grid of the --untrained tokenizers (8 or 16)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--json", default=None, help="write the results to this JSON file")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    if args.tokenizers:
        from tokenizers_mm.bundle import TokenizerBundle

        bundle = TokenizerBundle.from_pretrained(args.tokenizers)
        tokenizers = {name: bundle[name] for name in bundle.names()}
    elif args.untrained:
        from tokenizers_mm.vq import VQTokenizer
        from training.tokenizer_training import recommended_vq_config

        tokenizers = {}
        for modality in ("rgb", "depth", "semseg"):
            cfg = recommended_vq_config(modality, args.grid_size, num_classes=4).tokenizer
            cfg.kmeans_init = False
            tokenizers[modality] = VQTokenizer(cfg).eval()
    else:
        parser.error("pass --tokenizers BUNDLE_DIR or --untrained")
    rows = bench(tokenizers, args.batch_size, args.repeats)
    print(f"batch {args.batch_size}, {args.threads} CPU thread(s), median of {args.repeats}")
    print(f"{'tokenizer':<10} {'grid':>6} {'vocab':>6} {'encode/s':>10} {'decode/s':>10}")
    for r in rows:
        print(f"{r['tokenizer']:<10} {r['grid']:>6} {r['vocab']:>6} {r['encode_per_s']:>10.1f} {r['decode_per_s']:>10.1f}")
    if args.json:
        from tokenizers_mm.io_atomic import write_json

        write_json(args.json, {"threads": args.threads, "batch_size": args.batch_size, "repeats": args.repeats,
                               "results": rows})
    return 0


if __name__ == "__main__":
    sys.exit(main())
