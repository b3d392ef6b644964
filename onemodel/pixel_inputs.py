"""Pixel-patch inputs (DESIGN.md §8): an image cut into the patches of its token grid, as the encoder reads it.

A modality configured ``input_embeddings: {rgb: pixels}`` enters the encoder as normalised pixel patches through a
linear patch embedding (4M's ``rgb@224`` input), while its VQ tokens stay the decoder's target. The patches are cut
on the token grid, so patch ``r * grid_size + c`` covers the same pixels as token ``(r, c)``: masking picks grid
positions as it does for tokens, and the model takes the patch rows at the chosen positions.

``patchify(image, grid_size)``: ``uint8 (H, W, C)`` (H = W = grid_size * P) -> ``float32 (grid_size**2, P * P * C)``,
pixels mapped to [-1, 1], each row the patch's pixels in (row, column, channel) order.
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch

__all__ = ["patchify", "unpatchify", "patch_dim", "decode_png_patches", "pixels_key", "attach_pixels"]


def pixels_key(name: str) -> str:
    """Key of a modality's pixels in a token sample (``__`` keys are not modalities: masking skips them)."""
    return f"__pixels_{name}"


def patch_dim(image_size: int, grid_size: int, channels: int = 3) -> int:
    """Width of one patch row: ``(image_size / grid_size)**2 * channels``; the grid must divide the image."""
    if grid_size < 1 or image_size < grid_size or image_size % grid_size:
        raise ValueError(f"an image of side {image_size} cannot be cut into a {grid_size}x{grid_size} patch grid; "
                         "the grid size must divide the image size")
    p = image_size // grid_size
    return p * p * channels


def patchify(image: Any, grid_size: int) -> torch.Tensor:
    """``uint8 (H, W, C)`` image (numpy or tensor, H = W) -> ``float32 (grid_size**2, P*P*C)`` patches in [-1, 1]."""
    arr = image.numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 2:
        arr = arr[..., None]
    if arr.ndim != 3 or arr.shape[0] != arr.shape[1]:
        raise ValueError(f"patchify needs a square (H, W, C) image, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        raise TypeError(f"patchify needs uint8 pixels, got {arr.dtype}")
    side, channels = arr.shape[0], arr.shape[2]
    patch_dim(side, grid_size, channels)  # checks that the grid divides the image
    p = side // grid_size
    x = arr.reshape(grid_size, p, grid_size, p, channels).transpose(0, 2, 1, 3, 4)  # (g, g, P, P, C)
    x = x.reshape(grid_size * grid_size, p * p * channels).astype(np.float32)
    return torch.from_numpy(x / 127.5 - 1.0)


def unpatchify(patches: torch.Tensor, grid_size: int, channels: int = 3) -> np.ndarray:
    """Inverse of :func:`patchify` -> ``uint8 (H, W, C)`` (for checks and pictures)."""
    n, dim = patches.shape
    p = int(round((dim / channels) ** 0.5))
    if n != grid_size * grid_size or p * p * channels != dim:
        raise ValueError(f"patches of shape {tuple(patches.shape)} do not form a {grid_size}x{grid_size} grid")
    x = ((patches.float().numpy() + 1.0) * 127.5).round().clip(0, 255).astype(np.uint8)
    x = x.reshape(grid_size, grid_size, p, p, channels).transpose(0, 2, 1, 3, 4)
    return x.reshape(grid_size * p, grid_size * p, channels)


def decode_png_patches(data: bytes, grid_size: int) -> torch.Tensor:
    """PNG bytes of an rgb image (as token shards store it) -> its patches (``patchify``)."""
    from PIL import Image

    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(img.convert("RGB"))
    return patchify(arr, grid_size)


def attach_pixels(sample, tokens: dict[str, Any], pixel_grids: dict[str, int], modalities) -> Any:
    """Give a masked sample the pixel patches of its pixel-embedded input modalities.

    sample: a ``MaskedSample``; tokens: its token sample, holding ``pixels_key(name)`` (PNG bytes as token shards
    store them, or a uint8 (H, W, C) array); pixel_grids: pixel-embedded modality -> grid size. A modality gets
    pixels when it is an input of the sample and not also a target: a sample that predicts some of an image's
    tokens from others sees the known ones as tokens, as MaskGIT generation does.
    """
    if not pixel_grids:
        return sample
    names = [m.name for m in modalities]
    values = dict(sample.values)
    for name, grid in pixel_grids.items():
        m = names.index(name)
        if not bool((sample.enc_mod == m).any()) or bool((sample.dec_mod == m).any()):
            continue
        data = tokens.get(pixels_key(name))
        if data is None:
            raise ValueError(f"the model reads {name!r} as pixels (model.input_embeddings.{name}: pixels) but this token "
                             "sample has no pixels; token shards written before pixel inputs existed lack them: re-run "
                             "`onemodel tokenize` (or the fit/demo tokenize stage)")
        values[name] = decode_png_patches(data, grid) if isinstance(data, bytes) else patchify(data, grid)
    sample.values = values
    return sample
