"""CLIP features as a one-model input (OneModelConfig.input_embeddings = {rgb: pixels_clip}, issue 15 item 6): rgb
travels as pixel patches, the frozen vision tower of a contrastive encoder reads them and a learned projection maps
its patch features to the model width. The tower reproduces the encoder's own ``patch_features``, stays frozen
(unchanged after training steps, no optimizer state), a tiny model overfits through it, pipeline methods run,
save -> load is bit-identical without the encoder's directory, ``onemodel train`` copies the encoder in, old models
load, and a patch grid that differs from the token grid fails with one clear line."""

from __future__ import annotations

import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_input_embeddings import LENGTHS, bundle, overfit_batch, samples  # noqa: E402,F401  (fixtures, helper)

from onemodel.contrastive import ContrastiveConfig, ImageTextEncoder  # noqa: E402
from onemodel.input_embeddings import FrozenFeatureEmbedding, feature_encoder_spec  # noqa: E402
from onemodel.modalities import Modality  # noqa: E402
from onemodel.model import OneModel, OneModelConfig  # noqa: E402
from onemodel.pipeline import OneModelPipeline  # noqa: E402
from onemodel.pipeline_inputs import resize_rgb  # noqa: E402
from onemodel.pixel_inputs import patch_dim, patchify  # noqa: E402
from training.train import param_groups  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GRID, SIZE = 4, 16  # the tiny bundle's rgb tokenizer: 16x16 images, 4x4 tokens of 4x4 pixels


def tiny_clip(text_tokenizer, image_size: int = SIZE, patch_size: int = SIZE // GRID, seed: int = 0) -> ImageTextEncoder:
    torch.manual_seed(seed)
    cfg = ContrastiveConfig(image_size=image_size, patch_size=patch_size, vision_width=32, vision_layers=1,
                            vision_heads=2, text_width=32, text_layers=1, text_heads=2, embed_dim=16)
    return ImageTextEncoder.from_config(cfg, text_tokenizer).eval()


def _modalities(bundle):
    return tuple(Modality(**s) for s in bundle.modalities(LENGTHS))


def _model(bundle, encoder, kind: str = "pixels_clip") -> OneModel:
    torch.manual_seed(0)
    model = OneModel(OneModelConfig(modalities=_modalities(bundle), dim=64, encoder_depth=2, decoder_depth=2,
                                    num_heads=4, input_embeddings={"rgb": kind},
                                    value_dims={"rgb": patch_dim(SIZE, GRID)},
                                    feature_encoders={"rgb": feature_encoder_spec(encoder)}))
    model.input_patches["rgb"].load_encoder(encoder)
    return model


def _pixels(image) -> torch.Tensor:
    return patchify(resize_rgb(image, SIZE), GRID)


def test_config_checks_and_grid_mismatch(bundle):
    mods = _modalities(bundle)
    base = dict(modalities=mods, dim=32, num_heads=2, value_dims={"rgb": 48}, input_embeddings={"rgb": "pixels_clip"})
    with pytest.raises(ValueError, match=r"needs feature_encoders\['rgb'\].*model.feature_encoders"):
        OneModelConfig(**base)
    with pytest.raises(ValueError, match="is 'runs/clip', a directory"):
        OneModelConfig(**base, feature_encoders={"rgb": "runs/clip"})
    wrong = tiny_clip(bundle.text, image_size=16, patch_size=8)  # 2x2 patches for a 4x4 token grid
    with pytest.raises(ValueError, match=r"patch grid \(16px / patch 8 = 2x2\) differs from 'rgb''s 4x4 token grid"):
        OneModelConfig(**base, feature_encoders={"rgb": feature_encoder_spec(wrong)})
    with pytest.raises(ValueError, match="does not read as one of"):
        OneModelConfig(modalities=mods, dim=32, num_heads=2, feature_encoders={"rgb": feature_encoder_spec(wrong)})
    other = tiny_clip(bundle.text, image_size=32, patch_size=8)  # same 4x4 grid, larger images: resized to it
    model = OneModel(OneModelConfig(**base, feature_encoders={"rgb": feature_encoder_spec(other)}))
    with pytest.raises(ValueError, match="does not match this model's pixels_clip input"):
        model.input_patches["rgb"].load_encoder(tiny_clip(bundle.text))  # 4px patches: another patch embedding


def test_tower_reproduces_the_encoders_patch_features(bundle, samples):
    encoder = tiny_clip(bundle.text)
    model = _model(bundle, encoder)
    emb = model.input_patches["rgb"]
    assert isinstance(emb, FrozenFeatureEmbedding)
    images = [resize_rgb(s["rgb"], SIZE) for s in samples[:3]]
    values = torch.stack([patchify(a, GRID) for a in images])
    want = encoder.patch_features(images)  # (3, 16, 32): the encoder's own preprocessing
    torch.testing.assert_close(emb.features(values), want, atol=1e-5, rtol=1e-5)
    # a tower with other weights gives other features (the copy is what makes them equal)
    assert not torch.allclose(FrozenFeatureEmbedding(feature_encoder_spec(encoder), 48, GRID, 64).features(values), want)


@pytest.mark.parametrize("kind", ["pixels_clip", "pixels_and_clip"])
def test_frozen_overfit_pipeline_and_save_load(bundle, samples, tmp_path, kind):
    encoder = tiny_clip(bundle.text)
    model = _model(bundle, encoder, kind)
    tower = model.input_patches["rgb"].tower
    pixel_linear = model.input_patches["rgb"].pixel_linear
    assert (pixel_linear is not None) == (kind == "pixels_and_clip")
    if pixel_linear is not None:  # the raw patches are read too: another patch gives another embedding
        values = torch.stack([_pixels(samples[1]["rgb"])])
        with torch.no_grad():
            features_only = model.input_patches["rgb"].linear(model.input_patches["rgb"].norm(
                model.input_patches["rgb"].features(values)))
            torch.testing.assert_close(model.input_patches["rgb"](values), features_only + pixel_linear(values))
    tower_before = {k: v.clone() for k, v in tower.state_dict().items()}
    train = [samples[1], samples[29]]
    pipe = OneModelPipeline(model, bundle, device="cpu")
    batch, qa, _ = overfit_batch(pipe, train, pixels_of=_pixels, draw=False)
    groups = param_groups(model, 0.05)
    in_optimizer = {id(p) for g in groups for p in g["params"]}
    assert not any(id(p) in in_optimizer for p in tower.parameters())  # frozen: not in the optimizer
    assert id(model.input_patches["rgb"].linear.weight) in in_optimizer
    opt = torch.optim.AdamW(groups, lr=3e-3)
    proj_before = model.input_patches["rgb"].linear.weight.detach().clone()
    model.train()
    assert not tower.training  # the tower stays in eval mode
    for _ in range(120):
        loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 0.05, loss.item()
    assert all(p.grad is None for p in tower.parameters())
    assert all(torch.equal(tower.state_dict()[k], v) for k, v in tower_before.items())  # unchanged
    assert not any(id(p) in {id(q) for q in opt.state} for p in tower.parameters())  # no optimizer state
    assert not torch.equal(model.input_patches["rgb"].linear.weight, proj_before)  # the projection learns
    if pixel_linear is not None:
        assert id(pixel_linear.weight) in in_optimizer and pixel_linear.weight.grad is not None
    text = bundle.text
    assert pipe.caption([s["rgb"] for s in train]) == [text.normalize(s["caption"]) for s in train]
    assert pipe.answer([s["rgb"] for s in train], [q["question"] for q in qa]) == [text.normalize(q["answer"]) for q in qa]
    # save / load: bit-identical, with the tower's weights in model.safetensors (no encoder directory needed)
    model.save_pretrained(tmp_path / "m")
    loaded = OneModel.from_pretrained(tmp_path / "m")
    assert loaded.config.feature_encoders == model.config.feature_encoders
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("input_patches.rgb.tower.") for k in a)
    with torch.no_grad():
        assert torch.equal(model(batch).loss, loaded(batch).loss)


def test_old_models_without_feature_encoders_load(bundle, samples, tmp_path):
    model = OneModel(OneModelConfig(modalities=_modalities(bundle), dim=32, encoder_depth=1, decoder_depth=1,
                                    num_heads=2, input_embeddings={"rgb": "pixels"}, value_dims={"rgb": 48}))
    model.save_pretrained(tmp_path / "old")
    cfg_path = tmp_path / "old" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["feature_encoders"]
    cfg_path.write_text(json.dumps(cfg))
    loaded = OneModel.from_pretrained(tmp_path / "old")
    assert loaded.config.feature_encoders == {}
    assert isinstance(OneModelPipeline(loaded, bundle, device="cpu").caption(samples[0]["rgb"]), str)


def test_train_copies_the_encoder_in(tmp_path):
    from test_train import build_tiny_pipeline, tiny_config

    from tokenizers_mm.bundle import TokenizerBundle
    from training.train import train

    root = build_tiny_pipeline()
    bundle = TokenizerBundle.from_pretrained(root / "bundle")
    size = int(bundle["rgb"].image_size)
    grid = next(Modality(**s) for s in bundle.modalities() if s["name"] == "rgb").grid_size
    encoder = tiny_clip(bundle.text, image_size=size, patch_size=size // grid, seed=3)
    enc_dir = tmp_path / "clip"
    encoder.save_pretrained(enc_dir)
    out = tmp_path / "run"
    train(tiny_config(root, out, "optim.max_steps=3", "model.input_embeddings={rgb: pixels_clip}",
                      f"model.feature_encoders={{rgb: {enc_dir}}}"))
    shutil.rmtree(enc_dir)  # the trained model no longer needs the encoder's directory
    model = OneModel.from_pretrained(out / "model")
    tower = model.input_patches["rgb"].tower.state_dict()
    want = encoder.hf.vision_model.state_dict()
    assert tower.keys() == want.keys() and all(torch.equal(tower[k], want[k]) for k in want)  # copied, not trained
    assert model.config.feature_encoders["rgb"]["vision_config"]["patch_size"] == size // grid
    with pytest.raises(ValueError, match="not a contrastive encoder directory"):
        train(tiny_config(root, tmp_path / "run2", "optim.max_steps=1", "model.input_embeddings={rgb: pixels_clip}",
                          f"model.feature_encoders={{rgb: {tmp_path / 'nowhere'}}}"))


def test_convnet_stem_encoder_feeds_the_same_features(bundle, samples, tmp_path):
    """An encoder trained with ``vision_stem="convnet"``: the one model's frozen tower carries the stem, reproduces
    the encoder's patch features, and save -> load keeps them (the stem's weights travel in model.safetensors)."""
    torch.manual_seed(0)
    cfg = ContrastiveConfig(image_size=SIZE, patch_size=SIZE // GRID, vision_width=32, vision_layers=1, vision_heads=2,
                            text_width=32, text_layers=1, text_heads=2, embed_dim=16, vision_stem="convnet",
                            vision_stem_width=8)
    encoder = ImageTextEncoder.from_config(cfg, bundle.text).eval()
    model = _model(bundle, encoder).eval()
    assert model.config.feature_encoders["rgb"]["stem_width"] == 8
    images = [resize_rgb(s["rgb"], SIZE) for s in samples[:3]]
    values = torch.stack([patchify(a, GRID) for a in images])
    torch.testing.assert_close(model.input_patches["rgb"].features(values), encoder.patch_features(images),
                               atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="vision stem does not match"):
        model.input_patches["rgb"].load_encoder(tiny_clip(bundle.text))  # no stem
    model.save_pretrained(tmp_path / "m")
    loaded = OneModel.from_pretrained(tmp_path / "m").eval()
    torch.testing.assert_close(loaded.input_patches["rgb"].features(values), encoder.patch_features(images),
                               atol=1e-5, rtol=1e-5)
