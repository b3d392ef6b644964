"""Model batches: the flat, padded token layout the model consumes (see docs/internals.md §4).

Two types:
- ``MaskedSample``: one sample, unpadded: 1-D tensors ``enc_ids / enc_mod / enc_pos`` (Ni,) for the encoder
  input tokens and ``dec_ids / dec_mod / dec_pos`` (Nt,) for the decoder target tokens. Produced by
  ``onemodel.masking.mask_sample`` (random, training) and ``onemodel.masking.build_sample`` (explicit,
  generation / evaluation).
- ``MultimodalBatch``: B samples padded to the longest one: ``(B, Ni)`` / ``(B, Nt)`` long tensors plus
  ``enc_mask`` / ``dec_mask`` (bool, True = real token, False = padding). Built by ``collate``.

Continuous inputs (pixel patches, DESIGN.md §8): ``MaskedSample.values`` maps a modality embedded from values
(``OneModelConfig.input_embeddings = {name: "pixels"}``) to its full grid of patch rows ``(N, F)``, where row p holds
the patch at grid position p; the model reads the rows at the positions of the sample's input slots of that
modality. ``MultimodalBatch.enc_values[name]`` stacks them ``(B, N, F)`` (zeros for samples without values) and
``enc_values_mask[name]`` ``(B,)`` says which samples have them; a sample without values embeds that modality's
input slots from their token ids (e.g. the decoded-so-far tokens of MaskGIT).

Field meanings: ``*_ids`` token id (for targets: the label), ``*_mod`` modality index (position of the
modality in the model config's modality list), ``*_pos`` position inside the modality (grid: row * grid_size
+ col; sequence: index in the sequence). Padding slots hold id 0, modality 0, position 0 and mask False.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from torch.nn.utils.rnn import pad_sequence

from onemodel.modalities import Modality

__all__ = ["MaskedSample", "MultimodalBatch", "collate", "collate_values"]

_ENC = ("enc_ids", "enc_mod", "enc_pos")
_DEC = ("dec_ids", "dec_mod", "dec_pos")


def _check_tokens(
    ids: torch.Tensor,
    mod: torch.Tensor,
    pos: torch.Tensor,
    real: torch.Tensor | None,
    modalities: Sequence[Modality],
    where: str,
) -> None:
    """Check modality indices, id ranges and position ranges of real tokens (vectorised)."""
    if real is not None:
        ids, mod, pos = ids[real], mod[real], pos[real]
    if ids.numel() == 0:
        return
    n_mod = len(modalities)
    if int(mod.min()) < 0 or int(mod.max()) >= n_mod:
        raise ValueError(
            f"{where}: modality index out of range [0, {n_mod}) (got {int(mod.min())}..{int(mod.max())}); "
            "the batch was built for a different modality list"
        )
    vocab = torch.tensor([m.vocab_size for m in modalities], dtype=torch.long)
    limit = torch.tensor([m.num_tokens for m in modalities], dtype=torch.long)
    bad_id = (ids < 0) | (ids >= vocab[mod])
    if bool(bad_id.any()):
        i = int(bad_id.nonzero()[0, 0])
        m = modalities[int(mod[i])]
        raise ValueError(
            f"{where}: token id {int(ids[i])} of modality {m.name!r} is outside its vocabulary [0, {m.vocab_size}); "
            "check that the tokenizer matches the model's modality config"
        )
    bad_pos = (pos < 0) | (pos >= limit[mod])
    if bool(bad_pos.any()):
        i = int(bad_pos.nonzero()[0, 0])
        m = modalities[int(mod[i])]
        raise ValueError(
            f"{where}: position {int(pos[i])} of modality {m.name!r} is outside [0, {m.num_tokens}) "
            f"({'grid_size**2' if m.is_grid else 'max_length'})"
        )


def _check_values(values, where: str, rows: int | None) -> None:
    """values: name -> float tensor, (N, F) per sample (rows None) or (B, N, F) per batch (rows = B)."""
    if not isinstance(values, dict):
        raise TypeError(f"{where} must be a dict modality name -> float tensor, got {type(values).__name__}")
    dims = 2 if rows is None else 3
    for name, t in values.items():
        if not isinstance(t, torch.Tensor) or not t.dtype.is_floating_point:
            raise TypeError(f"{where}[{name!r}] must be a float tensor, got "
                            f"{t.dtype if isinstance(t, torch.Tensor) else type(t).__name__}")
        if t.dim() != dims or (rows is not None and t.shape[0] != rows):
            want = "(N, F)" if rows is None else f"({rows}, N, F)"
            raise ValueError(f"{where}[{name!r}] must have shape {want}, got {tuple(t.shape)}")


@dataclass
class MaskedSample:
    """One sample's encoder inputs and decoder targets, unpadded (all 1-D long tensors).

    enc_ids, enc_mod, enc_pos: (Ni,) input token ids, modality indices, positions.
    dec_ids, dec_mod, dec_pos: (Nt,) target token ids (labels), modality indices, positions.
    values: modality name -> (N, F) float patch rows of its whole grid (module docstring); empty for token inputs.
    Tokens are grouped by modality in modality-list order. Sequence targets of one modality are contiguous
    with dec_pos 0..L-1.
    """

    enc_ids: torch.Tensor
    enc_mod: torch.Tensor
    enc_pos: torch.Tensor
    dec_ids: torch.Tensor
    dec_mod: torch.Tensor
    dec_pos: torch.Tensor
    values: dict[str, torch.Tensor] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_values(self.values, "MaskedSample.values", rows=None)
        for group in (_ENC, _DEC):
            shapes = set()
            for name in group:
                t = getattr(self, name)
                if not isinstance(t, torch.Tensor):
                    raise TypeError(f"MaskedSample.{name} must be a torch.Tensor, got {type(t).__name__}")
                if t.dim() != 1:
                    raise ValueError(f"MaskedSample.{name} must be 1-D, got shape {tuple(t.shape)}")
                if t.dtype != torch.long:
                    raise TypeError(f"MaskedSample.{name} must be int64 (torch.long), got {t.dtype}")
                shapes.add(t.shape[0])
            if len(shapes) != 1:
                raise ValueError(f"MaskedSample fields {group} must have equal lengths, got {sorted(shapes)}")

    @property
    def num_inputs(self) -> int:
        return int(self.enc_ids.shape[0])

    @property
    def num_targets(self) -> int:
        return int(self.dec_ids.shape[0])

    def validate(self, modalities: Sequence[Modality]) -> None:
        """Raise ValueError if any modality index, id or position is out of range for ``modalities``."""
        _check_tokens(self.enc_ids, self.enc_mod, self.enc_pos, None, modalities, "MaskedSample encoder")
        _check_tokens(self.dec_ids, self.dec_mod, self.dec_pos, None, modalities, "MaskedSample decoder")

    def tokens_of(self, modality_index: int, side: str = "enc") -> tuple[torch.Tensor, torch.Tensor]:
        """(ids, positions) of one modality's input (``side="enc"``) or target (``"dec"``) tokens."""
        if side not in ("enc", "dec"):
            raise ValueError(f"side must be 'enc' or 'dec', got {side!r}")
        ids, mod, pos = (getattr(self, f"{side}_{f}") for f in ("ids", "mod", "pos"))
        sel = mod == modality_index
        return ids[sel], pos[sel]


@dataclass
class MultimodalBatch:
    """A padded batch (docs/internals.md §4).

    enc_ids, enc_mod, enc_pos: (B, Ni) long; enc_mask: (B, Ni) bool, True = real input token.
    dec_ids, dec_mod, dec_pos: (B, Nt) long; dec_mask: (B, Nt) bool, True = real target token.
    enc_values: modality name -> (B, N, F) float patch rows (module docstring); enc_values_mask: name -> (B,) bool,
    True = the sample has values for that modality.
    """

    enc_ids: torch.Tensor
    enc_mod: torch.Tensor
    enc_pos: torch.Tensor
    enc_mask: torch.Tensor
    dec_ids: torch.Tensor
    dec_mod: torch.Tensor
    dec_pos: torch.Tensor
    dec_mask: torch.Tensor
    enc_values: dict[str, torch.Tensor] = field(default_factory=dict)
    enc_values_mask: dict[str, torch.Tensor] = field(default_factory=dict)

    @property
    def batch_size(self) -> int:
        return int(self.enc_ids.shape[0])

    @property
    def num_input_slots(self) -> int:
        """Ni: padded number of encoder tokens per sample."""
        return int(self.enc_ids.shape[1])

    @property
    def num_target_slots(self) -> int:
        """Nt: padded number of decoder tokens per sample."""
        return int(self.dec_ids.shape[1])

    @property
    def device(self) -> torch.device:
        return self.enc_ids.device

    def _map(self, fn) -> MultimodalBatch:
        def apply(value):
            return {k: fn(v) for k, v in value.items()} if isinstance(value, dict) else fn(value)

        return MultimodalBatch(**{f.name: apply(getattr(self, f.name)) for f in dataclasses.fields(self)})

    def to(self, device: torch.device | str, non_blocking: bool = False) -> MultimodalBatch:
        """A copy on ``device`` (dtypes unchanged: ids stay long, masks stay bool)."""
        return self._map(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> MultimodalBatch:
        """Pinned copy (called by ``torch.utils.data.DataLoader(pin_memory=True)``)."""
        return self._map(lambda t: t.pin_memory())

    def validate(self, modalities: Sequence[Modality]) -> None:
        """Check shapes, dtypes and value ranges against ``modalities``; raise ValueError/TypeError."""
        for name in _ENC + _DEC + ("enc_mask", "dec_mask"):
            t = getattr(self, name)
            if not isinstance(t, torch.Tensor):
                raise TypeError(f"MultimodalBatch.{name} must be a torch.Tensor, got {type(t).__name__}")
            want = torch.bool if name.endswith("mask") else torch.long
            if t.dtype != want:
                raise TypeError(f"MultimodalBatch.{name} must have dtype {want}, got {t.dtype}")
            if t.dim() != 2:
                raise ValueError(f"MultimodalBatch.{name} must be 2-D (B, N), got shape {tuple(t.shape)}")
        for group in (_ENC + ("enc_mask",), _DEC + ("dec_mask",)):
            shapes = {tuple(getattr(self, n).shape) for n in group}
            if len(shapes) != 1:
                raise ValueError(f"MultimodalBatch fields {group} must share one shape, got {sorted(shapes)}")
        if self.enc_ids.shape[0] != self.dec_ids.shape[0]:
            raise ValueError(
                f"MultimodalBatch: encoder batch size {self.enc_ids.shape[0]} != "
                f"decoder batch size {self.dec_ids.shape[0]}"
            )
        _check_values(self.enc_values, "MultimodalBatch.enc_values", rows=self.enc_ids.shape[0])
        if set(self.enc_values) != set(self.enc_values_mask):
            raise ValueError("MultimodalBatch.enc_values and enc_values_mask must name the same modalities")
        for name, t in self.enc_values_mask.items():
            if t.dtype != torch.bool or tuple(t.shape) != (self.enc_ids.shape[0],):
                raise ValueError(f"MultimodalBatch.enc_values_mask[{name!r}] must be a (B,) bool tensor")
        tensors = [getattr(self, n) for n in _ENC + _DEC + ("enc_mask", "dec_mask")]
        tensors += list(self.enc_values.values()) + list(self.enc_values_mask.values())
        devices = {t.device for t in tensors}
        if len(devices) != 1:
            raise ValueError(f"MultimodalBatch tensors are on several devices: {sorted(map(str, devices))}")
        cpu = self.to("cpu")
        _check_tokens(cpu.enc_ids, cpu.enc_mod, cpu.enc_pos, cpu.enc_mask, modalities, "MultimodalBatch encoder")
        _check_tokens(cpu.dec_ids, cpu.dec_mod, cpu.dec_pos, cpu.dec_mask, modalities, "MultimodalBatch decoder")

    def samples(self) -> list[MaskedSample]:
        """Undo ``collate``: the unpadded ``MaskedSample`` of each row (padding slots removed)."""
        out = []
        for b in range(self.batch_size):
            em, dm = self.enc_mask[b], self.dec_mask[b]
            out.append(
                MaskedSample(
                    enc_ids=self.enc_ids[b][em], enc_mod=self.enc_mod[b][em], enc_pos=self.enc_pos[b][em],
                    dec_ids=self.dec_ids[b][dm], dec_mod=self.dec_mod[b][dm], dec_pos=self.dec_pos[b][dm],
                    values={k: v[b] for k, v in self.enc_values.items() if bool(self.enc_values_mask[k][b])},
                )
            )
        return out


def _round_up(n: int, multiple: int | None) -> int:
    if not multiple:
        return n
    return -(-n // multiple) * multiple


def _pad_group(
    tensors: list[list[torch.Tensor]], lengths: torch.Tensor, width: int
) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Right-pad each field's list of 1-D tensors to ``width`` -> (B, width) tensors + (B, width) mask."""
    padded = []
    for column in tensors:
        out = pad_sequence(column, batch_first=True, padding_value=0)  # (B, max_len)
        if out.shape[1] < width:
            out = torch.nn.functional.pad(out, (0, width - out.shape[1]), value=0)
        padded.append(out)
    mask = torch.arange(width).unsqueeze(0) < lengths.unsqueeze(1)  # (B, width)
    return padded, mask


def collate(samples: Sequence[MaskedSample], pad_to_multiple_of: int | None = None) -> MultimodalBatch:
    """Pad ``samples`` to the longest one (ids/mod/pos 0, mask False) and stack them into a batch.

    pad_to_multiple_of: round Ni and Nt up to a multiple of this (e.g. 8 for tensor cores); None = no rounding.
    Ni and Nt are at least 1 (all-padding when no sample has inputs / targets).
    Usable directly as a DataLoader ``collate_fn`` (``functools.partial`` for the multiple).
    """
    if not samples:
        raise ValueError("collate needs at least one sample")
    if pad_to_multiple_of is not None and (not isinstance(pad_to_multiple_of, int) or pad_to_multiple_of < 1):
        raise ValueError(f"pad_to_multiple_of must be a positive integer or None, got {pad_to_multiple_of!r}")
    for i, s in enumerate(samples):
        if not isinstance(s, MaskedSample):
            raise TypeError(f"collate: sample {i} is a {type(s).__name__}, expected onemodel.batch.MaskedSample")
    enc_len = torch.tensor([s.num_inputs for s in samples], dtype=torch.long)
    dec_len = torch.tensor([s.num_targets for s in samples], dtype=torch.long)
    # at least one slot per side: a batch whose samples have no inputs (condition dropout) still has a
    # (padding) key for cross-attention, and tensor shapes never have a zero dimension
    ni = _round_up(max(int(enc_len.max()), 1), pad_to_multiple_of)
    nt = _round_up(max(int(dec_len.max()), 1), pad_to_multiple_of)
    (enc_ids, enc_mod, enc_pos), enc_mask = _pad_group([[getattr(s, f) for s in samples] for f in _ENC], enc_len, ni)
    (dec_ids, dec_mod, dec_pos), dec_mask = _pad_group([[getattr(s, f) for s in samples] for f in _DEC], dec_len, nt)
    values, values_mask = collate_values([s.values for s in samples])
    return MultimodalBatch(
        enc_ids=enc_ids, enc_mod=enc_mod, enc_pos=enc_pos, enc_mask=enc_mask,
        dec_ids=dec_ids, dec_mod=dec_mod, dec_pos=dec_pos, dec_mask=dec_mask,
        enc_values=values, enc_values_mask=values_mask,
    )


def collate_values(per_sample: Sequence[dict[str, torch.Tensor] | None]
                   ) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Per-sample ``{name: (N, F)}`` (or None) -> ``({name: (B, N, F)}, {name: (B,) bool})``, zeros where missing."""
    names = sorted({k for v in per_sample if v for k in v})
    values, present = {}, {}
    for name in names:
        rows = [v.get(name) if v else None for v in per_sample]
        first = next(r for r in rows if r is not None)
        for r in rows:
            if r is not None and r.shape != first.shape:
                raise ValueError(f"values of {name!r} differ in shape across the batch: {tuple(r.shape)} vs "
                                 f"{tuple(first.shape)}")
        values[name] = torch.stack([r if r is not None else torch.zeros_like(first) for r in rows])
        present[name] = torch.tensor([r is not None for r in rows])
    return values, present
