"""`onemodel demo --quick`: every stage runs, results and report exist, stages are cached, a SIGKILL during
model training resumes from the last checkpoint."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from onemodel.cli import main


@pytest.fixture(scope="module")
def quick_demo(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("demo")
    assert main(["demo", "--quick", "--no-progress", "--out", str(out)]) == 0
    return out


def test_quick_demo_runs_every_stage(quick_demo: Path):
    state = json.loads((quick_demo / "demo_state.json").read_text())
    assert all(state[s]["done"] for s in ("data", "tokenizers", "tokenize", "train", "eval"))
    results = json.loads((quick_demo / "eval" / "results.json").read_text())
    for task in ("caption", "vqa", "depth", "semseg", "detection", "text_to_image"):
        assert task in results, task
    assert 0.0 <= results["vqa"]["accuracy"] <= 1.0
    assert (quick_demo / "report" / "report.html").is_file()
    assert (quick_demo / "run" / "model" / "model.safetensors").is_file()


def test_quick_demo_rerun_is_cached(quick_demo: Path, capsys):
    before = json.loads((quick_demo / "demo_state.json").read_text())
    start = time.perf_counter()
    assert main(["demo", "--quick", "--no-progress", "--out", str(quick_demo)]) == 0
    assert time.perf_counter() - start < 30
    after = json.loads((quick_demo / "demo_state.json").read_text())
    assert before == after  # nothing re-ran
    printed = capsys.readouterr().out
    assert "(cached)" in printed
    assert f"onemodel serve --model {quick_demo / 'run'}" in printed  # the exact command to serve the model


def test_demo_resumes_after_sigkill_in_training(quick_demo: Path, tmp_path: Path):
    import shutil

    out = tmp_path / "demo"
    shutil.copytree(quick_demo, out)
    shutil.rmtree(out / "run")  # only checkpoints of the killed run may count below
    # a longer training run than the quick one: the train stage (and eval after it) re-runs, the rest is cached
    overrides = ["optim.max_steps=400", "checkpoint.every=3", "logging.eval_every=0"]
    cmd = [sys.executable, "-m", "onemodel.cli", "demo", "--quick", "--no-progress", "--out", str(out), *overrides]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=env)
    ckpts = out / "run" / "checkpoints"
    deadline = time.time() + 240
    try:
        while time.time() < deadline:
            done = [p for p in ckpts.glob("step_*") if not p.name.endswith(".tmp")] if ckpts.is_dir() else []
            if any(int(p.name.split("_")[1]) >= 6 for p in done):
                break
            assert proc.poll() is None, "demo ended before it could be killed"
            time.sleep(0.2)
        else:
            pytest.fail("no checkpoint appeared in time")
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
    state = json.loads((out / "demo_state.json").read_text())
    assert state["tokenize"]["done"]
    summary = __import__("training.demo", fromlist=["run_demo"]).run_demo(
        out, preset="quick", progress=False, stop_after="train", train_overrides=overrides)
    info = summary["state"]["train"]["info"]
    assert info["start_step"] >= 6, info  # resumed from a checkpoint, not from scratch
    assert info["final_step"] == 400
    assert summary["stages"]["tokenizers"] == 0.0  # cached


def test_clip_stage_trains_the_encoder_the_model_reads(quick_demo: Path, tmp_path: Path, capsys, caplog):
    """--clip: a contrastive encoder is trained on the captions (beside the tokenizers on 2+ cores; cached tokenizers
    are reused), and the one model reads rgb through that encoder's frozen vision tower (its weights, bit for bit)."""
    import logging
    import shutil

    from safetensors.torch import load_file

    caplog.set_level(logging.INFO, logger="training.fit")
    out = tmp_path / "demo"
    shutil.copytree(quick_demo, out)
    before = json.loads((out / "demo_state.json").read_text())
    assert before["clip"]["info"] == {"skipped": "no clip config"}
    assert main(["demo", "--quick", "--clip", "--no-progress", "--out", str(out)]) == 0
    state = json.loads((out / "demo_state.json").read_text())
    assert state["tokenizers"] == before["tokenizers"]  # not re-run
    assert state["clip"]["info"]["final_step"] == 4 and (out / "clip" / "model" / "contrastive.json").is_file()
    assert ("starts beside the tokenizers" in caplog.text) == ((os.cpu_count() or 1) >= 2)
    config = json.loads((out / "run" / "model" / "config.json").read_text())
    assert config["input_embeddings"] == {"rgb": "pixels_and_clip"} and set(config["feature_encoders"]) == {"rgb"}
    encoder = load_file(str(out / "clip" / "model" / "model.safetensors"))
    model = load_file(str(out / "run" / "model" / "model.safetensors"))
    tower = {k.split(".tower.", 1)[1]: v for k, v in model.items() if ".tower." in k}
    vision = {k[len("vision_model."):]: v for k, v in encoder.items() if k.startswith("vision_model.")}
    assert tower and tower.keys() == vision.keys() and all(torch.equal(tower[k], vision[k]) for k in tower)
    results = json.loads((out / "eval" / "results.json").read_text())
    assert 0.0 <= results["vqa"]["accuracy"] <= 1.0
    capsys.readouterr()
    assert main(["demo", "--quick", "--clip", "--no-progress", "--out", str(out)]) == 0  # all cached now
    assert "clip             0.0  (cached)" in capsys.readouterr().out


def test_bad_training_override_fails_before_any_stage(tmp_path: Path):
    from onemodel.config import ConfigError
    from training.demo import run_demo

    with pytest.raises(ConfigError, match="optim.nope"):
        run_demo(tmp_path / "out", preset="quick", progress=False, train_overrides=["optim.nope=3"])
    assert not (tmp_path / "out").exists()
    with pytest.raises(ValueError, match="unknown demo preset"):
        run_demo(tmp_path / "out", preset="huge")


def test_long_preset_is_the_full_demo_trained_longer(capsys):
    """--preset long shares the data with the default demo, trains an rgb tokenizer with more codes (its only
    tokenizer change) and the same recipe 4x longer with every task's held-out curve; its overrides are valid
    tokenizer / training-config keys."""
    from training.config import load_train_config
    from training.demo import PRESETS
    from training.heldout import HELDOUT_METRICS
    from training.tokenizer_training import load_vq_training_config

    full, long = PRESETS["full"], PRESETS["long"]
    assert (full.num_train, full.grid_size, full.resolution) == (long.num_train, long.grid_size, long.resolution)
    assert set(long.tokenizer_training) == {"rgb"} and not full.tokenizer_training
    rgb = load_vq_training_config("rgb", overrides=[f"{k}={v}" for k, v in long.tokenizer_training["rgb"].items()],
                                  grid_size=long.grid_size)
    default_rgb = load_vq_training_config("rgb", grid_size=full.grid_size)
    assert rgb.tokenizer.quantizer == "fsq" and rgb.tokenizer.vocab_size == 15360 > default_rgb.tokenizer.vocab_size
    assert rgb.training.steps == 4 * default_rgb.training.steps
    base = load_train_config(full.train_config, full.train_overrides)
    cfg = load_train_config(long.train_config, long.train_overrides)
    assert cfg.optim.max_steps == 4 * base.optim.max_steps and cfg.model == base.model
    assert sorted(cfg.logging.heldout_tasks) == sorted(HELDOUT_METRICS)  # a curve for every task
    assert long.fit_settings().clip_config and not full.fit_settings().clip_config  # long trains the clip stage first
    assert main(["demo", "--quick", "--preset", "long"]) == 2
    assert "contradict" in capsys.readouterr().err


def test_a_stage_started_early_hands_over_its_result_or_its_error():
    """The clip stage trains in a thread beside the tokenizers; its stage gets the result, or the error it raised."""
    from training.fit import _EarlyStage

    assert _EarlyStage("k", lambda: {"final_step": 3}).result() == {"final_step": 3}

    def fails() -> dict:
        raise ValueError("no captions")

    early = _EarlyStage("k", fails)
    with pytest.raises(ValueError, match="no captions"):
        early.result()
