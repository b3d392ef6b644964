"""The contrastive image-text encoder: losses by hand, overfitting, save/load, transformers checkpoints, the
cross-process gather, and the train-clip run directory (resume, eval)."""

from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from onemodel.contrastive import ContrastiveConfig, ImageTextEncoder, clip_loss, siglip_loss

REPO = Path(__file__).resolve().parents[1]
TINY = dict(image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=2, text_width=32,
            text_layers=1, text_heads=2, embed_dim=16, text_max_length=48)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def scenes():
    from training.data.shapes import generate_split

    return list(generate_split("train", 24, resolution=32))


@pytest.fixture(scope="module")
def tokenizer(scenes):
    from tokenizers_mm.text import TextTokenizer

    return TextTokenizer.train([s["caption"] for s in scenes] + ["a picture of a"], vocab_size=400,
                               num_sentinels=1, num_loc_bins=2)


def _pooled(out):
    """transformers 5 returns a model output from get_*_features, 4.x a tensor."""
    return getattr(out, "pooler_output", out)


def tiny_encoder(tokenizer, seed=0, **kw) -> ImageTextEncoder:
    torch.manual_seed(seed)
    return ImageTextEncoder.from_config(ContrastiveConfig(**{**TINY, **kw}), tokenizer)


# ------------------------------------------------------------------------------------------------ losses


def _hand_case():
    """3 pairs: images e1, e2, e3; texts e1, (e1+e2)/sqrt(2), e3 -> cosines S below; scale 2."""
    img = torch.eye(3)
    txt = torch.tensor([[1.0, 0, 0], [1 / math.sqrt(2), 1 / math.sqrt(2), 0], [0, 0, 1.0]])
    s = [[1.0, 1 / math.sqrt(2), 0.0], [0.0, 1 / math.sqrt(2), 0.0], [0.0, 0.0, 1.0]]
    return img, txt, s


def test_clip_loss_matches_hand_computation():
    img, txt, s = _hand_case()
    scale = 2.0
    i2t = [-(scale * s[i][i]) + math.log(sum(math.exp(scale * s[i][j]) for j in range(3))) for i in range(3)]
    t2i = [-(scale * s[j][j]) + math.log(sum(math.exp(scale * s[i][j]) for i in range(3))) for j in range(3)]
    expected = 0.5 * (sum(i2t) / 3 + sum(t2i) / 3)
    got = clip_loss(img, txt, torch.tensor(math.log(scale)))
    assert got.item() == pytest.approx(expected, abs=1e-6)


def test_siglip_loss_matches_hand_computation():
    img, txt, s = _hand_case()
    scale, bias = 2.0, -1.0
    total = 0.0
    for i in range(3):
        for j in range(3):
            z = 1.0 if i == j else -1.0
            total += -math.log(1.0 / (1.0 + math.exp(-z * (scale * s[i][j] + bias))))
    got = siglip_loss(img, txt, torch.tensor(math.log(scale)), torch.tensor(bias))
    assert got.item() == pytest.approx(total / 3, abs=1e-6)


def test_losses_with_hard_negatives_match_hand_computation():
    """One extra negative text n = e2 joins every image's image->text softmax (CLIP) or adds its -1 pairs (SigLIP);
    an invalid negative is the same as none."""
    img, txt, s = _hand_case()
    neg = torch.tensor([[0.0, 1.0, 0.0]])
    sn = [0.0, 1.0, 0.0]  # cos(img_i, n)
    scale, bias = 2.0, -1.0
    i2t = [-(scale * s[i][i]) + math.log(sum(math.exp(scale * s[i][j]) for j in range(3)) + math.exp(scale * sn[i]))
           for i in range(3)]
    t2i = [-(scale * s[j][j]) + math.log(sum(math.exp(scale * s[i][j]) for i in range(3))) for j in range(3)]
    got = clip_loss(img, txt, torch.tensor(math.log(scale)), neg)
    assert got.item() == pytest.approx(0.5 * (sum(i2t) / 3 + sum(t2i) / 3), abs=1e-6)
    total = sum(-math.log(1 / (1 + math.exp(-(1.0 if i == j else -1.0) * (scale * s[i][j] + bias))))
                for i in range(3) for j in range(3))
    total += sum(-math.log(1 / (1 + math.exp(scale * sn[i] + bias))) for i in range(3))
    got = siglip_loss(img, txt, torch.tensor(math.log(scale)), torch.tensor(bias), neg)
    assert got.item() == pytest.approx(total / 3, abs=1e-6)
    off = torch.tensor([False])
    assert clip_loss(img, txt, torch.tensor(0.7), neg, off).item() == pytest.approx(
        clip_loss(img, txt, torch.tensor(0.7)).item(), abs=1e-6)
    assert siglip_loss(img, txt, torch.tensor(0.7), torch.tensor(bias), neg, off).item() == pytest.approx(
        siglip_loss(img, txt, torch.tensor(0.7), torch.tensor(bias)).item(), abs=1e-6)


def test_swapped_word_negatives():
    from training.hard_negatives import HardNegativeConfig, negative_captions, swap_word

    groups = [["circle", "square", "triangle"]]
    text = "a picture of a small red circle and a large blue square. the red circle is left of the blue square."
    seen = set()
    for seed in range(40):
        out = swap_word(text, groups, np.random.default_rng(seed))
        assert out != text and len(out.split()) == len(text.split())
        changed = [(a, b) for a, b in zip(text.split(), out.split()) if a != b]
        # one noun phrase changed, everywhere it occurs: "red circle" twice or "blue square" twice
        assert len(changed) == 2 and changed[0] == changed[1], out
        assert changed[0][1].rstrip(".") in {"circle", "square", "triangle"}
        seen.add(out)
    assert len(seen) == 4  # red circle -> square / triangle, blue square -> circle / triangle
    assert swap_word("no shapes at all", groups, np.random.default_rng(0)) is None
    config = HardNegativeConfig(swap_groups=groups, per_caption=2)
    texts = [text, "there is a large white triangle.", "nothing here"]
    negs = negative_captions(texts, [10, 11, 12], config, seed=3)
    assert len(negs) == 6 and negs[2] is None and negs[5] is None
    assert negs == negative_captions(texts, [10, 11, 12], config, seed=3)  # a pure function of (seed, position)
    assert negs[1] == negative_captions(texts[1:2], [11], config, seed=3)[0]
    with pytest.raises(ValueError, match="swap_groups"):
        HardNegativeConfig(swap_groups=[["circle"]])
    with pytest.raises(ValueError, match="two groups"):
        HardNegativeConfig(swap_groups=[["red", "blue"], ["blue", "green"]])


# ------------------------------------------------------------------------------------------------ model


@pytest.mark.parametrize("loss", ["clip", "siglip"])
def test_tiny_model_overfits_a_batch(tokenizer, scenes, loss):
    from training.evaluation.contrastive import retrieval_metrics

    batch = scenes[:8]
    assert len({s["caption"] for s in batch}) == 8
    # SigLIP from bias -5 (the paper's -10 suits batches of thousands; with 8 pairs it leaves the plateau later)
    model = tiny_encoder(tokenizer, loss=loss, logit_bias_init=-5.0)
    pixels = model.preprocess([s["rgb"] for s in batch])
    ids, mask = model.tokenize([s["caption"] for s in batch])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(80 if loss == "clip" else 150):
        out = model(pixels, ids, mask)
        first = first if first is not None else out.loss.item()
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert out.loss.item() < 0.2 * first
    model.eval()
    r = retrieval_metrics(model.encode_image([s["rgb"] for s in batch]), model.encode_text([s["caption"] for s in batch]),
                          [s["caption"] for s in batch])
    assert r["i2t_r1"] == 1.0 and r["t2i_r1"] == 1.0


def test_save_load_gives_identical_embeddings_and_clip_vision_model_loads(tokenizer, scenes, tmp_path):
    from transformers import CLIPVisionModel

    model = tiny_encoder(tokenizer, loss="siglip", coca_weight=0.5, coca_width=32, coca_heads=2, coca_layers=1).eval()
    with torch.no_grad():
        model.logit_bias.fill_(-3.5)  # a trained value, not the init: it must survive the round trip
    images, texts = [s["rgb"] for s in scenes[:5]], [s["caption"] for s in scenes[:5]]
    model.save_pretrained(tmp_path / "enc")
    loaded = ImageTextEncoder.from_pretrained(tmp_path / "enc")
    assert torch.equal(loaded.encode_image(images), model.encode_image(images))
    assert torch.equal(loaded.encode_text(texts), model.encode_text(texts))
    assert loaded.logit_bias.item() == -3.5
    for (name, a), b in zip(model.state_dict().items(), loaded.state_dict().values()):
        assert torch.equal(a, b), name
    # the VLM reads the vision tower straight from the directory with transformers
    vision = CLIPVisionModel.from_pretrained(tmp_path / "enc").eval()
    with torch.no_grad():
        ref = vision(pixel_values=model.preprocess(images)).last_hidden_state[:, 1:]
    feats = loaded.image_patch_features(images)
    assert feats.shape == (5, 16, 32)
    assert torch.allclose(feats, ref, atol=1e-6)


def test_patch_features_are_a_frozen_row_major_grid(tokenizer, scenes):
    model = tiny_encoder(tokenizer, image_size=32, patch_size=8)
    model.train()
    images = [s["rgb"] for s in scenes[:3]]
    assert model.patch_grid == (4, 4) and model.patch_feature_dim == 32
    feats = model.patch_features(images)
    assert feats.shape == (3, 16, 32) and not feats.requires_grad and feats.grad_fn is None
    assert model.training  # the training flag is restored
    assert torch.equal(feats, model.patch_features(images))  # deterministic
    assert all(p.grad is None for p in model.parameters())
    # token r * w + c is patch (row r, column c): at layer 0 (patch embeddings) a change in the pixels of patch
    # (2, 1) changes that token only
    pixels = model.preprocess(images[:1])
    base = model.patch_features(pixels, layer=0)
    pixels[:, :, 16:24, 8:16] += 1.0
    changed = (model.patch_features(pixels, layer=0) - base).abs().amax(-1)[0]
    assert changed.nonzero().flatten().tolist() == [2 * 4 + 1]
    assert torch.equal(model.patch_features(images, layer=-1), feats)
    assert model.patch_features(images, layer=-2).shape == (3, 16, 32)
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        model.patch_features(images, layer=5)


def test_transformers_clip_checkpoint_loads_with_the_same_embeddings(tokenizer, scenes, tmp_path):
    from transformers import CLIPConfig, CLIPModel

    hf_tok = tokenizer.to_transformers()
    config = CLIPConfig(
        text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=48, projection_dim=16,
                         pad_token_id=tokenizer.pad_id, bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8, projection_dim=16),
        projection_dim=16)
    torch.manual_seed(1)
    ref = CLIPModel(config).eval()
    ref.save_pretrained(tmp_path / "hf")
    hf_tok.save_pretrained(tmp_path / "hf")
    enc = ImageTextEncoder.from_pretrained(tmp_path / "hf")
    assert enc.hf_tokenizer is not None and enc.config.image_size == 32
    images, texts = [s["rgb"] for s in scenes[:4]], [s["caption"] for s in scenes[:4]]
    pixels = enc.preprocess(images)
    batch = hf_tok(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        want_img = torch.nn.functional.normalize(_pooled(ref.get_image_features(pixel_values=pixels)), dim=-1)
        want_txt = torch.nn.functional.normalize(_pooled(ref.get_text_features(**batch)), dim=-1)
    assert torch.allclose(enc.encode_image(images), want_img, atol=1e-6)
    assert torch.allclose(enc.encode_text(texts), want_txt, atol=1e-6)
    probs = enc.zero_shot(images, ["red circle", "blue square"], "a picture of a {}")["probs"]
    assert probs.shape == (4, 2) and torch.allclose(probs.sum(-1), torch.ones(4))


def test_transformers_siglip_checkpoint_loads_with_the_same_embeddings(tokenizer, scenes, tmp_path):
    from transformers import SiglipConfig, SiglipModel

    hf_tok = tokenizer.to_transformers()
    config = SiglipConfig(
        text_config=dict(vocab_size=tokenizer.vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=48),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8))
    torch.manual_seed(2)
    ref = SiglipModel(config).eval()
    ref.save_pretrained(tmp_path / "sig")
    hf_tok.save_pretrained(tmp_path / "sig")
    enc = ImageTextEncoder.from_pretrained(tmp_path / "sig")
    assert enc.model_type == "siglip" and enc.config.loss == "siglip"
    images, texts = [s["rgb"] for s in scenes[:3]], [s["caption"] for s in scenes[:3]]
    pixels = enc.preprocess(images)
    batch = hf_tok(texts, padding="max_length", max_length=48, truncation=True, return_tensors="pt")
    with torch.no_grad():
        want_img = torch.nn.functional.normalize(_pooled(ref.get_image_features(pixel_values=pixels)), dim=-1)
        want_txt = torch.nn.functional.normalize(_pooled(ref.get_text_features(input_ids=batch["input_ids"])),
                                                 dim=-1)
    assert torch.allclose(enc.encode_image(images), want_img, atol=1e-6)
    assert torch.allclose(enc.encode_text(texts), want_txt, atol=1e-6)
    assert enc.image_patch_features(images).shape == (3, 16, 32)  # SigLIP has no CLS token


def test_bad_inputs_give_clear_errors(tokenizer):
    model = tiny_encoder(tokenizer)
    with pytest.raises(TypeError, match="images"):
        model.encode_image(3.5)
    with pytest.raises(ValueError, match=r"images\[0\].*float images"):
        model.encode_image(np.full((8, 8, 3), 2.0, dtype=np.float32))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        model.encode_image("/no/such/image.png")
    with pytest.raises(TypeError, match="texts"):
        model.encode_text([1, 2])
    with pytest.raises(ValueError, match="labels"):
        model.zero_shot(np.zeros((8, 8, 3), dtype=np.uint8), "red")
    with pytest.raises(ValueError, match="patch_size"):
        ContrastiveConfig(image_size=30, patch_size=8)


# ------------------------------------------------------------------------------------------------ two processes


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


def _rank_grads(rank: int, world: int, port: int, path: str) -> None:
    """One process of the gather test: its half of each batch, DDP-style averaged gradients, saved by rank 0."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    results = []
    for model, pixels, ids, mask, nids, nmask, nvalid in torch.load(path + ".inputs.pt", weights_only=False):
        n = pixels.shape[0] // world
        part = slice(rank * n, (rank + 1) * n)
        out = model(pixels[part], ids[part], mask[part], nids[part], nmask[part], nvalid[part])
        out.loss.backward()
        grads = _grads(model)
        for g in grads.values():  # what DistributedDataParallel does: average over processes
            dist.all_reduce(g)
            g /= world
        results.append({"loss": out.contrastive_loss.detach(), "grads": grads})
    if rank == 0:
        torch.save(results, path)
    dist.barrier()
    dist.destroy_process_group()


def test_two_processes_see_the_global_batch(tokenizer, scenes, tmp_path):
    """2 gloo processes x 4 samples (embeddings gathered) == 1 process x 8 samples: same loss, same gradients,
    for the CLIP and the SigLIP loss (with the CoCa term and hard negatives, one of them invalid)."""
    import torch.multiprocessing as mp

    from training.hard_negatives import HardNegativeConfig, negative_captions

    batch = scenes[:8]
    texts = [s["caption"] for s in batch]
    negs = negative_captions(texts, range(8), HardNegativeConfig([["circle", "square", "triangle"]]), seed=0)
    negs[5] = None
    inputs, want = [], []
    for loss in ("clip", "siglip"):
        model = tiny_encoder(tokenizer, loss=loss, coca_weight=0.3, coca_width=32, coca_heads=2, coca_layers=1)
        pixels = model.preprocess([s["rgb"] for s in batch])
        ids, mask = model.tokenize(texts)
        nids, nmask = model.tokenize([n or t for n, t in zip(negs, texts)])
        nvalid = torch.tensor([n is not None for n in negs])
        out = model(pixels, ids, mask, nids, nmask, nvalid)
        out.loss.backward()
        want.append((out.contrastive_loss.item(), _grads(model)))
        model.zero_grad(set_to_none=True)
        inputs.append((model, pixels, ids, mask, nids, nmask, nvalid))
    path = str(tmp_path / "rank0.pt")
    torch.save(inputs, path + ".inputs.pt")
    mp.spawn(_rank_grads, args=(2, _free_port(), path), nprocs=2, join=True)
    for got, (loss, grads) in zip(torch.load(path, weights_only=False), want):
        assert got["loss"].item() == pytest.approx(loss, rel=1e-5)
        assert set(got["grads"]) == set(grads)
        for name, g in grads.items():
            assert torch.allclose(got["grads"][name], g, atol=1e-6, rtol=1e-4), name


# ------------------------------------------------------------------------------------------------ train-clip


@pytest.fixture(scope="module")
def clip_data(tmp_path_factory) -> Path:
    from training.data.shapes import make_shapes_dataset

    root = tmp_path_factory.mktemp("clip_data")
    make_shapes_dataset(root, num_train=48, num_val=16, num_test=16, resolution=32, samples_per_shard=16,
                        progress=False)
    return root


def clip_overrides(data: Path, out: Path, *extra: str) -> list[str]:
    model = [f"model.{k}={v}" for k, v in TINY.items()]
    return [*model, f"data.path={data}", "data.val_samples=16", "num_threads=1", "optim.batch_size=8",
            "optim.max_steps=6", "optim.warmup_steps=2", "optim.lr=3e-3", "logging.log_every=2",
            "logging.eval_every=3", "logging.progress_bar=false", "checkpoint.every=0", f"checkpoint.out_dir={out}",
            *extra]


@pytest.mark.parametrize("precision", ["fp32", "bf16"])
def test_train_clip_resumes_exactly_and_evaluates(clip_data, tmp_path, capsys, precision):
    from safetensors.torch import load_file

    from onemodel.cli import main as cli
    from training.run_log import read_metrics
    from training.train_clip import load_clip_config, train_clip

    negatives = ["negatives.swap_groups=[[circle,square,triangle]]"]  # the hard negatives resume exactly too
    if precision == "bf16":  # the shipped config's setting: bf16 autocast with transformers' eager attention
        negatives += ["optim.mixed_precision=bf16", "model.attention=eager"]
    straight = train_clip(load_clip_config(None, clip_overrides(clip_data, tmp_path / "straight", *negatives)))
    assert straight["final_step"] == 6 and "val/i2t_r1" in straight["val"] and "val/zs_shape_acc" in straight["val"]
    cut = load_clip_config(None, clip_overrides(clip_data, tmp_path / "cut", *negatives))
    assert train_clip(cut, stop_at_step=3)["final_step"] == 3
    with pytest.raises(ValueError, match="--resume"):
        train_clip(cut)
    assert train_clip(cut, resume=True)["start_step"] == 3
    a = load_file(str(tmp_path / "straight" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "cut" / "model" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    steps = [r["step"] for r in read_metrics(tmp_path / "cut" / "metrics.jsonl") if "train/loss" in r]
    assert steps == [2, 3, 4, 6]  # the cut run also logged its last step, 3
    # the run directory is an ImageTextEncoder; onemodel eval scores it (retrieval + zero-shot + picture)
    capsys.readouterr()
    assert cli(["eval", "--model", str(tmp_path / "cut"), "--data", str(clip_data), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "i2t_r1" in printed and "color_acc" in printed
    results = json.loads((tmp_path / "cut" / "eval" / "results.json").read_text())
    assert results["retrieval"]["num"] == 16.0
    assert (tmp_path / "cut" / "eval" / "retrieval.png").is_file()
    assert "retrieval.png" in (tmp_path / "cut" / "eval" / "report.html").read_text()


def test_train_clip_bad_config_is_one_line(clip_data, tmp_path, capsys):
    from onemodel.cli import main as cli

    assert cli(["train-clip", *clip_overrides(clip_data, tmp_path / "r", "optim.micro_batch_size=4")]) == 2
    assert "no gradient accumulation" in capsys.readouterr().err
    assert cli(["train-clip", *clip_overrides(tmp_path / "nowhere", tmp_path / "r")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert cli(["train-clip", *clip_overrides(clip_data, tmp_path / "r", "model.lossy=clip")]) == 2
    assert "lossy" in capsys.readouterr().err


def test_eager_attention_gives_the_sdpa_embeddings_and_is_saved(tokenizer, scenes, tmp_path):
    images, texts = [s["rgb"] for s in scenes[:4]], [s["caption"] for s in scenes[:4]]
    sdpa = tiny_encoder(tokenizer, vision_stem="convnet", vision_stem_width=4).eval()
    eager = tiny_encoder(tokenizer, vision_stem="convnet", vision_stem_width=4, attention="eager").eval()
    eager.load_state_dict(sdpa.state_dict())
    assert eager.hf.config._attn_implementation == "eager" and sdpa.hf.config._attn_implementation == "sdpa"
    assert torch.allclose(eager.encode_image(images), sdpa.encode_image(images), atol=1e-5)
    assert torch.allclose(eager.encode_text(texts), sdpa.encode_text(texts), atol=1e-5)
    eager.save_pretrained(tmp_path / "enc")
    loaded = ImageTextEncoder.from_pretrained(tmp_path / "enc")
    assert loaded.config.attention == "eager" and loaded.hf.config._attn_implementation == "eager"
    with pytest.raises(ValueError, match="attention must be"):
        ContrastiveConfig(**{**TINY, "attention": "flash"})


def test_shipped_config_parses():
    from training.train_clip import load_clip_config

    config = load_clip_config(REPO / "configs" / "clip_shapes.yaml", ["model.loss=siglip"])
    assert config.model.loss == "siglip" and config.optim.batch_size % 8 == 0


@pytest.mark.slow
def test_train_clip_two_processes_equal_one_process(clip_data, tmp_path):
    """accelerate launch with 2 CPU processes (gloo) x 4 samples == 1 process x 8 samples, end to end."""
    from safetensors.torch import load_file

    from training.train_clip import load_clip_config, train_clip

    extra = ("optim.max_steps=4", "logging.eval_every=0")
    single = train_clip(load_clip_config(None, clip_overrides(clip_data, tmp_path / "one", *extra)))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2",
           "--num_machines", "1", "--main_process_port", str(_free_port()), "-m", "training.train_clip",
           *clip_overrides(clip_data, tmp_path / "two", *extra)]
    result = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    import re

    two_loss = float(re.search(r"train loss ([0-9.]+)", result.stdout).group(1))
    assert two_loss == pytest.approx(single["train_loss"], abs=2e-4)  # the same global-batch loss
    a = load_file(str(tmp_path / "one" / "model" / "model.safetensors"))
    b = load_file(str(tmp_path / "two" / "model" / "model.safetensors"))
    for k in a:  # AdamW normalises tiny gradients, so float summation order shows at ~1e-4 after 4 steps
        torch.testing.assert_close(a[k], b[k], atol=1e-3, rtol=0)


def test_convnet_stem_overfits_saves_loads_and_feeds_patch_features(tokenizer, scenes, tmp_path):
    """``vision_stem="convnet"``: the stem (not the bypassed linear patch embedding) is what trains, a batch is
    overfitted, and save -> load gives identical embeddings and patch features."""
    from training.evaluation.contrastive import retrieval_metrics

    batch = scenes[:8]
    model = tiny_encoder(tokenizer, vision_stem="convnet")
    linear = model.hf.vision_model.embeddings.patch_embedding.weight.detach().clone()
    pixels = model.preprocess([s["rgb"] for s in batch])
    ids, mask = model.tokenize([s["caption"] for s in batch])
    stem_before = model.vision_stem[0].weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    for _ in range(150):
        out = model(pixels, ids, mask)
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    assert not torch.equal(model.vision_stem[0].weight, stem_before)
    assert torch.equal(model.hf.vision_model.embeddings.patch_embedding.weight, linear)  # bypassed, never trained
    model.eval()
    r = retrieval_metrics(model.encode_image([s["rgb"] for s in batch]), model.encode_text([s["caption"] for s in batch]),
                          [s["caption"] for s in batch])
    assert r["i2t_r1"] == 1.0 and r["t2i_r1"] == 1.0
    model.save_pretrained(tmp_path / "enc")
    loaded = ImageTextEncoder.from_pretrained(tmp_path / "enc")
    assert loaded.config.vision_stem == "convnet"
    images = [s["rgb"] for s in scenes[8:12]]
    assert torch.equal(model.encode_image(images), loaded.encode_image(images))
    assert torch.equal(model.patch_features(images), loaded.patch_features(images))
    with pytest.raises(ValueError, match="vision_stem_width must be >= 1"):
        ContrastiveConfig(**{**TINY, "vision_stem": "convnet", "vision_stem_width": 0})
    with pytest.raises(ValueError, match="power-of-two patch_size"):
        ContrastiveConfig(**{**TINY, "image_size": 36, "patch_size": 6, "vision_stem": "convnet"})
    # the stem changes the features: a plain-patch model with the same transformers weights differs
    plain = ImageTextEncoder(ContrastiveConfig(**{**TINY, "vocab_size": model.config.vocab_size}), model.hf.__class__(
        model.hf.config), text_tokenizer=tokenizer)
    plain.hf.load_state_dict(model.hf.state_dict())
    assert not torch.allclose(plain.eval().encode_image(images), model.encode_image(images))


def test_text_batches_are_cut_to_their_longest_caption(tokenizer, scenes):
    """tokenize() drops the trailing padding columns (up to text_max_length): the text tower never reads them, so
    the embeddings equal those of the fully padded batch."""
    model = tiny_encoder(tokenizer).eval()
    texts = ["a red circle", scenes[0]["caption"]]
    ids, mask = model.tokenize(texts)
    assert ids.shape[1] == int(mask.sum(1).max()) < model.config.text_max_length
    full = tokenizer.encode(texts, max_length=model.config.text_max_length)
    full_mask = (full != tokenizer.pad_id).long()
    full = full.masked_fill(full == tokenizer.eos_id, model.hf.config.text_config.eos_token_id)
    with torch.no_grad():
        torch.testing.assert_close(model.text_embeddings(ids, mask), model.text_embeddings(full, full_mask),
                                   atol=1e-5, rtol=1e-5)
