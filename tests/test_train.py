"""The training loop: loss drops, exact resume, SIGKILL + resume, DDP == gradient accumulation, the data stream.

Everything runs on a tiny real pipeline built once per module: shapes data (16 px) -> untrained tiny VQ
tokenizers + a trained text tokenizer -> pre-tokenized token shards (~3 s).
"""

from __future__ import annotations

import atexit
import functools
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from onemodel.modalities import Modality
from training.checkpointing import latest_checkpoint, list_checkpoints
from training.config import load_train_config
from training.run_log import read_metrics
from training.train import lr_at, param_groups, train

REPO = Path(__file__).resolve().parents[1]


@functools.lru_cache(maxsize=None)
def build_tiny_pipeline() -> Path:
    """Root with data/ (raw shards), bundle/ (tokenizers), tokens/ (token shards); built once per test session
    (shared with tests/test_train_loader.py), removed at exit."""
    from tokenizers_mm.vq import VQTokenizer, VQTokenizerConfig
    from training.data.shapes import make_shapes_dataset
    from training.pretokenize import pretokenize
    from training.tokenizer_training import train_text_tokenizer

    root = Path(tempfile.mkdtemp(prefix="onemodel_tiny_"))
    atexit.register(shutil.rmtree, root, ignore_errors=True)
    meta = make_shapes_dataset(root / "data", num_train=64, num_val=16, num_test=0, resolution=16,
                               samples_per_shard=32, progress=False)
    for i, mod in enumerate(("rgb", "depth", "semseg")):
        cfg = VQTokenizerConfig(modality=mod, image_size=16, channel_mult=[1, 2], base_channels=8, latent_dim=8,
                                codebook_size=16, codebook_dim=8, kmeans_init=False,
                                num_classes=len(meta["semseg_classes"]) if mod == "semseg" else 0)
        torch.manual_seed(i)
        VQTokenizer(cfg).save_pretrained(root / "bundle" / mod)
    train_text_tokenizer(root / "data", root / "bundle" / "text", vocab_size=256, num_sentinels=8, num_loc_bins=16)
    pretokenize(root / "data", root / "bundle", root / "tokens", progress=False)
    return root


@pytest.fixture
def tiny() -> Path:
    return build_tiny_pipeline()


def tiny_overrides(root: Path, out: Path, *extra: str) -> list[str]:
    return [
        f"tokenizers={root / 'bundle'}", f"data.sources=[{{path: {root / 'tokens'}}}]", "data.num_workers=0",
        "num_threads=1", "model.dim=32", "model.encoder_depth=1", "model.decoder_depth=1", "model.num_heads=2",
        "masking.input_budget=32", "masking.target_budget=32", "optim.batch_size=8", "optim.max_steps=12",
        "optim.warmup_steps=2", "optim.lr=3e-3", "logging.log_every=3", "logging.eval_every=0",
        "logging.eval_batches=2", "logging.progress_bar=false", "checkpoint.every=0", f"checkpoint.out_dir={out}",
        *extra,
    ]


def tiny_config(root: Path, out: Path, *extra: str):
    return load_train_config(None, tiny_overrides(root, out, *extra))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def weights(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "model" / "model.safetensors"))


def assert_same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], atol: float = 0.0) -> None:
    assert a.keys() == b.keys()
    for k in a:
        if atol == 0.0:
            assert torch.equal(a[k], b[k]), f"{k} differs by {(a[k] - b[k]).abs().max()}"
        else:
            torch.testing.assert_close(a[k], b[k], atol=atol, rtol=0, msg=lambda m, k=k: f"{k}: {m}")


# ------------------------------------------------------------------------------------------------ the loop


def test_tiny_run_drops_validation_loss_of_every_modality(tiny, tmp_path):
    out = tmp_path / "run"
    summary = train(tiny_config(tiny, out, "optim.batch_size=16", "optim.max_steps=80", "optim.warmup_steps=5",
                                "logging.log_every=10", "logging.eval_every=40"))
    records = read_metrics(out / "metrics.jsonl")
    val = [r for r in records if "val/loss" in r]
    first, last = val[0], val[-1]
    assert first["step"] == 0 and last["step"] == 80
    mods = [k for k in first if k.startswith("val/loss/")]
    assert len(mods) == 7  # rgb depth semseg caption question answer det
    for key in mods:
        assert last[key] < 0.8 * first[key], (key, first[key], last[key])
    train_lines = [r for r in records if "train/loss" in r]
    assert [r["step"] for r in train_lines] == list(range(10, 81, 10))
    assert all(r["tokens_per_s"] > 0 and r["lr"] > 0 for r in train_lines)
    assert summary["final_step"] == 80 and summary["tokens"] > 0 and summary["val"]["val/loss"] == last["val/loss"]
    # the shareable model directory: safetensors + config + tokenizers, loadable
    from onemodel.model import OneModel

    model = OneModel.from_pretrained(out / "model")
    assert [m.name for m in model.config.modalities] == ["rgb", "depth", "semseg", "caption", "question", "answer", "det"]
    assert (out / "model" / "tokenizers" / "text" / "config.json").is_file()
    assert not (out / "model.tmp").exists()


def test_resume_is_exact(tiny, tmp_path):
    """12 steps straight == 5 steps, stop, resume to 12: bitwise equal weights (dropout and accumulation on)."""
    extra = ("model.dropout=0.1", "optim.micro_batch_size=4", "logging.eval_every=5")
    train(tiny_config(tiny, tmp_path / "a", *extra))
    first = train(tiny_config(tiny, tmp_path / "b", *extra), stop_at_step=5)
    assert first["final_step"] == 5 and first["grad_accum_steps"] == 2
    assert [s for s, _ in list_checkpoints(tmp_path / "b" / "checkpoints")] == [5]
    second = train(tiny_config(tiny, tmp_path / "b", *extra), resume=True)
    assert second["start_step"] == 5 and second["steps"] == 7
    assert_same_weights(weights(tmp_path / "a"), weights(tmp_path / "b"))
    val_a = [r for r in read_metrics(tmp_path / "a" / "metrics.jsonl") if "val/loss" in r]
    val_b = [r for r in read_metrics(tmp_path / "b" / "metrics.jsonl") if "val/loss" in r]
    assert [r["step"] for r in val_b] == [0, 5, 10, 12] and val_a[-1]["val/loss"] == val_b[-1]["val/loss"]
    state = json.loads((latest_checkpoint(tmp_path / "b" / "checkpoints") / "trainer_state.json").read_text())
    assert state["step"] == 12 and state["data"]["next_sample_index"] == 12 * 8


def test_mixture_with_raw_source_tokenized_in_workers(tiny, tmp_path):
    """Two sources: token shards training rgb+caption, raw shards (tokenized on the fly in a worker process)
    training rgb+depth; only those modalities get losses."""
    sources = (f"data.sources=[{{path: {tiny / 'tokens'}, modalities: [rgb, caption], weight: 2}}, "
               f"{{path: {tiny / 'data'}, modalities: [rgb, depth], tokenize_on_the_fly: true}}]")
    out = tmp_path / "mix"
    summary = train(tiny_config(tiny, out, sources, "data.num_workers=1", "optim.max_steps=4", "logging.log_every=4"))
    assert summary["final_step"] == 4
    losses = {k.split("/")[-1] for r in read_metrics(out / "metrics.jsonl") for k in r if "/loss/" in k}
    assert losses == {"rgb", "caption", "depth"}


def test_fresh_run_refuses_existing_checkpoints(tiny, tmp_path):
    train(tiny_config(tiny, tmp_path / "a", "optim.max_steps=2"))
    with pytest.raises(ValueError, match="--resume"):
        train(tiny_config(tiny, tmp_path / "a", "optim.max_steps=2"))
    done = train(tiny_config(tiny, tmp_path / "a", "optim.max_steps=2"), resume=True)  # finished: nothing to do
    assert done["steps"] == 0 and done["start_step"] == 2


def test_runs_with_other_precisions_in_one_process(tiny, tmp_path):
    """accelerate refuses a second Accelerator with another mixed precision; train() resets that state."""
    bf16 = train(tiny_config(tiny, tmp_path / "bf16", "optim.max_steps=2", "optim.mixed_precision=bf16"))
    fp32 = train(tiny_config(tiny, tmp_path / "fp32", "optim.max_steps=2", "optim.mixed_precision=no"))
    assert bf16["steps"] == fp32["steps"] == 2
    assert bf16["train_loss"] != fp32["train_loss"]  # the first bf16 step already rounds differently


def test_half_written_checkpoints_are_ignored(tmp_path):
    ckpt = tmp_path / "checkpoints"
    (ckpt / "step_000005").mkdir(parents=True)
    (ckpt / "step_000005" / "trainer_state.json").write_text('{"step": 5}')
    (ckpt / "step_000010.tmp").mkdir()  # killed while writing
    (ckpt / "step_000010.tmp" / "trainer_state.json").write_text('{"step": 10}')
    (ckpt / "step_000020").mkdir()  # no trainer_state.json: incomplete
    assert latest_checkpoint(ckpt) == ckpt / "step_000005"
    assert latest_checkpoint(tmp_path / "nothing") is None


def test_sigkill_then_resume(tiny, tmp_path):
    """Kill `onemodel train` (SIGKILL) after a checkpoint exists; --resume continues from the last complete
    checkpoint (ignoring a half-written one) and ends with the weights of an uninterrupted run."""
    out = tmp_path / "killed"
    extra = ("optim.max_steps=150", "checkpoint.every=10", "checkpoint.keep_last=3", "logging.log_every=10")
    config_file = tmp_path / "cfg.json"
    config_file.write_text(json.dumps({}))
    cmd = [sys.executable, "-m", "onemodel.cli", "train", "--config", str(config_file),
           *tiny_overrides(tiny, out, *extra)]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 120
        while latest_checkpoint(out / "checkpoints") is None:
            assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
            assert time.time() < deadline, "no checkpoint appeared"
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == -signal.SIGKILL
    last = latest_checkpoint(out / "checkpoints")
    killed_at = json.loads((last / "trainer_state.json").read_text())["step"]
    assert 10 <= killed_at < 150, "the run finished before the kill; the test needs a longer run"
    fake = out / "checkpoints" / "step_000149.tmp"  # as if killed while writing a later checkpoint
    fake.mkdir(exist_ok=True)
    (fake / "trainer_state.json").write_text('{"step": 149}')
    resumed = train(tiny_config(tiny, out, *extra), resume=True)
    assert resumed["start_step"] == killed_at and resumed["final_step"] == 150
    assert not fake.exists()  # stale .tmp removed at the next save
    steps = [r["step"] for r in read_metrics(out / "metrics.jsonl") if "train/loss" in r]
    assert steps == sorted(set(steps)) and steps[-1] == 150  # lines after the checkpoint were dropped, no duplicates
    train(tiny_config(tiny, tmp_path / "straight", *extra))
    assert_same_weights(weights(out), weights(tmp_path / "straight"))


def test_ddp_two_processes_equal_one_process_with_accumulation(tiny, tmp_path):
    """2 CPU processes (gloo) x micro-batch 4 == 1 process x 2 accumulation steps x micro-batch 4."""
    extra = ("optim.micro_batch_size=4", "optim.max_steps=6", "logging.eval_batches=1")
    single = train(tiny_config(tiny, tmp_path / "single", *extra))
    assert single["grad_accum_steps"] == 2
    config_file = tmp_path / "cfg.json"
    config_file.write_text("{}")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(free_port()), "-m", "training.train",
           "--config", str(config_file), *tiny_overrides(tiny, tmp_path / "ddp", *extra)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "trained steps 0->6" in result.stdout
    state = json.loads((latest_checkpoint(tmp_path / "ddp" / "checkpoints") / "trainer_state.json").read_text())
    assert state["data"]["num_processes"] == 2 and state["data"]["grad_accum_steps"] == 1
    assert_same_weights(weights(tmp_path / "ddp"), weights(tmp_path / "single"), atol=1e-5)
    # validation: one fixed set of samples, whatever the process count -> the same val losses
    val = {run: [r for r in read_metrics(tmp_path / run / "metrics.jsonl") if "val/loss" in r]
           for run in ("single", "ddp")}
    assert [r["step"] for r in val["ddp"]] == [r["step"] for r in val["single"]] == [0, 6]
    for a, b in zip(val["single"], val["ddp"]):
        for key in (k for k in a if k.startswith("val/loss")):
            assert b[key] == pytest.approx(a[key], rel=1e-4, abs=1e-5), (a["step"], key)


# ------------------------------------------------------------------------------------------------ pieces


def test_lr_schedule_and_weight_decay_groups():
    assert lr_at(0, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 1.0, 10, 100, 0.1) == pytest.approx(1.0)
    assert lr_at(55, 1.0, 10, 100, 0.1) == pytest.approx(0.55)  # half-way down the cosine
    assert lr_at(100, 1.0, 10, 100, 0.1) == pytest.approx(0.1)
    from onemodel.model import OneModel, OneModelConfig

    model = OneModel(OneModelConfig(modalities=(Modality("rgb", "grid", 16, "rgb", grid_size=2),), dim=8,
                                    encoder_depth=1, decoder_depth=1, num_heads=2))
    decay, no_decay = param_groups(model, 0.1)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    assert "head_weight" in decayed and any(n.endswith("weight") and "encoder" in n for n in decayed)
    assert not any("norm" in n or "emb" in n or n.endswith("bias") or "mask_token" in n for n in decayed)
    assert len(decay["params"]) + len(no_decay["params"]) == len(list(model.parameters()))
