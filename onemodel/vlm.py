"""The VLM: a frozen vision encoder and a frozen causal language model joined by a small trained mapper.

    image -> vision encoder (frozen) -> patch features (B, P, Dv) -> mapper (trained) -> visual tokens (B, T, Dlm)
    prompt -> causal LM (frozen; optional LoRA through peft) -> text, with the LM's own KV-cached ``generate``

Two ways in (``VLMConfig.injection``):

- ``prefix`` (LLaVA, AnyMAL, DePALM): the visual tokens replace the ``<image>`` place of the prompt, between the
  text embeddings; the LM attends to them like to words.
- ``xattn`` (Flamingo): gated cross-attention layers run before every ``xattn_every``-th LM block (forward
  pre-hooks on the LM's own blocks, so the LM module is untouched): ``h += tanh(a) * attn(norm(h), visual)``,
  ``h += tanh(f) * ffn(norm(h))`` with the gates ``a, f`` initialised at 0, so at the start the LM computes exactly
  what it computed alone. The ``<image>`` marker is dropped from the prompt.

Training signal: next-token cross-entropy on the target text only (caption or answer + the LM's eos). Everything
of the backbones is frozen (``requires_grad=False``, eval mode); only the mapper, the gated layers and the LoRA
adapters train, and only they are saved (``trained.safetensors``); ``config.json`` references the backbones by path.

    vlm = VLM(VLMConfig(lm_path="runs/vlm/lm", vision=VisionSpec("hf", "runs/vlm/clip_vision"),
                        mapper=MapperConfig("summary", num_tokens=4)))
    loss = vlm(pixels, ["<image> caption:"], ["a red circle."]).loss
    vlm.generate(pixels, ["<image> question: what color is the circle? answer:"])   # -> ["red"]
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from onemodel.config import from_dict, to_dict
from onemodel.mappers import MapperConfig, build_mapper
from onemodel.vision_backbones import VisionSpec, load_vision_backbone

__all__ = ["VLM", "VLMConfig", "LoraSpec", "VLMOutput", "GatedCrossAttention", "is_vlm_dir", "find_vlm_dir",
           "VLM_CLASS", "TRAINED_NAME"]

logger = logging.getLogger(__name__)

VLM_CLASS = "VLM"
CONFIG_NAME = "config.json"
TRAINED_NAME = "trained.safetensors"
FORMAT_VERSION = 1


@dataclass
class LoraSpec:
    """LoRA adapters on the LM (peft): rank ``r``, scale ``alpha``; ``target_modules`` null = peft's default for
    the LM's architecture (``q_proj``/``v_proj`` for Llama, ``c_attn`` for GPT-2)."""

    r: int = 8
    alpha: int = 16
    dropout: float = 0.0
    target_modules: Optional[list[str]] = None

    def __post_init__(self) -> None:
        if self.r < 1:
            raise ValueError(f"lora.r must be >= 1, got {self.r}")


@dataclass
class VLMConfig:
    """``lm_path``: a local Hugging Face causal-LM directory with its tokenizer; ``vision``: the frozen encoder;
    ``mapper``: the trained bridge; ``injection``: ``prefix`` | ``xattn``; ``lora``: adapters on the LM or null.
    Prompts hold one ``image_token`` place (prefix injection)."""

    lm_path: str = ""
    vision: VisionSpec = field(default_factory=VisionSpec)
    mapper: MapperConfig = field(default_factory=MapperConfig)
    injection: Literal["prefix", "xattn"] = "prefix"
    xattn_every: int = 1
    xattn_heads: int = 4
    lora: Optional[LoraSpec] = None
    image_token: str = "<image>"
    caption_prompt: str = "<image> caption:"
    question_prompt: str = "<image> question: {question} answer:"
    max_new_tokens: int = 40

    def __post_init__(self) -> None:
        if not self.lm_path:
            raise ValueError("lm_path is empty: give the directory of a Hugging Face causal LM (save_pretrained)")
        if self.xattn_every < 1:
            raise ValueError(f"xattn_every must be >= 1, got {self.xattn_every}")
        if self.mapper.kind == "patches" and self.vision.kind != "none":
            raise ValueError("mapper.kind='patches' (Fuyu) projects raw pixels: set vision.kind='none'")
        if self.vision.kind == "none" and self.mapper.kind != "patches":
            raise ValueError(f"vision.kind='none' gives raw pixel patches: use mapper.kind='patches', not "
                             f"{self.mapper.kind!r}")
        for name in ("caption_prompt", "question_prompt"):
            if self.injection == "prefix" and getattr(self, name).count(self.image_token) != 1:
                raise ValueError(f"{name} {getattr(self, name)!r} must hold the image place {self.image_token!r} "
                                 "exactly once")
        if "{question}" not in self.question_prompt:
            raise ValueError(f"question_prompt {self.question_prompt!r} needs a {{question}} place")

    def to_dict(self) -> dict[str, Any]:
        return to_dict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "VLMConfig":
        return from_dict(cls, data)


@dataclass
class VLMOutput:
    loss: torch.Tensor
    logits: torch.Tensor
    num_target_tokens: int


class GatedCrossAttention(nn.Module):
    """Flamingo's gated cross-attention block: text states attend to the visual tokens; tanh gates start at 0."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.ff = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))
        self.attn_gate = nn.Parameter(torch.zeros(1))
        self.ff_gate = nn.Parameter(torch.zeros(1))

    def forward(self, h: torch.Tensor, visual: torch.Tensor) -> torch.Tensor:  # (B, N, D), (B, T, D)
        v = visual.to(h.dtype)
        h = h + torch.tanh(self.attn_gate).to(h.dtype) * self.attn(self.norm(h), v, v, need_weights=False)[0]
        return h + torch.tanh(self.ff_gate).to(h.dtype) * self.ff(h)


def _decoder_layers(lm: nn.Module) -> nn.ModuleList:
    """The LM's list of transformer blocks (Llama ``model.layers``, GPT-2 ``transformer.h``, OPT ...)."""
    cfg = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    n = getattr(cfg, "num_hidden_layers", None) or getattr(cfg, "n_layer", None)
    for _, module in lm.named_modules():
        if isinstance(module, nn.ModuleList) and len(module) == n:
            return module
    raise ValueError(f"could not find the {n} transformer blocks of {type(lm).__name__} for injection='xattn'; "
                     "use injection='prefix'")


def _resolve(path: str, base: Path | None) -> str:
    """A backbone path as saved: relative paths are tried against the model directory first."""
    p = Path(path)
    if not p.is_absolute() and base is not None:
        joined = Path(os.path.normpath(base / p))
        if joined.exists():
            return str(joined)
    return str(p)


class VLM(nn.Module):
    """Frozen vision encoder + trained mapper (+ gated cross-attention) + frozen causal LM (+ LoRA)."""

    def __init__(self, config: VLMConfig, base_dir: str | Path | None = None) -> None:
        super().__init__()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        if not isinstance(config, VLMConfig):
            raise TypeError(f"VLM needs a VLMConfig, got {type(config).__name__}")
        self.config = config
        base = Path(base_dir) if base_dir is not None else None
        lm_path = Path(_resolve(config.lm_path, base))
        if not (lm_path / "config.json").is_file():
            raise FileNotFoundError(f"lm_path {str(lm_path)!r} holds no config.json: give a directory written by a "
                                    "causal LM's save_pretrained")
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(lm_path)
        except (OSError, ValueError, TypeError, KeyError) as err:
            raise ValueError(f"the LM directory {str(lm_path)!r} has no usable tokenizer ({type(err).__name__}): save "
                             "the LM's tokenizer there too (tokenizer.save_pretrained(dir))") from None
        if isinstance(self.tokenizer, bool) or not hasattr(self.tokenizer, "encode"):
            raise ValueError(f"the LM directory {str(lm_path)!r} has no usable tokenizer: save one there")
        lm = AutoModelForCausalLM.from_pretrained(lm_path)
        lm.requires_grad_(False)
        lm.eval()
        vision_spec = VisionSpec(**{**config.vision.to_dict(), "path": _resolve(config.vision.path, base)
                                    if config.vision.path else None})
        self.vision = load_vision_backbone(vision_spec)
        emb = lm.get_input_embeddings()
        dim = emb.embedding_dim
        self.mapper = build_mapper(config.mapper, self.vision.feature_dim, dim, out_std=float(emb.weight.std()))
        self.xattn = None
        self._visual: torch.Tensor | None = None  # the visual tokens the gated layers attend to (xattn)
        if config.injection == "xattn":
            layers = _decoder_layers(lm)
            picked = list(range(0, len(layers), config.xattn_every))
            self.xattn = nn.ModuleDict({str(i): GatedCrossAttention(dim, config.xattn_heads) for i in picked})
            for i in picked:
                layers[i].register_forward_pre_hook(self._make_hook(str(i)), with_kwargs=True)
        if config.lora is not None:
            try:
                from peft import LoraConfig, get_peft_model
            except ImportError:
                raise ValueError("model.lora needs the peft package: pip install 'onemodel[vlm]' (or pip install "
                                 "peft), or set lora to null") from None

            lora = LoraConfig(r=config.lora.r, lora_alpha=config.lora.alpha, lora_dropout=config.lora.dropout,
                              target_modules=config.lora.target_modules)
            lm = get_peft_model(lm, lora)
        self.lm = lm
        self.dim = dim
        tok = self.tokenizer
        self.eos_id = tok.eos_token_id
        if self.eos_id is None:
            raise ValueError(f"the tokenizer in {str(lm_path)!r} has no eos token: set tokenizer.eos_token")
        self.bos_id = tok.bos_token_id
        self.pad_id = tok.pad_token_id if tok.pad_token_id is not None else self.eos_id

    # ------------------------------------------------------------------------------------------ parameters
    def train(self, mode: bool = True) -> "VLM":
        super().train(mode)
        self.vision.eval()
        self.lm.eval()  # frozen LM: no dropout (LoRA dropout, if any, is off too)
        return self

    def trained_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if p.requires_grad}

    def backbone_parameters(self) -> dict[str, nn.Parameter]:
        return {n: p for n, p in self.named_parameters() if not p.requires_grad}

    def num_visual_tokens(self) -> int:
        """Visual tokens per image the LM sees (in its sequence for prefix, as cross-attention keys for xattn)."""
        return self.mapper.num_tokens(self.vision.num_patches)

    # ------------------------------------------------------------------------------------------ hooks
    def _make_hook(self, key: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict):
            if self._visual is None:
                return None
            block = self.xattn[key]
            if args:
                return (block(args[0], self._visual),) + tuple(args[1:]), kwargs
            kwargs = dict(kwargs)
            kwargs["hidden_states"] = block(kwargs["hidden_states"], self._visual)
            return args, kwargs

        return hook

    # ------------------------------------------------------------------------------------------ inputs
    def image_features(self, pixels: torch.Tensor) -> torch.Tensor:
        """Frozen vision encoder: ``(B, 3, S, S)`` in [0, 1] -> ``(B, P, Dv)`` (no gradients)."""
        with torch.no_grad():
            return self.vision(pixels)

    def _text_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False) if text.strip() else []

    def _split_prompt(self, prompt: str) -> tuple[list[int], list[int]]:
        """Token ids before and after the image place (bos first when the tokenizer has one)."""
        tok = self.config.image_token
        if not isinstance(prompt, str):
            raise TypeError(f"prompts must be strings, got {type(prompt).__name__}")
        if self.config.injection == "prefix":
            if prompt.count(tok) != 1:
                raise ValueError(f"the prompt {prompt!r} must hold the image place {tok!r} exactly once (prefix "
                                 f"injection puts the visual tokens there), e.g. '{tok} caption:'")
            before, after = prompt.split(tok)
        else:
            before, after = prompt.replace(tok, " "), ""
        head = [self.bos_id] if self.bos_id is not None else []
        return head + self._text_ids(before), self._text_ids(after)

    def build_inputs(self, visual: torch.Tensor, prompts: list[str], targets: list[str] | None = None,
                     left_pad: bool = False) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """LM inputs for a batch: ``(inputs_embeds (B, L, D), attention_mask (B, L), labels (B, L))``.

        prefix: ``[bos] before <visual x T> after [target eos]``; xattn: the same without the visual slots. Labels
        are -100 except on the target tokens. ``left_pad`` for generation (prompts end at the same place)."""
        if len(prompts) != visual.shape[0]:
            raise ValueError(f"{len(prompts)} prompts for {visual.shape[0]} images")
        if targets is not None and len(targets) != len(prompts):
            raise ValueError(f"{len(targets)} targets for {len(prompts)} prompts")
        n_vis = visual.shape[1] if self.config.injection == "prefix" else 0
        rows = []
        for i, prompt in enumerate(prompts):
            before, after = self._split_prompt(prompt)
            target = [] if targets is None else self._text_ids(" " + targets[i]) + [self.eos_id]
            ids = before + [self.pad_id] * n_vis + after + target
            is_vis = [False] * len(before) + [True] * n_vis + [False] * (len(after) + len(target))
            labels = [-100] * (len(ids) - len(target)) + target
            rows.append((ids, is_vis, labels))
        length = max(len(r[0]) for r in rows)
        B = len(rows)
        ids = torch.full((B, length), self.pad_id, dtype=torch.long)
        is_vis = torch.zeros(B, length, dtype=torch.bool)
        labels = torch.full((B, length), -100, dtype=torch.long)
        mask = torch.zeros(B, length, dtype=torch.long)
        for i, (r_ids, r_vis, r_lab) in enumerate(rows):
            n = len(r_ids)
            sl = slice(length - n, length) if left_pad else slice(0, n)
            ids[i, sl] = torch.tensor(r_ids)
            is_vis[i, sl] = torch.tensor(r_vis)
            labels[i, sl] = torch.tensor(r_lab)
            mask[i, sl] = 1
        device = visual.device
        embeds = self.lm.get_input_embeddings()(ids.to(device))
        if n_vis:
            embeds = embeds.masked_scatter(is_vis.to(device)[..., None], visual.to(embeds.dtype))
        return embeds, mask.to(device), labels.to(device)

    # ------------------------------------------------------------------------------------------ forward
    def forward(self, pixels: torch.Tensor | None, prompts: list[str], targets: list[str],
                features: torch.Tensor | None = None) -> VLMOutput:
        """Loss of generating ``targets`` after ``prompts`` about the images (``pixels`` (B, 3, S, S) in [0, 1], or
        precomputed vision ``features`` (B, P, Dv))."""
        if features is None:
            if pixels is None:
                raise ValueError("give pixels or features")
            features = self.image_features(pixels)
        visual = self.mapper(features)
        embeds, mask, labels = self.build_inputs(visual, list(prompts), list(targets))
        self._visual = visual if self.xattn is not None else None
        try:
            logits = self.lm(inputs_embeds=embeds, attention_mask=mask, use_cache=False).logits
        finally:
            self._visual = None
        shift_logits, shift_labels = logits[:, :-1].float(), labels[:, 1:]
        loss = F.cross_entropy(shift_logits.reshape(-1, shift_logits.shape[-1]), shift_labels.reshape(-1),
                               ignore_index=-100)
        return VLMOutput(loss=loss, logits=logits, num_target_tokens=int((shift_labels != -100).sum()))

    @torch.no_grad()
    def generate(self, pixels: torch.Tensor | None, prompts: list[str], max_new_tokens: int | None = None,
                 features: torch.Tensor | None = None, use_cache: bool = True, temperature: float = 0.0,
                 top_k: int = 0, top_p: float = 1.0) -> list[str]:
        """Text after each prompt, with the LM's own ``generate`` (greedy unless ``temperature > 0``)."""
        if features is None:
            features = self.image_features(pixels)
        visual = self.mapper(features)
        embeds, mask, _ = self.build_inputs(visual, list(prompts), None, left_pad=True)
        kwargs: dict[str, Any] = {"do_sample": False}
        if temperature > 0:
            kwargs = {"do_sample": True, "temperature": temperature, "top_k": top_k or None, "top_p": top_p}
        self._visual = visual if self.xattn is not None else None
        try:
            out = self.lm.generate(inputs_embeds=embeds, attention_mask=mask,
                                   max_new_tokens=max_new_tokens or self.config.max_new_tokens,
                                   eos_token_id=self.eos_id, pad_token_id=self.pad_id, use_cache=use_cache, **kwargs)
        finally:
            self._visual = None
        return [t.strip() for t in self.tokenizer.batch_decode(out, skip_special_tokens=True)]

    # ------------------------------------------------------------------------------------------ save / load
    def save_pretrained(self, directory: str | Path) -> Path:
        """``config.json`` + ``trained.safetensors`` (only the trained parameters)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        config = {"class": VLM_CLASS, "format_version": FORMAT_VERSION, **self.config.to_dict()}
        (directory / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n")
        tensors = {k: v.detach().cpu().contiguous() for k, v in self.trained_parameters().items()}
        save_file(tensors, str(directory / TRAINED_NAME), metadata={"format": "pt", "class": VLM_CLASS})
        return directory

    def load_trained(self, tensors: dict[str, torch.Tensor], allow_missing: tuple[str, ...] = ()) -> None:
        """Load trained parameters; every trained parameter must be given (except names containing one of
        ``allow_missing``, e.g. ``"lora_"`` when stage 2 adds adapters), and nothing else."""
        own = self.trained_parameters()
        missing = [k for k in own if k not in tensors and not any(s in k for s in allow_missing)]
        unexpected = [k for k in tensors if k not in own]
        if missing or unexpected:
            raise ValueError(f"trained weights do not match this VLM config: missing {missing[:5]}, unexpected "
                             f"{unexpected[:5]}")
        with torch.no_grad():
            for k, t in tensors.items():
                if tuple(t.shape) != tuple(own[k].shape):
                    raise ValueError(f"trained tensor {k!r} has shape {tuple(t.shape)}, the config builds "
                                     f"{tuple(own[k].shape)}")
                own[k].copy_(t)

    @classmethod
    def from_pretrained(cls, directory: str | Path) -> "VLM":
        from safetensors.torch import load_file

        directory = find_vlm_dir(directory)
        data = json.loads((directory / CONFIG_NAME).read_text())
        data.pop("class"), data.pop("format_version", None)
        model = cls(VLMConfig.from_dict(data), base_dir=directory)
        weights = directory / TRAINED_NAME
        if not weights.is_file():
            raise FileNotFoundError(f"{weights} not found: VLM.save_pretrained writes {TRAINED_NAME}")
        model.load_trained(load_file(str(weights)))
        return model.eval()


def _vlm_config_file(path: Path) -> Path | None:
    for cand in (path, path / "model"):
        f = cand / CONFIG_NAME
        if f.is_file():
            try:
                if json.loads(f.read_text()).get("class") == VLM_CLASS:
                    return f
            except (json.JSONDecodeError, AttributeError):
                return None
    return None


def is_vlm_dir(path: str | Path) -> bool:
    """True when ``path`` (a run directory or its ``model/``) holds a VLM written by ``VLM.save_pretrained``."""
    return _vlm_config_file(Path(path)) is not None


def find_vlm_dir(path: str | Path) -> Path:
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    f = _vlm_config_file(path)
    if f is None:
        raise ValueError(f"{str(path)!r} holds no VLM (config.json with class 'VLM'): pass the out_dir of "
                         "'onemodel train-vlm' or its model/ directory")
    return f.parent
