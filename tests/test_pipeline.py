"""OneModelPipeline: loading, input forms, outputs, bad input, and a tiny model overfit on shapes end to end."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from onemodel.batch import collate
from onemodel.masking import build_sample
from onemodel.modalities import Modality
from onemodel.model import OneModel, OneModelConfig
from onemodel.pipeline import OneModelPipeline
from tokenizers_mm.bundle import TokenizerBundle
from tokenizers_mm.text import TextTokenizer
from tokenizers_mm.vq import VQTokenizer, VQTokenizerConfig
from training.data.shapes import BOX_CLASSES, SEMSEG_CLASSES, generate_sample

RES = 32  # raw shapes resolution; the tokenizers work at 16 px, so every input is resized


def _bundle(samples) -> TokenizerBundle:
    corpus = [s["caption"] for s in samples] + [q["question"] + " " + q["answer"] for s in samples for q in s["qa"]]
    text = TextTokenizer.train(corpus, vocab_size=200, num_sentinels=4, num_loc_bins=16, class_names=BOX_CLASSES)
    torch.manual_seed(0)

    def vq(mod, **kw):  # untrained VQ tokenizers (k-means codebook only): 16 px -> 4x4 tokens, 32 codes
        cfg = VQTokenizerConfig(modality=mod, image_size=16, base_channels=8, latent_dim=8, codebook_size=32,
                                codebook_dim=4, kmeans_init=True, **kw)
        return VQTokenizer(cfg)

    bundle = TokenizerBundle({"rgb": vq("rgb"), "depth": vq("depth"),
                              "semseg": vq("semseg", num_classes=len(SEMSEG_CLASSES)), "text": text})
    for name in ("rgb", "depth", "semseg"):  # one training-mode pass: k-means codebook init on the data
        tok = bundle[name]
        tok.train()
        with torch.no_grad():
            tok(tok.preprocess(np.stack([s[name] for s in samples]), resize=True))
        tok.eval()
    return bundle


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def samples():
    return [generate_sample(i, resolution=RES) for i in range(30)]


@pytest.fixture(scope="module")
def bundle(samples):
    return _bundle(samples)


@pytest.fixture(scope="module")
def pipe(bundle):
    mods = tuple(Modality(**s) for s in bundle.modalities({"caption": 40, "question": 16, "answer": 6, "det": 24}))
    torch.manual_seed(0)
    model = OneModel(OneModelConfig(modalities=mods, dim=32, encoder_depth=1, decoder_depth=1, num_heads=2, init_std=0.2, init="trunc_normal"))
    return OneModelPipeline(model, bundle, device="cpu")


# ------------------------------------------------------------------------------------------- input forms


def test_accepts_pil_numpy_tensor_path_and_lists(pipe, samples, tmp_path):
    rgb = samples[0]["rgb"]
    path = tmp_path / "img.png"
    Image.fromarray(rgb).save(path)
    forms = {
        "pil": Image.fromarray(rgb),
        "numpy": rgb,
        "numpy_float": rgb.astype(np.float32) / 255.0,
        "tensor_chw": torch.from_numpy(rgb).permute(2, 0, 1).contiguous(),
        "tensor_hwc": torch.from_numpy(rgb),
        "path_str": str(path),
        "path": path,
    }
    tokens = {k: pipe.tokenize({"rgb": v})["rgb"][0] for k, v in forms.items()}
    for k, t in tokens.items():
        assert torch.equal(t, tokens["numpy"]), k
    ref = pipe.caption(rgb)
    assert isinstance(ref, str)
    for name, value in forms.items():
        assert pipe.caption(value) == ref, name
    many = pipe.caption([forms["pil"], forms["path"], samples[1]["rgb"]])
    assert isinstance(many, list) and len(many) == 3 and many[:2] == [ref, ref]
    assert pipe.caption([rgb]) == [ref]


def test_mode_conversion_and_resizing(pipe, samples):
    rgb = samples[0]["rgb"]
    rgba = Image.fromarray(rgb).convert("RGBA")
    assert torch.equal(pipe.tokenize({"rgb": rgba})["rgb"][0], pipe.tokenize({"rgb": rgb})["rgb"][0])
    grey = Image.fromarray(rgb).convert("L")
    assert pipe.tokenize({"rgb": grey})["rgb"][0].shape == (16,)
    big = np.asarray(Image.fromarray(rgb).resize((50, 40)))
    depth = pipe.depth(big)
    assert depth.shape == (40, 50) and depth.dtype == np.float32


@pytest.mark.parametrize(
    "value,err,match",
    [
        (Image.fromarray(np.zeros((8, 8), dtype=np.int32), mode="I"), ValueError, "mode 'I'"),
        (np.zeros((8, 8, 2), dtype=np.uint8), ValueError, r"\(H, W, 3\)"),
        (np.zeros((0, 8, 3), dtype=np.uint8), ValueError, "empty"),
        (np.full((8, 8, 3), 2.0, dtype=np.float32), ValueError, r"\[0, 1\]"),
        (np.zeros((8, 8, 3), dtype=np.uint16), TypeError, "uint8"),
        (torch.zeros(5, 8, 8), ValueError, "neither"),
        ("/nonexistent/image.png", FileNotFoundError, "does not exist"),
        (12, TypeError, "image"),
    ],
)
def test_bad_images(pipe, value, err, match):
    with pytest.raises(err, match=match):
        pipe.caption(value)


def test_unreadable_file(pipe, tmp_path):
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    with pytest.raises(ValueError, match="could not read"):
        pipe.caption(bad)


# ----------------------------------------------------------------------------------------------- outputs


def test_task_outputs(pipe, samples):
    rgb = samples[0]["rgb"]
    assert isinstance(pipe.answer(rgb, "what color is the circle?"), str)
    two = pipe.answer([rgb, samples[1]["rgb"]], "what color is the circle?")
    assert isinstance(two, list) and len(two) == 2
    seg = pipe.segment(rgb)
    assert seg.shape == (RES, RES) and np.issubdtype(seg.dtype, np.integer)
    assert seg.min() >= 0 and seg.max() < len(SEMSEG_CLASSES)
    dets = pipe.detect([rgb])
    assert isinstance(dets, list) and isinstance(dets[0], list)
    img = pipe.text_to_image("a red circle", steps=2)
    assert isinstance(img, Image.Image) and img.size == (16, 16)
    imgs = pipe.text_to_image(["a red circle", "a blue square"], steps=2, via=["semseg"])
    assert len(imgs) == 2 and all(isinstance(i, Image.Image) for i in imgs)


def test_generate_general_and_return_tokens(pipe, samples):
    out = pipe.generate({"rgb": samples[0]["rgb"], "caption": "a red circle"}, ["depth", "answer"], steps=2)
    assert set(out) == {"depth", "answer"}
    assert out["depth"].shape == (RES, RES) and isinstance(out["answer"], str)
    toks = pipe.generate({"rgb": samples[0]["rgb"]}, ["depth"], steps=2, return_tokens=True)
    assert toks["depth"].dtype == torch.long and toks["depth"].shape == (16,)
    listed = pipe.generate({"rgb": [samples[0]["rgb"], samples[1]["rgb"]], "question": "what is it?"}, "answer")
    assert isinstance(listed, list) and len(listed) == 2 and all(isinstance(o["answer"], str) for o in listed)
    per = pipe.generate({"caption": "a red circle"}, ["depth", "rgb"], seed=3, steps=3,
                        per_target={"rgb": {"steps": 16, "schedule": "random", "top_k": 4}})
    assert isinstance(per["rgb"], Image.Image) and per["depth"].shape == (16, 16)
    again = pipe.generate({"caption": "a red circle"}, ["depth", "rgb"], seed=3, steps=3,
                          per_target={"rgb": {"steps": 16, "schedule": "random", "top_k": 4}})
    assert np.array_equal(np.asarray(per["rgb"]), np.asarray(again["rgb"]))
    boxes = [{"box": [2.0, 3.0, 20.0, 25.0], "label": "circle"}]
    det_in = pipe.generate({"det": boxes}, ["semseg"], steps=1)
    assert det_in["semseg"].shape == (16, 16)  # no image given: the tokenizer's size


def test_batch_size_chunks_give_same_results(pipe, samples):
    images = [s["rgb"] for s in samples[:5]]
    a = pipe.caption(images, batch_size=2)
    b = pipe.caption(images, batch_size=16)
    assert a == b
    # with sampling too: sample i uses seed + i whatever the chunking
    c = pipe.depth(images, temperature=1.0, seed=4, batch_size=2, steps=2)
    d = pipe.depth(images, temperature=1.0, seed=4, batch_size=5, steps=2)
    assert all(np.allclose(x, y) for x, y in zip(c, d))


def test_det_tokens_are_restricted_to_boxes(pipe, samples, bundle):
    text = bundle.text
    allowed = set(text.loc_ids) | {text.eos_id} | {text.token_to_id(c) for c in BOX_CLASSES}
    out = pipe.generate({"rgb": [s["rgb"] for s in samples[:3]]}, ["det", "caption"], temperature=1.0, return_tokens=True)
    for o in out:
        assert set(o["det"].tolist()) <= allowed
        assert not set(o["caption"].tolist()) & (set(text.loc_ids) | set(text.sentinel_ids) | {text.pad_id, text.bos_id})


def test_unconditional_generation(pipe):
    out = pipe.generate({}, ["caption", "rgb"], steps=2)
    assert isinstance(out["caption"], str) and isinstance(out["rgb"], Image.Image)


def test_choice_temperature_reaches_maskgit(pipe):
    opts = pipe._options(["rgb", "depth"], {"per_target": {"depth": {"choice_temperature": 3.0}}})
    assert opts["rgb"].schedule.choice_temperature == 2.0  # rgb's default
    assert opts["depth"].schedule.choice_temperature == 3.0
    assert pipe._options(["depth"], {})["depth"].schedule.choice_temperature == 0.0


# ------------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    "call,err,match",
    [
        (lambda p, x: p.generate({"sketch": x}, ["depth"]), ValueError, "unknown input modality 'sketch'"),
        (lambda p, x: p.generate({"rgb": x}, ["normals"]), ValueError, "unknown target modality 'normals'"),
        (lambda p, x: p.generate({"rgb": x}, ["rgb"]), ValueError, "both as input and as target"),
        (lambda p, x: p.generate({"rgb": x}, []), ValueError, "targets is empty"),
        (lambda p, x: p.answer(x, ""), ValueError, "question 0 is empty"),
        (lambda p, x: p.answer(x, ["what?", "   "]), ValueError, "question 1 is empty"),
        (lambda p, x: p.caption(x, top_p=0.0), ValueError, "top_p"),
        (lambda p, x: p.caption(x, top_p=1.2), ValueError, "top_p"),
        (lambda p, x: p.caption(x, top_k=-1), ValueError, "top_k"),
        (lambda p, x: p.caption(x, temperature=-1.0), ValueError, "temperature"),
        (lambda p, x: p.depth(x, steps=0), ValueError, "steps"),
        (lambda p, x: p.depth(x, steps=17), ValueError, "1..16"),
        (lambda p, x: p.caption(x, guidance_scale=-0.5), ValueError, "guidance_scale"),
        (lambda p, x: p.depth(x, schedule="zigzag"), ValueError, "schedule"),
        (lambda p, x: p.depth(x, choice_temperature=-1.0), ValueError, "choice_temperature"),
        (lambda p, x: p.caption(x, tempreature=0.5), TypeError, "unknown sampling option"),
        (lambda p, x: p.caption([]), ValueError, "empty image list"),
        (lambda p, x: p.text_to_image(""), ValueError, "prompt 0 is empty"),
        (lambda p, x: p.generate({"rgb": [x, x], "question": ["a?", "b?", "c?"]}, ["answer"]), ValueError, "different lengths"),
        (lambda p, x: p.generate({"rgb": x, "caption": 5}, ["depth"]), TypeError, "expected a string"),
        (lambda p, x: p.generate({"rgb": x}, ["depth"], per_target={"rgb": {"steps": 2}}), ValueError, "not targets"),
    ],
)
def test_bad_input_errors(pipe, samples, call, err, match):
    with pytest.raises(err, match=match):
        call(pipe, samples[0]["rgb"])


# ----------------------------------------------------------------------------------------------- loading


def test_from_pretrained_run_dir_and_model_dir(pipe, bundle, samples, tmp_path):
    run = tmp_path / "run"
    pipe.model.save_pretrained(run / "model")
    bundle.save_pretrained(run / "model" / "tokenizers")
    loaded = OneModelPipeline.from_pretrained(run, device="cpu")
    rgb = samples[2]["rgb"]
    assert loaded.caption(rgb) == pipe.caption(rgb)
    assert OneModelPipeline.from_pretrained(run / "model", device="cpu").caption(rgb) == pipe.caption(rgb)
    shutil.rmtree(run / "model" / "tokenizers")
    with pytest.raises(ValueError, match="no tokenizers/ directory"):
        OneModelPipeline.from_pretrained(run)
    bundle.save_pretrained(tmp_path / "bundle")
    assert OneModelPipeline.from_pretrained(run, tokenizers=tmp_path / "bundle").caption(rgb) == pipe.caption(rgb)
    with pytest.raises(FileNotFoundError):
        OneModelPipeline.from_pretrained(tmp_path / "missing")
    with pytest.raises(ValueError, match="neither a trained run directory"):
        OneModelPipeline.from_pretrained(tmp_path)


def test_mismatched_tokenizers_are_refused(bundle):
    mods = (Modality("rgb", "grid", 32, "rgb", grid_size=8),)
    with pytest.raises(ValueError, match="grids"):
        OneModelPipeline(OneModel(OneModelConfig(modalities=mods, dim=16, encoder_depth=1, decoder_depth=1, num_heads=2)), bundle)


# ------------------------------------------------------------------------------------- trained end to end


def test_overfit_tiny_model_reproduces_its_training_data(bundle, samples):
    """Train a tiny model on two shapes scenes (caption, VQA, depth, semseg, det, caption->rgb); the pipeline must
    give back their captions and answers, and dense outputs of the right kind."""
    train = [samples[1], samples[29]]  # one shape each: short captions (fast), different answers
    mods = tuple(Modality(**s) for s in bundle.modalities({"caption": 40, "question": 16, "answer": 6, "det": 24}))
    torch.manual_seed(0)
    model = OneModel(OneModelConfig(modalities=mods, dim=64, encoder_depth=2, decoder_depth=2, num_heads=4))
    pipe = OneModelPipeline(model, bundle, device="cpu")
    qa = [s["qa"][0] for s in train]
    tok = pipe.tokenize({
        "rgb": [s["rgb"] for s in train], "depth": [s["depth"] for s in train], "semseg": [s["semseg"] for s in train],
        "caption": [s["caption"] for s in train], "question": [q["question"] for q in qa],
        "answer": [q["answer"] for q in qa], "det": [s["boxes"] for s in train],
    })
    examples = []
    for i in range(2):
        t = {k: v[i] for k, v in tok.items()}
        every = lambda name: (t[name], torch.arange(len(t[name])))  # noqa: E731
        examples += [
            build_sample({"rgb": t["rgb"]}, {"caption": every("caption")}, mods),
            build_sample({"rgb": t["rgb"], "question": t["question"]}, {"answer": every("answer")}, mods),
            build_sample({"rgb": t["rgb"]}, {"det": every("det")}, mods),
            build_sample({"caption": t["caption"]}, {"rgb": every("rgb")}, mods),
        ]
    batch = collate(examples)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(250):
        loss = model(batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    assert loss.item() < 0.05, loss.item()
    text = bundle.text
    trained_captions = [text.normalize(s["caption"]) for s in train]
    assert pipe.caption([s["rgb"] for s in train]) == trained_captions
    answers = pipe.answer([s["rgb"] for s in train], [q["question"] for q in qa])
    assert answers == [text.normalize(q["answer"]) for q in qa]
    for s in train:
        dets = pipe.detect(s["rgb"])
        assert sorted(d["label"] for d in dets) == sorted(b["label"] for b in s["boxes"])
        for d in dets:
            assert 0.0 < d["score"] <= 1.0
            assert min(abs(a - b) for bx in s["boxes"] for a, b in zip(d["box"], bx["box"])) <= 2.5
        depth = pipe.depth(s["rgb"])
        assert depth.shape == (RES, RES) and depth.dtype == np.float32 and (depth > 0).all()
        assert pipe.segment(s["rgb"]).shape == (RES, RES)
        # the rgb tokens come back from their caption (chained: caption -> rgb)
        want = tok["rgb"][train.index(s)]
        got = pipe.generate({"caption": s["caption"]}, ["rgb"], temperature=0.0, steps=1, return_tokens=True)["rgb"]
        assert torch.equal(got, want)
        image = pipe.text_to_image(s["caption"], steps=1, temperature=0.0)
        assert isinstance(image, Image.Image) and image.size == (16, 16)
    # chained any-to-any through the pipeline runs and returns every target
    chained = pipe.generate({"rgb": train[0]["rgb"]}, ["caption", "depth", "semseg"])
    assert chained["caption"] == trained_captions[0] and chained["depth"].shape == (RES, RES)
