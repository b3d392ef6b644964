"""The strict config loader: unknown keys, wrong types, overrides, nested dataclasses."""

from dataclasses import dataclass, field
from typing import Literal, Optional

import pytest

from onemodel.config import ConfigError, apply_overrides, from_dict, load_config_file, to_dict
from onemodel.modalities import Modality, default_modalities, validate_modalities


@dataclass
class Optim:
    lr: float = 1e-3
    steps: int = 10
    schedule: Literal["cosine", "constant"] = "cosine"


@dataclass
class Top:
    name: str = "x"
    optim: Optim = field(default_factory=Optim)
    sizes: list[int] = field(default_factory=list)
    weight: Optional[float] = None


def test_roundtrip_and_nested():
    cfg = from_dict(Top, {"name": "a", "optim": {"lr": 3, "steps": 5}, "sizes": [1, 2]})
    assert cfg.optim.lr == 3.0 and isinstance(cfg.optim.lr, float)
    assert cfg.sizes == [1, 2]
    assert from_dict(Top, to_dict(cfg)) == cfg


def test_unknown_key_named():
    with pytest.raises(ConfigError, match="'optim.lrr'"):
        from_dict(Top, {"optim": {"lrr": 1.0}})


def test_wrong_type_named():
    with pytest.raises(ConfigError, match="optim.steps"):
        from_dict(Top, {"optim": {"steps": "ten"}})
    with pytest.raises(ConfigError, match="optim.schedule"):
        from_dict(Top, {"optim": {"schedule": "linear"}})
    with pytest.raises(ConfigError, match="sizes"):
        from_dict(Top, {"sizes": 3})
    with pytest.raises(ConfigError, match="optim.steps"):
        from_dict(Top, {"optim": {"steps": True}})


def test_optional_and_overrides():
    data = apply_overrides({"optim": {"lr": 1.0}}, ["optim.lr=3e-4", "weight=0.5", "sizes=[4, 5]", "name=run1"])
    cfg = from_dict(Top, data)
    assert cfg.optim.lr == pytest.approx(3e-4)
    assert cfg.weight == 0.5 and cfg.sizes == [4, 5] and cfg.name == "run1"
    with pytest.raises(ConfigError, match="key.subkey=value"):
        apply_overrides({}, ["optim.lr"])
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(Top, apply_overrides({}, ["optim.nope=1"]))


def test_load_file_errors(tmp_path):
    with pytest.raises(ConfigError, match="does not exist"):
        load_config_file(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_config_file(bad)
    good = tmp_path / "good.yaml"
    good.write_text("# comment\noptim:\n  lr: 3e-4\n")
    assert from_dict(Top, load_config_file(good)).optim.lr == pytest.approx(3e-4)


def test_modalities_validation():
    mods = default_modalities(grid_size=8)
    assert mods[0].num_tokens == 64 and mods[3].num_tokens == 64
    with pytest.raises(ValueError, match="grid_size"):
        Modality("rgb", "grid", 16, "rgb")
    with pytest.raises(ValueError, match="kind"):
        Modality("rgb", "image", 16, "rgb", grid_size=2)
    with pytest.raises(ValueError, match="duplicate"):
        validate_modalities([mods[0], mods[0]])
    assert from_dict(Modality, {"name": "x", "kind": "sequence", "vocab_size": 5, "tokenizer": "text", "max_length": 3}).max_length == 3
