"""Generation: schedules, sampling, KV cache, batching, guidance, chaining, bad input (tiny random models)."""

from __future__ import annotations

import pytest
import torch

from onemodel.generation import (
    AutoregressiveSchedule,
    MaskGITSchedule,
    RandomOrderSchedule,
    SamplingOptions,
    encoder_batch,
    generate,
)
from onemodel.modalities import default_modalities
from onemodel.model import OneModel, OneModelConfig
from onemodel.sampling import filter_logits, make_generators, sample_tokens, step_counts

EOS = 2


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def model() -> OneModel:
    mods = default_modalities(
        image_vocab=32, grid_size=4, text_vocab=40, caption_length=12, question_length=8, answer_length=6, det_length=10
    )
    torch.manual_seed(0)
    # a larger init std than training's so that a random model's outputs depend on its inputs
    m = OneModel(OneModelConfig(modalities=mods, dim=32, encoder_depth=2, decoder_depth=2, num_heads=2, init_std=0.3, init="trunc_normal"))
    return m.eval()


def _inputs(b: int = 3, seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    rgb = [torch.randint(0, 32, (16,), generator=g) for _ in range(b)]
    caps = [torch.cat([torch.randint(3, 40, (n,), generator=g), torch.tensor([EOS])]) for n in (5, 1, 9, 3)][:b]
    caps[1] = None  # a sample without a caption
    rgb[2] = None if b > 2 else rgb[2]  # a sample without an image
    return {"rgb": rgb, "caption": caps}


# ------------------------------------------------------------------------------------------- schedules


@pytest.mark.parametrize("n,steps", [(16, 1), (16, 4), (16, 16), (256, 8), (256, 12), (7, 3)])
@pytest.mark.parametrize("cosine", [True, False])
def test_step_counts_cover_all_tokens(n, steps, cosine):
    counts = step_counts(n, steps, cosine)
    assert len(counts) == steps and sum(counts) == n and min(counts) >= 1
    if steps == n:
        assert counts == [1] * n


def test_cosine_schedule_decodes_few_tokens_first():
    counts = step_counts(256, 8, cosine=True)
    assert counts[0] < counts[-1]
    assert counts == sorted(counts)


def test_step_counts_bad_steps():
    with pytest.raises(ValueError, match="at most 16"):
        step_counts(16, 17, True)
    with pytest.raises(ValueError, match=">= 1"):
        MaskGITSchedule(steps=0)
    with pytest.raises(ValueError, match=">= 1"):
        RandomOrderSchedule(steps=0)
    with pytest.raises(TypeError):
        MaskGITSchedule(steps=2.5)


# -------------------------------------------------------------------------------------------- sampling


def test_filter_logits_top_k_and_top_p():
    logits = torch.log(torch.tensor([[0.5, 0.2, 0.15, 0.1, 0.05]]))
    k2 = filter_logits(logits, top_k=2)
    assert torch.isfinite(k2[0, :2]).all() and torch.isinf(k2[0, 2:]).all()
    p = filter_logits(logits, top_p=0.6)  # 0.5 < 0.6 -> keep the second token too, then stop
    assert torch.isfinite(p[0, :2]).all() and torch.isinf(p[0, 2:]).all()
    p_small = filter_logits(logits, top_p=0.1)  # the most likely token always survives
    assert torch.isfinite(p_small[0, 0]) and torch.isinf(p_small[0, 1:]).all()
    assert torch.equal(filter_logits(logits, top_k=0, top_p=1.0), logits)


def test_sample_tokens_greedy_seeded_and_filtered():
    logits = torch.randn(2, 50, 10, generator=torch.Generator().manual_seed(1))
    greedy, probs = sample_tokens(logits, SamplingOptions(temperature=0), make_generators(0, 2))
    assert torch.equal(greedy, logits.argmax(-1))
    assert torch.allclose(probs, logits.softmax(-1).max(-1).values)
    opts = SamplingOptions(temperature=1.0)
    a, _ = sample_tokens(logits, opts, make_generators(5, 2))
    b, _ = sample_tokens(logits, opts, make_generators(5, 2))
    c, _ = sample_tokens(logits, opts, make_generators(6, 2))
    assert torch.equal(a, b) and not torch.equal(a, c)
    k1, _ = sample_tokens(logits, SamplingOptions(temperature=2.0, top_k=1), make_generators(0, 2))
    assert torch.equal(k1, greedy)
    top3 = logits.topk(3, -1).indices
    k3, _ = sample_tokens(logits, SamplingOptions(temperature=5.0, top_k=3), make_generators(0, 2))
    assert (k3.unsqueeze(-1) == top3).any(-1).all()


def test_sampling_follows_the_distribution():
    probs = torch.tensor([0.7, 0.2, 0.1])
    logits = probs.log().expand(1, 4000, 3)
    tokens, _ = sample_tokens(logits, SamplingOptions(temperature=1.0), make_generators(0, 1))
    freq = torch.bincount(tokens.flatten(), minlength=3).float() / 4000
    assert torch.allclose(freq, probs, atol=0.03)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"temperature": -0.1}, "temperature"),
        ({"guidance_scale": -1.0}, "guidance_scale"),
        ({"temperature": float("nan")}, "finite"),
    ],
)
def test_sampling_options_reject_bad_values(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SamplingOptions(**kwargs)


def test_sampling_options_type_errors():
    with pytest.raises(TypeError, match="top_k"):
        SamplingOptions(top_k=1.5)
    with pytest.raises(TypeError, match="schedule"):
        SamplingOptions(schedule="maskgit")


# ---------------------------------------------------------------------------------------- autoregressive


@pytest.mark.parametrize("guidance", [1.0, 2.5])
def test_kv_cache_matches_uncached(model, guidance):
    inputs = _inputs()
    runs = {}
    for cache in (True, False):
        opts = SamplingOptions(guidance_scale=guidance, schedule=AutoregressiveSchedule(use_cache=cache))
        runs[cache] = generate(model, inputs, ["caption" if False else "answer"], opts, output_logits=True)
    for a, b in zip(runs[True].tokens["answer"], runs[False].tokens["answer"]):
        assert torch.equal(a, b)
    assert runs[True].logits["answer"].shape == runs[False].logits["answer"].shape == (3, 6, 40)
    torch.testing.assert_close(runs[True].logits["answer"], runs[False].logits["answer"], atol=1e-5, rtol=1e-5)


def test_kv_cache_sampled_matches_uncached(model):
    inputs = _inputs()
    out = [
        generate(model, inputs, ["det"], SamplingOptions(temperature=1.0, top_p=0.9, schedule=AutoregressiveSchedule(use_cache=c)), seed=3)
        for c in (True, False)
    ]
    for a, b in zip(out[0].tokens["det"], out[1].tokens["det"]):
        assert torch.equal(a, b)


def test_eos_stops_each_sample(model):
    # ban every token except eos and one other id: samples end at their first eos, nothing after it
    banned = [i for i in range(40) if i not in (EOS, 7)]
    out = generate(model, _inputs(), ["caption" if False else "det"], SamplingOptions(temperature=1.0), eos_id=EOS,
                   suppress_ids={"det": banned}, seed=[0, 1, 2])
    for ids in out.tokens["det"]:
        assert set(ids.tolist()) <= {EOS, 7}
        if EOS in ids.tolist():
            assert ids.tolist().index(EOS) == len(ids) - 1
        else:
            assert len(ids) == 10
    # without eos_id every sample runs to max_length
    full = generate(model, _inputs(), ["det"], eos_id=None)
    assert all(len(ids) == 10 for ids in full.tokens["det"])


def test_max_length_caps_generation(model):
    out = generate(model, _inputs(), ["det"], SamplingOptions(schedule=AutoregressiveSchedule(max_length=3)))
    assert all(len(ids) <= 3 for ids in out.tokens["det"])


# ---------------------------------------------------------------------------------------------- batching


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_batch_equals_single_calls(model, temperature):
    inputs = _inputs()
    opts = {
        "depth": SamplingOptions(temperature=temperature, schedule=MaskGITSchedule(steps=4, choice_temperature=2.0)),
        "answer": SamplingOptions(temperature=temperature, top_k=10),
        "semseg": SamplingOptions(temperature=temperature, schedule=RandomOrderSchedule(steps=3), guidance_scale=2.0),
    }
    seeds = [11, 12, 13]
    batch = generate(model, inputs, ["depth", "answer", "semseg"], opts, seed=seeds, eos_id=EOS)
    for b in range(3):
        single = generate(
            model, {k: [v[b]] for k, v in inputs.items()}, ["depth", "answer", "semseg"], opts, seed=[seeds[b]], eos_id=EOS
        )
        for name in ("depth", "answer", "semseg"):
            assert torch.equal(single.tokens[name][0], batch.tokens[name][b]), (name, b)
            torch.testing.assert_close(single.probs[name][0], batch.probs[name][b], atol=1e-5, rtol=1e-5)


def test_encoder_batch_pads_mixed_inputs(model):
    inputs = _inputs()
    enc_ids, enc_mod, enc_pos, enc_mask = encoder_batch(model, inputs, None, 3, torch.device("cpu"))
    assert enc_mask.sum(1).tolist() == [16 + 6, 16, 10]
    assert enc_ids.shape == (3, 22)
    # unconditional batch: one padding slot
    ids, _, _, mask = encoder_batch(model, {}, None, 2, torch.device("cpu"))
    assert ids.shape == (2, 1) and not mask.any()


def test_inputs_change_the_output(model):
    a = generate(model, _inputs(seed=0), ["depth"])
    b = generate(model, _inputs(seed=1), ["depth"])
    assert any(not torch.equal(x, y) for x, y in zip(a.tokens["depth"], b.tokens["depth"]))


# ----------------------------------------------------------------------------------------------- maskgit


def test_maskgit_greedy_is_deterministic(model):
    opts = SamplingOptions(schedule=MaskGITSchedule(steps=5))
    a = generate(model, _inputs(), ["rgb" if False else "depth"], opts, seed=0)
    b = generate(model, _inputs(), ["depth"], opts, seed=123)
    for x, y in zip(a.tokens["depth"], b.tokens["depth"]):
        assert torch.equal(x, y) and x.shape == (16,)


def test_maskgit_steps_equal_tokens_is_one_token_at_a_time(model):
    """steps == N: each step fixes exactly the single most confident masked position (reference loop here)."""
    inputs = {"rgb": _inputs()["rgb"][:1], "caption": _inputs()["caption"][:1]}
    out = generate(model, inputs, ["depth"], SamplingOptions(schedule=MaskGITSchedule(steps=16)))
    m_idx = model.config.modality_index("depth")
    ids = torch.zeros(1, 16, dtype=torch.long)
    known = torch.zeros(1, 16, dtype=torch.bool)
    with torch.no_grad():
        for _ in range(16):
            enc = model.encode(*encoder_batch(model, inputs, {"depth": (ids, known)}, 1, torch.device("cpu")))
            todo = (~known[0]).nonzero().squeeze(1)[None]  # (1, Nq)
            hidden = model.decode(enc, torch.zeros_like(todo), torch.full_like(todo, m_idx), todo, torch.ones_like(todo, dtype=torch.bool))
            probs = model.logits_for(hidden, "depth").softmax(-1)  # (1, Nq, V)
            conf, tok = probs.max(-1)
            j = conf[0].argmax()
            ids[0, todo[0, j]] = tok[0, j]
            known[0, todo[0, j]] = True
    assert torch.equal(out.tokens["depth"][0], ids[0])


def test_random_order_one_step_equals_maskgit_one_step(model):
    a = generate(model, _inputs(), ["semseg"], SamplingOptions(schedule=MaskGITSchedule(steps=1)))
    b = generate(model, _inputs(), ["semseg"], SamplingOptions(schedule=RandomOrderSchedule(steps=1)), seed=9)
    for x, y in zip(a.tokens["semseg"], b.tokens["semseg"]):
        assert torch.equal(x, y)


def test_random_order_full_steps_depends_on_seed_only_through_order(model):
    opts = SamplingOptions(schedule=RandomOrderSchedule(steps=16))
    a = generate(model, _inputs(), ["depth"], opts, seed=1)
    b = generate(model, _inputs(), ["depth"], opts, seed=1)
    assert all(torch.equal(x, y) for x, y in zip(a.tokens["depth"], b.tokens["depth"]))


def test_steps_more_than_tokens_is_an_error(model):
    with pytest.raises(ValueError, match="1..16"):
        generate(model, _inputs(), ["depth"], SamplingOptions(schedule=MaskGITSchedule(steps=17)))


# ---------------------------------------------------------------------------------------------- guidance


def test_guidance_scale_one_equals_no_guidance(model):
    base = generate(model, _inputs(), ["depth", "answer"], SamplingOptions(), output_logits=True)
    one = generate(model, _inputs(), ["depth", "answer"], SamplingOptions(guidance_scale=1.0), output_logits=True)
    two = generate(model, _inputs(), ["depth", "answer"], SamplingOptions(guidance_scale=3.0), output_logits=True)
    for name in ("depth", "answer"):
        assert torch.equal(base.logits[name], one.logits[name])
        assert not torch.allclose(base.logits[name], two.logits[name])


def test_guidance_scale_zero_is_unconditional(model):
    """scale 0 -> the logits of the input-dropped batch: equal to generating from no inputs at all."""
    for name in ("depth", "answer"):
        zero = generate(model, _inputs(), [name], SamplingOptions(guidance_scale=0.0), output_logits=True)
        uncond = generate(model, {}, [name], batch_size=3, output_logits=True)
        assert all(torch.equal(x, y) for x, y in zip(zero.tokens[name], uncond.tokens[name]))
        torch.testing.assert_close(zero.logits[name], uncond.logits[name], atol=1e-5, rtol=1e-5)


def test_guidance_mixes_cond_and_uncond_logits(model):
    """First autoregressive step (same prefix for every scale): logits_s = uncond + s * (cond - uncond)."""
    logits = {
        s: generate(model, _inputs(), ["answer"], SamplingOptions(guidance_scale=s), output_logits=True).logits["answer"][:, 0]
        for s in (0.0, 1.0, 2.5)
    }
    torch.testing.assert_close(logits[2.5], logits[0.0] + 2.5 * (logits[1.0] - logits[0.0]), atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------- chaining


def test_chaining_feeds_outputs_as_inputs(model):
    inputs = _inputs()
    chained = generate(model, inputs, ["answer", "depth"], eos_id=EOS)
    direct = generate(model, {**inputs, "answer": chained.tokens["answer"]}, ["depth"])
    for x, y in zip(chained.tokens["depth"], direct.tokens["depth"]):
        assert torch.equal(x, y)
    without = generate(model, inputs, ["depth"])
    assert any(not torch.equal(x, y) for x, y in zip(chained.tokens["depth"], without.tokens["depth"]))


# --------------------------------------------------------------------------------------------- bad input


def test_target_given_as_input_is_an_error(model):
    with pytest.raises(ValueError, match="also inputs"):
        generate(model, _inputs(), ["caption"])


@pytest.mark.parametrize(
    "inputs,targets,kwargs,err,match",
    [
        ({"rgb": torch.zeros(1, 16, dtype=torch.long)}, ["normals"], {}, ValueError, "unknown modality"),
        ({"sketch": torch.zeros(1, 16, dtype=torch.long)}, ["depth"], {}, ValueError, "unknown modality"),
        ({"rgb": torch.zeros(1, 16, dtype=torch.long)}, ["depth", "depth"], {}, ValueError, "twice"),
        ({"rgb": torch.zeros(1, 16, dtype=torch.long)}, [], {}, ValueError, "at least one"),
        ({"rgb": torch.zeros(1, 15, dtype=torch.long)}, ["depth"], {}, ValueError, "16 tokens"),
        ({"rgb": torch.full((1, 16), 99)}, ["depth"], {}, ValueError, r"\[0, 32\)"),
        ({"caption": [torch.arange(13)]}, ["depth"], {}, ValueError, "1..12"),
        ({"rgb": torch.zeros(2, 16, dtype=torch.long), "caption": [torch.tensor([2])]}, ["depth"], {}, ValueError, "batch sizes"),
        ({}, ["depth"], {}, ValueError, "batch_size"),
        ({"rgb": torch.zeros(1, 16)}, ["depth"], {}, TypeError, "integers"),
        ({"rgb": torch.zeros(1, 16, dtype=torch.long)}, ["depth"],
         {"options": SamplingOptions(schedule=AutoregressiveSchedule())}, ValueError, "grid"),
        ({"rgb": torch.zeros(1, 16, dtype=torch.long)}, ["caption"],
         {"options": SamplingOptions(schedule=MaskGITSchedule())}, ValueError, "sequence"),
        ({"rgb": torch.zeros(1, 16, dtype=torch.long)}, ["depth"], {"options": {"rgb": SamplingOptions()}}, ValueError, "not targets"),
        ({"rgb": torch.zeros(1, 16, dtype=torch.long)}, ["depth"], {"seed": [1, 2]}, ValueError, "seeds"),
    ],
)
def test_bad_generate_calls(model, inputs, targets, kwargs, err, match):
    with pytest.raises(err, match=match):
        generate(model, inputs, targets, **kwargs)


def test_generate_restores_training_mode(model):
    model.train()
    try:
        generate(model, _inputs(), ["answer"])
        assert model.training
    finally:
        model.eval()
