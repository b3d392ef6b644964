"""Train one OneModel on all tasks: config -> data -> model -> optimizer -> loop -> checkpoints.

One top-to-bottom loop on ``accelerate`` (in the spirit of nanoGPT's ``train.py``)::

    onemodel train --config configs/demo.yaml [optim.lr=3e-4 ...] [--resume]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        -m training.train --config configs/demo.yaml                                   # DDP, 2 CPU processes
    accelerate launch --config_file configs/accelerate_fsdp.yaml -m training.train --config configs/base.yaml

From Python: ``train(load_train_config("configs/demo.yaml"), resume=False) -> summary dict``.

What the loop does, per optimizer step: set the learning rate (linear warmup, cosine decay), run
``grad_accum_steps`` micro-batches (no gradient all-reduce until the last one), clip the gradient norm, AdamW
step (no weight decay on norms, biases, embeddings). Every ``logging.log_every`` steps a line goes to
``out_dir/metrics.jsonl`` (and TensorBoard); every ``logging.eval_every`` steps the per-modality validation
loss on fixed batches; every ``checkpoint.every`` steps and at the end a checkpoint
(``out_dir/checkpoints/step_N``, written as ``step_N.tmp`` then renamed) and the shareable model directory
``out_dir/model`` (``config.json`` + ``model.safetensors`` + ``tokenizers/``).

Resume (``--resume``): the latest complete checkpoint restores the model, optimizer, RNG states (accelerate
``load_state``) and the step; the data stream restarts at that step (it is a pure function of the sample index,
see ``training/loader.py``), so the run continues exactly as if it had never stopped. Checkpoint directories
are trusted local state (accelerate reads optimizer/RNG files with ``torch.load(weights_only=True)``); share
``out_dir/model``, which is safetensors + JSON only.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import os
import shutil
import sys
import time
from pathlib import Path
from typing import Any

from training.config import TrainConfig, load_train_config, validate_train_config

logger = logging.getLogger("training.train")

__all__ = ["train", "add_arguments", "run", "main", "lr_at", "param_groups"]


# ------------------------------------------------------------------------------------------------ helpers


def lr_at(step: int, lr: float, warmup_steps: int, max_steps: int, min_lr_ratio: float) -> float:
    """Learning rate of optimizer step ``step`` (0-based): linear warmup to ``lr``, cosine to ``lr*min_lr_ratio``."""
    if step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    progress = min(1.0, (step - warmup_steps) / max(1, max_steps - warmup_steps))
    return lr * (min_lr_ratio + (1.0 - min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress)))


def param_groups(model: Any, weight_decay: float) -> list[dict[str, Any]]:
    """AdamW groups: weight decay on matrices of linear layers and the output heads; none on norms, biases,
    embeddings (token / modality / position tables, mask token, start embeddings)."""
    import torch.nn as nn

    embedding_params = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    decay, no_decay, seen = [], [], set()
    for name, p in model.named_parameters():
        if not p.requires_grad or id(p) in seen:
            continue
        seen.add(id(p))
        leaf = name.rsplit(".", 1)[-1]
        is_embedding = id(p) in embedding_params or "emb" in leaf or leaf in ("pos_table", "mask_token", "codes")
        (no_decay if p.ndim < 2 or is_embedding else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def input_codebook_dims(config: TrainConfig, modalities: tuple[Any, ...], bundle: Any) -> dict[str, int]:
    """``codebook_dims`` of the model: as configured, else the width of each codebook-embedded modality's tokenizer
    code vectors."""
    dims = dict(config.model.codebook_dims)
    by_name = {m.name: m for m in modalities}
    for name, kind in config.model.input_embeddings.items():
        if kind.startswith("codebook") and name in by_name and name not in dims:
            tokenizer = bundle[by_name[name].tokenizer]
            if not hasattr(tokenizer, "code_vectors"):
                raise ValueError(f"model.input_embeddings.{name}={kind} needs a VQ tokenizer with code vectors; "
                                 f"{by_name[name].tokenizer!r} is a {type(tokenizer).__name__}")
            dims[name] = int(tokenizer.code_vectors().shape[1])
    return dims


def input_value_dims(config: TrainConfig, modalities: tuple[Any, ...], bundle: Any) -> dict[str, int]:
    """``value_dims`` of the model: as configured, else the patch width of each pixel-embedded modality (its
    tokenizer's image size cut into its token grid, 3 channels)."""
    from onemodel.pixel_inputs import patch_dim

    dims = dict(config.model.value_dims)
    by_name = {m.name: m for m in modalities}
    for name, kind in config.model.input_embeddings.items():
        if kind.startswith("pixels") and name in by_name and name not in dims:
            if name != "rgb":
                raise ValueError(f"model.input_embeddings.{name}=pixels: only rgb can be read as pixels so far; use "
                                 "'table' or 'codebook' for other modalities")
            dims[name] = patch_dim(int(bundle[by_name[name].tokenizer].image_size), by_name[name].grid_size)
    return dims


def input_feature_encoders(config: TrainConfig) -> tuple[dict[str, Any], dict[str, Any]]:
    """``feature_encoders`` of the model and the encoders to copy weights from: each entry of
    ``model.feature_encoders`` that names a directory (an ``ImageTextEncoder``, e.g. ``onemodel train-clip``'s
    OUT/model) is loaded and described by ``feature_encoder_spec``; entries already given as specs stay."""
    from onemodel.input_embeddings import feature_encoder_spec

    specs, encoders = {}, {}
    for name, value in config.model.feature_encoders.items():
        if not isinstance(value, str):
            specs[name] = value
            continue
        if not (Path(value) / "config.json").is_file():
            raise ValueError(f"model.feature_encoders.{name}={value!r} is not a contrastive encoder directory (no "
                             "config.json): pass the OUT/model directory written by onemodel train-clip")
        from onemodel.contrastive import ImageTextEncoder

        encoders[name] = ImageTextEncoder.from_pretrained(value)
        specs[name] = feature_encoder_spec(encoders[name])
    return specs, encoders


def model_modalities(config: TrainConfig, bundle: Any) -> tuple[Any, ...]:
    """The model's modalities: one per tokenizer of the bundle (grid) and the text sequence modalities, with
    ``max_length`` = ``model.max_lengths`` where given, else the longest sequence recorded by pre-tokenization
    in the token sources' ``meta.json`` (largest over sources), else the bundle's defaults."""
    from onemodel.modalities import Modality
    from training.config import read_source_meta, source_kind

    lengths: dict[str, int] = {}
    for source in config.data.sources:
        if Path(source.path).is_dir() and source_kind(source.path) == "tokens":
            for name, n in read_source_meta(source.path).get("max_lengths", {}).items():
                lengths[name] = max(lengths.get(name, 0), int(n))
    lengths.update(config.model.max_lengths)
    return tuple(Modality(**spec) for spec in bundle.modalities(lengths or None))


def _save_model_dir(accelerator: Any, model: Any, model_config: Any, config: TrainConfig, out_dir: Path,
                    step: int, name: str = "model", extra: dict[str, Any] | None = None) -> Path | None:
    """Write ``out_dir/<name>`` (config.json + model.safetensors + tokenizers/ + train_config.json, which also
    holds ``extra``) atomically.

    Every process must call this (gathering a sharded FSDP state is collective); the main process writes."""
    from accelerate.utils import DistributedType

    from onemodel.model import OneModel
    from training.checkpointing import as_output_error, replace_dir_atomic, write_json_atomic

    if accelerator.distributed_type == DistributedType.FSDP:
        state = accelerator.get_state_dict(model)  # full state dict, gathered on the main process
        to_save = None
        if accelerator.is_main_process:
            to_save = OneModel(model_config)
            to_save.load_state_dict(state)
    else:
        to_save = accelerator.unwrap_model(model)
    final = out_dir / name
    if accelerator.is_main_process:
        tmp = out_dir / f"{name}.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        try:
            to_save.save_pretrained(tmp)
            shutil.copytree(config.tokenizers, tmp / "tokenizers")
            write_json_atomic(tmp / "train_config.json", {"step": step, **(extra or {}), "config": config.to_dict()})
        except Exception as err:  # full disk, ...: nothing half-written is left, one line says what to do
            translated = as_output_error(final, err)  # before the removal frees the space
            shutil.rmtree(tmp, ignore_errors=True)
            if translated is not None:
                raise translated from err
            raise
        replace_dir_atomic(tmp, final)
        logger.info("saved model directory %s (step %d)", final, step)
    accelerator.wait_for_everyone()
    return final


def _reduce_sums(accelerator: Any, values: list[float]) -> list[float]:
    """Sum a list of floats over processes (on the accelerator device)."""
    import torch

    dtype = torch.float32 if accelerator.device.type == "mps" else torch.float64  # MPS has no float64
    t = torch.tensor(values, dtype=dtype, device=accelerator.device)
    if accelerator.num_processes > 1:
        t = accelerator.reduce(t, reduction="sum")
    return t.tolist()


def _evaluate(accelerator: Any, model: Any, val_batches: list[Any], names: list[str]) -> dict[str, float]:
    """Validation loss per modality (cross-entropy per target token over the fixed validation set, summed over
    processes, so it does not depend on the process count or micro-batch size), and their mean."""
    import torch

    sums, counts = [0.0] * len(names), [0.0] * len(names)
    was_training = model.training
    model.eval()
    with torch.no_grad():
        for batch in val_batches:
            # target tokens per modality (dec_mod holds the modality index = position in names)
            n_targets = torch.bincount(batch.dec_mod[batch.dec_mask].flatten(), minlength=len(names)).tolist()
            out = model(batch.to(accelerator.device))
            for name, loss in out.losses.items():
                i = names.index(name)
                sums[i] += float(loss) * n_targets[i]
                counts[i] += float(n_targets[i])
    model.train(was_training)
    totals = _reduce_sums(accelerator, sums + counts)
    sums, counts = totals[: len(names)], totals[len(names):]
    result = {f"val/loss/{n}": s / c for n, s, c in zip(names, sums, counts) if c > 0}
    if result:
        result["val/loss"] = sum(result.values()) / len(result)
    return result


# ------------------------------------------------------------------------------------------------ the run


def train(config: TrainConfig, resume: bool = False, stop_at_step: int | None = None) -> dict[str, Any]:
    """Train a OneModel as ``config`` says; with ``resume``, continue from the latest complete checkpoint in
    ``config.checkpoint.out_dir`` (starting fresh when there is none). ``stop_at_step``: leave the loop after
    that optimizer step with a checkpoint (for time-sliced jobs; ``--resume`` later continues to
    ``optim.max_steps`` exactly as an uninterrupted run would). Returns a summary dict::

        {"start_step", "steps", "tokens", "wall_time_s", "tokens_per_s", "train_loss", "val": {...},
         "out_dir", "model_dir", "num_processes", "grad_accum_steps", "micro_batch_size"}
    """
    import torch
    from accelerate import Accelerator, DistributedDataParallelKwargs, PartialState
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from onemodel.masking import TextSpecialIds
    from onemodel.model import OneModel, OneModelConfig
    from tokenizers_mm.bundle import TokenizerBundle
    from training.checkpointing import latest_checkpoint, resume_from, save_checkpoint, write_json_atomic
    from training.loader import build_train_loader, build_val_batches, load_source
    from tokenizers_mm.io_atomic import check_output_dir
    from training.run_log import MetricsLog

    # ---- config: fail fast, before any model or data is built
    if not isinstance(config, TrainConfig):
        raise TypeError("train() needs a TrainConfig (see training.config.load_train_config), "
                        f"got {type(config).__name__}")
    # CPU when there is no GPU (or ACCELERATE_USE_CPU=1): several CPU processes then talk over gloo
    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    num_processes = PartialState(cpu=use_cpu).num_processes
    if not config.tokenizers or not Path(config.tokenizers).is_dir():
        validate_train_config(config, num_processes, modality_names=[])  # raises the "bundle missing" error
    bundle = TokenizerBundle.from_pretrained(config.tokenizers)
    modalities = model_modalities(config, bundle)
    names = [m.name for m in modalities]
    derived = validate_train_config(config, num_processes, modality_names=names)
    micro, accum = derived["micro_batch_size"], derived["grad_accum_steps"]
    text_ids = TextSpecialIds.coerce(bundle.text) if "text" in bundle else None
    optim, log_cfg, ckpt_cfg = config.optim, config.logging, config.checkpoint
    # accelerate keeps one AcceleratorState per process and refuses a second Accelerator with another precision;
    # train() may run several times in one process (the demo, notebooks, tests): drop the previous precision
    # setting (the process group, PartialState, is kept)
    from accelerate.state import AcceleratorState

    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != optim.mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(
        cpu=use_cpu,
        mixed_precision=optim.mixed_precision,
        # masking leaves some modalities (and their parameters) out of some batches
        kwargs_handlers=[DistributedDataParallelKwargs(find_unused_parameters=True)],
    )
    out_dir = Path(ckpt_cfg.out_dir)
    check_output_dir(out_dir, what="checkpoint.out_dir")  # a file, read-only, full disk: fail before any work
    ckpt_dir = out_dir / "checkpoints"
    checkpoint = latest_checkpoint(ckpt_dir) if resume else None
    if not resume and latest_checkpoint(ckpt_dir) is not None:
        raise ValueError(f"{str(ckpt_dir)!r} already holds checkpoints: pass --resume (resume=True) to continue that "
                         "run, or choose another checkpoint.out_dir")
    if resume and checkpoint is None:
        logger.info("--resume: no complete checkpoint in %s, starting from step 0", ckpt_dir)
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    set_seed(config.seed)
    training_only = ("gradient_checkpointing", "max_lengths")  # ModelSection fields that OneModelConfig lacks
    model_kwargs = {k: v for k, v in config.model.__dict__.items() if k not in training_only}
    model_kwargs["codebook_dims"] = input_codebook_dims(config, modalities, bundle)
    model_kwargs["value_dims"] = input_value_dims(config, modalities, bundle)
    model_kwargs["feature_encoders"], feature_encoders = input_feature_encoders(config)
    model_config = OneModelConfig(modalities=modalities, **model_kwargs)

    # ---- data (every process holds the shard sets in memory; each reads its own part of the stream)
    data_cfg = config.data
    sources = [
        load_source(s.path, s.split, config.tokenizers, s.tokenize_on_the_fly, s.modalities, s.weight,
                    data_cfg.max_bad_fraction)
        for s in data_cfg.sources
    ]
    val_sources = []
    if data_cfg.val_split and log_cfg.eval_batches > 0:
        for s in data_cfg.sources:
            if (Path(s.path) / data_cfg.val_split).is_dir():
                val_sources.append(load_source(s.path, data_cfg.val_split, config.tokenizers, s.tokenize_on_the_fly,
                                               s.modalities, s.weight, data_cfg.max_bad_fraction))
            else:
                logger.warning("data source %s has no %r split: not used for validation", s.path, data_cfg.val_split)
    pad = 8 if accelerator.device.type == "cuda" else None

    model = OneModel(model_config)
    for name in model_config.codebook_modalities:  # codebook-embedded inputs: the tokenizer's code vectors
        model.set_input_codebook(name, bundle[next(m for m in modalities if m.name == name).tokenizer].code_vectors())
    for name, encoder in feature_encoders.items():  # pixels_clip inputs: the contrastive encoder's frozen tower
        model.input_patches[name].load_encoder(encoder)
    del feature_encoders
    model.gradient_checkpointing = config.model.gradient_checkpointing
    n_params = model.num_params()
    # fused AdamW: one kernel for all parameters (CPU and CUDA, torch >= 2.4)
    optimizer = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas),
                                  eps=optim.eps, fused=True)
    model, optimizer = accelerator.prepare(model, optimizer)

    # ---- resume: model, optimizer, RNG states (accelerate) + step and data position (trainer_state.json)
    start_step, tokens_seen = 0, 0  # tokens_seen: before this run (from the checkpoint)
    if checkpoint is not None:
        state = resume_from(accelerator, checkpoint, optim.batch_size, data_cfg.seed)
        start_step, tokens_seen = int(state["step"]), int(state.get("tokens_seen", 0))
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "train_config.json", config.to_dict())
    metrics = (MetricsLog(out_dir, log_cfg.tensorboard, truncate_after_step=start_step if checkpoint else None)
               if accelerator.is_main_process else None)
    logger.info("model: %.2fM parameters, %d modalities %s; %d process(es) x %d micro-batch x %d accumulation = "
                "batch %d", n_params / 1e6, len(names), names, num_processes, micro, accum, optim.batch_size)

    pixel_grids = {name: model_config.modalities[model_config.modality_index(name)].grid_size
                   for name in model_config.value_modalities}
    end_step = optim.max_steps if stop_at_step is None else max(start_step, min(stop_at_step, optim.max_steps))
    loader = build_train_loader(
        sources, modalities, config.masking, text_ids, data_cfg.seed, micro, num_processes,
        accelerator.process_index, accum, start_step, end_step, data_cfg.num_workers, pad_to_multiple_of=pad,
        pin_memory=accelerator.device.type == "cuda", pixel_grids=pixel_grids,
    )
    # the validation set: eval_batches x batch_size samples, the same for any process count
    val_batches = build_val_batches(val_sources, modalities, config.masking, text_ids, data_cfg.seed, micro,
                                    log_cfg.eval_batches * optim.batch_size, num_processes,
                                    accelerator.process_index, pad, pixel_grids) if val_sources else []

    heldout = None  # learning curves of the real tasks (logging.heldout_*), on the main process
    if log_cfg.heldout_every and accelerator.is_main_process and not Path(log_cfg.heldout_data).is_dir():
        logger.warning("logging.heldout_data %r does not exist: no held-out learning curves (point it at a raw "
                       "dataset directory, or set logging.heldout_every=0)", log_cfg.heldout_data)
    elif log_cfg.heldout_every and accelerator.is_main_process:
        from training.heldout import HeldoutEval

        heldout = HeldoutEval(log_cfg.heldout_data, log_cfg.heldout_split, log_cfg.heldout_limit,
                              log_cfg.heldout_tasks, bundle)

    def heldout_now(step: int) -> None:
        nonlocal t_last
        if heldout is not None:
            t0 = time.perf_counter()
            core = accelerator.unwrap_model(model)
            scores = heldout(core)
            core.train()
            if metrics:
                metrics.log(step, {"time": time.perf_counter() - t_start, **scores})
            logger.info("step %d held-out (%.1f s): %s", step, time.perf_counter() - t0,
                        ", ".join(f"{k.split('/', 1)[1]} {v:.3f}" for k, v in scores.items()))
            t_last += time.perf_counter() - t0  # tokens/s counts training time only
        accelerator.wait_for_everyone()

    local_tokens = 0  # input + target tokens this process consumed in this run (counted on the CPU batch)

    def global_tokens() -> int:
        return int(_reduce_sums(accelerator, [float(local_tokens)])[0])

    def checkpoint_now(step: int) -> None:
        trainer_state = {
            "step": step,
            "tokens_seen": tokens_seen + global_tokens(),
            "samples_seen": step * optim.batch_size,
            "data": {"seed": data_cfg.seed, "batch_size": optim.batch_size,
                     "next_sample_index": step * optim.batch_size, "micro_batch_size": micro,
                     "num_processes": num_processes, "grad_accum_steps": accum},
        }
        save_checkpoint(accelerator, ckpt_dir, trainer_state, ckpt_cfg.keep_last)
        _save_model_dir(accelerator, model, model_config, config, out_dir, step)

    # ---- the loop
    n_mod = len(names)
    val_result: dict[str, float] = {}
    # checkpoint.keep_best: out_dir/best_model holds the model of the lowest validation loss so far
    best_file = out_dir / "best_model" / "train_config.json"
    best_val = (float(json.loads(best_file.read_text()).get("val_loss", math.inf))
                if ckpt_cfg.keep_best and checkpoint is not None and best_file.is_file() else math.inf)
    if val_batches and start_step == 0:
        val_result = _evaluate(accelerator, model, val_batches, names)
        if metrics:
            metrics.log(0, {"time": 0.0, **val_result})
    show_bar = accelerator.is_main_process and log_cfg.progress_bar
    bar = tqdm(total=optim.max_steps, initial=start_step, desc="train", unit="step", dynamic_ncols=True,
               disable=not show_bar)
    batches = iter(loader)
    model.train()
    t_start = t_last = time.perf_counter()
    train_loss = float("nan")
    # running sums since the last log line, kept on the device (no host sync per step)
    win_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    win_mod = torch.zeros(2, n_mod, dtype=torch.float64, device=accelerator.device)  # [sum of losses, count]
    win_steps, win_tokens = 0, 0
    for step in range(start_step, end_step):
        lr = lr_at(step, optim.lr, optim.warmup_steps, optim.max_steps, optim.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        for micro_step in range(accum):
            batch = next(batches)
            n_tok = int(batch.enc_mask.sum()) + int(batch.dec_mask.sum())
            local_tokens += n_tok
            win_tokens += n_tok
            batch = batch.to(accelerator.device, non_blocking=True)
            sync = contextlib.nullcontext() if micro_step == accum - 1 else accelerator.no_sync(model)
            with sync:
                out = model(batch)
                accelerator.backward(out.loss / accum)
            win_loss += out.loss.detach().double() / accum
            for name, loss in out.losses.items():
                i = names.index(name)
                win_mod[0, i] += loss.detach().double()
                win_mod[1, i] += 1.0
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), optim.grad_clip) if optim.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        win_steps += 1

        if done % log_cfg.log_every == 0 or done in (optim.max_steps, end_step):
            sums = _reduce_sums(accelerator, [float(win_loss), float(win_tokens)] + win_mod.flatten().tolist())
            train_loss = sums[0] / (win_steps * num_processes)
            if not math.isfinite(train_loss):
                raise RuntimeError(f"the training loss became {train_loss} at step {done}: lower optim.lr, or use "
                                   "optim.mixed_precision=no")
            now = time.perf_counter()
            tokens_per_s = sums[1] / max(now - t_last, 1e-9)
            record = {"time": now - t_start, "lr": lr, "tokens_per_s": tokens_per_s, "train/loss": train_loss}
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            mod_sum, mod_count = sums[2:2 + n_mod], sums[2 + n_mod:]
            record.update({f"train/loss/{n}": s / c for n, s, c in zip(names, mod_sum, mod_count) if c > 0})
            if metrics:
                metrics.log(done, record)
            bar.set_postfix(loss=f"{train_loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", lr=f"{lr:.2e}")
            win_loss.zero_()
            win_mod.zero_()
            win_steps, win_tokens, t_last = 0, 0, now
        if val_batches and (done == optim.max_steps or (log_cfg.eval_every and done % log_cfg.eval_every == 0)):
            val_result = _evaluate(accelerator, model, val_batches, names)
            if metrics:
                metrics.log(done, {"time": time.perf_counter() - t_start, **val_result})
            if show_bar:
                bar.write(f"step {done}: val/loss {val_result.get('val/loss', float('nan')):.4f}")
            if ckpt_cfg.keep_best and val_result.get("val/loss", math.inf) < best_val:
                best_val = val_result["val/loss"]
                _save_model_dir(accelerator, model, model_config, config, out_dir, done, "best_model",
                                {"val_loss": best_val})
        if log_cfg.heldout_every and (done == optim.max_steps or done % log_cfg.heldout_every == 0):
            heldout_now(done)
        if done in (optim.max_steps, end_step) or (ckpt_cfg.every and done % ckpt_cfg.every == 0):
            checkpoint_now(done)
        bar.update(1)
    bar.close()
    if start_step >= optim.max_steps and not (out_dir / "model").is_dir():
        checkpoint_now(start_step)  # resumed a finished run whose model directory went missing
    wall = time.perf_counter() - t_start
    run_tokens = global_tokens()
    skipped = {"shards": sum(s.samples.stats.bad_shards for s in sources + val_sources),
               "samples": sum(s.samples.stats.bad_samples for s in sources + val_sources)}
    if skipped["shards"] or skipped["samples"]:
        logger.warning("corrupt data skipped in this run: %d shard(s), %d sample(s) (see the warnings at loading)",
                       skipped["shards"], skipped["samples"])
    if metrics:
        metrics.close()
    summary = {
        "start_step": start_step,
        "steps": end_step - start_step,
        "final_step": end_step,
        "tokens": run_tokens,
        "wall_time_s": wall,
        "tokens_per_s": run_tokens / wall if wall > 0 else 0.0,
        "train_loss": train_loss,
        "val": val_result,
        "skipped": skipped,
        "num_params": n_params,
        "num_processes": num_processes,
        "micro_batch_size": micro,
        "grad_accum_steps": accum,
        "out_dir": str(out_dir),
        "model_dir": str(out_dir / "model"),
        "best_val_loss": best_val if math.isfinite(best_val) else None,
    }
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    """One human line: steps, tokens, wall time, tokens/s, losses."""
    val = summary["val"].get("val/loss")
    return (f"trained steps {summary['start_step']}->{summary['final_step']} ({summary['steps']} this run), "
            f"{summary['tokens']:,} tokens in {summary['wall_time_s']:.1f} s = "
            f"{summary['tokens_per_s']:,.0f} tokens/s; "
            f"train loss {summary['train_loss']:.4f}" + (f", val loss {val:.4f}" if val is not None else "")
            + f"; model: {summary['model_dir']}")


# ------------------------------------------------------------------------------------------------ CLI


def command_arguments(parser: argparse.ArgumentParser, config_example: str, overrides_example: str) -> None:
    """The arguments of a training command (``train``, ``train-clip``): --config, --resume, --print-config, overrides."""
    parser.add_argument("--config", default=None, help=f"YAML/JSON training config (e.g. {config_example})")
    parser.add_argument("--resume", action="store_true",
                        help="continue from the latest complete checkpoint in checkpoint.out_dir (fresh start if none)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config as JSON and exit")
    parser.add_argument("overrides", nargs="*", metavar="KEY=VALUE",
                        help=f"dotted config overrides, e.g. {overrides_example}")


def run_command(args: argparse.Namespace, load_config: Any, train_fn: Any, summary_of: Any) -> int:
    """Run a training command parsed by :func:`command_arguments`: load the config (or print it), train, and print
    the one-line summary on the main process."""
    config = load_config(args.config, args.overrides)
    if args.print_config:
        print(json.dumps(config.to_dict(), indent=2))
        return 0
    summary = train_fn(config, resume=args.resume)
    from accelerate import PartialState

    if PartialState().is_main_process:
        print(summary_of(summary))
    return 0


def add_arguments(parser: argparse.ArgumentParser) -> None:
    command_arguments(parser, "configs/demo.yaml", "optim.lr=3e-4 optim.max_steps=200")


def run(args: argparse.Namespace) -> int:
    return run_command(args, load_train_config, train, summary_line)


def module_main(prog: str, description: str, add_args: Any, run_args: Any, argv: list[str] | None = None) -> int:
    """The ``python -m`` / ``accelerate launch -m`` entry of a training command: parse ``argv`` with ``add_args``,
    set up logging (``-v``: debug), call ``run_args(args)``; a user error is one line on stderr and exit code 2."""
    parser = argparse.ArgumentParser(prog=prog, description=description)
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    add_args(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    try:
        return run_args(args)
    except (ValueError, TypeError, FileNotFoundError) as err:
        if args.verbose:
            raise
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2


def main(argv: list[str] | None = None) -> int:
    """Entry point for ``python -m training.train`` / ``accelerate launch -m training.train``."""
    return module_main("training.train", "train one model on all tasks", add_arguments, run, argv)


if __name__ == "__main__":
    sys.exit(main())
