"""The text tokenizer: a Hugging Face ``tokenizers`` WordPiece model with the special tokens 4M-style training needs.

Vocabulary layout (fixed ids first, then the learned word pieces):

- ``[PAD]`` = 0, ``[BOS]`` = 1, ``[EOS]`` = 2, ``[UNK]`` = 3,
- sentinels ``[S_0] .. [S_{k-1}]`` (span masking, T5-style), ``k = num_sentinels``,
- location tokens ``<loc_0> .. <loc_{N-1}>`` (box coordinates, ``N = num_loc_bins``),
- word pieces learned from the corpus; every printable ASCII character is in the initial alphabet, so any ASCII
  text can be spelled (no ``[UNK]``); box class names are guaranteed to be single tokens.

Normalisation (the same code path at training and inference, it is the ``tokenizers`` normaliser stored in
``tokenizer.json``): NFKC, lowercase, every whitespace run -> one space, strip. Words are split on whitespace
only and the WordPiece decoder re-joins ``##`` pieces, so ``decode(encode(t)) == normalize(t)`` exactly for any
ASCII text (punctuation included: ``"what is it?"`` round-trips). Special tokens (sentinels, ``<loc_i>``) are
matched in the raw text before normalisation, are always single tokens, and print as themselves in ``decode``.

Empty text (after normalisation) is a user error (``ValueError``) unless ``allow_empty=True``, which encodes it as
just ``[EOS]`` (used for a detection target with no boxes).
"""

from __future__ import annotations

import dataclasses
import logging
import re
import string
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tokenizers_mm.base import CONFIG_NAME, ModalityTokenizer, read_tokenizer_config

logger = logging.getLogger(__name__)

__all__ = ["TextTokenizerConfig", "TextTokenizer", "TOKENIZER_FILE"]

TOKENIZER_FILE = "tokenizer.json"
PAD, BOS, EOS, UNK = "[PAD]", "[BOS]", "[EOS]", "[UNK]"


def check_encodable(text: str, what: str = "text") -> None:
    """``ValueError`` for text that is not valid Unicode (a lone surrogate: what Python makes of non-UTF-8 bytes
    in command-line arguments or file names), instead of an obscure error from the tokenizers library."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as err:
        raise ValueError(
            f"{what} contains a character that is not valid Unicode ({text[err.start]!r} at position {err.start}, "
            "e.g. from non-UTF-8 bytes); pass UTF-8 text (or decode it with errors='replace')"
        ) from None


@dataclass
class TextTokenizerConfig:
    """Saved beside ``tokenizer.json``. ``vocab_size`` is the requested size (the trained one may be smaller)."""

    vocab_size: int = 1024
    num_sentinels: int = 32
    num_loc_bins: int = 64
    class_names: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.num_sentinels < 1:
            raise ValueError(f"num_sentinels must be >= 1, got {self.num_sentinels}")
        if self.num_loc_bins < 2:
            raise ValueError(f"num_loc_bins must be >= 2, got {self.num_loc_bins}")
        if self.vocab_size < 4 + self.num_sentinels + self.num_loc_bins:
            raise ValueError(
                f"vocab_size {self.vocab_size} is too small for 4 specials + {self.num_sentinels} sentinels + "
                f"{self.num_loc_bins} location tokens"
            )
        self.class_names = [str(c) for c in self.class_names]

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "TextTokenizerConfig":
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown TextTokenizerConfig key(s) {unknown}; valid keys: {sorted(valid)}")
        return cls(**data)


def _special_tokens(num_sentinels: int, num_loc_bins: int) -> list[str]:
    return [PAD, BOS, EOS, UNK] + [f"[S_{i}]" for i in range(num_sentinels)] + [f"<loc_{i}>" for i in range(num_loc_bins)]


def _normalizer() -> Any:
    from tokenizers import Regex, normalizers

    return normalizers.Sequence([
        normalizers.NFKC(), normalizers.Lowercase(), normalizers.Replace(Regex(r"\s+"), " "), normalizers.Strip(),
    ])


class TextTokenizer(ModalityTokenizer):
    """Text <-> ids with pad/bos/eos, sentinels and location tokens (see the module docstring)."""

    def __init__(self, tokenizer: Any, config: TextTokenizerConfig):
        from tokenizers import Tokenizer

        if not isinstance(tokenizer, Tokenizer):
            raise TypeError(f"TextTokenizer wraps a tokenizers.Tokenizer, got {type(tokenizer).__name__}")
        self._tok = tokenizer
        self.config = config
        specials = _special_tokens(config.num_sentinels, config.num_loc_bins)
        ids = [tokenizer.token_to_id(t) for t in specials]
        if ids != list(range(len(specials))):
            raise ValueError("tokenizer.json does not hold the expected special tokens at ids 0..; re-train the text tokenizer")
        self._sentinel_offset = 4
        self._loc_offset = 4 + config.num_sentinels
        self._special_re = re.compile("(" + "|".join(re.escape(t) for t in specials) + ")")

    # -- training ----------------------------------------------------------------------------------------------
    @classmethod
    def train(
        cls,
        texts: Iterable[str],
        vocab_size: int = 1024,
        num_sentinels: int = 32,
        num_loc_bins: int = 64,
        class_names: Sequence[str] = (),
        min_frequency: int = 1,
    ) -> "TextTokenizer":
        """Train the WordPiece vocabulary on ``texts`` (captions, questions, answers, box strings)."""
        from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers, trainers

        config = TextTokenizerConfig(vocab_size=vocab_size, num_sentinels=num_sentinels, num_loc_bins=num_loc_bins,
                                     class_names=[c.lower().strip() for c in class_names])
        texts = [t for t in texts if isinstance(t, str) and t.strip()]
        if not texts:
            raise ValueError("no non-empty texts to train the text tokenizer on")
        alphabet = sorted(set(string.printable) - set(string.whitespace) - set(string.ascii_uppercase))
        specials = _special_tokens(num_sentinels, num_loc_bins)
        # A closed vocabulary (every distinct word fits, as in the shapes data): whole words, most frequent first,
        # ties by spelling, after the specials and the spelling alphabet. Deterministic, unlike the WordPiece
        # trainer, whose merges break count ties in hash-map order (measured: two runs on the same captions gave
        # different vocabularies, so the demo's token ids changed from run to run).
        normalizer = _normalizer()
        counts = Counter(w for t in texts for w in normalizer.normalize_str(t).split())
        counts.update({name: min_frequency for name in config.class_names})
        base = [*specials, *alphabet, *(f"##{c}" for c in alphabet)]
        in_base = set(base)
        words = [w for w, c in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])) if c >= min_frequency and w not in in_base]
        if len(base) + len(words) <= vocab_size:
            vocab = {token: i for i, token in enumerate([*base, *words])}
            tok = Tokenizer(models.WordPiece(vocab=vocab, unk_token=UNK, max_input_chars_per_word=100))
            tok.add_special_tokens(specials)
        else:
            tok = cls._train_wordpiece(texts, config, alphabet, specials, vocab_size, min_frequency)
        tok.normalizer = normalizer
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
        for name in config.class_names:
            if len(tok.encode(name, add_special_tokens=False).ids) != 1:
                tok.add_tokens([AddedToken(name, single_word=True, normalized=True)])
        out = cls(tok, config)
        logger.info("trained text tokenizer: %d tokens (requested %d)", out.vocab_size, vocab_size)
        return out

    @staticmethod
    def _train_wordpiece(texts: list[str], config: "TextTokenizerConfig", alphabet: list[str], specials: list[str],
                         vocab_size: int, min_frequency: int) -> Any:
        """Subword vocabulary with the ``tokenizers`` WordPiece trainer (open vocabularies: more distinct words
        than ``vocab_size``). Its merges may differ between runs where pair counts tie."""
        from tokenizers import Tokenizer, models, pre_tokenizers, trainers

        tok = Tokenizer(models.WordPiece(unk_token=UNK, max_input_chars_per_word=100))
        tok.normalizer = _normalizer()
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        trainer = trainers.WordPieceTrainer(
            vocab_size=vocab_size, min_frequency=min_frequency, show_progress=False,
            special_tokens=specials, initial_alphabet=alphabet, continuing_subword_prefix="##",
        )
        # every ASCII character, word-initial and word-internal ("##c"), so any ASCII word can be spelled;
        # class names are appended (several times) so they earn whole-word entries even in a small corpus
        spelling = [" ".join(alphabet), " ".join("a" + c for c in alphabet)] * max(1, min_frequency)
        corpus = texts + spelling + [" ".join(config.class_names)] * max(8, min_frequency)
        tok.train_from_iterator(corpus, trainer=trainer)
        return tok

    # -- properties ----------------------------------------------------------------------------------------------
    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def pad_id(self) -> int:
        return 0

    @property
    def bos_id(self) -> int:
        return 1

    @property
    def eos_id(self) -> int:
        return 2

    @property
    def unk_id(self) -> int:
        return 3

    @property
    def num_sentinels(self) -> int:
        return self.config.num_sentinels

    @property
    def sentinel_ids(self) -> list[int]:
        return list(range(self._sentinel_offset, self._sentinel_offset + self.config.num_sentinels))

    @property
    def num_loc_bins(self) -> int:
        return self.config.num_loc_bins

    @property
    def loc_ids(self) -> list[int]:
        return list(range(self._loc_offset, self._loc_offset + self.config.num_loc_bins))

    def loc_id(self, i: int) -> int:
        """Id of ``<loc_i>``."""
        if not 0 <= int(i) < self.config.num_loc_bins:
            raise ValueError(f"location bin must be in [0, {self.config.num_loc_bins}), got {i}")
        return self._loc_offset + int(i)

    @property
    def class_names(self) -> list[str]:
        return list(self.config.class_names)

    @property
    def backend(self) -> Any:
        """The underlying ``tokenizers.Tokenizer``."""
        return self._tok

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, i: int) -> str | None:
        return self._tok.id_to_token(int(i))

    # -- text <-> ids --------------------------------------------------------------------------------------------
    def normalize(self, text: str) -> str:
        """The normal form ``decode(encode(text))`` returns (special tokens kept verbatim, spaced)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        norm = self._tok.normalizer
        pieces = []
        for i, piece in enumerate(self._special_re.split(text)):
            pieces.append(piece if i % 2 else norm.normalize_str(piece))
        return " ".join(p for p in pieces if p)

    def encode_ids(self, text: str, allow_empty: bool = False) -> list[int]:
        """One text -> its ids (no bos, no eos, no padding)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}; pass a string or a list of strings")
        check_encodable(text)
        ids = self._tok.encode(text, add_special_tokens=False).ids
        if not ids and not allow_empty:
            raise ValueError("empty text: captions, questions and answers must contain at least one non-space character")
        return ids

    def encode_ids_batch(self, texts: Sequence[str], allow_empty: bool = False) -> list[list[int]]:
        """Many texts -> their ids (no eos), in one call to the fast tokenizer."""
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"texts must be strings, got {type(t).__name__}")
            check_encodable(t)
        rows = [e.ids for e in self._tok.encode_batch(list(texts), add_special_tokens=False)]
        if not allow_empty and any(not r for r in rows):
            raise ValueError("empty text: captions, questions and answers must contain at least one non-space character")
        return rows

    def encode(self, text: str | Sequence[str], max_length: int | None = None, allow_empty: bool = False) -> Any:
        """Text(s) -> LongTensor ``(B, L)``: ids + eos, right-padded with ``pad_id`` (to ``max_length`` when given,
        else to the longest row); rows longer than ``max_length`` are truncated, keeping the final eos."""
        import torch

        texts = [text] if isinstance(text, str) else text
        if not isinstance(texts, (list, tuple)) or not texts:
            raise ValueError("encode expects a string or a non-empty list of strings")
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        rows = [self.encode_ids(t, allow_empty=allow_empty) + [self.eos_id] for t in texts]
        if max_length is not None:
            rows = [r if len(r) <= max_length else r[: max_length - 1] + [self.eos_id] for r in rows]
        width = max_length if max_length is not None else max(len(r) for r in rows)
        out = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        for i, r in enumerate(rows):
            out[i, : len(r)] = torch.tensor(r, dtype=torch.long)
        return out

    def _rows(self, ids: Any) -> list[list[int]]:
        if hasattr(ids, "detach"):
            ids = ids.detach().cpu().numpy()
        if isinstance(ids, np.ndarray):
            if ids.dtype.kind not in "iu":
                raise TypeError(f"token ids must be integers, got {ids.dtype}")
            return [ids.tolist()] if ids.ndim == 1 else [list(r) for r in ids.tolist()]
        if isinstance(ids, (list, tuple)):
            if not ids or all(isinstance(v, (int, np.integer)) for v in ids):
                return [[int(v) for v in ids]]
            return [self._rows(r)[0] for r in ids]
        raise TypeError(f"decode expects token ids (tensor, array or list), got {type(ids).__name__}")

    def decode(self, ids: Any) -> list[str]:
        """Ids ``(B, L)`` / ``(L,)`` / lists -> one string per row: stops at the first eos, drops pad and bos;
        sentinels and location tokens print as their token strings."""
        out = []
        vocab = self.vocab_size
        for row in self._rows(ids):
            keep = []
            for i in row:
                if i == self.eos_id:
                    break
                if i in (self.pad_id, self.bos_id):
                    continue
                if not 0 <= i < vocab:
                    raise ValueError(f"token id {i} is outside the vocabulary [0, {vocab})")
                keep.append(i)
            out.append(self._tok.decode(keep, skip_special_tokens=False) if keep else "")
        return out

    def tokens(self, text: str) -> list[str]:
        """The token strings of ``text`` (for inspection)."""
        return self._tok.encode(text, add_special_tokens=False).tokens

    # -- persistence ----------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        from tokenizers_mm.io_atomic import atomic_directory, write_json, write_text

        payload = {"class": "TextTokenizer", "config": dataclasses.asdict(self.config)}
        with atomic_directory(directory) as tmp:
            write_text(tmp / TOKENIZER_FILE, self._tok.to_str(pretty=True))
            write_json(tmp / CONFIG_NAME, payload)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "TextTokenizer":
        from tokenizers import Tokenizer

        directory = Path(directory)
        payload = read_tokenizer_config(directory)
        if payload["class"] != "TextTokenizer":
            raise ValueError(f"{str(directory)!r} holds a {payload['class']}, not a TextTokenizer; use load_tokenizer()")
        path = directory / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(f"{str(directory)!r} has no {TOKENIZER_FILE}; re-save the text tokenizer")
        try:
            tok = Tokenizer.from_file(str(path))
        except Exception as err:  # the Rust library raises bare Exceptions for bad JSON
            raise ValueError(f"{str(path)!r} is not a valid tokenizer file (truncated, or not produced by onemodel); "
                             "retrain the text tokenizer") from err
        return cls(tok, TextTokenizerConfig.from_dict(payload.get("config", {})))

    def to_transformers(self) -> Any:
        """The same tokenizer as a ``transformers.PreTrainedTokenizerFast`` (pad/bos/eos/unk set, eos appended like
        :meth:`encode`, sentinels and location tokens registered as additional special tokens)."""
        from tokenizers import Tokenizer, processors
        from transformers import PreTrainedTokenizerFast

        tok = Tokenizer.from_str(self._tok.to_str())
        tok.post_processor = processors.TemplateProcessing(single=f"$A {EOS}", special_tokens=[(EOS, self.eos_id)])
        extra = [f"[S_{i}]" for i in range(self.num_sentinels)] + [f"<loc_{i}>" for i in range(self.num_loc_bins)]
        return PreTrainedTokenizerFast(
            tokenizer_object=tok, pad_token=PAD, bos_token=BOS, eos_token=EOS, unk_token=UNK,
            additional_special_tokens=extra,
        )
