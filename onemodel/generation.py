"""Any-to-any generation: fill target modalities from input modalities with a trained ``OneModel``.

``generate(model, inputs, targets, options)`` decodes the targets **in order**; each finished target becomes an
input of the next (chained any-to-any: caption -> semseg -> rgb). Per target:

- grid targets (rgb, depth, semseg): :class:`MaskGITSchedule` (confidence-based, cosine) or
  :class:`RandomOrderSchedule` (ROAR). Each step encodes the inputs plus the grid tokens decoded so far (the
  encoder runs once per step), and the decoder predicts the still-masked positions (MaskGIT: all of them,
  keeping the most confident; ROAR: the next chunk of a random permutation).
- sequence targets (caption, answer, det, ...): :class:`AutoregressiveSchedule`. The encoder runs once; the
  decoder runs one slot per step with a ``DecoderCache`` (cross-attention keys/values computed once,
  self-attention keys/values appended per token); each sample stops at ``eos_id``.

Classifier-free guidance (``SamplingOptions.guidance_scale != 1``) runs the conditional and the unconditional
batch (same targets, every input dropped; for grids the target's own decoded tokens are kept) as one batch of
2B and mixes ``uncond + scale * (cond - uncond)``.

Batched: samples may have different inputs (missing modalities, captions of different lengths); they are padded
into one ``MultimodalBatch``-style layout with masks, and every sample draws its randomness from its own seeded
generator, so a sample gives the same tokens alone or in a batch (exactly for greedy decoding and a fixed seed,
up to float round-off in the logits).

Shapes: B batch, Ni input tokens, Nq decoder queries, N tokens of a modality, V vocab, D width.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

import torch

from onemodel.batch import collate, collate_values
from onemodel.masking import build_sample
from onemodel.sampling import (
    AutoregressiveSchedule,
    MaskGITSchedule,
    RandomOrderSchedule,
    SamplingOptions,
    gumbel_noise,
    guided_logits,
    make_generators,
    random_permutations,
    sample_tokens,
)

logger = logging.getLogger(__name__)

__all__ = [
    "generate",
    "GenerationOutput",
    "SamplingOptions",
    "MaskGITSchedule",
    "RandomOrderSchedule",
    "AutoregressiveSchedule",
    "encoder_batch",
]


@dataclass
class GenerationOutput:
    """What :func:`generate` returns (one entry per target, in target order).

    tokens: target name -> per sample a 1-D long tensor of token ids (grid: N = grid_size**2 ids; sequence: the
        generated ids up to and including eos, or ``max_length`` ids when eos never came).
    probs: target name -> per sample a 1-D float tensor, same length: the model's probability (softmax of the
        guided logits at temperature 1, before top-k/top-p) of each chosen token.
    logits: only with ``output_logits=True``: target name -> float tensor of the guided logits (after suppression)
        each token was sampled from. Grid: (B, N, V), row n = the logits of position n at the step it was decoded.
        Sequence: (B, T, V), T = decoding steps run (the longest sample); rows after a sample's eos are unused.
    passes: target name -> ``{"encoder": n, "decoder": n}``: how many encoder and decoder passes generating it took
        (one pass = one call over the whole batch; with guidance the conditional and unconditional rows share it).
        MaskGIT / random order: one encoder and one decoder pass per step. Autoregressive: one encoder pass, one
        decoder pass per generated token (cached: over one slot; uncached: over the whole prefix).
    """

    tokens: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    probs: dict[str, list[torch.Tensor]] = field(default_factory=dict)
    logits: dict[str, torch.Tensor] | None = None
    passes: dict[str, dict[str, int]] = field(default_factory=dict)


# ------------------------------------------------------------------------------------------------ batching


def _as_rows(name: str, value) -> list[torch.Tensor | None]:
    """One modality's inputs -> a list of 1-D long tensors (or None = missing) per sample."""
    if isinstance(value, torch.Tensor):
        if value.dim() == 1:
            raise ValueError(
                f"input {name!r}: a 1-D tensor is ambiguous; pass a (B, N) tensor or a list of 1-D tensors, "
                "one per sample"
            )
        if value.dim() != 2:
            raise ValueError(f"input {name!r}: expected (B, N) token ids, got shape {tuple(value.shape)}")
        rows = list(value)
    elif isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        rows = list(value)
    else:
        raise TypeError(
            f"input {name!r}: expected token ids as a (B, N) tensor or a list of 1-D tensors, "
            f"got {type(value).__name__}"
        )
    out: list[torch.Tensor | None] = []
    for i, row in enumerate(rows):
        if row is None:
            out.append(None)
            continue
        row = torch.as_tensor(row)
        if row.dim() != 1:
            raise ValueError(f"input {name!r} sample {i}: expected 1-D token ids, got shape {tuple(row.shape)}")
        if row.dtype.is_floating_point or row.dtype == torch.bool:
            raise TypeError(f"input {name!r} sample {i}: token ids must be integers, got {row.dtype}")
        out.append(row.long())
    return out


def encoder_batch(
    model,
    rows: Mapping[str, Sequence[torch.Tensor | None]],
    partial: Mapping[str, tuple[torch.Tensor, torch.Tensor]] | None,
    batch_size: int,
    device: torch.device,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Pad per-sample encoder inputs into ``(enc_ids, enc_mod, enc_pos, enc_mask)``, each (B, Ni).

    rows: modality name -> per sample 1-D ids (None = missing); grid ids are a full grid, sequence ids start at
        position 0. partial: grid modality name -> ``(ids (B, N), known (B, N) bool)``: the decoded-so-far tokens
        of a grid target, given to the encoder at their positions. Tokens are grouped in modality-list order.
        Ni is at least 1 (a batch without any input gets one padding slot: the model's "no input" state).
    """
    cfg = model.config
    partial = partial or {}
    samples = []
    for b in range(batch_size):
        spec: dict[str, object] = {}
        for mod in cfg.modalities:
            if mod.name in rows and rows[mod.name][b] is not None:
                spec[mod.name] = rows[mod.name][b].cpu()
            elif mod.name in partial:
                grid_ids, known = partial[mod.name]
                pos = known[b].cpu().nonzero().squeeze(1)  # (n_known,) ascending
                if pos.numel():
                    spec[mod.name] = (grid_ids[b].cpu()[pos], pos)
        samples.append(build_sample(spec, {}, cfg.modalities))
    batch = collate(samples)
    enc = [batch.enc_ids, batch.enc_mod, batch.enc_pos, batch.enc_mask]
    if enc[0].shape[1] == 0:  # nothing to encode anywhere: one padding slot (attention needs >= 1 key)
        enc = [torch.zeros(batch_size, 1, dtype=t.dtype) for t in enc]
    return tuple(t.to(device) for t in enc)  # type: ignore[return-value]


def values_batch(model, values: Mapping[str, Sequence[torch.Tensor | None]] | None, batch_size: int,
                 device: torch.device) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-sample pixel patches of pixel-embedded inputs (name -> per sample (N, F) or None) -> the model's
    ``values`` / ``values_mask`` ({name: (B, N, F)}, {name: (B,) bool}) on ``device``."""
    if not values:
        return {}, {}
    per_sample = []
    for b in range(batch_size):
        per_sample.append({name: torch.as_tensor(rows[b]).float().cpu() for name, rows in values.items()
                           if rows[b] is not None})
    vals, present = collate_values(per_sample)
    return {k: v.to(device) for k, v in vals.items()}, {k: v.to(device) for k, v in present.items()}


def _check_inputs(model, rows: Mapping[str, list], targets: Sequence[str]) -> None:
    cfg = model.config
    names = cfg.modality_names
    for name in list(rows) + list(targets):
        if name not in names:
            raise ValueError(f"unknown modality {name!r}; this model knows {names}")
    if len(set(targets)) != len(targets):
        raise ValueError(f"targets {list(targets)} name a modality twice; list each target once")
    given = [t for t in targets if t in rows]
    if given:
        raise ValueError(
            f"target(s) {given} are also inputs; a modality is either given or generated: "
            "remove it from the inputs or from the targets"
        )
    for name, per_sample in rows.items():
        mod = cfg.modalities[cfg.modality_index(name)]
        for i, row in enumerate(per_sample):
            if row is None:
                continue
            if mod.is_grid and row.shape[0] != mod.num_tokens:
                raise ValueError(
                    f"input {name!r} sample {i}: a grid input needs {mod.num_tokens} tokens "
                    f"({mod.grid_size}x{mod.grid_size}), got {row.shape[0]}"
                )
            if mod.is_sequence and not 1 <= row.shape[0] <= mod.max_length:
                raise ValueError(
                    f"input {name!r} sample {i}: a sequence input needs 1..{mod.max_length} tokens, "
                    f"got {row.shape[0]}; "
                    "truncate it (the tokenizer's max_length) or drop the modality"
                )
            if row.numel() and (int(row.min()) < 0 or int(row.max()) >= mod.vocab_size):
                raise ValueError(
                    f"input {name!r} sample {i}: token ids must be in [0, {mod.vocab_size}); check the tokenizer"
                )


# ------------------------------------------------------------------------------------------------ decoding


def _suppress(logits: torch.Tensor, banned: torch.Tensor | None) -> torch.Tensor:
    """Set banned token ids (1-D long) to -inf in (..., V) logits."""
    if banned is None or banned.numel() == 0:
        return logits
    return logits.index_fill(-1, banned.to(logits.device), float("-inf"))


def _append_partial(enc: tuple, m_idx: int, ids: torch.Tensor, pos: torch.Tensor) -> tuple:
    """Append the decoded-so-far tokens of a grid target (ids (B, N); pos (B, k) their ascending positions) to
    encoder tensors (B, Ni).

    Every sample has the same number k of known positions (one schedule for the batch), so this is a (B, k)
    block without padding: no per-sample Python work and no host sync in the decoding loop.
    """
    if pos.shape[1] == 0:
        return enc
    block = (ids.gather(1, pos), torch.full_like(pos, m_idx), pos, torch.ones_like(pos, dtype=torch.bool))
    return tuple(torch.cat([a, b], dim=1) for a, b in zip(enc, block))


def _encode(model, cond: tuple, uncond: tuple | None, partial: tuple | None = None, vals: tuple | None = None):
    """Encoder output of the conditional batch, with the unconditional batch (every input dropped) stacked
    behind it (2B rows) when ``uncond`` is given. partial: ``(m_idx, ids, known)`` of a grid target, appended to
    both. vals: ``(values, values_mask)`` pixel patches of the conditional batch (``values_batch``)."""
    values, values_mask = vals if vals is not None else ({}, {})
    if partial is not None:
        cond = _append_partial(cond, *partial)
        uncond = _append_partial(uncond, *partial) if uncond is not None else None
    if uncond is not None:
        width = max(cond[0].shape[1], uncond[0].shape[1])
        pad = lambda t: torch.nn.functional.pad(t, (0, width - t.shape[1]))  # noqa: E731
        cond = tuple(torch.cat([pad(a), pad(b)]) for a, b in zip(cond, uncond))
        values = {k: torch.cat([v, torch.zeros_like(v)]) for k, v in values.items()}
        values_mask = {k: torch.cat([v, torch.zeros_like(v)]) for k, v in values_mask.items()}
    if values:
        return model.encode(*cond, values, values_mask)
    return model.encode(*cond)


def _conditions(model, cond_rows, opts: SamplingOptions, batch_size: int, device) -> tuple[tuple, tuple | None]:
    """Padded encoder tensors of the inputs, and of the input-dropped batch when guidance is on."""
    cond = encoder_batch(model, cond_rows, None, batch_size, device)
    uncond = encoder_batch(model, {}, None, batch_size, device) if opts.uses_guidance else None
    return cond, uncond


def _mix(logits: torch.Tensor, opts: SamplingOptions, batch_size: int) -> torch.Tensor:
    """(B or 2B, ..., V) -> guided (B, ..., V)."""
    if not opts.uses_guidance:
        return logits
    return guided_logits(logits[:batch_size], logits[batch_size:], opts.guidance_scale)


def _decode_grid(
    model, name, cond_rows, opts, schedule, batch_size, generators, device, banned, progress, keep_logits, passes,
    vals=None,
):
    cfg = model.config
    m_idx = cfg.modality_index(name)
    n = cfg.modalities[m_idx].num_tokens
    counts = schedule.step_counts(n)
    ids = torch.zeros(batch_size, n, dtype=torch.long, device=device)  # (B, N) decoded so far
    known = torch.zeros(batch_size, n, dtype=torch.bool, device=device)  # (B, N)
    probs = torch.zeros(batch_size, n, device=device)
    kept_logits = None
    rows_b = torch.arange(batch_size, device=device)[:, None]
    order = None
    if isinstance(schedule, RandomOrderSchedule):
        order = random_permutations(n, generators, device)  # (B, N)
    cond, uncond = _conditions(model, cond_rows, opts, batch_size, device)  # built once, reused every step
    start = 0  # tokens decoded so far (the same for every sample: one schedule for the batch)
    steps = range(len(counts))
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"{name} ({type(schedule).__name__})", leave=False)
    for step in steps:
        count = counts[step]
        # positions sorted known-first / masked-first by a stable sort: ascending within each group, and the group
        # sizes are known on the host (no nonzero(), no host sync)
        if order is not None:
            query_pos = order[:, start : start + count]  # (B, Nq) this chunk
        else:
            query_pos = torch.argsort(known.to(torch.uint8), dim=1, stable=True)[:, : n - start]  # (B, Nq) masked
        known_pos = torch.argsort((~known).to(torch.uint8), dim=1, stable=True)[:, :start]  # (B, start) ascending
        start += count
        enc_out = _encode(model, cond, uncond, (m_idx, ids, known_pos), vals)  # the encoder runs once per step
        passes["encoder"] += 1
        reps = enc_out.states.shape[0] // batch_size
        hidden = model.decode_grid(enc_out, name, query_pos.repeat(reps, 1))  # (B*, Nq, D)
        passes["decoder"] += 1
        logits = _mix(model.logits_for(hidden, name).float(), opts, batch_size)  # (B, Nq, V)
        logits = _suppress(logits, banned)
        tokens, tok_probs = sample_tokens(logits, opts, generators)  # (B, Nq)
        if order is not None:  # every query of the chunk is kept
            sel_pos, sel_tok, sel_prob, top = query_pos, tokens, tok_probs, None
        else:
            confidence = torch.log(tok_probs.clamp_min(1e-30))
            if schedule.choice_temperature > 0:
                anneal = schedule.choice_temperature * (1.0 - (step + 1) / len(counts))
                confidence = confidence + anneal * gumbel_noise((tokens.shape[1],), generators, device)
            top = confidence.topk(count, dim=1).indices  # (B, count): gathers, not boolean indexing (no host sync)
            sel_pos, sel_tok, sel_prob = query_pos.gather(1, top), tokens.gather(1, top), tok_probs.gather(1, top)
        ids[rows_b, sel_pos] = sel_tok
        probs[rows_b, sel_pos] = sel_prob
        known[rows_b, sel_pos] = True
        if keep_logits:
            if kept_logits is None:
                kept_logits = torch.zeros(batch_size, n, logits.shape[-1], device=device)
            sel_logits = logits if top is None else logits.gather(1, top[..., None].expand(-1, -1, logits.shape[-1]))
            kept_logits[rows_b, sel_pos] = sel_logits
    assert start == n
    return list(ids), list(probs), kept_logits


def _decode_sequence(
    model, name, cond_rows, opts, schedule, batch_size, generators, device, banned, eos_id, progress, keep_logits,
    passes, vals=None,
):
    cfg = model.config
    m_idx = cfg.modality_index(name)
    max_len = cfg.modalities[m_idx].max_length
    if schedule.max_length is not None:
        max_len = min(max_len, schedule.max_length)
    enc_out = _encode(model, *_conditions(model, cond_rows, opts, batch_size, device), None, vals)  # once per sequence
    passes["encoder"] += 1
    rows = enc_out.states.shape[0]  # B, or 2B with guidance
    cache = model.new_static_cache(enc_out, name, max_len) if schedule.use_cache else None
    tokens = torch.zeros(batch_size, max_len, dtype=torch.long, device=device)  # (B, L)
    probs = torch.zeros(batch_size, max_len, device=device)
    lengths = torch.full((batch_size,), max_len, dtype=torch.long, device=device)
    done = torch.zeros(batch_size, dtype=torch.bool, device=device)
    all_logits = [] if keep_logits else None
    prev = torch.zeros(rows, 1, dtype=torch.long, device=device)  # token fed at the next slot (ignored at pos 0)
    steps = range(max_len)
    if progress:
        from tqdm.auto import tqdm

        steps = tqdm(steps, desc=f"{name} (autoregressive)", leave=False)
    for t in steps:
        if cache is not None:  # one slot: static KV cache, masks prepared once (model.decode_next)
            hidden = model.decode_next(cache, prev)  # (B*, 1, D)
        else:  # recompute the whole prefix (reference path)
            start = torch.zeros(rows, 1, dtype=torch.long, device=device)
            fed = torch.cat([start, tokens[:, :t].repeat(rows // batch_size, 1)], 1)  # (B*, t + 1)
            pos = torch.arange(t + 1, device=device).expand(rows, t + 1)
            mod_ids, present = torch.full_like(pos, m_idx), torch.ones_like(pos, dtype=torch.bool)
            hidden = model.decode(enc_out, fed, mod_ids, pos, present)  # (B*, t + 1, D)
        passes["decoder"] += 1
        logits = _mix(model.logits_for(hidden[:, -1:], name).float(), opts, batch_size)  # (B, 1, V)
        logits = _suppress(logits, banned)
        if all_logits is not None:
            all_logits.append(logits[:, 0])
        tok, p = sample_tokens(logits, opts, generators)  # (B, 1)
        tokens[:, t], probs[:, t] = tok[:, 0], p[:, 0]
        if eos_id is not None:
            new_done = ~done & (tok[:, 0] == eos_id)
            lengths = torch.where(new_done, torch.full_like(lengths, t + 1), lengths)
            done |= new_done
            # reading `done` on the host is a device sync: every token on CPU (free there), every 8th on GPU (a
            # batch that finished meanwhile runs a few extra steps whose tokens lie past every eos: same output)
            if (device.type == "cpu" or t % 8 == 7) and bool(done.all()):
                break
        prev = tok if rows == batch_size else tok.repeat(rows // batch_size, 1)
    out_ids = [tokens[b, : lengths[b]].clone() for b in range(batch_size)]
    out_probs = [probs[b, : lengths[b]].clone() for b in range(batch_size)]
    kept = None
    if all_logits is not None:
        kept = torch.stack(all_logits, 1)[:, : int(lengths.max())]  # (B, T, V), T = steps up to the last eos
    return out_ids, out_probs, kept


# ---------------------------------------------------------------------------------------------- generate


def generate(
    model,
    inputs: Mapping[str, object],
    targets: Sequence[str],
    options: SamplingOptions | Mapping[str, SamplingOptions] | None = None,
    *,
    seed: int | Sequence[int] = 0,
    eos_id: int | None = None,
    suppress_ids: Mapping[str, Sequence[int] | torch.Tensor] | None = None,
    batch_size: int | None = None,
    output_logits: bool = False,
    progress: bool = False,
    values: Mapping[str, Sequence[torch.Tensor | None]] | None = None,
    to_values: Callable[[str, list[torch.Tensor]], list[torch.Tensor]] | None = None,
) -> GenerationOutput:
    """Generate ``targets`` (in order) from ``inputs`` with ``model`` (a ``onemodel.model.OneModel``).

    inputs: modality name -> token ids per sample: a (B, N) long tensor or a list of B 1-D tensors; ``None`` in the
        list = that sample lacks the modality. Grid inputs have ``grid_size**2`` ids; sequence inputs 1..max_length
        ids without padding (as the tokenizer wrote them, ending with eos).
    targets: modality names to generate, in order; each finished target is an input of the next ones. A target
        that is also an input raises ``ValueError``.
    options: one ``SamplingOptions`` for every target, or a dict target -> options (missing targets get the
        default: greedy, MaskGIT 8 steps for grids (fewer when the grid is smaller), autoregressive for sequences).
    seed: one int (every sample uses the same seed) or one int per sample.
    eos_id: stop a sequence target at this id (per sample); None = always generate ``max_length`` tokens.
    suppress_ids: target name -> token ids never to generate (e.g. padding, bos, sentinels, ids beyond the
        tokenizer's vocabulary).
    batch_size: needed only when ``inputs`` is empty (unconditional generation).
    output_logits: also return the guided logits of every chosen token (``GenerationOutput.logits``).
    progress: show a tqdm bar per target.
    values: pixel patches of pixel-embedded inputs (``OneModelConfig.input_embeddings`` "pixels"): name -> per
        sample a (N, F) float tensor (``onemodel.pixel_inputs.patchify``) or None; such an input then enters the
        encoder as pixels (its token ids are still given in ``inputs``). Without them it enters as tokens.
    to_values: for chaining: ``(name, tokens per sample) -> patches per sample``, called when a pixel-embedded
        target is finished and more targets follow (the pipeline decodes the tokens to pixels); None = the
        finished target feeds the next ones as tokens.
    """
    if isinstance(targets, str):
        targets = [targets]
    targets = list(targets)
    if not targets:
        raise ValueError("targets is empty; name at least one modality to generate")
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a dict modality -> token ids, got {type(inputs).__name__}")
    rows = {name: _as_rows(name, value) for name, value in inputs.items()}
    sizes = {len(r) for r in rows.values()}
    if len(sizes) > 1:
        raise ValueError(f"inputs have different batch sizes {sorted(sizes)}; give every modality one entry per sample")
    if sizes:
        b = sizes.pop()
        if batch_size is not None and batch_size != b:
            raise ValueError(f"batch_size={batch_size} but the inputs hold {b} samples")
        batch_size = b
    if batch_size is None or batch_size < 1:
        raise ValueError("no inputs: pass batch_size=B (>= 1) for unconditional generation")
    _check_inputs(model, rows, targets)
    cfg = model.config
    values = {k: list(v) for k, v in (values or {}).items()}
    for name, per_sample in values.items():
        if name not in rows:
            raise ValueError(f"values given for {name!r}, which is not an input; give its token ids in inputs too")
        if len(per_sample) != batch_size:
            raise ValueError(f"values[{name!r}] holds {len(per_sample)} samples, the inputs {batch_size}")
    per_target: dict[str, SamplingOptions] = {}
    for name in targets:
        if isinstance(options, Mapping):
            unknown = sorted(set(options) - set(targets))
            if unknown:
                raise ValueError(f"options given for {unknown}, which are not targets {targets}")
            opts = options.get(name, SamplingOptions())
        else:
            opts = options if options is not None else SamplingOptions()
        if not isinstance(opts, SamplingOptions):
            raise TypeError(f"options for {name!r} must be SamplingOptions, got {type(opts).__name__}")
        mod = cfg.modalities[cfg.modality_index(name)]
        sched = opts.schedule
        if sched is None:
            sched = MaskGITSchedule(steps=min(8, mod.num_tokens)) if mod.is_grid else AutoregressiveSchedule()
        if mod.is_grid and isinstance(sched, AutoregressiveSchedule):
            raise ValueError(
                f"target {name!r} is a grid: use MaskGITSchedule or RandomOrderSchedule, not autoregressive"
            )
        if mod.is_sequence and not isinstance(sched, AutoregressiveSchedule):
            raise ValueError(f"target {name!r} is a sequence: use AutoregressiveSchedule, not {type(sched).__name__}")
        if mod.is_grid and sched.counts is not None:
            sched.step_counts(mod.num_tokens)  # explicit counts must cover the grid: fail before any work
        if mod.is_grid and sched.steps > mod.num_tokens:
            raise ValueError(
                f"steps={sched.steps} for {name!r} exceeds its {mod.num_tokens} tokens; use 1..{mod.num_tokens} steps"
            )
        per_target[name] = SamplingOptions(
            temperature=opts.temperature, top_k=opts.top_k, top_p=opts.top_p,
            guidance_scale=opts.guidance_scale, schedule=sched,
        )
    device = next(model.parameters()).device
    banned = {}
    for name, ids in (suppress_ids or {}).items():
        if name not in targets:
            continue
        t = torch.as_tensor(list(ids) if not isinstance(ids, torch.Tensor) else ids, dtype=torch.long).flatten()
        vocab = cfg.modalities[cfg.modality_index(name)].vocab_size
        banned[name] = t[(t >= 0) & (t < vocab)].unique().to(device)
    make_generators(seed, batch_size, device)  # validate the seeds before any work

    out = GenerationOutput(logits={} if output_logits else None)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for k, name in enumerate(targets):
                opts = per_target[name]
                generators = make_generators(seed, batch_size, device, stream=k)
                mod = cfg.modalities[cfg.modality_index(name)]
                vals = values_batch(model, values, batch_size, device)
                if mod.is_grid:
                    ids, probs, logits = _decode_grid(
                        model, name, rows, opts, opts.schedule, batch_size, generators, device, banned.get(name),
                        progress, output_logits, out.passes.setdefault(name, {"encoder": 0, "decoder": 0}), vals,
                    )
                else:
                    ids, probs, logits = _decode_sequence(
                        model, name, rows, opts, opts.schedule, batch_size, generators, device, banned.get(name),
                        eos_id, progress, output_logits, out.passes.setdefault(name, {"encoder": 0, "decoder": 0}),
                        vals,
                    )
                out.tokens[name] = [i.cpu() for i in ids]
                out.probs[name] = [p.cpu() for p in probs]
                if output_logits:
                    out.logits[name] = logits.cpu()
                rows = {**rows, name: out.tokens[name]}  # chain: the finished target is an input of the next
                if to_values is not None and name in cfg.value_modalities and k + 1 < len(targets):
                    values = {**values, name: to_values(name, out.tokens[name])}  # read as pixels, as in training
    finally:
        model.train(was_training)
    return out
