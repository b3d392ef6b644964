"""Save and load a OneModel as a Hugging Face hub style directory: ``config.json`` + ``model.safetensors``.

``config.json`` holds ``{"class": "OneModel", "format_version": 1, <OneModelConfig fields>}`` and is parsed
strictly (unknown keys are refused, naming the key). ``model.safetensors`` holds the weights; tensors that
share storage (tied embeddings) are written once, under their first name, and the aliases are recorded in
the file's metadata. Loading never unpickles anything and refuses missing, unexpected or mis-shaped tensors
with a message naming them.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

__all__ = ["save_pretrained", "load_pretrained", "CONFIG_NAME", "WEIGHTS_NAME", "FORMAT_VERSION"]

logger = logging.getLogger(__name__)

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
FORMAT_VERSION = 1
MODEL_CLASS = "OneModel"
_MISMATCH_FIX = ("restore the config.json saved with these weights (the two files come from different models), "
                 "or re-export the model with save_pretrained()")


def _shared_aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """alias name -> canonical name for state-dict entries that share storage with an earlier entry."""
    seen: dict[tuple, str] = {}
    aliases = {}
    for name, t in state.items():
        key = (t.device, t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()))
        if key in seen:
            aliases[name] = seen[key]
        else:
            seen[key] = name
    return aliases


def save_pretrained(model, directory: str | Path) -> Path:
    """Write ``model`` (a OneModel) to ``directory`` (created if needed); returns the directory."""
    from tokenizers_mm.io_atomic import atomic_directory, save_safetensors, write_json

    directory = Path(directory)
    config = {"class": MODEL_CLASS, "format_version": FORMAT_VERSION, **model.config.to_dict()}
    state = model.state_dict()
    aliases = _shared_aliases(state)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in aliases}
    metadata = {"format": "pt", "class": MODEL_CLASS, "aliases": json.dumps(aliases)}
    with atomic_directory(directory) as tmp:  # both files or neither (other entries, e.g. tokenizers/, are kept)
        write_json(tmp / CONFIG_NAME, config)
        save_safetensors(tmp / WEIGHTS_NAME, tensors, metadata=metadata)
    logger.info("saved %s (%d tensors, %d tied) to %s", MODEL_CLASS, len(tensors), len(aliases), directory)
    return directory


def load_config(directory: str | Path):
    """Read and strictly validate ``directory/config.json`` -> ``OneModelConfig``."""
    from onemodel.model import OneModelConfig

    path = Path(directory) / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: is {str(directory)!r} a directory written by save_pretrained?")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ValueError(f"{path} must hold a JSON object")
    cls = data.pop("class", None)
    if cls != MODEL_CLASS:
        raise ValueError(f"{path} describes class {cls!r}, not {MODEL_CLASS!r}")
    version = data.pop("format_version", None)
    if version != FORMAT_VERSION:
        raise ValueError(f"{path} has format_version {version!r}; this onemodel reads version {FORMAT_VERSION}")
    # written before the aligned context existed (2026-11-25): those models have no aligned_proj weights
    data.setdefault("aligned_context", False)
    return OneModelConfig.from_dict(data)


def load_pretrained(directory: str | Path, map_location: str | torch.device = "cpu"):
    """Build a OneModel from ``directory`` (config.json + model.safetensors); strict, no pickle."""
    from onemodel.model import OneModel
    from tokenizers_mm.io_atomic import read_safetensors

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {str(directory)!r} does not exist")
    config = load_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: save_pretrained writes {WEIGHTS_NAME} beside {CONFIG_NAME}")
    loaded, _ = read_safetensors(weights, device=str(map_location),
                                 fix="re-export it with save_pretrained(), or retrain")

    model = OneModel(config)
    expected = model.state_dict()
    aliases = _shared_aliases(expected)
    wanted = [k for k in expected if k not in aliases]
    missing = [k for k in wanted if k not in loaded]
    unexpected = [k for k in loaded if k not in expected or k in aliases]
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match the config in {CONFIG_NAME} ({len(missing)} missing tensor(s), e.g. "
            f"{missing[:3]}; {len(unexpected)} unexpected, e.g. {unexpected[:3]}); {_MISMATCH_FIX}"
        )
    for name in wanted:
        if tuple(loaded[name].shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{weights} does not match the config in {CONFIG_NAME}: tensor {name!r} has shape "
                f"{tuple(loaded[name].shape)} but the config builds {tuple(expected[name].shape)}; {_MISMATCH_FIX}"
            )
    state = {k: loaded[k] for k in wanted}
    state.update({alias: loaded[canon] for alias, canon in aliases.items()})
    model.load_state_dict(state, strict=True)
    model.to(map_location)
    model.eval()
    return model
