"""``onemodel serve``: a Gradio web demo over a pipeline, loaded once.

    onemodel serve --model runs/demo/run                    # http://127.0.0.1:7860
    onemodel serve --model runs/demo/run --port 8080 --host 0.0.0.0

Tabs follow the pipeline's methods, so the same app serves any pipeline kind: Caption (``caption``), Ask
(``answer``), Depth (``depth``), Segmentation (``segment``), Detection (``detect``, boxes drawn on the input),
Text to image (``text_to_image`` / ``generate``, optionally chained through semseg and depth) and Any to any
(``generate``). A tab whose method the pipeline lacks (or whose modalities the model does not have) is left out.
Every request shows how long it took; a bad input shows the pipeline's one-line error in the page.

Example inputs come from the held-out split of the run's data (found through ``train_config.json`` -> token
shards -> their raw source; ``--examples`` names a split, a shard or an image folder instead).

Gradio is an optional dependency (``pip install -e ".[web]"``), imported only when the app is built.
"""

from __future__ import annotations

import argparse
import io
import json
import logging
import os
import tarfile
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

logger = logging.getLogger(__name__)

__all__ = ["Example", "find_examples", "load_examples", "build_app", "add_arguments", "run"]

DISPLAY_SIZE = 256  # small model images (64 px) are shown enlarged, pixel-exact
GRID_OUTPUTS = ("rgb", "depth", "semseg", "det")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp")
# small input images fill their box, pixel-exact (the model sees them at their own size anyway)
EMPTY_TEXT = "(empty: the model ended the text at once)"
CSS = ".pixelated img { width: 100%; height: 100%; object-fit: contain; image-rendering: pixelated; }"


# ------------------------------------------------------------------------------------------------ examples


@dataclass
class Example:
    """One held-out sample shown as a clickable example: its image file, caption and questions."""

    image: str
    caption: str | None = None
    questions: list[str] = field(default_factory=list)


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def find_examples(model_path: str | Path) -> Path | None:
    """The held-out raw split of the data a run was trained on, or None.

    ``train_config.json`` (in the run or its ``model/``) names the token shards; their ``meta.json`` names the raw
    shards they came from; the ``test`` split (else ``val``) of those is returned.
    """
    path = Path(model_path)
    for cfg_path in (path / "train_config.json", path / "model" / "train_config.json"):
        cfg = _read_json(cfg_path)
        if not isinstance(cfg, dict):
            continue
        sources = (cfg.get("data") or {}).get("sources") or []
        for source in sources:
            src = Path(str(source.get("path", ""))) if isinstance(source, dict) else None
            if src is None:
                continue
            # a relative path is relative to where training ran: try the cwd, then the run dir and its parents
            for cand in (src, *(d / src for d in (path.resolve(), *path.resolve().parents))):
                meta = _read_json(cand / "meta.json")
                raw = Path(meta["source"]) if isinstance(meta, dict) and meta.get("source") else cand
                for split in ("test", "val"):
                    if (raw / split).is_dir() and any((raw / split).glob("*.tar")):
                        return raw / split
    return None


def _tar_samples(tar_path: Path, limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` samples with an ``rgb`` image of a raw shard: {"rgb": bytes, "caption": str, "qa": [...]}."""
    samples: dict[str, dict[str, Any]] = {}
    order: list[str] = []
    with tarfile.open(tar_path) as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            key, _, ext = base.partition(".")
            if ext not in ("rgb.png", "rgb.jpg", "caption.txt", "qa.json"):
                continue
            data = tar.extractfile(member).read()
            if key not in samples:
                if len(order) >= limit:
                    break
                samples[key] = {}
                order.append(key)
            samples[key][ext.split(".")[0]] = data
    out = []
    for key in order:
        s = samples[key]
        if "rgb" not in s:
            continue
        qa = json.loads(s["qa"]) if "qa" in s else []
        out.append({"key": key, "rgb": s["rgb"], "caption": s.get("caption", b"").decode().strip() or None,
                    "qa": qa if isinstance(qa, list) else []})
    return out


def load_examples(source: str | Path, out_dir: str | Path, limit: int = 6) -> list[Example]:
    """Up to ``limit`` examples from raw shards (a split directory, a dataset directory or one ``.tar``) or from an
    image folder; images are written as PNG files into ``out_dir`` (Gradio serves files, not bytes)."""
    from PIL import Image

    src, out = Path(source), Path(out_dir)
    if not src.exists():
        raise FileNotFoundError(f"--examples {str(src)!r} does not exist")
    out.mkdir(parents=True, exist_ok=True)
    if src.is_file():
        tars = [src] if src.suffix == ".tar" else []
    else:
        split = next((src / s for s in ("test", "val") if (src / s).is_dir()), src)
        tars = sorted(split.glob("*.tar"))
    examples: list[Example] = []
    if tars:
        for tar in tars:
            for s in _tar_samples(tar, limit - len(examples)):
                path = out / f"{s['key']}.png"
                Image.open(io.BytesIO(s["rgb"])).convert("RGB").save(path)
                questions = [q["question"] for q in s["qa"] if isinstance(q, dict) and q.get("question")]
                examples.append(Example(str(path), s["caption"], questions[:3]))
            if len(examples) >= limit:
                break
    elif src.is_dir():
        for img in sorted(p for p in src.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)[:limit]:
            path = out / f"{img.stem}.png"
            Image.open(img).convert("RGB").save(path)
            examples.append(Example(str(path)))
    if not examples:
        raise ValueError(
            f"no examples in {str(src)!r}: pass a directory of raw shards (onemodel data ...), a .tar shard "
            "or a folder of images"
        )
    return examples


# ------------------------------------------------------------------------------------------------ helpers


def _enlarge(image: Any):
    """A PIL image scaled up (nearest) so its longer side is at least DISPLAY_SIZE."""
    from PIL import Image

    img = image if isinstance(image, Image.Image) else Image.fromarray(image)
    scale = max(1, DISPLAY_SIZE // max(img.size))
    return img.resize((img.width * scale, img.height * scale), Image.NEAREST) if scale > 1 else img


def _boxes_image(base: Any, boxes: list[dict[str, Any]]):
    """Boxes drawn on the enlarged image (coordinates scaled with it), so labels stay readable."""
    from onemodel.pipeline_inputs import draw_boxes

    big = _enlarge(base)
    sx, sy = big.width / base.width, big.height / base.height
    scaled = [{**b, "box": [b["box"][0] * sx, b["box"][1] * sy, b["box"][2] * sx, b["box"][3] * sy]} for b in boxes]
    return draw_boxes(big, scaled)


def _display(name: str, value: Any, base: Any = None):
    """A generated value -> an image to show (None for text outputs)."""
    from PIL import Image

    from onemodel.pipeline_inputs import colorize_depth, palette_image

    if name == "rgb":
        return _enlarge(value)
    if name == "depth":
        return _enlarge(colorize_depth(value))
    if name == "semseg":
        return _enlarge(palette_image(value))
    if name == "det":
        return _boxes_image(base if base is not None else Image.new("RGB", (DISPLAY_SIZE, DISPLAY_SIZE)), value)
    return None


def _shown_text(text: str) -> str:
    return text if text.strip() else EMPTY_TEXT


def _need_image(image: Any) -> Any:
    if image is None:
        raise ValueError("no image: upload one (or click an example) first")
    return image


def _timed(fn: Callable[..., tuple], n_outputs: int) -> Callable[..., tuple]:
    """Run ``fn``; return its outputs plus a status line: the time it took, or the one-line error."""

    def wrapper(*args: Any) -> tuple:
        start = time.perf_counter()
        try:
            outputs = fn(*args)
        except (ValueError, TypeError, FileNotFoundError) as err:  # user mistakes: the pipeline's own message
            return (*([None] * n_outputs), f"**error:** {err}")
        except Exception as err:  # a bug: one line in the page, the traceback in the server log
            logger.exception("request failed")
            line = f"**error:** internal error ({type(err).__name__}: {err}); see the server log"
            return (*([None] * n_outputs), line)
        return (*outputs, f"done in {time.perf_counter() - start:.2f} s")

    return wrapper


def _image(gr: Any, elem_id: str, label: str = "image", **kw: Any):
    """An image box (input or output) whose small images are shown enlarged and pixel-exact."""
    return gr.Image(type="pil", label=label, elem_id=elem_id, elem_classes=["pixelated"], height=DISPLAY_SIZE, **kw)


def _supports(pipe: Any, method: str, modalities: tuple[str, ...] = ()) -> bool:
    """The pipeline has ``method`` and (when it declares its modalities) every one of ``modalities``."""
    if not callable(getattr(pipe, method, None)):
        return False
    known = getattr(pipe, "modalities", None)
    return known is None or all(m in known for m in modalities)


# ------------------------------------------------------------------------------------------------ the app


def build_app(pipe: Any, examples: list[Example] | None = None, title: str = "onemodel"):
    """The Gradio ``Blocks`` app over ``pipe`` (any object with some of the pipeline methods); serve it with
    ``app.launch(css=CSS)``."""
    import gradio as gr

    examples = examples or []
    images = [e.image for e in examples]
    captions = [e.caption for e in examples if e.caption]
    qa_examples = [[e.image, q] for e in examples for q in e.questions[:1]]
    modalities = list(getattr(pipe, "modalities", {}) or {})

    def status(name: str):
        return gr.Markdown("", elem_id=f"status-{name}")

    with gr.Blocks(title=title) as app:
        gr.Markdown(f"# {title}\nOne model, many tasks. Pick a tab, upload an image or click an example, run.")

        if _supports(pipe, "caption", ("rgb", "caption")):
            with gr.Tab("Caption", id="caption"):
                with gr.Row():
                    img = _image(gr, "caption-image")
                    with gr.Column():
                        out = gr.Textbox(label="caption", elem_id="caption-output", interactive=False)
                        st = status("caption")
                btn = gr.Button("Caption", variant="primary", elem_id="caption-button")
                btn.click(_timed(lambda im: (_shown_text(pipe.caption(_need_image(im))),), 1), [img], [out, st],
                          api_name="caption")
                if images:
                    gr.Examples([[p] for p in images], [img], label="held-out examples")

        if _supports(pipe, "answer", ("rgb", "question", "answer")):
            with gr.Tab("Ask", id="ask"):
                with gr.Row():
                    img = _image(gr, "ask-image")
                    with gr.Column():
                        q = gr.Textbox(label="question", placeholder="what color is the circle?",
                                       elem_id="ask-question")
                        out = gr.Textbox(label="answer", elem_id="ask-output", interactive=False)
                        st = status("ask")
                btn = gr.Button("Ask", variant="primary", elem_id="ask-button")
                ask = _timed(lambda im, text: (_shown_text(pipe.answer(_need_image(im), text)),), 1)
                btn.click(ask, [img, q], [out, st], api_name="answer")
                if qa_examples:
                    gr.Examples(qa_examples, [img, q], label="held-out examples")

        for method, target, label in (("depth", "depth", "Depth"), ("segment", "semseg", "Segmentation"),
                                      ("detect", "det", "Detection")):
            if not _supports(pipe, method, ("rgb", target)):
                continue
            with gr.Tab(label, id=method):
                with gr.Row():
                    img = _image(gr, f"{method}-image")
                    out = _image(gr, f"{method}-output", label=label.lower(), format="png")
                extra = gr.JSON(label="boxes", elem_id="detect-boxes") if method == "detect" else None
                st = status(method)
                btn = gr.Button(label, variant="primary", elem_id=f"{method}-button")

                def dense(im, method=method, target=target):
                    im = _need_image(im)
                    value = getattr(pipe, method)(im)
                    shown = _display(target, value, base=im.convert("RGB"))
                    return (shown, value) if method == "detect" else (shown,)

                outs = [out, extra] if extra is not None else [out]
                btn.click(_timed(dense, len(outs)), [img], [*outs, st], api_name=method)
                if images:
                    gr.Examples([[p] for p in images], [img], label="held-out examples")

        t2i = _supports(pipe, "text_to_image", ("caption", "rgb")) or _supports(pipe, "generate", ("caption", "rgb"))
        if t2i:
            chain_choices = [m for m in ("semseg", "depth") if m in modalities]
            with gr.Tab("Text to image", id="text_to_image"):
                with gr.Row():
                    with gr.Column():
                        prompt = gr.Textbox(label="prompt", placeholder="a large red circle", elem_id="t2i-prompt")
                        steps = gr.Slider(1, 64, value=8, step=1, label="steps")
                        guidance = gr.Slider(1.0, 8.0, value=3.0, step=0.5, label="guidance scale")
                        seed = gr.Number(0, precision=0, label="seed")
                        via = gr.CheckboxGroup(chain_choices, label="generate first, then draw from them (chained)")
                    with gr.Column():
                        out = _image(gr, "t2i-output", format="png")
                        chained = gr.Gallery(label="chained", elem_id="t2i-chained", height=DISPLAY_SIZE, columns=2,
                                             format="png")
                        st = status("t2i")
                btn = gr.Button("Generate", variant="primary", elem_id="t2i-button")

                def text_to_image(p, n_steps, g, s, chain):
                    if not isinstance(p, str) or not p.strip():
                        raise ValueError("the prompt is empty; describe the image, e.g. 'a large red circle'")
                    kw = {"steps": int(n_steps), "guidance_scale": float(g), "seed": int(s or 0)}
                    chain = [m for m in chain_choices if m in (chain or [])]
                    if chain or not _supports(pipe, "text_to_image"):
                        res = pipe.generate({"caption": p}, [*chain, "rgb"], **kw)
                        return _display("rgb", res["rgb"]), [(_display(m, res[m]), m) for m in chain]
                    return _display("rgb", pipe.text_to_image(p, **kw)), []

                btn.click(_timed(text_to_image, 2), [prompt, steps, guidance, seed, via], [out, chained, st],
                          api_name="text_to_image")
                if captions:
                    gr.Examples([[c] for c in captions], [prompt], label="held-out captions")

        if _supports(pipe, "generate") and modalities:
            _any_to_any_tab(gr, pipe, modalities, examples)
    return app


def _any_to_any_tab(gr: Any, pipe: Any, modalities: list[str], examples: list[Example]) -> None:
    """Pick input modalities and fill them, pick targets (in order: each becomes an input of the next), run."""
    specs = pipe.modalities if isinstance(pipe.modalities, dict) else {}  # {name: Modality}, or just names
    grid_like = {n for n in modalities if getattr(specs.get(n), "is_grid", n in ("rgb", "depth", "semseg"))}
    with gr.Tab("Any to any", id="any"):
        with gr.Row():
            with gr.Column():
                use = gr.CheckboxGroup(modalities, value=["rgb"] if "rgb" in modalities else [], label="inputs",
                                       elem_id="any-inputs")
                fields: dict[str, Any] = {}
                for name in modalities:
                    if name == "rgb":
                        fields[name] = _image(gr, "any-rgb", label="rgb")
                    elif name in grid_like:
                        types = [".npy"] if name == "depth" else [".npy", ".png"]  # depth: metres, .npy
                        fields[name] = gr.File(label=f"{name} ({' or '.join(types)})", file_types=types,
                                               elem_id=f"any-{name}")
                    elif name == "det":
                        fields[name] = gr.Textbox(label='det (JSON: [{"box": [x0, y0, x1, y1], "label": "circle"}])',
                                                  elem_id="any-det")
                    else:
                        fields[name] = gr.Textbox(label=name, elem_id=f"any-{name}")
            with gr.Column():
                targets = gr.Dropdown(modalities, value=[], multiselect=True, elem_id="any-targets",
                                      label="targets, in order (each finished one becomes an input of the next)")
                steps = gr.Slider(1, 64, value=8, step=1, label="steps (image-like targets)")
                temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.1, label="temperature (0 = greedy; rgb uses 1)")
                seed = gr.Number(0, precision=0, label="seed")
                btn = gr.Button("Run", variant="primary", elem_id="any-button")
                gallery = gr.Gallery(label="image outputs", elem_id="any-images", height=DISPLAY_SIZE, columns=2,
                                     format="png")
                texts = gr.JSON(label="text outputs", elem_id="any-texts")
                st = gr.Markdown("", elem_id="status-any")

        def any_to_any(chosen, wanted, n_steps, temp, s, *values):
            given = dict(zip(modalities, values))
            if not chosen:
                raise ValueError("no inputs picked: tick at least one input modality and fill it")
            if not wanted:
                raise ValueError("no targets picked: choose at least one modality to generate")
            inputs: dict[str, Any] = {}
            for name in chosen:
                value = given[name]
                if value is None or (isinstance(value, str) and not value.strip()):
                    raise ValueError(f"input {name!r} is ticked but empty: fill it or untick it")
                if name == "det":
                    try:
                        value = json.loads(value)
                    except json.JSONDecodeError:
                        raise ValueError(
                            'det input must be JSON like [{"box": [0, 0, 10, 10], "label": "circle"}]'
                        ) from None
                elif name in grid_like and name != "rgb":
                    value = value if isinstance(value, str) else getattr(value, "name", value)
                inputs[name] = value
            kw: dict[str, Any] = {"steps": int(n_steps), "seed": int(s or 0)}
            per_target = {t: {"temperature": float(temp)} for t in wanted if t != "rgb"}
            res = pipe.generate(inputs, list(wanted), per_target=per_target or None, **kw)
            base = inputs.get("rgb")
            if "rgb" in res:
                base = res["rgb"]
            base = pipe.load_image(base) if base is not None and hasattr(pipe, "load_image") else base
            from PIL import Image

            base = Image.fromarray(base) if base is not None and not isinstance(base, Image.Image) else base
            shown = [(_display(n, v, base=base), n) for n, v in res.items() if n in GRID_OUTPUTS]
            text = {n: v for n, v in res.items() if n not in GRID_OUTPUTS or n == "det"}
            return shown, text

        btn.click(_timed(any_to_any, 2), [use, targets, steps, temperature, seed, *fields.values()],
                  [gallery, texts, st], api_name="generate")
        rows = [[e.image, e.caption or ""] for e in examples if "caption" in fields]
        if rows and "rgb" in fields:
            gr.Examples(rows[:4], [fields["rgb"], fields["caption"]], label="held-out examples")


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", required=True, help="trained run directory (or its model/ directory)")
    p.add_argument("--port", type=int, default=7860, help="port to listen on (default 7860)")
    p.add_argument("--host", default="127.0.0.1", help="interface (default 127.0.0.1; 0.0.0.0 for every interface)")
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--examples", default=None,
                   help="raw shards or an image folder to take examples from (default: the run's held-out split)")
    p.add_argument("--num-examples", type=int, default=6, help="how many examples to show (default 6)")
    p.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")


def load_pipeline(path: str | Path, device: str | None = None) -> Any:
    """The pipeline for a run directory."""
    from onemodel.pipeline import OneModelPipeline

    return OneModelPipeline.from_pretrained(path, device=device)


def run(args: argparse.Namespace) -> int:
    if not 0 < args.port < 65536:
        raise ValueError(f"--port must be in 1..65535, got {args.port}")
    if args.num_examples < 0:
        raise ValueError(f"--num-examples must be >= 0, got {args.num_examples}")
    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ModuleNotFoundError:
        raise ValueError('the web demo needs gradio: pip install -e ".[web]"') from None
    import socket

    import torch

    with socket.socket() as probe:  # fail before loading the model, not after
        try:
            probe.bind((args.host, args.port))
        except OSError as err:
            raise ValueError(f"cannot listen on {args.host}:{args.port} ({err.strerror}); pass another --port") from None
    if args.threads:
        torch.set_num_threads(args.threads)
    pipe = load_pipeline(args.model, args.device)
    example_dir = Path(tempfile.mkdtemp(prefix="onemodel-examples-"))
    source = Path(args.examples) if args.examples else find_examples(args.model)
    examples: list[Example] = []
    if source is None:
        logger.info("no held-out data found for %s; pass --examples DIR to show examples", args.model)
    elif args.num_examples:
        examples = load_examples(source, example_dir, args.num_examples)
        logger.info("%d example(s) from %s", len(examples), source)
    app = build_app(pipe, examples, title=f"onemodel: {args.model}")
    url = f"http://{args.host}:{args.port}"
    print(f"serving {args.model} at {url} (Ctrl-C to stop)", flush=True)
    try:
        app.launch(server_name=args.host, server_port=args.port, allowed_paths=[str(example_dir)], ssr_mode=False,
                   quiet=True, footer_links=["api"], css=CSS)
    except OSError as err:
        raise ValueError(f"cannot listen on {args.host}:{args.port} ({err}); pass another --port") from None
    return 0
