"""Input embeddings that are not a token table learned from scratch (OneModelConfig.input_embeddings).

- ``CodebookEmbedding``: a grid modality's token ids embedded through its tokenizer's code vectors (frozen or
  fine-tuned) and a learned linear map (issue 12: a table learned from scratch over-fits on little data).
- Pixel patches: ``"pixels"`` uses a plain ``nn.Linear`` patch embedding (4M's ``rgb@224``), ``"pixels_conv"`` the
  ``ConvPatchEmbedding`` stem, ``"pixels_cnn"`` the deeper ``ConvNetPatchEmbedding``, ``"pixels_clip"`` the frozen
  vision tower of a contrastive image-text encoder (``FrozenFeatureEmbedding``, 4M-21's CLIP-feature input); all
  live in ``OneModel.input_patches``; the patches are cut by ``onemodel.pixel_inputs``.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["CodebookEmbedding", "ConvPatchEmbedding", "ConvNetPatchEmbedding", "convnet_stem", "install_stem",
           "FrozenFeatureEmbedding", "feature_encoder_spec", "check_feature_spec"]


class CodebookEmbedding(nn.Module):
    """Input embedding of one modality's token ids from its tokenizer's code vectors: ``codes`` (V, C), frozen (a
    saved buffer) or trainable, standardised per dimension, then a learned linear map to the model width.

    ``forward()`` returns the (V, D) embedding table of the modality (recomputed each call: V x C x D, tiny).
    """

    def __init__(self, vocab_size: int, code_dim: int, dim: int, trainable: bool = False) -> None:
        super().__init__()
        codes = torch.zeros(vocab_size, code_dim)
        if trainable:
            self.codes = nn.Parameter(codes)
        else:
            self.register_buffer("codes", codes)
        self.linear = nn.Linear(code_dim, dim)

    def reset_parameters(self) -> None:
        """N(0, 1/C) weights: unit-variance embeddings from standardised codes (the token table's scale)."""
        nn.init.normal_(self.linear.weight, std=self.linear.in_features ** -0.5)
        nn.init.zeros_(self.linear.bias)

    def forward(self) -> torch.Tensor:
        c = self.codes
        c = (c - c.mean(0)) / c.std(0).clamp(min=1e-6)
        return self.linear(c)


class ConvPatchEmbedding(nn.Module):
    """Pixel patches -> one embedding per patch through a small convolutional stem (``input_embeddings`` "pixels_conv").

    The patches of a sample are put back into its image, which goes through ``log2(P)`` 3x3 stride-2 convolutions
    (GroupNorm + GELU; widths 32, 64, 128, ... capped at the model width) and a 1x1 convolution to the model width:
    one output per P x P patch, in the token grid's row-major order. An early convolutional stem instead of one
    linear patch embedding makes a ViT train faster and more stably ("Early Convolutions Help Transformers See
    Better", Xiao et al. 2021); its receptive field reaches into the neighbouring patches, which is harmless here:
    a sample only gets pixels when the modality is not also one of its targets.

    values (B, N, F) with N = g * g and F = P * P * channels, P a power of two -> (B, N, D).
    """

    def __init__(self, patch_dim: int, dim: int, channels: int = 3) -> None:
        super().__init__()
        side = round((patch_dim / channels) ** 0.5)
        if side * side * channels != patch_dim or side < 1 or side & (side - 1):
            raise ValueError(f"pixels_conv and pixels_cnn need square patches with a power-of-two side; a patch row "
                             f"of {patch_dim} values with {channels} channels is not one (use 'pixels')")
        self.patch, self.channels = side, channels
        self.stem = self.build_stem(side, dim, channels)

    @staticmethod
    def build_stem(patch: int, dim: int, channels: int) -> nn.Sequential:
        """log2(patch) 3x3 stride-2 convolutions (widths 32, 64, ... capped at ``dim``) and a 1x1 one to ``dim``."""
        layers: list[nn.Module] = []
        width_in = channels
        for i in range(patch.bit_length() - 1):  # log2(P) stride-2 stages
            width = min(dim, 32 * 2**i)
            layers += [nn.Conv2d(width_in, width, 3, stride=2, padding=1), nn.GroupNorm(1, width), nn.GELU()]
            width_in = width
        layers.append(nn.Conv2d(width_in, dim, 1))
        return nn.Sequential(*layers)

    @property
    def in_features(self) -> int:
        return self.patch * self.patch * self.channels

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        B, N, _ = values.shape
        g, p, c = round(N**0.5), self.patch, self.channels
        images = values.view(B, g, g, p, p, c).permute(0, 5, 1, 3, 2, 4).reshape(B, c, g * p, g * p)
        out = self.stem(images)  # (B, D, g, g)
        return out.flatten(2).transpose(1, 2)  # (B, N, D) row-major, as the token grid


class ConvNetPatchEmbedding(ConvPatchEmbedding):
    """Pixel patches -> one embedding per patch through a small ConvNet over the image (``input_embeddings``
    "pixels_cnn").

    :func:`convnet_stem`: per halving of the resolution, a 3x3 convolution then a 3x3 stride-2 one (widths 32,
    64, ... capped at the model width; GroupNorm + GELU after each), then two 3x3 convolutions at the token
    grid's resolution and a 1x1 convolution to the model width. With 8x8 patches that is 8 convolutions whose
    receptive field (61 pixels) spans most of a 64-pixel image, against 15 pixels for ``"pixels_conv"``'s three
    stride-2 layers and one patch for ``"pixels"``. Why: on the shapes scenes, what every recognition task needs is each object's
    shape bound to its colour, and a ViT over linear patch embeddings learns that slowly. Measured on the task
    "which (size, colour, shape) objects are in the scene" (48-way multi-label, 8,000 training scenes, 1,000 test
    scenes, batch 32, 240 CPU-seconds each, width 128): this ConvNet with attention pooling reaches exact-set
    accuracy 0.81 (F1 0.95), a 3-layer ViT over linear 8x8 patch embeddings 0.22 (0.58), over overlapping 16x16
    patches 0.23 (0.61) (``scripts/vision_stem_probe.py``). Inside the one model, trained by its own losses, it
    helps the dense tasks but starves the captions; the same stem pre-trained contrastively and read through
    ``"pixels_clip"`` is what helps (docs/recipe.md, "Seeing shape").

    values (B, N, F) with N = g * g and F = P * P * channels, P a power of two -> (B, N, D).
    """

    @staticmethod
    def build_stem(patch: int, dim: int, channels: int) -> nn.Sequential:
        return convnet_stem(patch, dim, channels)


def convnet_stem(patch: int, dim: int, channels: int = 3, width: int = 32) -> nn.Sequential:
    """The ConvNet of :class:`ConvNetPatchEmbedding`: images (B, channels, H, W) -> (B, dim, H / patch, W / patch),
    ``patch`` a power of two, ``width`` the channels of the full-resolution stage (doubled per halving, capped at
    ``dim``; most of the cost is in the first two stages). Also the image stem of
    ``ContrastiveConfig.vision_stem = "convnet"``."""
    if patch < 1 or patch & (patch - 1):
        raise ValueError(f"a ConvNet stem needs a power-of-two patch size, got {patch}")

    def conv(c_in: int, c_out: int, stride: int) -> list[nn.Module]:
        return [nn.Conv2d(c_in, c_out, 3, stride=stride, padding=1), nn.GroupNorm(1, c_out), nn.GELU()]

    layers: list[nn.Module] = []
    width_in = channels
    stages = patch.bit_length() - 1
    for i in range(stages):
        width_i = min(dim, width * 2**i)
        width_out = dim if i == stages - 1 else width_i
        layers += conv(width_in, width_i, 1) + conv(width_i, width_out, 2)
        width_in = width_out
    layers += conv(width_in, dim, 1) + conv(dim, dim, 1)
    layers.append(nn.Conv2d(dim, dim, 1))
    return nn.Sequential(*layers)


def install_stem(model: Any, stem: nn.Module) -> None:
    """Make ``stem`` (a :func:`convnet_stem`) stand in for the linear patch embedding of a transformers CLIP / SigLIP
    vision tower (``model.vision_model.embeddings.patch_embedding`` in ``CLIPModel`` / ``SiglipModel``,
    ``model.embeddings.patch_embedding`` in transformers 5's ``CLIPVisionModel``): a forward hook replaces that
    convolution's output by the stem's output on the same pixels, so position embeddings, class token and
    transformer blocks stay transformers' own. The bypassed convolution is frozen (it gets no gradient)."""
    tower = getattr(model, "vision_model", model)
    patch_embedding = tower.embeddings.patch_embedding
    patch_embedding.requires_grad_(False)

    def hook(module: nn.Module, inputs: tuple[torch.Tensor, ...], output: torch.Tensor) -> torch.Tensor:
        return stem(inputs[0]).to(output.dtype)

    patch_embedding.register_forward_hook(hook)


def feature_encoder_spec(encoder: Any) -> dict[str, Any]:
    """What a OneModel needs to rebuild the vision tower of ``encoder`` (an ``onemodel.contrastive.ImageTextEncoder``)
    without its directory: ``{"vision_config": transformers vision config (non-default fields + model_type),
    "image_mean", "image_std": its pixel normalisation, "layer": the hidden state used}`` (JSON; stored in
    ``OneModelConfig.feature_encoders``, the weights in ``model.safetensors``)."""
    vision = encoder.hf.config.vision_config.to_diff_dict()
    vision.pop("transformers_version", None)
    vision["model_type"] = encoder.hf.config.vision_config.model_type
    spec = {"vision_config": vision, "image_mean": [float(v) for v in encoder.config.image_mean],
            "image_std": [float(v) for v in encoder.config.image_std], "layer": int(encoder.config.patch_feature_layer)}
    if getattr(encoder, "vision_stem", None) is not None:
        spec["stem_width"] = int(encoder.config.vision_stem_width)  # its ConvNet stem (ContrastiveConfig.vision_stem)
    return spec


def check_feature_spec(name: str, spec: Any, grid_size: int) -> None:
    """One clear ``ValueError`` when ``spec`` (a :func:`feature_encoder_spec`) cannot feed modality ``name``'s grid."""
    where = f"feature_encoders[{name!r}]"
    if spec is None:
        raise ValueError(f"input_embeddings[{name!r}] = 'pixels_clip' needs {where}: in a training config, the "
                         "directory of a contrastive encoder (onemodel train-clip's OUT/model), e.g. "
                         f"model.feature_encoders={{{name}: runs/clip_shapes/model}}")
    if isinstance(spec, str):
        raise ValueError(f"{where} is {spec!r}, a directory: OneModelConfig needs the encoder's description "
                         "(onemodel.input_embeddings.feature_encoder_spec(encoder)); onemodel train makes it from the "
                         "directory given as model.feature_encoders")
    required = {"vision_config", "image_mean", "image_std", "layer"}
    if not isinstance(spec, dict) or not required <= set(spec) <= required | {"stem_width"}:
        raise ValueError(f"{where} must be a dict with vision_config, image_mean, image_std, layer and optionally "
                         "stem_width (see onemodel.input_embeddings.feature_encoder_spec)")
    vision = spec["vision_config"]
    if not isinstance(vision, dict) or "model_type" not in vision:
        raise ValueError(f"{where}.vision_config must be a transformers vision config dict with a model_type")
    if len(spec["image_mean"]) != 3 or len(spec["image_std"]) != 3 or min(spec["image_std"]) <= 0:
        raise ValueError(f"{where}: image_mean and image_std need 3 values (std > 0)")
    size, patch = int(vision.get("image_size", 224)), int(vision.get("patch_size", 32))
    if size % patch or size // patch != grid_size:
        raise ValueError(f"the contrastive encoder's patch grid ({size}px / patch {patch} = {size // patch}x"
                         f"{size // patch}) differs from {name!r}'s {grid_size}x{grid_size} token grid: its features "
                         f"cannot stand in for the tokens; train the encoder with model.image_size / model.patch_size "
                         f"giving a {grid_size}x{grid_size} grid")


class FrozenFeatureEmbedding(nn.Module):
    """Pixel patches -> the frozen patch features of a contrastive encoder's vision tower -> a learned projection
    (``input_embeddings`` "pixels_clip"; 4M-21 feeds CLIP features to its model this way).

    The patches of a sample are put back into its image ([-1, 1] -> [0, 1]), resized to the tower's image size if
    it differs, normalised with the encoder's own mean / std and run through the vision tower (a transformers
    ``CLIPVisionModel`` / ``SiglipVisionModel`` built from ``spec["vision_config"]``) without gradients and in
    eval mode; the hidden state ``spec["layer"]`` (-1: last, as ``ImageTextEncoder.patch_features``) minus the
    class token gives one feature per patch, in the token grid's row-major order; a LayerNorm and a Linear(Dv, D)
    (the only trained parameters) map it to the model width. The tower's parameters have ``requires_grad=False``,
    so the optimizer holds no state for them; they are saved with the model, so a saved model loads without the
    encoder's directory. ``load_encoder(encoder)`` copies the weights of a trained ``ImageTextEncoder`` in.

    ``with_pixels`` (``input_embeddings`` "pixels_and_clip"): a learned Linear(F, D) of the raw patch row (the
    "pixels" embedding) is added, so what the frozen features drop (measured: depth's vertical position) stays.

    values (B, N, F) with N = g * g and F = P * P * 3 -> (B, N, D).
    """

    def __init__(self, spec: dict[str, Any], patch_dim: int, grid_size: int, dim: int, with_pixels: bool = False) -> None:
        super().__init__()
        from transformers import AutoConfig, AutoModel

        check_feature_spec("input", spec, grid_size)
        vision = dict(spec["vision_config"])
        config = AutoConfig.for_model(vision.pop("model_type"), **vision)
        self.tower = AutoModel.from_config(config)
        self.stem = None
        if spec.get("stem_width"):  # the encoder was trained with a ConvNet stem (ContrastiveConfig.vision_stem)
            self.stem = convnet_stem(int(config.patch_size), int(config.hidden_size), width=int(spec["stem_width"]))
            install_stem(self.tower, self.stem)
            self.stem.requires_grad_(False)
            self.stem.eval()
        self.tower.requires_grad_(False)
        self.tower.eval()
        side = round((patch_dim / 3) ** 0.5)
        if side * side * 3 != patch_dim:
            raise ValueError(f"pixels_clip needs square rgb patches; a patch row of {patch_dim} values is not one")
        self.grid, self.patch, self.layer = grid_size, side, int(spec["layer"])
        self.image_size = int(config.image_size)
        self.register_buffer("mean", torch.tensor(spec["image_mean"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(spec["image_std"], dtype=torch.float32).view(1, 3, 1, 1), persistent=False)
        self.norm = nn.LayerNorm(int(config.hidden_size))
        self.linear = nn.Linear(int(config.hidden_size), dim)
        self.pixel_linear = nn.Linear(patch_dim, dim) if with_pixels else None

    @property
    def in_features(self) -> int:
        return self.patch * self.patch * 3

    def train(self, mode: bool = True) -> "FrozenFeatureEmbedding":
        super().train(mode)
        self.tower.eval()  # frozen: never in training mode (no dropout)
        if self.stem is not None:
            self.stem.eval()
        return self

    def load_encoder(self, encoder: Any) -> None:
        """Copy the vision tower weights of ``encoder`` (an ``ImageTextEncoder`` whose ``feature_encoder_spec``
        built this module); a different architecture fails with the mismatching names."""
        if (self.stem is None) != (getattr(encoder, "vision_stem", None) is None):
            raise ValueError("the encoder's vision stem does not match this model's pixels_clip input (one has a "
                             "ConvNet stem, the other not)")
        try:
            self.tower.load_state_dict(encoder.hf.vision_model.state_dict(), strict=True)
            if self.stem is not None:
                self.stem.load_state_dict(encoder.vision_stem.state_dict(), strict=True)
        except RuntimeError as err:
            raise ValueError(f"the encoder's vision tower does not match this model's pixels_clip input: "
                             f"{str(err).splitlines()[0]}") from err

    def features(self, values: torch.Tensor) -> torch.Tensor:
        """(B, N, F) patches -> (B, N, Dv) frozen tower features (detached, float32)."""
        B, N, _ = values.shape
        g, p = self.grid, self.patch
        if N != g * g:
            raise ValueError(f"pixels_clip expects {g * g} patches per image, got {N}")
        image = values.float().view(B, g, g, p, p, 3).permute(0, 5, 1, 3, 2, 4).reshape(B, 3, g * p, g * p)
        image = (image + 1.0) * 0.5
        if image.shape[-1] != self.image_size:
            image = F.interpolate(image, size=(self.image_size, self.image_size), mode="bilinear",
                                  align_corners=False, antialias=True)
        pixels = (image - self.mean) / self.std
        with torch.no_grad():
            out = self.tower(pixel_values=pixels, output_hidden_states=self.layer != -1, return_dict=True)
            hidden = out.last_hidden_state if self.layer == -1 else out.hidden_states[self.layer]
        if hidden.shape[1] == N + 1:  # CLIP's class token comes first
            hidden = hidden[:, 1:]
        return hidden.detach().float()

    def forward(self, values: torch.Tensor) -> torch.Tensor:
        out = self.linear(self.norm(self.features(values)))
        if self.pixel_linear is not None:
            out = out + self.pixel_linear(values)
        return out
