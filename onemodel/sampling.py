"""Token sampling and decoding schedules, independent of the network.

- :class:`SamplingOptions`: temperature (0 = greedy / argmax), top-k, top-p, classifier-free guidance scale,
  validated on construction with errors that say what to do.
- :func:`filter_logits`, :func:`sample_tokens`, :func:`guided_logits`: the per-token maths. Sampling draws its
  randomness from one seeded ``torch.Generator`` **per sample**, so a sample gets the same tokens whether it is
  decoded alone or inside a batch (given the same seed for that sample).
- Schedules, small objects that say which target positions are decoded at each step:
  :class:`MaskGITSchedule` (cosine or linear, confidence-based re-masking), :class:`RandomOrderSchedule` (ROAR:
  a random permutation decoded in chunks) for grids; :class:`AutoregressiveSchedule` for sequences.

Shapes: B batch, N tokens, V vocabulary.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import torch

__all__ = [
    "SamplingOptions",
    "MaskGITSchedule",
    "RandomOrderSchedule",
    "AutoregressiveSchedule",
    "Schedule",
    "filter_logits",
    "guided_logits",
    "sample_tokens",
    "make_generators",
    "step_counts",
]


# ----------------------------------------------------------------------------------------------- schedules


def step_counts(num_tokens: int, steps: int, cosine: bool) -> list[int]:
    """How many tokens to decode at each of ``steps`` steps so that all ``num_tokens`` are decoded.

    MaskGIT cosine schedule: after step ``t`` (1..T), ``floor(N * cos(pi/2 * t/T))`` tokens are still masked
    (linear: ``floor(N * (1 - t/T))``). Every step decodes at least one token, so ``steps == num_tokens`` decodes
    exactly one token per step.
    """
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    if steps > num_tokens:
        raise ValueError(
            f"steps ({steps}) cannot exceed the number of tokens to decode ({num_tokens}); use at most {num_tokens}"
        )
    remaining = num_tokens
    counts = []
    for t in range(1, steps + 1):
        ratio = math.cos(math.pi / 2 * t / steps) if cosine else 1.0 - t / steps
        target = int(math.floor(num_tokens * ratio + 1e-9))
        # leave at least one token for each later step, decode at least one now
        target = max(min(target, remaining - 1), steps - t)
        counts.append(remaining - target)
        remaining = target
    assert remaining == 0 and sum(counts) == num_tokens and min(counts) >= 1
    return counts


@dataclass(frozen=True)
class MaskGITSchedule:
    """Grid decoding by confidence (MaskGIT): each step predicts every still-masked position, samples a token
    for each, and keeps the ``count`` most confident (probability of the sampled token); the rest stay masked.

    steps: number of decoding steps (1..number of grid tokens).
    cosine: cosine schedule (few tokens first, many at the end) when True, linear otherwise.
    choice_temperature: Gumbel noise added to the log-confidence when choosing which tokens to keep, annealed
        linearly to 0 over the steps (MaskGIT uses ~4.5); 0 = pure confidence order (deterministic at temperature 0).
    counts: explicit tokens decoded at each step (4M-style schedules, e.g. ``(1, 3, 12, 48, 192)`` for a 16x16
        grid); they must sum to the grid's token count, each >= 1. When given, ``steps`` is ``len(counts)`` and
        ``cosine`` is unused.
    """

    steps: int = 8
    cosine: bool = True
    choice_temperature: float = 0.0
    counts: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _explicit_counts(self)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int):
            raise TypeError(f"steps must be an int, got {type(self.steps).__name__}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1 (number of MaskGIT decoding steps), got {self.steps}")
        if self.choice_temperature < 0:
            raise ValueError(f"choice_temperature must be >= 0, got {self.choice_temperature}")

    kind = "grid"

    def step_counts(self, num_tokens: int) -> list[int]:
        """Tokens decoded at each step for a grid of ``num_tokens`` tokens."""
        if self.counts is not None:
            return _check_counts(self.counts, num_tokens)
        return step_counts(num_tokens, self.steps, self.cosine)


@dataclass(frozen=True)
class RandomOrderSchedule:
    """Grid decoding in a random order (ROAR): a seeded random permutation of the positions is split into
    ``steps`` chunks of near-equal size; step ``t`` predicts and samples exactly the positions of chunk ``t``.
    """

    steps: int = 8
    counts: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        _explicit_counts(self)
        if isinstance(self.steps, bool) or not isinstance(self.steps, int):
            raise TypeError(f"steps must be an int, got {type(self.steps).__name__}")
        if self.steps < 1:
            raise ValueError(f"steps must be >= 1 (number of random-order decoding steps), got {self.steps}")

    kind = "grid"

    def step_counts(self, num_tokens: int) -> list[int]:
        """Tokens decoded at each step (explicit ``counts``, else near-equal chunks)."""
        if self.counts is not None:
            return _check_counts(self.counts, num_tokens)
        return step_counts(num_tokens, self.steps, cosine=False)


def _explicit_counts(schedule) -> None:
    """Validate a schedule's explicit ``counts`` and set ``steps = len(counts)``."""
    if schedule.counts is None:
        return
    counts = schedule.counts
    if isinstance(counts, (str, bytes)) or not isinstance(counts, Sequence) or not counts:
        raise TypeError(f"counts must be a non-empty list of ints (tokens per step), got {counts!r}")
    if not all(isinstance(c, int) and not isinstance(c, bool) and c >= 1 for c in counts):
        raise ValueError(f"counts must be ints >= 1 (every step decodes at least one token), got {list(counts)}")
    object.__setattr__(schedule, "counts", tuple(counts))
    object.__setattr__(schedule, "steps", len(counts))


def _check_counts(counts: tuple[int, ...], num_tokens: int) -> list[int]:
    if sum(counts) != num_tokens:
        raise ValueError(f"schedule counts {list(counts)} sum to {sum(counts)}, but the grid has {num_tokens} tokens; "
                         "make them sum to the grid's token count")
    return list(counts)


@dataclass(frozen=True)
class AutoregressiveSchedule:
    """Sequence decoding left to right, one token per step, stopping at eos per sample.

    max_length: cap on the number of generated tokens (eos included); ``None`` = the modality's ``max_length``.
    use_cache: keep the decoder's self-attention keys/values (and cross-attention keys/values) between steps;
        False recomputes the whole prefix every step (reference / benchmark only).
    """

    max_length: int | None = None
    use_cache: bool = True

    def __post_init__(self) -> None:
        if self.max_length is not None and (isinstance(self.max_length, bool) or not isinstance(self.max_length, int)):
            raise TypeError(f"max_length must be an int or None, got {type(self.max_length).__name__}")
        if self.max_length is not None and self.max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {self.max_length}")

    kind = "sequence"


Schedule = MaskGITSchedule | RandomOrderSchedule | AutoregressiveSchedule


# ------------------------------------------------------------------------------------------------ sampling


@dataclass(frozen=True)
class SamplingOptions:
    """How to turn logits into tokens for one target.

    temperature: 0 = greedy (argmax); > 0 divides the logits before sampling.
    top_k: keep only the k most likely tokens (0 = off).
    top_p: nucleus sampling, keep the smallest set of tokens whose probability reaches top_p (1 = off); in (0, 1].
    guidance_scale: classifier-free guidance, ``logits = uncond + scale * (cond - uncond)`` where ``uncond`` are
        the logits with every input dropped; 1 = no guidance (the unconditional pass is skipped), 0 = unconditional.
    schedule: the decoding schedule; ``None`` = MaskGIT(8 steps) for grids, autoregressive for sequences.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    guidance_scale: float = 1.0
    schedule: Schedule | None = None

    def __post_init__(self) -> None:
        for name in ("temperature", "top_p", "guidance_scale"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise TypeError(f"{name} must be a number, got {type(value).__name__} ({value!r})")
            if not math.isfinite(value):
                raise ValueError(f"{name} must be finite, got {value}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int):
            raise TypeError(f"top_k must be an int (0 = off), got {type(self.top_k).__name__} ({self.top_k!r})")
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0 (0 = greedy), got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1] (1 = off), got {self.top_p}")
        if self.guidance_scale < 0:
            raise ValueError(
                f"guidance_scale must be >= 0 (1 = no guidance, 0 = unconditional), got {self.guidance_scale}"
            )
        if self.schedule is not None and not isinstance(
            self.schedule, (MaskGITSchedule, RandomOrderSchedule, AutoregressiveSchedule)
        ):
            raise TypeError(
                "schedule must be MaskGITSchedule, RandomOrderSchedule or AutoregressiveSchedule, "
                f"got {type(self.schedule).__name__}"
            )

    @property
    def uses_guidance(self) -> bool:
        return self.guidance_scale != 1.0


def guided_logits(cond: torch.Tensor, uncond: torch.Tensor | None, scale: float) -> torch.Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``; ``cond`` itself when ``scale == 1``."""
    if uncond is None or scale == 1.0:
        return cond
    return uncond + scale * (cond - uncond)


def filter_logits(logits: torch.Tensor, top_k: int = 0, top_p: float = 1.0) -> torch.Tensor:
    """Set logits outside the top-k / top-p (nucleus) set to -inf. ``logits``: (..., V). The most likely token
    is always kept."""
    out = logits
    vocab = logits.shape[-1]
    if top_k and top_k < vocab:
        kth = torch.topk(out, top_k, dim=-1).values[..., -1:]  # (..., 1)
        out = out.masked_fill(out < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(out, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits.float(), dim=-1)
        before = probs.cumsum(dim=-1) - probs  # probability mass strictly before each token
        drop_sorted = before >= top_p  # the first token (before = 0) is always kept
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        out = out.masked_fill(drop, float("-inf"))
    return out


def make_generators(
    seed: int | Sequence[int], batch_size: int, device: torch.device | str = "cpu", stream: int = 0
) -> list[torch.Generator]:
    """One seeded generator per sample: ``seed`` (int) gives every sample the same seed, a sequence gives each
    sample its own (so sample i decoded alone with ``seed=seeds[i]`` draws the same numbers).

    stream: an independent random stream per value (``generate`` uses one per target), so how many numbers one
    target consumed (e.g. a batch decoding past a sample's eos) never shifts the numbers of the next target.
    """
    import numpy as np

    if isinstance(seed, bool):
        raise TypeError("seed must be an int or a list of ints")
    if isinstance(seed, int):
        seeds = [seed] * batch_size
    else:
        seeds = list(seed)
        if len(seeds) != batch_size:
            raise ValueError(f"got {len(seeds)} seeds for a batch of {batch_size}; pass one seed or one per sample")
        if not all(isinstance(s, int) and not isinstance(s, bool) for s in seeds):
            raise TypeError("seeds must be ints")
    gens = []
    for s in seeds:
        state = np.random.SeedSequence([int(s) % (2**63), int(stream)]).generate_state(1, dtype=np.uint64)[0]
        g = torch.Generator(device=device)
        g.manual_seed(int(state) % (2**63))
        gens.append(g)
    return gens


def _uniform(shape_per_sample: tuple[int, ...], generators: Sequence[torch.Generator], device) -> torch.Tensor:
    """(B, *shape) uniforms in [0, 1), row b drawn from generators[b]."""
    rows = [torch.rand(shape_per_sample, generator=g, device=g.device) for g in generators]
    return torch.stack(rows).to(device)


def sample_tokens(
    logits: torch.Tensor,
    options: SamplingOptions,
    generators: Sequence[torch.Generator],
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample one token per position.

    logits: (B, N, V) float, already guided. Returns ``(tokens (B, N) long, probs (B, N) float)`` where ``probs`` is
    the model's probability (softmax of the unfiltered logits, temperature 1) of each chosen token: a confidence
    usable for MaskGIT re-masking and detection scores.
    Greedy when ``options.temperature == 0`` (no randomness consumed); otherwise draws exactly ``N`` uniforms per
    sample from that sample's generator (Gumbel-max over the filtered, tempered distribution).
    """
    assert logits.dim() == 3 and logits.shape[0] == len(generators), (logits.shape, len(generators))
    logits = logits.float()
    base_probs = torch.softmax(logits, dim=-1)  # (B, N, V)
    if options.temperature == 0:
        tokens = logits.argmax(dim=-1)
    else:
        filtered = filter_logits(logits / options.temperature, options.top_k, options.top_p)
        probs = torch.softmax(filtered, dim=-1)  # (B, N, V)
        # inverse-CDF sampling with one uniform per position (cheap, exactly reproducible per sample)
        u = _uniform((logits.shape[1], 1), generators, logits.device)  # (B, N, 1)
        cdf = probs.cumsum(dim=-1)
        tokens = torch.searchsorted(cdf, u * cdf[..., -1:]).squeeze(-1).clamp_(max=logits.shape[-1] - 1)
        # never pick a filtered-out token because of rounding at a cdf plateau
        bad = probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1) == 0
        if bad.any():
            tokens = torch.where(bad, probs.argmax(dim=-1), tokens)
    chosen = base_probs.gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    return tokens, chosen


def gumbel_noise(shape_per_sample: tuple[int, ...], generators: Sequence[torch.Generator], device) -> torch.Tensor:
    """(B, *shape) standard Gumbel noise, row b from generators[b]."""
    u = _uniform(shape_per_sample, generators, device).clamp_(1e-20, 1.0 - 1e-7)
    return -torch.log(-torch.log(u))


def random_permutations(n: int, generators: Sequence[torch.Generator], device) -> torch.Tensor:
    """(B, n) one random permutation of range(n) per sample, row b from generators[b]."""
    return torch.stack([torch.randperm(n, generator=g, device=g.device) for g in generators]).to(device)
