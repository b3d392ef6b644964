"""The training data stream: deterministic, layout-independent, resumable; mixtures; raw shards on the fly."""

from __future__ import annotations

import collections
import io

import numpy as np
import pytest
import torch
from PIL import Image

from onemodel.masking import MaskingConfig, TextSpecialIds
from training.loader import MaskedStream, build_train_loader, build_val_batches, load_source

from test_train import build_tiny_pipeline


@pytest.fixture(scope="module")
def parts():
    tiny = build_tiny_pipeline()  # the tiny shapes pipeline, shared with tests/test_train.py
    from tokenizers_mm.bundle import TokenizerBundle
    from training.train import model_modalities
    from training.config import load_train_config

    bundle = TokenizerBundle.from_pretrained(tiny / "bundle")
    config = load_train_config(None, [f"tokenizers={tiny / 'bundle'}", f"data.sources=[{{path: {tiny / 'tokens'}}}]"])
    modalities = model_modalities(config, bundle)
    return {"root": tiny, "modalities": modalities, "text": TextSpecialIds.coerce(bundle.text),
            "masking": MaskingConfig(input_budget=24, target_budget=24)}


def stream(parts, sources, **kw):
    return MaskedStream(sources, parts["modalities"], parts["masking"], parts["text"], seed=kw.pop("seed", 0),
                        micro_batch_size=kw.pop("micro_batch_size", 4), **kw)


def same(a, b) -> bool:
    return all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("enc_ids", "enc_mod", "enc_pos", "dec_ids",
                                                                    "dec_mod", "dec_pos"))


def test_stream_is_deterministic_and_independent_of_process_layout(parts):
    src = [load_source(parts["root"] / "tokens", "train", parts["root"] / "bundle", False, None)]
    one = list(stream(parts, src, grad_accum_steps=2, end_step=3))  # 1 process x 2 accumulation
    again = list(stream(parts, src, grad_accum_steps=2, end_step=3))
    assert len(one) == 3 * 8 and all(same(a, b) for a, b in zip(one, again))
    r0 = list(stream(parts, src, num_processes=2, rank=0, end_step=3))  # 2 processes x 1 step
    r1 = list(stream(parts, src, num_processes=2, rank=1, end_step=3))
    for step in range(3):  # step s: rank 0 = first micro-batch, rank 1 = second micro-batch of the 1-process run
        assert all(same(a, b) for a, b in zip(r0[4 * step: 4 * step + 4], one[8 * step: 8 * step + 4]))
        assert all(same(a, b) for a, b in zip(r1[4 * step: 4 * step + 4], one[8 * step + 4: 8 * step + 8]))
    resumed = list(stream(parts, src, grad_accum_steps=2, start_step=2, end_step=3))  # resume = start at the step
    assert all(same(a, b) for a, b in zip(resumed, one[16:]))
    other_seed = list(stream(parts, src, grad_accum_steps=2, end_step=1, seed=1))
    assert not all(same(a, b) for a, b in zip(other_seed, one[:8]))


def test_worker_processes_give_the_same_batches(parts):
    src = [load_source(parts["root"] / "tokens", "train", parts["root"] / "bundle", False, None)]
    kw = dict(sources=src, modalities=parts["modalities"], masking=parts["masking"], text_ids=parts["text"], seed=0,
              micro_batch_size=4, num_processes=1, rank=0, grad_accum_steps=2, start_step=0, end_step=3)
    serial = list(build_train_loader(**kw, num_workers=0))
    parallel = list(build_train_loader(**kw, num_workers=2))
    assert len(serial) == len(parallel) == 6
    for a, b in zip(serial, parallel):
        assert all(torch.equal(getattr(a, f), getattr(b, f)) for f in ("enc_ids", "enc_mask", "dec_ids", "dec_mask"))


def test_mixture_weights_and_per_source_modalities(parts):
    root = parts["root"]
    names = [m.name for m in parts["modalities"]]
    captions = load_source(root / "tokens", "train", root / "bundle", False, ["rgb", "caption"], weight=3.0)
    depth = load_source(root / "tokens", "train", root / "bundle", False, ["rgb", "depth"], weight=1.0)
    s = stream(parts, [captions, depth], micro_batch_size=1, end_step=400)
    seen = collections.Counter()
    for sample in s:
        mods = {names[i] for i in torch.cat([sample.enc_mod, sample.dec_mod]).tolist()}
        assert mods <= {"rgb", "caption"} or mods <= {"rgb", "depth"}, mods
        seen["caption" if "caption" in mods else "depth" if "depth" in mods else "rgb only"] += 1
    share = seen["caption"] / (seen["caption"] + seen["depth"])
    assert 0.65 < share < 0.85, seen  # weight 3:1


def test_raw_shards_tokenized_on_the_fly_match_token_shards(parts):
    root = parts["root"]
    raw = load_source(root / "data", "val", root / "bundle", True, None)
    tok = load_source(root / "tokens", "val", root / "bundle", False, None)
    assert len(raw.samples) == len(tok.samples) == 16
    for i in (0, 7, 15):
        a, b = raw.samples.get(i), tok.samples.get(i)
        assert sorted(k for k in a if k != "__key__") == sorted(b)
        for name in b:
            if name == "qa":
                assert [[list(q), list(x)] for q, x in a[name]] == [[list(q), list(x)] for q, x in b[name]]
            elif name.startswith("__pixels_"):  # raw: the image array; token shards: its PNG (lossless)
                assert np.array_equal(a[name], np.asarray(Image.open(io.BytesIO(b[name])))), name
            else:
                assert a[name].tolist() == b[name].tolist(), name


def test_val_batches_are_fixed(parts):
    src = [load_source(parts["root"] / "tokens", "val", parts["root"] / "bundle", False, None)]
    args = (src, parts["modalities"], parts["masking"], parts["text"], 0, 4, 12)
    a, b = build_val_batches(*args), build_val_batches(*args)
    assert len(a) == 3 and all(torch.equal(x.dec_ids, y.dec_ids) and torch.equal(x.enc_ids, y.enc_ids) for x, y in zip(a, b))
    # the same 12 samples whatever the process count: 2 ranks split them (6 each, micro-batches of 4 and 2)
    one = [s for batch in a for s in batch.samples()]
    ranks = [build_val_batches(*args, num_processes=2, rank=r) for r in (0, 1)]
    assert [len(batch.samples()) for batch in ranks[0]] == [4, 2]
    two = [s for r in ranks for batch in r for s in batch.samples()]
    key = lambda s: (s.enc_ids.tolist(), s.dec_ids.tolist())  # noqa: E731
    assert sorted(map(key, one)) == sorted(map(key, two))
    train_first = next(iter(stream(parts, src, end_step=1)))
    assert not torch.equal(a[0].samples()[0].enc_ids, train_first.enc_ids)  # a separate stream from training
