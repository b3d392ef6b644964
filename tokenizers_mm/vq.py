"""Image-like VQ tokenizers (rgb, depth, semseg): a small convolutional autoencoder around a quantizer from
``vector_quantize_pytorch`` (``VectorQuantize`` with EMA codebook / k-means init / dead-code replacement /
optional cosine codes, or ``FSQ``).

User units (raw-sample units of docs/internals.md §1), in and out:

- ``rgb``: ``uint8`` ``(H, W, 3)`` or ``(B, H, W, 3)``, channels last. Floats are refused (``TypeError``): the
  tokenizer cannot tell 0..1 from 0..255. Scaled to ``[-1, 1]`` inside.
- ``depth``: float metres ``(H, W)`` or ``(B, H, W)``; must be finite and >= 0. Normalisation: metres are clamped
  to ``[depth_min, depth_max]`` (config), then ``log`` depth is mapped linearly to ``[-1, 1]``
  (``-1`` = ``depth_min``, ``+1`` = ``depth_max``). Log depth gives equal relative precision near and far,
  which is what AbsRel and δ1 measure. ``decode`` inverts this and returns float32 metres.
- ``semseg``: integer class ids ``(H, W)`` or ``(B, H, W)`` in ``[0, num_classes)``; one-hot in, class logits out
  (cross-entropy); ``decode`` returns the argmax ids (``uint8`` when ``num_classes <= 256``, else ``int64``).

Images of another size raise ``ValueError`` unless ``encode(..., resize=True)`` is passed, which resizes to
``image_size`` (bilinear + antialias for rgb, bilinear on normalised log-depth for depth, nearest for semseg)
and logs a warning; ``decode`` always returns ``image_size x image_size``.
"""

from __future__ import annotations

import dataclasses
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from tokenizers_mm.base import CONFIG_NAME, ModalityTokenizer, read_tokenizer_config

logger = logging.getLogger(__name__)

__all__ = ["VQTokenizerConfig", "VQTokenizer", "WEIGHTS_NAME"]

WEIGHTS_NAME = "model.safetensors"
_ENCODE_CHUNK = 64  # images per conv forward pass inside encode/decode (bounds memory on big batches)
# tokens per nearest-code search at inference: vector_quantize builds (tokens x codebook) distance tensors whose
# memory traffic dominates on CPU beyond a few thousand tokens (measured: 4x faster at 2048 than at 65536)
_QUANT_CHUNK_TOKENS = 2048


@dataclass
class VQTokenizerConfig:
    """Configuration of a :class:`VQTokenizer` (saved as ``config.json`` beside the weights).

    modality: "rgb" (3 channels), "depth" (1 channel, metres) or "semseg" (``num_classes`` one-hot channels).
    image_size: side of the square input images (pixels).
    base_channels / channel_mult: conv widths; level ``i`` has ``base_channels * channel_mult[i]`` channels and
        every level after the first halves the resolution, so ``grid_size = image_size / 2**(len(channel_mult)-1)``
        (``[1, 2, 2]``: 64 -> 16x16 tokens; ``[1, 2, 2, 4]``: 64 -> 8x8 tokens).
    num_res_blocks: residual blocks per downsampled level (encoder and decoder).
    encoder: "conv" (strided 3x3 convs: each token sees its neighbours too) or "patch" (each token is computed
        from its own ``downsample_factor`` x ``downsample_factor`` patch only, by a per-patch MLP). With "patch"
        a patch always gets the same code whatever surrounds it: for a flat background patch, one code instead
        of hundreds. That makes the tokens far easier for the multimodal model to read and predict (measured
        on shapes: docs/tokenizers.md); the decoder still sees the whole grid.
    norm_groups: GroupNorm groups in the residual blocks (0 = none; measured: GroupNorm reaches a given PSNR in
        about half the steps).
    upsample: decoder upsampling, "transpose" (4x4 stride-2 transposed conv) or "nearest" (+ 3x3 conv).
    latent_dim: channels of the encoder output / decoder input (the quantizer's ``dim``).
    quantizer: "vq" (``VectorQuantize``) or "fsq" (``FSQ``; its codebook size is ``prod(fsq_levels)``).
    codebook_size, codebook_dim, ema_decay, kmeans_init, threshold_ema_dead_code, use_cosine_sim,
        commitment_weight: ``VectorQuantize`` options (``codebook_dim`` < ``latent_dim`` = factorised low-dim codes).
    fsq_levels: ``FSQ`` levels.
    num_classes: semseg only: number of class ids.
    depth_min, depth_max: depth only: metres mapped to -1 / +1 in log space (values outside are clamped).
    recon_loss: "l1" or "mse" for rgb / depth (semseg always uses cross-entropy).
    diffusion: optional diffusion decoder (rgb only), a :class:`tokenizers_mm.diffusion.DiffusionDecoderConfig`
        as a dict; ``None`` = conv decoder only.
    """

    modality: Literal["rgb", "depth", "semseg"] = "rgb"
    image_size: int = 64
    base_channels: int = 16
    channel_mult: list[int] = field(default_factory=lambda: [1, 2, 2])
    num_res_blocks: int = 1
    encoder: Literal["conv", "patch"] = "conv"
    norm_groups: int = 8
    upsample: Literal["transpose", "nearest"] = "transpose"  # decoder upsampling: 4x4 transposed conv or nearest+3x3
    latent_dim: int = 32
    quantizer: Literal["vq", "fsq"] = "vq"
    codebook_size: int = 1024
    codebook_dim: int = 16
    ema_decay: float = 0.9
    kmeans_init: bool = True
    threshold_ema_dead_code: int = 2
    use_cosine_sim: bool = False
    commitment_weight: float = 0.25
    fsq_levels: list[int] = field(default_factory=lambda: [8, 5, 5, 5])
    num_classes: int = 0
    depth_min: float = 0.1
    depth_max: float = 100.0
    recon_loss: Literal["l1", "mse"] = "mse"
    diffusion: dict[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.modality not in ("rgb", "depth", "semseg"):
            raise ValueError(f"modality must be 'rgb', 'depth' or 'semseg', got {self.modality!r}")
        if self.quantizer not in ("vq", "fsq"):
            raise ValueError(f"quantizer must be 'vq' or 'fsq', got {self.quantizer!r}")
        if self.encoder not in ("conv", "patch"):
            raise ValueError(f"encoder must be 'conv' or 'patch', got {self.encoder!r}")
        if self.upsample not in ("transpose", "nearest"):
            raise ValueError(f"upsample must be 'transpose' or 'nearest', got {self.upsample!r}")
        if self.recon_loss not in ("l1", "mse"):
            raise ValueError(f"recon_loss must be 'l1' or 'mse', got {self.recon_loss!r}")
        self.channel_mult = [int(m) for m in self.channel_mult]
        self.fsq_levels = [int(v) for v in self.fsq_levels]
        if not self.channel_mult or any(m < 1 for m in self.channel_mult):
            raise ValueError(f"channel_mult must be a non-empty list of positive ints, got {self.channel_mult}")
        factor = 2 ** (len(self.channel_mult) - 1)
        if self.image_size < 1 or self.image_size % factor:
            raise ValueError(
                f"image_size {self.image_size} must be divisible by the downsampling factor {factor} "
                f"(2 ** (len(channel_mult) - 1) with channel_mult={self.channel_mult})"
            )
        for name in ("base_channels", "latent_dim", "codebook_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_res_blocks < 0 or self.norm_groups < 0 or self.threshold_ema_dead_code < 0:
            raise ValueError("num_res_blocks, norm_groups and threshold_ema_dead_code must be >= 0")
        if self.norm_groups and any((self.base_channels * m) % self.norm_groups for m in self.channel_mult):
            raise ValueError(f"norm_groups={self.norm_groups} must divide every level width base_channels * channel_mult[i]")
        if self.quantizer == "vq" and self.codebook_size < 2:
            raise ValueError(f"codebook_size must be >= 2, got {self.codebook_size}")
        if self.quantizer == "fsq" and (not self.fsq_levels or any(v < 3 for v in self.fsq_levels)):
            raise ValueError(f"fsq_levels must be a non-empty list of ints >= 3, got {self.fsq_levels}")
        if not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in (0, 1), got {self.ema_decay}")
        if self.modality == "semseg" and self.num_classes < 2:
            raise ValueError("a semseg tokenizer needs num_classes >= 2 (the number of class ids, background included)")
        if self.modality == "depth" and not 0.0 < self.depth_min < self.depth_max:
            raise ValueError(f"need 0 < depth_min < depth_max, got {self.depth_min}, {self.depth_max}")
        if self.diffusion is not None and self.modality != "rgb":
            raise ValueError("the diffusion decoder is only available for the rgb tokenizer")

    @property
    def in_channels(self) -> int:
        return {"rgb": 3, "depth": 1, "semseg": self.num_classes}[self.modality]

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)

    @property
    def grid_size(self) -> int:
        return self.image_size // self.downsample_factor

    @property
    def vocab_size(self) -> int:
        return math.prod(self.fsq_levels) if self.quantizer == "fsq" else self.codebook_size

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VQTokenizerConfig":
        """Strict: unknown keys raise ``ValueError`` listing the valid ones."""
        if not isinstance(data, dict):
            raise TypeError(f"VQTokenizerConfig.from_dict expects a dict, got {type(data).__name__}")
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown VQTokenizerConfig key(s) {unknown}; valid keys: {sorted(valid)}")
        return cls(**data)


# ----------------------------------------------------------------------------------------------------------------
# network


class ResBlock(nn.Module):
    """x + conv(act(norm(conv(act(norm(x))))))   (B, C, h, w) -> (B, C, h, w)."""

    def __init__(self, channels: int, norm_groups: int):
        super().__init__()

        def norm() -> nn.Module:
            return nn.GroupNorm(norm_groups, channels) if norm_groups else nn.Identity()

        self.block = nn.Sequential(
            norm(), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
            norm(), nn.SiLU(), nn.Conv2d(channels, channels, 3, padding=1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.block(x)


def _widths(config: VQTokenizerConfig) -> list[int]:
    return [config.base_channels * m for m in config.channel_mult]


class Encoder(nn.Module):
    """(B, C_in, S, S) -> (B, latent_dim, S/f, S/f); stride-2 convs between levels, residual blocks after each."""

    def __init__(self, config: VQTokenizerConfig):
        super().__init__()
        ch = _widths(config)
        layers: list[nn.Module] = [nn.Conv2d(config.in_channels, ch[0], 3, padding=1)]
        for i in range(1, len(ch)):
            layers += [nn.SiLU(), nn.Conv2d(ch[i - 1], ch[i], 4, stride=2, padding=1)]
            layers += [ResBlock(ch[i], config.norm_groups) for _ in range(config.num_res_blocks)]
        layers += [nn.SiLU(), nn.Conv2d(ch[-1], config.latent_dim, 1)]
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class PatchEncoder(nn.Module):
    """(B, C_in, S, S) -> (B, latent_dim, S/f, S/f) where each output cell depends on its own f x f input patch
    only: a stride-f f x f conv (a linear map of the flattened patch), then a per-cell residual MLP."""

    def __init__(self, config: VQTokenizerConfig):
        super().__init__()
        width = _widths(config)[-1]
        f = config.downsample_factor
        self.patch = nn.Conv2d(config.in_channels, width, f, stride=f)
        self.blocks = nn.ModuleList(
            nn.Sequential(nn.SiLU(), nn.Conv2d(width, 2 * width, 1), nn.SiLU(), nn.Conv2d(2 * width, width, 1))
            for _ in range(max(1, config.num_res_blocks))
        )
        self.out = nn.Sequential(nn.SiLU(), nn.Conv2d(width, config.latent_dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.patch(x)
        for block in self.blocks:
            h = h + block(h)
        return self.out(h)


class Decoder(nn.Module):
    """(B, latent_dim, h, w) -> (B, C_out, h*f, w*f); mirror of :class:`Encoder` with transposed convs."""

    def __init__(self, config: VQTokenizerConfig):
        super().__init__()
        ch = _widths(config)
        layers: list[nn.Module] = [nn.Conv2d(config.latent_dim, ch[-1], 3, padding=1)]
        layers += [ResBlock(ch[-1], config.norm_groups) for _ in range(config.num_res_blocks)]
        for i in range(len(ch) - 1, 0, -1):
            if config.upsample == "nearest":
                layers += [nn.Upsample(scale_factor=2, mode="nearest"), nn.Conv2d(ch[i], ch[i - 1], 3, padding=1)]
            else:
                layers += [nn.SiLU(), nn.ConvTranspose2d(ch[i], ch[i - 1], 4, stride=2, padding=1)]
            if i - 1 > 0:
                layers += [ResBlock(ch[i - 1], config.norm_groups) for _ in range(config.num_res_blocks)]
        layers += [nn.SiLU(), nn.Conv2d(ch[0], config.in_channels, 3, padding=1)]
        self.net = nn.Sequential(*layers)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.net(z)


def _build_quantizer(config: VQTokenizerConfig) -> nn.Module:
    if config.quantizer == "fsq":
        from vector_quantize_pytorch import FSQ

        return FSQ(levels=list(config.fsq_levels), dim=config.latent_dim)
    from vector_quantize_pytorch import VectorQuantize

    return VectorQuantize(
        dim=config.latent_dim,
        codebook_size=config.codebook_size,
        codebook_dim=config.codebook_dim,
        decay=config.ema_decay,
        kmeans_init=config.kmeans_init,
        threshold_ema_dead_code=config.threshold_ema_dead_code,
        use_cosine_sim=config.use_cosine_sim,
        commitment_weight=config.commitment_weight,
    )


# ----------------------------------------------------------------------------------------------------------------
# the tokenizer


class VQTokenizer(nn.Module, ModalityTokenizer):
    """Convolutional VQ autoencoder tokenizer for one image-like modality.

    ``encode(x) -> LongTensor (B, grid_size**2)`` (row-major grid), ``decode(ids) -> numpy`` in user units,
    ``forward(x) -> dict`` for training on normalised tensors from :meth:`preprocess`.
    """

    def __init__(self, config: VQTokenizerConfig):
        super().__init__()
        if not isinstance(config, VQTokenizerConfig):
            raise TypeError(f"VQTokenizer needs a VQTokenizerConfig, got {type(config).__name__}")
        self.config = config
        self.encoder = PatchEncoder(config) if config.encoder == "patch" else Encoder(config)
        self.quantizer = _build_quantizer(config)
        self.decoder = Decoder(config)
        self.diffusion_decoder = None
        if config.diffusion is not None:
            from tokenizers_mm.diffusion import DiffusionDecoder, DiffusionDecoderConfig

            self.diffusion_decoder = DiffusionDecoder(
                DiffusionDecoderConfig.from_dict(config.diffusion), latent_dim=config.latent_dim,
                image_size=config.image_size,
            )

    # -- properties ------------------------------------------------------------------------------------------
    @property
    def modality(self) -> str:
        return self.config.modality

    @property
    def vocab_size(self) -> int:
        return self.config.vocab_size

    @property
    def grid_size(self) -> int:
        return self.config.grid_size

    @property
    def tokens_per_image(self) -> int:
        return self.config.grid_size ** 2

    @property
    def image_size(self) -> int:
        return self.config.image_size

    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    # -- user units <-> normalised tensors -----------------------------------------------------------------
    def _as_array(self, x: Any) -> np.ndarray | torch.Tensor:
        if isinstance(x, (str, Path)):
            raise TypeError(
                f"{self.modality} tokenizer got a path {str(x)!r}; load the file first "
                "(e.g. np.asarray(PIL.Image.open(path).convert('RGB')) for rgb, np.load(path) for depth)"
            )
        if hasattr(x, "convert") and hasattr(x, "size") and not isinstance(x, (np.ndarray, torch.Tensor)):
            x = np.asarray(x.convert("RGB") if self.modality == "rgb" else x)  # PIL image
        if isinstance(x, (list, tuple)):
            if not x:
                raise ValueError(f"empty batch: pass at least one {self.modality} image")
            items = [self._as_array(v) for v in x]
            if all(isinstance(v, torch.Tensor) for v in items):
                shapes = {tuple(v.shape) for v in items}
                if len(shapes) > 1:
                    raise ValueError(f"images in a list must share one shape, got {sorted(shapes)}")
                return torch.stack(items)
            items = [v.numpy() if isinstance(v, torch.Tensor) else v for v in items]
            shapes = {v.shape for v in items}
            if len(shapes) > 1:
                raise ValueError(f"images in a list must share one shape, got {sorted(shapes)}")
            return np.stack(items)
        if not isinstance(x, (np.ndarray, torch.Tensor)):
            raise TypeError(f"{self.modality} tokenizer expects a numpy array or torch tensor, got {type(x).__name__}")
        return x

    def preprocess(self, x: Any, resize: bool = False) -> torch.Tensor:
        """User units (one image or a batch) -> normalised float tensor ``(B, C_in, S, S)`` on the tokenizer device.

        rgb -> [-1, 1]; depth -> normalised log-depth in [-1, 1]; semseg -> one-hot. Raises ``TypeError`` /
        ``ValueError`` explaining what is wrong with the input.
        """
        arr = self._as_array(x)
        mod, size = self.modality, self.image_size
        is_tensor = isinstance(arr, torch.Tensor)
        dtype = arr.dtype
        if mod == "rgb":
            if arr.ndim == 3:
                arr = arr[None]
            if arr.ndim != 4 or arr.shape[-1] != 3:
                hint = " (it looks channels-first: permute to (..., H, W, 3))" if arr.ndim == 4 and arr.shape[1] == 3 else ""
                raise ValueError(f"rgb expects (H, W, 3) or (B, H, W, 3) uint8, got shape {tuple(arr.shape)}{hint}")
            if dtype not in (np.uint8, torch.uint8):
                raise TypeError(
                    f"rgb expects uint8 pixels 0..255, got {dtype}; convert floats in [0, 1] with "
                    "(x * 255).round().clip(0, 255).astype(np.uint8)"
                )
        elif mod == "depth":
            if arr.ndim == 4 and arr.shape[-1] == 1:
                arr = arr[..., 0]
            if arr.ndim == 2:
                arr = arr[None]
            if arr.ndim != 3:
                raise ValueError(f"depth expects float metres (H, W) or (B, H, W), got shape {tuple(arr.shape)}")
            floating = torch.is_floating_point(arr) if is_tensor else np.issubdtype(dtype, np.floating)
            if not floating:
                raise TypeError(f"depth expects float metres, got dtype {dtype}; convert with .astype(np.float32)")
        else:
            if arr.ndim == 4 and arr.shape[-1] == 1:
                arr = arr[..., 0]
            if arr.ndim == 2:
                arr = arr[None]
            if arr.ndim != 3:
                raise ValueError(f"semseg expects integer class ids (H, W) or (B, H, W), got shape {tuple(arr.shape)}")
            integer = (not torch.is_floating_point(arr) and dtype != torch.bool) if is_tensor else np.issubdtype(dtype, np.integer)
            if not integer:
                raise TypeError(f"semseg expects integer class ids, got dtype {dtype}; convert with .astype(np.int64)")
        if arr.shape[0] == 0:
            raise ValueError(f"empty batch: pass at least one {mod} image")
        if not is_tensor:  # a read-only array (e.g. decoded from a shard) is copied: torch warns on those
            arr = np.ascontiguousarray(arr) if arr.flags.writeable else np.array(arr)
        t = arr if is_tensor else torch.from_numpy(arr)
        t = t.to(self.device)

        if mod == "rgb":
            t = t.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # (B, 3, H, W) in [-1, 1]
        elif mod == "depth":
            t = t.float()
            if not torch.isfinite(t).all():
                raise ValueError("depth contains NaN or inf; replace invalid pixels with a valid depth in metres first")
            if (t < 0).any():
                raise ValueError(f"depth must be >= 0 metres, got a minimum of {t.min().item():.4g}")
            t = self.normalize_depth(t)[:, None]  # (B, 1, H, W)
        else:
            t = t.long()
            lo, hi = int(t.min()), int(t.max())
            if lo < 0 or hi >= self.config.num_classes:
                raise ValueError(
                    f"semseg class ids must be in [0, {self.config.num_classes}), got values in [{lo}, {hi}]; "
                    "train a tokenizer with a larger num_classes or remap the ids"
                )

        if t.shape[-2:] != (size, size):
            if not resize:
                raise ValueError(
                    f"{mod} tokenizer expects {size}x{size} images, got {tuple(t.shape[-2:])}; "
                    f"resize them first or call encode(..., resize=True)"
                )
            logger.warning("resizing %s input from %s to %dx%d", mod, tuple(t.shape[-2:]), size, size)
            if mod == "semseg":
                t = F.interpolate(t[:, None].float(), size=(size, size), mode="nearest")[:, 0].long()
            else:
                t = F.interpolate(t, size=(size, size), mode="bilinear", antialias=(mod == "rgb"), align_corners=False)
                t = t.clamp(-1.0, 1.0)
        if mod == "semseg":
            t = F.one_hot(t, self.config.num_classes).permute(0, 3, 1, 2).float()  # (B, K, S, S)
        return t.contiguous()

    def normalize_depth(self, metres: torch.Tensor) -> torch.Tensor:
        """Metres -> [-1, 1] (log space between depth_min and depth_max; clamped)."""
        lo, hi = math.log(self.config.depth_min), math.log(self.config.depth_max)
        d = metres.clamp(self.config.depth_min, self.config.depth_max).log()
        return (d - lo) / (hi - lo) * 2.0 - 1.0

    def denormalize_depth(self, x: torch.Tensor) -> torch.Tensor:
        """[-1, 1] -> metres (inverse of :meth:`normalize_depth`)."""
        lo, hi = math.log(self.config.depth_min), math.log(self.config.depth_max)
        return ((x.clamp(-1.0, 1.0) + 1.0) / 2.0 * (hi - lo) + lo).exp()

    def postprocess(self, out: torch.Tensor) -> np.ndarray:
        """Decoder output ``(B, C_out, S, S)`` (normalised / logits) -> numpy batch in user units."""
        out = out.detach().float()
        if self.modality == "rgb":
            img = ((out.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
            return img.permute(0, 2, 3, 1).cpu().numpy()  # (B, S, S, 3)
        if self.modality == "depth":
            return self.denormalize_depth(out[:, 0]).cpu().numpy().astype(np.float32)  # (B, S, S)
        ids = out.argmax(dim=1).cpu().numpy()  # (B, S, S)
        return ids.astype(np.uint8 if self.config.num_classes <= 256 else np.int64)

    # -- quantisation ------------------------------------------------------------------------------------------
    def quantize(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Encoder latents (B, D, h, w) -> (quantized (B, D, h, w), ids (B, h*w), aux loss scalar)."""
        b, d, h, w = z.shape
        seq = z.flatten(2).transpose(1, 2)  # (B, N, D)
        if self.config.quantizer == "fsq":
            q, ids = self.quantizer(seq)
            aux = seq.new_zeros(())
        elif self.training or b * h * w <= _QUANT_CHUNK_TOKENS:
            q, ids, aux = self.quantizer(seq)
        else:  # inference on a big batch: search codes in chunks (no EMA update happens in eval mode)
            parts = [self.quantizer(part) for part in seq.split(max(1, _QUANT_CHUNK_TOKENS // (h * w)))]
            q, ids = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
            aux = seq.new_zeros(())
        q = q.transpose(1, 2).reshape(b, d, h, w)
        return q, ids.reshape(b, h * w).long(), aux.reshape(()) if aux.numel() == 1 else aux.mean()

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, N) -> quantized latents (B, D, h, w) (what the decoder consumes)."""
        b = ids.shape[0]
        g = self.grid_size
        if self.config.quantizer == "fsq":
            q = self.quantizer.indices_to_codes(ids)  # (B, N, D)
        else:
            q = self.quantizer.get_output_from_indices(ids)  # (B, N, D)
        return q.transpose(1, 2).reshape(b, self.config.latent_dim, g, g)

    @torch.no_grad()
    def code_vectors(self) -> torch.Tensor:
        """(vocab_size, latent_dim) float32: the quantized latent of every token id (what ``embed_ids`` places at a
        grid slot), in id order; a model can embed its input tokens through these (codebook-embedded inputs)."""
        ids = torch.arange(self.vocab_size, device=self.device)[None]
        if self.config.quantizer == "fsq":
            q = self.quantizer.indices_to_codes(ids)
        else:
            q = self.quantizer.get_output_from_indices(ids)
        return q[0].float().cpu()

    def _check_ids(self, ids: Any) -> torch.Tensor:
        if isinstance(ids, np.ndarray):
            ids = torch.from_numpy(ids)
        if isinstance(ids, (list, tuple)):
            ids = torch.as_tensor(ids)
        if not isinstance(ids, torch.Tensor):
            raise TypeError(f"decode expects token ids as a tensor or array, got {type(ids).__name__}")
        if torch.is_floating_point(ids) or ids.dtype == torch.bool:
            raise TypeError(f"token ids must be integers, got {ids.dtype}")
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim == 3:
            ids = ids.flatten(1)
        n = self.tokens_per_image
        if ids.ndim != 2 or ids.shape[1] != n:
            raise ValueError(f"expected ids of shape (B, {n}) (grid {self.grid_size}x{self.grid_size}), got {tuple(ids.shape)}")
        if ids.shape[0] == 0:
            raise ValueError("empty batch of token ids")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            raise ValueError(f"token ids must be in [0, {self.vocab_size}), got [{int(ids.min())}, {int(ids.max())}]")
        return ids.long().to(self.device)

    # -- public API --------------------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        """Training pass on a normalised batch from :meth:`preprocess` ``(B, C_in, S, S)``.

        Returns ``recon`` (B, C_in, S, S) (normalised, or logits for semseg), ``ids`` (B, N), ``recon_loss``,
        ``quant_loss`` (commitment; 0 for FSQ) and ``loss`` = their sum.
        """
        z = self.encoder(x)
        q, ids, quant_loss = self.quantize(z)
        recon = self.decoder(q)
        recon_loss = self.reconstruction_loss(recon, x)
        return {"recon": recon, "ids": ids, "recon_loss": recon_loss, "quant_loss": quant_loss,
                "loss": recon_loss + quant_loss}

    def reconstruction_loss(self, recon: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        recon = recon.float()
        if self.modality == "semseg":
            return F.cross_entropy(recon, x.argmax(dim=1))
        if self.config.recon_loss == "l1":
            return F.l1_loss(recon, x)
        return F.mse_loss(recon, x)

    @torch.inference_mode()
    def encode(self, x: Any, resize: bool = False) -> torch.Tensor:
        """One image or a batch in user units -> LongTensor ``(B, grid_size**2)`` of ids in ``[0, vocab_size)``."""
        codebook = getattr(self.quantizer, "_codebook", None)
        if codebook is not None and not bool(codebook.initted):
            raise ValueError(
                "this VQ tokenizer is untrained: its codebook is initialised by k-means on the first training batch. "
                "Train it first (training.tokenizer_training.train_vq_tokenizer) or build it with kmeans_init=False"
            )
        was_training = self.training
        self.eval()
        try:
            t = self.preprocess(x, resize=resize)
            out = [self.quantize(self.encoder(chunk))[1] for chunk in t.split(_ENCODE_CHUNK)]
        finally:
            self.train(was_training)
        return torch.cat(out).cpu()

    @torch.inference_mode()
    def decode_tensor(self, ids: Any) -> torch.Tensor:
        """Token ids ``(B, N)`` -> conv decoder output ``(B, C_in, S, S)`` (normalised / logits)."""
        ids = self._check_ids(ids)
        was_training = self.training
        self.eval()
        try:
            out = [self.decoder(self.embed_ids(chunk)) for chunk in ids.split(_ENCODE_CHUNK)]
        finally:
            self.train(was_training)
        return torch.cat(out)

    def decode(self, ids: Any, use_diffusion: bool = False, num_inference_steps: int = 25,
               seed: int | None = 0) -> np.ndarray:
        """Token ids ``(B, N)`` or ``(N,)`` -> numpy batch in user units (rgb uint8 (B,S,S,3), depth float32
        metres (B,S,S), semseg ids (B,S,S)). ``use_diffusion=True`` decodes rgb with the diffusion decoder."""
        if use_diffusion:
            if self.diffusion_decoder is None:
                raise ValueError("this tokenizer has no diffusion decoder; train one with --diffusion-decoder")
            ids = self._check_ids(ids)
            with torch.inference_mode():
                out = self.diffusion_decoder.sample(self.embed_ids(ids), num_inference_steps=num_inference_steps, seed=seed)
            return self.postprocess(out)
        return self.postprocess(self.decode_tensor(ids))

    def reconstruct(self, x: Any, resize: bool = False) -> np.ndarray:
        """``decode(encode(x))``: the round trip in user units."""
        return self.decode(self.encode(x, resize=resize))

    # -- persistence -------------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> None:
        from tokenizers_mm.io_atomic import atomic_directory, save_safetensors, write_json

        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        payload = {"class": "VQTokenizer", "config": self.config.to_dict()}
        with atomic_directory(directory) as tmp:
            save_safetensors(tmp / WEIGHTS_NAME, state, metadata={"format": "pt"})
            write_json(tmp / CONFIG_NAME, payload)

    @classmethod
    def from_pretrained(cls, directory: str | Path, device: str | torch.device = "cpu") -> "VQTokenizer":
        from tokenizers_mm.io_atomic import read_safetensors

        directory = Path(directory)
        payload = read_tokenizer_config(directory)
        if payload["class"] != "VQTokenizer":
            raise ValueError(f"{str(directory)!r} holds a {payload['class']}, not a VQTokenizer; use load_tokenizer()")
        config = VQTokenizerConfig.from_dict(payload.get("config", {}))
        weights = directory / WEIGHTS_NAME
        if not weights.is_file():
            raise ValueError(f"{str(directory)!r} has no {WEIGHTS_NAME}; re-save the tokenizer with save_pretrained()")
        model = cls(config)
        state, _ = read_safetensors(weights, fix="retrain the tokenizer, or copy it again from where it was trained")
        try:
            missing, unexpected = model.load_state_dict(state, strict=False)
        except RuntimeError as err:  # shape mismatches
            raise ValueError(f"{str(weights)!r} does not match its config.json; the files come from different "
                             f"tokenizers ({str(err).splitlines()[1].strip() if len(str(err).splitlines()) > 1 else err})") from err
        if missing or unexpected:
            raise ValueError(
                f"{str(weights)!r} does not match its config.json (missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]}); the files come from different tokenizers"
            )
        return model.to(device).eval()
