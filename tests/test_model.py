"""OneModel: learning, backend agreement, attention rules, padding isolation, KV cache, config strictness."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from onemodel.batch import MaskedSample, MultimodalBatch, collate
from onemodel.config import ConfigError
from onemodel.modalities import Modality
from onemodel.model import DecoderCache, OneModel, OneModelConfig

RGB, CAP, DEPTH = 0, 1, 2
MODS = (
    Modality("rgb", "grid", 32, "rgb", grid_size=4),
    Modality("caption", "sequence", 24, "text", max_length=8),
    Modality("depth", "grid", 16, "depth", grid_size=3),
)


@pytest.fixture(autouse=True)
def _one_thread():
    """Tiny ops: one thread is ~50x faster than two contending OpenMP threads on a busy 2-core machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def tiny(**kw) -> OneModel:
    """A small model with generic weights: the default init starts every residual branch (and the aligned
    context) at zero, which would make the dependence / equivalence checks below vacuous."""
    torch.manual_seed(0)
    kw.setdefault("init", "trunc_normal")
    cfg = OneModelConfig(modalities=MODS, dim=32, encoder_depth=2, decoder_depth=2, num_heads=4, **kw)
    return OneModel(cfg).eval()


def T(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.long)


def sample(seed: int, n_in: int, n_grid_tgt: int, cap_len: int, cap_as_target: bool = True) -> MaskedSample:
    """Random sample: rgb inputs/targets (disjoint positions), a caption as target (or input), depth inputs."""
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(16, generator=g)
    in_pos, tgt_pos = perm[:n_in].sort().values, perm[n_in : n_in + n_grid_tgt].sort().values
    cap = torch.randint(0, 24, (cap_len,), generator=g)
    enc = [(torch.randint(0, 32, (n_in,), generator=g), torch.full((n_in,), RGB), in_pos)]
    enc.append((torch.randint(0, 16, (2,), generator=g), torch.full((2,), DEPTH), T([0, 4])))
    dec = [(torch.randint(0, 32, (n_grid_tgt,), generator=g), torch.full((n_grid_tgt,), RGB), tgt_pos)]
    side = dec if cap_as_target else enc
    side.append((cap, torch.full((cap_len,), CAP), torch.arange(cap_len)))
    cat = lambda parts, i: torch.cat([p[i] for p in parts])  # noqa: E731
    return MaskedSample(cat(enc, 0), cat(enc, 1), cat(enc, 2), cat(dec, 0), cat(dec, 1), cat(dec, 2))


def batch2() -> MultimodalBatch:
    """Two samples of different lengths (padding on both sides), mixed grid + causal sequence targets."""
    return collate([sample(1, n_in=5, n_grid_tgt=3, cap_len=6), sample(2, n_in=3, n_grid_tgt=6, cap_len=4)])


def logits_of(model, batch, name):
    out = model(batch)
    return out.dense_logits(name, batch.batch_size, batch.num_target_slots)


# ------------------------------------------------------------------------------------------------ learning


def test_forward_shapes_and_loss_is_mean_over_modalities():
    model, b = tiny(), batch2()
    out = model(b)
    assert set(out.losses) == {"rgb", "caption"}
    n_rgb = int(((b.dec_mod == RGB) & b.dec_mask).sum())
    assert out.logits["rgb"].shape == (n_rgb, 32)
    assert out.logits["caption"].shape == (10, 24)
    assert out.hidden.shape == (2, b.num_target_slots, 32)
    torch.testing.assert_close(out.loss, (out.losses["rgb"] + out.losses["caption"]) / 2)
    # target_index maps logits rows back to their labels
    labels = b.dec_ids.reshape(-1)[out.target_index["caption"]]
    ce = torch.nn.functional.cross_entropy(out.logits["caption"], labels)
    torch.testing.assert_close(ce, out.losses["caption"])


def test_tiny_model_overfits_one_batch():
    model, b = tiny(), batch2()
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    first = None
    for _ in range(120):
        loss = model(b).loss
        first = first if first is not None else loss.item()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.1 * first, (first, loss.item())


def test_gradient_checkpointing_gives_the_same_gradients():
    b = batch2()
    grads = []
    for ckpt in (False, True):
        model = tiny().train()
        model.gradient_checkpointing = ckpt
        model(b).loss.backward()
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters() if p.grad is not None]))
    torch.testing.assert_close(grads[0], grads[1], atol=1e-6, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ backends


@pytest.mark.parametrize("tie", [False, True])
def test_sdpa_and_eager_agree_on_outputs_and_gradients(tie):
    b = batch2()
    results = []
    for backend in ("sdpa", "eager"):
        model = tiny(attention=backend, tie_embeddings=tie).train()
        out = model(b)
        out.loss.backward()
        results.append((out, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (o1, g1), (o2, g2) = results
    for name in o1.logits:
        torch.testing.assert_close(o1.logits[name], o2.logits[name], atol=1e-5, rtol=1e-5)
    assert g1.keys() == g2.keys()
    for name in g1:
        torch.testing.assert_close(g1[name], g2[name], atol=1e-5, rtol=1e-4, msg=name)


# ------------------------------------------------------------------------------------------------ attention rules


def test_changing_targets_of_one_modality_does_not_change_another():
    model, b = tiny(), batch2()
    ref = logits_of(model, b, "rgb")
    changed = dataclasses.replace(b, dec_ids=b.dec_ids.clone())
    cap = (b.dec_mod == CAP) & b.dec_mask
    changed.dec_ids[cap] = (changed.dec_ids[cap] + 7) % 24  # caption tokens feed the decoder (shifted)
    torch.testing.assert_close(logits_of(model, changed, "rgb"), ref, atol=1e-6, rtol=0)
    # the caption's own logits do change (the test can fail)
    assert not torch.allclose(logits_of(model, changed, "caption"), logits_of(model, b, "caption"))


def test_sequence_logits_do_not_depend_on_later_tokens():
    model, b = tiny(), batch2()
    ref = logits_of(model, b, "caption")
    k = 2
    later = (b.dec_mod == CAP) & b.dec_mask & (b.dec_pos >= k)
    changed = dataclasses.replace(b, dec_ids=b.dec_ids.masked_fill(later, 23))
    got = logits_of(model, changed, "caption")
    upto = (b.dec_mod == CAP) & b.dec_mask & (b.dec_pos <= k)  # slot k's input is token k-1: unchanged
    torch.testing.assert_close(got[upto], ref[upto], atol=1e-6, rtol=0)
    after = (b.dec_mod == CAP) & b.dec_mask & (b.dec_pos == k + 1)
    assert not torch.allclose(got[after], ref[after])


def test_sample_logits_unchanged_when_a_longer_sample_joins_the_batch():
    model = tiny()
    short = sample(3, n_in=2, n_grid_tgt=2, cap_len=3)
    long = sample(4, n_in=8, n_grid_tgt=7, cap_len=8)
    alone = model(collate([short]))
    both = model(collate([short, long]))
    for name in ("rgb", "caption"):
        n = alone.logits[name].shape[0]  # batch-major: the short sample's rows come first
        torch.testing.assert_close(both.logits[name][:n], alone.logits[name], atol=1e-5, rtol=1e-5)


def test_grid_targets_see_each_other_but_not_other_modalities():
    """A grid target's logits depend on its modality's other target slots (positions), not on a caption's."""
    model = tiny()
    s = sample(5, n_in=4, n_grid_tgt=4, cap_len=5)
    b = collate([s])
    ref = model(b).logits["rgb"]
    fewer = MaskedSample(s.enc_ids, s.enc_mod, s.enc_pos, s.dec_ids[1:4], s.dec_mod[1:4], s.dec_pos[1:4])
    got = model(collate([fewer])).logits["rgb"]  # slot 0 removed: the other rgb slots change
    assert not torch.allclose(got, ref[1:4], atol=1e-5)


def test_no_nan_with_empty_inputs_and_padding():
    model = tiny().train()
    empty = MaskedSample(T([]), T([]), T([]), T([3, 4]), T([RGB, RGB]), T([0, 1]))
    b = collate([empty, sample(6, n_in=6, n_grid_tgt=5, cap_len=7)])
    out = model(b)
    out.loss.backward()
    assert torch.isfinite(out.loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_batch_without_any_input_slot_decodes():
    """Unconditional pass (Ni = 0): cross-attention contributes zeros, logits are finite."""
    model = tiny()
    empty = torch.zeros(1, 0, dtype=torch.long)
    b = MultimodalBatch(empty, empty, empty, empty.bool(), T([[3, 4, 5]]), T([[RGB, RGB, RGB]]), T([[0, 1, 2]]),
                        torch.ones(1, 3, dtype=torch.bool))
    out = model(b)
    assert torch.isfinite(out.logits["rgb"]).all()
    enc = model.encode(b.enc_ids, b.enc_mod, b.enc_pos, b.enc_mask)
    assert enc.mask.shape == (1, 1) and not enc.mask.any()


@pytest.mark.parametrize("kind", ["grid", "sequence", "mixed"])
def test_fast_attention_paths_equal_the_dense_mask(kind, monkeypatch):
    model = tiny()
    if kind == "grid":
        samples = [sample(7, 4, 5, 3, cap_as_target=False), sample(8, 3, 2, 6, cap_as_target=False)]
        samples = [MaskedSample(s.enc_ids, s.enc_mod, s.enc_pos, *(t[s.dec_mod == RGB] for t in (s.dec_ids, s.dec_mod, s.dec_pos))) for s in samples]
    elif kind == "sequence":
        samples = [sample(9, 4, 0, 3), sample(10, 5, 0, 8)]
    else:
        samples = [sample(11, 4, 3, 3), sample(12, 5, 2, 8)]
    b = collate(samples)
    plan = model._self_attention_plan(b.dec_mod, b.dec_pos, b.dec_mask)
    if kind == "sequence":
        assert plan == (None, True)
    elif kind == "grid":
        assert plan[1] is False and plan[0].shape == (2, 1, 1, b.num_target_slots)
    fast = model(b)
    from onemodel.model import decoder_self_mask

    dense = lambda mod, pos, mask: (decoder_self_mask(mod, pos, mod, pos, mask, model.mod_is_grid), False)  # noqa: E731
    monkeypatch.setattr(model, "_self_attention_plan", dense)
    slow = model(b)
    for name in fast.logits:
        torch.testing.assert_close(fast.logits[name], slow.logits[name], atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ KV cache


def test_kv_cached_decoding_equals_full_decoding():
    model = tiny()
    L = 6
    # two samples with different input lengths (encoder padding) and caption lengths (6 and 4)
    s1, s2 = sample(13, n_in=5, n_grid_tgt=0, cap_len=L), sample(14, n_in=2, n_grid_tgt=0, cap_len=4)
    b = collate([s1, s2])
    enc = model.encode(b.enc_ids, b.enc_mod, b.enc_pos, b.enc_mask)
    dec_in = model.shift_targets(b.dec_ids, b.dec_pos)
    full = model.logits_for(model.decode(enc, dec_in, b.dec_mod, b.dec_pos, b.dec_mask), "caption")  # (B, L, V)
    cache = model.new_cache(enc)
    assert isinstance(cache, DecoderCache) and cache.length == 0
    steps = []
    for t in range(L):
        sl = slice(t, t + 1)
        h = model.decode(enc, dec_in[:, sl], b.dec_mod[:, sl], b.dec_pos[:, sl], b.dec_mask[:, sl], cache=cache)
        steps.append(model.logits_for(h, "caption"))
    assert cache.length == L
    cached = torch.cat(steps, dim=1)
    real = b.dec_mask
    torch.testing.assert_close(cached[real], full[real], atol=1e-5, rtol=1e-5)


def test_kv_cache_accepts_chunks():
    model = tiny()
    b = collate([sample(15, n_in=4, n_grid_tgt=0, cap_len=7)])
    enc = model.encode(b.enc_ids, b.enc_mod, b.enc_pos, b.enc_mask)
    dec_in = model.shift_targets(b.dec_ids, b.dec_pos)
    full = model.decode(enc, dec_in, b.dec_mod, b.dec_pos, b.dec_mask)
    cache = model.new_cache(enc)
    parts = [model.decode(enc, *(t[:, a:z] for t in (dec_in, b.dec_mod, b.dec_pos, b.dec_mask)), cache=cache) for a, z in ((0, 3), (3, 4), (4, 7))]
    torch.testing.assert_close(torch.cat(parts, 1), full, atol=1e-5, rtol=1e-5)


# ------------------------------------------------------------------------------------------------ config / errors


def test_config_round_trips_and_is_strict():
    cfg = tiny().config
    data = cfg.to_dict()
    assert isinstance(data["modalities"][0], dict)
    again = OneModelConfig.from_dict(data)
    assert again == cfg and again.modalities == MODS
    with pytest.raises(ConfigError, match="widht"):
        OneModelConfig.from_dict({**data, "widht": 3})
    with pytest.raises(ConfigError, match="grid_sz"):
        OneModelConfig.from_dict({**data, "modalities": [{**data["modalities"][0], "grid_sz": 2}]})
    with pytest.raises(ValueError, match="divisible by num_heads"):
        OneModelConfig(modalities=MODS, dim=36, num_heads=8)
    with pytest.raises(ValueError, match="attention"):
        OneModelConfig(modalities=MODS, attention="flash")
    with pytest.raises(TypeError):
        OneModelConfig(modalities="rgb")


def test_malformed_batches_raise_value_errors():
    model, b = tiny(), batch2()
    bad = dataclasses.replace(b, dec_ids=b.dec_ids.masked_fill(b.dec_mask & (b.dec_mod == CAP), 30))  # caption V=24
    with pytest.raises(ValueError, match="vocabulary"):
        model(bad)
    bad = dataclasses.replace(b, enc_mod=b.enc_mod.masked_fill(b.enc_mask, 5))
    with pytest.raises(ValueError, match="modality index"):
        model(bad)
    bad = dataclasses.replace(b, enc_pos=b.enc_pos.masked_fill(b.enc_mask, 99))
    with pytest.raises(ValueError, match="position"):
        model(bad)
    enc = model.encode(b.enc_ids, b.enc_mod, b.enc_pos, b.enc_mask)
    with pytest.raises(ValueError, match="shift_targets"):
        model.decode(enc, b.dec_ids.masked_fill(b.dec_mod == CAP, 99), b.dec_mod, b.dec_pos, b.dec_mask)
    with pytest.raises(ValueError, match="unknown modality"):
        model.logits_for(torch.zeros(1, 32), "normals")


def test_param_count_and_flops_estimate():
    untied, tied = tiny(), tiny(tie_embeddings=True)
    V = sum(m.vocab_size for m in MODS)
    assert untied.num_params() - tied.num_params() == V * 32  # the tied head is counted once
    assert tied.head_weight is tied.tok_emb.weight
    # the documented formula matches PyTorch's FLOP counter on an unpadded batch (grid targets: V = 32)
    from torch.utils.flop_counter import FlopCounterMode

    s = sample(16, n_in=10, n_grid_tgt=6, cap_len=3, cap_as_target=False)  # 10 + 2 depth + 3 caption inputs
    b = collate([s, s])
    eager = tiny(attention="eager")  # the counter sees eager attention's matmuls (not CPU flash SDPA)
    with FlopCounterMode(display=False) as counter:
        eager(b)
    per_token = untied.flops_per_token(num_inputs=15, num_targets=6, vocab=32)
    measured = 3 * counter.get_total_flops() / (2 * (15 + 6))
    assert abs(per_token - measured) / measured < 0.02, (per_token, measured)
    assert untied.flops_per_token(30, 12) > per_token  # attention grows with length
