"""Codebook-embedded input tokens (OneModelConfig.input_embeddings): config checks, a tiny model overfits through
them, the frozen codes stay frozen, save/load is bit-identical, every pipeline method and chained generation run,
``onemodel train`` loads the tokenizer's code vectors, and token-table models saved before the option still load."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_pipeline import RES, _bundle  # noqa: E402  (the pipeline tests' tiny tokenizer bundle)

from onemodel.batch import collate  # noqa: E402
from onemodel.masking import build_sample  # noqa: E402
from onemodel.modalities import Modality  # noqa: E402
from onemodel.model import OneModel, OneModelConfig  # noqa: E402
from onemodel.pipeline import OneModelPipeline  # noqa: E402
from training.data.shapes import generate_sample  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")
LENGTHS = {"caption": 40, "question": 16, "answer": 6, "det": 24}


@pytest.fixture(scope="module")
def samples():
    return [generate_sample(i, resolution=RES) for i in range(30)]


@pytest.fixture(scope="module")
def bundle(samples):
    return _bundle(samples)


def overfit_batch(pipe, train, pixels_of=None, draw=True):
    """The input-embedding tests' overfit batch: per scene of ``train``, rgb -> caption, rgb + question -> answer and
    (``draw``) caption -> rgb. ``pixels_of(image)`` gives the pixel patches of the rgb inputs (None: token inputs).
    Returns ``(batch, qa, tok)``: the batch, each scene's first question-answer pair and the tokenized inputs."""
    mods = pipe.model.config.modalities
    qa = [s["qa"][0] for s in train]
    tok = pipe.tokenize({"rgb": [s["rgb"] for s in train], "caption": [s["caption"] for s in train],
                         "question": [q["question"] for q in qa], "answer": [q["answer"] for q in qa]})
    examples = []
    for i, scene in enumerate(train):
        t = {k: v[i] for k, v in tok.items()}
        every = lambda name: (t[name], torch.arange(len(t[name])))  # noqa: E731
        cap = build_sample({"rgb": t["rgb"]}, {"caption": every("caption")}, mods)
        vqa = build_sample({"rgb": t["rgb"], "question": t["question"]}, {"answer": every("answer")}, mods)
        if pixels_of is not None:
            cap.values = vqa.values = {"rgb": pixels_of(scene["rgb"])}
        examples += [cap, vqa]
        if draw:
            examples.append(build_sample({"caption": t["caption"]}, {"rgb": every("rgb")}, mods))
    return collate(examples), qa, tok


def _model(bundle, kind="codebook", **kw) -> OneModel:
    mods = tuple(Modality(**s) for s in bundle.modalities(LENGTHS))
    dims = {"rgb": bundle["rgb"].code_vectors().shape[1]}
    torch.manual_seed(0)
    model = OneModel(OneModelConfig(modalities=mods, dim=64, encoder_depth=2, decoder_depth=2, num_heads=4,
                                    input_embeddings={"rgb": kind}, codebook_dims=dims, **kw))
    model.set_input_codebook("rgb", bundle["rgb"].code_vectors())
    return model


def test_config_checks(bundle):
    mods = tuple(Modality(**s) for s in bundle.modalities(LENGTHS))
    base = dict(modalities=mods, dim=32, num_heads=2)
    with pytest.raises(ValueError, match="needs a grid"):
        OneModelConfig(**base, input_embeddings={"caption": "codebook"}, codebook_dims={"caption": 4})
    with pytest.raises(ValueError, match=r"codebook_dims\['rgb'\]"):
        OneModelConfig(**base, input_embeddings={"rgb": "codebook"})
    with pytest.raises(ValueError, match="one of"):
        OneModelConfig(**base, input_embeddings={"rgb": "pixels_please"})
    with pytest.raises(ValueError, match="not a modality"):
        OneModelConfig(**base, input_embeddings={"lidar": "table"})
    model = _model(bundle)
    with pytest.raises(ValueError, match="shape"):
        model.set_input_codebook("rgb", torch.zeros(3, 3))
    with pytest.raises(ValueError, match="not codebook-embedded"):
        model.set_input_codebook("depth", torch.zeros(32, 8))


def test_input_table_uses_the_code_vectors(bundle):
    model = _model(bundle)
    table = model.input_table()
    off, v = model._offsets[model.config.modality_index("rgb")]
    codes = bundle["rgb"].code_vectors()
    want = model.input_codebooks["rgb"].linear((codes - codes.mean(0)) / codes.std(0).clamp(min=1e-6))
    torch.testing.assert_close(table[off : off + v], want)
    off_d, v_d = model._offsets[model.config.modality_index("depth")]
    assert torch.equal(table[off_d : off_d + v_d], model.tok_emb.weight[off_d : off_d + v_d])
    # two rgb ids with different code vectors get different embeddings; equal code vectors equal embeddings
    assert 0.5 < table[off : off + v].std() < 2.0  # unit scale, like the token table


@pytest.mark.parametrize("kind", ["codebook", pytest.param("codebook_trainable", marks=pytest.mark.slow)])
def test_overfit_every_pipeline_method_and_save_load(bundle, samples, kind, tmp_path):
    train = [samples[1], samples[29]]
    model = _model(bundle, kind)
    pipe = OneModelPipeline(model, bundle, device="cpu")
    batch, qa, tok = overfit_batch(pipe, train)
    codes_before = model.input_codebooks["rgb"].codes.detach().clone()
    proj_before = model.input_codebooks["rgb"].linear.weight.detach().clone()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    model.train()
    for _ in range(150):
        loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 0.05, loss.item()
    codes = model.input_codebooks["rgb"].codes
    assert not torch.equal(model.input_codebooks["rgb"].linear.weight, proj_before)  # the projection learns
    if kind == "codebook":
        assert torch.equal(codes, codes_before) and not codes.requires_grad  # frozen
    else:
        assert codes.requires_grad and not torch.equal(codes, codes_before)  # fine-tuned
    text = bundle.text
    captions = [text.normalize(s["caption"]) for s in train]
    assert pipe.caption([s["rgb"] for s in train]) == captions
    assert pipe.answer([s["rgb"] for s in train], [q["question"] for q in qa]) == [text.normalize(q["answer"]) for q in qa]
    # every other pipeline method runs through the codebook input path
    rgb = train[0]["rgb"]
    assert pipe.depth(rgb).shape == (RES, RES) and pipe.segment(rgb).shape == (RES, RES)
    assert isinstance(pipe.detect(rgb), list)
    assert isinstance(pipe.text_to_image(train[0]["caption"], steps=2), Image.Image)
    assert isinstance(pipe.text_to_image(train[0]["caption"], steps=2, via=["semseg"]), Image.Image)
    # chained: caption -> rgb tokens (generated) -> fed back as codebook-embedded input -> caption
    want = tok["rgb"][0]
    got = pipe.generate({"caption": train[0]["caption"]}, ["rgb"], temperature=0.0, steps=1, return_tokens=True)["rgb"]
    assert torch.equal(got, want)
    chained = pipe.generate({"caption": train[0]["caption"]}, ["rgb", "answer"], temperature=0.0, steps=1)
    assert isinstance(chained["rgb"], Image.Image) and isinstance(chained["answer"], str)
    # save / load: bit-identical weights (codes included) and outputs
    model.save_pretrained(tmp_path / "m")
    loaded = OneModel.from_pretrained(tmp_path / "m")
    assert loaded.config.input_embeddings == {"rgb": kind}
    a, b = model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    assert "input_codebooks.rgb.codes" in a
    with torch.no_grad():
        assert torch.equal(model(batch).loss, loaded(batch).loss)
    assert OneModelPipeline(loaded, bundle, device="cpu").caption([s["rgb"] for s in train]) == captions


def test_old_token_table_models_still_load_and_run(bundle, samples, tmp_path):
    """A model saved before input_embeddings existed (no such keys in config.json) loads as a token-table model."""
    mods = tuple(Modality(**s) for s in bundle.modalities(LENGTHS))
    torch.manual_seed(0)
    model = OneModel(OneModelConfig(modalities=mods, dim=32, encoder_depth=1, decoder_depth=1, num_heads=2))
    model.save_pretrained(tmp_path / "old")
    cfg_path = tmp_path / "old" / "config.json"
    cfg = json.loads(cfg_path.read_text())
    del cfg["input_embeddings"], cfg["codebook_dims"]
    cfg_path.write_text(json.dumps(cfg))
    loaded = OneModel.from_pretrained(tmp_path / "old")
    assert loaded.config.input_embeddings == {} and len(loaded.input_codebooks) == 0
    assert torch.equal(loaded.input_table(), model.tok_emb.weight)
    pipe = OneModelPipeline(loaded, bundle, device="cpu")
    assert isinstance(pipe.caption(samples[0]["rgb"]), str)
    assert pipe.depth(samples[0]["rgb"]).shape == (RES, RES)


def test_train_fills_the_code_vectors_from_the_tokenizer(tmp_path):
    from test_train import build_tiny_pipeline, tiny_config

    from tokenizers_mm.bundle import TokenizerBundle
    from training.train import train

    root = build_tiny_pipeline()
    out = tmp_path / "run"
    train(tiny_config(root, out, "optim.max_steps=4", "model.input_embeddings={rgb: codebook}"))
    model = OneModel.from_pretrained(out / "model")
    codes = TokenizerBundle.from_pretrained(root / "bundle")["rgb"].code_vectors()
    assert model.config.codebook_dims == {"rgb": codes.shape[1]}
    assert torch.equal(model.input_codebooks["rgb"].codes, codes)
    assert np.isfinite(model.input_table().detach().numpy()).all()


def test_heldout_learning_curves_are_logged_and_drawn(tmp_path):
    """logging.heldout_every scores the model on held-out raw samples during training; the report draws them."""
    from test_train import build_tiny_pipeline, tiny_config

    from training.evaluation.report import write_report
    from training.run_log import read_metrics
    from training.train import train

    root = build_tiny_pipeline()
    out = tmp_path / "run"
    train(tiny_config(root, out, "optim.max_steps=4", "logging.heldout_every=2", f"logging.heldout_data={root / 'data'}",
                      "logging.heldout_limit=4", "logging.heldout_tasks=[vqa, caption, semseg]"))
    records = [r for r in read_metrics(out / "metrics.jsonl") if "heldout/vqa_accuracy" in r]
    assert [r["step"] for r in records] == [2, 4]
    for r in records:
        assert 0.0 <= r["heldout/vqa_accuracy"] <= 1.0 and 0.0 <= r["heldout/semseg_miou"] <= 1.0
        assert "heldout/caption_attribute_f1" in r
    page = write_report(tmp_path / "report", {}, {}, out / "metrics.jsonl")
    assert (tmp_path / "report" / "learning_curves.png").is_file() and "learning_curves.png" in page.read_text()
    with pytest.raises(ValueError, match="heldout_data"):
        tiny_config(root, out, "logging.heldout_every=2")
