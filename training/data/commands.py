"""``onemodel data``: make datasets.

    onemodel data shapes --out data/shapes --num 10000 --resolution 64
    onemodel data convert --images my_folder --out data/mine --resolution 64
"""

from __future__ import annotations

import argparse
import time


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="data_command", metavar="{shapes,convert}")
    p = sub.add_parser(
        "shapes",
        help="generate the synthetic shapes dataset (train/val/test shards + meta.json)",
        description="Generate the synthetic shapes dataset: DIR/train, DIR/val, DIR/test webdataset shards and "
        "DIR/meta.json. Deterministic: sample i of a split always has the same seed. An existing complete "
        "dataset with the same settings is kept (use --force to regenerate).",
    )
    p.add_argument("--out", required=True, help="output dataset directory")
    p.add_argument("--num", type=int, default=10000, help="training samples (default 10000)")
    p.add_argument("--num-val", type=int, default=None, help="validation samples (default: num / 10, at least 1)")
    p.add_argument("--num-test", type=int, default=None, help="test samples (default: num / 10, at least 1)")
    p.add_argument("--resolution", type=int, default=64, help="image side in pixels (default 64)")
    p.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard (default 1000)")
    p.add_argument("--force", action="store_true", help="regenerate even if an identical dataset exists")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")

    c = sub.add_parser(
        "convert",
        help="convert an image folder (Hugging Face imagefolder + metadata.jsonl) to shards",
        description="Convert an image folder with metadata.jsonl or metadata.csv (file_name + optional "
        "caption/text, qa, depth_file, semseg_file, boxes) into webdataset shards + meta.json. Hugging Face split "
        "folders (IMAGES/train/, IMAGES/validation/, IMAGES/test/) are converted each into OUT/<split> "
        "(validation -> val), never merged. Bad rows are skipped and listed.",
    )
    c.add_argument("--images", required=True, help="image folder (with metadata.jsonl), or one with split folders")
    c.add_argument("--out", required=True, help="output directory for the shards")
    c.add_argument("--resolution", type=int, default=None, help="resize to RxR (shorter side + centre crop)")
    c.add_argument("--samples-per-shard", type=int, default=1000, help="samples per tar shard (default 1000)")
    c.add_argument("--overwrite", action="store_true", help="replace shards already in --out")
    c.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(_data_parser=parser)


def _human(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GB"


def _run_shapes(args: argparse.Namespace) -> int:
    from training.data.shapes import make_shapes_dataset

    default_eval = max(1, args.num // 10)
    num_val = default_eval if args.num_val is None else args.num_val
    num_test = default_eval if args.num_test is None else args.num_test
    start = time.perf_counter()
    meta = make_shapes_dataset(
        args.out,
        num_train=args.num,
        num_val=num_val,
        num_test=num_test,
        resolution=args.resolution,
        samples_per_shard=args.samples_per_shard,
        force=args.force,
        progress=not args.no_progress,
    )
    seconds = time.perf_counter() - start
    splits = ", ".join(f"{k} {v}" for k, v in meta["splits"].items())
    if meta["cached"]:
        print(f"shapes dataset already complete in {args.out} ({splits}); nothing to do (use --force to regenerate)")
        return 0
    print(
        f"wrote shapes dataset to {args.out}: {splits} samples at {meta['resolution']}x{meta['resolution']}, "
        f"{len(meta['shards'])} shard(s), {_human(meta['bytes'])}, {seconds:.1f} s"
    )
    return 0


def _run_convert(args: argparse.Namespace) -> int:
    from training.data.convert import convert_dataset

    start = time.perf_counter()
    reports = convert_dataset(
        args.images,
        args.out,
        resolution=args.resolution,
        samples_per_shard=args.samples_per_shard,
        overwrite=args.overwrite,
        progress=not args.no_progress,
    )
    for split, report in reports.items():
        if split != "all":
            print(f"split {split}:")
        print(report.summary())
    print(f"done in {time.perf_counter() - start:.1f} s")
    return 0


def run(args: argparse.Namespace) -> int:
    if args.data_command == "shapes":
        return _run_shapes(args)
    if args.data_command == "convert":
        return _run_convert(args)
    args._data_parser.print_help()
    return 2
