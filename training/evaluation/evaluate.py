"""Score a pipeline on every task of a held-out split: the engine behind ``onemodel eval`` and the demo.

The pipeline is anything with the task methods of ``onemodel.pipeline.OneModelPipeline`` (each takes a list
and returns a list): ``caption(images)``, ``answer(images, questions)``, ``depth(images)`` (metres),
``segment(images)`` (class ids), ``detect(images)`` (``[{"box", "label", "score"}]`` per image),
``text_to_image(prompts)`` (PIL images or uint8 arrays), and optionally ``tokenizers`` (a
``TokenizerBundle``), ``modalities`` (names the model knows; tasks it cannot do are skipped) and ``tasks`` (the
task names it can do, e.g. a VLM's ``("caption", "vqa")``).

    from onemodel.pipeline import OneModelPipeline
    from training.evaluation.evaluate import evaluate
    from training.evaluation.report import write_report

    ev = evaluate(OneModelPipeline.from_pretrained("runs/demo"), "data/shapes", limit=200)
    write_report("runs/demo/report", ev.results, ev.examples, "runs/demo/metrics.jsonl")
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from training.evaluation import judge, metrics

__all__ = ["TASKS", "Evaluation", "evaluate", "evaluate_samples", "evaluate_tokenizers", "available_tasks"]

logger = logging.getLogger(__name__)

TASKS: tuple[str, ...] = ("caption", "vqa", "depth", "semseg", "detection", "text_to_image", "tokenizers")
# What each task needs in a raw sample, and which model modalities it uses.
_NEEDS_DATA = {
    "caption": ("rgb", "caption"),
    "vqa": ("rgb", "qa"),
    "depth": ("rgb", "depth"),
    "semseg": ("rgb", "semseg"),
    "detection": ("rgb", "boxes"),
    "text_to_image": ("rgb", "caption", "scene"),
    "tokenizers": (),
}
_NEEDS_MODEL = {
    "caption": ("rgb", "caption"),
    "vqa": ("rgb", "question", "answer"),
    "depth": ("rgb", "depth"),
    "semseg": ("rgb", "semseg"),
    "detection": ("rgb", "det"),
    "text_to_image": ("caption", "rgb"),
    "tokenizers": (),
}
_TOKENIZED = ("rgb", "depth", "semseg")


@dataclass
class Evaluation:
    """results: ``{name: {metric: value}}`` (JSON-serialisable; see ``docs/evaluation.md``);
    examples: ``{task: [example]}`` in the format of ``training.evaluation.report.write_report``."""

    results: dict[str, dict[str, Any]] = field(default_factory=dict)
    examples: dict[str, list[dict[str, Any]]] = field(default_factory=dict)


def _has_tokenizers(pipeline: Any) -> bool:
    toks = getattr(pipeline, "tokenizers", None)
    return toks is not None and any(m in toks for m in _TOKENIZED)


def missing_data(task: str, sample: dict[str, Any]) -> list[str]:
    """What ``task`` needs in a raw sample that ``sample`` lacks (empty: the sample carries its ground truth)."""
    return [k for k in _NEEDS_DATA[task] if k not in sample]


def available_tasks(pipeline: Any, samples: Sequence[dict[str, Any]]) -> list[str]:
    """The tasks of :data:`TASKS` that the samples carry ground truth for and the pipeline can do."""
    model_mods = getattr(pipeline, "modalities", None)
    supported = getattr(pipeline, "tasks", None)  # a pipeline may name its tasks (a VLM: caption, vqa)
    out = []
    for task in TASKS:
        if supported is not None and task not in supported:
            continue
        if task == "tokenizers":
            if _has_tokenizers(pipeline):
                out.append(task)
            continue
        if not samples or missing_data(task, samples[0]):
            continue
        if model_mods is not None and not all(m in model_mods for m in _NEEDS_MODEL[task]):
            continue
        out.append(task)
    return out


def _batched(fn: Callable[[list, int], list], items: list, batch_size: int, desc: str, progress: bool) -> list:
    """Call ``fn(chunk, offset)`` on consecutive chunks of ``items``; concatenate the returned lists."""
    out: list = []
    for start in tqdm(range(0, len(items), batch_size), desc=desc, disable=not progress, unit="batch"):
        chunk = items[start : start + batch_size]
        result = fn(chunk, start)
        if not isinstance(result, (list, tuple)) or len(result) != len(chunk):
            raise TypeError(
                f"{desc}: the pipeline returned {type(result).__name__} for {len(chunk)} inputs; expected a list"
            )
        out.extend(result)
    return out


def _as_uint8(image: Any) -> np.ndarray:
    a = np.asarray(image.convert("RGB")) if hasattr(image, "convert") else np.asarray(image)
    if np.issubdtype(a.dtype, np.floating):
        a = np.clip(np.round(a * 255.0 if a.max() <= 1.0 else a), 0, 255)
    return a.astype(np.uint8)


def _describe(objects: list[dict[str, Any]]) -> str:
    return ", ".join(f"{o['size']} {o['color']} {o['shape']}" for o in objects) or "nothing"


def evaluate_samples(
    pipeline: Any,
    samples: Sequence[dict[str, Any]],
    tasks: Sequence[str] | None = None,
    *,
    semseg_classes: Sequence[str] | None = None,
    box_classes: Sequence[str] | None = None,
    num_examples: int = 4,
    batch_size: int = 16,
    sampling: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
) -> Evaluation:
    """Run ``pipeline`` on raw samples (docs/internals.md section 1) and score each task.

    tasks: names from :data:`TASKS` (default: :func:`available_tasks`). semseg_classes / box_classes: class
    names (default: ``training.data.shapes`` when the samples carry scene graphs, else inferred from the
    data). sampling: per task keyword arguments for the pipeline method (e.g. ``{"text_to_image":
    {"guidance_scale": 3.0}}``). Each result carries ``"seconds"`` (wall time of that task).
    """
    if not samples:
        raise ValueError("no samples to evaluate")
    tasks = list(tasks) if tasks is not None else available_tasks(pipeline, samples)
    unknown = [t for t in tasks if t not in TASKS]
    if unknown:
        raise ValueError(f"unknown task(s) {unknown}: choose from {list(TASKS)}")
    for t in tasks:
        missing = missing_data(t, samples[0])
        if missing:
            raise ValueError(f"task {t!r} needs {missing} in the samples, which do not have it; drop the task")
    if "tokenizers" in tasks and not _has_tokenizers(pipeline):
        raise ValueError("task 'tokenizers' needs a pipeline with rgb/depth/semseg tokenizers")
    shapes = "scene" in samples[0]
    if semseg_classes is None and shapes:
        from training.data.shapes import SEMSEG_CLASSES as semseg_classes
    if box_classes is None and shapes:
        from training.data.shapes import BOX_CLASSES as box_classes
    sampling = sampling or {}
    images = [s["rgb"] for s in samples]
    ev = Evaluation()
    k = max(0, num_examples)

    def opts(task: str) -> dict[str, Any]:
        # held-out texts longer than the model's max_length are cut (with a warning) so every sample is scored
        return {"truncate": True, **sampling.get(task, {})}

    for task in tasks:
        t0 = time.perf_counter()
        before = set(ev.results)
        logger.info("evaluating %s on %d samples", task, len(samples))
        if task == "caption":
            preds = _batched(lambda c, _o: pipeline.caption(c, **opts(task)), images, batch_size, "caption", progress)
            refs = [[s["caption"]] for s in samples]
            ev.results["caption"] = metrics.caption_scores(preds, refs)
            if shapes:
                ev.results["caption_attributes"] = metrics.caption_attribute_f1(preds, [s["scene"] for s in samples])
            ev.examples["caption"] = [
                {"inputs": {"rgb": s["rgb"]}, "prediction": p, "target": s["caption"]}
                for s, p in zip(samples[:k], preds)
            ]
        elif task == "vqa":
            pairs = [(i, qa["question"], qa["answer"]) for i, s in enumerate(samples) for qa in s["qa"]]
            if not pairs:
                raise ValueError("task 'vqa': the samples have no question/answer pairs")
            preds = _batched(
                lambda c, _o: pipeline.answer([images[i] for i, _, _ in c], [q for _, q, _ in c], **opts(task)),
                pairs, batch_size, "vqa", progress,
            )  # fmt: skip
            ev.results["vqa"] = metrics.vqa_accuracy(preds, [a for _, _, a in pairs])
            if shapes:  # per question kind (count, yes/no, color, shape, size, relation): where the model fails
                ev.results["vqa"].update(metrics.vqa_accuracy_by_kind(preds, [a for _, _, a in pairs],
                                                                      [q for _, q, _ in pairs]))
            ev.examples["vqa"] = [
                {"inputs": {"rgb": images[i], "question": q}, "prediction": p, "target": a}
                for (i, q, a), p in zip(pairs[:k], preds)
            ]
        elif task == "depth":
            preds = _batched(lambda c, _o: pipeline.depth(c, **opts(task)), images, batch_size, "depth", progress)
            acc = metrics.DepthAccumulator()
            for s, p in zip(samples, preds):
                acc.update(np.asarray(p, dtype=np.float32), s["depth"])
            ev.results["depth"] = acc.compute()
            ev.examples["depth"] = [
                {"inputs": {"rgb": s["rgb"]}, "prediction": np.asarray(p), "target": s["depth"]}
                for s, p in zip(samples[:k], preds)
            ]
        elif task == "semseg":
            preds = _batched(lambda c, _o: pipeline.segment(c, **opts(task)), images, batch_size, "semseg", progress)
            names = list(semseg_classes) if semseg_classes is not None else None
            n_cls = len(names) if names else int(max(int(np.max(s["semseg"])) for s in samples)) + 1
            acc = metrics.SegmentationAccumulator(n_cls, class_names=names)
            for s, p in zip(samples, preds):
                acc.update(np.asarray(p).astype(np.int64), s["semseg"])
            ev.results["semseg"] = acc.compute()
            ev.examples["semseg"] = [
                {"inputs": {"rgb": s["rgb"]}, "prediction": np.asarray(p), "target": s["semseg"]}
                for s, p in zip(samples[:k], preds)
            ]
        elif task == "detection":
            preds = _batched(lambda c, _o: pipeline.detect(c, **opts(task)), images, batch_size, "detection", progress)
            gts = [s["boxes"] for s in samples]
            classes = list(box_classes) if box_classes is not None else sorted({b["label"] for g in gts for b in g})
            ev.results["detection"] = metrics.detection_map(preds, gts, classes)
            ev.examples["detection"] = [
                {"inputs": {"rgb": s["rgb"]}, "prediction": p, "target": s["boxes"]} for s, p in zip(samples[:k], preds)
            ]
        elif task == "text_to_image":
            prompts = [s["caption"] for s in samples]
            base = opts(task)
            seed = int(base.pop("seed", 0))
            gen = _batched(
                lambda c, o: pipeline.text_to_image(c, seed=seed + o, **base),
                prompts, batch_size, "text_to_image", progress,
            )  # fmt: skip
            gen = [_as_uint8(g) for g in gen]
            ev.results["text_to_image"] = judge.attribute_accuracy(gen, [s["scene"] for s in samples])
            real = judge.judge_accuracy_on_real(samples)
            real.pop("errors")
            ev.results["judge_on_real"] = real
            ev.examples["text_to_image"] = [
                {"inputs": {"caption": s["caption"]}, "prediction": g, "target": s["rgb"],
                 "note": "judge: " + _describe(judge.judge_image(g))}
                for s, g in zip(samples[:k], gen)
            ]  # fmt: skip
        elif task == "tokenizers":
            tok = evaluate_tokenizers(
                pipeline.tokenizers, samples, batch_size=batch_size, num_examples=k, progress=progress
            )
            ev.results.update(tok.results)
            ev.examples.update(tok.examples)
        seconds = round(time.perf_counter() - t0, 3)
        for name in set(ev.results) - before:
            ev.results[name]["seconds"] = seconds
    return ev


def evaluate_tokenizers(
    tokenizers: Any,
    samples: Sequence[dict[str, Any]],
    modalities: Sequence[str] = _TOKENIZED,
    *,
    batch_size: int = 16,
    num_examples: int = 4,
    progress: bool = True,
) -> Evaluation:
    """Round-trip ``decode(encode(x))`` of the image tokenizers (a ``TokenizerBundle`` or ``{name: tokenizer}``)
    on the samples: ``tokenizer_<modality>`` -> reconstruction metrics (rgb: psnr; depth: abs_rel, delta1;
    semseg: pixel_accuracy, miou) + codebook ``usage`` / ``perplexity`` over all the ids produced. Samples are
    resized (``training.data.reader.resize_sample``) to a tokenizer's ``image_size`` when they differ."""
    ev = Evaluation()
    for mod in modalities:
        if mod not in tokenizers or mod not in samples[0]:
            continue
        tok = tokenizers[mod]
        size = getattr(tok, "image_size", None)
        if size is not None and samples[0][mod].shape[:2] != (size, size):
            from training.data.reader import resize_sample

            logger.info("tokenizer %s works at %dx%d: resizing the samples to it", mod, size, size)
            xs = [resize_sample({mod: s[mod]}, int(size))[mod] for s in samples]
        else:
            xs = [s[mod] for s in samples]
        ids_all: list[np.ndarray] = []

        def roundtrip(chunk: list, _offset: int, tok: Any = tok) -> list:
            ids = tok.encode(np.stack(chunk))
            ids_all.append(np.asarray(ids.cpu() if hasattr(ids, "cpu") else ids))
            return list(tok.decode(ids))

        recon = _batched(roundtrip, xs, batch_size, f"tokenizer {mod}", progress)
        if np.asarray(recon[0]).shape != np.asarray(xs[0]).shape:
            raise ValueError(f"tokenizer {mod!r} decodes {np.asarray(recon[0]).shape} from {np.asarray(xs[0]).shape}")
        num_classes = getattr(getattr(tok, "config", None), "num_classes", None) or None
        res = metrics.reconstruction_metrics(mod, np.stack(recon), np.stack(xs), num_classes=num_classes)
        res.update(metrics.codebook_usage(np.concatenate([i.ravel() for i in ids_all]), tok.vocab_size))
        ev.results[f"tokenizer_{mod}"] = res
        ev.examples[f"tokenizer_{mod}"] = [
            {"inputs": {}, "prediction": np.asarray(r), "target": x} for x, r in zip(xs[:num_examples], recon)
        ]
    return ev


def _resolve_data(data_dir: str | Path, split: str) -> tuple[Path, dict[str, Any]]:
    from training.data.shards import read_meta

    root = Path(data_dir)
    if not root.exists():
        raise FileNotFoundError(f"no dataset at {root}: create one with `onemodel data shapes --out {root}`")
    source = root / split if (root / split).is_dir() else root
    for d in (root, source, root.parent):
        try:
            return source, read_meta(d)
        except FileNotFoundError:
            continue
    return source, {}


def evaluate(
    pipeline: Any,
    data_dir: str | Path,
    tasks: Sequence[str] | None = None,
    limit: int | None = None,
    *,
    split: str = "test",
    num_examples: int = 4,
    batch_size: int = 16,
    sampling: Mapping[str, Mapping[str, Any]] | None = None,
    progress: bool = True,
) -> Evaluation:
    """Evaluate on the first ``limit`` samples of ``data_dir/<split>`` (or of ``data_dir`` itself when it holds
    the shards directly), with class names from the dataset's ``meta.json``. See :func:`evaluate_samples`."""
    from training.data.reader import load_samples

    source, meta = _resolve_data(data_dir, split)
    samples = load_samples(source, limit=limit)
    if not samples:
        raise ValueError(f"no samples in {source}")
    logger.info("evaluating on %d samples of %s", len(samples), source)
    return evaluate_samples(
        pipeline,
        samples,
        tasks,
        semseg_classes=meta.get("semseg_classes"),
        box_classes=meta.get("box_classes"),
        num_examples=num_examples,
        batch_size=batch_size,
        sampling=sampling,
        progress=progress,
    )
