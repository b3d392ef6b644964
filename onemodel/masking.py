"""4M-style masking: turn one token sample into encoder inputs and decoder targets. Pure, seeded functions.

A *token sample* maps modality name -> 1-D int ids without padding (docs/internals.md §3). Three entry points:

``mask_sample(tokens, modalities, config, generator, text_ids=None) -> MaskedSample``  (training, random)
    1. Optional condition dropout: with probability ``config.condition_dropout`` the sample gets no inputs at
       all (the model learns the unconditional distribution used by classifier-free guidance).
    2. Dirichlet split (4M): one concentration ``alpha`` is drawn uniformly from ``config.alphas`` (times an
       optional per-modality ``alpha_scale``); proportions ``p_in ~ Dir(alpha)`` over the modalities the sample
       has that may be inputs, and independently ``p_tgt`` over those that may be targets.
    3. Sequences first (caption, question, answer, det; each truncated to its ``max_length`` keeping eos).
       A sequence of length L is *chosen as input* with probability ``min(1, p_in * input_budget / L)``
       and *as target* with probability ``min(1, p_tgt * target_budget / L)`` (so on average it uses about the
       share the Dirichlet gave it). Then, taking the sequences in random order:
         - input only  -> the whole sequence is input (enc_pos 0..L-1);
         - target only -> the whole sequence is an autoregressive target (ids ending with eos, dec_pos 0..L-1);
         - both -> with probability ``span_masking_prob`` T5 span masking (below); otherwise, or when the
           sequence is too short to span-mask (fewer than 2 tokens before eos), it is given whole as input or
           whole as target with equal probability;
         - none -> not used.
       A sequence's tokens count against the budgets; if the remaining budget is smaller, the input / target
       is cut to a prefix of the remaining size (a role with no budget left is dropped).
    4. Grids (rgb, depth, semseg) share what is left: the remaining input budget is split over the grid
       modalities in proportion to their ``p_in`` (integers by largest remainder, capped at grid_size**2, the
       surplus of a full modality redistributed), then the remaining target budget in proportion to ``p_tgt``,
       capped at the positions not already used as inputs. Positions are drawn uniformly without replacement,
       so the input and target positions of a grid modality never overlap.
    Exactness: the encoder gets exactly ``min(input_budget, tokens available)`` tokens and the decoder exactly
    ``min(target_budget, tokens available)``, whenever the sample has at least one grid modality eligible for
    that side (grids absorb whatever the sequences leave; for 16x16 grids there are 256 tokens each). A
    sample with only sequences gets the sequence tokens its roles give, at most the budget.

    Span masking (T5 with sentinels, sequence ``x = body + [eos]``, n = len(body) >= 2):
    noise density d ~ U(span_noise_density), ``noise = clip(round(n * d), 1, n - 1)``, ``k = clip(round(noise /
    span_mean_length), 1, min(noise, n - noise, max_sentinels, len(sentinel_ids)))`` spans; the noise tokens
    are cut into k non-empty spans placed at random between non-noise runs (a run may be empty only at the
    start or end). With ``s_j = sentinel_ids[j]``::

        input  = keep_0 s_0 keep_1 s_1 ... s_{k-1} keep_k eos          (length n - noise + k + 1 <= L)
        target = s_0 span_0 s_1 span_1 ... s_{k-1} span_{k-1} eos     (length noise + k + 1 <= L)

    Replacing each ``s_j`` of the input by ``span_j`` gives back ``x`` exactly. Positions: enc_pos 0..len-1
    of the corrupted input, dec_pos 0..len-1 of the target. Both stay below max_length.

``build_sample(inputs, targets, modalities) -> MaskedSample``  (generation / evaluation, explicit)
    ``inputs[name]`` is either ``ids`` (1-D: the tokens at positions 0..len-1; a grid needs all grid_size**2)
    or a tuple ``(ids, positions)`` (partial input, e.g. the already decoded MaskGIT positions).
    ``targets[name]`` is
      - sequence: ``ids`` (known labels at 0..len-1, e.g. teacher forcing / scoring), or ``int n`` (n slots
        0..n-1 with placeholder id 0 to be generated), or ``(ids | None, positions)``;
      - grid: ``positions`` (1-D, placeholder ids 0: the positions to predict), the string ``"all"`` (every
        position), or ``(ids | None, positions)`` (labelled, e.g. evaluation loss).
    ``None`` values are skipped. Tokens are grouped by modality in ``modalities`` order and, within a
    modality, kept in the order given. Grid input and target positions must not overlap.

``select_qa(token_sample, generator) -> dict``: picks one ``qa`` pair (seeded) and exposes it as the
``question`` / ``answer`` modalities.

Randomness: every function takes a ``numpy.random.Generator`` (or a ``torch.Generator``, or an int seed) and
uses nothing else; ``masking_rng(seed, index, epoch)`` gives a per-sample generator independent of the
DataLoader worker layout. Modality index in the batch = position in ``modalities`` (the model config order).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from onemodel.batch import MaskedSample
from onemodel.modalities import Modality

__all__ = [
    "MaskingConfig",
    "MaskingTask",
    "TextSpecialIds",
    "mask_sample",
    "build_sample",
    "select_qa",
    "masking_rng",
    "span_mask",
    "split_budget",
]


# ----------------------------------------------------------------------------------------------- config


@dataclass
class MaskingTask:
    """An explicit task mixed into random 4M masking (e.g. rgb -> caption, rgb + question -> answer).

    inputs: modalities given whole to the encoder. targets: modalities to predict: sequences whole
    (autoregressive), grids MaskGIT-style (a cosine-scheduled random fraction of positions is a target; the
    other positions of that grid are inputs), so the model learns exactly what generation asks of it.
    weight: relative probability among the tasks a sample can serve.
    """

    inputs: list[str]
    targets: list[str]
    weight: float = 1.0

    def __post_init__(self) -> None:
        if not self.targets:
            raise ValueError("a masking task needs at least one target modality")
        both = sorted(set(self.inputs) & set(self.targets))
        if both:
            raise ValueError(f"masking task lists {both} as both input and target")
        if not _is_pos_number(self.weight):
            raise ValueError(f"masking task weight must be a number > 0, got {self.weight!r}")


@dataclass
class MaskingConfig:
    """How training samples are masked (see the module docstring for the exact algorithm).

    input_budget / target_budget: encoder / decoder tokens per sample.
    alphas: Dirichlet concentrations; one is drawn uniformly per sample and side (mixture as in 4M).
        Small (0.2) -> one or two modalities dominate (e.g. rgb -> caption); 1.0 -> even mixes.
    target_alphas: concentrations for the target split; None = same as ``alphas``.
    alpha_scale: per-modality multiplier of the concentration (e.g. {"caption": 2.0}); others 1.
    input_modalities / target_modalities: allow-lists of modality names; None = all.
    span_noise_density: [low, high]: fraction of a span-masked sequence that is masked, ~ U(low, high).
    span_mean_length: mean span length (number of spans = round(masked / mean)).
    max_sentinels: most spans per sequence (also limited by the text tokenizer's sentinel count).
    span_masking_prob: probability that a sequence chosen both as input and target is span-masked; otherwise
        the whole sequence is the input or the target (equal odds).
    condition_dropout: probability that a sample gets no inputs at all (for classifier-free guidance).
    tasks / task_prob: with probability ``task_prob`` a sample is masked for one of the explicit ``tasks``
        it has all modalities for (chosen by weight) instead of by the random Dirichlet split; see MaskingTask.
    seed: base seed of ``sample_rng``.
    input_budgets / target_budgets: fixed per-modality budgets instead of the Dirichlet draw (e.g. inputs
        {"rgb": 96, "caption": 32}, targets {"depth": 64, "semseg": 64}): every sample gives each listed
        modality it has exactly ``min(budget, tokens available)`` tokens on that side (grid: random positions,
        input and target positions disjoint; sequence: the first ``budget`` tokens, a whole sequence when the
        budget covers it), and unlisted modalities nothing. Set both or neither; each side's sum must fit its
        total budget. Condition dropout and explicit tasks still apply.
    """

    input_budget: int = 128
    target_budget: int = 128
    alphas: list[float] = field(default_factory=lambda: [0.2, 0.5, 1.0])
    target_alphas: list[float] | None = None
    alpha_scale: dict[str, float] = field(default_factory=dict)
    input_modalities: list[str] | None = None
    target_modalities: list[str] | None = None
    span_noise_density: list[float] = field(default_factory=lambda: [0.15, 0.5])
    span_mean_length: float = 3.0
    max_sentinels: int = 16
    span_masking_prob: float = 1.0
    condition_dropout: float = 0.0
    tasks: list[MaskingTask] = field(default_factory=list)
    task_prob: float = 0.0
    seed: int = 0
    input_budgets: dict[str, int] | None = None
    target_budgets: dict[str, int] | None = None

    def __post_init__(self) -> None:
        for name in ("input_budget", "target_budget", "max_sentinels", "seed"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 0:
                raise ValueError(f"masking.{name} must be an integer >= 0, got {v!r}")
        for name in ("alphas", "target_alphas"):
            v = getattr(self, name)
            if v is None and name == "target_alphas":
                continue
            if not isinstance(v, (list, tuple)) or not v or not all(_is_pos_number(a) for a in v):
                raise ValueError(
                    f"masking.{name} must be a non-empty list of numbers > 0 (Dirichlet concentrations), got {v!r}"
                )
        if not isinstance(self.alpha_scale, dict) or not all(
            isinstance(k, str) and _is_pos_number(s) for k, s in self.alpha_scale.items()
        ):
            raise ValueError(f"masking.alpha_scale must map modality names to numbers > 0, got {self.alpha_scale!r}")
        for name in ("input_modalities", "target_modalities"):
            v = getattr(self, name)
            if v is None:
                continue
            if not isinstance(v, (list, tuple)) or not all(isinstance(n, str) and n for n in v):
                raise ValueError(f"masking.{name} must be a list of modality names or null, got {v!r}")
            if len(set(v)) != len(v):
                raise ValueError(f"masking.{name} lists a modality twice: {v!r}")
        d = self.span_noise_density
        if (
            not isinstance(d, (list, tuple)) or len(d) != 2 or not all(_is_number(x) for x in d)
            or not 0.0 < d[0] <= d[1] < 1.0
        ):
            raise ValueError(f"masking.span_noise_density must be [low, high] with 0 < low <= high < 1, got {d!r}")
        if not _is_number(self.span_mean_length) or self.span_mean_length < 1.0:
            raise ValueError(f"masking.span_mean_length must be >= 1, got {self.span_mean_length!r}")
        if self.task_prob > 0 and not self.tasks:
            raise ValueError("masking.task_prob > 0 needs a non-empty masking.tasks list")
        self.tasks = [t if isinstance(t, MaskingTask) else MaskingTask(**t) for t in self.tasks]
        if (self.input_budgets is None) != (self.target_budgets is None):
            raise ValueError("set both masking.input_budgets and masking.target_budgets (fixed budgets), or neither")
        for name, total in (("input_budgets", self.input_budget), ("target_budgets", self.target_budget)):
            v = getattr(self, name)
            if v is None:
                continue
            if not isinstance(v, dict) or not all(
                isinstance(k, str) and isinstance(n, int) and not isinstance(n, bool) and n >= 0 for k, n in v.items()
            ):
                raise ValueError(f"masking.{name} must map modality names to integers >= 0, got {v!r}")
            if sum(v.values()) > total:
                raise ValueError(f"masking.{name} sum to {sum(v.values())}, more than the total budget {total}; "
                                 f"lower them or raise masking.{name[:-1]}")
        for name in ("span_masking_prob", "condition_dropout", "task_prob"):
            v = getattr(self, name)
            if not _is_number(v) or not 0.0 <= v <= 1.0:
                raise ValueError(f"masking.{name} must be a probability in [0, 1], got {v!r}")

    def check_modalities(self, modalities: Sequence[Modality]) -> None:
        """Raise ValueError if the config names a modality that is not in ``modalities``."""
        known = {m.name for m in modalities}
        named = {name: getattr(self, name) for name in
                 ("input_modalities", "target_modalities", "alpha_scale", "input_budgets", "target_budgets")}
        for j, task in enumerate(self.tasks):
            named[f"tasks[{j}]"] = [*task.inputs, *task.targets]
        for name, listed in named.items():
            if listed is None:
                continue
            unknown = sorted(set(listed) - known)
            if unknown:
                raise ValueError(
                    f"masking.{name} names unknown modality(ies) {unknown}; the model's modalities are {sorted(known)}"
                )

    def sample_rng(self, index: int, epoch: int = 0) -> np.random.Generator:
        """The generator for sample ``index`` of ``epoch``: ``masking_rng(self.seed, index, epoch)``."""
        return masking_rng(self.seed, index, epoch)


def _is_number(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and np.isfinite(x)


def _is_pos_number(x: Any) -> bool:
    return _is_number(x) and x > 0


@dataclass(frozen=True)
class TextSpecialIds:
    """Special ids of the text tokenizer that masking needs (sequence modalities)."""

    eos_id: int
    sentinel_ids: tuple[int, ...] = ()
    pad_id: int = 0

    def __post_init__(self) -> None:
        ids = (self.eos_id, self.pad_id, *self.sentinel_ids)
        if not all(isinstance(i, (int, np.integer)) and not isinstance(i, bool) and i >= 0 for i in ids):
            raise ValueError(f"text special ids must be integers >= 0, got {self}")
        object.__setattr__(self, "sentinel_ids", tuple(int(i) for i in self.sentinel_ids))

    @classmethod
    def coerce(cls, obj: Any) -> TextSpecialIds:
        """From a TextSpecialIds, a mapping, or any object with ``eos_id`` / ``sentinel_ids`` / ``pad_id``
        attributes (e.g. the project's ``TextTokenizer``)."""
        if isinstance(obj, TextSpecialIds):
            return obj
        get = obj.get if isinstance(obj, Mapping) else (lambda k, d=None: getattr(obj, k, d))
        eos = get("eos_id")
        if eos is None:
            raise TypeError(
                "text_ids must be a TextSpecialIds, a dict or a text tokenizer with eos_id / sentinel_ids / pad_id; "
                f"got {type(obj).__name__} without eos_id"
            )
        return cls(eos_id=int(eos), sentinel_ids=tuple(get("sentinel_ids", ()) or ()), pad_id=int(get("pad_id", 0)))


# ----------------------------------------------------------------------------------------------- randomness


def masking_rng(seed: int, index: int, epoch: int = 0) -> np.random.Generator:
    """Independent generator for one sample: same (seed, epoch, index) -> same masks, whatever the workers."""
    if min(seed, index, epoch) < 0:
        raise ValueError(f"masking_rng needs non-negative seed/index/epoch, got {(seed, index, epoch)}")
    return np.random.default_rng([int(seed), int(epoch), int(index)])


def _as_rng(generator: Any) -> np.random.Generator:
    if isinstance(generator, np.random.Generator):
        return generator
    if isinstance(generator, torch.Generator):
        return np.random.default_rng(int(torch.randint(0, 2**62, (1,), generator=generator)))
    if isinstance(generator, (int, np.integer)) and not isinstance(generator, bool):
        return np.random.default_rng(int(generator))
    raise TypeError(
        f"generator must be a numpy.random.Generator, a torch.Generator or an int seed, got {type(generator).__name__}"
    )


# ----------------------------------------------------------------------------------------------- helpers


def split_budget(budget: int, weights: np.ndarray, caps: np.ndarray) -> np.ndarray:
    """Integer split of ``budget`` proportional to ``weights``, each part <= its cap.

    Largest-remainder rounding; a part that hits its cap gives its surplus to the others (water filling).
    The parts sum to exactly ``min(budget, caps.sum())``. Zero / non-finite weights fall back to equal shares.
    """
    caps = np.asarray(caps, dtype=np.int64)
    weights = np.asarray(weights, dtype=np.float64)
    alloc = np.zeros(len(caps), dtype=np.int64)
    remaining = int(min(budget, int(caps.sum()))) if len(caps) else 0
    while remaining > 0:  # at most len(caps) + 1 rounds: each round ends or fills a part
        room = caps - alloc
        active = room > 0
        w = np.where(active, weights, 0.0)
        total = w.sum()
        if not np.isfinite(total) or total <= 0:
            w = active.astype(np.float64)
            total = w.sum()
        ideal = remaining * w / total
        add = np.floor(ideal).astype(np.int64)
        short = remaining - int(add.sum())
        if short > 0:
            frac = np.where(active, ideal - add, -1.0)
            add[np.argsort(-frac, kind="stable")[:short]] += 1
        add = np.minimum(add, room)
        alloc += add
        remaining -= int(add.sum())
    return alloc


def _partition(total: int, parts: int, rng: np.random.Generator) -> np.ndarray:
    """Random composition of ``total`` into ``parts`` positive integers (uniform over compositions)."""
    if parts == 1:
        return np.array([total], dtype=np.int64)
    cuts = np.sort(rng.permutation(total - 1)[: parts - 1]) + 1
    return np.diff(np.concatenate(([0], cuts, [total]))).astype(np.int64)


def span_mask(
    seq: np.ndarray,
    eos_id: int,
    sentinel_ids: Sequence[int],
    noise_density: float,
    mean_span_length: float,
    rng: np.random.Generator,
) -> tuple[np.ndarray, np.ndarray] | None:
    """T5 span masking of one sequence -> (input ids, target ids), or None if it is too short (< 2 tokens
    before eos) or no sentinel is available. Format in the module docstring; the target always ends with eos."""
    has_eos = len(seq) > 0 and int(seq[-1]) == eos_id
    body = seq[:-1] if has_eos else seq
    n = len(body)
    if n < 2 or not sentinel_ids:
        return None
    noise = min(max(int(round(n * noise_density)), 1), n - 1)
    k = min(max(int(round(noise / mean_span_length)), 1), noise, n - noise, len(sentinel_ids))
    keep = n - noise
    noise_len = _partition(noise, k, rng)  # (k,) >= 1
    keep_len = _partition(keep + 2, k + 1, rng)  # (k+1,) >= 1, then the two ends may be 0
    keep_len[0] -= 1
    keep_len[-1] -= 1
    seg = np.empty(2 * k + 1, dtype=np.int64)
    seg[0::2] = keep_len
    seg[1::2] = noise_len
    is_noise = np.repeat(np.arange(2 * k + 1) % 2 == 1, seg)  # (n,)
    starts = is_noise.copy()
    starts[1:] &= ~is_noise[:-1]
    sent = np.asarray(sentinel_ids[:k], dtype=np.int64)
    # input: non-noise tokens, each noise span replaced by its sentinel
    corrupted = body.astype(np.int64, copy=True)
    corrupted[starts] = sent
    inp = corrupted[~is_noise | starts]
    if has_eos:
        inp = np.append(inp, eos_id)
    # target: s_0 span_0 s_1 span_1 ... eos
    noise_start = starts[is_noise]  # (noise,)
    shift = np.cumsum(noise_start)  # sentinels placed up to and including each noise token
    tgt = np.empty(noise + k + 1, dtype=np.int64)
    tgt[np.arange(noise) + shift] = body[is_noise]
    tgt[np.flatnonzero(noise_start) + shift[noise_start] - 1] = sent
    tgt[-1] = eos_id
    return inp, tgt


def _as_ids(value: Any, what: str) -> np.ndarray:
    """1-D int64 numpy view of ids given as a tensor, array or list."""
    if isinstance(value, torch.Tensor):
        value = value.detach().cpu().numpy()
    arr = np.asarray(value)
    if arr.dtype == object or (arr.size and not np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{what} must hold integer token ids, got dtype {arr.dtype}")
    if arr.ndim != 1:
        raise ValueError(f"{what} must be 1-D (one sample, no batch dimension), got shape {arr.shape}")
    return arr.astype(np.int64, copy=False)


def _check_range(arr: np.ndarray, upper: int, what: str, unit: str) -> None:
    if arr.size and (int(arr.min()) < 0 or int(arr.max()) >= upper):
        bad = int(arr.min()) if int(arr.min()) < 0 else int(arr.max())
        raise ValueError(f"{what}: {unit} {bad} is outside [0, {upper}); check the tokenizer / modality config")


def select_qa(token_sample: Mapping[str, Any], generator: Any) -> dict[str, Any]:
    """Replace ``qa`` (list of ``[question_ids, answer_ids]``) by one seeded pair as ``question`` / ``answer``.

    Returns a new dict (the input is not modified); samples without ``qa`` or with an empty list are returned
    without question/answer. Raises ValueError if the sample already has ``question``/``answer`` and ``qa``.
    """
    out = {k: v for k, v in token_sample.items() if k != "qa"}
    if "qa" not in token_sample:
        return out
    pairs = token_sample["qa"]
    if not isinstance(pairs, (list, tuple)):
        raise TypeError(f"qa must be a list of [question_ids, answer_ids] pairs, got {type(pairs).__name__}")
    if not pairs:
        return out
    if "question" in token_sample or "answer" in token_sample:
        raise ValueError("token sample has both 'qa' and 'question'/'answer'; give one or the other")
    pair = pairs[int(_as_rng(generator).integers(len(pairs)))]
    if not isinstance(pair, (list, tuple)) or len(pair) != 2:
        raise ValueError(f"each qa entry must be a [question_ids, answer_ids] pair, got {pair!r}")
    out["question"] = _as_ids(pair[0], "qa question")
    out["answer"] = _as_ids(pair[1], "qa answer")
    return out


def _truncate(seq: np.ndarray, max_length: int, eos_id: int) -> np.ndarray:
    """Cut a sequence to ``max_length`` tokens, keeping a final eos."""
    if len(seq) <= max_length:
        return seq
    if int(seq[-1]) == eos_id:
        return np.append(seq[: max_length - 1], eos_id)
    return seq[:max_length]


def _prepare_tokens(
    tokens: Mapping[str, Any],
    modalities: Sequence[Modality],
    index: dict[str, int],
    text: TextSpecialIds | None,
) -> dict[int, np.ndarray]:
    """Validate a token sample -> {modality index: ids}, sequences truncated, empty modalities dropped."""
    if not isinstance(tokens, Mapping):
        raise TypeError(f"tokens must be a dict of modality name -> ids, got {type(tokens).__name__}")
    out: dict[int, np.ndarray] = {}
    for name, value in tokens.items():
        if name.startswith("__"):  # webdataset metadata (__key__, __url__)
            continue
        if name == "qa":
            raise ValueError("token sample still has 'qa': call onemodel.masking.select_qa(sample, rng) first")
        if name not in index:
            raise ValueError(f"token sample has unknown modality {name!r}; the model's modalities are {sorted(index)}")
        if value is None:
            continue
        i = index[name]
        m = modalities[i]
        arr = _as_ids(value, f"tokens[{name!r}]")
        if arr.size == 0:
            continue
        _check_range(arr, m.vocab_size, f"tokens[{name!r}]", "token id")
        if m.is_grid:
            if arr.size != m.num_tokens:
                raise ValueError(
                    f"tokens[{name!r}] has {arr.size} ids but grid modality {name!r} has {m.grid_size}x{m.grid_size} "
                    f"= {m.num_tokens}; check the tokenizer grid size"
                )
        else:
            if text is None:
                raise ValueError(
                    f"sequence modality {name!r} needs text_ids (eos / sentinel / pad ids of the text tokenizer)"
                )
            if bool((arr == text.pad_id).any()):
                raise ValueError(
                    f"tokens[{name!r}] contains the pad id {text.pad_id}; pass unpadded ids (one sample, no padding)"
                )
            arr = _truncate(arr, m.max_length, text.eos_id)
        out[i] = arr
    return out


def _dirichlet(rng: np.random.Generator, alphas: Sequence[float], scales: np.ndarray) -> np.ndarray:
    """Proportions over len(scales) modalities with concentration alpha * scale, alpha ~ U(alphas)."""
    if len(scales) == 0:
        return np.zeros(0)
    if len(scales) == 1:
        return np.ones(1)
    alpha = alphas[int(rng.integers(len(alphas)))] if len(alphas) > 1 else alphas[0]
    p = rng.dirichlet(alpha * scales)
    if not np.all(np.isfinite(p)):  # numerical safety for tiny concentrations
        p = np.full(len(scales), 1.0 / len(scales))
    return p


def _pack(parts: dict[int, tuple[np.ndarray, np.ndarray]]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """{modality index: (ids, pos)} -> concatenated (ids, mod, pos) long tensors in modality order."""
    if not parts:
        empty = torch.zeros(0, dtype=torch.long)
        return empty, empty.clone(), empty.clone()
    keys = sorted(parts)
    ids = np.concatenate([parts[i][0] for i in keys])
    pos = np.concatenate([parts[i][1] for i in keys])
    mod = np.repeat(np.asarray(keys, dtype=np.int64), [len(parts[i][0]) for i in keys])
    as_long = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64))  # noqa: E731
    return as_long(ids), as_long(mod), as_long(pos)


# ----------------------------------------------------------------------------------------------- masking


def mask_sample(
    tokens: Mapping[str, Any],
    modalities: Sequence[Modality],
    config: MaskingConfig,
    generator: Any,
    text_ids: Any = None,
) -> MaskedSample:
    """Randomly choose the encoder inputs and decoder targets of one token sample (module docstring).

    tokens: modality name -> 1-D int ids (torch or numpy, no padding); missing / empty modalities allowed.
    modalities: the model's modalities (their order gives the modality index).
    generator: numpy Generator (preferred), torch.Generator or int seed; the only randomness used.
    text_ids: TextSpecialIds / dict / text tokenizer; required when the sample has a sequence modality.
    """
    if not isinstance(config, MaskingConfig):
        raise TypeError(f"config must be a MaskingConfig, got {type(config).__name__}")
    rng = _as_rng(generator)
    mods = tuple(modalities)
    index = {m.name: i for i, m in enumerate(mods)}
    config.check_modalities(mods)
    text = TextSpecialIds.coerce(text_ids) if text_ids is not None else None
    arrays = _prepare_tokens(tokens, mods, index, text)

    present = sorted(arrays)
    if config.task_prob > 0 and rng.random() < config.task_prob:
        task_sample = _mask_for_task(arrays, mods, index, config, rng)
        if task_sample is not None:
            return task_sample
    in_allowed = None if config.input_modalities is None else {index[n] for n in config.input_modalities}
    tg_allowed = None if config.target_modalities is None else {index[n] for n in config.target_modalities}
    in_ok = [i for i in present if in_allowed is None or i in in_allowed]
    tg_ok = [i for i in present if tg_allowed is None or i in tg_allowed]
    if config.condition_dropout > 0 and rng.random() < config.condition_dropout:
        in_ok = []
    if config.input_budgets is not None:
        return _mask_fixed(arrays, mods, config, rng, in_ok, tg_ok)
    scale = lambda ids: np.array([config.alpha_scale.get(mods[i].name, 1.0) for i in ids])  # noqa: E731
    p_in = dict(zip(in_ok, _dirichlet(rng, config.alphas, scale(in_ok))))
    p_tg = dict(zip(tg_ok, _dirichlet(rng, config.target_alphas or config.alphas, scale(tg_ok))))

    enc: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    dec: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    rem_in, rem_tg = config.input_budget, config.target_budget

    # sequences: roles, then tokens in random order (budget consumed first come, first served)
    seqs = [i for i in present if mods[i].is_sequence]
    if seqs:
        draws = rng.random((len(seqs), 2))
        order = rng.permutation(len(seqs))
        for j in order:
            i = seqs[j]
            seq = arrays[i]
            n = len(seq)
            want_in = i in p_in and draws[j, 0] < p_in[i] * config.input_budget / n and rem_in > 0
            want_tg = i in p_tg and draws[j, 1] < p_tg[i] * config.target_budget / n and rem_tg > 0
            inp = tgt = None
            if want_in and want_tg:
                if rng.random() < config.span_masking_prob:
                    lo, hi = config.span_noise_density
                    sentinels = text.sentinel_ids[: config.max_sentinels]
                    masked = span_mask(seq, text.eos_id, sentinels, rng.uniform(lo, hi), config.span_mean_length, rng)
                    if masked is not None:
                        inp, tgt = masked
                        if max(sentinels) >= mods[i].vocab_size:
                            raise ValueError(
                                f"sentinel id {max(sentinels)} is outside the vocabulary of {mods[i].name!r} "
                                f"({mods[i].vocab_size}); the text tokenizer does not match the modality config"
                            )
                if inp is None:  # not span-masked (by chance or too short): whole input or whole target
                    want_in = rng.random() < 0.5
                    want_tg = not want_in
            if inp is None and want_in:
                inp = seq
            elif inp is None and want_tg:
                tgt = seq
            if inp is not None:
                inp = inp[:rem_in]
                rem_in -= len(inp)
                enc[i] = (inp, np.arange(len(inp)))
            if tgt is not None:
                tgt = tgt[:rem_tg]
                rem_tg -= len(tgt)
                dec[i] = (tgt, np.arange(len(tgt)))

    # grids: split what is left, inputs first, targets from the remaining positions
    grids_in = [i for i in in_ok if mods[i].is_grid]
    grids_tg = [i for i in tg_ok if mods[i].is_grid]
    n_in = dict(zip(grids_in, split_budget(rem_in, [p_in[i] for i in grids_in], [len(arrays[i]) for i in grids_in])))
    n_tg = dict(
        zip(
            grids_tg,
            split_budget(rem_tg, [p_tg[i] for i in grids_tg], [len(arrays[i]) - n_in.get(i, 0) for i in grids_tg]),
        )
    )
    for i in sorted(set(grids_in) | set(grids_tg)):
        a, t = int(n_in.get(i, 0)), int(n_tg.get(i, 0))
        if a + t == 0:
            continue
        perm = rng.permutation(len(arrays[i]))
        if a:
            pos = np.sort(perm[:a])
            enc[i] = (arrays[i][pos], pos)
        if t:
            pos = np.sort(perm[a : a + t])
            dec[i] = (arrays[i][pos], pos)

    enc_ids, enc_mod, enc_pos = _pack(enc)
    dec_ids, dec_mod, dec_pos = _pack(dec)
    return MaskedSample(enc_ids, enc_mod, enc_pos, dec_ids, dec_mod, dec_pos)


def _mask_fixed(arrays, mods, config: MaskingConfig, rng: np.random.Generator, in_ok, tg_ok) -> MaskedSample:
    """Fixed per-modality budgets (``config.input_budgets`` / ``target_budgets``) instead of the Dirichlet split."""
    enc: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    dec: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    for i in sorted(arrays):
        name, seq = mods[i].name, arrays[i]
        a = min(config.input_budgets.get(name, 0), len(seq)) if i in in_ok else 0
        t = min(config.target_budgets.get(name, 0), len(seq) - a) if i in tg_ok else 0
        if mods[i].is_grid:
            perm = rng.permutation(len(seq))
            if a:
                pos = np.sort(perm[:a])
                enc[i] = (seq[pos], pos)
            if t:
                pos = np.sort(perm[a : a + t])
                dec[i] = (seq[pos], pos)
        elif a:  # a sequence is an input (its first tokens) or else a target
            enc[i] = (seq[:a], np.arange(a))
        elif t:
            dec[i] = (seq[:t], np.arange(t))
    enc_ids, enc_mod, enc_pos = _pack(enc)
    dec_ids, dec_mod, dec_pos = _pack(dec)
    return MaskedSample(enc_ids, enc_mod, enc_pos, dec_ids, dec_mod, dec_pos)


def _mask_for_task(
    arrays: dict[int, np.ndarray], mods: tuple[Modality, ...], index: dict[str, int], config: MaskingConfig,
    rng: np.random.Generator,
) -> MaskedSample | None:
    """Mask one sample for an explicit task it can serve (MaskingTask); None if it can serve none."""
    eligible = [t for t in config.tasks if all(index[n] in arrays for n in (*t.inputs, *t.targets))]
    if not eligible:
        return None
    weights = np.array([t.weight for t in eligible], dtype=np.float64)
    task = eligible[int(rng.choice(len(eligible), p=weights / weights.sum()))]
    dropped = config.condition_dropout > 0 and rng.random() < config.condition_dropout
    enc: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    dec: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    if not dropped:
        for name in task.inputs:
            i = index[name]
            enc[i] = (arrays[i], np.arange(len(arrays[i])))
    for name in task.targets:
        i = index[name]
        seq = arrays[i]
        if mods[i].is_sequence:
            dec[i] = (seq, np.arange(len(seq)))
            continue
        # MaskGIT-style: a cosine-scheduled fraction of the grid is the target, the rest (if any) is input
        n = len(seq)
        num_masked = int(np.clip(np.ceil(np.cos(0.5 * np.pi * rng.random()) * n), 1, n))
        perm = rng.permutation(n)
        pos_t = np.sort(perm[:num_masked])
        dec[i] = (seq[pos_t], pos_t)
        if num_masked < n and not dropped:
            pos_i = np.sort(perm[num_masked:])
            enc[i] = (seq[pos_i], pos_i)
    enc_ids, enc_mod, enc_pos = _pack(enc)
    dec_ids, dec_mod, dec_pos = _pack(dec)
    return MaskedSample(enc_ids, enc_mod, enc_pos, dec_ids, dec_mod, dec_pos)


# ----------------------------------------------------------------------------------------------- explicit


def _positions(value: Any, m: Modality, what: str) -> np.ndarray:
    pos = _as_ids(value, f"{what} positions")
    _check_range(pos, m.num_tokens, what, "position")
    if len(np.unique(pos)) != len(pos):
        raise ValueError(f"{what}: positions must be unique")
    return pos


def _explicit(name: str, spec: Any, m: Modality, side: str) -> tuple[np.ndarray, np.ndarray]:
    """Parse one build_sample entry -> (ids, positions)."""
    what = f"{side}[{name!r}]"
    if isinstance(spec, tuple):
        if len(spec) != 2:
            raise ValueError(f"{what}: a tuple must be (ids, positions), got {len(spec)} items")
        ids_spec, pos_spec = spec
        pos = _positions(pos_spec, m, what)
        if ids_spec is None:
            if side == "inputs":
                raise ValueError(f"{what}: inputs need token ids, got None")
            ids = np.zeros(len(pos), dtype=np.int64)
        else:
            ids = _as_ids(ids_spec, f"{what} ids")
            if len(ids) != len(pos):
                raise ValueError(f"{what}: {len(ids)} ids but {len(pos)} positions")
    elif side == "targets" and m.is_grid:
        if isinstance(spec, str):
            if spec != "all":
                raise ValueError(f"{what}: the only string allowed is 'all', got {spec!r}")
            pos = np.arange(m.num_tokens)
        elif isinstance(spec, (int, np.integer)):
            raise TypeError(
                f"{what}: a grid target is a 1-D tensor of positions, 'all', or (ids, positions); not an int"
            )
        else:
            pos = _positions(spec, m, what)
        ids = np.zeros(len(pos), dtype=np.int64)
    elif side == "targets" and isinstance(spec, (int, np.integer)) and not isinstance(spec, bool):
        if not 0 <= spec <= m.max_length:
            raise ValueError(f"{what}: target length {spec} must be in [0, {m.max_length}] (max_length)")
        pos = np.arange(int(spec))
        ids = np.zeros(len(pos), dtype=np.int64)
    else:
        ids = _as_ids(spec, what)
        if m.is_grid and len(ids) != m.num_tokens:
            raise ValueError(
                f"{what}: {len(ids)} ids for grid {name!r} of {m.num_tokens} tokens; give all of them or "
                "a tuple (ids, positions)"
            )
        if len(ids) > m.num_tokens:
            raise ValueError(f"{what}: {len(ids)} ids exceed max_length {m.max_length} of {name!r}")
        pos = np.arange(len(ids))
    _check_range(ids, m.vocab_size, what, "token id")
    return ids, pos


def build_sample(
    inputs: Mapping[str, Any],
    targets: Mapping[str, Any],
    modalities: Sequence[Modality],
) -> MaskedSample:
    """A MaskedSample with exactly the given input and target tokens (formats in the module docstring).

    Example (MaskGIT step for depth given rgb, 100 depth positions already decoded)::

        build_sample({"rgb": rgb_ids, "depth": (depth_ids[done], done)}, {"depth": todo}, modalities)
    """
    for side, spec in (("inputs", inputs), ("targets", targets)):
        if not isinstance(spec, Mapping):
            raise TypeError(f"build_sample: {side} must be a dict of modality name -> spec, got {type(spec).__name__}")
    mods = tuple(modalities)
    index = {m.name: i for i, m in enumerate(mods)}
    parts: dict[str, dict[int, tuple[np.ndarray, np.ndarray]]] = {"inputs": {}, "targets": {}}
    for side, specs in (("inputs", inputs), ("targets", targets)):
        for name, spec in specs.items():
            if name not in index:
                raise ValueError(f"build_sample: unknown modality {name!r} in {side}; known: {sorted(index)}")
            if spec is None:
                continue
            parts[side][index[name]] = _explicit(name, spec, mods[index[name]], side)
    for i, (_, in_pos) in parts["inputs"].items():
        if mods[i].is_grid and i in parts["targets"]:
            overlap = np.intersect1d(in_pos, parts["targets"][i][1])
            if overlap.size:
                raise ValueError(
                    f"build_sample: grid {mods[i].name!r} has positions that are both input and target "
                    f"(e.g. {overlap[:5].tolist()}); they must be disjoint"
                )
    enc_ids, enc_mod, enc_pos = _pack(parts["inputs"])
    dec_ids, dec_mod, dec_pos = _pack(parts["targets"])
    return MaskedSample(enc_ids, enc_mod, enc_pos, dec_ids, dec_mod, dec_pos)
