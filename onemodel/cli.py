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
    "data": ("training.data.commands", "make datasets: synthetic shapes shards, or convert an image folder"),
    "train-tokenizer": ("training.tokenizer_commands", "train a modality tokenizer (rgb, depth, semseg, text)"),
    "tokenize": ("training.tokenize_commands", "pre-tokenize raw shards into token shards"),
    "train": ("training.train", "train one model on all tasks from a config"),
    "train-vlm": ("training.train_vlm", "train a VLM: frozen vision encoder + mapper + frozen causal LM (2 stages)"),
    "generate": ("onemodel.generate_commands", "any-to-any generation from a trained model"),
    "caption": ("onemodel.generate_commands", "caption images"),
    "answer": ("onemodel.generate_commands", "answer a question about an image"),
    "eval": ("training.evaluation.commands", "score a trained model on every task"),
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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        datefmt="%H:%M:%S",
    )
    if not getattr(args, "_run", None):
        parser.print_help()
        return 2
    try:
        return int(args._run(args) or 0)
    except (ValueError, TypeError, FileNotFoundError) as err:
        # User mistakes: one clear line, no traceback (use -v for the traceback).
        if args.verbose:
            raise
        print(f"onemodel {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
