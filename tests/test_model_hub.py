"""save_pretrained / from_pretrained: HF hub layout, bit-identical round trip, strict refusals, tied weights."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from onemodel.batch import collate
from onemodel.config import ConfigError
from onemodel.model import OneModel

from test_model import _one_thread, sample, tiny  # noqa: F401  (fixture re-used)


def _batch():
    return collate([sample(21, n_in=5, n_grid_tgt=4, cap_len=6), sample(22, n_in=3, n_grid_tgt=2, cap_len=3)])


@pytest.mark.parametrize("tie", [False, True])
def test_save_load_gives_bit_identical_logits(tmp_path, tie):
    model = tiny(tie_embeddings=tie, learned_positions=True)
    with torch.no_grad():  # make every tensor differ from a fresh init
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.01)
    model.save_pretrained(tmp_path / "m")
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((tmp_path / "m" / "config.json").read_text())
    assert cfg["class"] == "OneModel" and cfg["format_version"] == 1 and cfg["tie_embeddings"] is tie
    loaded = OneModel.from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and not loaded.training
    if tie:
        assert loaded.head_weight is loaded.tok_emb.weight
        stored = load_file(str(tmp_path / "m" / "model.safetensors"))
        assert ("head_weight" in stored) + ("tok_emb.weight" in stored) == 1  # the shared tensor is written once
    b = _batch()
    a, c = model(b), loaded(b)
    for name in a.logits:
        assert torch.equal(a.logits[name], c.logits[name])


def test_model_saved_before_the_aligned_context_still_loads(tmp_path):
    """config.json files written before ``aligned_context`` existed lack the key (and the weights): they load as
    aligned_context=False with identical logits; a current save always writes the key."""
    model = tiny(aligned_context=False)
    model.save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg.pop("aligned_context") is False
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    loaded = OneModel.from_pretrained(tmp_path)
    assert loaded.config.aligned_context is False and loaded.aligned_proj is None
    b = _batch()
    assert torch.equal(model(b).logits["rgb"], loaded(b).logits["rgb"])


def test_unknown_config_key_is_refused_with_its_name(tmp_path):
    tiny().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["num_expert"] = 8
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConfigError, match="num_expert"):
        OneModel.from_pretrained(tmp_path)


def test_shape_mismatch_is_refused_with_the_tensor_name(tmp_path):
    tiny().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    tensors["decoder.0.mlp.fc1.weight"] = torch.zeros(64, 32)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"decoder\.0\.mlp\.fc1\.weight"):
        OneModel.from_pretrained(tmp_path)


def test_config_that_does_not_fit_the_weights_is_refused(tmp_path):
    tiny().save_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["modalities"][0]["vocab_size"] = 40
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ValueError, match=r"tensor '(tok_emb\.weight|head_weight)' has shape \(72, 32\).*\(80, 32\)"):
        OneModel.from_pretrained(tmp_path)


def test_missing_and_unexpected_tensors_are_refused(tmp_path):
    tiny().save_pretrained(tmp_path)
    path = tmp_path / "model.safetensors"
    tensors = load_file(str(path))
    del tensors["encoder_norm.weight"]
    tensors["extra.bias"] = torch.zeros(3)
    save_file(tensors, str(path))
    with pytest.raises(ValueError, match=r"encoder_norm\.weight.*extra\.bias"):
        OneModel.from_pretrained(tmp_path)


def test_missing_files_and_wrong_class_give_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OneModel.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="config.json"):
        OneModel.from_pretrained(tmp_path)
    tiny().save_pretrained(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="model.safetensors"):
        OneModel.from_pretrained(tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**cfg, "class": "VQTokenizer"}))
    with pytest.raises(ValueError, match="VQTokenizer"):
        OneModel.from_pretrained(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match="not valid JSON"):
        OneModel.from_pretrained(tmp_path)


def test_pickle_files_are_never_read(tmp_path):
    """A torch.save'd file in place of the safetensors file is refused, not unpickled."""
    model = tiny()
    model.save_pretrained(tmp_path)
    torch.save(model.state_dict(), tmp_path / "model.safetensors")
    with pytest.raises(ValueError, match="safetensors"):
        OneModel.from_pretrained(tmp_path)
