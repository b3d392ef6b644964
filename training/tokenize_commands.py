"""``onemodel tokenize``: pre-tokenize raw shards into token shards with a tokenizer bundle.

    onemodel tokenize --tokenizers tokenizers/ --data data/shapes --out data/shapes-tokens

Every split sub-directory of ``--data`` (train/, val/, test/) becomes the same sub-directory of ``--out``
(format: docs/internals.md §3); ``--out/meta.json`` names the bundle and the model's modality specs.
"""

from __future__ import annotations

import argparse


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--tokenizers", required=True, help="tokenizer bundle directory (rgb/, depth/, semseg/, text/)")
    parser.add_argument("--data", required=True, help="dataset directory of raw shards (with split sub-directories)")
    parser.add_argument("--out", required=True, help="output directory for the token shards")
    parser.add_argument("--batch-size", type=int, default=256, help="samples per tokenizer batch")
    parser.add_argument("--overwrite", action="store_true", help="replace token shards already in --out")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> int:
    import torch

    from training.pretokenize import pretokenize

    if args.threads:
        torch.set_num_threads(args.threads)
    result = pretokenize(args.data, args.tokenizers, args.out, batch_size=args.batch_size,
                         progress=not args.no_progress, overwrite=args.overwrite)
    splits = ", ".join(f"{k}: {v}" for k, v in result["splits"].items())
    print(f"tokenized {result['num_samples']} samples ({splits}) in {result['seconds']:.1f}s "
          f"({result['samples_per_second']:.0f} samples/s) into {result['out_dir']}")
    lengths = ", ".join(f"{k} {v}" for k, v in result["max_lengths"].items())
    if lengths:
        print(f"longest sequences (eos included): {lengths}")
    return 0
