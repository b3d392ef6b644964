"""The one tokenizer interface and the loader that dispatches on a saved tokenizer's config.

Every tokenizer saves a directory with ``config.json`` whose ``"class"`` key names one of the classes of
:data:`TOKENIZER_CLASSES` (a fixed registry; nothing is sniffed from weight names and nothing is unpickled).
"""

from __future__ import annotations

import json
import logging
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

__all__ = ["ModalityTokenizer", "load_tokenizer", "read_tokenizer_config", "TOKENIZER_CLASSES", "CONFIG_NAME"]

CONFIG_NAME = "config.json"

# class name (as written in config.json) -> "module:attribute"; imported lazily so loading text needs no torch nn.
TOKENIZER_CLASSES: dict[str, str] = {
    "VQTokenizer": "tokenizers_mm.vq:VQTokenizer",
    "TextTokenizer": "tokenizers_mm.text:TextTokenizer",
}


class ModalityTokenizer(ABC):
    """A modality tokenizer: raw modality in user units <-> 1-D token ids per sample.

    ``decode(encode(x))`` round-trips (up to the tokenizer's reconstruction error) in the user's units;
    the tokenizer owns its normalisation.
    """

    @property
    @abstractmethod
    def vocab_size(self) -> int:
        """Number of token ids (V); ids are in ``[0, V)``."""

    @abstractmethod
    def encode(self, x: Any) -> Any:
        """One item or a batch in user units -> LongTensor ``(B, N)``."""

    @abstractmethod
    def decode(self, ids: Any) -> Any:
        """Token ids ``(B, N)`` (or ``(N,)``) -> a batch in user units."""

    @abstractmethod
    def save_pretrained(self, directory: str | Path) -> None:
        """Write ``config.json`` (naming the class) and the weights/vocabulary into ``directory``."""

    @classmethod
    @abstractmethod
    def from_pretrained(cls, directory: str | Path) -> "ModalityTokenizer":
        """Load a tokenizer written by :meth:`save_pretrained`."""


def read_tokenizer_config(directory: str | Path) -> dict[str, Any]:
    """Read ``directory/config.json`` with errors that say what to do."""
    directory = Path(directory)
    if not directory.exists():
        raise FileNotFoundError(f"tokenizer directory {str(directory)!r} does not exist")
    if not directory.is_dir():
        raise ValueError(f"{str(directory)!r} is a file; pass the directory written by save_pretrained()")
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise ValueError(
            f"{str(directory)!r} has no {CONFIG_NAME}: it is not a saved tokenizer. Train one with "
            "'onemodel train-tokenizer --modality ... --out DIR' or save one with tokenizer.save_pretrained(DIR)"
        )
    try:
        config = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{str(path)!r} is not valid JSON ({err}); re-save the tokenizer") from err
    if not isinstance(config, dict) or "class" not in config:
        raise ValueError(f"{str(path)!r} must be a JSON object with a 'class' key naming the tokenizer class")
    return config


def _resolve_class(name: str) -> type:
    import importlib

    if name not in TOKENIZER_CLASSES:
        raise ValueError(f"unknown tokenizer class {name!r} in config.json; known classes: {sorted(TOKENIZER_CLASSES)}")
    module_name, attr = TOKENIZER_CLASSES[name].split(":")
    return getattr(importlib.import_module(module_name), attr)


def load_tokenizer(directory: str | Path) -> ModalityTokenizer:
    """Load any saved tokenizer; the class comes from ``config.json["class"]``."""
    config = read_tokenizer_config(directory)
    cls = _resolve_class(config["class"])
    logger.debug("loading %s from %s", config["class"], directory)
    return cls.from_pretrained(directory)
