"""Tokenizer bundle and pre-tokenization: documented token-sample format, token shards read back equal the bundle's
output, modality specs, CLI wiring, bad input."""

from __future__ import annotations

import io
import json

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizers_mm.boxes import boxes_to_text
from tokenizers_mm.bundle import TokenizerBundle
from tokenizers_mm.vq import VQTokenizer, VQTokenizerConfig
from training.data.reader import iter_samples
from training.data.shapes import make_shapes_dataset
from training.pretokenize import iter_token_samples, pretokenize
from training.tokenizer_training import train_text_tokenizer

SIZE = 16


@pytest.fixture(scope="module")
def dataset(tmp_path_factory):
    out = tmp_path_factory.mktemp("shapes")
    make_shapes_dataset(out, num_train=10, num_val=4, num_test=3, resolution=SIZE, samples_per_shard=4, progress=False)
    return out


@pytest.fixture(scope="module")
def bundle_dir(dataset, tmp_path_factory):
    out = tmp_path_factory.mktemp("bundle")
    torch.manual_seed(0)
    common = dict(image_size=SIZE, base_channels=8, channel_mult=[1, 2], latent_dim=8, codebook_size=32, codebook_dim=4,
                  kmeans_init=False)
    VQTokenizer(VQTokenizerConfig(modality="rgb", **common)).save_pretrained(out / "rgb")
    VQTokenizer(VQTokenizerConfig(modality="depth", depth_min=0.5, depth_max=20.0, **common)).save_pretrained(out / "depth")
    VQTokenizer(VQTokenizerConfig(modality="semseg", num_classes=4, quantizer="fsq", fsq_levels=[4, 4],
                                  **common)).save_pretrained(out / "semseg")
    train_text_tokenizer(dataset, out / "text", vocab_size=400, num_sentinels=8, num_loc_bins=32)
    return out


def test_tokenize_sample_format(dataset, bundle_dir):
    bundle = TokenizerBundle.from_pretrained(bundle_dir)
    assert bundle.names() == ["depth", "rgb", "semseg", "text"]
    raw = next(iter_samples(dataset / "train"))
    tokens = bundle.tokenize_sample(raw)
    assert tokens["__key__"] == raw["__key__"]
    for name in ("rgb", "depth", "semseg"):
        assert tokens[name].dtype == np.int32 and tokens[name].shape == (64,)
        assert tokens[name].max() < bundle[name].vocab_size
    text = bundle.text
    for name in ("caption", "det"):
        assert tokens[name].dtype == np.int32 and tokens[name].ndim == 1 and tokens[name][-1] == text.eos_id
        assert text.eos_id not in tokens[name][:-1] and text.pad_id not in tokens[name]
    assert text.decode(tokens["caption"]) == [text.normalize(raw["caption"])]
    assert text.decode(tokens["det"]) == [boxes_to_text(raw["boxes"], SIZE, 32)]
    assert len(tokens["qa"]) == len(raw["qa"])
    q, a = tokens["qa"][0]
    assert text.decode(q) == [text.normalize(raw["qa"][0]["question"])] and a[-1] == text.eos_id
    # batched == one by one (image codes up to float near-ties of an untrained codebook); missing modalities are
    # simply absent; no boxes -> just eos
    raws = list(iter_samples(dataset / "val"))
    batched = bundle.tokenize_samples(raws)
    for r, t in zip(raws, batched):
        single = bundle.tokenize_sample(r)
        for k in ("caption", "det"):
            assert np.array_equal(single[k], t[k])
        for k in ("rgb", "depth", "semseg"):
            assert np.mean(single[k] == t[k]) > 0.95
    partial = bundle.tokenize_sample({"__key__": "x", "rgb": raws[0]["rgb"], "boxes": []})
    assert set(partial) == {"__key__", "rgb", "det"} and partial["det"].tolist() == [text.eos_id]


def test_modality_specs(bundle_dir):
    from onemodel.modalities import Modality

    bundle = TokenizerBundle.from_pretrained(bundle_dir)
    specs = bundle.modalities({"caption": 40, "answer": 0})
    mods = [Modality(**s) for s in specs]
    by_name = {m.name: m for m in mods}
    assert set(by_name) == {"rgb", "depth", "semseg", "caption", "question", "det"}
    assert by_name["rgb"].grid_size == 8 and by_name["rgb"].vocab_size == 32
    assert by_name["semseg"].vocab_size == 16  # fsq levels 4 * 4
    assert by_name["caption"].max_length == 40 and by_name["caption"].tokenizer == "text"
    assert by_name["det"].vocab_size == bundle.text.vocab_size
    with pytest.raises(ValueError, match="unknown sequence"):
        bundle.modalities({"captions": 3})


def test_pretokenize_round_trip(dataset, bundle_dir, tmp_path):
    out = tmp_path / "tokens"
    result = pretokenize(dataset, bundle_dir, out, batch_size=256, progress=False)  # one batch per shard
    assert result["splits"] == {"train": 10, "val": 4, "test": 3}
    meta = json.loads((out / "meta.json").read_text())
    assert meta["bundle"] == str(bundle_dir.resolve()) and meta["splits"] == result["splits"]
    assert sorted(p.name for p in (out / "train").iterdir()) == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    bundle = TokenizerBundle.from_pretrained(bundle_dir)
    longest = 0
    for split in ("train", "val", "test"):
        raws = list(iter_samples(dataset / split))
        expected_all = [t for shard in sorted((dataset / split).glob("*.tar"))
                        for t in bundle.tokenize_samples(list(iter_samples(str(shard))))]
        back = list(iter_token_samples(out, split))
        assert [t["__key__"] for t in back] == [r["__key__"] for r in raws]
        for expected, tok, raw in zip(expected_all, back, raws):
            assert set(tok) == set(expected) | {"__pixels_rgb"}
            # the rgb image rides along for pixel-patch inputs, losslessly (PNG)
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(tok["__pixels_rgb"]))), raw["rgb"])
            for k in ("rgb", "depth", "semseg", "caption", "det"):
                assert tok[k].dtype == np.int32 and np.array_equal(tok[k], expected[k])
            assert tok["qa"] == expected["qa"]
            longest = max(longest, len(tok["caption"]))
    specs = {m["name"]: m for m in meta["modalities"]}
    assert specs["caption"]["max_length"] == longest == meta["max_lengths"]["caption"]
    assert specs["rgb"] == {"name": "rgb", "kind": "grid", "vocab_size": 32, "tokenizer": "rgb", "grid_size": 8}
    # the training loader reads the same shards
    from training.loader import TokenShardSet

    loaded = TokenShardSet(out, "val")
    assert len(loaded) == 4 and np.array_equal(loaded.get(0)["rgb"], back_val0 := next(iter_token_samples(out, "val"))["rgb"])
    assert back_val0.shape == (64,)
    with pytest.raises(ValueError, match="already holds"):
        pretokenize(dataset, bundle_dir, out, progress=False)
    assert pretokenize(dataset, bundle_dir, out, progress=False, overwrite=True)["num_samples"] == 17


def test_bad_paths(dataset, bundle_dir, tmp_path):
    with pytest.raises(ValueError, match="holds no tokenizer"):
        TokenizerBundle.from_pretrained(tmp_path)
    with pytest.raises(FileNotFoundError):
        TokenizerBundle.from_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match="no raw shards"):
        pretokenize(tmp_path, bundle_dir, tmp_path / "o", progress=False)
    with pytest.raises(ValueError, match="differ"):
        pretokenize(dataset, bundle_dir, dataset, progress=False)
    with pytest.raises(KeyError, match="no 'normals' tokenizer"):
        TokenizerBundle.from_pretrained(bundle_dir)["normals"]


def test_cli_tokenize_and_train_text(dataset, bundle_dir, tmp_path, capsys):
    from onemodel.cli import main

    assert main(["tokenize", "--tokenizers", str(bundle_dir), "--data", str(dataset), "--out", str(tmp_path / "t"),
                 "--no-progress"]) == 0
    assert "tokenized 17 samples" in capsys.readouterr().out
    assert main(["train-tokenizer", "--modality", "text", "--data", str(dataset), "--out", str(tmp_path / "text"),
                 "--vocab-size", "300"]) == 0
    assert (tmp_path / "text" / "tokenizer.json").is_file()
    assert main(["tokenize", "--tokenizers", str(tmp_path / "missing"), "--data", str(dataset),
                 "--out", str(tmp_path / "u")]) == 2
