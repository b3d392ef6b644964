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
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    config = {"class": MODEL_CLASS, "format_version": FORMAT_VERSION, **model.config.to_dict()}
    (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
    state = model.state_dict()
    aliases = _shared_aliases(state)
    tensors = {k: v.detach().cpu().contiguous() for k, v in state.items() if k not in aliases}
    metadata = {"format": "pt", "class": MODEL_CLASS, "aliases": json.dumps(aliases)}
    save_file(tensors, str(directory / WEIGHTS_NAME), metadata=metadata)
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
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from onemodel.model import OneModel

    directory = Path(directory)
    if not directory.is_dir():
        raise FileNotFoundError(f"model directory {str(directory)!r} does not exist")
    config = load_config(directory)
    weights = directory / WEIGHTS_NAME
    if not weights.is_file():
        raise FileNotFoundError(f"{weights} not found: save_pretrained writes {WEIGHTS_NAME} beside {CONFIG_NAME}")
    try:
        loaded = load_file(str(weights), device=str(map_location))
    except SafetensorError as err:
        raise ValueError(f"{weights} is not a readable safetensors file: {err}") from err

    model = OneModel(config)
    expected = model.state_dict()
    aliases = _shared_aliases(expected)
    wanted = [k for k in expected if k not in aliases]
    missing = [k for k in wanted if k not in loaded]
    unexpected = [k for k in loaded if k not in expected or k in aliases]
    if missing or unexpected:
        raise ValueError(
            f"{weights} does not match the config in {CONFIG_NAME}: missing tensors {missing[:10]}, "
            f"unexpected tensors {unexpected[:10]}"
        )
    for name in wanted:
        if tuple(loaded[name].shape) != tuple(expected[name].shape):
            raise ValueError(
                f"{weights}: tensor {name!r} has shape {tuple(loaded[name].shape)} but the config in {CONFIG_NAME} "
                f"builds {tuple(expected[name].shape)}"
            )
    state = {k: loaded[k] for k in wanted}
    state.update({alias: loaded[canon] for alias, canon in aliases.items()})
    model.load_state_dict(state, strict=True)
    model.to(map_location)
    model.eval()
    return model
