"""Tokenizer training configs and the train-tokenizer CLI: recommended configs == configs/tokenizers/*.yaml, overrides,
dataset meta, a tiny end-to-end CLI run, metrics."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from onemodel.config import ConfigError, load_config_file, to_dict
from tokenizers_mm import load_tokenizer
from tokenizers_mm.metrics import codebook_usage, depth_abs_rel, depth_delta1, mean_iou, pixel_accuracy, psnr
from training.data.shapes import make_shapes_dataset
from training.tokenizer_training import RECOMMENDED, load_vq_training_config, recommended_vq_config

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs" / "tokenizers"


@pytest.mark.parametrize("modality,grid", sorted(RECOMMENDED))
def test_yaml_configs_match_recommended(modality, grid):
    data = load_config_file(CONFIG_DIR / f"{modality}_{grid}x{grid}.yaml")
    from_yaml = load_vq_training_config(modality, path=CONFIG_DIR / f"{modality}_{grid}x{grid}.yaml",
                                        overrides=["tokenizer.num_classes=4"] if modality == "semseg" else [])
    assert to_dict(from_yaml) == to_dict(recommended_vq_config(modality, grid, num_classes=4))
    assert from_yaml.tokenizer.grid_size == grid and data["tokenizer"]["modality"] == modality


def test_overrides_and_meta(tmp_path):
    (tmp_path / "meta.json").write_text(json.dumps({"resolution": 32, "semseg_classes": ["bg", "a", "b", "c", "d"]}))
    cfg = load_vq_training_config("semseg", overrides=["tokenizer.codebook_size=256", "training.steps=7"], data_dir=tmp_path)
    assert cfg.tokenizer.num_classes == 5 and cfg.tokenizer.image_size == 32 and cfg.tokenizer.grid_size == 8
    assert cfg.tokenizer.codebook_size == 256 and cfg.training.steps == 7
    assert load_vq_training_config("rgb", diffusion=True).tokenizer.diffusion == {}
    with pytest.raises(ConfigError, match="tokenizer.codebook"):
        load_vq_training_config("rgb", overrides=["tokenizer.codebook=3"])
    with pytest.raises(ConfigError, match="divisible"):
        load_vq_training_config("rgb", overrides=["tokenizer.image_size=30"])
    with pytest.raises(ValueError, match="only available for --modality rgb"):
        load_vq_training_config("depth", diffusion=True)
    with pytest.raises(ValueError, match="no recommended config"):
        recommended_vq_config("rgb", 4)


def test_metrics_known_values():
    a = np.zeros((2, 4, 4, 3), np.uint8)
    b = a.copy()
    b[0, 0, 0, 0] = 255  # MSE of image 0 = 255^2 / 48
    assert psnr(b, a) == pytest.approx((10 * np.log10(48) + 100.0) / 2)
    gt = np.full((1, 2, 2), 2.0, np.float32)
    pred = np.array([[[2.0, 2.4], [3.0, 1.0]]], np.float32)
    assert depth_abs_rel(pred, gt) == pytest.approx((0 + 0.2 + 0.5 + 0.5) / 4)
    assert depth_delta1(pred, gt) == pytest.approx(0.5)
    seg_gt = np.array([[0, 0, 1, 1]])
    seg = np.array([[0, 1, 1, 1]])
    assert pixel_accuracy(seg, seg_gt) == 0.75
    assert mean_iou(seg, seg_gt) == pytest.approx((0.5 + 2 / 3) / 2)
    usage = codebook_usage([0, 0, 1, 1], 4)
    assert usage["usage"] == 0.5 and usage["perplexity"] == pytest.approx(2.0)
    with pytest.raises(ValueError):
        psnr(a, a[:1])


def test_cli_train_tokenizer(tmp_path, capsys):
    from onemodel.cli import main

    data = tmp_path / "data"
    make_shapes_dataset(data, num_train=12, num_val=4, num_test=1, resolution=16, samples_per_shard=8, progress=False)
    out = tmp_path / "bundle" / "semseg"
    code = main(["train-tokenizer", "--modality", "semseg", "--data", str(data), "--out", str(out), "--steps", "3",
                 "--batch-size", "4", "--no-progress", "tokenizer.codebook_size=64", "tokenizer.base_channels=8"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "val pixel_accuracy" in printed and "val codebook_usage" in printed
    tok = load_tokenizer(out)
    assert tok.config.num_classes == 4 and tok.config.image_size == 16 and tok.vocab_size == 64
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["steps"] == 3 and 0 <= metrics["val"]["pixel_accuracy"] <= 1
    assert main(["train-tokenizer", "--modality", "rgb", "--data", str(data), "--out", str(tmp_path / "x"),
                 "tokenizer.bogus=1"]) == 2
    assert "tokenizer.bogus" in capsys.readouterr().err
