"""Train a VLM (frozen vision encoder + trained mapper + frozen causal LM) in two stages, on ``accelerate``.

    onemodel train-vlm --config configs/vlm_shapes.yaml [model.mapper.kind=summary ...] [--resume]
    onemodel train-vlm --quick          # every stage at tiny sizes (~16 s of CPU time): checks the whole path

What runs, top to bottom (each step cached in ``out_dir`` and skipped when already complete):

1. data: the dataset directory (a shapes dataset is generated when missing); train and test samples in memory;
2. LM: ``lm.path``, or the demo's small Llama pre-trained on the dataset's text into ``out_dir/lm``;
3. vision encoder: ``vision.path``, or a small CLIP trained on the captions into ``out_dir/vision``;
4. stage 1, alignment: image-caption pairs, only the mapper (and gated cross-attention) trains ->
   ``out_dir/stage1/model``;
5. stage 2, instruction tuning: question-answer pairs (+ ``caption_fraction`` captions), the mapper and, when
   ``model.lora`` is set, LoRA adapters on the LM -> ``out_dir/model``;
6. frozen check (every backbone tensor bit-identical to before training) and evaluation (VQA accuracy, caption
   CIDEr and attribute F1 on the test split) -> ``out_dir/eval/results.json``.

Frozen parameters have ``requires_grad=False``: they get no gradients and the optimizer holds no state for them.
Only trained parameters are saved in the model directory (``trained.safetensors``); ``config.json`` references
the LM and the vision encoder by path (relative to the model directory when they live in the run directory).
With ``cache_features`` the frozen encoder's patch features of the training images are computed once per run
(their time is in ``wall_time_s``, not in the loop's samples/s). Stages checkpoint with the shared
``training.checkpointing`` code (accelerate ``save_state``); the batch of step ``s`` is a pure function of
``(seed, s)``, so ``--resume`` continues exactly.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np

from training.vlm_config import StageConfig, VLMTrainConfig, load_vlm_train_config

logger = logging.getLogger("training.train_vlm")

__all__ = ["train_vlm", "train_stage", "backbone_fingerprint", "add_arguments", "run", "load_vlm_data"]


def backbone_fingerprint(model: Any) -> str:
    """SHA-256 over every frozen tensor of ``model`` (name, shape, bytes): equal iff bit-identical."""
    import torch

    h = hashlib.sha256()
    for name, p in sorted(model.backbone_parameters().items()):
        t = p.detach().cpu().contiguous()
        h.update(name.encode())
        h.update(str(tuple(t.shape)).encode())
        h.update(t.view(-1).view(dtype=torch.uint8).numpy().tobytes())
    return h.hexdigest()


def load_vlm_data(config: VLMTrainConfig) -> tuple[list[dict], list[dict]]:
    """(train, test) raw samples of ``config.data`` (generating a shapes dataset when the directory is empty)."""
    from training.data.reader import load_samples
    from training.data.shapes import make_shapes_dataset

    d = config.data
    root = Path(d.path)
    if not (root / "train").is_dir():
        logger.info("no dataset in %s: generating shapes (%d train, %d test)", root, d.num_train, d.num_test)
        make_shapes_dataset(root, d.num_train, 0, d.num_test, resolution=d.resolution, progress=False)
    keep = ("rgb", "caption", "qa", "scene")
    train = load_samples(root / "train", limit=d.limit_train, resolution=d.resolution, modalities=keep)
    test = load_samples(root / "test", limit=config.eval.limit, resolution=d.resolution, modalities=keep) \
        if (root / "test").is_dir() else []
    if not train:
        raise ValueError(f"{str(root / 'train')!r} holds no samples")
    for key in ("rgb", "caption", "qa"):
        if key not in train[0]:
            raise ValueError(f"the training samples in {str(root)!r} have no {key!r}; a VLM run needs rgb, caption, qa")
    return train, test


def _pixels(images: np.ndarray, size: int):
    """uint8 (N, H, W, 3) -> float (N, 3, size, size) in [0, 1]."""
    import torch

    from onemodel.pipeline_inputs import resize_rgb

    arr = np.stack([resize_rgb(a, size) for a in images]) if images.shape[1] != size else images
    return torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)


def _features(model: Any, images: np.ndarray, chunk: int = 256):
    import torch

    out = []
    with torch.no_grad():
        for i in range(0, len(images), chunk):
            out.append(model.image_features(_pixels(images[i:i + chunk], model.vision.image_size)))
    return torch.cat(out)


def train_stage(model: Any, images: np.ndarray, items: list[tuple[int, str, str]], stage: StageConfig,
                out_dir: Path, seed: int, resume: bool = False, features: Any = None,
                caption_items: list[tuple[int, str, str]] | None = None) -> dict[str, Any]:
    """Train ``model``'s trainable parameters on ``items`` = [(image index, prompt, target)] for ``stage.steps``.

    ``features``: precomputed vision features (N, P, Dv) for ``images`` (else the encoder runs every step).
    ``caption_items``: mixed in with probability ``stage.caption_fraction`` per sample. Checkpoints in
    ``out_dir/checkpoints``, metrics in ``out_dir/metrics.jsonl``. Returns a summary dict."""
    import torch
    from accelerate import Accelerator
    from tqdm.auto import tqdm

    from training.checkpointing import latest_checkpoint, read_trainer_state, save_checkpoint
    from training.run_log import MetricsLog
    from training.train import lr_at, param_groups

    if not items:
        raise ValueError("no training items for this stage")
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != "no":
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=True, mixed_precision="no")
    model.train()
    trained = list(model.trained_parameters().values())
    if not trained:
        raise ValueError("nothing to train: every parameter is frozen")
    optimizer = torch.optim.AdamW(param_groups(model, stage.weight_decay), lr=stage.lr, betas=(0.9, 0.98))
    model, optimizer = accelerator.prepare(model, optimizer)
    raw = accelerator.unwrap_model(model)
    ckpt_dir = out_dir / "checkpoints"
    start = 0
    ckpt = latest_checkpoint(ckpt_dir) if resume else None
    if ckpt is not None:
        accelerator.load_state(str(ckpt))
        start = int(read_trainer_state(ckpt)["step"])
        logger.info("resumed %s at step %d", out_dir, start)
    metrics = MetricsLog(out_dir, truncate_after_step=start if ckpt else None)
    n_trained = sum(p.numel() for p in trained)
    logger.info("%s: %d trainable parameters (%d frozen), %d visual tokens per image, %d steps x %d samples",
                out_dir.name, n_trained, sum(p.numel() for p in raw.backbone_parameters().values()),
                raw.num_visual_tokens(), stage.steps, stage.batch_size)
    t0 = time.perf_counter()
    loop_time, samples, loss_val = 0.0, 0, float("nan")
    bar = tqdm(total=stage.steps, initial=start, desc=out_dir.name, unit="step", mininterval=2)
    for step in range(start, stage.steps):
        rng = np.random.default_rng([seed, step])
        idx = rng.integers(0, len(items), size=stage.batch_size)
        batch = [items[i] for i in idx]
        if caption_items and stage.caption_fraction > 0:
            use_cap = rng.random(stage.batch_size) < stage.caption_fraction
            cap_idx = rng.integers(0, len(caption_items), size=stage.batch_size)
            batch = [caption_items[c] if u else b for b, u, c in zip(batch, use_cap, cap_idx)]
        img = [b[0] for b in batch]
        ts = time.perf_counter()
        lr = lr_at(step, stage.lr, stage.warmup_steps, stage.steps, stage.min_lr_ratio)
        for g in optimizer.param_groups:
            g["lr"] = lr
        if features is not None:
            out = model(None, [b[1] for b in batch], [b[2] for b in batch], features=features[img])
        else:
            out = model(_pixels(images[img], raw.vision.image_size), [b[1] for b in batch], [b[2] for b in batch])
        accelerator.backward(out.loss)
        if stage.grad_clip > 0:
            accelerator.clip_grad_norm_(trained, stage.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        loop_time += time.perf_counter() - ts
        samples += stage.batch_size
        loss_val = out.loss.item()
        done = step + 1
        if done % stage.log_every == 0 or done == stage.steps:
            metrics.log(done, {"time": time.perf_counter() - t0, "lr": lr, "train/loss": loss_val,
                               "samples_per_s": samples / max(loop_time, 1e-9)})
            bar.set_postfix(loss=f"{loss_val:.3f}")
        if done == stage.steps or (stage.checkpoint_every and done % stage.checkpoint_every == 0):
            save_checkpoint(accelerator, ckpt_dir, {"step": done, "seed": seed}, keep_last=1)
        bar.update(1)
    bar.close()
    metrics.close()
    return {"steps": stage.steps - start, "loss": loss_val, "loop_seconds": loop_time,
            "samples_per_s": samples / loop_time if loop_time > 0 else 0.0,
            "wall_seconds": time.perf_counter() - t0, "trainable_params": n_trained,
            "visual_tokens": raw.num_visual_tokens()}


def _save_model(model: Any, final: Path, extra: dict[str, Any]) -> None:
    from training.checkpointing import replace_dir_atomic, write_json_atomic

    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.save_pretrained(tmp)
    write_json_atomic(tmp / "train_info.json", extra)
    replace_dir_atomic(tmp, final)


def _rel(path: Path, model_dir: Path) -> str:
    """``path`` relative to the model directory when both live in the run directory (the run stays movable)."""
    try:
        return os.path.relpath(path.resolve(), model_dir.resolve()) if path.resolve().is_relative_to(
            model_dir.resolve().parent) else str(path.resolve())
    except ValueError:
        return str(path.resolve())


def train_vlm(config: VLMTrainConfig, resume: bool = False) -> dict[str, Any]:
    """Run the whole VLM path of ``config`` (see the module docstring). Returns a summary dict (also written to
    ``out_dir/summary.json``)."""
    import torch

    from onemodel.mappers import MapperConfig
    from onemodel.vision_backbones import VisionSpec
    from onemodel.vlm import VLM, VLMConfig
    from training.checkpointing import write_json_atomic
    from training.vlm_backbones import lm_corpus, pretrain_lm, pretrain_vision

    if not isinstance(config, VLMTrainConfig):
        raise TypeError(f"train_vlm needs a VLMTrainConfig, got {type(config).__name__}")
    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    out = Path(config.out_dir)
    model_dir = out / "model"
    if not resume and (out / "stage1").exists():
        raise ValueError(f"{str(out)!r} already holds a VLM run: pass --resume to continue it, or choose another "
                         "out_dir")
    out.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out / "train_config.json", config.to_dict())
    t_start = time.perf_counter()
    timings: dict[str, float] = {}

    t = time.perf_counter()
    train, test = load_vlm_data(config)
    images = np.stack([s["rgb"] for s in train])
    timings["data_s"] = time.perf_counter() - t
    mc = config.model

    # ---- backbones
    t = time.perf_counter()
    lm_path = Path(config.lm.path) if config.lm.path else out / "lm"
    if not config.lm.path:
        s = config.lm
        pretrain_lm(lm_corpus(train, mc.caption_prompt, mc.question_prompt), lm_path, s.dim, s.layers, s.heads,
                    s.vocab_size, s.steps, s.batch_size, s.lr, config.seed)
    timings["lm_pretrain_s"] = time.perf_counter() - t
    t = time.perf_counter()
    v = config.vision
    vision_path = Path(v.path) if v.path else None
    if vision_path is None and v.kind == "contrastive":
        vision_path = out / "vision"
        pretrain_vision(images, [s["caption"] for s in train], vision_path, v.width, v.layers, v.patch_size, v.steps,
                        v.batch_size, v.lr, config.seed, stem=v.stem, stem_width=v.stem_width,
                        negatives=v.negatives)
    elif vision_path is None and v.kind != "none":
        raise ValueError(f"vision.kind={v.kind!r} needs vision.path (only 'contrastive' can be trained here)")
    timings["vision_pretrain_s"] = time.perf_counter() - t
    vision = VisionSpec(kind=v.kind, path=_rel(vision_path, model_dir) if vision_path else None,
                        image_size=v.image_size or (config.data.resolution if v.kind == "none" else None),
                        patch_size=v.patch_size)
    base = dict(lm_path=_rel(lm_path, model_dir), vision=vision, mapper=MapperConfig(**mc.mapper.to_dict()),
                injection=mc.injection, xattn_every=mc.xattn_every, xattn_heads=mc.xattn_heads,
                caption_prompt=mc.caption_prompt, question_prompt=mc.question_prompt,
                max_new_tokens=mc.max_new_tokens)

    # ---- items
    cap_items = [(i, mc.caption_prompt, s["caption"]) for i, s in enumerate(train)]
    qa_items = [(i, mc.question_prompt.format(question=qa["question"]), qa["answer"])
                for i, s in enumerate(train) for qa in s["qa"]]

    # ---- stage 1: alignment (captions), mapper only
    torch.manual_seed(config.seed)
    model = VLM(VLMConfig(**base), base_dir=model_dir)
    before = backbone_fingerprint(model)
    t = time.perf_counter()
    feats = _features(model, images) if config.cache_features else None
    timings["feature_cache_s"] = time.perf_counter() - t
    stage1_dir = out / "stage1"
    if (stage1_dir / "model" / "trained.safetensors").is_file() and resume:
        from safetensors.torch import load_file

        model.load_trained(load_file(str(stage1_dir / "model" / "trained.safetensors")))
        s1 = json.loads((stage1_dir / "model" / "train_info.json").read_text())
    else:
        s1 = train_stage(model, images, cap_items, config.stage1, stage1_dir, config.seed, resume, feats)
        _save_model(model, stage1_dir / "model", s1)
    stage1_state = {k: v.detach().clone() for k, v in model.trained_parameters().items()}

    # ---- stage 2: instruction tuning (QA), mapper (+ LoRA)
    lora = mc.lora
    model2 = VLM(VLMConfig(**base, lora=lora), base_dir=model_dir) if lora is not None else model
    if lora is not None:
        model2.load_trained(stage1_state, allow_missing=("lora_",))
    s2 = train_stage(model2, images, qa_items, config.stage2, out / "stage2", config.seed + 1, resume, feats,
                     caption_items=cap_items)
    after = backbone_fingerprint(model2 if lora is None else _without_lora(model2))
    frozen_ok = after == before
    if not frozen_ok:
        raise RuntimeError("a frozen backbone weight changed during training (bug): the run is not saved")
    info = {"stage1": s1, "stage2": s2, "frozen_backbones_unchanged": frozen_ok}
    _save_model(model2, model_dir, info)
    train_seconds = time.perf_counter() - t_start

    # ---- evaluation
    results: dict[str, Any] = {}
    if test:
        t = time.perf_counter()
        results = evaluate_vlm(model_dir, test, config.eval.batch_size)
        timings["eval_s"] = time.perf_counter() - t
    summary = {
        "out_dir": str(out), "model_dir": str(model_dir), "mapper": mc.mapper.kind, "injection": mc.injection,
        "num_tokens": mc.mapper.num_tokens, "lora": lora is not None,
        "trainable_params": s2["trainable_params"], "visual_tokens": s2["visual_tokens"],
        "stage1": s1, "stage2": s2, "timings": timings, "train_wall_s": train_seconds,
        "total_wall_s": time.perf_counter() - t_start, "frozen_backbones_unchanged": frozen_ok, "eval": results,
    }
    write_json_atomic(out / "summary.json", summary)
    return summary


def _without_lora(model: Any) -> Any:
    """The backbone parameters of a LoRA-wrapped VLM, named as without the wrapper (for the frozen check)."""

    class _View:
        def backbone_parameters(self) -> dict[str, Any]:
            out = {}
            for n, p in model.backbone_parameters().items():
                out[n.replace("lm.base_model.model.", "lm.").replace(".base_layer.", ".")] = p
            return out

    return _View()


def evaluate_vlm(model_dir: str | Path, samples: list[dict], batch_size: int = 32) -> dict[str, Any]:
    """VQA accuracy and caption scores (CIDEr, attribute F1) of a saved VLM on raw samples; writes the evaluation
    report (``results.json``, ``report.html``, example pictures) to ``model_dir/../eval``."""
    from onemodel.vlm_pipeline import VLMPipeline
    from training.evaluation.evaluate import evaluate_samples

    from training.evaluation.report import write_report

    pipe = VLMPipeline.from_pretrained(model_dir)
    ev = evaluate_samples(pipe, samples, ["caption", "vqa"], batch_size=batch_size, num_examples=6, progress=False)
    out = Path(model_dir).parent / "eval"
    write_report(out, ev.results, ev.examples, None, title=f"VLM evaluation: {model_dir}")
    return ev.results


def headline(results: dict[str, Any]) -> dict[str, float]:
    """The numbers the comparison reports: VQA accuracy, CIDEr, attribute F1."""
    vqa = results.get("vqa", {})
    cap = results.get("caption", {})
    attr = results.get("caption_attributes", {})
    return {"vqa": vqa.get("accuracy", float("nan")), "cider": cap.get("CIDEr", cap.get("cider", float("nan"))),
            "attribute_f1": attr.get("f1", float("nan"))}


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="YAML/JSON VLM config (e.g. configs/vlm_shapes.yaml)")
    parser.add_argument("--resume", action="store_true", help="continue the run in out_dir (completed steps are kept)")
    parser.add_argument("--quick", action="store_true",
                        help="tiny preset (small data, backbones and stages; ~16 s of CPU time): checks the whole path")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help="dotted overrides, e.g. model.mapper.kind=summary model.mapper.num_tokens=4")


# --quick: every stage runs, at sizes that only check the plumbing (the numbers mean nothing)
QUICK = ["out_dir=runs/vlm_quick", "data.path=runs/vlm_quick_data", "data.num_train=300", "data.num_test=40",
         "eval.limit=20", "lm.dim=64", "lm.layers=2", "lm.steps=40", "vision.width=64", "vision.layers=2",
         "vision.steps=20", "vision.batch_size=32", "stage1.steps=10", "stage2.steps=10", "stage1.log_every=5",
         "stage2.log_every=5"]


def run(args: argparse.Namespace) -> int:
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    config = load_vlm_train_config(args.config, (QUICK if args.quick else []) + list(args.overrides))
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    s = train_vlm(config, resume=args.resume)
    h = headline(s["eval"])
    print(f"VLM ({s['mapper']}, {s['injection']}{', LoRA' if s['lora'] else ''}): {s['trainable_params']:,} trained "
          f"parameters, {s['visual_tokens']} visual tokens/image; stage 2 {s['stage2']['samples_per_s']:.1f} "
          f"samples/s; whole run {s['total_wall_s']:.0f} s")
    if s["eval"]:
        print(f"test: VQA accuracy {h['vqa']:.3f}, caption CIDEr {h['cider']:.3f}, attribute F1 "
              f"{h['attribute_f1']:.3f}  ({s['out_dir']}/eval/results.json)")
    m = s["model_dir"]
    print("use it:\n"
          f"  onemodel caption IMAGE.png --model {m}\n"
          f"  onemodel answer IMAGE.png --question 'what color is the circle?' --model {m}\n"
          f"  onemodel eval --model {m} --data {config.data.path} --tasks caption vqa\n"
          f"  onemodel serve --model {m}                # web demo: Caption and Ask tabs (pip install -e '.[web]')\n"
          f"  python -c \"from onemodel.pipeline import OneModelPipeline; p = OneModelPipeline.from_pretrained("
          f"'{m}'); print(p.caption('IMAGE.png'))\"")
    return 0
