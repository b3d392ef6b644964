"""Pixel-patch inputs (OneModelConfig.input_embeddings = {rgb: pixels}, DESIGN.md §8): patches cut on the token grid,
the model reads them instead of the token ids, a tiny model overfits through them, save/load is bit-identical, every
pipeline method and chained generation (generated rgb decoded to pixels) run, the loader attaches them only where
training matches generation, and ``onemodel train`` fills the patch width from the tokenizer."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_input_embeddings import LENGTHS, bundle, overfit_batch, samples  # noqa: E402,F401  (fixtures, helper)
from test_pipeline import RES  # noqa: E402

from onemodel.batch import collate  # noqa: E402
from onemodel.masking import build_sample  # noqa: E402
from onemodel.modalities import Modality  # noqa: E402
from onemodel.model import OneModel, OneModelConfig  # noqa: E402
from onemodel.pipeline import OneModelPipeline  # noqa: E402
from onemodel.pipeline_inputs import resize_rgb  # noqa: E402
from onemodel.pixel_inputs import attach_pixels, patch_dim, patchify, pixels_key, unpatchify  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
GRID = 4  # the tiny bundle's rgb tokenizer: 16x16 images (the 32x32 scenes are resized to it), 4x4 tokens of 4x4 pixels
SIZE = 16


def _model(bundle, kind="pixels", **kw) -> OneModel:
    mods = tuple(Modality(**s) for s in bundle.modalities(LENGTHS))
    grid = next(m for m in mods if m.name == "rgb").grid_size
    assert grid == GRID and bundle["rgb"].image_size == SIZE
    torch.manual_seed(0)
    return OneModel(OneModelConfig(modalities=mods, dim=64, encoder_depth=2, decoder_depth=2, num_heads=4,
                                   input_embeddings={"rgb": kind},
                                   value_dims={"rgb": patch_dim(SIZE, grid)}, **kw))


def _pixels(image) -> torch.Tensor:
    """The patches the pipeline gives the model for ``image`` (resized to the tokenizer's size)."""
    return patchify(resize_rgb(image, SIZE), GRID)


def test_patches_follow_the_token_grid():
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    p = patchify(img, 4)  # 4x4 grid of 8x8 patches
    assert p.shape == (16, 8 * 8 * 3) and p.dtype == torch.float32
    assert -1.0 <= float(p.min()) and float(p.max()) <= 1.0
    r, c = 2, 3  # patch r * grid + c holds pixels [8r:8r+8, 8c:8c+8]
    want = torch.from_numpy(img[8 * r : 8 * r + 8, 8 * c : 8 * c + 8].astype(np.float32).reshape(-1) / 127.5 - 1)
    assert torch.allclose(p[r * 4 + c], want)
    assert np.array_equal(unpatchify(p, 4), img)
    with pytest.raises(ValueError, match="divide"):
        patchify(img, 5)
    with pytest.raises(TypeError, match="uint8"):
        patchify(img.astype(np.float32), 4)


def test_config_checks(bundle):
    mods = tuple(Modality(**s) for s in bundle.modalities(LENGTHS))
    base = dict(modalities=mods, dim=32, num_heads=2)
    with pytest.raises(ValueError, match=r"value_dims\['rgb'\]"):
        OneModelConfig(**base, input_embeddings={"rgb": "pixels"})
    with pytest.raises(ValueError, match="needs a grid"):
        OneModelConfig(**base, input_embeddings={"caption": "pixels"}, value_dims={"caption": 3})
    with pytest.raises(ValueError, match="does not embed from pixels"):
        OneModelConfig(**base, value_dims={"rgb": 192})
    with pytest.raises(ValueError, match="power-of-two"):
        OneModel(OneModelConfig(**base, input_embeddings={"rgb": "pixels_conv"}, value_dims={"rgb": 75}))


@pytest.mark.parametrize("kind", ["pixels", "pixels_conv", "pixels_cnn"])
def test_the_encoder_reads_the_pixels_not_the_ids(bundle, samples, kind):
    model = _model(bundle, kind).eval()
    mods = model.config.modalities
    n = GRID * GRID
    rgb = torch.randint(0, 32, (n,))
    patches = _pixels(samples[0]["rgb"])
    sample = build_sample({"rgb": rgb}, {"caption": (torch.tensor([5, 6]), torch.arange(2))}, mods)
    other = build_sample({"rgb": torch.randint(0, 32, (n,))}, {"caption": (torch.tensor([5, 6]), torch.arange(2))}, mods)
    sample.values, other.values = {"rgb": patches}, {"rgb": patches}

    def states(*batch_samples):  # encoder output (a new model's decoder ignores the encoder: zero-init branches)
        b = collate(list(batch_samples))
        return model.encode(b.enc_ids, b.enc_mod, b.enc_pos, b.enc_mask, b.enc_values, b.enc_values_mask).states

    with torch.no_grad():
        a = states(sample)
        assert torch.equal(a, states(other))  # different ids, same pixels: same encoding
        sample.values = {"rgb": _pixels(samples[1]["rgb"])}
        assert not torch.allclose(states(sample), a)  # other pixels: another encoding
        # a sample without pixels falls back to its token ids (MaskGIT feeds decoded-so-far tokens)
        sample.values = {}
        c = states(sample)
        assert not torch.allclose(c, a) and torch.isfinite(c).all()
        mixed = collate([sample, other])  # one sample with pixels, one without, in one batch
        assert mixed.enc_values_mask["rgb"].tolist() == [False, True]
        assert mixed.enc_values["rgb"][0].abs().sum() == 0
        mixed.validate(mods)
        assert [set(s.values) for s in mixed.samples()] == [set(), {"rgb"}]
        torch.testing.assert_close(states(sample, other), torch.cat([c, a]))  # batched == alone
    with pytest.raises(ValueError, match="must be"):
        model.encode(*[getattr(collate([other]), f) for f in ("enc_ids", "enc_mod", "enc_pos", "enc_mask")],
                     {"rgb": torch.zeros(1, n, 5)})


@pytest.mark.parametrize("kind", ["pixels", "pixels_conv", "pixels_cnn"])
def test_overfit_every_pipeline_method_chaining_and_save_load(bundle, samples, tmp_path, kind):
    train = [samples[1], samples[29]]
    model = _model(bundle, kind)
    pipe = OneModelPipeline(model, bundle, device="cpu")
    batch, qa, tok = overfit_batch(pipe, train, pixels_of=_pixels)
    proj_before = next(model.input_patches["rgb"].parameters()).detach().clone()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 0.05, loss.item()
    assert not torch.equal(next(model.input_patches["rgb"].parameters()), proj_before)  # the patch embedding learns
    text = bundle.text
    captions = [text.normalize(s["caption"]) for s in train]
    assert pipe.caption([s["rgb"] for s in train]) == captions
    assert pipe.answer([s["rgb"] for s in train], [q["question"] for q in qa]) == [text.normalize(q["answer"]) for q in qa]
    rgb = train[0]["rgb"]
    assert pipe.depth(rgb).shape == (RES, RES) and pipe.segment(rgb).shape == (RES, RES)
    assert isinstance(pipe.detect(rgb), list)
    assert isinstance(pipe.text_to_image(train[0]["caption"], steps=2), Image.Image)
    assert isinstance(pipe.text_to_image(train[0]["caption"], steps=2, via=["semseg"]), Image.Image)
    # text -> rgb tokens through MaskGIT (rgb is the target: decoded-so-far tokens enter as tokens)
    got = pipe.generate({"caption": train[0]["caption"]}, ["rgb"], temperature=0.0, steps=1, return_tokens=True)["rgb"]
    assert torch.equal(got, tok["rgb"][0])
    # chained: the generated rgb is decoded to pixels and read as pixels by the next target, exactly as if the user
    # had given that decoded image
    q = qa[0]["question"]
    chained = pipe.generate({"caption": train[0]["caption"], "question": q}, ["rgb", "answer"], temperature=0.0, steps=1)
    assert chained["answer"] == pipe.answer(chained["rgb"], q)
    calls = []
    real = pipe._pixels_of_tokens
    pipe._pixels_of_tokens = lambda name, toks: calls.append(name) or real(name, toks)
    pipe.generate({"caption": train[0]["caption"]}, ["rgb", "answer"], temperature=0.0, steps=1)
    assert calls == ["rgb"]
    # save / load: bit-identical weights and outputs
    model.save_pretrained(tmp_path / "m")
    loaded = OneModel.from_pretrained(tmp_path / "m")
    assert loaded.config.input_embeddings == {"rgb": kind} and loaded.config.value_dims == {"rgb": 48}
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert any(k.startswith("input_patches.rgb.") for k in a)
    with torch.no_grad():
        assert torch.equal(model(batch).loss, loaded(batch).loss)
    assert OneModelPipeline(loaded, bundle, device="cpu").caption([s["rgb"] for s in train]) == captions


def test_old_models_without_value_dims_load(bundle, samples, tmp_path):
    mods = tuple(Modality(**s) for s in bundle.modalities(LENGTHS))
    model = OneModel(OneModelConfig(modalities=mods, dim=32, encoder_depth=1, decoder_depth=1, num_heads=2))
    model.save_pretrained(tmp_path / "old")
    cfg_path = tmp_path / "old" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["value_dims"]
    cfg_path.write_text(json.dumps(cfg))
    loaded = OneModel.from_pretrained(tmp_path / "old")
    assert loaded.config.value_dims == {} and len(loaded.input_patches) == 0
    assert isinstance(OneModelPipeline(loaded, bundle, device="cpu").caption(samples[0]["rgb"]), str)


def test_loader_gives_pixels_where_generation_would(bundle, samples):
    mods = tuple(Modality(**s) for s in bundle.modalities(LENGTHS))
    rgb_idx = [m.name for m in mods].index("rgb")
    buf = io.BytesIO()
    Image.fromarray(resize_rgb(samples[0]["rgb"], SIZE)).save(buf, format="PNG")
    n = GRID * GRID
    tokens = {"rgb": torch.randint(0, 32, (n,)), pixels_key("rgb"): buf.getvalue()}
    as_input = build_sample({"rgb": tokens["rgb"]}, {}, mods)
    got = attach_pixels(as_input, tokens, {"rgb": GRID}, mods)
    assert torch.equal(got.values["rgb"], _pixels(samples[0]["rgb"]))
    # rgb partly input, partly target (MaskGIT's situation): the known part stays tokens
    half = build_sample({"rgb": (tokens["rgb"][:5], torch.arange(5))}, {"rgb": (tokens["rgb"][5:], torch.arange(5, n))}, mods)
    assert attach_pixels(half, tokens, {"rgb": GRID}, mods).values == {}
    assert bool((half.enc_mod == rgb_idx).any())
    with pytest.raises(ValueError, match="re-run `onemodel tokenize`"):
        attach_pixels(build_sample({"rgb": tokens["rgb"]}, {}, mods), {"rgb": tokens["rgb"]}, {"rgb": GRID}, mods)


def test_train_reads_rgb_as_pixels(tmp_path):
    from test_train import build_tiny_pipeline, tiny_config

    from tokenizers_mm.bundle import TokenizerBundle
    from training.train import train

    root = build_tiny_pipeline()
    out = tmp_path / "run"
    train(tiny_config(root, out, "optim.max_steps=4", "model.input_embeddings={rgb: pixels}"))
    model = OneModel.from_pretrained(out / "model")
    rgb = TokenizerBundle.from_pretrained(root / "bundle")["rgb"]
    grid = model.config.modalities[model.config.modality_index("rgb")].grid_size
    assert model.config.value_dims == {"rgb": patch_dim(int(rgb.image_size), grid)}
    assert torch.isfinite(model.input_patches["rgb"].weight).all()
    with pytest.raises(ValueError, match="only rgb"):
        train(tiny_config(root, tmp_path / "run2", "optim.max_steps=1", "model.input_embeddings={depth: pixels}"))
