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
"""

from __future__ import annotations

import io
import json
import logging
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

    def __init__(self, directory: str | Path, split: str = "train", keep: Sequence[str] | None = None) -> None:
        self.directory = Path(directory)
        split_dir = self.directory / split if (self.directory / split).is_dir() else self.directory
        keep_set = None if keep is None else set(keep)
        self.samples: list[dict[str, Any]] = []
        for shard in _shard_paths(split_dir):
            for key, files in _read_tar_samples(shard):
                sample: dict[str, Any] = {}
                for suffix, data in files.items():
                    if suffix.endswith(".npy"):
                        name = suffix[: -len(".npy")]
                        if keep_set is None or name in keep_set:
                            sample[name] = np.load(io.BytesIO(data), allow_pickle=False).astype(np.int64)
                    elif suffix == "qa.json":
                        if keep_set is None or keep_set & set(QA_MODALITIES):
                            pairs = json.loads(data.decode("utf-8"))
                            sample[QA_KEY] = [[np.asarray(q, np.int64), np.asarray(a, np.int64)] for q, a in pairs]
                if sample:
                    self.samples.append(sample)
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
                 keep: Sequence[str] | None = None) -> None:
        self.directory = Path(directory)
        self.bundle_dir = str(bundle_dir)
        self.keep = None if keep is None else list(keep)
        split_dir = self.directory / split if (self.directory / split).is_dir() else self.directory
        self.files: list[dict[str, bytes]] = []
        for shard in _shard_paths(split_dir):
            for key, files in _read_tar_samples(shard):
                files = {k: v for k, v in files.items() if k != "scene.json"}  # not a modality; saves memory
                files["__key__"] = key  # type: ignore[assignment]
                self.files.append(files)
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
        if self.keep is not None:
            keep = set(self.keep)
            tokens = {k: v for k, v in tokens.items() if k in keep or (k == QA_KEY and keep & set(QA_MODALITIES))}
        return tokens


@dataclass
class MixtureSource:
    """One member of the mixture: its samples, sampling weight and the modalities it trains (None = all)."""

    samples: TokenShardSet | RawShardSet
    weight: float
    modalities: list[str] | None = None
    name: str = ""


def load_source(path: str | Path, split: str, bundle_dir: str | Path, tokenize_on_the_fly: bool,
                modalities: Sequence[str] | None, weight: float = 1.0) -> MixtureSource:
    """Load one split of a shard directory as a :class:`MixtureSource`."""
    keep = None if modalities is None else list(modalities)
    if tokenize_on_the_fly:
        samples: TokenShardSet | RawShardSet = RawShardSet(path, bundle_dir, split, keep)
    else:
        samples = TokenShardSet(path, split, keep)
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
    cover (end_step None = forever); stream: TRAIN_STREAM or VAL_STREAM (independent randomness).
    """

    def __init__(self, sources: Sequence[MixtureSource], modalities: Sequence[Modality], masking: MaskingConfig,
                 text_ids: TextSpecialIds | None, seed: int, micro_batch_size: int, num_processes: int = 1,
                 rank: int = 0, grad_accum_steps: int = 1, start_step: int = 0, end_step: int | None = None,
                 stream: int = TRAIN_STREAM) -> None:
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
            keep = set(source.modalities)
            tokens = {k: v for k, v in tokens.items() if k in keep}
        return mask_sample(tokens, self.modalities, self.masking, rng, text_ids=self.text_ids)

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


def _worker_init(_: int) -> None:
    torch.set_num_threads(1)  # workers share the cores with the training process


def build_train_loader(sources: Sequence[MixtureSource], modalities: Sequence[Modality], masking: MaskingConfig,
                       text_ids: TextSpecialIds | None, seed: int, micro_batch_size: int, num_processes: int,
                       rank: int, grad_accum_steps: int, start_step: int, end_step: int | None, num_workers: int,
                       pad_to_multiple_of: int | None = None, pin_memory: bool = False) -> DataLoader:
    """DataLoader yielding this process's :class:`MultimodalBatch` micro-batches from ``start_step`` on
    (``grad_accum_steps`` per optimizer step), masked in ``num_workers`` worker processes."""
    dataset = MaskedStream(sources, modalities, masking, text_ids, seed, micro_batch_size, num_processes, rank,
                           grad_accum_steps, start_step, end_step, TRAIN_STREAM)
    return DataLoader(
        dataset,
        batch_size=micro_batch_size,
        collate_fn=partial(collate, pad_to_multiple_of=pad_to_multiple_of),
        num_workers=num_workers,
        worker_init_fn=_worker_init if num_workers > 0 else None,
        persistent_workers=False,
        pin_memory=pin_memory,
        prefetch_factor=4 if num_workers > 0 else None,
        # its own generator: creating the iterator must not draw from the global torch RNG (dropout), or a
        # resumed run (iterator created after the RNG restore) would diverge from an uninterrupted one
        generator=torch.Generator().manual_seed(int(seed)),
    )


def build_val_batches(sources: Sequence[MixtureSource], modalities: Sequence[Modality], masking: MaskingConfig,
                      text_ids: TextSpecialIds | None, seed: int, micro_batch_size: int, num_batches: int,
                      num_processes: int = 1, rank: int = 0,
                      pad_to_multiple_of: int | None = None) -> list[MultimodalBatch]:
    """The fixed validation micro-batches of this process (``num_batches`` per process, disjoint over ranks):
    the same every evaluation, so validation losses are comparable across steps and runs."""
    stream = MaskedStream(sources, modalities, masking, text_ids, seed, micro_batch_size, num_processes, rank,
                          grad_accum_steps=num_batches, stream=VAL_STREAM)
    return [
        collate([stream.sample_at(i) for i in stream.micro_batch_indices(0, k)], pad_to_multiple_of)
        for k in range(num_batches)
    ]
