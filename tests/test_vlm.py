"""The VLM family: frozen HF vision model + frozen HF causal LM joined by a trained mapper (tiny sizes)."""

from __future__ import annotations

import json

import pytest
import torch

from onemodel.mappers import MAPPER_KINDS, MapperConfig, build_mapper
from onemodel.vision_backbones import VisionSpec
from onemodel.vlm import VLM, LoraSpec, VLMConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXTS = ["caption: a red circle.", "caption: a blue square.", "question: what color is the circle? answer: red",
         "question: what color is the square? answer: blue", "a green triangle left of a white square."]


def _tokenizer():
    from tokenizers_mm.text import TextTokenizer

    return TextTokenizer.train(TEXTS, vocab_size=512, num_sentinels=1, num_loc_bins=2).to_transformers()


@pytest.fixture(scope="module")
def backbones(tmp_path_factory):
    """Tiny Llama (+ tokenizer), tiny GPT-2 (+ tokenizer), tiny CLIPVisionModel, tiny SiglipVisionModel, all
    written with save_pretrained like real checkpoints."""
    from transformers import (CLIPVisionConfig, CLIPVisionModel, GPT2Config, GPT2LMHeadModel, LlamaConfig,
                              LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel)

    root = tmp_path_factory.mktemp("vlm_backbones")
    tok = _tokenizer()
    torch.manual_seed(0)
    llama = LlamaForCausalLM(LlamaConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=4, max_position_embeddings=128, initializer_range=0.2, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id))
    llama.save_pretrained(root / "llama")
    tok.save_pretrained(root / "llama")
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=len(tok), n_embd=32, n_layer=2, n_head=4, n_positions=128, initializer_range=0.2,
                                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id))
    gpt2.save_pretrained(root / "gpt2")
    tok.save_pretrained(root / "gpt2")
    llama.save_pretrained(root / "llama_no_tokenizer")
    CLIPVisionModel(CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
                                     image_size=32, patch_size=8)).save_pretrained(root / "clip")
    SiglipVisionModel(SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                         num_attention_heads=4, image_size=32, patch_size=8)).save_pretrained(
        root / "siglip")
    return root


def _vlm(root, kind="mlp", injection="prefix", lm="llama", vision="clip", lora=None, seed=0) -> VLM:
    torch.manual_seed(seed)
    spec = VisionSpec("none", None, image_size=32, patch_size=8) if kind == "patches" else \
        VisionSpec("hf", str(root / vision))
    return VLM(VLMConfig(lm_path=str(root / lm), vision=spec, mapper=MapperConfig(kind, num_tokens=4, depth=1),
                         injection=injection, lora=lora, max_new_tokens=4))


def _pixels(n=2, seed=1):
    return torch.rand(n, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _train(model, pixels, prompts, targets, steps, lr=1e-2):
    opt = torch.optim.AdamW(list(model.trained_parameters().values()), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(pixels, prompts, targets).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    return loss.item()


@pytest.mark.parametrize("kind,injection", [(k, "prefix") for k in MAPPER_KINDS] + [("summary", "xattn")])
def test_each_mapper_overfits_one_batch(backbones, kind, injection):
    model = _vlm(backbones, kind, injection)
    pixels = _pixels()
    prompts, targets = ["<image> caption:"] * 2, ["red", "blue"]
    first = model(pixels, prompts, targets).loss.item()
    last = _train(model, pixels, prompts, targets, steps=80, lr=2e-2)
    assert last < 0.25 * first, (first, last)
    assert model.generate(pixels, prompts, max_new_tokens=1) == targets  # the image decides the word


def test_gated_xattn_at_init_leaves_lm_logits_exactly_unchanged(backbones):
    from transformers import AutoModelForCausalLM

    model = _vlm(backbones, "summary", "xattn")
    lm = AutoModelForCausalLM.from_pretrained(backbones / "llama").eval()
    ids = torch.tensor([[1, 5, 9, 12, 7]])
    vis = model.mapper(model.image_features(_pixels(1)))
    model._visual = vis  # the gated layers see real visual tokens...
    try:
        with_xattn = model.lm(input_ids=ids).logits
    finally:
        model._visual = None
    assert torch.equal(with_xattn, lm(input_ids=ids).logits)  # ...and change nothing while the gates are 0
    with torch.no_grad():
        model.xattn["0"].attn_gate.fill_(0.5)
    model._visual = vis
    try:
        assert not torch.equal(model.lm(input_ids=ids).logits, with_xattn)  # an open gate does change them
    finally:
        model._visual = None


@pytest.mark.parametrize("injection", ["prefix", "xattn"])
def test_frozen_parameters_unchanged_after_training_and_have_no_optimizer_state(backbones, injection):
    from training.train_vlm import backbone_fingerprint

    model = _vlm(backbones, "mlp", injection)
    before = backbone_fingerprint(model)
    trained_before = {k: v.detach().clone() for k, v in model.trained_parameters().items()}
    opt = torch.optim.AdamW(list(model.trained_parameters().values()), lr=1e-2)
    model.train()
    model(_pixels(), ["<image> caption:"] * 2, ["red", "blue"]).loss.backward()
    assert all(p.grad is None for p in model.backbone_parameters().values())
    opt.step()
    assert backbone_fingerprint(model) == before
    assert set(opt.state) == set(model.trained_parameters().values())
    changed = [k for k, v in model.trained_parameters().items() if not torch.equal(v, trained_before[k])]
    assert changed
    names = set(model.trained_parameters())
    assert all(n.startswith(("mapper.", "xattn.")) for n in names)
    assert model.lm.training is False and model.vision.training is False


def test_lora_adapters_save_load_merge_equal_outputs(backbones, tmp_path):
    pytest.importorskip("peft")
    model = _vlm(backbones, "summary", lora=LoraSpec(r=4, alpha=8))
    trained = model.trained_parameters()
    assert any("lora_" in n for n in trained) and any(n.startswith("mapper.") for n in trained)
    _train(model, _pixels(), ["<image> caption:"] * 2, ["red", "blue"], steps=5)
    assert any("lora_B" in n and v.abs().sum() > 0 for n, v in trained.items())  # the adapters moved
    model.save_pretrained(tmp_path / "m")
    saved = json.loads((tmp_path / "m" / "config.json").read_text())
    assert saved["class"] == "VLM" and saved["lora"]["r"] == 4
    from safetensors.torch import load_file

    assert set(load_file(str(tmp_path / "m" / "trained.safetensors"))) == set(trained)  # only trained tensors
    loaded = VLM.from_pretrained(tmp_path / "m")
    px, prompts = _pixels(), ["<image> caption:"] * 2
    ref = model(px, prompts, ["red", "blue"]).logits
    assert torch.equal(loaded(px, prompts, ["red", "blue"]).logits, ref)
    loaded.lm = loaded.lm.merge_and_unload()  # peft: fold the adapters into the LM weights
    torch.testing.assert_close(loaded(px, prompts, ["red", "blue"]).logits, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("injection", ["prefix", "xattn"])
def test_cached_generation_equals_uncached_and_batched_equals_single(backbones, injection):
    model = _vlm(backbones, "qformer", injection)
    if injection == "xattn":
        with torch.no_grad():
            for block in model.xattn.values():
                block.attn_gate.fill_(1.0)
                block.ff_gate.fill_(1.0)
    px = _pixels(3, seed=4)
    prompts = ["<image> caption:", "<image> question: what color is the circle? answer:", "<image> a"]
    cached = model.generate(px, prompts, max_new_tokens=6)
    assert cached == model.generate(px, prompts, max_new_tokens=6, use_cache=False)
    single = [model.generate(px[i:i + 1], prompts[i:i + 1], max_new_tokens=6)[0] for i in range(3)]
    assert cached == single  # left padding changes nothing


@pytest.mark.parametrize("lm,vision,injection", [("gpt2", "siglip", "xattn"), ("gpt2", "clip", "prefix")])
def test_other_hf_backbones_load_and_train_through_the_same_code(backbones, lm, vision, injection):
    model = _vlm(backbones, "summary", injection, lm=lm, vision=vision)
    assert model.vision.num_patches == 16
    first = model(_pixels(), ["<image> caption:"] * 2, ["red", "blue"]).loss.item()
    assert _train(model, _pixels(), ["<image> caption:"] * 2, ["red", "blue"], steps=40) < 0.5 * first


def test_bad_inputs_give_clear_errors(backbones):
    model = _vlm(backbones, "mlp")
    with pytest.raises(ValueError, match="<image>"):
        model(_pixels(), ["caption:"] * 2, ["red", "blue"])
    with pytest.raises(ValueError, match="exactly once"):
        VLMConfig(lm_path="x", vision=VisionSpec("hf", "y"), caption_prompt="caption:")
    with pytest.raises(ValueError, match=r"vision features \(B, P, 32\).*width"):
        model.mapper(torch.zeros(1, 16, 48))
    with pytest.raises(ValueError, match="tokenizer"):
        VLM(VLMConfig(lm_path=str(backbones / "llama_no_tokenizer"), vision=VisionSpec("hf", str(backbones / "clip"))))
    with pytest.raises(ValueError, match="patches"):
        VLMConfig(lm_path="x", vision=VisionSpec("hf", "y"), mapper=MapperConfig("patches"))
    with pytest.raises(ValueError, match="pixels"):
        model.image_features(torch.zeros(1, 3, 48, 48))
    with pytest.raises(ValueError, match="mapper.kind"):
        build_mapper(MapperConfig("resampler"), 8, 8)


def test_pipeline_api_and_run_dir(backbones, tmp_path):
    """OneModelPipeline.from_pretrained detects a VLM directory and gives caption / answer."""
    import numpy as np

    from onemodel.pipeline import OneModelPipeline
    from onemodel.vlm_pipeline import VLMPipeline

    model = _vlm(backbones, "summary")
    model.save_pretrained(tmp_path / "run" / "model")
    pipe = OneModelPipeline.from_pretrained(tmp_path / "run")
    assert isinstance(pipe, VLMPipeline)
    img = (np.random.default_rng(0).random((40, 40, 3)) * 255).astype(np.uint8)  # resized to the encoder's 32 px
    assert isinstance(pipe.caption(img), str)
    assert len(pipe.caption([img, img])) == 2
    assert len(pipe.answer(img, ["what color is the circle?", "what shape is the red object?"])) == 2
    from training.data.shapes import generate_sample
    from training.evaluation.evaluate import available_tasks

    assert available_tasks(pipe, [generate_sample(0)]) == ["caption", "vqa"]  # what `onemodel eval` scores
    with pytest.raises(ValueError, match="not an option of a VLM"):
        pipe.caption(img, steps=8)
    with pytest.raises(ValueError, match="empty"):
        pipe.answer(img, " ")


def test_train_vlm_two_stages_end_to_end(backbones, tmp_path):
    """Stage 1 (mapper) -> stage 2 (mapper + LoRA) -> model dir with only trained tensors -> eval; resume."""
    pytest.importorskip("peft")
    from safetensors.torch import load_file

    from onemodel.pipeline import OneModelPipeline
    from training.train_vlm import train_vlm
    from training.vlm_config import load_vlm_train_config

    overrides = [f"out_dir={tmp_path / 'run'}", f"data.path={tmp_path / 'data'}", "data.num_train=16",
                 "data.num_test=4", "data.resolution=32", f"lm.path={backbones / 'llama'}", "vision.kind=hf",
                 f"vision.path={backbones / 'clip'}", "model.mapper.kind=summary", "model.lora={r: 2, alpha: 4}",
                 "model.max_new_tokens=3", "stage1.steps=3", "stage1.batch_size=4", "stage2.steps=3",
                 "stage2.batch_size=4", "stage2.caption_fraction=0.5", "eval.limit=2", "eval.batch_size=4"]
    config = load_vlm_train_config(None, overrides)
    summary = train_vlm(config)
    assert summary["frozen_backbones_unchanged"] and summary["visual_tokens"] == 4
    assert 0.0 <= summary["eval"]["vqa"]["accuracy"] <= 1.0 and "caption_attributes" in summary["eval"]
    model_dir = tmp_path / "run" / "model"
    saved = json.loads((model_dir / "config.json").read_text())
    assert saved["lm_path"] == str(backbones / "llama") and saved["vision"]["path"] == str(backbones / "clip")
    names = set(load_file(str(model_dir / "trained.safetensors")))
    assert names and all(n.startswith("mapper.") or "lora_" in n for n in names)
    assert any("lora_" in n for n in names)
    pipe = OneModelPipeline.from_pretrained(tmp_path / "run")
    assert isinstance(pipe.answer(_image(), "what color is the circle?"), str)
    with pytest.raises(ValueError, match="--resume"):
        train_vlm(config)
    again = train_vlm(config, resume=True)  # every stage is complete: nothing retrains
    assert again["stage2"]["steps"] == 0


def _image():
    import numpy as np

    return (np.random.default_rng(1).random((32, 32, 3)) * 255).astype(np.uint8)


def test_pretrain_vision_stem_and_hard_negatives(tmp_path):
    """vision.stem reaches the demo CLIP: the ConvNet stem is saved, runs in the forward and trains; 'patch' has
    none; hard negatives change the loss; a bad stem is one clear error."""
    import numpy as np

    from onemodel.contrastive import ContrastiveConfig, ImageTextEncoder
    from tokenizers_mm.text import TextTokenizer
    from training.hard_negatives import HardNegativeConfig
    from training.vlm_backbones import pretrain_vision
    from training.vlm_config import load_vlm_train_config

    rng = np.random.default_rng(0)
    images = (rng.random((8, 32, 32, 3)) * 255).astype(np.uint8)
    caps = [f"a {c} {s}." for c, s in zip(["red", "blue"] * 4, ["circle", "square", "triangle", "circle"] * 2)]
    kw = dict(width=32, layers=1, patch_size=8, steps=2, batch_size=4, lr=1e-2, seed=0)
    conv = pretrain_vision(images, caps, tmp_path / "conv", stem="convnet", stem_width=4, **kw)
    enc = ImageTextEncoder.from_pretrained(tmp_path / "conv")
    assert enc.config.vision_stem == "convnet" and enc.config.vision_stem_width == 4 and enc.vision_stem is not None
    torch.manual_seed(0)  # the same initial weights as pretrain_vision's
    fresh = ImageTextEncoder.from_config(ContrastiveConfig(
        image_size=32, patch_size=8, vision_width=32, vision_layers=1, vision_heads=4, text_width=128, text_layers=2,
        text_heads=4, embed_dim=128, vision_stem="convnet", vision_stem_width=4),
        TextTokenizer.train(caps, vocab_size=512, num_sentinels=1, num_loc_bins=2))
    trained_stem = dict(enc.vision_stem.named_parameters())
    assert any(not torch.equal(p, trained_stem[n]) for n, p in fresh.vision_stem.named_parameters())  # it trained
    pixels = enc.normalize(torch.from_numpy(images[:2]))
    before = enc.image_embeddings(pixels)
    with torch.no_grad():
        next(enc.vision_stem.parameters()).add_(0.5)
    assert not torch.allclose(before, enc.image_embeddings(pixels))  # the stem is in the forward
    pretrain_vision(images, caps, tmp_path / "patch", stem="patch", **kw)
    assert ImageTextEncoder.from_pretrained(tmp_path / "patch").vision_stem is None
    negs = pretrain_vision(images, caps, tmp_path / "neg", stem="convnet", stem_width=4,
                           negatives=HardNegativeConfig([["circle", "square", "triangle"]]), **kw)
    assert negs["loss"] != conv["loss"]
    with pytest.raises(ValueError, match="stem"):
        pretrain_vision(images, caps, tmp_path / "bad", stem="conv", **kw)
    with pytest.raises(ValueError, match="vision.stem"):
        load_vlm_train_config(None, ["vision.stem=conv"])
