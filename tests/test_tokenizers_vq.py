"""VQ image tokenizers: shapes, persistence, tiny overfit round trips (VQ and FSQ), bad input, diffusion decoder."""

from __future__ import annotations

import logging
import warnings

import numpy as np
import pytest
import torch

from tokenizers_mm import load_tokenizer
from tokenizers_mm.metrics import codebook_usage, depth_abs_rel, depth_delta1, mean_iou, pixel_accuracy, psnr
from tokenizers_mm.vq import VQTokenizer, VQTokenizerConfig
from training.data.shapes import generate_sample
from training.tokenizer_training import train_vq_tokenizer

SIZE = 16  # tiny images keep every test in seconds


def tiny_config(modality: str, **kw) -> VQTokenizerConfig:
    base = dict(modality=modality, image_size=SIZE, base_channels=8, channel_mult=[1, 2], norm_groups=4, latent_dim=8,
                codebook_size=64, codebook_dim=8, num_classes=4 if modality == "semseg" else 0,
                depth_min=0.5, depth_max=20.0)
    base.update(kw)
    return VQTokenizerConfig(**base)


@pytest.fixture(scope="module")
def scenes():
    return [generate_sample(seed, resolution=SIZE) for seed in range(6)]


def batch_of(scenes, modality):
    return np.stack([s[modality] for s in scenes])


def test_config_validation():
    assert tiny_config("rgb").grid_size == 8 and tiny_config("rgb").in_channels == 3
    assert VQTokenizerConfig(channel_mult=[1, 2, 2, 4]).grid_size == 8
    assert VQTokenizerConfig(quantizer="fsq", fsq_levels=[8, 5, 5, 5]).vocab_size == 1000
    with pytest.raises(ValueError, match="divisible"):
        VQTokenizerConfig(image_size=60, channel_mult=[1, 2, 2, 2])
    with pytest.raises(ValueError, match="num_classes"):
        VQTokenizerConfig(modality="semseg")
    with pytest.raises(ValueError, match="diffusion"):
        VQTokenizerConfig(modality="depth", diffusion={})
    with pytest.raises(ValueError, match="unknown"):
        VQTokenizerConfig.from_dict({"modality": "rgb", "codebook": 3})
    with pytest.raises(ValueError, match="encoder must be"):
        VQTokenizerConfig(encoder="vit")


def test_patch_encoder_codes_depend_on_their_own_patch_only(scenes):
    """encoder="patch": changing pixels outside token p's patch leaves code p unchanged (and changing the patch
    itself changes its latent); the conv encoder has no such guarantee."""
    torch.manual_seed(0)
    tok = VQTokenizer(tiny_config("rgb", encoder="patch", kmeans_init=False)).eval()
    f = tok.config.downsample_factor
    image = batch_of(scenes, "rgb")[0].copy()
    other = image.copy()
    other[:, :f] = 255 - other[:, :f]  # repaint the first column of patches
    with torch.no_grad():
        z1 = tok.encoder(tok.preprocess(image[None]))
        z2 = tok.encoder(tok.preprocess(other[None]))
    changed = (z1 - z2).abs().amax(dim=1)[0] > 1e-6  # (g, g) which latents moved
    assert changed[:, 0].all() and not changed[:, 1:].any()
    assert torch.equal(tok.encode(image).view(tok.grid_size, -1)[:, 1:], tok.encode(other).view(tok.grid_size, -1)[:, 1:])
    conv = VQTokenizer(tiny_config("rgb", kmeans_init=False)).eval()
    with torch.no_grad():
        leak = (conv.encoder(conv.preprocess(image[None])) - conv.encoder(conv.preprocess(other[None]))).abs().amax(dim=1)[0]
    assert (leak[:, 1] > 1e-6).any()  # the conv encoder's column 1 sees column 0


@pytest.mark.parametrize("modality", ["rgb", "depth", "semseg"])
def test_encode_decode_shapes(scenes, modality):
    torch.manual_seed(0)
    tok = VQTokenizer(tiny_config(modality, kmeans_init=False))
    batch = batch_of(scenes, modality)
    ids = tok.encode(batch)
    assert ids.shape == (len(scenes), tok.tokens_per_image) == (6, 64) and ids.dtype == torch.long
    assert 0 <= ids.min() and ids.max() < tok.vocab_size
    single = tok.encode(batch[0])
    assert torch.equal(single, ids[:1])
    assert torch.equal(tok.encode(torch.from_numpy(batch)), ids)  # tensors work too
    out = tok.decode(ids)
    expected = {"rgb": ((6, SIZE, SIZE, 3), np.uint8), "depth": ((6, SIZE, SIZE), np.float32),
                "semseg": ((6, SIZE, SIZE), np.uint8)}[modality]
    assert out.shape == expected[0] and out.dtype == expected[1]
    assert tok.decode(ids[0]).shape == (1,) + expected[0][1:]


@pytest.mark.parametrize("quantizer", ["vq", "fsq"])
def test_save_load_identical_codes(scenes, tmp_path, quantizer):
    torch.manual_seed(0)
    tok = VQTokenizer(tiny_config("rgb", quantizer=quantizer, fsq_levels=[4, 4, 4]))
    batch = batch_of(scenes, "rgb")
    tok.train()
    tok(tok.preprocess(batch))  # one training forward: k-means init + EMA update change the codebook
    tok.eval()
    ids = tok.encode(batch)
    tok.save_pretrained(tmp_path / "rgb")
    again = load_tokenizer(tmp_path / "rgb")
    assert isinstance(again, VQTokenizer) and again.config == tok.config
    assert torch.equal(again.encode(batch), ids)
    assert np.array_equal(again.decode(ids), tok.decode(ids))


@pytest.mark.parametrize(
    "modality,quantizer",
    [("rgb", "vq"), ("depth", "vq"), ("semseg", "vq"), ("semseg", "fsq"), ("depth", "patch")],
)
def test_overfit_round_trip(scenes, modality, quantizer):
    """A tiny tokenizer overfit on 6 scenes reconstructs them within tolerance ("patch": VQ + patch encoder)."""
    encoder = "patch" if quantizer == "patch" else "conv"
    quantizer = "vq" if quantizer == "patch" else quantizer
    config = tiny_config(modality, quantizer=quantizer, fsq_levels=[8, 5, 5], encoder=encoder)
    data = batch_of(scenes, modality)
    result = train_vq_tokenizer(config, data, data, None, steps=250, batch_size=6, lr=1e-2, seed=0, progress=False)
    tok = result["tokenizer"]
    recon = tok.reconstruct(data)
    # 16x16 scenes are nearly all edges, so the tolerances are loose; an untrained tokenizer is far below each
    if modality == "rgb":
        assert psnr(recon, data) > 20.0
    elif modality == "depth":
        assert depth_delta1(recon, data) > 0.85 and depth_abs_rel(recon, data) < 0.15
    else:
        assert pixel_accuracy(recon, data) > 0.95 and mean_iou(recon, data, 4) > 0.75
    assert result["val"]["codebook_usage"] == codebook_usage(tok.encode(data).numpy(), tok.vocab_size)["usage"]


def test_bad_inputs(scenes, caplog, tmp_path):
    image = scenes[0]["rgb"]
    with pytest.raises(ValueError, match="untrained"):
        VQTokenizer(tiny_config("rgb")).encode(image)  # k-means codebook not initialised yet
    rgb = VQTokenizer(tiny_config("rgb", kmeans_init=False))
    with pytest.raises(TypeError, match="uint8"):
        rgb.encode(image.astype(np.float32) / 255)
    with pytest.raises(ValueError, match="channels-first"):
        rgb.encode(np.zeros((2, 3, SIZE, SIZE), np.uint8))
    with pytest.raises(ValueError, match=r"\(H, W, 3\)"):
        rgb.encode(np.zeros((SIZE, SIZE, 4), np.uint8))
    with pytest.raises(ValueError, match="resize"):
        rgb.encode(np.zeros((SIZE * 2, SIZE * 2, 3), np.uint8))
    with caplog.at_level(logging.WARNING):
        assert rgb.encode(np.zeros((SIZE * 2, SIZE * 2, 3), np.uint8), resize=True).shape == (1, 64)
    assert "resizing" in caplog.text
    read_only = image.copy()
    read_only.setflags(write=False)  # as decoded from a shard: encoded without torch's non-writable warning
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert torch.equal(rgb.encode(read_only), rgb.encode(image))
    with pytest.raises(ValueError, match="empty"):
        rgb.encode(np.zeros((0, SIZE, SIZE, 3), np.uint8))
    with pytest.raises(ValueError, match="empty"):
        rgb.encode([])
    with pytest.raises(TypeError, match="path"):
        rgb.encode("image.png")
    with pytest.raises(ValueError, match=r"\(B, 64\)"):
        rgb.decode(torch.zeros(2, 10, dtype=torch.long))
    with pytest.raises(ValueError, match="token ids must be in"):
        rgb.decode(torch.full((1, 64), 64))
    with pytest.raises(TypeError, match="integers"):
        rgb.decode(torch.zeros(1, 64))

    semseg = VQTokenizer(tiny_config("semseg", kmeans_init=False))
    with pytest.raises(ValueError, match=r"\[0, 4\)"):
        semseg.encode(np.full((SIZE, SIZE), 7, np.uint8))
    with pytest.raises(TypeError, match="integer"):
        semseg.encode(np.zeros((SIZE, SIZE), np.float32))
    depth = VQTokenizer(tiny_config("depth", kmeans_init=False))
    with pytest.raises(TypeError, match="float"):
        depth.encode(np.ones((SIZE, SIZE), np.int32))
    with pytest.raises(ValueError, match="NaN"):
        depth.encode(np.full((SIZE, SIZE), np.nan, np.float32))
    with pytest.raises(ValueError, match=">= 0"):
        depth.encode(np.full((SIZE, SIZE), -1.0, np.float32))

    rgb.save_pretrained(tmp_path / "t")
    (tmp_path / "t" / "model.safetensors").unlink()
    with pytest.raises(ValueError, match="model.safetensors"):
        load_tokenizer(tmp_path / "t")
    depth.save_pretrained(tmp_path / "d")
    rgb.save_pretrained(tmp_path / "t")
    (tmp_path / "d" / "model.safetensors").replace(tmp_path / "t" / "model.safetensors")
    with pytest.raises(ValueError, match="does not match"):
        load_tokenizer(tmp_path / "t")


def test_depth_normalisation_round_trip():
    tok = VQTokenizer(tiny_config("depth"))
    metres = torch.tensor([0.1, 0.5, 1.0, 4.2, 20.0, 80.0])
    norm = tok.normalize_depth(metres)
    assert norm.min() >= -1 and norm.max() <= 1
    back = tok.denormalize_depth(norm)
    assert torch.allclose(back, metres.clamp(0.5, 20.0), rtol=1e-5)


def test_diffusion_decoder_tiny(scenes, tmp_path):
    from tokenizers_mm.diffusion import train_diffusion_decoder

    torch.manual_seed(0)
    diffusion = {"block_out_channels": [8, 16], "norm_num_groups": 4, "num_inference_steps": 3}
    tok = VQTokenizer(tiny_config("rgb", diffusion=diffusion, kmeans_init=False))
    data = batch_of(scenes, "rgb")
    dec = tok.diffusion_decoder
    x = tok.preprocess(data)
    latents = tok.quantize(tok.encoder(x))[0].detach()
    scheduler = dec.make_scheduler()

    def fixed_loss() -> float:
        with torch.no_grad():
            return float(np.mean([dec.loss(x, latents, scheduler, torch.Generator().manual_seed(s)).item() for s in range(4)]))

    before = fixed_loss()
    result = train_diffusion_decoder(tok, data, data, steps=30, batch_size=6, lr=3e-3, seed=0, progress=False)
    assert fixed_loss() < before
    assert set(result) >= {"psnr_conv", "psnr_diffusion", "final_loss"}
    ids = tok.encode(data[:2])
    a = tok.decode(ids, use_diffusion=True, seed=3)
    assert a.shape == (2, SIZE, SIZE, 3) and a.dtype == np.uint8
    assert np.array_equal(a, tok.decode(ids, use_diffusion=True, seed=3))
    tok.save_pretrained(tmp_path / "rgb")
    again = load_tokenizer(tmp_path / "rgb")
    assert np.array_equal(again.decode(ids, use_diffusion=True, seed=3), a)
    with pytest.raises(ValueError, match="diffusion"):
        VQTokenizer(tiny_config("rgb", kmeans_init=False)).decode(ids, use_diffusion=True)
