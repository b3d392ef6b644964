"""A tokenizer bundle: one directory holding the tokenizers of every modality (``rgb/``, ``depth/``, ``semseg/``,
``text/``; any subset), and the code that turns a raw sample into a token sample (docs/internals.md §3).

Token sample: ``{"__key__": str, "rgb" | "depth" | "semseg": int32 (grid_size**2,), "caption": int32 (L,),
"det": int32 (L,), "qa": [[question_ids, answer_ids], ...]}`` (text ids end with eos, no padding; keys only for
modalities the raw sample has and the bundle can tokenize).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from tokenizers_mm.base import CONFIG_NAME, ModalityTokenizer, load_tokenizer
from tokenizers_mm.boxes import boxes_to_text

logger = logging.getLogger(__name__)

__all__ = ["TokenizerBundle", "IMAGE_TOKENIZERS", "TEXT_TOKENIZER", "DEFAULT_MAX_LENGTHS"]

IMAGE_TOKENIZERS = ("rgb", "depth", "semseg")
TEXT_TOKENIZER = "text"
# sequence modality -> default max_length (eos included), as in onemodel.modalities.default_modalities
DEFAULT_MAX_LENGTHS: dict[str, int] = {"caption": 64, "question": 24, "answer": 8, "det": 32}


class TokenizerBundle:
    """The tokenizers of a model, by name (``"rgb"``, ``"depth"``, ``"semseg"``, ``"text"``)."""

    def __init__(self, tokenizers: Mapping[str, ModalityTokenizer]):
        if not tokenizers:
            raise ValueError("a tokenizer bundle needs at least one tokenizer")
        for name, tok in tokenizers.items():
            if name in IMAGE_TOKENIZERS and getattr(tok, "modality", name) != name:
                raise ValueError(f"bundle entry {name!r} holds a {tok.modality} tokenizer")
        self.tokenizers: dict[str, ModalityTokenizer] = dict(tokenizers)

    # -- persistence -------------------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "TokenizerBundle":
        """Load every ``directory/<name>/`` holding a ``config.json``."""
        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"tokenizer bundle directory {str(directory)!r} does not exist")
        toks = {}
        for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
            if (sub / CONFIG_NAME).is_file():
                toks[sub.name] = load_tokenizer(sub)
        if not toks:
            raise ValueError(
                f"{str(directory)!r} holds no tokenizer (expected sub-directories rgb/, depth/, semseg/, text/ each with "
                "config.json); train them with 'onemodel train-tokenizer --modality ... --out DIR/<modality>'"
            )
        logger.info("loaded tokenizers %s from %s", sorted(toks), directory)
        return cls(toks)

    def save_pretrained(self, directory: str | Path) -> None:
        from tokenizers_mm.io_atomic import atomic_directory

        with atomic_directory(directory) as tmp:  # all tokenizers or none
            for name, tok in self.tokenizers.items():
                tok.save_pretrained(tmp / name)

    # -- access ------------------------------------------------------------------------------------------------
    def __getitem__(self, name: str) -> ModalityTokenizer:
        if name not in self.tokenizers:
            raise KeyError(f"no {name!r} tokenizer in this bundle; it has {sorted(self.tokenizers)}")
        return self.tokenizers[name]

    def __contains__(self, name: object) -> bool:
        return name in self.tokenizers

    def names(self) -> list[str]:
        return sorted(self.tokenizers)

    @property
    def text(self) -> Any:
        return self[TEXT_TOKENIZER]

    def _image_size(self, raw: Mapping[str, Any]) -> tuple[int, int]:
        """(height, width) of a raw sample's images, for box quantisation."""
        for name in IMAGE_TOKENIZERS:
            if raw.get(name) is not None:
                return tuple(np.asarray(raw[name]).shape[:2])  # type: ignore[return-value]
        for name in IMAGE_TOKENIZERS:
            if name in self.tokenizers:
                s = self.tokenizers[name].image_size  # type: ignore[attr-defined]
                return (s, s)
        raise ValueError("cannot tokenize boxes: the sample has no image and the bundle no image tokenizer to give its size")

    # -- model modalities ----------------------------------------------------------------------------------------
    def modalities(self, max_lengths: Mapping[str, int] | None = None) -> tuple[dict[str, Any], ...]:
        """Modality specs for the model, one dict per modality, ready for ``onemodel.modalities.Modality(**spec)``:
        ``{"name", "kind", "vocab_size", "tokenizer", "grid_size" | "max_length"}``. Grid modalities for each image
        tokenizer; with a text tokenizer, the sequence modalities ``caption``, ``question``, ``answer``, ``det`` with
        ``max_lengths`` (defaults :data:`DEFAULT_MAX_LENGTHS`; a name mapped to 0 is left out)."""
        lengths = {**DEFAULT_MAX_LENGTHS, **(dict(max_lengths) if max_lengths else {})}
        unknown = sorted(set(lengths) - set(DEFAULT_MAX_LENGTHS))
        if unknown:
            raise ValueError(f"unknown sequence modality(ies) {unknown}; known: {sorted(DEFAULT_MAX_LENGTHS)}")
        specs: list[dict[str, Any]] = []
        for name in IMAGE_TOKENIZERS:
            if name in self.tokenizers:
                tok = self.tokenizers[name]
                specs.append({"name": name, "kind": "grid", "vocab_size": int(tok.vocab_size), "tokenizer": name,
                              "grid_size": int(tok.grid_size)})  # type: ignore[attr-defined]
        if TEXT_TOKENIZER in self.tokenizers:
            vocab = int(self.tokenizers[TEXT_TOKENIZER].vocab_size)
            for name, length in lengths.items():
                if length:
                    specs.append({"name": name, "kind": "sequence", "vocab_size": vocab, "tokenizer": TEXT_TOKENIZER,
                                  "max_length": int(length)})
        return tuple(specs)

    # -- tokenization ---------------------------------------------------------------------------------------------
    def tokenize_sample(self, raw: Mapping[str, Any]) -> dict[str, Any]:
        """One raw sample (docs/internals.md §1) -> token sample (§3)."""
        return self.tokenize_samples([raw])[0]

    def tokenize_samples(self, raws: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
        """Batch version of :meth:`tokenize_sample`: each image tokenizer runs once over all samples that have its
        modality (the hot path of pre-tokenization). Raw modalities without a tokenizer in the bundle are skipped."""
        out: list[dict[str, Any]] = [{"__key__": r["__key__"]} if "__key__" in r else {} for r in raws]
        for name in IMAGE_TOKENIZERS:
            if name not in self.tokenizers:
                continue
            idx = [i for i, r in enumerate(raws) if r.get(name) is not None]
            if not idx:
                continue
            try:
                images = np.stack([np.asarray(raws[i][name]) for i in idx])
            except ValueError as err:
                raise ValueError(f"{name} images of one batch have different shapes: {err}") from err
            ids = self.tokenizers[name].encode(images).numpy().astype(np.int32)  # (B, N)
            for row, i in enumerate(idx):
                out[i][name] = ids[row]
        if TEXT_TOKENIZER in self.tokenizers:
            text = self.tokenizers[TEXT_TOKENIZER]
            eos = text.eos_id  # type: ignore[attr-defined]
            bins = text.num_loc_bins  # type: ignore[attr-defined]
            # collect every text of the batch, encode them in one call, then hand the rows back
            texts: list[str] = []
            dets: list[str] = []
            where: list[tuple[int, str, int]] = []  # (sample, field, qa index)
            det_where: list[int] = []
            for i, raw in enumerate(raws):
                if raw.get("caption") is not None:
                    texts.append(raw["caption"])
                    where.append((i, "caption", -1))
                for j, pair in enumerate(raw.get("qa") or []):
                    texts += [pair["question"], pair["answer"]]
                    where += [(i, "question", j), (i, "answer", j)]
                if raw.get("boxes") is not None:
                    dets.append(boxes_to_text(raw["boxes"], self._image_size(raw), bins))
                    det_where.append(i)
            rows = text.encode_ids_batch(texts) if texts else []  # type: ignore[attr-defined]
            for i, raw in enumerate(raws):
                if raw.get("qa") is not None:
                    out[i]["qa"] = [[[], []] for _ in raw["qa"]]
            for (i, field_name, j), row in zip(where, rows):
                ids = row + [eos]
                if field_name == "caption":
                    out[i]["caption"] = np.asarray(ids, dtype=np.int32)
                else:
                    out[i]["qa"][j][0 if field_name == "question" else 1] = ids
            det_rows = text.encode_ids_batch(dets, allow_empty=True) if dets else []  # type: ignore[attr-defined]
            for i, row in zip(det_where, det_rows):
                out[i]["det"] = np.asarray(row + [eos], dtype=np.int32)
        return out
