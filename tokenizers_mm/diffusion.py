"""Optional diffusion decoder for the rgb tokenizer, built on ``diffusers``.

A ``UNet2DModel`` denoises an rgb image (in [-1, 1]) while seeing the quantized latents of the VQ tokenizer,
upsampled (nearest) to the image size and concatenated as extra input channels; sampling runs a
``DDIMScheduler`` (deterministic, eta = 0) from seeded noise. It is trained after the conv autoencoder with the
encoder and codebook frozen (:func:`train_diffusion_decoder`), and lives inside the tokenizer's weights
(``diffusion_decoder.*`` in ``model.safetensors``; its config is ``VQTokenizerConfig.diffusion``).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

logger = logging.getLogger(__name__)

__all__ = ["DiffusionDecoderConfig", "DiffusionDecoder", "train_diffusion_decoder"]


@dataclass
class DiffusionDecoderConfig:
    """block_out_channels / layers_per_block / norm_num_groups: the UNet (one down and one up block per entry,
    no attention); num_train_timesteps, beta_schedule, prediction_type: the DDIM noise schedule and what the UNet
    predicts ("epsilon", "sample" = the clean image, or "v_prediction"); num_inference_steps: default sampling
    steps."""

    block_out_channels: list[int] = field(default_factory=lambda: [16, 32, 64])
    layers_per_block: int = 1
    norm_num_groups: int = 8
    num_train_timesteps: int = 1000
    beta_schedule: Literal["linear", "scaled_linear", "squaredcos_cap_v2"] = "squaredcos_cap_v2"
    prediction_type: Literal["epsilon", "sample", "v_prediction"] = "sample"
    num_inference_steps: int = 25

    def __post_init__(self) -> None:
        self.block_out_channels = [int(c) for c in self.block_out_channels]
        if not self.block_out_channels or any(c % self.norm_num_groups for c in self.block_out_channels):
            raise ValueError(f"block_out_channels {self.block_out_channels} must be non-empty multiples of norm_num_groups")
        if self.prediction_type not in ("epsilon", "sample", "v_prediction"):
            raise ValueError(f"prediction_type must be epsilon, sample or v_prediction, got {self.prediction_type!r}")
        if self.layers_per_block < 1 or self.num_train_timesteps < 2 or self.num_inference_steps < 1:
            raise ValueError("layers_per_block, num_inference_steps must be >= 1 and num_train_timesteps >= 2")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "DiffusionDecoderConfig":
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - valid)
        if unknown:
            raise ValueError(f"unknown diffusion decoder key(s) {unknown}; valid keys: {sorted(valid)}")
        return cls(**data)


class DiffusionDecoder(nn.Module):
    """UNet denoiser of rgb ``(B, 3, S, S)`` conditioned on quantized latents ``(B, D, h, w)``."""

    def __init__(self, config: DiffusionDecoderConfig, latent_dim: int, image_size: int):
        super().__init__()
        from diffusers import UNet2DModel

        self.config = config
        self.image_size = image_size
        n = len(config.block_out_channels)
        if image_size % (2 ** (n - 1)):
            raise ValueError(f"image_size {image_size} must be divisible by 2**{n - 1} for {n} UNet levels")
        self.unet = UNet2DModel(
            sample_size=image_size, in_channels=3 + latent_dim, out_channels=3,
            block_out_channels=tuple(config.block_out_channels), layers_per_block=config.layers_per_block,
            down_block_types=("DownBlock2D",) * n, up_block_types=("UpBlock2D",) * n,
            norm_num_groups=config.norm_num_groups, add_attention=False,
        )

    def make_scheduler(self) -> Any:
        from diffusers import DDIMScheduler

        c = self.config
        return DDIMScheduler(num_train_timesteps=c.num_train_timesteps, beta_schedule=c.beta_schedule,
                             prediction_type=c.prediction_type, clip_sample=True)

    def condition(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, D, h, w) -> (B, D, S, S) nearest upsampling."""
        return F.interpolate(latents, size=(self.image_size, self.image_size), mode="nearest")

    def forward(self, noisy: torch.Tensor, timesteps: torch.Tensor, latents: torch.Tensor) -> torch.Tensor:
        """One denoiser call: noisy image (B, 3, S, S), timesteps (B,), latents (B, D, h, w) -> (B, 3, S, S)."""
        return self.unet(torch.cat([noisy, self.condition(latents)], dim=1), timesteps).sample

    def loss(self, images: torch.Tensor, latents: torch.Tensor, scheduler: Any, generator: torch.Generator) -> torch.Tensor:
        """Denoising loss on clean images in [-1, 1] (B, 3, S, S)."""
        b = images.shape[0]
        noise = torch.randn(images.shape, generator=generator, device=images.device)
        t = torch.randint(0, self.config.num_train_timesteps, (b,), generator=generator, device=images.device)
        noisy = scheduler.add_noise(images, noise, t)
        pred = self(noisy, t, latents)
        if self.config.prediction_type == "epsilon":
            target = noise
        elif self.config.prediction_type == "sample":
            target = images
        else:
            target = scheduler.get_velocity(images, noise, t)
        return F.mse_loss(pred.float(), target)

    @torch.no_grad()
    def sample(self, latents: torch.Tensor, num_inference_steps: int | None = None, seed: int | None = 0) -> torch.Tensor:
        """DDIM sampling (eta = 0): latents (B, D, h, w) -> images (B, 3, S, S) in [-1, 1]; same seed, same images."""
        scheduler = self.make_scheduler()
        scheduler.set_timesteps(num_inference_steps or self.config.num_inference_steps)
        generator = torch.Generator(device="cpu")
        if seed is not None:
            generator.manual_seed(int(seed))
        else:
            generator.seed()
        b = latents.shape[0]
        x = torch.randn((b, 3, self.image_size, self.image_size), generator=generator).to(latents.device)
        cond = self.condition(latents)
        for t in scheduler.timesteps:
            out = self.unet(torch.cat([x, cond], dim=1), t.expand(b).to(latents.device)).sample
            x = scheduler.step(out, t, x, eta=0.0).prev_sample
        return x.clamp(-1.0, 1.0)


def train_diffusion_decoder(
    tokenizer: Any,
    train_images: np.ndarray,
    val_images: np.ndarray | None = None,
    steps: int = 500,
    batch_size: int = 32,
    lr: float = 1e-3,
    seed: int = 0,
    progress: bool = True,
    max_val_images: int = 64,
    num_inference_steps: int | None = None,
) -> dict[str, Any]:
    """Train ``tokenizer.diffusion_decoder`` on rgb uint8 images (B, S, S, 3) with the encoder and codebook frozen.

    Returns ``{"steps", "train_seconds", "final_loss"}`` plus, with ``val_images``, ``psnr_diffusion`` and
    ``psnr_conv`` on the same (at most ``max_val_images``) images.
    """
    from tqdm.auto import tqdm

    from tokenizers_mm.metrics import psnr

    dec = tokenizer.diffusion_decoder
    if dec is None:
        raise ValueError("this tokenizer has no diffusion decoder; build it with config.diffusion set")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    generator = torch.Generator().manual_seed(seed)
    scheduler = dec.make_scheduler()
    tokenizer.eval()
    dec.train()
    opt = torch.optim.AdamW(dec.parameters(), lr=lr, weight_decay=0.0)
    start = time.perf_counter()
    bar = tqdm(range(steps), desc="train diffusion decoder", disable=not progress, mininterval=1.0)
    ema = None
    for step in bar:
        for group in opt.param_groups:  # linear warmup then cosine
            warm = max(1, steps // 20)
            group["lr"] = lr * (step + 1) / warm if step < warm else lr * 0.5 * (1 + np.cos(np.pi * (step - warm) / max(1, steps - warm)))
        batch = train_images[rng.integers(0, len(train_images), batch_size)]
        with torch.no_grad():
            x = tokenizer.preprocess(batch)
            latents = tokenizer.quantize(tokenizer.encoder(x))[0]
        loss = dec.loss(x, latents, scheduler, generator)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(dec.parameters(), 1.0)
        opt.step()
        ema = loss.item() if ema is None else 0.95 * ema + 0.05 * loss.item()
        if step % 10 == 0:
            bar.set_postfix(loss=f"{ema:.4f}")
    dec.eval()
    result: dict[str, Any] = {"steps": steps, "train_seconds": round(time.perf_counter() - start, 1), "final_loss": ema}
    if val_images is not None:
        val = val_images[:max_val_images]
        ids = tokenizer.encode(val)
        result["psnr_conv"] = psnr(tokenizer.decode(ids), val)
        result["psnr_diffusion"] = psnr(tokenizer.decode(ids, use_diffusion=True, num_inference_steps=num_inference_steps
                                                         or dec.config.num_inference_steps), val)
        result["val_images"] = int(len(val))
        logger.info("diffusion decoder PSNR %.2f dB vs conv decoder %.2f dB", result["psnr_diffusion"], result["psnr_conv"])
    return result
