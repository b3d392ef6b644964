"""The Python API: ``OneModelPipeline`` = a trained ``OneModel`` + its tokenizers, working on pixels and strings.

    from onemodel.pipeline import OneModelPipeline

    pipe = OneModelPipeline.from_pretrained("runs/shapes")        # a training run directory (or its model/)
    pipe.caption("scene.png")                                     # -> "a small red circle left of a blue square"
    pipe.answer("scene.png", "what color is the circle?")         # -> "red"
    depth = pipe.depth("scene.png")                               # -> float32 (H, W) metres, the image's size
    out = pipe.generate({"caption": "a red circle"}, ["semseg", "rgb"])   # -> {"semseg": ..., "rgb": PIL.Image}

Inputs: images as PIL images, numpy arrays (``(H, W, 3)`` uint8, or float in [0, 1]), torch tensors
(``(C, H, W)`` or ``(H, W, C)``), or file paths; text as strings. One value gives one result, a list gives a list
(single values next to a list are repeated for every item). Images are resized to the tokenizer's size and dense
outputs (depth, semseg) resized back to each input image's size (see ``onemodel.pipeline_inputs``).

Outputs by modality: ``rgb`` -> ``PIL.Image``; ``depth`` -> ``float32 (H, W)`` metres; ``semseg`` -> ``int (H, W)``
class ids; ``caption`` / ``question`` / ``answer`` -> ``str``; ``det`` -> ``[{"box": [x0, y0, x1, y1], "label": str,
"score": float}]`` in pixels of the input image (score: geometric mean of the probabilities of the box's tokens).
``return_tokens=True`` returns token ids instead (``{modality: LongTensor}`` per sample).

Sampling keywords (every method): ``steps`` (grid decoding steps, default 8), ``schedule`` ("maskgit" |
"random"), ``choice_temperature`` (MaskGIT: Gumbel noise on which positions to keep, annealed to 0; default 0
except rgb: 2.0), ``temperature`` (0 = greedy; default 0 except rgb: 1.0), ``top_k`` (0 = off), ``top_p`` (in (0, 1]),
``guidance_scale`` (1 = off; default 1 except ``text_to_image``: 3.0), ``seed`` (sample i of a list uses
``seed + i``), ``max_length`` (sequence targets), ``per_target`` ({modality: {keyword: value}} overrides),
``batch_size`` (samples per forward pass, default 16), ``progress`` (tqdm bars).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from onemodel.generation import generate as generate_tokens
from onemodel.pixel_inputs import patchify
from onemodel.pipeline_inputs import (
    describe,
    is_image_like,
    resize_depth,
    resize_rgb,
    resize_semseg,
    to_depth_array,
    to_rgb_array,
    to_semseg_array,
)
from onemodel.sampling import AutoregressiveSchedule, MaskGITSchedule, RandomOrderSchedule, SamplingOptions

logger = logging.getLogger(__name__)

__all__ = ["OneModelPipeline", "SAMPLING_KEYS"]

SAMPLING_KEYS = ("steps", "schedule", "temperature", "top_k", "top_p", "guidance_scale", "max_length",
                 "choice_temperature")
# rgb is sampled at temperature 1 (lower temperatures collapse to background), by MaskGIT with Gumbel noise on the
# choice of positions (choice_temperature 2, annealed to 0): judged text->image 0.20 vs 0.14 without it on the long
# preset's model, 0.04 vs 0.02 on the demo's, with the same count accuracy. Random order scores higher on the judge's
# recall but draws too many objects (count accuracy 0.00; docs/recipe.md, "Text->image sampling").
_GRID_DEFAULTS = {"rgb": {"temperature": 1.0, "choice_temperature": 2.0}}


def _find_model_dir(path: Path) -> Path:
    if not path.exists():
        raise FileNotFoundError(f"model directory {str(path)!r} does not exist")
    for cand in (path, path / "model"):
        if (cand / "config.json").is_file() and (cand / "model.safetensors").is_file():
            return cand
    raise ValueError(
        f"{str(path)!r} is neither a trained run directory (with model/) nor a model directory (config.json + "
        "model.safetensors); pass the --out directory of 'onemodel train' or a directory written by save_pretrained()"
    )


def _check_mapping(inputs: Any) -> None:
    if not isinstance(inputs, Mapping):
        raise TypeError(f"inputs must be a dict {{modality: value}}, e.g. {{'rgb': image}}, got {describe(inputs)}")


class OneModelPipeline:
    """A ``OneModel`` with its ``TokenizerBundle``; every method takes and returns user-level values."""

    def __init__(self, model, tokenizers, device: str | torch.device | None = None) -> None:
        from onemodel.model import OneModel

        if not isinstance(model, OneModel):
            raise TypeError(f"model must be a onemodel.model.OneModel, got {type(model).__name__}")
        if device is None:
            device = "cuda" if torch.cuda.is_available() else next(model.parameters()).device
        self.device = torch.device(device)
        self.model = model.to(self.device).eval()
        self.tokenizers = tokenizers
        self.modalities = {m.name: m for m in model.config.modalities}
        self._check_tokenizers()
        for name in {m.tokenizer for m in self.modalities.values()}:
            tok = tokenizers[name]
            if isinstance(tok, torch.nn.Module):  # VQ tokenizers run on the pipeline's device too
                tok.to(self.device)

    # ------------------------------------------------------------------------------------------ loading
    @classmethod
    def from_pretrained(
        cls, path: str | Path, device: str | torch.device | None = None, tokenizers=None
    ) -> "OneModelPipeline":
        """Load from a training run directory (``out_dir`` of ``onemodel train``) or its ``model/`` directory.

        A VLM run (``onemodel train-vlm``) gives a ``onemodel.vlm_pipeline.VLMPipeline`` with the same ``caption`` /
        ``answer`` methods. The model directory holds ``config.json`` + ``model.safetensors`` and a ``tokenizers/`` bundle; a model
        directory without ``tokenizers/`` raises ``ValueError`` unless ``tokenizers`` (a ``TokenizerBundle`` or the
        path of one) is passed.
        """
        from onemodel.model import OneModel
        from onemodel.vlm import is_vlm_dir
        from tokenizers_mm.bundle import TokenizerBundle

        if is_vlm_dir(path):  # a vision-encoder + language-model run: same methods, see onemodel.vlm_pipeline
            from onemodel.vlm_pipeline import VLMPipeline

            return VLMPipeline.from_pretrained(path, device=device)
        model_dir = _find_model_dir(Path(path))
        if tokenizers is None:
            tok_dir = model_dir / "tokenizers"
            if not tok_dir.is_dir():
                raise ValueError(
                    f"{str(model_dir)!r} has no tokenizers/ directory; copy the tokenizer bundle the model was trained "
                    f"with into {str(tok_dir)!r}, or pass tokenizers=TokenizerBundle.from_pretrained(BUNDLE_DIR)"
                )
            tokenizers = TokenizerBundle.from_pretrained(tok_dir)
        elif isinstance(tokenizers, (str, Path)):
            tokenizers = TokenizerBundle.from_pretrained(tokenizers)
        model = OneModel.from_pretrained(model_dir)
        logger.info("loaded OneModel from %s (%s)", model_dir, ", ".join(m.name for m in model.config.modalities))
        return cls(model, tokenizers, device=device)

    def _tokenizer(self, modality: str):
        name = self.modalities[modality].tokenizer
        try:
            return self.tokenizers[name]
        except KeyError:
            raise ValueError(
                f"the tokenizer bundle has no {name!r} tokenizer, needed by modality {modality!r}; copy the {name}/ "
                "tokenizer the model was trained with into the model's tokenizers/ directory, or pass "
                "tokenizers=TokenizerBundle.from_pretrained(BUNDLE_DIR)"
            ) from None

    def _check_tokenizers(self) -> None:
        for name, mod in self.modalities.items():
            tok = self._tokenizer(name)
            if tok.vocab_size > mod.vocab_size:
                raise ValueError(
                    f"tokenizer {mod.tokenizer!r} has {tok.vocab_size} tokens but the model's {name!r} vocabulary has "
                    f"{mod.vocab_size}: the tokenizers do not belong to this model"
                )
            if mod.is_grid and getattr(tok, "grid_size", mod.grid_size) != mod.grid_size:
                raise ValueError(
                    f"tokenizer {mod.tokenizer!r} makes {tok.grid_size}x{tok.grid_size} grids but the model expects "
                    f"{mod.grid_size}x{mod.grid_size} for {name!r}"
                )

    @property
    def text_tokenizer(self):
        seqs = [n for n, m in self.modalities.items() if m.is_sequence]
        if not seqs:
            raise ValueError("this model has no text modality")
        return self._tokenizer(seqs[0])

    @property
    def image_size(self) -> int:
        """Side (pixels) of the images the rgb tokenizer works on."""
        grids = [n for n, m in self.modalities.items() if m.is_grid]
        name = "rgb" if "rgb" in grids else grids[0]
        return int(self._tokenizer(name).image_size)

    def load_image(self, image: Any) -> np.ndarray:
        """One image in any accepted form -> ``uint8 (H, W, 3)`` at its original size."""
        return to_rgb_array(image)

    # ------------------------------------------------------------------------------------------ inputs
    def _broadcast(self, inputs: Mapping[str, Any]) -> tuple[dict[str, list], int, bool]:
        """Per modality a list of per-sample values; the batch size; whether the caller passed lists."""
        _check_mapping(inputs)
        sizes, listed = set(), False
        for name, value in inputs.items():
            if self._is_batch(name, value):
                listed = True
                sizes.add(len(value))
        if len(sizes) > 1:
            raise ValueError(f"input lists have different lengths {sorted(sizes)}; give one value per sample")
        n = sizes.pop() if sizes else 1
        if n == 0:
            raise ValueError("empty input list; pass at least one value")
        out = {name: (list(value) if self._is_batch(name, value) else [value] * n) for name, value in inputs.items()}
        return out, n, listed

    def _is_batch(self, name: str, value: Any) -> bool:
        mod = self.modalities.get(name)
        if name == "det":  # one sample = a list of box dicts; a batch = a list of such lists
            return isinstance(value, (list, tuple)) and len(value) > 0 and all(
                v is None or isinstance(v, (list, tuple)) for v in value
            )
        if isinstance(value, (list, tuple)):
            return True
        return isinstance(value, (torch.Tensor, np.ndarray)) and mod is not None and mod.is_grid and value.ndim == 4

    def _check_names(self, inputs: Mapping[str, Any], targets: Sequence[str]) -> None:
        known = list(self.modalities)
        _check_mapping(inputs)
        for where, names in (("input", list(inputs)), ("target", list(targets))):
            for name in names:
                if not isinstance(name, str) or name not in self.modalities:
                    raise ValueError(f"unknown {where} modality {describe(name)}; this model knows {known}")
        both = [t for t in targets if t in inputs]
        if both:
            raise ValueError(
                f"{both} given both as input and as target; a modality is either given or generated: "
                "remove it from inputs or from targets"
            )

    def _tokenize(self, inputs: dict[str, list], n: int, truncate: bool = False
                  ) -> tuple[dict[str, list], list[tuple[int, int] | None], dict[str, list]]:
        """User values -> token rows per modality; each sample's reference image size (H, W) or None; and the pixel
        patches of the inputs the model reads as pixels (``onemodel.pixel_inputs``)."""
        sizes: list[tuple[int, int] | None] = [None] * n
        rows: dict[str, list] = {}
        grid_arrays: dict[str, list] = {}
        for name in sorted(inputs, key=lambda k: k != "rgb"):  # rgb first: it fixes the reference sizes
            mod = self.modalities[name]
            if mod.is_grid:
                grid_arrays[name] = [self._grid_input(name, v, i, sizes) for i, v in enumerate(inputs[name])]
        values: dict[str, list] = {}
        pixel_inputs = set(self.model.config.value_modalities)
        for name, arrays in grid_arrays.items():
            tok = self._tokenizer(name)
            present = [i for i, a in enumerate(arrays) if a is not None]
            out: list = [None] * n
            for i in present:
                # one image per call: a sample's tokens never depend on its batch (batched convolutions differ
                # in float round-off, which can flip a near-tie in the quantizer)
                out[i] = tok.encode(arrays[i][None])[0].long().cpu()  # (N,)
            rows[name] = out
            if name in pixel_inputs:  # the encoder reads this modality as pixel patches (onemodel.pixel_inputs)
                grid = self.modalities[name].grid_size
                values[name] = [patchify(a, grid) if a is not None else None for a in arrays]
        for name, per_sample in inputs.items():
            if self.modalities[name].is_sequence:
                rows[name] = [self._sequence_input(name, v, i, sizes[i], truncate) for i, v in enumerate(per_sample)]
        return rows, sizes, values

    def _grid_input(self, name: str, value: Any, i: int, sizes: list) -> np.ndarray | None:
        if value is None:
            return None
        tok = self._tokenizer(name)
        size = int(tok.image_size)
        what = f"{name} input {i}" if name != "rgb" else f"image {i}"
        if name == "rgb":
            arr = to_rgb_array(value, what)
            sizes[i] = (arr.shape[0], arr.shape[1])
            return resize_rgb(arr, size)
        if name == "depth":
            arr = to_depth_array(value, what)
            sizes[i] = sizes[i] or arr.shape
            return resize_depth(arr, size, size)
        if name == "semseg":
            arr = to_semseg_array(value, getattr(tok.config, "num_classes", None), what)
            sizes[i] = sizes[i] or arr.shape
            return resize_semseg(arr, size, size)
        raise ValueError(
            f"no input conversion for grid modality {name!r}; pass token ids through onemodel.generation.generate"
        )

    def _sequence_input(self, name: str, value: Any, i: int, size: tuple[int, int] | None,
                        truncate: bool = False) -> torch.Tensor | None:
        if value is None:
            return None
        from tokenizers_mm.text import check_encodable

        text = self._tokenizer(name)
        max_length = self.modalities[name].max_length
        if name == "det":
            from tokenizers_mm.boxes import boxes_to_text

            if not isinstance(value, (list, tuple)):
                raise TypeError(f"det input {i}: expected a list of {{'box': [x0, y0, x1, y1], 'label': str}} dicts, "
                                f"got {describe(value)}")
            value = boxes_to_text(list(value), size or self.image_size, text.num_loc_bins)
            allow_empty = True
        else:
            if not isinstance(value, str):
                raise TypeError(f"{name} input {i}: expected a string, got {describe(value)}")
            check_encodable(value, f"{name} input {i}")
            if not value.strip():
                raise ValueError(f"{name} input {i} is empty; pass a non-empty {name} (or leave the modality out)")
            allow_empty = False
        n_tokens = len(text.encode_ids(value, allow_empty=allow_empty)) + 1  # + eos
        if n_tokens > max_length:
            what = "boxes" if name == "det" else "text"
            if not truncate:
                raise ValueError(
                    f"{name} input {i} is {n_tokens} tokens long, more than this model's {name} max_length of "
                    f"{max_length}; shorten the {what}, pass truncate=True (CLI: --truncate) to cut it, or train a "
                    f"model with a larger model.max_lengths.{name}"
                )
            logger.warning("%s input %d: %d tokens cut to the model's max_length %d (truncate=True)", name, i,
                           n_tokens, max_length)
        ids = text.encode(value, max_length=max_length, allow_empty=allow_empty)[0]
        ids = ids.long()
        return ids[ids != text.pad_id] if text.pad_id != text.eos_id else ids

    def tokenize(self, inputs: Mapping[str, Any], truncate: bool = False) -> dict[str, list[torch.Tensor | None]]:
        """User values ({modality: value or list}) -> {modality: [1-D LongTensor of token ids per sample]}, exactly
        what ``generate`` feeds the model (images resized; text longer than the modality's max_length is an error
        unless ``truncate=True``, which cuts it with a warning)."""
        self._check_names(inputs, [])
        values, n, _ = self._broadcast(inputs)
        return self._tokenize(values, n, truncate)[0]

    # ------------------------------------------------------------------------------------------ sampling
    def _options(self, targets: Sequence[str], sampling: dict[str, Any]) -> dict[str, SamplingOptions]:
        sampling = dict(sampling)
        per_target = sampling.pop("per_target", None) or {}
        unknown = sorted(set(sampling) - set(SAMPLING_KEYS))
        if unknown:
            valid = list(SAMPLING_KEYS) + ["per_target", "seed", "batch_size", "progress", "return_tokens", "truncate"]
            raise TypeError(f"unknown sampling option(s) {unknown}; valid: {valid}")
        if not isinstance(per_target, Mapping):
            raise TypeError("per_target must be a dict {modality: {option: value}}")
        bad = sorted(set(per_target) - set(targets))
        if bad:
            raise ValueError(f"per_target names {bad}, which are not targets {list(targets)}")
        out = {}
        for name in targets:
            mod = self.modalities[name]
            kw = {**(_GRID_DEFAULTS.get(name, {})), **sampling, **dict(per_target.get(name, {}))}
            unknown = sorted(set(kw) - set(SAMPLING_KEYS))
            if unknown:
                raise TypeError(f"unknown sampling option(s) {unknown} for {name!r}; valid: {list(SAMPLING_KEYS)}")
            steps = kw.pop("steps", None)
            schedule_name = kw.pop("schedule", None)
            max_length = kw.pop("max_length", None)
            choice_temperature = kw.pop("choice_temperature", 0.0)
            if isinstance(choice_temperature, bool) or not isinstance(choice_temperature, (int, float)) \
                    or choice_temperature < 0:
                raise ValueError(f"choice_temperature must be a number >= 0, got {choice_temperature!r}")
            if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int)):
                raise TypeError(f"steps must be an int, got {type(steps).__name__}")
            if steps is not None and steps < 1:
                raise ValueError(f"steps must be >= 1, got {steps}")
            if mod.is_grid:
                if schedule_name not in (None, "maskgit", "random"):
                    raise ValueError(f"schedule must be 'maskgit' or 'random', got {schedule_name!r}")
                steps = min(8, mod.num_tokens) if steps is None else steps
                if steps > mod.num_tokens:
                    raise ValueError(
                        f"steps={steps} exceeds the {mod.num_tokens} tokens of {name!r}; use 1..{mod.num_tokens}"
                    )
                schedule = (RandomOrderSchedule(steps) if schedule_name == "random"
                            else MaskGITSchedule(steps, choice_temperature=float(choice_temperature)))
            else:
                schedule = AutoregressiveSchedule(max_length=max_length)
            out[name] = SamplingOptions(schedule=schedule, **kw)
        return out

    def _suppressed(self, name: str) -> list[int]:
        """Token ids a target may never produce: ids the tokenizer lacks; for text: pad, bos, sentinels, and
        location tokens outside ``det``; ``det`` may only produce location tokens, class names and eos (when the
        text tokenizer knows its class names)."""
        mod = self.modalities[name]
        tok = self._tokenizer(name)
        banned = list(range(tok.vocab_size, mod.vocab_size))
        if mod.is_sequence and hasattr(tok, "sentinel_ids"):
            if name == "det" and tok.class_names:
                # boxes are "<loc> <loc> <loc> <loc> class": only location tokens, class names (single tokens) and eos
                classes = [tok.token_to_id(c) for c in tok.class_names]
                allowed = set(tok.loc_ids) | {tok.eos_id} | {c for c in classes if c is not None}
                return banned + [i for i in range(tok.vocab_size) if i not in allowed]
            banned += [tok.pad_id, tok.bos_id, *tok.sentinel_ids]
            if name != "det":
                banned += list(tok.loc_ids)
        return banned

    # ------------------------------------------------------------------------------------------ generate
    def generate(
        self,
        inputs: Mapping[str, Any],
        targets: str | Sequence[str],
        *,
        return_tokens: bool = False,
        seed: int = 0,
        batch_size: int = 16,
        progress: bool = False,
        truncate: bool = False,
        **sampling: Any,
    ) -> dict[str, Any] | list[dict[str, Any]]:
        """Generate ``targets`` (in order, each becoming an input of the next) from ``inputs`` ({modality: value}).

        Returns ``{target: value}`` for single values, a list of such dicts when any input is a list. Sampling
        keywords: see the module docstring. ``return_tokens=True`` returns ``{target: LongTensor}`` token ids.
        Text inputs longer than their modality's ``max_length`` raise ``ValueError`` unless ``truncate=True``.
        """
        _check_mapping(inputs)
        if isinstance(targets, str):
            targets = [targets]
        elif isinstance(targets, (list, tuple)):
            targets = list(targets)
        else:
            raise TypeError(f"targets must be a modality name or a list of them, got {describe(targets)}")
        if not targets:
            raise ValueError("targets is empty; name at least one modality to generate, e.g. targets=['caption']")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise TypeError(f"seed must be an int, got {type(seed).__name__}")
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size must be an int >= 1, got {batch_size!r}")
        self._check_names(inputs, targets)
        options = self._options(targets, sampling)
        values, n, listed = self._broadcast(inputs)
        text = self.text_tokenizer if any(m.is_sequence for m in self.modalities.values()) else None
        results: list[dict[str, Any]] = []
        for start in range(0, n, batch_size):
            chunk = {k: v[start : start + batch_size] for k, v in values.items()}
            b = min(batch_size, n - start)
            rows, sizes, pixels = self._tokenize(chunk, b, truncate)
            out = generate_tokens(
                self.model,
                rows,
                targets,
                options,
                seed=[seed + start + i for i in range(b)],
                eos_id=text.eos_id if text is not None else None,
                suppress_ids={t: self._suppressed(t) for t in targets},
                batch_size=b,
                progress=progress,
                values=pixels,
                to_values=self._pixels_of_tokens,
            )
            for i in range(b):
                if return_tokens:
                    results.append({t: out.tokens[t][i] for t in targets})
                else:
                    results.append({t: self._decode(t, out.tokens[t][i], out.probs[t][i], sizes[i]) for t in targets})
        return results if listed else results[0]

    def _pixels_of_tokens(self, name: str, tokens: list[torch.Tensor]) -> list[torch.Tensor]:
        """Generated tokens of a pixel-embedded modality -> the patches the next chained target reads (decoded by the
        modality's tokenizer, as a user-given image would be)."""
        tok = self._tokenizer(name)
        grid = self.modalities[name].grid_size
        with torch.no_grad():
            images = [tok.decode(t.long().view(1, -1))[0] for t in tokens]
        return [patchify(np.asarray(img, dtype=np.uint8), grid) for img in images]

    def _decode(self, name: str, ids: torch.Tensor, probs: torch.Tensor, size: tuple[int, int] | None) -> Any:
        from PIL import Image

        mod = self.modalities[name]
        tok = self._tokenizer(name)
        if mod.is_grid:
            arr = tok.decode(ids.view(1, -1))[0]
            if name == "rgb":
                return Image.fromarray(np.asarray(arr, dtype=np.uint8))
            if name == "depth":
                metres = np.asarray(arr, dtype=np.float32)
                return resize_depth(metres, *size) if size else metres
            if name == "semseg":
                return resize_semseg(np.asarray(arr), *size) if size else np.asarray(arr)
            return arr
        if name == "det":
            return self._boxes(ids, probs, size)
        return tok.decode(ids)[0]

    def _boxes(self, ids: torch.Tensor, probs: torch.Tensor, size: tuple[int, int] | None) -> list[dict[str, Any]]:
        """Detection tokens -> boxes; each box's score is the geometric mean of its tokens' probabilities."""
        from tokenizers_mm.boxes import text_to_boxes

        text = self.text_tokenizer
        loc = set(text.loc_ids)
        ids_l, probs_l = ids.tolist(), probs.tolist()
        if text.eos_id in ids_l:
            cut = ids_l.index(text.eos_id)
            ids_l, probs_l = ids_l[:cut], probs_l[:cut]
        # groups: 4 location tokens followed by the label's word pieces (until the next location token)
        groups, i = [], 0
        while i < len(ids_l):
            if ids_l[i] in loc:
                j = i
                while j < len(ids_l) and ids_l[j] in loc:
                    j += 1
                k = j
                while k < len(ids_l) and ids_l[k] not in loc:
                    k += 1
                groups.append((ids_l[max(i, j - 4) : k], probs_l[max(i, j - 4) : k]))
                i = k
            else:
                i += 1
        out = []
        for g_ids, g_probs in groups:
            boxes = text_to_boxes(text.decode(g_ids)[0], size or self.image_size, text.num_loc_bins)
            if len(boxes) != 1:
                continue
            score = math.exp(sum(math.log(max(p, 1e-12)) for p in g_probs) / len(g_probs))
            out.append({**boxes[0], "score": float(score)})
        return out

    # ------------------------------------------------------------------------------------------ tasks
    def _task(self, inputs: dict[str, Any], target: str, sampling: dict[str, Any]) -> Any:
        out = self.generate(inputs, [target], **sampling)
        return [o[target] for o in out] if isinstance(out, list) else out[target]

    @staticmethod
    def _images(images: Any) -> Any:
        if isinstance(images, (list, tuple)):
            if not images:
                raise ValueError("empty image list; pass at least one image")
            return list(images)
        if not is_image_like(images):
            raise TypeError(
                "expected an image (PIL, numpy array, tensor or file path) or a list of them, "
                f"got {type(images).__name__}"
            )
        return images

    def caption(self, images: Any, **sampling: Any) -> str | list[str]:
        """Caption one image (-> str) or a list of images (-> list of str)."""
        return self._task({"rgb": self._images(images)}, "caption", sampling)

    def answer(self, images: Any, questions: str | Sequence[str], **sampling: Any) -> str | list[str]:
        """Answer ``questions`` about ``images``: one image + one question -> str; lists (or one image and a list of
        questions, or a list of images and one question) -> list of str."""
        qs = [questions] if isinstance(questions, str) else questions
        if not isinstance(qs, (list, tuple)) or not qs:
            raise TypeError("questions must be a string or a non-empty list of strings")
        for i, q in enumerate(qs):
            if not isinstance(q, str):
                raise TypeError(f"question {i} must be a string, got {type(q).__name__}")
            if not q.strip():
                raise ValueError(f"question {i} is empty; ask something, e.g. 'what color is the circle?'")
        return self._task({"rgb": self._images(images), "question": questions}, "answer", sampling)

    def depth(self, images: Any, **sampling: Any) -> np.ndarray | list[np.ndarray]:
        """Depth in metres, ``float32 (H, W)`` at each input image's size."""
        return self._task({"rgb": self._images(images)}, "depth", sampling)

    def segment(self, images: Any, **sampling: Any) -> np.ndarray | list[np.ndarray]:
        """Semantic segmentation: class ids ``(H, W)`` at each input image's size (see the tokenizer's classes)."""
        return self._task({"rgb": self._images(images)}, "semseg", sampling)

    def detect(self, images: Any, **sampling: Any) -> list[dict[str, Any]] | list[list[dict[str, Any]]]:
        """Boxes ``[{"box": [x0, y0, x1, y1], "label": str, "score": float}]`` in the image's pixels."""
        return self._task({"rgb": self._images(images)}, "det", sampling)

    def text_to_image(self, prompts: str | Sequence[str], via: Sequence[str] = (), **sampling: Any) -> Any:
        """Caption(s) -> PIL image(s) at the tokenizer's size. ``via``: modalities generated first and then used as
        inputs (e.g. ``via=["semseg"]`` chains caption -> semseg -> rgb). Default guidance scale 3.0."""
        if isinstance(prompts, str):
            prompts_in: Any = prompts
            items = [prompts]
        elif isinstance(prompts, (list, tuple)) and prompts:
            prompts_in, items = list(prompts), list(prompts)
        else:
            raise TypeError("prompts must be a string or a non-empty list of strings")
        for i, p in enumerate(items):
            if not isinstance(p, str) or not p.strip():
                raise ValueError(f"prompt {i} is empty or not a string; describe the image, e.g. 'a red circle'")
        sampling.setdefault("guidance_scale", 3.0)
        out = self.generate({"caption": prompts_in}, [*via, "rgb"], **sampling)
        return [o["rgb"] for o in out] if isinstance(out, list) else out["rgb"]
