"""Turn what a user passes to :class:`onemodel.pipeline.OneModelPipeline` into raw-sample arrays
(docs/internals.md §1), and back.

Accepted images (``rgb``):

- ``PIL.Image``: mode ``RGB``; other 8-bit modes (``L``, ``LA``, ``P``, ``PA``, ``RGBA``, ``RGBX``, ``CMYK``,
  ``YCbCr``, ``1``) are converted to RGB (alpha is dropped, not composited); 16/32-bit modes (``I``, ``I;16``,
  ``F``) are rejected (``ValueError``): convert them to 8-bit RGB yourself.
- ``numpy`` array ``(H, W, 3)`` ``uint8`` (0..255) or float (0..1; values outside raise ``ValueError``);
  ``(H, W)`` / ``(H, W, 1)`` grey is repeated to 3 channels, ``(H, W, 4)`` drops alpha.
- ``torch`` tensor ``(C, H, W)`` (PyTorch layout, preferred when ambiguous) or ``(H, W, C)``, ``C`` in 1, 3, 4,
  ``uint8`` or float in 0..1, same rules as numpy.
- a file path (``str`` / ``pathlib.Path``) to anything PIL opens.

Depth inputs: float metres ``(H, W)`` (numpy / tensor, or a ``.npy`` path), finite and >= 0.
Segmentation inputs: integer class ids ``(H, W)`` (numpy / tensor, or a ``.png`` / ``.npy`` path).

Images of another size than the tokenizer's are resized to ``image_size x image_size`` (rgb: bicubic with
antialiasing; depth: bilinear; semseg: nearest). Non-square images are stretched: crop them first to keep the
aspect ratio. Dense outputs (depth, semseg) are resized back to the size of the input image.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

__all__ = [
    "to_rgb_array",
    "to_depth_array",
    "to_semseg_array",
    "resize_rgb",
    "resize_depth",
    "resize_semseg",
    "is_image_like",
    "colorize_depth",
    "palette_image",
    "draw_boxes",
    "describe",
]

_CONVERTIBLE_MODES = {"1", "L", "LA", "La", "P", "PA", "RGB", "RGBA", "RGBa", "RGBX", "CMYK", "YCbCr", "LAB", "HSV"}


def describe(x: Any) -> str:
    """A short description of a value for error messages: type and shape, never the data itself."""
    shape = getattr(x, "shape", None)
    if shape is not None and hasattr(x, "dtype"):
        return f"{type(x).__module__.split('.')[0]}.{type(x).__name__} of shape {tuple(shape)} ({x.dtype})"
    if isinstance(x, Image.Image):
        return f"PIL image {x.size[0]}x{x.size[1]} mode {x.mode}"
    if isinstance(x, (list, tuple)):
        return f"{type(x).__name__} of {len(x)} item(s)"
    if isinstance(x, str):
        return repr(x) if len(x) <= 40 else repr(x[:37] + "...")
    return type(x).__name__


def is_image_like(x: Any) -> bool:
    """True for one image in any accepted form (used to tell one image from a list of images)."""
    import torch

    return isinstance(x, (Image.Image, np.ndarray, torch.Tensor, str, Path))


def _open_path(path: str | Path) -> Image.Image:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"image file {str(path)!r} does not exist")
    if path.is_dir():
        raise ValueError(f"{str(path)!r} is a directory; pass an image file (or a list of files)")
    try:
        img = Image.open(path)
        img.load()
    except Exception as err:  # PIL raises UnidentifiedImageError / OSError / ...
        raise ValueError(f"could not read {str(path)!r} as an image ({err}); pass a PNG/JPEG file or an array") from err
    return img


def _pil_to_rgb(img: Image.Image, what: str) -> np.ndarray:
    if img.mode not in _CONVERTIBLE_MODES:
        raise ValueError(
            f"{what}: PIL image mode {img.mode!r} (16/32-bit or float) cannot be converted to RGB safely; "
            "scale it to 8 bits and convert it yourself, e.g. Image.fromarray(uint8_array).convert('RGB')"
        )
    if img.mode != "RGB":
        img = img.convert("RGB")
    return np.asarray(img, dtype=np.uint8).copy()


def _tensor_to_numpy_hwc(t: Any, what: str) -> np.ndarray:
    t = t.detach().cpu()
    if t.dim() == 3:
        first, last = t.shape[0] in (1, 3, 4), t.shape[-1] in (1, 3, 4)
        if first:  # (C, H, W) preferred
            t = t.permute(1, 2, 0)
        elif not last:
            raise ValueError(
                f"{what}: tensor of shape {tuple(t.shape)} is neither (C, H, W) nor (H, W, C) with C in 1, 3, 4"
            )
    elif t.dim() != 2:
        raise ValueError(f"{what}: expected a (C, H, W) or (H, W, C) tensor, got shape {tuple(t.shape)}")
    if t.dtype.is_floating_point and t.dtype != __import__("torch").float32:
        t = t.float()
    return t.numpy()


def to_rgb_array(x: Any, what: str = "image") -> np.ndarray:
    """Any accepted image -> ``uint8 (H, W, 3)``; errors say what to pass instead."""
    import torch

    if isinstance(x, (str, Path)):
        return _check_size(_pil_to_rgb(_open_path(x), f"{what} {str(x)!r}"), what)
    if isinstance(x, Image.Image):
        return _check_size(_pil_to_rgb(x, what), what)
    if isinstance(x, torch.Tensor):
        x = _tensor_to_numpy_hwc(x, what)
    if not isinstance(x, np.ndarray):
        raise TypeError(
            f"{what}: expected a PIL image, a numpy array, a torch tensor or a file path, got {type(x).__name__}"
        )
    arr = x
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[-1] not in (1, 3, 4):
        raise ValueError(
            f"{what}: expected an (H, W, 3) array (or (H, W), (H, W, 1), (H, W, 4)), got shape {arr.shape}"
        )
    _check_size(arr, what)
    if arr.dtype == np.uint8:
        out = arr
    elif np.issubdtype(arr.dtype, np.floating):
        if not np.isfinite(arr).all():
            raise ValueError(f"{what}: float image contains NaN or inf; replace them (e.g. np.nan_to_num(x)) or "
                             "pass uint8 0..255")
        lo, hi = float(arr.min()), float(arr.max())
        if lo < 0.0 or hi > 1.0:
            raise ValueError(
                f"{what}: float images must hold values in [0, 1] (got {lo:.3g}..{hi:.3g}); "
                "pass uint8 0..255 or divide by 255"
            )
        out = np.clip(np.rint(arr * 255.0), 0, 255).astype(np.uint8)
    else:
        raise TypeError(f"{what}: array dtype {arr.dtype} is not supported; pass uint8 (0..255) or float (0..1)")
    if out.shape[-1] == 1:
        out = np.repeat(out, 3, axis=-1)
    elif out.shape[-1] == 4:
        out = out[..., :3]
    return np.ascontiguousarray(out)


def _check_size(arr: np.ndarray, what: str) -> np.ndarray:
    if arr.shape[0] < 1 or arr.shape[1] < 1:
        raise ValueError(f"{what}: image of size {arr.shape[1]}x{arr.shape[0]} is empty; pass an image with pixels")
    return arr


def _to_2d_array(x: Any, what: str) -> np.ndarray:
    import torch

    if isinstance(x, (str, Path)):
        path = Path(x)
        if not path.exists():
            raise FileNotFoundError(f"{what} file {str(path)!r} does not exist")
        if path.suffix == ".npy":
            try:
                x = np.load(path, allow_pickle=False)
            except ValueError as err:
                raise ValueError(f"{what}: could not read {str(path)!r} as a numpy array ({err})") from err
        else:
            x = np.asarray(_open_path(path))
    if isinstance(x, Image.Image):
        x = np.asarray(x)
    if isinstance(x, torch.Tensor):
        x = x.detach().cpu().numpy()
    if not isinstance(x, np.ndarray):
        raise TypeError(f"{what}: expected a numpy array, a torch tensor or a file path, got {type(x).__name__}")
    if x.ndim == 3 and 1 in (x.shape[0], x.shape[-1]):
        x = x.reshape(x.shape[1:] if x.shape[0] == 1 else x.shape[:-1])
    if x.ndim != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"{what}: expected a non-empty (H, W) map, got shape {x.shape}")
    return x


def to_depth_array(x: Any, what: str = "depth") -> np.ndarray:
    """Depth in metres -> ``float32 (H, W)``, finite and >= 0."""
    arr = _to_2d_array(x, what)
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise TypeError(f"{what}: expected float metres, got dtype {arr.dtype}")
    arr = arr.astype(np.float32)
    if not np.isfinite(arr).all() or (arr < 0).any():
        raise ValueError(f"{what}: depth must be finite metres >= 0 (it holds NaN, inf or negative values); replace "
                         "invalid pixels, e.g. np.nan_to_num(depth, nan=0, posinf=0).clip(0)")
    return arr


def to_semseg_array(x: Any, num_classes: int | None, what: str = "semseg") -> np.ndarray:
    """Class ids -> ``int64 (H, W)`` in ``[0, num_classes)``."""
    arr = _to_2d_array(x, what)
    if not np.issubdtype(arr.dtype, np.integer):
        raise TypeError(f"{what}: expected integer class ids, got dtype {arr.dtype}")
    arr = arr.astype(np.int64)
    if (arr < 0).any() or (num_classes is not None and (arr >= num_classes).any()):
        raise ValueError(f"{what}: class ids must be in [0, {num_classes}), got {arr.min()}..{arr.max()}")
    return arr


def resize_rgb(arr: np.ndarray, size: int) -> np.ndarray:
    if arr.shape[0] == size and arr.shape[1] == size:
        return arr
    return np.array(Image.fromarray(arr).resize((size, size), Image.BICUBIC, reducing_gap=None))


def resize_depth(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    if arr.shape == (height, width):
        return arr.astype(np.float32)
    out = Image.fromarray(arr.astype(np.float32)).resize((width, height), Image.BILINEAR)  # mode F
    return np.asarray(out, dtype=np.float32).copy()


def resize_semseg(arr: np.ndarray, height: int, width: int) -> np.ndarray:
    if arr.shape == (height, width):
        return arr
    out = Image.fromarray(arr.astype(np.int32)).resize((width, height), Image.NEAREST)  # mode I
    return np.array(out).astype(arr.dtype)


# ------------------------------------------------------------------------------------------- visualisation


def colorize_depth(depth: np.ndarray) -> Image.Image:
    """Depth metres (H, W) -> a PIL image (near = bright yellow, far = dark purple), per-image min/max scaled."""
    d = depth.astype(np.float64)
    lo, hi = float(d.min()), float(d.max())
    t = (d - lo) / (hi - lo) if hi > lo else np.zeros_like(d)
    t = 1.0 - t  # near = 1
    # a small perceptual ramp (dark purple -> teal -> yellow), interpolated piecewise-linearly
    stops = np.array([[48, 18, 59], [33, 145, 140], [253, 231, 37]], dtype=np.float64)
    x = t * (len(stops) - 1)
    i = np.clip(np.floor(x).astype(int), 0, len(stops) - 2)
    f = (x - i)[..., None]
    rgb = stops[i] * (1 - f) + stops[i + 1] * f
    return Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8))


def palette_image(classes: np.ndarray) -> Image.Image:
    """Class ids (H, W) -> a palette PNG image (class 0 black; fixed distinct colours per class)."""
    rng = np.random.default_rng(0)
    palette = rng.integers(40, 256, size=(256, 3), dtype=np.uint8)
    palette[0] = 0
    img = Image.fromarray((classes.astype(np.int64) % 256).astype(np.uint8))  # mode L; putpalette makes it P
    img.putpalette(palette.flatten().tolist())
    return img


def draw_boxes(image: Image.Image, detections: list[dict]) -> Image.Image:
    """Draw ``[{"box": [x0, y0, x1, y1], "label": str, "score": float}]`` on a copy of ``image``."""
    from PIL import ImageDraw

    out = image.convert("RGB").copy()
    draw = ImageDraw.Draw(out)
    for det in detections:
        x0, y0, x1, y1 = det["box"]
        draw.rectangle([x0, y0, max(x0, x1 - 1), max(y0, y1 - 1)], outline=(255, 0, 0))
        draw.text((x0 + 1, y0 + 1), f"{det['label']} {det.get('score', 0):.2f}", fill=(255, 255, 0))
    return out
