"""Tests for onemodel.masking and onemodel.batch: budgets, disjointness, determinism, span masking, collate."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from onemodel.batch import MaskedSample, MultimodalBatch, collate
from onemodel.config import ConfigError, from_dict
from onemodel.masking import (
    MaskingConfig,
    TextSpecialIds,
    build_sample,
    mask_sample,
    masking_rng,
    select_qa,
    span_mask,
    split_budget,
)
from onemodel.modalities import DEFAULT_MODALITIES, Modality

MODS = DEFAULT_MODALITIES  # rgb depth semseg caption question answer det
IDX = {m.name: i for i, m in enumerate(MODS)}
EOS, PAD = 2, 0
SENTINELS = tuple(range(10, 26))
TEXT = TextSpecialIds(eos_id=EOS, sentinel_ids=SENTINELS, pad_id=PAD)


def _seq(rng: np.random.Generator, n: int) -> np.ndarray:
    """n tokens, the last one eos; body ids avoid the special ids."""
    return np.append(rng.integers(100, 1000, n - 1), EOS).astype(np.int64)


def _sample(seed: int = 0, names=("rgb", "depth", "semseg", "caption", "question", "answer", "det")) -> dict:
    rng = np.random.default_rng(1000 + seed)
    lengths = {"caption": 20, "question": 10, "answer": 3, "det": 16}
    out = {}
    for n in names:
        out[n] = rng.integers(0, 1024, 256) if MODS[IDX[n]].is_grid else _seq(rng, lengths[n])
    return out


def _per_mod(ms: MaskedSample, side: str) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    mods = getattr(ms, f"{side}_mod").numpy()
    return {int(i): tuple(x.numpy() for x in ms.tokens_of(int(i), side)) for i in np.unique(mods)}


def _reconstruct(inp: np.ndarray, tgt: np.ndarray) -> np.ndarray:
    """Put each target span back in place of its sentinel in the input."""
    spans, cur, key = {}, None, None
    for t in tgt[:-1].tolist():
        if t in SENTINELS:
            key = t
            spans[key] = cur = []
        else:
            cur.append(t)
    out = []
    for t in inp.tolist():
        out.extend(spans[t] if t in SENTINELS else [t])
    return np.array(out)


# ------------------------------------------------------------------------------------------ budgets


@pytest.mark.parametrize("alphas", [[0.05], [0.2, 0.5, 1.0], [5.0]])
def test_grid_only_budgets_exact_and_disjoint(alphas):
    cfg = MaskingConfig(input_budget=128, target_budget=128, alphas=alphas)
    tokens = _sample(names=("rgb", "depth", "semseg"))
    for seed in range(60):
        ms = mask_sample(tokens, MODS, cfg, masking_rng(0, seed), TEXT)
        assert ms.num_inputs == 128 and ms.num_targets == 128
        enc, dec = _per_mod(ms, "enc"), _per_mod(ms, "dec")
        for i in set(enc) | set(dec):
            ein, epos = enc.get(i, (np.zeros(0), np.zeros(0, dtype=np.int64)))
            did, dpos = dec.get(i, (np.zeros(0), np.zeros(0, dtype=np.int64)))
            assert not set(epos.tolist()) & set(dpos.tolist())  # inputs and targets never overlap
            assert len(set(epos.tolist())) == len(epos) and len(set(dpos.tolist())) == len(dpos)
            src = tokens[MODS[i].name]
            assert np.array_equal(ein, src[epos]) and np.array_equal(did, src[dpos])  # ids match positions


def test_budget_capped_by_available_tokens_and_redistributed():
    mods = (Modality("a", "grid", 50, "a", grid_size=4), Modality("b", "grid", 50, "b", grid_size=4))
    cfg = MaskingConfig(input_budget=20, target_budget=20, alphas=[0.05])
    rng = np.random.default_rng(0)
    for seed in range(30):
        ms = mask_sample({"a": rng.integers(0, 50, 16), "b": rng.integers(0, 50, 16)}, mods, cfg, seed)
        assert ms.num_inputs == 20  # one grid alone (16) cannot hold it: surplus goes to the other
        assert ms.num_targets == 12  # 32 tokens - 20 inputs
    one = mask_sample({"a": rng.integers(0, 50, 16)}, mods, cfg, 0)
    assert one.num_inputs == 16 and one.num_targets == 0


def test_full_sample_budgets_exact_with_sequences():
    cfg = MaskingConfig()
    for seed in range(80):
        tokens = _sample(seed)
        ms = mask_sample(tokens, MODS, cfg, masking_rng(3, seed), TEXT)
        assert ms.num_inputs == cfg.input_budget and ms.num_targets == cfg.target_budget
        MultimodalBatch.validate(collate([ms]), MODS)
        # sequence tokens: whole, a prefix, or span-masked (with a sentinel)
        for i, (ids, pos) in _per_mod(ms, "dec").items():
            if MODS[i].is_sequence:
                assert np.array_equal(pos, np.arange(len(ids)))


def test_split_budget_exact_and_capped():
    rng = np.random.default_rng(0)
    for _ in range(200):
        n = int(rng.integers(1, 7))
        caps = rng.integers(0, 40, n)
        w = rng.dirichlet(np.full(n, 0.3))
        budget = int(rng.integers(0, 120))
        a = split_budget(budget, w, caps)
        assert a.sum() == min(budget, caps.sum()) and np.all(a <= caps) and np.all(a >= 0)
    assert split_budget(10, [0.7, 0.3], [100, 100]).tolist() == [7, 3]
    assert split_budget(10, [0.0, 0.0], [100, 100]).tolist() == [5, 5]  # zero weights -> equal shares


def test_concentration_is_used():
    tokens = _sample(names=("rgb", "depth", "semseg"))
    even = mask_sample(tokens, MODS, MaskingConfig(alphas=[1000.0]), 0)
    counts = np.bincount(even.enc_mod.numpy(), minlength=3)[:3]
    assert counts.max() - counts.min() <= 8  # near-uniform split
    peaked = [np.bincount(mask_sample(tokens, MODS, MaskingConfig(alphas=[0.02]), s).enc_mod.numpy(), minlength=3).max()
              for s in range(20)]
    assert np.median(peaked) >= 120  # one modality takes (almost) everything


# ------------------------------------------------------------------------------------------ determinism


def test_same_seed_same_masks_different_seed_different():
    tokens = _sample(0)
    a = mask_sample(tokens, MODS, MaskingConfig(), masking_rng(7, 11), TEXT)
    b = mask_sample(tokens, MODS, MaskingConfig(), masking_rng(7, 11), TEXT)
    c = mask_sample(tokens, MODS, MaskingConfig(), masking_rng(7, 12), TEXT)
    for f in ("enc_ids", "enc_mod", "enc_pos", "dec_ids", "dec_mod", "dec_pos"):
        assert torch.equal(getattr(a, f), getattr(b, f))
    assert not (torch.equal(a.enc_pos, c.enc_pos) and torch.equal(a.enc_mod, c.enc_mod))
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(mask_sample(tokens, MODS, MaskingConfig(), g1, TEXT).enc_pos,
                       mask_sample(tokens, MODS, MaskingConfig(), g2, TEXT).enc_pos)
    assert torch.equal(mask_sample(tokens, MODS, MaskingConfig(), 4, TEXT).dec_pos,
                       mask_sample(tokens, MODS, MaskingConfig(), 4, TEXT).dec_pos)
    with pytest.raises(TypeError, match="generator"):
        mask_sample(tokens, MODS, MaskingConfig(), np.random.RandomState(0), TEXT)


def test_config_sample_rng_and_global_rng_untouched():
    cfg = MaskingConfig(seed=3)
    state = np.random.get_state()[1].copy()
    torch_state = torch.get_rng_state().clone()
    a = mask_sample(_sample(), MODS, cfg, cfg.sample_rng(5, epoch=1), TEXT)
    b = mask_sample(_sample(), MODS, cfg, masking_rng(3, 5, 1), TEXT)
    assert torch.equal(a.enc_pos, b.enc_pos) and torch.equal(a.dec_ids, b.dec_ids)
    assert np.array_equal(np.random.get_state()[1], state) and torch.equal(torch.get_rng_state(), torch_state)


# ------------------------------------------------------------------------------------------ modalities / roles


def test_missing_modalities():
    tokens = _sample(names=("rgb", "caption"))
    tokens["depth"] = np.zeros(0, dtype=np.int64)  # empty = missing
    for seed in range(40):
        ms = mask_sample(tokens, MODS, MaskingConfig(), seed, TEXT)
        used = set(ms.enc_mod.tolist()) | set(ms.dec_mod.tolist())
        assert used <= {IDX["rgb"], IDX["caption"]}
        assert ms.num_inputs == 128 and ms.num_targets == 128  # rgb (256) absorbs the rest


def test_sequence_target_format_and_exact_rule():
    """rgb only as input, caption only as target: caption is always the whole autoregressive target."""
    cfg = MaskingConfig(input_modalities=["rgb"], target_modalities=["caption"])
    for seed in range(20):
        tokens = _sample(seed, names=("rgb", "caption", "det"))
        ms = mask_sample(tokens, MODS, cfg, seed, TEXT)
        assert set(ms.enc_mod.tolist()) == {IDX["rgb"]} and ms.num_inputs == 128
        ids, pos = ms.tokens_of(IDX["caption"], "dec")
        assert ids[-1].item() == EOS and torch.equal(pos, torch.arange(len(ids)))
        assert np.array_equal(ids.numpy(), tokens["caption"])
        assert ms.num_targets == len(tokens["caption"])  # no grid target allowed -> fewer than the budget


def test_sequence_truncated_to_budget_and_max_length():
    """Sequences are taken in random order; one that does not fit the remaining budget is cut to a prefix."""
    cfg = MaskingConfig(target_budget=20, alphas=[1.0], input_modalities=["rgb"], target_modalities=["caption", "det"])
    tokens = _sample(names=("rgb", "caption", "det"))
    both = 0
    for seed in range(60):
        ms = mask_sample(tokens, MODS, cfg, seed, TEXT)
        dec = _per_mod(ms, "dec")
        assert ms.num_targets <= 20
        for i, (ids, pos) in dec.items():
            assert np.array_equal(ids, tokens[MODS[i].name][: len(ids)]) and np.array_equal(pos, np.arange(len(ids)))
        if len(dec) == 2:
            both += 1
            assert ms.num_targets == 20 and min(len(v[0]) for v in dec.values()) < 16  # the later one was cut
    assert both > 0
    short = (Modality("caption", "sequence", 1024, "text", max_length=6),)
    ms = mask_sample({"caption": tokens["caption"]}, short, MaskingConfig(target_modalities=["caption"],
                     input_modalities=[]), 0, TEXT)
    assert ms.dec_ids.tolist() == tokens["caption"][:5].tolist() + [EOS]  # truncated, eos kept


def test_span_masking_reconstruction():
    rng = np.random.default_rng(0)
    for trial in range(300):
        n = int(rng.integers(3, 40))
        seq = _seq(rng, n)
        out = span_mask(seq, EOS, SENTINELS, float(rng.uniform(0.1, 0.9)), float(rng.uniform(1, 5)), rng)
        inp, tgt = out
        assert np.array_equal(_reconstruct(inp, tgt), seq)
        assert len(inp) <= n and len(tgt) <= n and tgt[-1] == EOS and inp[-1] == EOS
        k = int(np.isin(inp, SENTINELS).sum())
        assert k >= 1 and list(inp[np.isin(inp, SENTINELS)]) == list(SENTINELS[:k])
        assert tgt[0] == SENTINELS[0] and list(tgt[np.isin(tgt, SENTINELS)]) == list(SENTINELS[:k])
    assert span_mask(np.array([500, EOS]), EOS, SENTINELS, 0.5, 3.0, rng) is None  # too short
    assert span_mask(_seq(rng, 10), EOS, (), 0.5, 3.0, rng) is None  # no sentinels


def test_span_masking_through_mask_sample():
    cfg = MaskingConfig(input_modalities=["caption"], target_modalities=["caption"], span_noise_density=[0.3, 0.3])
    spans = set()
    for seed in range(30):
        tokens = _sample(seed, names=("caption",))
        ms = mask_sample(tokens, MODS, cfg, seed, TEXT)
        inp, ipos = ms.tokens_of(IDX["caption"], "enc")
        tgt, tpos = ms.tokens_of(IDX["caption"], "dec")
        assert torch.equal(ipos, torch.arange(len(inp))) and torch.equal(tpos, torch.arange(len(tgt)))
        assert np.array_equal(_reconstruct(inp.numpy(), tgt.numpy()), tokens["caption"])
        spans.add(tuple(inp.tolist()))
        assert round(0.3 * 19) == int((~np.isin(tgt.numpy(), SENTINELS)).sum()) - 1  # masked tokens (+ eos)
    assert len(spans) > 20  # span placement is random
    caption = _sample(names=("caption",))["caption"]
    roles = set()
    for seed in range(20):  # no span masking: both roles -> whole input or whole target, never both
        whole = mask_sample({"caption": caption}, MODS, MaskingConfig(
            input_modalities=["caption"], target_modalities=["caption"], span_masking_prob=0.0), seed, TEXT)
        assert (whole.num_inputs == 0) != (whole.num_targets == 0)
        ids = whole.enc_ids if whole.num_inputs else whole.dec_ids
        assert np.array_equal(ids.numpy(), caption)
        roles.add(whole.num_inputs > 0)
    assert roles == {True, False}


def test_allow_lists_and_condition_dropout():
    tokens = _sample(1)
    ms = mask_sample(tokens, MODS, MaskingConfig(input_modalities=["rgb"], target_modalities=["depth", "det"]), 1, TEXT)
    assert set(ms.enc_mod.tolist()) == {IDX["rgb"]}
    assert set(ms.dec_mod.tolist()) <= {IDX["depth"], IDX["det"]} and ms.num_targets == 128
    for seed in range(10):
        ms = mask_sample(tokens, MODS, MaskingConfig(condition_dropout=1.0), seed, TEXT)
        assert ms.num_inputs == 0 and ms.num_targets == 128
    kept = [mask_sample(tokens, MODS, MaskingConfig(condition_dropout=0.5), s, TEXT).num_inputs for s in range(60)]
    assert 10 < sum(k == 0 for k in kept) < 50


def test_select_qa():
    pairs = [[[5, 6, EOS], [7, EOS]], [[8, EOS], [9, 9, EOS]], [[11, EOS], [12, EOS]]]
    sample = {"rgb": np.zeros(256, dtype=np.int32), "qa": pairs}
    picked = set()
    for seed in range(30):
        out = select_qa(sample, np.random.default_rng(seed))
        assert "qa" not in out and "qa" in sample and out["rgb"] is sample["rgb"]
        q, a = out["question"].tolist(), out["answer"].tolist()
        assert [q, a] in pairs
        assert out["question"].tolist() == select_qa(sample, np.random.default_rng(seed))["question"].tolist()
        picked.add(tuple(q))
    assert len(picked) == 3
    assert "question" not in select_qa({"rgb": sample["rgb"], "qa": []}, 0)
    with pytest.raises(ValueError, match="select_qa"):
        mask_sample(sample, MODS, MaskingConfig(), 0, TEXT)


# ------------------------------------------------------------------------------------------ collate


def test_collate_pads_and_roundtrips():
    cfgs = [MaskingConfig(input_budget=20 + 30 * s, target_budget=50 - 10 * s) for s in range(4)]
    samples = [mask_sample(_sample(s), MODS, cfg, s, TEXT) for s, cfg in enumerate(cfgs)]
    samples.append(mask_sample(_sample(), MODS, MaskingConfig(condition_dropout=1.0), 0, TEXT))  # no inputs
    batch = collate(samples, pad_to_multiple_of=8)
    batch.validate(MODS)
    assert batch.batch_size == 5 and batch.num_input_slots == 112 and batch.num_target_slots % 8 == 0
    assert batch.enc_mask.sum(1).tolist() == [s.num_inputs for s in samples]
    assert batch.dec_mask.sum(1).tolist() == [s.num_targets for s in samples]
    for name in ("enc_ids", "enc_mod", "enc_pos"):
        assert (getattr(batch, name)[~batch.enc_mask] == 0).all()
    assert batch.enc_mask.dtype == torch.bool and batch.enc_ids.dtype == torch.long
    # real tokens are a prefix of each row and intact
    for b, s in enumerate(samples):
        assert batch.enc_mask[b, : s.num_inputs].all() and not batch.enc_mask[b, s.num_inputs :].any()
        back = batch.samples()[b]
        for f in ("enc_ids", "enc_mod", "enc_pos", "dec_ids", "dec_mod", "dec_pos"):
            assert torch.equal(getattr(back, f), getattr(s, f))
    moved = batch.to("cpu")
    assert moved.enc_ids.dtype == torch.long and torch.equal(moved.dec_ids, batch.dec_ids)
    with pytest.raises(ValueError):
        collate([])
    with pytest.raises(TypeError):
        collate([{"enc_ids": 1}])


def test_batch_validate_catches_errors():
    batch = collate([build_sample({"rgb": torch.arange(256)}, {"caption": 5}, MODS)])
    batch.validate(MODS)
    bad = collate([build_sample({"rgb": torch.arange(256)}, {}, MODS)])
    bad.enc_mod[0, 0] = 99
    with pytest.raises(ValueError, match="modality index"):
        bad.validate(MODS)
    bad = collate([build_sample({"rgb": torch.arange(256)}, {}, MODS)])
    bad.enc_ids[0, 3] = 5000
    with pytest.raises(ValueError, match="vocabulary"):
        bad.validate(MODS)
    bad.enc_ids = bad.enc_ids.int()
    with pytest.raises(TypeError, match="dtype"):
        bad.validate(MODS)


# ------------------------------------------------------------------------------------------ build_sample


def test_build_sample_exact_sets():
    rgb = torch.arange(256) % 1024
    done = torch.tensor([3, 0, 200])
    todo = torch.tensor([5, 6, 255])
    depth_ids = torch.tensor([10, 11, 12])
    cap = torch.tensor([300, 301, EOS])
    ms = build_sample(
        {"depth": (depth_ids, done), "rgb": rgb, "caption": cap},
        {"depth": todo, "answer": 4, "semseg": (torch.tensor([1, 2]), torch.tensor([7, 9])), "det": None},
        MODS,
    )
    assert ms.enc_mod.tolist() == [0] * 256 + [1] * 3 + [3] * 3  # modality order, not dict order
    assert torch.equal(ms.enc_ids[:256], rgb) and torch.equal(ms.enc_pos[:256], torch.arange(256))
    assert ms.enc_ids[256:259].tolist() == [10, 11, 12] and ms.enc_pos[256:259].tolist() == [3, 0, 200]
    assert ms.enc_ids[259:].tolist() == cap.tolist() and ms.enc_pos[259:].tolist() == [0, 1, 2]
    assert ms.dec_mod.tolist() == [1, 1, 1, 2, 2, 5, 5, 5, 5]
    assert ms.dec_pos.tolist() == [5, 6, 255, 7, 9, 0, 1, 2, 3]
    assert ms.dec_ids.tolist() == [0, 0, 0, 1, 2, 0, 0, 0, 0]
    full = build_sample({}, {"depth": "all", "caption": cap}, MODS)
    assert full.dec_pos.tolist() == list(range(256)) + [0, 1, 2] and full.dec_ids[-3:].tolist() == cap.tolist()
    with pytest.raises(ValueError, match="disjoint"):
        build_sample({"depth": (depth_ids, done)}, {"depth": torch.tensor([0, 1])}, MODS)
    with pytest.raises(TypeError, match="positions"):
        build_sample({}, {"rgb": 10}, MODS)
    with pytest.raises(ValueError, match="unique"):
        build_sample({}, {"rgb": torch.tensor([1, 1])}, MODS)
    with pytest.raises(ValueError, match="outside"):
        build_sample({}, {"rgb": torch.tensor([256])}, MODS)
    with pytest.raises(ValueError, match="give all"):
        build_sample({"rgb": torch.arange(10)}, {}, MODS)
    with pytest.raises(ValueError, match="max_length"):
        build_sample({}, {"answer": 9}, MODS)
    with pytest.raises(ValueError, match="unknown modality"):
        build_sample({"sound": torch.arange(3)}, {}, MODS)


# ------------------------------------------------------------------------------------------ errors


def test_bad_inputs_raise_clear_errors():
    tokens = _sample()
    with pytest.raises(ValueError, match="unknown modality"):
        mask_sample({**tokens, "sound": np.arange(3)}, MODS, MaskingConfig(), 0, TEXT)
    with pytest.raises(ValueError, match="unknown modality"):
        mask_sample(tokens, MODS, MaskingConfig(input_modalities=["rgb", "sound"]), 0, TEXT)
    with pytest.raises(ValueError, match="outside"):
        mask_sample({**tokens, "rgb": np.full(256, 1024)}, MODS, MaskingConfig(), 0, TEXT)
    with pytest.raises(ValueError, match="outside"):
        mask_sample({**tokens, "caption": np.array([-1, EOS])}, MODS, MaskingConfig(), 0, TEXT)
    with pytest.raises(ValueError, match="grid"):
        mask_sample({**tokens, "rgb": np.arange(100)}, MODS, MaskingConfig(), 0, TEXT)
    with pytest.raises(ValueError, match="pad id"):
        mask_sample({**tokens, "caption": np.array([5, 6, EOS, PAD])}, MODS, MaskingConfig(), 0, TEXT)
    with pytest.raises(ValueError, match="text_ids"):
        mask_sample(tokens, MODS, MaskingConfig(), 0)
    with pytest.raises(ValueError, match="1-D"):
        mask_sample({"rgb": np.zeros((1, 256), dtype=np.int64)}, MODS, MaskingConfig(), 0)
    with pytest.raises(TypeError, match="integer"):
        mask_sample({"rgb": np.zeros(256)}, MODS, MaskingConfig(), 0)
    assert mask_sample({"rgb": np.zeros(256, np.int32), "__key__": "x"}, MODS, MaskingConfig(), 0).num_inputs == 128
    for bad in ({"input_budget": -1}, {"alphas": []}, {"alphas": [0.0]}, {"span_noise_density": [0.5, 0.2]},
                {"condition_dropout": 1.5}, {"span_mean_length": 0.5}, {"target_budget": 2.5}):
        with pytest.raises(ValueError):
            MaskingConfig(**bad)
        with pytest.raises(ConfigError):
            from_dict(MaskingConfig, bad)
    with pytest.raises(ConfigError, match="unknown config key"):
        from_dict(MaskingConfig, {"input_tokens": 10})
    cfg = from_dict(MaskingConfig, {"input_budget": 64, "alphas": [0.5], "alpha_scale": {"caption": 2}})
    assert cfg.input_budget == 64 and cfg.alpha_scale == {"caption": 2.0}
    with pytest.raises(TypeError, match="eos_id"):
        TextSpecialIds.coerce(object())
    assert TextSpecialIds.coerce({"eos_id": 2, "sentinel_ids": [4, 5]}).sentinel_ids == (4, 5)


def test_collate_all_empty_has_one_padding_slot():
    empty = torch.zeros(0, dtype=torch.long)
    batch = collate([MaskedSample(empty, empty, empty, empty, empty, empty)] * 3)
    assert batch.enc_ids.shape == (3, 1) and batch.dec_ids.shape == (3, 1)
    assert not batch.enc_mask.any() and not batch.dec_mask.any()


def test_masked_batches_run_through_the_model():
    """Integration: masked samples (incl. condition-dropped ones with no inputs) give a finite loss."""
    from onemodel.model import OneModel, OneModelConfig

    torch.manual_seed(0)
    model = OneModel(OneModelConfig(modalities=MODS, dim=32, encoder_depth=1, decoder_depth=1, num_heads=2))
    for dropout in (0.5, 1.0):
        cfg = MaskingConfig(input_budget=32, target_budget=32, condition_dropout=dropout)
        batch = collate([mask_sample(_sample(s), MODS, cfg, masking_rng(0, s), TEXT) for s in range(4)])
        out = model(batch)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


def test_task_mixture_masks_for_explicit_tasks():
    tasks = [
        {"inputs": ["rgb", "question"], "targets": ["answer"]},
        {"inputs": ["rgb"], "targets": ["depth"], "weight": 2.0},
    ]
    cfg = from_dict(MaskingConfig, {"tasks": tasks, "task_prob": 1.0})
    sample = _sample(0)
    seen = set()
    for seed in range(40):
        ms = mask_sample(sample, MODS, cfg, seed, TEXT)
        enc, dec = _per_mod(ms, "enc"), _per_mod(ms, "dec")
        if IDX["answer"] in dec:  # VQA task: whole rgb + whole question in, whole answer out
            seen.add("vqa")
            assert set(dec) == {IDX["answer"]} and set(enc) == {IDX["rgb"], IDX["question"]}
            assert np.array_equal(dec[IDX["answer"]][0], sample["answer"])
            assert np.array_equal(enc[IDX["rgb"]][1], np.arange(256))
        else:  # depth task: MaskGIT-style, depth positions split between encoder and decoder
            seen.add("depth")
            assert set(dec) == {IDX["depth"]}
            tgt_pos = dec[IDX["depth"]][1]
            in_pos = enc.get(IDX["depth"], (np.zeros(0), np.zeros(0, dtype=int)))[1]
            assert len(tgt_pos) >= 1 and len(np.intersect1d(tgt_pos, in_pos)) == 0
            assert np.array_equal(np.sort(np.concatenate([tgt_pos, in_pos])), np.arange(256))
            assert np.array_equal(dec[IDX["depth"]][0], sample["depth"][tgt_pos])
    assert seen == {"vqa", "depth"}
    # a sample that lacks a task's modalities falls back to random masking (here: no question/answer/depth)
    ms = mask_sample(_sample(1, names=("rgb", "caption")), MODS, cfg, 3, TEXT)
    assert ms.num_inputs + ms.num_targets > 0
    # condition dropout removes every input, also the partial grid
    cfg_drop = from_dict(MaskingConfig, {"tasks": tasks[1:], "task_prob": 1.0, "condition_dropout": 1.0})
    assert mask_sample(sample, MODS, cfg_drop, 0, TEXT).num_inputs == 0


def test_task_config_errors():
    with pytest.raises(ConfigError, match="both input and target"):
        from_dict(MaskingConfig, {"tasks": [{"inputs": ["rgb"], "targets": ["rgb"]}], "task_prob": 0.5})
    with pytest.raises(ConfigError, match="non-empty masking.tasks"):
        from_dict(MaskingConfig, {"task_prob": 0.5})
    cfg = from_dict(MaskingConfig, {"tasks": [{"inputs": ["rgb"], "targets": ["normals"]}], "task_prob": 0.5})
    with pytest.raises(ValueError, match="tasks\\[0\\].*normals"):
        mask_sample(_sample(0), MODS, cfg, 0, TEXT)
