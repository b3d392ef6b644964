"""``onemodel generate | caption | answer``: generation from a trained model on the command line.

    onemodel generate --model runs/shapes --input rgb=img.png --input caption="a red circle" \\
        --target depth --target semseg --out out/
    onemodel caption --model runs/shapes img1.png img2.png
    onemodel answer --model runs/shapes img.png --question "what color is the circle?"

``generate`` writes one file set per target into ``--out``: ``rgb.png``; ``depth.png`` (colourised) + ``depth.npy``
(metres); ``semseg.png`` (palette) + ``semseg.npy`` (class ids); ``det.png`` (boxes drawn on the input or generated
image) and, for every sequence target (caption, answer, question, det), ``outputs.json``.
"""

from __future__ import annotations

import argparse
import json
import logging
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = [
    "add_generate_arguments",
    "run_generate",
    "add_caption_arguments",
    "run_caption",
    "add_answer_arguments",
    "run_answer",
    "parse_input_pairs",
]


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="trained run directory (or its model/ directory)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--truncate", action="store_true",
                   help="cut text inputs longer than the model's max_length (with a warning) instead of failing")
    g = p.add_argument_group("sampling")
    g.add_argument("--steps", type=int, default=None, help="decoding steps for image-like targets (default 8)")
    g.add_argument("--schedule", choices=("maskgit", "random"), default=None, help="grid schedule (default maskgit)")
    g.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; default 0 for text and dense predictions, 1 for rgb")
    g.add_argument("--top-k", type=int, default=None, help="keep the k most likely tokens (0 = off)")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling threshold in (0, 1] (1 = off)")
    g.add_argument("--guidance-scale", type=float, default=None,
                   help="classifier-free guidance (1 = off, >1 follows the inputs more closely)")
    g.add_argument("--seed", type=int, default=0, help="random seed")


def _sampling_kwargs(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"seed": args.seed}
    if getattr(args, "truncate", False):
        out["truncate"] = True
    for name in ("steps", "schedule", "temperature", "top_k", "top_p", "guidance_scale"):
        value = getattr(args, name, None)
        if value is not None:
            out[name] = value
    return out


def _load_pipeline(args: argparse.Namespace):
    from onemodel.pipeline import OneModelPipeline

    return OneModelPipeline.from_pretrained(args.model, device=args.device)


# ------------------------------------------------------------------------------------------------ generate


def add_generate_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--input", action="append", default=[], metavar="MODALITY=VALUE",
                   help="an input: rgb=img.png, depth=depth.npy, semseg=seg.png, caption='a red circle', "
                        "question='...', det=boxes.json (repeatable)")
    p.add_argument("--target", action="append", default=[], metavar="MODALITY",
                   help="a modality to generate, in order (repeatable); each becomes an input of the next")
    p.add_argument("--out", required=True, help="output directory")
    _add_common(p)


def parse_input_pairs(pairs: list[str]) -> dict[str, str]:
    """``["rgb=a.png", "caption=a red circle"]`` -> ``{"rgb": "a.png", "caption": "a red circle"}``."""
    out: dict[str, str] = {}
    for item in pairs:
        if "=" not in item:
            raise ValueError(
                f"--input {item!r} must look like MODALITY=VALUE, e.g. rgb=img.png or caption='a red circle'"
            )
        name, value = item.split("=", 1)
        name = name.strip()
        if not name:
            raise ValueError(f"--input {item!r} has an empty modality name")
        if name in out:
            raise ValueError(f"--input {name} given twice; pass each modality once")
        out[name] = value
    return out


def _read_input_value(pipe, name: str, value: str) -> Any:
    """Command-line value -> what ``pipe.generate`` accepts (paths stay paths; det reads a JSON file or string)."""
    mod = pipe.modalities.get(name)
    if mod is None:
        return value  # pipe.generate names the valid modalities
    if name == "det":
        path = Path(value)
        text = path.read_text() if path.suffix == ".json" and path.is_file() else value
        try:
            return json.loads(text)
        except json.JSONDecodeError as err:
            raise ValueError(
                "det input must be a JSON file or string holding [{\"box\": [x0, y0, x1, y1], \"label\": ...}, ...]"
            ) from err
    if mod.is_grid:
        path = Path(value)
        if not path.is_file():
            raise FileNotFoundError(f"--input {name}={value}: file does not exist")
        return path
    return value


def write_outputs(pipe, result: dict[str, Any], inputs: dict[str, Any], out_dir: Path) -> list[Path]:
    """Write generated values as files (PNG / NPY / JSON) into ``out_dir``; return the written paths.

    All files are staged beside ``out_dir`` and moved in only when every one is complete (``io_atomic``): a
    failure (full disk, ...) leaves ``out_dir`` as it was and creates nothing."""
    import numpy as np
    from PIL import Image

    from onemodel.pipeline_inputs import colorize_depth, draw_boxes, palette_image
    from tokenizers_mm.io_atomic import atomic_directory, save_image, save_npy, write_json

    names: list[str] = []
    text_out: dict[str, Any] = {}
    with atomic_directory(out_dir) as tmp:
        for name, value in result.items():
            if name == "rgb":
                save_image(tmp / "rgb.png", value)
                names.append("rgb.png")
            elif name == "depth":
                save_npy(tmp / "depth.npy", value)
                save_image(tmp / "depth.png", colorize_depth(value))
                names += ["depth.npy", "depth.png"]
            elif name == "semseg":
                save_npy(tmp / "semseg.npy", value)
                save_image(tmp / "semseg.png", palette_image(value))
                names += ["semseg.npy", "semseg.png"]
            elif name == "det":
                text_out[name] = value
                if "rgb" in result:
                    base = result["rgb"]
                elif "rgb" in inputs:
                    base = Image.fromarray(pipe.load_image(inputs["rgb"]))
                else:
                    size = pipe.image_size
                    base = Image.new("RGB", (size, size))
                save_image(tmp / "det.png", draw_boxes(base, value))
                names.append("det.png")
            elif isinstance(value, np.ndarray):
                save_npy(tmp / f"{name}.npy", value)
                names.append(f"{name}.npy")
            elif isinstance(value, Image.Image):
                save_image(tmp / f"{name}.png", value)
                names.append(f"{name}.png")
            else:
                text_out[name] = value
        if text_out:
            write_json(tmp / "outputs.json", text_out)
            names.append("outputs.json")
    return [out_dir / n for n in names]


def run_generate(args: argparse.Namespace) -> int:
    if not args.target:
        raise ValueError("pass at least one --target MODALITY (e.g. --target depth)")
    raw_inputs = parse_input_pairs(args.input)
    from tokenizers_mm.io_atomic import check_output_dir

    check_output_dir(args.out, what="--out directory")  # fail before loading the model
    pipe = _load_pipeline(args)
    inputs = {name: _read_input_value(pipe, name, value) for name, value in raw_inputs.items()}
    result = pipe.generate(inputs=inputs, targets=list(args.target), **_sampling_kwargs(args))
    written = write_outputs(pipe, result, inputs, Path(args.out))
    for name, value in result.items():
        if isinstance(value, str):
            print(f"{name}: {value}")
    print(f"wrote {len(written)} file(s) to {args.out}: {', '.join(p.name for p in written)}")
    return 0


# ------------------------------------------------------------------------------------------------- caption


def add_caption_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("images", nargs="+", help="image files")
    p.add_argument("--batch-size", type=int, default=16, help="images per forward pass")
    _add_common(p)


def run_caption(args: argparse.Namespace) -> int:
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    pipe = _load_pipeline(args)
    kwargs = _sampling_kwargs(args)
    for start in range(0, len(args.images), args.batch_size):
        paths = args.images[start : start + args.batch_size]
        captions = pipe.caption(list(paths), **kwargs)
        for path, caption in zip(paths, captions):
            print(f"{path}\t{caption}" if len(args.images) > 1 else caption)
    return 0


# -------------------------------------------------------------------------------------------------- answer


def add_answer_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("image", help="image file")
    p.add_argument("--question", action="append", required=True, help="a question (repeatable)")
    _add_common(p)


def run_answer(args: argparse.Namespace) -> int:
    questions = list(args.question)
    for i, q in enumerate(questions):
        if not q.strip():
            raise ValueError(f"question {i} is empty; ask something, e.g. 'what color is the circle?'")
    pipe = _load_pipeline(args)
    answers = pipe.answer([args.image] * len(questions), questions, **_sampling_kwargs(args))
    for q, a in zip(questions, answers):
        print(f"{q}\t{a}" if len(questions) > 1 else a)
    return 0
