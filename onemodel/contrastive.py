"""A contrastive image-text encoder (CLIP / SigLIP, optional CoCa captioning loss) on Hugging Face ``transformers``.

The two towers are a ``transformers.CLIPModel`` (vision ViT + causal text transformer + projections + learned
temperature) built from a :class:`ContrastiveConfig`, or any local CLIP / SigLIP checkpoint (``CLIPModel`` /
``SiglipModel`` directory written by ``save_pretrained``), loaded through the same code::

    enc = ImageTextEncoder.from_pretrained("runs/clip_shapes/model")      # ours, or a local HF CLIP/SigLIP dir
    enc.encode_image(images)            # (B, E) L2-normalised image embeddings
    enc.encode_text(["a red circle"])   # (T, E) L2-normalised text embeddings
    enc.similarity(images, texts)       # (B, T) cosine similarities
    enc.zero_shot(images, ["red circle", "blue square"])   # {"labels": [best label per image], "probs": (B, L)}
    enc.patch_features(images)          # (B, h*w, Dv) frozen patch features on enc.patch_grid (CLS dropped)

Images: one image or a list, each a PIL image, numpy array, torch tensor or file path (the rules and errors of
``onemodel.pipeline_inputs``); they are resized (stretched) to ``image_size`` and normalised with
``image_mean`` / ``image_std``. Texts: a string or a list of strings.

Directory layout written by :meth:`ImageTextEncoder.save_pretrained` (``D``)::

    D/config.json            transformers CLIPConfig      } written by CLIPModel.save_pretrained: so
    D/model.safetensors      the CLIPModel weights        } transformers.CLIPModel.from_pretrained(D) and
                                                            transformers.CLIPVisionModel.from_pretrained(D) load it
    D/contrastive.json       {"class": "ImageTextEncoder", "format_version": 1, "config": ContrastiveConfig fields}
    D/heads.safetensors      only when present: "logit_bias" (SigLIP loss on a CLIPModel), "coca.*" (caption decoder)
    D/tokenizer/             the project's text tokenizer (tokenizers_mm TextTokenizer: tokenizer.json + config.json)

A directory without ``contrastive.json`` is read as a plain transformers checkpoint: ``config.json`` decides
CLIP or SigLIP, its tokenizer files (``tokenizer.json`` / ``vocab.json`` ...) are loaded with ``AutoTokenizer``,
and ``preprocessor_config.json`` (when present) gives the image size, mean and std. (A real CLIP preprocessor
resizes the short side and centre-crops; here images are stretched to a square: crop them first to keep the
aspect ratio.)

Text ids with the project tokenizer: its ``eos`` id is 2, which transformers' CLIP text model treats as a
legacy config (it would pool at the highest token id). So the CLIP text vocabulary is the tokenizer's plus one
slot, ``eos`` is fed as that last id (``text_config.eos_token_id = vocab_size``) and the text embedding is the
hidden state at the first eos, as in CLIP.

Losses (:func:`clip_loss`, :func:`siglip_loss`): with several processes (``torch.distributed``), embeddings are
gathered from every rank so each process scores the global batch of negatives; the gather passes gradients back
to the rank that owns each embedding (:func:`gather_with_grad`), so DDP's gradient average equals the
single-process gradient of the same global batch.
"""

from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from onemodel.config import from_dict, to_dict

__all__ = [
    "ContrastiveConfig",
    "ContrastiveOutput",
    "ImageTextEncoder",
    "CaptionDecoder",
    "clip_loss",
    "siglip_loss",
    "gather_with_grad",
    "CONTRASTIVE_NAME",
    "HEADS_NAME",
]

logger = logging.getLogger(__name__)

CONTRASTIVE_NAME = "contrastive.json"
HEADS_NAME = "heads.safetensors"
TOKENIZER_DIR = "tokenizer"
FORMAT_VERSION = 1
CLIP_MEAN = [0.48145466, 0.4578275, 0.40821073]
CLIP_STD = [0.26862954, 0.26130258, 0.27577711]


@dataclass
class ContrastiveConfig:
    """Architecture and loss of an :class:`ImageTextEncoder`.

    loss: "clip" (InfoNCE, softmax over the batch in both directions, learned temperature) or "siglip" (pairwise
        sigmoid with learned temperature and bias). coca_weight > 0 adds a CoCa captioning loss (a small causal
        text decoder cross-attending to the image tokens) with that weight.
    The tower sizes build a fresh CLIPModel; a loaded checkpoint keeps its own (its config.json decides).
    patch_feature_layer: which vision hidden state :meth:`ImageTextEncoder.image_patch_features` returns
        (-1 = last layer, -2 = penultimate as in LLaVA).
    vision_stem: "patch" (CLIP's linear patch embedding) or "convnet": the patch embedding's output is replaced by
        a small ConvNet over the image (``onemodel.input_embeddings.convnet_stem``: 8 convolutions for 8-pixel
        patches, receptive field 61 pixels), which learns object shape much faster than linear patches on small
        images (docs/contrastive.md); ``vision_stem_width`` channels at full resolution, doubled per halving.
        Its weights live in ``heads.safetensors``; the transformers part of the
        directory then needs this class to load with the stem.
    attention: transformers' attention kernel for both towers ("sdpa" or "eager"). On a CPU with bf16 autocast
        (``optim.mixed_precision: bf16``) "eager" is ~1.6x faster per training step for these small towers
        (PyTorch's CPU SDPA kernel is slow in bf16); the two give the same embeddings up to rounding.
    """

    loss: Literal["clip", "siglip"] = "clip"
    image_size: int = 64
    patch_size: int = 8
    vision_width: int = 192
    vision_layers: int = 4
    vision_heads: int = 4
    text_width: int = 128
    text_layers: int = 2
    text_heads: int = 4
    text_max_length: int = 48
    vocab_size: int = 0  # text vocabulary of the CLIP text tower (set from the tokenizer when 0)
    embed_dim: int = 128
    mlp_ratio: float = 4.0
    hidden_act: str = "gelu"
    logit_scale_init: Optional[float] = None  # log of the initial inverse temperature; null = log(1/0.07) / log(10)
    logit_bias_init: float = -10.0  # SigLIP only
    coca_weight: float = 0.0
    coca_layers: int = 2
    coca_width: int = 128
    coca_heads: int = 4
    image_mean: list[float] = field(default_factory=lambda: list(CLIP_MEAN))
    image_std: list[float] = field(default_factory=lambda: list(CLIP_STD))
    patch_feature_layer: int = -1
    vision_stem: Literal["patch", "convnet"] = "patch"
    vision_stem_width: int = 32
    attention: Literal["sdpa", "eager"] = "sdpa"

    def __post_init__(self) -> None:
        if self.image_size < 1 or self.patch_size < 1 or self.image_size % self.patch_size:
            raise ValueError(f"image_size ({self.image_size}) must be a positive multiple of patch_size "
                             f"({self.patch_size})")
        for name in ("vision_width", "text_width", "coca_width"):
            heads = getattr(self, name.split("_")[0] + "_heads")
            if getattr(self, name) % heads:
                raise ValueError(f"{name} ({getattr(self, name)}) must be divisible by "
                                 f"{name.split('_')[0]}_heads ({heads})")
        if self.attention not in ("sdpa", "eager"):
            raise ValueError(f"attention must be 'sdpa' or 'eager', got {self.attention!r}")
        if self.vision_stem_width < 1:
            raise ValueError(f"vision_stem_width must be >= 1 (channels of the ConvNet stem's first stage), got "
                             f"{self.vision_stem_width}")
        if self.vision_stem == "convnet" and self.patch_size & (self.patch_size - 1):
            raise ValueError(f"vision_stem 'convnet' needs a power-of-two patch_size (one stride-2 stage per "
                             f"halving), got {self.patch_size}")
        if self.coca_weight < 0:
            raise ValueError(f"coca_weight must be >= 0 (0 = no captioning loss), got {self.coca_weight}")
        if len(self.image_mean) != 3 or len(self.image_std) != 3 or min(self.image_std) <= 0:
            raise ValueError("image_mean and image_std must be 3 numbers each (std > 0)")
        if self.text_max_length < 2:
            raise ValueError(f"text_max_length must be >= 2, got {self.text_max_length}")

    @property
    def initial_logit_scale(self) -> float:
        if self.logit_scale_init is not None:
            return float(self.logit_scale_init)
        return math.log(1 / 0.07) if self.loss == "clip" else math.log(10.0)

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "ContrastiveConfig":
        return from_dict(cls, data)


@dataclass
class ContrastiveOutput:
    """loss = contrastive_loss + coca_weight * caption_loss (caption_loss None without CoCa)."""

    loss: torch.Tensor
    contrastive_loss: torch.Tensor
    caption_loss: Optional[torch.Tensor]
    image_embeds: torch.Tensor
    text_embeds: torch.Tensor


# ------------------------------------------------------------------------------------------------ losses


class _GatherWithGrad(torch.autograd.Function):
    """all_gather whose backward sums the incoming gradients over ranks and keeps this rank's slice."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        world, rank = dist.get_world_size(), dist.get_rank()
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous())
        ctx.rank, ctx.n = rank, x.shape[0]
        return torch.cat(parts, dim=0)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        import torch.distributed as dist

        grad = grad.contiguous()
        dist.all_reduce(grad, op=dist.ReduceOp.SUM)
        return grad[ctx.rank * ctx.n:(ctx.rank + 1) * ctx.n]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """``(n, D)`` per process -> ``(world * n, D)`` in rank order (the global batch); identity in one process.

    Every process computes the same loss over the global batch; the backward sums the gradients of all copies and
    hands each rank the part for its own rows, so after DDP's average the gradient is exactly the one-process
    gradient (the loss is not scaled). Needs the same ``n`` on every rank."""
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return x
    return _GatherWithGrad.apply(x)


def clip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
              negative_text_embeds: Optional[torch.Tensor] = None,
              negative_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """CLIP InfoNCE: mean of the image->text and text->image cross-entropies over ``s * <img_i, txt_j>``, where
    ``s = exp(logit_scale)`` (clamped at 100) and the embeddings are L2-normalised; pair i matches pair i.

    ``negative_text_embeds`` ``(M, E)``: extra texts that match no image (hard negatives, NegCLIP): they join the
    image->text softmax of every image as more wrong answers; the text->image direction is unchanged.
    ``negative_valid`` ``(M,)`` bool: False drops a negative (a caption with nothing to swap)."""
    scale = logit_scale.exp().clamp(max=100.0)
    logits = scale * image_embeds @ text_embeds.t()
    target = torch.arange(logits.shape[0], device=logits.device)
    i2t_logits = logits
    if negative_text_embeds is not None:
        extra = scale * image_embeds @ negative_text_embeds.t()
        if negative_valid is not None:
            extra = extra.masked_fill(~negative_valid.bool()[None, :], float("-inf"))
        i2t_logits = torch.cat([logits, extra], dim=1)
    return 0.5 * (F.cross_entropy(i2t_logits, target) + F.cross_entropy(logits.t(), target))


def siglip_loss(image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor,
                logit_bias: torch.Tensor, negative_text_embeds: Optional[torch.Tensor] = None,
                negative_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
    """SigLIP: ``-1/n sum_ij log sigmoid(z_ij (s <img_i, txt_j> + b))`` with ``z_ij = 1`` on the diagonal and -1
    elsewhere, ``s = exp(logit_scale)``, ``b = logit_bias`` (Zhai et al. 2023, eq. 1).

    ``negative_text_embeds`` ``(M, E)``: extra texts paired with no image; every (image, negative) pair adds its
    ``-log sigmoid(-(s <img, neg> + b))`` term (still divided by the n images). ``negative_valid`` as in
    :func:`clip_loss`."""
    logits = logit_scale.exp() * image_embeds @ text_embeds.t() + logit_bias
    n = logits.shape[0]
    z = 2 * torch.eye(n, device=logits.device, dtype=logits.dtype) - 1
    loss = -F.logsigmoid(z * logits).sum()
    if negative_text_embeds is not None:
        extra = -F.logsigmoid(-(logit_scale.exp() * image_embeds @ negative_text_embeds.t() + logit_bias))
        if negative_valid is not None:
            extra = extra * negative_valid.to(extra.dtype)[None, :]
        loss = loss + extra.sum()
    return loss / n


# ------------------------------------------------------------------------------------------------ CoCa head


class CaptionDecoder(nn.Module):
    """CoCa's captioning head: a causal transformer decoder over the text ids that cross-attends to the image
    tokens (the vision tower's last hidden states, projected); next-token cross-entropy, pads ignored, averaged
    per caption and then over the batch."""

    def __init__(self, vocab_size: int, image_width: int, width: int, layers: int, heads: int, max_length: int,
                 bos_id: int) -> None:
        super().__init__()
        self.bos_id = int(bos_id)
        self.tok_emb = nn.Embedding(vocab_size, width)
        self.pos_emb = nn.Parameter(torch.zeros(max_length, width))
        nn.init.normal_(self.pos_emb, std=0.02)
        self.image_proj = nn.Linear(image_width, width)
        layer = nn.TransformerDecoderLayer(width, heads, 4 * width, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.blocks = nn.TransformerDecoder(layer, layers)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size)

    def forward(self, image_tokens: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Mean next-token loss of ``input_ids`` (B, L) given ``image_tokens`` (B, N, Dv)."""
        b, length = input_ids.shape
        if length > self.pos_emb.shape[0]:
            raise ValueError(f"caption of {length} tokens is longer than the decoder's {self.pos_emb.shape[0]}")
        prev = torch.cat([input_ids.new_full((b, 1), self.bos_id), input_ids[:, :-1]], dim=1)
        x = self.tok_emb(prev) + self.pos_emb[:length]
        # causal float mask (0 = may attend, -inf = may not); pads come after the text, so no padding mask is needed
        causal = torch.full((length, length), float("-inf"), device=x.device).triu(1)
        h = self.blocks(x, self.image_proj(image_tokens), tgt_mask=causal)
        logits = self.head(self.norm(h))
        # mean over each caption's tokens, then over captions: every process averaging its own captions then
        # matches one process over the global batch (equal captions per process)
        token_loss = F.cross_entropy(logits.transpose(1, 2).float(), input_ids, reduction="none")
        keep = attention_mask.to(token_loss.dtype)
        return ((token_loss * keep).sum(1) / keep.sum(1).clamp(min=1)).mean()


# ------------------------------------------------------------------------------------------------ the model


def _build_clip(config: ContrastiveConfig) -> Any:
    from transformers import CLIPConfig, CLIPTextConfig, CLIPVisionConfig, CLIPModel

    if config.vocab_size < 4:
        raise ValueError("ContrastiveConfig.vocab_size is not set: build the model with a text tokenizer "
                         "(ImageTextEncoder.from_config(config, tokenizer))")
    text = CLIPTextConfig(
        vocab_size=config.vocab_size + 1,  # + the eos slot (see the module docstring)
        hidden_size=config.text_width, intermediate_size=int(config.text_width * config.mlp_ratio),
        num_hidden_layers=config.text_layers, num_attention_heads=config.text_heads,
        max_position_embeddings=config.text_max_length, hidden_act=config.hidden_act,
        projection_dim=config.embed_dim, pad_token_id=0, bos_token_id=1, eos_token_id=config.vocab_size,
    )
    vision = CLIPVisionConfig(
        hidden_size=config.vision_width, intermediate_size=int(config.vision_width * config.mlp_ratio),
        num_hidden_layers=config.vision_layers, num_attention_heads=config.vision_heads,
        image_size=config.image_size, patch_size=config.patch_size, hidden_act=config.hidden_act,
        projection_dim=config.embed_dim,
    )
    clip_config = CLIPConfig(text_config=text.to_dict(), vision_config=vision.to_dict(),
                             projection_dim=config.embed_dim, logit_scale_init_value=config.initial_logit_scale)
    return CLIPModel(clip_config)


def _is_image_batch(images: Any) -> bool:
    return isinstance(images, (list, tuple)) or (isinstance(images, (np.ndarray, torch.Tensor)) and images.ndim == 4)


class ImageTextEncoder(nn.Module):
    """CLIP / SigLIP dual encoder (+ optional CoCa caption decoder); see the module docstring.

    Build a fresh one with :meth:`from_config`, load one with :meth:`from_pretrained`. ``text_tokenizer``: the
    project's ``TextTokenizer``; ``hf_tokenizer``: a transformers tokenizer (for real checkpoints). Exactly one.
    """

    def __init__(self, config: ContrastiveConfig, hf_model: Any, text_tokenizer: Any = None,
                 hf_tokenizer: Any = None) -> None:
        super().__init__()
        if (text_tokenizer is None) == (hf_tokenizer is None):
            raise ValueError("ImageTextEncoder needs exactly one of text_tokenizer (project) or hf_tokenizer")
        self.config = config
        self.hf = hf_model
        self.text_tokenizer = text_tokenizer
        self.hf_tokenizer = hf_tokenizer
        self.model_type = hf_model.config.model_type  # "clip" or "siglip"
        hf_model.set_attn_implementation(config.attention)
        # SigLIP's bias: SiglipModel has its own; a CLIPModel trained with the sigmoid loss gets one here
        if config.loss == "siglip" and not hasattr(hf_model, "logit_bias"):
            self.logit_bias = nn.Parameter(torch.tensor(float(config.logit_bias_init)))
        else:
            self.logit_bias = None
        self.vision_stem = None
        if config.vision_stem == "convnet":
            from onemodel.input_embeddings import convnet_stem, install_stem

            self.vision_stem = convnet_stem(int(hf_model.config.vision_config.patch_size),
                                            int(hf_model.config.vision_config.hidden_size),
                                            width=config.vision_stem_width)
            install_stem(hf_model, self.vision_stem)
        self.coca = None
        if config.coca_weight > 0:
            tc = hf_model.config.text_config
            self.coca = CaptionDecoder(tc.vocab_size, hf_model.config.vision_config.hidden_size, config.coca_width,
                                       config.coca_layers, config.coca_heads, config.text_max_length,
                                       bos_id=tc.bos_token_id if tc.bos_token_id is not None else 0)

    # ---- construction / persistence
    @classmethod
    def from_config(cls, config: ContrastiveConfig, text_tokenizer: Any) -> "ImageTextEncoder":
        """A freshly initialised CLIPModel sized by ``config`` with the project tokenizer ``text_tokenizer``."""
        if not hasattr(text_tokenizer, "eos_id"):
            raise TypeError(f"text_tokenizer must be a tokenizers_mm TextTokenizer, got {type(text_tokenizer).__name__}")
        if text_tokenizer.eos_id != 2 or text_tokenizer.pad_id != 0 or text_tokenizer.bos_id != 1:
            raise ValueError("the text tokenizer must use pad=0, bos=1, eos=2 (tokenizers_mm TextTokenizer)")
        if config.vocab_size != text_tokenizer.vocab_size:
            config = ContrastiveConfig.from_dict({**config.to_dict(), "vocab_size": text_tokenizer.vocab_size})
        return cls(config, _build_clip(config), text_tokenizer=text_tokenizer)

    @classmethod
    def from_pretrained(cls, directory: str | Path, map_location: str | torch.device = "cpu") -> "ImageTextEncoder":
        """Load a directory written by :meth:`save_pretrained`, or a local transformers CLIP / SigLIP checkpoint."""
        from transformers import AutoConfig, CLIPModel

        directory = Path(directory)
        if not (directory / "config.json").is_file():
            raise FileNotFoundError(f"{str(directory)!r} has no config.json: pass a directory written by "
                                    "ImageTextEncoder.save_pretrained or a transformers CLIP/SigLIP save_pretrained")
        meta_path = directory / CONTRASTIVE_NAME
        model_type = AutoConfig.from_pretrained(directory).model_type
        if model_type == "clip":
            hf = CLIPModel.from_pretrained(directory)
        elif model_type == "siglip":
            from transformers import SiglipModel

            hf = SiglipModel.from_pretrained(directory)
        else:
            raise ValueError(f"{directory}/config.json describes a {model_type!r} model; ImageTextEncoder loads "
                             "'clip' and 'siglip' checkpoints")
        text_tokenizer = hf_tokenizer = None
        if meta_path.is_file():
            meta = json.loads(meta_path.read_text())
            if meta.get("class") != "ImageTextEncoder" or meta.get("format_version") != FORMAT_VERSION:
                raise ValueError(f"{meta_path} is not an ImageTextEncoder format {FORMAT_VERSION} file")
            config = ContrastiveConfig.from_dict(meta["config"])
        else:
            config = _config_from_checkpoint(directory, hf)
        if (directory / TOKENIZER_DIR / "tokenizer.json").is_file():
            from tokenizers_mm.text import TextTokenizer

            text_tokenizer = TextTokenizer.from_pretrained(directory / TOKENIZER_DIR)
        else:
            from transformers import AutoTokenizer

            try:
                hf_tokenizer = AutoTokenizer.from_pretrained(directory)
            except Exception as err:  # noqa: BLE001 - transformers raises many kinds here
                raise ValueError(f"{str(directory)!r} has no tokenizer ({TOKENIZER_DIR}/tokenizer.json or "
                                 f"transformers tokenizer files): {err}") from err
        model = cls(config, hf, text_tokenizer=text_tokenizer, hf_tokenizer=hf_tokenizer)
        heads = directory / HEADS_NAME
        expected = {k for k in model.state_dict() if not k.startswith("hf.")}
        if expected:
            from safetensors.torch import load_file

            if not heads.is_file():
                raise FileNotFoundError(f"{heads} is missing: {CONTRASTIVE_NAME} needs {sorted(expected)[:3]}...")
            state = load_file(str(heads))
            if set(state) != expected:
                raise ValueError(f"{heads} holds {sorted(set(state) ^ expected)[:5]} that the config does not expect")
            model.load_state_dict(state, strict=False)
        model.to(map_location)
        model.eval()
        return model

    def save_pretrained(self, directory: str | Path) -> Path:
        """Write the layout in the module docstring (the CLIPModel part with transformers' save_pretrained)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.hf.save_pretrained(directory, safe_serialization=True)
        meta = {"class": "ImageTextEncoder", "format_version": FORMAT_VERSION, "config": self.config.to_dict()}
        (directory / CONTRASTIVE_NAME).write_text(json.dumps(meta, indent=2) + "\n")
        heads = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items() if not k.startswith("hf.")}
        if heads:
            save_file(heads, str(directory / HEADS_NAME), metadata={"format": "pt"})
        if self.text_tokenizer is not None:
            self.text_tokenizer.save_pretrained(directory / TOKENIZER_DIR)
        else:
            self.hf_tokenizer.save_pretrained(directory)
        return directory

    # ---- inputs
    @property
    def device(self) -> torch.device:
        return next(self.parameters()).device

    def preprocess(self, images: Any) -> torch.Tensor:
        """Images (one or a list; PIL / numpy / tensor / path) -> normalised ``(B, 3, S, S)`` float pixels."""
        from onemodel.pipeline_inputs import is_image_like, resize_rgb, to_rgb_array

        if _is_image_batch(images):
            items = list(images)
        elif is_image_like(images):
            items = [images]
        else:
            raise TypeError(f"images: expected an image (PIL, numpy array, tensor, path) or a list of them, "
                            f"got {type(images).__name__}")
        if not items:
            raise ValueError("images: the list is empty")
        size = self.config.image_size
        arrays = [resize_rgb(to_rgb_array(x, what=f"images[{i}]"), size) for i, x in enumerate(items)]
        return self.normalize(torch.from_numpy(np.stack(arrays)))

    def normalize(self, rgb: torch.Tensor) -> torch.Tensor:
        """uint8 ``(B, S, S, 3)`` -> normalised float ``(B, 3, S, S)``."""
        x = rgb.permute(0, 3, 1, 2).float().div_(255.0)
        mean = torch.tensor(self.config.image_mean).view(1, 3, 1, 1)
        std = torch.tensor(self.config.image_std).view(1, 3, 1, 1)
        return ((x - mean) / std).to(self.device)

    def tokenize(self, texts: str | Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Text(s) -> ``(input_ids, attention_mask)`` for the text tower (ids as described in the docstring)."""
        if isinstance(texts, str):
            texts = [texts]
        if not isinstance(texts, (list, tuple)) or not texts or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts: expected a string or a non-empty list of strings")
        if self.text_tokenizer is not None:
            tok = self.text_tokenizer
            ids = tok.encode(list(texts), max_length=self.config.text_max_length)
            mask = (ids != tok.pad_id).long()
            ids = ids.masked_fill(ids == tok.eos_id, self.hf.config.text_config.eos_token_id)
            longest = max(int(mask.sum(1).max()), 1)  # trailing padding cut: the causal tower never reads it
            ids, mask = ids[:, :longest], mask[:, :longest]
        else:
            padding = "max_length" if self.model_type == "siglip" else True
            enc = self.hf_tokenizer(list(texts), padding=padding, truncation=True, return_tensors="pt",
                                    max_length=self.hf.config.text_config.max_position_embeddings)
            ids = enc["input_ids"]
            mask = enc.get("attention_mask", torch.ones_like(ids))
        return ids.to(self.device), mask.to(self.device)

    # ---- tensor-level embeddings (used by training)
    def image_embeddings(self, pixel_values: torch.Tensor, return_tokens: bool = False) -> Any:
        out = self.hf.vision_model(pixel_values=pixel_values, return_dict=True)
        emb = F.normalize(self.hf.visual_projection(out.pooler_output) if hasattr(self.hf, "visual_projection")
                          else out.pooler_output, dim=-1)
        return (emb, out.last_hidden_state) if return_tokens else emb

    def text_embeddings(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        if self.model_type == "siglip":  # SigLIP was trained without a text attention mask (pads to max_length)
            out = self.hf.text_model(input_ids=input_ids, return_dict=True)
            return F.normalize(out.pooler_output, dim=-1)
        out = self.hf.text_model(input_ids=input_ids, attention_mask=attention_mask, return_dict=True)
        return F.normalize(self.hf.text_projection(out.pooler_output), dim=-1)

    def contrastive_loss(self, image_embeds: torch.Tensor, text_embeds: torch.Tensor,
                         negative_text_embeds: Optional[torch.Tensor] = None,
                         negative_valid: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The configured loss over the global batch (embeddings, and hard negatives, gathered over processes)."""
        img, txt = gather_with_grad(image_embeds), gather_with_grad(text_embeds)
        neg = valid = None
        if negative_text_embeds is not None:
            neg = gather_with_grad(negative_text_embeds)
            if negative_valid is not None:
                valid = gather_with_grad(negative_valid.to(neg.dtype)) > 0.5
        if self.config.loss == "clip":
            return clip_loss(img, txt, self.hf.logit_scale, neg, valid)
        bias = self.logit_bias if self.logit_bias is not None else self.hf.logit_bias
        return siglip_loss(img, txt, self.hf.logit_scale, bias, neg, valid)

    def forward(self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                negative_ids: Optional[torch.Tensor] = None, negative_mask: Optional[torch.Tensor] = None,
                negative_valid: Optional[torch.Tensor] = None) -> ContrastiveOutput:
        """One training step's losses for the aligned pairs (pixel_values[i], input_ids[i]).

        ``negative_ids`` / ``negative_mask`` ``(M, L')``: hard-negative texts (captions that match no image of the
        batch, e.g. one word swapped), extra wrong answers of the image->text direction; ``negative_valid``
        ``(M,)`` bool drops some of them. They go through the text tower in the same forward as the captions."""
        img, tokens = self.image_embeddings(pixel_values, return_tokens=True)
        neg = None
        if negative_ids is None:
            txt = self.text_embeddings(input_ids, attention_mask)
        else:
            n = input_ids.shape[0]
            width = max(input_ids.shape[1], negative_ids.shape[1])
            ids = torch.cat([F.pad(input_ids, (0, width - input_ids.shape[1])),
                             F.pad(negative_ids, (0, width - negative_ids.shape[1]))])
            mask = torch.cat([F.pad(attention_mask, (0, width - attention_mask.shape[1])),
                              F.pad(negative_mask, (0, width - negative_mask.shape[1]))])
            both = self.text_embeddings(ids, mask)
            txt, neg = both[:n], both[n:]
        contrastive = self.contrastive_loss(img, txt, neg, negative_valid)
        caption = None
        loss = contrastive
        if self.coca is not None:
            caption = self.coca(tokens, input_ids, attention_mask)
            loss = contrastive + self.config.coca_weight * caption
        return ContrastiveOutput(loss, contrastive, caption, img, txt)

    # ---- user API
    @torch.no_grad()
    def encode_image(self, images: Any, batch_size: int = 256) -> torch.Tensor:
        """Images -> ``(B, E)`` L2-normalised embeddings."""
        pixels = self.preprocess(images)
        return torch.cat([self.image_embeddings(pixels[i:i + batch_size]) for i in range(0, len(pixels), batch_size)])

    @torch.no_grad()
    def encode_text(self, texts: str | Sequence[str], batch_size: int = 1024) -> torch.Tensor:
        """Texts -> ``(T, E)`` L2-normalised embeddings."""
        texts = [texts] if isinstance(texts, str) else texts
        out = []
        for i in range(0, len(texts), batch_size):
            out.append(self.text_embeddings(*self.tokenize(texts[i:i + batch_size])))
        return torch.cat(out)

    @torch.no_grad()
    def similarity(self, images: Any, texts: str | Sequence[str]) -> torch.Tensor:
        """``(B, T)`` cosine similarities between images and texts."""
        return self.encode_image(images) @ self.encode_text(texts).t()

    @torch.no_grad()
    def zero_shot(self, images: Any, labels: Sequence[str], template: str = "{}") -> dict[str, Any]:
        """Classify images among ``labels`` (prompt = ``template.format(label)``, e.g. "a picture of a {}").
        Returns ``{"labels": [best label per image], "probs": (B, L) softmax over the labels}``."""
        if isinstance(labels, str) or not labels:
            raise ValueError("labels: pass a non-empty list of label strings")
        if "{}" not in template:
            raise ValueError(f"template {template!r} must contain '{{}}' where the label goes")
        sims = self.similarity(images, [template.format(label) for label in labels])
        probs = (sims * self.hf.logit_scale.exp().clamp(max=100.0)).softmax(dim=-1)
        return {"labels": [labels[i] for i in probs.argmax(dim=-1).tolist()], "probs": probs}

    @property
    def patch_grid(self) -> tuple[int, int]:
        """``(h, w)`` of the patch grid that :meth:`patch_features` returns (``image_size // patch_size`` each)."""
        side = self.config.image_size // self.config.patch_size
        return side, side

    @property
    def patch_feature_dim(self) -> int:
        """``D`` of :meth:`patch_features`: the vision tower's width."""
        return int(self.hf.config.vision_config.hidden_size)

    @torch.no_grad()
    def patch_features(self, images: Any, layer: int | None = None) -> torch.Tensor:
        """Frozen per-patch image features: ``(B, h*w, D)`` with ``(h, w) = patch_grid`` in row-major order
        (token ``r * w + c`` is the patch at row ``r``, column ``c``) and ``D = patch_feature_dim``.

        ``images``: one image or a list (PIL / numpy / tensor / path), or already normalised pixels ``(B, 3, S, S)``
        float. ``layer``: vision hidden state (default ``config.patch_feature_layer``; -1 = last layer before the
        pooling norm, -2 = penultimate as in LLaVA, 0 = the patch embeddings). The CLS token (CLIP) is dropped.
        Computed without gradients and in eval mode (the module's training flag is restored), so the result is
        a constant input for another model: deterministic and detached."""
        if isinstance(images, torch.Tensor) and images.ndim == 4 and images.dtype.is_floating_point \
                and images.shape[1] == 3 and images.shape[-1] == self.config.image_size:
            pixels = images.to(self.device)
        else:
            pixels = self.preprocess(images)
        layer = self.config.patch_feature_layer if layer is None else int(layer)
        depth = int(self.hf.config.vision_config.num_hidden_layers)
        if not -depth - 1 <= layer <= depth:
            raise ValueError(f"layer {layer} is out of range: the vision tower has {depth} layers "
                             f"(0 = patch embeddings, -1 = last)")
        was_training = self.hf.vision_model.training
        self.hf.vision_model.eval()
        try:
            out = self.hf.vision_model(pixel_values=pixels, output_hidden_states=layer != -1, return_dict=True)
        finally:
            self.hf.vision_model.train(was_training)
        hidden = out.last_hidden_state if layer == -1 else out.hidden_states[layer]
        h, w = self.patch_grid
        if hidden.shape[1] == h * w + 1:  # CLIP's class token comes first
            hidden = hidden[:, 1:]
        if hidden.shape[1] != h * w:
            raise ValueError(f"the vision tower returned {hidden.shape[1]} tokens, not the {h}x{w} patch grid")
        return hidden.detach()

    def image_patch_features(self, images: Any, layer: int | None = None) -> torch.Tensor:
        """Same as :meth:`patch_features` (the name the vision-language model code uses)."""
        return self.patch_features(images, layer)

    def num_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def _config_from_checkpoint(directory: Path, hf: Any) -> ContrastiveConfig:
    """A ContrastiveConfig describing a plain transformers checkpoint (sizes from its config,
    preprocessing from ``preprocessor_config.json`` when present)."""
    vc, tc = hf.config.vision_config, hf.config.text_config
    data: dict[str, Any] = {
        "loss": "siglip" if hf.config.model_type == "siglip" else "clip",
        "image_size": vc.image_size, "patch_size": vc.patch_size, "vision_width": vc.hidden_size,
        "vision_layers": vc.num_hidden_layers, "vision_heads": vc.num_attention_heads,
        "text_width": tc.hidden_size, "text_layers": tc.num_hidden_layers, "text_heads": tc.num_attention_heads,
        "text_max_length": tc.max_position_embeddings, "vocab_size": tc.vocab_size,
        "embed_dim": getattr(hf.config, "projection_dim", None) or vc.hidden_size,
        "hidden_act": str(vc.hidden_act),
    }
    pre = directory / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        if "image_mean" in p and "image_std" in p:
            data["image_mean"], data["image_std"] = list(p["image_mean"]), list(p["image_std"])
    if hf.config.model_type == "siglip" and not pre.is_file():
        data["image_mean"], data["image_std"] = [0.5] * 3, [0.5] * 3
    return ContrastiveConfig.from_dict(data)
