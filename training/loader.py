"""Training data: in-memory shard sets, a weighted mixture, masking in DataLoader workers, exact resume.

Design: the training stream is a **pure function of the global sample index** ``g``. Sample ``g`` draws its
source (by the mixture weights) and an item of that source (uniformly, with replacement) and is masked, all
from one generator seeded with ``(data.seed, masking.seed, stream, g)``. The global batch of optimizer step ``s`` is the samples
``s * batch_size ... (s + 1) * batch_size - 1``, cut into micro-batches of ``micro_batch_size`` ("slots");
process ``rank`` takes slots ``a * num_processes + rank`` for accumulation step ``a``. So:

- the stream is deterministic for a seed and independent of ``num_workers`` and of how the global batch is
  split over processes and accumulation steps (2 processes x 1 step see exactly the samples of 1 process x
  2 steps);
- resuming needs only the step: the loader restarts at ``start_step`` (the data position saved in the
  checkpoint) and yields what the uninterrupted run would have;
- DataLoader worker ``w`` of ``W`` produces this process's micro-batches ``k`` with ``k % W == w``, which is
  the order in which ``torch.utils.data.DataLoader`` collects them from its workers.

Shard sets are read into memory once (token shards are small: ~2-4 KB per sample). A raw set
(``tokenize_on_the_fly``) keeps each sample's encoded files (PNG/NPY bytes) in memory and is decoded and
tokenized by the tokenizer bundle inside the workers.

Corrupt data is logged and skipped, for token and raw shards alike: a shard that is not a readable tar (random
bytes, truncated) is skipped (the samples before the damage are kept), a token sample with an unreadable member
(``.npy`` members are read with ``allow_pickle=False``; a pickle or garbage is refused, naming shard and key) is
skipped, and the counts are logged when the set is loaded and at the end of training. When more than
``max_bad_fraction`` of a source's shards or samples is unreadable, loading raises ``ValueError`` instead of
training on what is left. A raw sample that fails to decode in a worker is replaced by the next readable sample
of its set (a deterministic choice, so resume stays exact) and logged.
"""

from __future__ import annotations

import io
import json
import logging
import os
import tarfile
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset, get_worker_info

from onemodel.batch import MaskedSample, MultimodalBatch, collate
from onemodel.masking import MaskingConfig, TextSpecialIds, mask_sample, select_qa
from onemodel.modalities import Modality
from onemodel.pixel_inputs import attach_pixels, pixels_key

logger = logging.getLogger(__name__)

__all__ = [
    "TokenShardSet",
    "RawShardSet",
    "MixtureSource",
    "load_source",
    "MaskedStream",
    "sample_rng",
    "build_train_loader",
    "build_val_batches",
    "TRAIN_STREAM",
    "VAL_STREAM",
]

TRAIN_STREAM = 0
VAL_STREAM = 1
QA_KEY = "qa"
QA_MODALITIES = ("question", "answer")


def _shard_paths(directory: Path) -> list[Path]:
    paths = sorted(directory.glob("*.tar"))
    if not paths:
        raise FileNotFoundError(f"no *.tar shards in {str(directory)!r}")
    return paths


@dataclass
class ShardReadStats:
    """What loading a shard set found: shards read and skipped, samples kept and skipped."""

    shards: int = 0
    bad_shards: int = 0
    samples: int = 0
    bad_samples: int = 0

    def check(self, where: Path, max_bad_fraction: float) -> None:
        """Log the skipped counts; raise ``ValueError`` above ``max_bad_fraction``."""
        if not (self.bad_shards or self.bad_samples):
            return
        logger.warning("%s: skipped %d of %d shard(s) and %d of %d sample(s) as corrupt (see the warnings above)",
                       where, self.bad_shards, self.shards, self.bad_samples, self.samples + self.bad_samples)
        shard_frac = self.bad_shards / max(self.shards, 1)
        sample_frac = self.bad_samples / max(self.samples + self.bad_samples, 1)
        if max(shard_frac, sample_frac) > max_bad_fraction:
            raise ValueError(
                f"{str(where)!r}: {self.bad_shards} of {self.shards} shard(s) and {self.bad_samples} of "
                f"{self.samples + self.bad_samples} sample(s) are corrupt, more than data.max_bad_fraction="
                f"{max_bad_fraction}; regenerate the shards (e.g. onemodel tokenize --overwrite) or raise "
                "data.max_bad_fraction"
            )


def _read_shard_safely(path: Path, stats: ShardReadStats) -> list[tuple[str, dict[str, bytes]]]:
    """All samples of one tar; a corrupt or truncated tar is logged and counted, keeping the samples before the
    damage (the sample being read when it happened is dropped)."""
    out: list[tuple[str, dict[str, bytes]]] = []
    stats.shards += 1
    try:
        for item in _read_tar_samples(path):
            out.append(item)
    except (tarfile.TarError, EOFError, OSError, zlib_error()) as err:
        stats.bad_shards += 1
        logger.warning("skipping corrupt shard %s after %d sample(s): %s: %s", path, len(out), type(err).__name__, err)
    return out


def zlib_error() -> type[Exception]:
    import zlib

    return zlib.error


def _decode_token_sample(shard: Path, key: str, files: dict[str, bytes], keep_set: set[str] | None
                         ) -> dict[str, Any]:
    """Token-shard files -> token sample; ``ValueError`` naming shard and key for an unreadable member."""
    sample: dict[str, Any] = {}
    for suffix, data in files.items():
        try:
            if suffix.endswith(".npy"):
                name = suffix[: -len(".npy")]
                if keep_set is None or name in keep_set:
                    arr = np.load(io.BytesIO(data), allow_pickle=False)
                    if arr.ndim != 1 or not np.issubdtype(arr.dtype, np.integer):
                        raise ValueError(f"expected a 1-D integer array, got {arr.dtype} of shape {arr.shape}")
                    sample[name] = arr.astype(np.int64)
            elif suffix.startswith("pixels.") and suffix.endswith(".png"):  # rgb image for pixel-patch inputs
                name = suffix[len("pixels."):-len(".png")]
                if keep_set is None or name in keep_set:
                    sample[pixels_key(name)] = bytes(data)
            elif suffix == "qa.json":
                if keep_set is None or keep_set & set(QA_MODALITIES):
                    pairs = json.loads(data.decode("utf-8"))
                    sample[QA_KEY] = [[np.asarray(q, np.int64), np.asarray(a, np.int64)] for q, a in pairs]
        except Exception as err:  # noqa: BLE001 - numpy / json raise many types for garbage
            reason = "not a plain numpy array (pickled objects are never loaded)" if "pickle" in str(err) else str(err)
            raise ValueError(f"shard {shard}: sample {key!r}: member {suffix!r} is unreadable: {reason}") from None
    return sample


def _read_tar_samples(path: Path) -> Iterator[tuple[str, dict[str, bytes]]]:
    """Yield ``(key, {suffix: bytes})`` per sample of a webdataset tar (key = basename up to the first dot)."""
    current_key: str | None = None
    files: dict[str, bytes] = {}
    with tarfile.open(path, "r") as tar:
        for member in tar:
            if not member.isfile():
                continue
            base = member.name.rsplit("/", 1)[-1]
            if "." not in base:
                continue
            key, suffix = base.split(".", 1)
            prefix = member.name[: len(member.name) - len(base)]
            key = prefix + key
            if key != current_key:
                if current_key is not None:
                    yield current_key, files
                current_key, files = key, {}
            extracted = tar.extractfile(member)
            assert extracted is not None
            files[suffix] = extracted.read()
    if current_key is not None:
        yield current_key, files


class TokenShardSet:
    """All token samples of one split of a token-shard directory, held in memory.

    A token sample (docs/internals.md §3) maps modality -> 1-D int array, and ``qa`` -> list of
    ``[question_ids, answer_ids]``. ``keep`` restricts the modalities loaded (``question``/``answer`` keep ``qa``).
    """

    def __init__(self, directory: str | Path, split: str = "train", keep: Sequence[str] | None = None,
                 max_bad_fraction: float = 0.05) -> None:
        self.directory = Path(directory)
        split_dir = self.directory / split if (self.directory / split).is_dir() else self.directory
        keep_set = None if keep is None else set(keep)
        self.samples: list[dict[str, Any]] = []
        self.stats = ShardReadStats()
        for shard in _shard_paths(split_dir):
            for key, files in _read_shard_safely(shard, self.stats):
                try:
                    sample = _decode_token_sample(shard, key, files, keep_set)
                except ValueError as err:
                    self.stats.bad_samples += 1
                    logger.warning("skipping %s", err)
                    continue
                self.stats.samples += 1
                if sample:
                    self.samples.append(sample)
        self.stats.check(split_dir, max_bad_fraction)
        if not self.samples:
            raise ValueError(f"{str(split_dir)!r} holds no token samples with the modalities {sorted(keep_set or [])}")
        logger.info("loaded %d token samples from %s", len(self.samples), split_dir)

    def __len__(self) -> int:
        return len(self.samples)

    def get(self, index: int) -> dict[str, Any]:
        return self.samples[index]


class RawShardSet:
    """Raw samples of one split kept as encoded files in memory; decoded and tokenized on access.

    The tokenizer bundle is loaded lazily, once per process (so each DataLoader worker has its own copy).
    """

    def __init__(self, directory: str | Path, bundle_dir: str | Path, split: str = "train",
                 keep: Sequence[str] | None = None, max_bad_fraction: float = 0.05) -> None:
        self.directory = Path(directory)
        self.bundle_dir = str(bundle_dir)
        self.keep = None if keep is None else list(keep)
        split_dir = self.directory / split if (self.directory / split).is_dir() else self.directory
        self.files: list[dict[str, bytes]] = []
        self.stats = ShardReadStats()
        for shard in _shard_paths(split_dir):
            for key, files in _read_shard_safely(shard, self.stats):
                files = {k: v for k, v in files.items() if k != "scene.json"}  # not a modality; saves memory
                files["__key__"] = key  # type: ignore[assignment]
                files["__url__"] = str(shard)  # type: ignore[assignment]
                self.files.append(files)
                self.stats.samples += 1
        self.stats.check(split_dir, max_bad_fraction)
        if not self.files:
            raise ValueError(f"{str(split_dir)!r} holds no samples")
        self._bundle = None
        self._resolution: int | None = None
        logger.info("indexed %d raw samples in %s (tokenized on the fly)", len(self.files), split_dir)

    def __len__(self) -> int:
        return len(self.files)

    def __getstate__(self) -> dict[str, Any]:  # never ship a loaded bundle to worker processes
        return {**self.__dict__, "_bundle": None, "_resolution": None}

    def get(self, index: int) -> dict[str, Any]:
        """Sample ``index`` tokenized; a sample that fails to decode is logged and replaced by the next readable
        one (deterministic, so the stream and resume stay exact)."""
        for offset in range(len(self.files)):
            i = (index + offset) % len(self.files)
            try:
                return self._get(i)
            except ValueError as err:  # decode_sample / validate_sample name the sample and the problem
                files = self.files[i]
                logger.warning("skipping corrupt sample %s in %s: %s", files.get("__key__"), files.get("__url__"), err)
        raise ValueError(f"no sample of {str(self.directory)!r} can be decoded; regenerate the shards")

    def _get(self, index: int) -> dict[str, Any]:
        from training.data.reader import resize_sample
        from training.data.shards import decode_sample

        if self._bundle is None:
            from tokenizers_mm.bundle import IMAGE_TOKENIZERS, TokenizerBundle

            self._bundle = TokenizerBundle.from_pretrained(self.bundle_dir)
            sizes = {self._bundle[n].image_size for n in IMAGE_TOKENIZERS if n in self._bundle}
            self._resolution = sizes.pop() if len(sizes) == 1 else None
        raw = decode_sample(self.files[index])
        if self._resolution is not None:  # images at the tokenizers' input size (as pre-tokenization does)
            raw = resize_sample(raw, self._resolution)
        with torch.no_grad():
            tokens = self._bundle.tokenize_sample(raw)
        if raw.get("rgb") is not None and "rgb" in tokens:  # for pixel-patch inputs (uint8 (H, W, 3))
            tokens[pixels_key("rgb")] = np.asarray(raw["rgb"], dtype=np.uint8)
        if self.keep is not None:
            keep = set(self.keep)
            tokens = {k: v for k, v in tokens.items() if k in keep or (k == QA_KEY and keep & set(QA_MODALITIES))
                      or (k.startswith("__pixels_") and k[len("__pixels_"):] in keep)}
        return tokens


@dataclass
class MixtureSource:
    """One member of the mixture: its samples, sampling weight and the modalities it trains (None = all)."""

    samples: TokenShardSet | RawShardSet
    weight: float
    modalities: list[str] | None = None
    name: str = ""


def load_source(path: str | Path, split: str, bundle_dir: str | Path, tokenize_on_the_fly: bool,
                modalities: Sequence[str] | None, weight: float = 1.0, max_bad_fraction: float = 0.05
                ) -> MixtureSource:
    """Load one split of a shard directory as a :class:`MixtureSource` (corrupt data: see the module docstring)."""
    keep = None if modalities is None else list(modalities)
    if tokenize_on_the_fly:
        samples: TokenShardSet | RawShardSet = RawShardSet(path, bundle_dir, split, keep, max_bad_fraction)
    else:
        samples = TokenShardSet(path, split, keep, max_bad_fraction)
    return MixtureSource(samples=samples, weight=float(weight), modalities=keep, name=f"{path}:{split}")


def sample_rng(seed: int, masking_seed: int, stream: int, index: int) -> np.random.Generator:
    """The generator of global sample ``index`` in ``stream`` (train / val): a pure function of its arguments
    (``seed`` = ``data.seed``, ``masking_seed`` = ``masking.seed``)."""
    return np.random.default_rng([int(seed), int(masking_seed), int(stream), int(index)])


class MaskedStream(IterableDataset):
    """Yields this process's masked samples, micro-batch after micro-batch, from ``start_step`` on.

    sources: the mixture; modalities: the model's modality list (index = modality id in the batch);
    text_ids: special ids of the text tokenizer (eos, sentinels, pad) for sequence masking;
    micro_batch_size: samples per micro-batch; num_processes / rank: data-parallel layout;
    grad_accum_steps: micro-batches per process per optimizer step; start_step / end_step: optimizer steps to
    cover (end_step None = forever); stream: TRAIN_STREAM or VAL_STREAM (independent randomness);
    pixel_grids: modalities the model reads as pixel patches -> their grid size (``onemodel.pixel_inputs``).
    """

    def __init__(self, sources: Sequence[MixtureSource], modalities: Sequence[Modality], masking: MaskingConfig,
                 text_ids: TextSpecialIds | None, seed: int, micro_batch_size: int, num_processes: int = 1,
                 rank: int = 0, grad_accum_steps: int = 1, start_step: int = 0, end_step: int | None = None,
                 stream: int = TRAIN_STREAM, pixel_grids: dict[str, int] | None = None) -> None:
        super().__init__()
        if not sources:
            raise ValueError("the data mixture has no sources")
        self.sources = list(sources)
        self.modalities = tuple(modalities)
        self.masking = masking
        self.text_ids = text_ids
        self.seed = seed
        self.micro_batch_size = micro_batch_size
        self.num_processes = num_processes
        self.rank = rank
        self.grad_accum_steps = grad_accum_steps
        self.start_step = start_step
        self.end_step = end_step
        self.stream = stream
        self.pixel_grids = dict(pixel_grids or {})
        weights = np.asarray([s.weight for s in self.sources], dtype=np.float64)
        self.cum_weights = np.cumsum(weights / weights.sum())
        self.global_batch = micro_batch_size * num_processes * grad_accum_steps

    def sample_at(self, index: int) -> MaskedSample:
        """The masked sample at global stream position ``index``."""
        rng = sample_rng(self.seed, self.masking.seed, self.stream, index)
        source_id = int(np.searchsorted(self.cum_weights, rng.random(), side="right"))
        source = self.sources[min(source_id, len(self.sources) - 1)]
        item = int(rng.integers(len(source.samples)))
        tokens = select_qa(source.samples.get(item), rng)  # qa pairs -> one question / answer
        if source.modalities is not None:  # e.g. question kept but not answer
            keep = set(source.modalities) | {pixels_key(n) for n in source.modalities}
            tokens = {k: v for k, v in tokens.items() if k in keep}
        sample = mask_sample(tokens, self.modalities, self.masking, rng, text_ids=self.text_ids)
        return attach_pixels(sample, tokens, self.pixel_grids, self.modalities)

    def micro_batch_indices(self, step: int, accum: int) -> range:
        """Global sample indices of this process's micro-batch ``accum`` of optimizer step ``step``."""
        slot = accum * self.num_processes + self.rank
        first = step * self.global_batch + slot * self.micro_batch_size
        return range(first, first + self.micro_batch_size)

    def __iter__(self) -> Iterator[MaskedSample]:
        info = get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        local = 0  # this process's micro-batch counter since start_step
        step = self.start_step
        while self.end_step is None or step < self.end_step:
            for accum in range(self.grad_accum_steps):
                if local % num_workers == worker:
                    for index in self.micro_batch_indices(step, accum):
                        yield self.sample_at(index)
                local += 1
            step += 1


def _worker_init(_: int, parent_pid: int | None = None) -> None:
    torch.set_num_threads(1)  # workers share the cores with the training process
    if parent_pid is not None:
        _die_with_parent(parent_pid)


def _die_with_parent(parent_pid: int) -> None:
    """Make this DataLoader worker die as soon as the training process does, even after ``kill -9`` (Linux:
    ``prctl(PR_SET_PDEATHSIG, SIGKILL)``; elsewhere torch's own watchdog ends it within seconds)."""
    import signal
    import sys

    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(signal.SIGKILL), 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before prctl took effect
        os._exit(1)


def build_train_loader(sources: Sequence[MixtureSource], modalities: Sequence[Modality], masking: MaskingConfig,
                       text_ids: TextSpecialIds | None, seed: int, micro_batch_size: int, num_processes: int,
                       rank: int, grad_accum_steps: int, start_step: int, end_step: int | None, num_workers: int,
                       pad_to_multiple_of: int | None = None, pin_memory: bool = False,
                       pixel_grids: dict[str, int] | None = None) -> DataLoader:
    """DataLoader yielding this process's :class:`MultimodalBatch` micro-batches from ``start_step`` on
    (``grad_accum_steps`` per optimizer step), masked in ``num_workers`` worker processes."""
    dataset = MaskedStream(sources, modalities, masking, text_ids, seed, micro_batch_size, num_processes, rank,
                           grad_accum_steps, start_step, end_step, TRAIN_STREAM, pixel_grids)
    return DataLoader(
        dataset,
        batch_size=micro_batch_size,
        collate_fn=partial(collate, pad_to_multiple_of=pad_to_multiple_of),
        num_workers=num_workers,
        worker_init_fn=partial(_worker_init, parent_pid=os.getpid()) if num_workers > 0 else None,
        persistent_workers=False,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers > 0 else None,
        # its own generator: creating the iterator must not draw from the global torch RNG (dropout), or a
        # resumed run (iterator created after the RNG restore) would diverge from an uninterrupted one
        generator=torch.Generator().manual_seed(int(seed)),
    )


def build_val_batches(sources: Sequence[MixtureSource], modalities: Sequence[Modality], masking: MaskingConfig,
                      text_ids: TextSpecialIds | None, seed: int, micro_batch_size: int, num_samples: int,
                      num_processes: int = 1, rank: int = 0, pad_to_multiple_of: int | None = None,
                      pixel_grids: dict[str, int] | None = None) -> list[MultimodalBatch]:
    """This process's share of the fixed validation set, in micro-batches of ``micro_batch_size``.

    The set is samples ``0 .. num_samples - 1`` of the validation stream, whatever the number of processes;
    process ``rank`` takes samples ``rank, rank + num_processes, ...``. The same every evaluation, so validation
    losses are comparable across steps, runs and process counts (reduce token-weighted sums over processes)."""
    stream = MaskedStream(sources, modalities, masking, text_ids, seed, micro_batch_size, stream=VAL_STREAM,
                          pixel_grids=pixel_grids)
    mine = list(range(rank, num_samples, num_processes))
    return [
        collate([stream.sample_at(i) for i in mine[k : k + micro_batch_size]], pad_to_multiple_of)
        for k in range(0, len(mine), micro_batch_size)
    ]
