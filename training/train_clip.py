"""Train a contrastive image-text encoder (CLIP / SigLIP, optional CoCa) on raw image + text shards.

::

    onemodel train-clip --config configs/clip_shapes.yaml [optim.max_steps=2000 model.loss=siglip ...] [--resume]
    ACCELERATE_USE_CPU=1 accelerate launch --multi_gpu --num_processes 2 --num_machines 1 \\
        -m training.train_clip --config configs/clip_shapes.yaml                         # DDP, 2 CPU processes

Same run-directory conventions as ``onemodel train`` (``training/train.py``), with the same helpers
(``training/checkpointing.py``, ``training/run_log.py``)::

    OUT/train_config.json      the resolved config
    OUT/metrics.jsonl          {"step", "time", "cpu_time", "lr", "samples_per_s", "train/loss", "logit_scale",
                                "val/i2t_r1", ...}  (time: wall seconds; cpu_time: CPU seconds of the process)
    OUT/checkpoints/step_N/    accelerate state (model, optimizer, RNG) + trainer_state.json; --resume continues
    OUT/model/                 ImageTextEncoder.save_pretrained (transformers CLIPModel + tokenizer/ + heads)

Data: ``data.path`` is a raw dataset (``onemodel data shapes`` / ``data convert``) with ``train/`` (and
``val/``) shards holding ``rgb.png`` and a text file (``data.text_key``, e.g. ``caption``). The training split is
decoded once into memory (uint8 images at ``model.image_size``); sample ``i`` of the stream is a pure function
of ``(data.seed, i)`` (epoch-wise permutations), and optimizer step ``s`` uses samples ``[s*B, (s+1)*B)``, rank
``r`` of ``P`` processes taking the ``r``-th slice of ``B/P``: exact resume, and 2 processes see the same global
batch as 1. The contrastive loss needs the whole batch in one forward, so there is no gradient accumulation:
``optim.batch_size`` must equal ``micro_batch_size x processes``.

Text: the project's text tokenizer from ``tokenizer`` (a text-tokenizer directory or a bundle holding ``text/``);
when empty, one is trained on the training texts (deterministic whole-word vocabulary on closed vocabularies)
and saved in ``OUT/model/tokenizer``.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

import numpy as np

from onemodel.config import to_dict
from onemodel.contrastive import ContrastiveConfig
from training.config import CheckpointConfig, LoggingConfig, OptimConfig, load_typed_config
from training.hard_negatives import HardNegativeConfig

logger = logging.getLogger("training.train_clip")

__all__ = ["ClipDataConfig", "ClipTrainConfig", "load_clip_config", "train_clip", "ClipSamples",
           "load_clip_samples", "add_arguments", "run", "main"]


@dataclass
class ClipDataConfig:
    """path: raw dataset directory (with ``train/`` and ``val/`` shard directories); text_key: the text of each
    sample (``caption``, or another text file in the shards); max_train_samples: use only the first N training
    samples (null = all); val_samples: held-out samples scored during training (retrieval recall); seed: sample
    order."""

    path: str = ""
    split: str = "train"
    val_split: Optional[str] = "val"
    text_key: str = "caption"
    max_train_samples: Optional[int] = None
    val_samples: int = 1000
    seed: int = 0

    def __post_init__(self) -> None:
        if self.max_train_samples is not None and self.max_train_samples < 1:
            raise ValueError(f"data.max_train_samples must be >= 1 or null, got {self.max_train_samples}")
        if self.val_samples < 0:
            raise ValueError(f"data.val_samples must be >= 0, got {self.val_samples}")


@dataclass
class ClipTrainConfig:
    """Everything one contrastive run needs (strict: unknown keys are refused). ``optim``, ``checkpoint`` and
    ``logging`` are the sections of ``onemodel train`` (``eval_every``: held-out retrieval every N steps);
    ``negatives``: hard-negative captions (``training/hard_negatives.py``)."""

    model: ContrastiveConfig = field(default_factory=ContrastiveConfig)
    data: ClipDataConfig = field(default_factory=ClipDataConfig)
    negatives: HardNegativeConfig = field(default_factory=HardNegativeConfig)
    tokenizer: str = ""
    optim: OptimConfig = field(default_factory=lambda: OptimConfig(lr=5e-4, weight_decay=0.1, betas=[0.9, 0.98],
                                                                   warmup_steps=50, max_steps=1000, batch_size=128))
    checkpoint: CheckpointConfig = field(default_factory=lambda: CheckpointConfig(out_dir="runs/clip"))
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 0
    num_threads: Optional[int] = None

    def __post_init__(self) -> None:
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or null (torch default), got {self.num_threads}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def load_clip_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> ClipTrainConfig:
    """YAML/JSON file (or the defaults) + dotted overrides -> :class:`ClipTrainConfig`; errors name the key."""
    return load_typed_config(ClipTrainConfig, path, overrides)


def validate_clip_config(config: ClipTrainConfig, num_processes: int) -> int:
    """Fail fast on what the types cannot catch; returns the per-process batch size."""
    data = config.data
    if not data.path:
        raise ValueError("data.path is empty: set it to a raw dataset directory (e.g. from 'onemodel data shapes')")
    if not (Path(data.path) / data.split).is_dir():
        raise FileNotFoundError(f"data.path/split: {str(Path(data.path) / data.split)!r} does not exist; create the "
                                "data with 'onemodel data shapes --out DIR' or fix data.path")
    if config.tokenizer and not Path(config.tokenizer).is_dir():
        raise FileNotFoundError(f"tokenizer: {config.tokenizer!r} does not exist (a text tokenizer directory or a "
                                "bundle with text/); leave it empty to train one on the captions")
    optim = config.optim
    micro = optim.micro_batch_size or optim.batch_size // num_processes
    if micro < 1 or micro * num_processes != optim.batch_size:
        raise ValueError(f"optim.batch_size={optim.batch_size} must equal micro_batch_size ({micro}) x processes "
                         f"({num_processes}): the contrastive loss needs the whole batch in one step (no gradient "
                         "accumulation); set optim.micro_batch_size=null")
    if optim.mixed_precision == "fp16":
        raise ValueError("optim.mixed_precision: use bf16 or no (fp16 is not supported for the contrastive loss)")
    return micro


# ------------------------------------------------------------------------------------------------ data


@dataclass
class ClipSamples:
    """A split in memory: ``rgb`` uint8 ``(N, S, S, 3)``, ``texts`` and the shapes ``scenes`` (None elsewhere)."""

    rgb: np.ndarray
    texts: list[str]
    scenes: list[Optional[dict[str, Any]]]

    def __len__(self) -> int:
        return len(self.texts)


def load_clip_samples(path: str | Path, split: str, image_size: int, text_key: str = "caption",
                      limit: int | None = None, progress: bool = False) -> ClipSamples:
    """Decode ``path/split`` shards into memory: images resized to ``image_size``, the ``text_key`` text."""
    from training.data.reader import iter_samples
    from training.data.shards import MODALITY_FILES

    if text_key not in MODALITY_FILES:
        raise ValueError(f"data.text_key {text_key!r} is not a shard modality; choose from {list(MODALITY_FILES)}")
    wanted = ["rgb", text_key] + (["scene"] if "scene" in MODALITY_FILES else [])
    rgb, texts, scenes = [], [], []
    from tqdm.auto import tqdm

    bar = tqdm(desc=f"load {split}", unit="sample", disable=not progress, total=limit)
    with _whole_split_on_every_rank():
        samples = list(_take(iter_samples(Path(path) / split, resolution=image_size, modalities=wanted,
                                          require=["rgb", text_key]), limit))
    for sample in samples:
        text = sample[text_key]
        if not isinstance(text, str) or not text.strip():
            raise ValueError(f"data.text_key {text_key!r}: sample {sample.get('__key__')} holds "
                             f"{type(text).__name__}, not a non-empty text; choose a text modality (e.g. caption)")
        rgb.append(sample["rgb"])
        texts.append(text)
        scenes.append(sample.get("scene"))
        bar.update(1)
    bar.close()
    if not texts:
        raise ValueError(f"{str(Path(path) / split)!r} holds no samples with rgb and {text_key!r}")
    return ClipSamples(np.stack(rgb), texts, scenes)


def _take(items: Any, limit: int | None) -> Any:
    for i, item in enumerate(items):
        if limit is not None and i >= limit:
            return
        yield item


class _whole_split_on_every_rank:
    """The shard reader gives each distributed rank a disjoint part of the shards (webdataset's split_by_node,
    which reads RANK / WORLD_SIZE from the environment); here every process must hold the whole split, so the
    reader is shown a single process while it runs."""

    def __enter__(self) -> None:
        self.saved = {k: os.environ.get(k) for k in ("RANK", "WORLD_SIZE")}
        os.environ.update(RANK="0", WORLD_SIZE="1")

    def __exit__(self, *exc: Any) -> None:
        for key, value in self.saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def sample_indices(seed: int, n: int, start: int, count: int) -> np.ndarray:
    """Global stream positions ``[start, start+count)`` -> dataset indices: a fresh permutation of ``n`` per epoch,
    a pure function of ``(seed, epoch)``."""
    out = np.empty(count, dtype=np.int64)
    pos = start
    cache: dict[int, np.ndarray] = {}
    for k in range(count):
        epoch, i = divmod(pos, n)
        if epoch not in cache:
            cache[epoch] = np.random.default_rng([int(seed), int(epoch)]).permutation(n)
        out[k] = cache[epoch][i]
        pos += 1
    return out


def load_text_tokenizer(config: ClipTrainConfig, texts: list[str]) -> Any:
    """The configured project text tokenizer, or one trained on ``texts``."""
    from tokenizers_mm.text import TextTokenizer

    if config.tokenizer:
        path = Path(config.tokenizer)
        path = path / "text" if (path / "text" / "tokenizer.json").is_file() else path
        return TextTokenizer.from_pretrained(path)
    return TextTokenizer.train(texts, vocab_size=4096, num_sentinels=1, num_loc_bins=2)


# ------------------------------------------------------------------------------------------------ the run


def _save_model_dir(accelerator: Any, model: Any, config: ClipTrainConfig, out_dir: Path, step: int) -> Path:
    from training.checkpointing import replace_dir_atomic, write_json_atomic

    final = out_dir / "model"
    if accelerator.is_main_process:
        tmp = out_dir / "model.tmp"
        if tmp.exists():
            shutil.rmtree(tmp)
        accelerator.unwrap_model(model).save_pretrained(tmp)
        write_json_atomic(tmp / "train_config.json", {"step": step, "config": config.to_dict()})
        replace_dir_atomic(tmp, final)
        logger.info("saved model directory %s (step %d)", final, step)
    accelerator.wait_for_everyone()
    return final


def train_clip(config: ClipTrainConfig, resume: bool = False, stop_at_step: int | None = None) -> dict[str, Any]:
    """Train as ``config`` says (``resume``: continue from the latest complete checkpoint; ``stop_at_step``: leave
    after that step with a checkpoint). Returns ``{"start_step", "final_step", "steps", "samples_per_s",
    "wall_time_s", "train_loss", "val": {...}, "out_dir", "model_dir", "num_processes", "num_params"}``."""
    import torch
    from accelerate import Accelerator, PartialState
    from accelerate.state import AcceleratorState
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from onemodel.contrastive import ImageTextEncoder
    from training.checkpointing import latest_checkpoint, resume_from, save_checkpoint, write_json_atomic
    from training.evaluation.contrastive import retrieval_metrics, zero_shot_shapes
    from training.hard_negatives import tokenized_negatives
    from training.run_log import MetricsLog
    from training.train import lr_at, param_groups

    if not isinstance(config, ClipTrainConfig):
        raise TypeError(f"train_clip() needs a ClipTrainConfig (load_clip_config), got {type(config).__name__}")
    use_cpu = not torch.cuda.is_available() or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes")
    num_processes = PartialState(cpu=use_cpu).num_processes
    micro = validate_clip_config(config, num_processes)
    optim, log_cfg, ckpt_cfg, data_cfg = config.optim, config.logging, config.checkpoint, config.data
    if AcceleratorState._shared_state and AcceleratorState._shared_state.get("_mixed_precision") != optim.mixed_precision:
        AcceleratorState._reset_state(reset_partial_state=False)
    accelerator = Accelerator(cpu=use_cpu, mixed_precision=optim.mixed_precision)
    out_dir = Path(ckpt_cfg.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    checkpoint = latest_checkpoint(ckpt_dir) if resume else None
    if not resume and checkpoint is None and latest_checkpoint(ckpt_dir) is not None:
        raise ValueError(f"{str(ckpt_dir)!r} already holds checkpoints: pass --resume (resume=True) to continue that "
                         "run, or choose another checkpoint.out_dir")
    if config.num_threads is not None:
        torch.set_num_threads(config.num_threads)
    show_bar = accelerator.is_main_process and log_cfg.progress_bar

    # ---- data (every process holds the training split; each takes its slice of every global batch)
    size = config.model.image_size
    train_set = load_clip_samples(data_cfg.path, data_cfg.split, size, data_cfg.text_key, data_cfg.max_train_samples,
                                  progress=show_bar)
    val_set = None
    if data_cfg.val_split and data_cfg.val_samples and (Path(data_cfg.path) / data_cfg.val_split).is_dir():
        val_set = load_clip_samples(data_cfg.path, data_cfg.val_split, size, data_cfg.text_key, data_cfg.val_samples)
    tokenizer = load_text_tokenizer(config, train_set.texts)

    set_seed(config.seed)
    model = ImageTextEncoder.from_config(config.model, tokenizer)
    n_params = model.num_params()
    # the temperature (a 0-dim parameter) gets no weight decay, like norms, biases and embeddings
    optimizer = torch.optim.AdamW(param_groups(model, optim.weight_decay), lr=optim.lr, betas=tuple(optim.betas),
                                  eps=optim.eps)
    model, optimizer = accelerator.prepare(model, optimizer)
    core = accelerator.unwrap_model(model)

    start_step = 0
    if checkpoint is not None:
        start_step = int(resume_from(accelerator, checkpoint, optim.batch_size, data_cfg.seed)["step"])
    if accelerator.is_main_process:
        out_dir.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out_dir / "train_config.json", config.to_dict())
    metrics = (MetricsLog(out_dir, log_cfg.tensorboard, truncate_after_step=start_step if checkpoint else None)
               if accelerator.is_main_process else None)
    logger.info("contrastive model (%s loss%s): %.2fM parameters; %d training samples; %d process(es) x %d = batch %d",
                config.model.loss, ", CoCa" if config.model.coca_weight else "", n_params / 1e6, len(train_set),
                num_processes, micro, optim.batch_size)

    # pre-tokenize every training text once (ids are padded to the longest text of each batch later)
    all_ids, all_mask = core.tokenize(train_set.texts)
    all_ids, all_mask = all_ids.cpu(), all_mask.cpu()
    rank = accelerator.process_index

    def batch_at(step: int) -> tuple[Any, ...]:
        first = step * optim.batch_size + rank * micro
        idx = sample_indices(data_cfg.seed, len(train_set), first, micro)
        mask = all_mask[idx]
        width = int(mask.sum(1).max())
        pixels = core.normalize(torch.from_numpy(train_set.rgb[idx]))
        batch = (pixels, all_ids[idx, :width].to(accelerator.device), mask[:, :width].to(accelerator.device))
        if not config.negatives.enabled:
            return batch
        texts = [train_set.texts[i] for i in idx]
        negatives = tokenized_negatives(core, texts, range(first, first + micro), config.negatives, data_cfg.seed)
        return (*batch, *negatives)

    def evaluate_val() -> dict[str, float]:
        if val_set is None or not accelerator.is_main_process:
            return {}
        was_training = model.training
        model.eval()
        with torch.no_grad():
            img = torch.cat([core.image_embeddings(core.normalize(torch.from_numpy(val_set.rgb[i:i + 256])))
                             for i in range(0, len(val_set), 256)])
            txt = core.encode_text(val_set.texts)
            result = retrieval_metrics(img, txt, val_set.texts, scenes=val_set.scenes)
            if any(s is not None for s in val_set.scenes):  # shapes: zero-shot attributes of the single objects
                zero_shot = zero_shot_shapes(core, list(val_set.rgb), val_set.scenes)
                result.update({f"zs_{k}": v for k, v in zero_shot.items()})
        model.train(was_training)
        return {f"val/{k}": v for k, v in result.items()}

    def checkpoint_now(step: int) -> None:
        state = {"step": step, "samples_seen": step * optim.batch_size,
                 "data": {"seed": data_cfg.seed, "batch_size": optim.batch_size,
                          "next_sample_index": step * optim.batch_size, "num_processes": num_processes}}
        save_checkpoint(accelerator, ckpt_dir, state, ckpt_cfg.keep_last)
        _save_model_dir(accelerator, model, config, out_dir, step)

    end_step = optim.max_steps if stop_at_step is None else max(start_step, min(stop_at_step, optim.max_steps))
    bar = tqdm(total=optim.max_steps, initial=start_step, desc="train-clip", unit="step", dynamic_ncols=True,
               disable=not show_bar)
    model.train()
    t_start = t_last = time.perf_counter()
    cpu_start = time.process_time()  # CPU seconds of this process: on a shared machine, what the run really cost
    train_loss, val_result = float("nan"), {}
    win_loss = torch.zeros((), dtype=torch.float64, device=accelerator.device)
    win_steps = 0
    for step in range(start_step, end_step):
        lr = lr_at(step, optim.lr, optim.warmup_steps, optim.max_steps, optim.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        out = model(*batch_at(step))
        accelerator.backward(out.loss)
        grad_norm = accelerator.clip_grad_norm_(model.parameters(), optim.grad_clip) if optim.grad_clip > 0 else None
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        with torch.no_grad():  # CLIP clamps the learned temperature at 100
            core.hf.logit_scale.clamp_(0.0, math.log(100.0))
        done = step + 1
        win_loss += out.loss.detach().double()
        win_steps += 1
        if done % log_cfg.log_every == 0 or done in (optim.max_steps, end_step):
            train_loss = float(win_loss) / win_steps  # every process computes the same global-batch loss
            if not math.isfinite(train_loss):
                raise RuntimeError(f"the training loss became {train_loss} at step {done}: lower optim.lr")
            now = time.perf_counter()
            record = {"time": now - t_start, "cpu_time": time.process_time() - cpu_start, "lr": lr,
                      "train/loss": train_loss,
                      "samples_per_s": win_steps * optim.batch_size / max(now - t_last, 1e-9),
                      "logit_scale": float(core.hf.logit_scale.detach().exp())}
            if out.caption_loss is not None:
                record["train/caption_loss"] = float(out.caption_loss)
            if grad_norm is not None:
                record["grad_norm"] = float(grad_norm)
            if metrics:
                metrics.log(done, record)
            bar.set_postfix(loss=f"{train_loss:.3f}", smp_s=f"{record['samples_per_s']:,.0f}", lr=f"{lr:.2e}")
            win_loss.zero_()
            win_steps, t_last = 0, now
        if val_set is not None and (done == optim.max_steps or (log_cfg.eval_every and done % log_cfg.eval_every == 0)):
            val_result = evaluate_val()
            if metrics and val_result:
                metrics.log(done, {"time": time.perf_counter() - t_start, **val_result})
            if show_bar and val_result:
                zs = (f", zero-shot colour {val_result['val/zs_color_acc']:.3f} shape "
                      f"{val_result['val/zs_shape_acc']:.3f}" if "val/zs_shape_acc" in val_result else "")
                bar.write(f"step {done}: val i2t R@1 {val_result['val/i2t_r1']:.3f}, t2i R@1 "
                          f"{val_result['val/t2i_r1']:.3f}{zs}")
            t_last = time.perf_counter()  # evaluation time is not training throughput
        if done in (optim.max_steps, end_step) or (ckpt_cfg.every and done % ckpt_cfg.every == 0):
            checkpoint_now(done)
            t_last = time.perf_counter()
        bar.update(1)
    bar.close()
    if start_step >= optim.max_steps and not (out_dir / "model").is_dir():
        checkpoint_now(start_step)
    wall = time.perf_counter() - t_start
    if metrics:
        metrics.close()
    steps = end_step - start_step
    summary = {
        "start_step": start_step, "final_step": end_step, "steps": steps, "wall_time_s": wall,
        "cpu_time_s": time.process_time() - cpu_start,
        "samples_per_s": steps * optim.batch_size / wall if wall > 0 else 0.0, "train_loss": train_loss,
        "val": val_result, "num_params": n_params, "num_processes": num_processes,
        "out_dir": str(out_dir), "model_dir": str(out_dir / "model"),
    }
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return summary


def summary_line(summary: dict[str, Any]) -> str:
    val = summary["val"]
    extra = (f", val i2t R@1 {val['val/i2t_r1']:.3f} t2i R@1 {val['val/t2i_r1']:.3f}" if "val/i2t_r1" in val else "")
    return (f"trained steps {summary['start_step']}->{summary['final_step']} ({summary['steps']} this run) in "
            f"{summary['wall_time_s']:.1f} s = {summary['samples_per_s']:,.0f} samples/s; train loss "
            f"{summary['train_loss']:.4f}{extra}; model: {summary['model_dir']}")


# ------------------------------------------------------------------------------------------------ CLI


def add_arguments(parser: argparse.ArgumentParser) -> None:
    from training.train import command_arguments

    command_arguments(parser, "configs/clip_shapes.yaml", "model.loss=siglip optim.max_steps=200")


def run(args: argparse.Namespace) -> int:
    from training.train import run_command

    return run_command(args, load_clip_config, train_clip, summary_line)


def main(argv: list[str] | None = None) -> int:
    """``python -m training.train_clip`` / ``accelerate launch -m training.train_clip``."""
    from training.train import module_main

    return module_main("training.train_clip", "train a contrastive image-text encoder", add_arguments, run, argv)

if __name__ == "__main__":
    sys.exit(main())
