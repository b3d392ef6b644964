"""``onemodel train-tokenizer``: train one modality tokenizer on a dataset directory and print its metrics.

    onemodel train-tokenizer --modality rgb --data data/shapes --out tokenizers/rgb
    onemodel train-tokenizer --modality depth --data data/shapes --out tokenizers/depth --steps 800 tokenizer.codebook_size=512
    onemodel train-tokenizer --modality rgb --data data/shapes --out tokenizers/rgb --diffusion-decoder
    onemodel train-tokenizer --modality text --data data/shapes --out tokenizers/text --vocab-size 1024

Image tokenizers start from the recommended config of the modality (``configs/tokenizers/<modality>.yaml`` has
the same values) or ``--config FILE``; trailing ``key=value`` arguments override it (``tokenizer.latent_dim=16``,
``training.lr=1e-3``). ``--out`` is a tokenizer directory; put the four of a model in one bundle directory
(``BUNDLE/rgb``, ``BUNDLE/depth``, ``BUNDLE/semseg``, ``BUNDLE/text``).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--modality", required=True, choices=["rgb", "depth", "semseg", "text"], help="which tokenizer")
    parser.add_argument("--data", required=True, help="dataset directory (with train/ and val/ splits of raw shards)")
    parser.add_argument("--out", required=True, help="output tokenizer directory")
    parser.add_argument("--config", default=None, help="YAML/JSON config file (default: the recommended one)")
    parser.add_argument("--steps", type=int, default=None, help="training steps (image tokenizers)")
    parser.add_argument("--batch-size", type=int, default=None, help="batch size (image tokenizers)")
    parser.add_argument("--lr", type=float, default=None, help="peak learning rate (image tokenizers)")
    parser.add_argument("--seed", type=int, default=None, help="random seed")
    parser.add_argument("--grid-size", type=int, default=None, choices=[8, 16],
                        help="tokens per side for 64x64 images (picks the recommended config for that grid)")
    parser.add_argument("--diffusion-decoder", action="store_true", help="rgb only: also train a diffusion decoder")
    parser.add_argument("--diffusion-steps", type=int, default=None, help="diffusion decoder training steps")
    parser.add_argument("--vocab-size", type=int, default=1024, help="text only: requested vocabulary size")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars")
    parser.add_argument("overrides", nargs="*", help="config overrides key=value (e.g. tokenizer.codebook_size=512)")


def _print_metrics(result: dict[str, Any]) -> None:
    val = result.get("val", {})
    print(f"{result['modality']} tokenizer: {result['steps']} steps in {result['train_seconds']:.0f}s, "
          f"grid {result['grid_size']}x{result['grid_size']}, vocab {result['vocab_size']}")
    for key, value in val.items():
        print(f"  val {key}: {value:.4f}")
    if "diffusion" in result:
        d = result["diffusion"]
        print(f"  diffusion decoder: PSNR {d.get('psnr_diffusion', float('nan')):.2f} dB "
              f"(conv decoder {d.get('psnr_conv', float('nan')):.2f} dB on the same {d.get('val_images', 0)} images)")


def run(args: argparse.Namespace) -> int:
    import torch

    from training.tokenizer_training import (
        load_vq_training_config,
        train_text_tokenizer,
        train_vq_tokenizer,
    )

    from tokenizers_mm.io_atomic import check_output_dir

    check_output_dir(args.out, what="--out directory")  # before training, not after it
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.modality == "text":
        tok = train_text_tokenizer(args.data, args.out, vocab_size=args.vocab_size)
        print(f"text tokenizer: {tok.vocab_size} tokens ({tok.num_sentinels} sentinels, {tok.num_loc_bins} location "
              f"tokens, classes {tok.class_names}) saved to {args.out}")
        return 0

    overrides = list(args.overrides)
    for flag, key in (("steps", "steps"), ("batch_size", "batch_size"), ("lr", "lr"), ("seed", "seed"),
                      ("diffusion_steps", "diffusion_steps")):
        value = getattr(args, flag)
        if value is not None:
            overrides.append(f"training.{key}={value}")
    cfg = load_vq_training_config(args.modality, path=args.config, overrides=overrides, data_dir=args.data,
                                  grid_size=args.grid_size, diffusion=args.diffusion_decoder)
    opts = cfg.training
    data = Path(args.data)
    if (data / "val").is_dir():
        val_source: Path | None = data
    elif (data / "train").is_dir():
        print(f"note: {data} has no val/ split: no round-trip metrics")
        val_source = None
    else:
        print(f"note: {data} has no train/ and val/ splits: round-trip metrics are measured on the training shards")
        val_source = data
    result = train_vq_tokenizer(
        cfg.tokenizer, data, val_source, args.out, steps=opts.steps, batch_size=opts.batch_size, lr=opts.lr,
        seed=opts.seed, progress=not args.no_progress, max_train_samples=opts.max_train_samples,
        max_val_samples=opts.max_val_samples, bf16=opts.bf16,
        diffusion_steps=opts.diffusion_steps if cfg.tokenizer.diffusion is not None else 0,
        diffusion_lr=opts.diffusion_lr,
    )
    result.pop("tokenizer", None)
    _print_metrics(result)
    print(f"saved to {args.out} (metrics in {args.out}/metrics.json)")
    if args.no_progress:
        print(json.dumps(result.get("val", {})))
    return 0
