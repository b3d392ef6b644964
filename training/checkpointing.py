"""Training checkpoints: write-then-rename so a half-written checkpoint is never picked up.

Layout under the run's ``out_dir``::

    checkpoints/step_000200/      accelerate ``save_state`` (model.safetensors, optimizer.bin, random_states_*.pkl)
                 trainer_state.json   {"step", "tokens_seen", "samples_seen", ...}: written last, marks completion
    checkpoints/step_000400.tmp/  being written (ignored by :func:`latest_checkpoint`, removed at the next save)
    model/                        ``save_pretrained`` directory (config.json + model.safetensors) + ``tokenizers/``

Checkpoint directories are **trusted local state** written by this process: accelerate stores the optimizer and
the RNG states with ``torch.save`` and reads them back with ``torch.load(weights_only=True)``. Share the ``model/``
directory (safetensors + JSON), never a checkpoint directory.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Any

from tokenizers_mm.io_atomic import fsync_dir

logger = logging.getLogger(__name__)

__all__ = [
    "TRAINER_STATE_NAME",
    "list_checkpoints",
    "latest_checkpoint",
    "read_trainer_state",
    "save_checkpoint",
    "write_json_atomic",
    "replace_dir_atomic",
    "as_output_error",
]

TRAINER_STATE_NAME = "trainer_state.json"
_CHECKPOINT_RE = re.compile(r"^step_(\d+)$")


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to ``path`` via a temporary file + fsync + rename (``tokenizers_mm.io_atomic``)."""
    from tokenizers_mm.io_atomic import write_json

    write_json(path, data, sort_keys=True)


def list_checkpoints(checkpoint_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints ``[(step, path)]`` sorted by step; ``.tmp`` and unfinished directories are skipped."""
    checkpoint_dir = Path(checkpoint_dir)
    if not checkpoint_dir.is_dir():
        return []
    found = []
    for path in checkpoint_dir.iterdir():
        match = _CHECKPOINT_RE.match(path.name)
        if match and path.is_dir() and (path / TRAINER_STATE_NAME).is_file():
            found.append((int(match.group(1)), path))
    return sorted(found)


def latest_checkpoint(checkpoint_dir: str | Path) -> Path | None:
    """The complete checkpoint with the highest step, or None."""
    found = list_checkpoints(checkpoint_dir)
    return found[-1][1] if found else None


def read_trainer_state(path: str | Path) -> dict[str, Any]:
    """Read ``trainer_state.json`` of a checkpoint directory."""
    state_path = Path(path) / TRAINER_STATE_NAME
    try:
        state = json.loads(state_path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"checkpoint {str(path)!r} has no readable {TRAINER_STATE_NAME} ({err}); delete it") from err
    if not isinstance(state, dict) or not isinstance(state.get("step"), int):
        raise ValueError(f"{str(state_path)!r} must be a JSON object with an integer 'step'")
    return state


def resume_from(accelerator: Any, checkpoint: Path, batch_size: int, data_seed: int) -> dict[str, Any]:
    """Load ``checkpoint`` into ``accelerator`` (model, optimizer, RNG states) and return its trainer state; warn
    when the batch size or data seed differ from the checkpoint's (the data order would not continue exactly)."""
    accelerator.load_state(str(checkpoint))
    state = read_trainer_state(checkpoint)
    was = state.get("data", {})
    if was.get("batch_size") != batch_size or was.get("seed") != data_seed:
        logger.warning("resuming with a different batch_size or data seed than the checkpoint (%s): the data "
                       "order will not continue exactly", was)
    logger.info("resumed from %s at step %d", checkpoint, int(state["step"]))
    return state


def save_checkpoint(accelerator: Any, checkpoint_dir: str | Path, trainer_state: dict[str, Any],
                    keep_last: int) -> Path:
    """Save the accelerate state + ``trainer_state`` as ``checkpoint_dir/step_N`` atomically; prune old ones.

    Every process must call this (accelerate writes per-process RNG states). The directory is first written as
    ``step_N.tmp`` and renamed once complete; ``trainer_state.json`` is written last inside it.
    """
    checkpoint_dir = Path(checkpoint_dir)
    step = int(trainer_state["step"])
    final = checkpoint_dir / f"step_{step:06d}"
    tmp = checkpoint_dir / f"step_{step:06d}.tmp"
    if accelerator.is_main_process:
        checkpoint_dir.mkdir(parents=True, exist_ok=True)
        for stale in checkpoint_dir.glob("step_*.tmp"):  # leftovers of a killed run
            shutil.rmtree(stale, ignore_errors=True)
        tmp.mkdir()
    accelerator.wait_for_everyone()
    try:
        accelerator.save_state(str(tmp), safe_serialization=True)
    except Exception as err:  # full disk, ...: drop the partial checkpoint, say where and what to do
        translated = as_output_error(final, err)  # before the removal frees the space
        shutil.rmtree(tmp, ignore_errors=True)
        if translated is not None:
            raise translated from err
        raise
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        write_json_atomic(tmp / TRAINER_STATE_NAME, trainer_state)
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        fsync_dir(checkpoint_dir)
        if keep_last > 0:
            for _, old in list_checkpoints(checkpoint_dir)[:-keep_last]:
                shutil.rmtree(old, ignore_errors=True)
        logger.info("saved checkpoint %s", final)
    accelerator.wait_for_everyone()
    return final


def as_output_error(final: Path, err: Exception) -> Exception | None:
    """A failed write under ``final`` as a one-line ``OutputPathError`` when it is about the disk (full, read-only,
    ...), else None. Call it before removing the partial output (that frees the space it looks at)."""
    import errno as errno_mod

    from tokenizers_mm.io_atomic import OutputPathError, is_disk_full, output_error

    if isinstance(err, OutputPathError):
        return err
    if isinstance(err, OSError) and err.errno is not None:
        return output_error(final, err)
    if "No space left" in str(err) or "os error 28" in str(err) or is_disk_full(final.parent):
        return output_error(final, OSError(errno_mod.ENOSPC, os.strerror(errno_mod.ENOSPC)))
    return None


def replace_dir_atomic(tmp: Path, final: Path) -> None:
    """Move the finished directory ``tmp`` to ``final``, replacing an older ``final`` (never leaving none behind
    for longer than two renames)."""
    tmp, final = Path(tmp), Path(final)
    old = final.with_name(final.name + ".old")
    if old.exists():
        shutil.rmtree(old)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    if old.exists():
        shutil.rmtree(old)
