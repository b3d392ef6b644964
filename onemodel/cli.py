"""The ``onemodel`` command.

The CLI is the project's composition root: each subcommand lives in the module that owns the work and exposes
``add_arguments(parser)`` and ``run(args) -> int``. Modules are imported when the parser is built, so they keep
heavy imports (torch, ...) inside ``run``.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

# name -> (module, one-line help)
COMMANDS: dict[str, tuple[str, str]] = {
    "demo": ("training.demo", "run the whole path on the synthetic shapes data: data, tokenizers, model, eval, report"),
    "fit": ("training.fit", "train one model for every task of your own image folder: data, tokenizers, model, eval"),
    "data": ("training.data.commands", "make datasets: synthetic shapes shards, or convert an image folder"),
    "train-tokenizer": ("training.tokenizer_commands", "train a modality tokenizer (rgb, depth, semseg, text)"),
    "tokenize": ("training.tokenize_commands", "pre-tokenize raw shards into token shards"),
    "train": ("training.train", "train one model on all tasks from a config"),
    "train-clip": ("training.train_clip", "train a contrastive image-text encoder (CLIP / SigLIP) from a config"),
    "train-vlm": ("training.train_vlm", "train a VLM: frozen vision encoder + mapper + frozen causal LM (2 stages)"),
    "generate": ("onemodel.generate_commands", "any-to-any generation from a trained model"),
    "caption": ("onemodel.generate_commands", "caption images"),
    "answer": ("onemodel.generate_commands", "answer a question about an image"),
    "eval": ("training.evaluation.commands", "score a trained model on every task"),
    "serve": ("onemodel.web", "web demo (Gradio) of a trained model: pip install -e \".[web]\""),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onemodel", description="One any-to-any multimodal model (4M-style).")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name, (module_name, help_text) in COMMANDS.items():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as err:
            if err.name != module_name:
                raise
            continue  # command not built in this checkout
        p = sub.add_parser(name, help=help_text, description=help_text)
        suffix = name.replace("-", "_")
        if hasattr(module, f"add_{suffix}_arguments"):  # one module serving several subcommands
            add, runner = getattr(module, f"add_{suffix}_arguments"), getattr(module, f"run_{suffix}")
        else:
            add, runner = module.add_arguments, module.run
        add(p)
        p.set_defaults(_run=runner)
    return parser


# count arguments of every subcommand (argparse dest -> smallest valid value); checked before any work
COUNT_ARGS: dict[str, int] = {
    "num": 1, "samples_per_shard": 1, "batch_size": 1, "steps": 1, "threads": 1, "limit": 1, "resolution": 1,
    "vocab_size": 1, "num_val": 0, "num_test": 0, "examples": 0, "diffusion_steps": 0, "top_k": 0,
}


def check_counts(args: argparse.Namespace) -> None:
    """``ValueError`` for a count argument below its minimum (e.g. ``data shapes --num 0``)."""
    for dest, low in COUNT_ARGS.items():
        value = getattr(args, dest, None)
        if isinstance(value, int) and not isinstance(value, bool) and value < low:
            raise ValueError(f"--{dest.replace('_', '-')} must be >= {low}, got {value}")


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    # KEY=VALUE overrides may come after options (`fit DATA --out X optim.max_steps=9`): argparse leaves them over
    if extra and isinstance(getattr(args, "overrides", None), list) and all("=" in e and not e.startswith("-") for e in extra):
        args.overrides += extra
    elif extra:
        parser.error("unrecognized arguments: " + " ".join(extra))
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        check_counts(args)
        return int(args._run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as err:
        # User mistakes: one clear line, no traceback (use -v for the traceback).
        if args.verbose:
            raise
        print(f"onemodel {args.command}: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:
        # Disk and permission problems not already reported as an OutputPathError (a ValueError): one line too.
        import errno

        if args.verbose or err.errno not in (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM,
                                             errno.EEXIST, errno.ENOTDIR, errno.EISDIR, errno.EFBIG):
            raise
        where = f" ({err.filename})" if err.filename else ""
        print(f"onemodel {args.command}: error: {err.strerror}{where}; check the path and free space, "
              "or choose another path", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
