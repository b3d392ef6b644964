"""Training configs: the shipped YAML files load strictly; bad configs fail fast with a message naming the problem."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch

from onemodel.config import ConfigError
from onemodel.model import OneModelConfig
from training.config import ModelSection, TrainConfig, load_train_config, validate_train_config

REPO = Path(__file__).resolve().parents[1]
NAMES = ["rgb", "depth", "semseg", "caption", "question", "answer", "det"]


@pytest.fixture
def setup(tmp_path):
    """A bundle directory with one real (tiny, untrained) tokenizer and a token-shard directory (meta only)."""
    from tokenizers_mm.vq import VQTokenizer, VQTokenizerConfig

    VQTokenizer(VQTokenizerConfig(modality="rgb", image_size=16, channel_mult=[1, 2], base_channels=8, latent_dim=8,
                                  codebook_size=16, codebook_dim=8, kmeans_init=False)).save_pretrained(tmp_path / "bundle" / "rgb")
    tokens = tmp_path / "tokens"
    (tokens / "train").mkdir(parents=True)
    (tokens / "meta.json").write_text(json.dumps({"format": "onemodel-token-shards"}))
    raw = tmp_path / "raw"
    (raw / "train").mkdir(parents=True)
    return tmp_path


def overrides(root: Path, *extra: str) -> list[str]:
    return [f"tokenizers={root / 'bundle'}", f"data.sources=[{{path: {root / 'tokens'}}}]", *extra]


@pytest.mark.parametrize("name", ["demo.yaml", "base.yaml"])
def test_shipped_configs_load(name):
    config = load_train_config(REPO / "configs" / name)
    assert isinstance(config, TrainConfig) and config.data.sources
    text = (REPO / "configs" / name).read_text()
    assert "cost" in text.split("\n\n")[0].lower()  # the header comment says what a run costs


def test_model_section_mirrors_onemodel_config():
    ours = {f.name: f.default for f in dataclasses.fields(ModelSection)}
    theirs = {f.name: f.default for f in dataclasses.fields(OneModelConfig) if f.name != "modalities"}
    assert {k: ours[k] for k in theirs} == theirs  # same fields, same defaults
    assert set(ours) - set(theirs) == {"gradient_checkpointing", "max_lengths"}  # training-only extras


def test_overrides_and_types():
    config = load_train_config(REPO / "configs" / "demo.yaml", ["optim.lr=3e-4", "optim.max_steps=7", "data.seed=3"])
    assert config.optim.lr == 3e-4 and config.optim.max_steps == 7 and config.data.seed == 3


def test_unknown_key_is_named(tmp_path):
    with pytest.raises(ConfigError, match="optim.lrr"):
        load_train_config(None, ["optim.lrr=1"])
    path = tmp_path / "c.yaml"
    path.write_text("model:\n  width: 12\n")
    with pytest.raises(ConfigError, match="model.width"):
        load_train_config(path)
    with pytest.raises(ConfigError, match=r"data.sources\[0\].wieght"):
        load_train_config(None, ["data.sources=[{path: x, wieght: 2}]"])


def test_wrong_type_is_named():
    with pytest.raises(ConfigError, match="optim.max_steps"):
        load_train_config(None, ["optim.max_steps=ten"])
    with pytest.raises(ConfigError, match="optim.mixed_precision"):
        load_train_config(None, ["optim.mixed_precision=fp8"])
    with pytest.raises(ConfigError, match="logging.tensorboard"):
        load_train_config(None, ["logging.tensorboard=3"])
    with pytest.raises(ConfigError, match="weight must be > 0"):
        load_train_config(None, ["data.sources=[{path: x, weight: 0}]"])


def test_missing_data_directory(setup):
    config = load_train_config(None, overrides(setup, f"data.sources=[{{path: {setup / 'nope'}}}]"))
    with pytest.raises(FileNotFoundError, match="data.sources\\[0\\].path.*does not exist"):
        validate_train_config(config, 1, NAMES)
    config = load_train_config(None, overrides(setup, "tokenizers=/no/such/bundle"))
    with pytest.raises(FileNotFoundError, match="tokenizers.*does not exist"):
        validate_train_config(config, 1)


def test_raw_shards_need_tokenize_on_the_fly(setup):
    config = load_train_config(None, overrides(setup, f"data.sources=[{{path: {setup / 'raw'}}}]"))
    with pytest.raises(ValueError, match="tokenize_on_the_fly"):
        validate_train_config(config, 1, NAMES)
    config = load_train_config(None, overrides(setup, f"data.sources=[{{path: {setup / 'raw'}, tokenize_on_the_fly: true}}]"))
    validate_train_config(config, 1, NAMES)


def test_masking_modality_without_tokenizer(setup):
    config = load_train_config(None, overrides(setup, "masking.target_modalities=[rgb, caption]"))
    # the bundle holds only an rgb tokenizer: nothing provides "caption"
    with pytest.raises(ValueError, match="masking.target_modalities.*'caption'.*no.*tokenizer|not provided"):
        validate_train_config(config)
    config = load_train_config(None, overrides(setup, "masking.alpha_scale={normals: 2.0}"))
    with pytest.raises(ValueError, match="masking.alpha_scale.*'normals'"):
        validate_train_config(config, 1, NAMES)
    config = load_train_config(None, overrides(setup, f"data.sources=[{{path: {setup / 'tokens'}, modalities: [rgb, normals]}}]"))
    with pytest.raises(ValueError, match=r"data.sources\[0\].modalities.*'normals'"):
        validate_train_config(config, 1, NAMES)


def test_batch_size_divisibility(setup):
    config = load_train_config(None, overrides(setup, "optim.batch_size=10", "optim.micro_batch_size=4"))
    with pytest.raises(ValueError, match="batch_size=10 must be divisible by micro_batch_size \\(4\\) x processes \\(1\\)"):
        validate_train_config(config, 1, NAMES)
    config = load_train_config(None, overrides(setup, "optim.batch_size=12", "optim.micro_batch_size=4"))
    assert validate_train_config(config, 1, NAMES)["grad_accum_steps"] == 3
    with pytest.raises(ValueError, match="x processes \\(2\\)"):
        validate_train_config(config, 2, NAMES)
    config = load_train_config(None, overrides(setup, "optim.batch_size=12"))
    assert validate_train_config(config, 4, NAMES) == {"micro_batch_size": 3, "grad_accum_steps": 1, "modalities": NAMES}


@pytest.mark.skipif(torch.cuda.is_available(), reason="fp16 is allowed on GPUs")
def test_fp16_on_cpu_is_refused(setup):
    config = load_train_config(None, overrides(setup, "optim.mixed_precision=fp16"))
    with pytest.raises(ValueError, match="fp16 needs a CUDA GPU"):
        validate_train_config(config, 1, NAMES)


def test_bad_config_fails_fast_before_any_work(setup, capsys):
    """`onemodel train` with a bad config: one-line error, exit code 2, nothing written."""
    from onemodel.cli import main

    out = setup / "run"
    code = main(["train", *overrides(setup, f"checkpoint.out_dir={out}", "optim.batch_size=10",
                                     "optim.micro_batch_size=4")])
    assert code == 2
    err = capsys.readouterr().err
    assert "batch_size=10 must be divisible" in err and "Traceback" not in err
    assert not out.exists()
    assert main(["train", "optim.max_stepz=3"]) == 2
    assert "optim.max_stepz" in capsys.readouterr().err
