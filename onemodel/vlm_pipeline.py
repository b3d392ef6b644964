"""``VLMPipeline``: a trained VLM (``onemodel.vlm``) behind the same user API as ``OneModelPipeline``.

    from onemodel.pipeline import OneModelPipeline
    pipe = OneModelPipeline.from_pretrained("runs/vlm_shapes")      # detects a VLM run -> VLMPipeline
    pipe.caption("scene.png")                                       # -> "a small red circle ..."
    pipe.answer("scene.png", "what color is the circle?")           # -> "red"

Images as everywhere in the pipeline (PIL, numpy, tensor, path); one value gives one result, a list a list.
Text comes from the LM's own KV-cached ``generate``: greedy by default; ``temperature``, ``top_k``, ``top_p``,
``seed`` sample; ``max_length`` caps the new tokens. The grid-decoding keywords of the one model (``steps``,
``schedule``, ``guidance_scale``) do not apply to a VLM and are refused.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onemodel.pipeline_inputs import is_image_like, resize_rgb, to_rgb_array

__all__ = ["VLMPipeline"]

logger = logging.getLogger(__name__)

_NOT_FOR_VLM = ("steps", "schedule", "guidance_scale", "per_target", "return_tokens")


class VLMPipeline:
    """A ``VLM`` with pixel/string in, string out methods: ``caption`` and ``answer``."""

    #: the modalities a VLM reads and writes (``training.evaluation`` uses this to pick tasks)
    modalities = ("rgb", "caption", "question", "answer")
    #: the evaluation tasks it can do (``training.evaluation.evaluate.available_tasks``)
    tasks = ("caption", "vqa")
    tokenizers = None

    def __init__(self, model: Any, device: str | torch.device | None = None) -> None:
        from onemodel.vlm import VLM

        if not isinstance(model, VLM):
            raise TypeError(f"model must be a onemodel.vlm.VLM, got {type(model).__name__}")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model = model.to(self.device).eval()

    @classmethod
    def from_pretrained(cls, path: str | Path, device: str | torch.device | None = None) -> "VLMPipeline":
        """Load a ``onemodel train-vlm`` run directory (or its ``model/``)."""
        from onemodel.vlm import VLM

        model = VLM.from_pretrained(path)
        logger.info("loaded VLM from %s (%s mapper, %s)", path, model.config.mapper.kind, model.config.injection)
        return cls(model, device=device)

    # ------------------------------------------------------------------------------------------ helpers
    def _pixels(self, images: list[Any]) -> torch.Tensor:
        size = self.model.vision.image_size
        arrays = [resize_rgb(to_rgb_array(x, what=f"image {i}"), size) for i, x in enumerate(images)]
        return torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).float().div_(255.0).to(self.device)

    @staticmethod
    def _as_list(x: Any, what: str) -> tuple[list[Any], bool]:
        if is_image_like(x) or isinstance(x, str):
            return [x], True
        if isinstance(x, (list, tuple)):
            if not x:
                raise ValueError(f"{what}: the list is empty")
            return list(x), False
        raise TypeError(f"{what}: expected an image (PIL, numpy array, tensor, path) or a list of them, got "
                        f"{type(x).__name__}")

    def _generate(self, images: list[Any], prompts: list[str], batch_size: int = 16, max_length: int | None = None,
                  temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0, seed: int | None = None,
                  progress: bool = False, truncate: bool = False, **kwargs: Any) -> list[str]:
        # truncate: accepted for parity with OneModelPipeline (onemodel eval passes it); a VLM prompt has no
        # per-modality max_length to cut to (the LM's context is the only limit), so it changes nothing here
        bad = [k for k in kwargs if k in _NOT_FOR_VLM and kwargs[k] is not None]
        unknown = [k for k in kwargs if k not in _NOT_FOR_VLM]
        if bad or unknown:
            raise ValueError(f"{', '.join(bad + unknown)}: not an option of a VLM pipeline (it takes max_length, "
                             "temperature, top_k, top_p, seed, batch_size, truncate)")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if seed is not None:
            torch.manual_seed(seed)
        out: list[str] = []
        for i in range(0, len(images), batch_size):
            pixels = self._pixels(images[i:i + batch_size])
            out.extend(self.model.generate(pixels, prompts[i:i + batch_size], max_new_tokens=max_length,
                                           temperature=temperature, top_k=top_k, top_p=top_p))
        return out

    # ------------------------------------------------------------------------------------------ tasks
    def caption(self, images: Any, **kwargs: Any) -> str | list[str]:
        """Caption one image (-> str) or a list (-> list of str)."""
        items, single = self._as_list(images, "images")
        out = self._generate(items, [self.model.config.caption_prompt] * len(items), **kwargs)
        return out[0] if single else out

    def answer(self, images: Any, questions: str | list[str], **kwargs: Any) -> str | list[str]:
        """Answer ``questions`` about ``images``: one of each, a list of each (same length), or one image and a
        list of questions (or the reverse)."""
        imgs, single_img = self._as_list(images, "images")
        if isinstance(questions, str):
            qs, single_q = [questions], True
        elif isinstance(questions, (list, tuple)) and all(isinstance(q, str) for q in questions) and questions:
            qs, single_q = list(questions), False
        else:
            raise TypeError("questions: expected a string or a non-empty list of strings")
        for i, q in enumerate(qs):
            if not q.strip():
                raise ValueError(f"question {i} is empty; ask something, e.g. 'what color is the circle?'")
        if len(imgs) == 1 and len(qs) > 1:
            imgs = imgs * len(qs)
        elif len(qs) == 1 and len(imgs) > 1:
            qs = qs * len(imgs)
        if len(imgs) != len(qs):
            raise ValueError(f"{len(imgs)} images but {len(qs)} questions: give one of each, or lists of equal length")
        prompts = [self.model.config.question_prompt.format(question=q) for q in qs]
        out = self._generate(imgs, prompts, **kwargs)
        return out[0] if single_img and single_q else out
