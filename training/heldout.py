"""Learning curves of the real tasks: score the model being trained on a few held-out raw samples, through the
pipeline, every ``logging.heldout_every`` steps (``training.train`` calls it; the report draws the curves).

Each call returns flat metric names, ``heldout/<name>``: ``vqa_accuracy``, ``caption_attribute_f1``,
``depth_delta1``, ``semseg_miou``, ``detection_map50``, ``text_to_image_accuracy``.
"""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Sequence

__all__ = ["HeldoutEval", "HELDOUT_METRICS"]

logger = logging.getLogger(__name__)

# task -> (result key, metric key, logged name)
HELDOUT_METRICS: dict[str, tuple[str, str, str]] = {
    "vqa": ("vqa", "accuracy", "vqa_accuracy"),
    "caption": ("caption_attributes", "f1", "caption_attribute_f1"),
    "depth": ("depth", "delta1", "depth_delta1"),
    "semseg": ("semseg", "miou", "semseg_miou"),
    "detection": ("detection", "map_50", "detection_map50"),
    "text_to_image": ("text_to_image", "accuracy", "text_to_image_accuracy"),
}


class HeldoutEval:
    """Loads the held-out samples once; ``__call__(model)`` scores ``model`` (a OneModel, left in eval mode)."""

    def __init__(self, data_dir: str | Path, split: str, limit: int, tasks: Sequence[str], tokenizers: Any) -> None:
        from training.data.reader import load_samples
        from training.evaluation.evaluate import _resolve_data

        unknown = [t for t in tasks if t not in HELDOUT_METRICS]
        if unknown:
            raise ValueError(f"logging.heldout_tasks: unknown task(s) {unknown}; choose from {list(HELDOUT_METRICS)}")
        source, self.meta = _resolve_data(data_dir, split)
        self.samples = load_samples(source, limit=limit)
        if not self.samples:
            raise ValueError(f"logging.heldout_data: no samples in {source}")
        from training.evaluation.evaluate import missing_data

        # a task the held-out data cannot serve (e.g. caption on QA-only data) is left out now, with one warning,
        # instead of failing the first held-out pass after the training compute is spent
        servable = [t for t in tasks if not missing_data(t, self.samples[0])]
        dropped = [t for t in tasks if t not in servable]
        if dropped:
            logger.warning("logging.heldout_tasks: %s left out: the held-out samples of %s lack what they need",
                           dropped, source)
        self.tasks, self.tokenizers = servable, tokenizers

    def __call__(self, model: Any) -> dict[str, float]:
        from onemodel.pipeline import OneModelPipeline
        from training.evaluation.evaluate import evaluate_samples

        device = next(model.parameters()).device
        pipe = OneModelPipeline(model, self.tokenizers, device=device)
        ev = evaluate_samples(pipe, self.samples, self.tasks, semseg_classes=self.meta.get("semseg_classes"),
                              box_classes=self.meta.get("box_classes"), num_examples=0, batch_size=50,
                              progress=False)
        out = {}
        for task in self.tasks:
            result, key, name = HELDOUT_METRICS[task]
            value = ev.results.get(result, {}).get(key)
            if value is not None:
                out[f"heldout/{name}"] = float(value)
        return out
