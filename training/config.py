"""The training config: typed dataclasses loaded strictly from YAML/JSON with dotted command-line overrides.

``load_train_config("configs/demo.yaml", ["optim.lr=3e-4"])`` reads the file, applies the overrides and builds
a :class:`TrainConfig`; unknown keys and wrong types raise :class:`onemodel.config.ConfigError` (a
``ValueError``) naming the key. :func:`validate_train_config` checks what needs the file system or the number
of processes (data directories exist, masked modalities are provided by the tokenizer bundle, the batch size
divides) and runs before any model is built, so a bad config fails in a second, not after the first step.

Sections: ``model`` (the :class:`onemodel.model.OneModelConfig` fields except ``modalities``, which come from
the tokenizer bundle), ``tokenizers`` (bundle directory), ``data`` (weighted sources), ``masking``
(:class:`onemodel.masking.MaskingConfig`), ``optim``, ``checkpoint``, ``logging``.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, TypeVar

from onemodel.config import ConfigError, apply_overrides, from_dict, load_config_file, to_dict
from onemodel.masking import MaskingConfig

T = TypeVar("T")

__all__ = [
    "DataSource",
    "DataConfig",
    "ModelSection",
    "OptimConfig",
    "CheckpointConfig",
    "LoggingConfig",
    "load_typed_config",
    "TrainConfig",
    "load_train_config",
    "validate_train_config",
    "source_kind",
    "bundle_modality_names",
]


@dataclass
class ModelSection:
    """The model architecture: :class:`onemodel.model.OneModelConfig` without ``modalities`` (those come from the
    tokenizer bundle). Same fields, same meaning; a test keeps the two in sync."""

    dim: int = 256
    encoder_depth: int = 4
    decoder_depth: int = 4
    num_heads: int = 4
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    attention: Literal["sdpa", "xformers", "eager"] = "sdpa"
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    init_std: float = 0.02
    init: Literal["xavier", "trunc_normal"] = "xavier"
    embed_init_std: float = 1.0
    aligned_context: bool = True
    learned_positions: bool = False
    tie_embeddings: bool = False
    # e.g. {rgb: codebook}: embed rgb input tokens through the rgb tokenizer's frozen code vectors (see OneModelConfig)
    input_embeddings: dict[str, str] = field(default_factory=dict)
    codebook_dims: dict[str, int] = field(default_factory=dict)  # left empty: read from the tokenizers
    value_dims: dict[str, int] = field(default_factory=dict)  # {rgb: pixels}: patch width, left empty: from the tokenizer
    # {rgb: pixels_clip}: the contrastive encoder whose frozen vision tower reads rgb, e.g. {rgb: runs/clip_shapes/model}
    # (a directory written by onemodel train-clip; its weights are copied into the model at build)
    feature_encoders: dict[str, Any] = field(default_factory=dict)
    gradient_checkpointing: bool = False  # recompute block activations in backward (training-only, not saved)
    # Not OneModelConfig fields: max tokens (eos included) of each sequence modality, e.g. {caption: 48}; names left
    # out take the longest sequence recorded in the token shards' meta.json (the bundle defaults for raw data).
    max_lengths: dict[str, int] = field(default_factory=dict)

    def __post_init__(self) -> None:
        bad = {k: v for k, v in self.max_lengths.items() if v < 0}
        if bad:
            raise ValueError(f"model.max_lengths must be >= 0 (0 = leave the modality out), got {bad}")


@dataclass
class DataSource:
    """One set of shards in the training mixture.

    path: a token-shard directory written by ``onemodel tokenize`` (fast path) or, with
        ``tokenize_on_the_fly: true``, a raw dataset directory (``onemodel data`` / converted shards) that is
        tokenized in the data loader workers.
    weight: relative sampling weight in the mixture (> 0).
    modalities: the modalities this set trains (a subset of what it holds); null = all it holds. Use it to learn
        captioning from one set and depth from another.
    split: the sub-directory with the training shards ("train"); the validation split is ``DataConfig.val_split``.
    """

    path: str
    weight: float = 1.0
    modalities: Optional[list[str]] = None
    tokenize_on_the_fly: bool = False
    split: str = "train"

    def __post_init__(self) -> None:
        if not self.weight > 0:
            raise ValueError(f"data source {self.path!r}: weight must be > 0, got {self.weight}")
        if self.modalities is not None and not self.modalities:
            raise ValueError(f"data source {self.path!r}: modalities must be null (all) or a non-empty list")


@dataclass
class DataConfig:
    """sources: the weighted training mixture; val_split: the split of every source used for the validation loss
    (null = no validation); num_workers: DataLoader worker processes per training process; seed: sample order and
    masking seed (the stream is a pure function of (seed, sample index), independent of workers and processes);
    max_bad_fraction: corrupt shards and samples are logged and skipped, but when more than this fraction of a
    source's shards or samples is unreadable, training stops with an error (0 = refuse any corrupt data)."""

    sources: list[DataSource] = field(default_factory=list)
    val_split: Optional[str] = "val"
    num_workers: int = 1
    seed: int = 0
    max_bad_fraction: float = 0.05

    def __post_init__(self) -> None:
        if self.num_workers < 0:
            raise ValueError(f"data.num_workers must be >= 0, got {self.num_workers}")
        if not 0.0 <= self.max_bad_fraction < 1.0:
            raise ValueError(f"data.max_bad_fraction must be in [0, 1), got {self.max_bad_fraction}")


@dataclass
class OptimConfig:
    """AdamW + linear warmup + cosine decay to ``lr * min_lr_ratio``.

    batch_size: global samples per optimizer step (all processes, all accumulation steps).
    micro_batch_size: samples per forward pass per process; null = batch_size / num_processes (no accumulation).
        Gradient accumulation steps = batch_size / (micro_batch_size * num_processes), which must be an integer.
    """

    lr: float = 1e-3
    weight_decay: float = 0.05
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    eps: float = 1e-8
    warmup_steps: int = 100
    max_steps: int = 1000
    min_lr_ratio: float = 0.1
    grad_clip: float = 1.0
    batch_size: int = 64
    micro_batch_size: Optional[int] = None
    mixed_precision: Literal["no", "bf16", "fp16"] = "no"

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be > 0, got {self.lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.max_steps < 1:
            raise ValueError(f"optim.max_steps must be >= 1, got {self.max_steps}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0 <= self.min_lr_ratio <= 1:
            raise ValueError(f"optim.min_lr_ratio must be in [0, 1], got {self.min_lr_ratio}")
        if self.batch_size < 1:
            raise ValueError(f"optim.batch_size must be >= 1, got {self.batch_size}")
        if self.micro_batch_size is not None and self.micro_batch_size < 1:
            raise ValueError(f"optim.micro_batch_size must be >= 1 or null, got {self.micro_batch_size}")
        if self.grad_clip < 0:
            raise ValueError(f"optim.grad_clip must be >= 0 (0 = off), got {self.grad_clip}")


@dataclass
class CheckpointConfig:
    """out_dir: run directory (checkpoints/, model/, metrics.jsonl); every: checkpoint every N steps (0 = only at
    the end); keep_last: complete checkpoints kept (0 = all); keep_best: also keep the model of the lowest
    validation loss (measured every ``logging.eval_every`` steps) in ``out_dir/best_model``."""

    out_dir: str = "runs/onemodel"
    every: int = 500
    keep_last: int = 2
    keep_best: bool = False

    def __post_init__(self) -> None:
        if self.every < 0 or self.keep_last < 0:
            raise ValueError("checkpoint.every and checkpoint.keep_last must be >= 0")


@dataclass
class LoggingConfig:
    """log_every: training-loss line every N steps; eval_every: validation loss every N steps (0 = only at the end);
    eval_batches: size of the fixed validation set in global batches (eval_batches x optim.batch_size samples, the
    same set whatever the number of processes); tensorboard: also write TensorBoard events."""

    log_every: int = 10
    eval_every: int = 200
    eval_batches: int = 4
    tensorboard: bool = False
    progress_bar: bool = True
    # Learning curves of the real tasks: every heldout_every steps (0 = never) the model, through the pipeline, is
    # scored on the first heldout_limit samples of the raw dataset heldout_data/<heldout_split> for heldout_tasks
    # (names of training.evaluation.evaluate.TASKS); logged as heldout/<task metric> in the metrics log.
    heldout_every: int = 0
    heldout_data: str | None = None
    heldout_split: str = "val"
    heldout_limit: int = 50
    heldout_tasks: list[str] = field(default_factory=lambda: ["vqa", "caption"])

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ValueError(f"logging.log_every must be >= 1, got {self.log_every}")
        if self.eval_every < 0 or self.eval_batches < 0:
            raise ValueError("logging.eval_every and logging.eval_batches must be >= 0")
        if self.heldout_every < 0 or self.heldout_limit < 1:
            raise ValueError("logging.heldout_every must be >= 0 and logging.heldout_limit >= 1")
        if self.heldout_every and not self.heldout_data:
            raise ValueError("logging.heldout_every needs logging.heldout_data: a raw dataset directory (e.g. the "
                             "one `onemodel data shapes` wrote), whose heldout_split the held-out evals score")


@dataclass
class TrainConfig:
    """Everything one training run needs. ``tokenizers`` is the tokenizer bundle directory; it defines the
    model's modalities and is copied into the saved model directory. ``seed``: model initialisation (and dropout)
    seed. ``num_threads``: torch intra-op threads per training process (null = torch default; 1 is fastest for
    tiny models on a busy CPU)."""

    tokenizers: str = ""
    model: ModelSection = field(default_factory=ModelSection)
    data: DataConfig = field(default_factory=DataConfig)
    masking: MaskingConfig = field(default_factory=MaskingConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    seed: int = 0
    num_threads: Optional[int] = None

    def __post_init__(self) -> None:
        if self.num_threads is not None and self.num_threads < 1:
            raise ValueError(f"num_threads must be >= 1 or null (torch default), got {self.num_threads}")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)


def load_typed_config(cls: type[T], path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> T:
    """Read a YAML/JSON config file (or start from the defaults when ``path`` is None), apply dotted overrides
    (``optim.lr=3e-4``), and build the dataclass ``cls`` (a training command's config with an ``optim:
    OptimConfig`` section). Errors name the offending key."""
    data = load_config_file(path) if path is not None else {}
    data = apply_overrides(data, list(overrides))
    optim = data.get("optim")
    if isinstance(optim, dict) and optim.get("mixed_precision") is False:
        optim["mixed_precision"] = "no"  # YAML 1.1 reads a bare `no` as false (optim.mixed_precision=no)
    return from_dict(cls, data)


def load_train_config(path: str | Path | None = None, overrides: list[str] | tuple[str, ...] = ()) -> TrainConfig:
    """:func:`load_typed_config` for :class:`TrainConfig` (``onemodel train``)."""
    return load_typed_config(TrainConfig, path, overrides)


TOKEN_FORMAT = "onemodel-token-shards"  # meta.json "format" of token shards (training/pretokenize.py)


def read_source_meta(path: str | Path) -> dict[str, Any]:
    """``meta.json`` of a data directory ({} when absent)."""
    meta = Path(path) / "meta.json"
    if not meta.is_file():
        return {}
    try:
        info = json.loads(meta.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(meta)!r} is not valid JSON ({err})") from err
    return info if isinstance(info, dict) else {}


def source_kind(path: str | Path) -> str:
    """'tokens' for a token-shard directory (``meta.json`` with ``"format": "onemodel-token-shards"``), else 'raw'."""
    return "tokens" if read_source_meta(path).get("format") == TOKEN_FORMAT else "raw"


def bundle_modality_names(bundle_dir: str | Path) -> list[str]:
    """Names of the modalities a tokenizer bundle provides."""
    from tokenizers_mm.bundle import TokenizerBundle

    return [spec["name"] for spec in TokenizerBundle.from_pretrained(bundle_dir).modalities()]


def validate_train_config(config: TrainConfig, num_processes: int = 1,
                          modality_names: list[str] | None = None) -> dict[str, Any]:
    """Fail fast on mistakes that the types cannot catch; returns derived values.

    Checks: the tokenizer bundle and every data directory exist; each source's modalities and every modality
    named in the masking config are provided by the bundle; fp16 only on CUDA; ``optim.batch_size`` is divisible
    by ``micro_batch_size * num_processes``. ``modality_names``: what the bundle provides (loaded from
    ``config.tokenizers`` when None). Returns ``{"micro_batch_size", "grad_accum_steps", "modalities"}``.
    """
    if not config.tokenizers:
        raise ValueError("config key 'tokenizers' is empty: set it to a tokenizer bundle directory "
                         "(written by 'onemodel train-tokenizer' / the demo)")
    bundle = Path(config.tokenizers)
    if not bundle.is_dir():
        raise FileNotFoundError(f"tokenizers: bundle directory {str(bundle)!r} does not exist; train the tokenizers "
                                "first ('onemodel demo' or 'onemodel train-tokenizer') or fix the path")
    provided = list(modality_names) if modality_names is not None else bundle_modality_names(bundle)
    if not config.data.sources:
        raise ValueError("data.sources is empty: list at least one token-shard or raw-shard directory")
    for i, source in enumerate(config.data.sources):
        key = f"data.sources[{i}]"
        path = Path(source.path)
        if not path.is_dir():
            raise FileNotFoundError(f"{key}.path: data directory {source.path!r} does not exist; create it with "
                                    "'onemodel data' / 'onemodel tokenize' or fix the path")
        if not (path / source.split).is_dir() and not (source.split == "train" and any(path.glob("*.tar"))):
            raise FileNotFoundError(f"{key}.split: {str(path / source.split)!r} does not exist; the directory must "
                                    f"hold a '{source.split}/' sub-directory of shards")
        kind = source_kind(path)
        if kind == "raw" and not source.tokenize_on_the_fly:
            raise ValueError(f"{key}: {source.path!r} holds raw shards (no token-shard meta.json); pre-tokenize it "
                             "with 'onemodel tokenize' or set tokenize_on_the_fly: true")
        for name in source.modalities or []:
            if name not in provided:
                raise ValueError(f"{key}.modalities: {name!r} is not provided by the tokenizer bundle "
                                 f"{str(bundle)!r} (it provides {provided})")
    for name, length in config.model.max_lengths.items():
        # 0 leaves a modality out, so it is absent from `provided`, which already has the overrides applied
        if name not in provided and not (length == 0 and name in ("caption", "question", "answer", "det")):
            raise ValueError(f"model.max_lengths: {name!r} is not a sequence modality of the tokenizer bundle "
                             f"{str(bundle)!r} (it provides {provided})")
    for key, names in _masking_modality_names(config.masking).items():
        for name in names:
            if name not in provided:
                raise ValueError(f"masking.{key}: modality {name!r} is not provided by any tokenizer in "
                                 f"{str(bundle)!r} (it provides {provided}); remove it or add its tokenizer")
    optim = config.optim
    if optim.mixed_precision == "fp16":
        import torch

        if not torch.cuda.is_available():
            raise ValueError("optim.mixed_precision: fp16 needs a CUDA GPU (it is ~1000x slow on CPU); use bf16 or no")
    if num_processes < 1:
        raise ValueError(f"num_processes must be >= 1, got {num_processes}")
    micro = optim.micro_batch_size or optim.batch_size // num_processes
    if micro < 1 or optim.batch_size % (micro * num_processes) != 0:
        raise ValueError(
            f"optim.batch_size={optim.batch_size} must be divisible by micro_batch_size ({micro}) x processes "
            f"({num_processes}) = {micro * num_processes}; change optim.batch_size or optim.micro_batch_size"
        )
    return {
        "micro_batch_size": micro,
        "grad_accum_steps": optim.batch_size // (micro * num_processes),
        "modalities": provided,
    }


def _masking_modality_names(masking: MaskingConfig) -> dict[str, list[str]]:
    """Every modality name the masking config mentions, by field name."""
    out: dict[str, list[str]] = {}
    for key in ("input_modalities", "target_modalities", "alpha_scale"):
        value = getattr(masking, key)
        if value:
            out[key] = [str(v) for v in value]
    for i, task in enumerate(getattr(masking, "tasks", [])):
        out[f"tasks[{i}]"] = [*task.inputs, *task.targets]
    return out
