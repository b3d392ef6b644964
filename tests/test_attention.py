"""The attention backends agree, handle masks and causality, and never produce NaN on empty rows."""

from __future__ import annotations

import pytest
import torch

from onemodel.attention import AttentionMask, attention, available_backends, xformers_available


def _qkv(B=2, H=2, Nq=5, Nk=7, Dh=8, seed=0, requires_grad=True):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, n, Dh, generator=g) for n in (Nq, Nk, Nk))
    return [t.requires_grad_(requires_grad) for t in (q, k, v)]


def _out_and_grads(backend, q, k, v, **kw):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = attention(q, k, v, backend=backend, **kw)
    (out * torch.linspace(-1, 1, out.numel()).view_as(out)).sum().backward()
    return out, q.grad, k.grad, v.grad


def _assert_backends_agree(q, k, v, **kw):
    ref = _out_and_grads("eager", q, k, v, **kw)
    got = _out_and_grads("sdpa", q, k, v, **kw)
    for a, b in zip(ref, got):
        assert torch.isfinite(b).all()
        torch.testing.assert_close(b, a, atol=1e-5, rtol=1e-5)
    return ref[0]


def test_unmasked_matches_reference_math():
    q, k, v = _qkv()
    out = _assert_backends_agree(q, k, v)
    probs = torch.softmax(q @ k.transpose(-2, -1) / 8**0.5, dim=-1)
    torch.testing.assert_close(out, probs @ v, atol=1e-5, rtol=1e-5)


def test_key_padding_mask_agrees_and_hides_keys():
    q, k, v = _qkv()
    keep = torch.tensor([[1, 1, 1, 0, 0, 0, 0], [1, 1, 1, 1, 1, 1, 0]], dtype=torch.bool)
    out = _assert_backends_agree(q, k, v, mask=keep[:, None, None, :])
    # changing hidden keys/values changes nothing
    k2, v2 = k.detach().clone(), v.detach().clone()
    k2[0, :, 3:] += 5.0
    v2[0, :, 3:] -= 5.0
    out2 = attention(q.detach(), k2, v2, mask=keep[:, None, None, :])
    torch.testing.assert_close(out2[0], out[0].detach(), atol=1e-6, rtol=0)


def test_causal_flag_and_causal_mask_agree():
    q, k, v = _qkv(Nq=6, Nk=6)
    out_flag = _assert_backends_agree(q, k, v, is_causal=True)
    tril = torch.ones(6, 6, dtype=torch.bool).tril()
    out_mask = _assert_backends_agree(q, k, v, mask=tril)
    torch.testing.assert_close(out_flag, out_mask, atol=1e-6, rtol=0)
    # first query only sees the first key: output equals v[..., 0, :]
    torch.testing.assert_close(out_flag[:, :, 0], v[:, :, 0].detach(), atol=1e-6, rtol=0)


def test_causal_combined_with_padding_mask():
    q, k, v = _qkv(Nq=6, Nk=6)
    keep = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None, :]
    both = _assert_backends_agree(q, k, v, mask=keep, is_causal=True)
    explicit = keep & torch.ones(6, 6, dtype=torch.bool).tril()
    torch.testing.assert_close(both, attention(q.detach(), k.detach(), v.detach(), mask=explicit), atol=1e-6, rtol=0)


def test_fully_masked_rows_give_no_nan_outputs_or_gradients():
    q, k, v = _qkv(Nq=4, Nk=4)
    mask = torch.zeros(2, 1, 4, 4, dtype=torch.bool)
    mask[0, :, :2, :2] = True  # sample 0: queries 2,3 see nothing; sample 1: nothing at all
    for backend in ("sdpa", "eager"):
        out, gq, gk, gv = _out_and_grads(backend, q, k, v, mask=mask)
        for t in (out, gq, gk, gv):
            assert torch.isfinite(t).all(), backend
        assert (out[0, :, 2:] == 0).all() and (out[1] == 0).all()  # attention over nothing is zero
        assert (gq[1] == 0).all() and (gk[1] == 0).all() and (gv[1] == 0).all()
    # rows that had keys are unaffected by the fix-up
    _assert_backends_agree(q, k, v, mask=mask)


def test_dense_block_mask_agrees():
    q, k, v = _qkv(Nq=6, Nk=6)
    mod = torch.tensor([[0, 0, 0, 1, 1, 1], [1, 1, 0, 0, 0, 0]])
    mask = (mod[:, :, None] == mod[:, None, :])[:, None]
    _assert_backends_agree(q, k, v, mask=mask)


@pytest.mark.parametrize("causal", [False, True])
def test_prepared_mask_gives_the_same_result_as_the_raw_mask(causal):
    q, k, v = _qkv(Nq=6, Nk=6)
    mask = torch.ones(2, 1, 6, 6, dtype=torch.bool)
    mask[0, :, :, 4:] = False  # padding keys in sample 0
    mask[1, :, 2] = False  # query 2 of sample 1 sees nothing: zeroed
    prepared = AttentionMask(mask, is_causal=causal)
    for backend in ("sdpa", "eager"):
        raw = _out_and_grads(backend, q, k, v, mask=mask, is_causal=causal)
        got = _out_and_grads(backend, q, k, v, mask=prepared)
        for a, b in zip(raw, got):
            torch.testing.assert_close(b, a, atol=1e-6, rtol=0)
        assert (got[0][1, :, 2] == 0).all()
    # is_causal with no tensor mask stays a flag; the bias is built once per dtype and reused
    flag = AttentionMask(None, is_causal=True)
    torch.testing.assert_close(attention(q, k, v, mask=flag), attention(q, k, v, is_causal=True))
    assert prepared.bias(torch.bfloat16) is prepared.bias(torch.bfloat16)
    assert prepared.bias(torch.float32)[0, 0, 0, 5] == float("-inf") and prepared.bias(torch.float32)[0, 0, 0, 0] == 0
    with pytest.raises(ValueError, match="AttentionMask"):
        attention(q, k, v, mask=prepared, is_causal=True)
    with pytest.raises(TypeError, match="bool"):
        AttentionMask(torch.ones(2, 1, 6, 6))


@pytest.mark.parametrize("kw", [{}, {"is_causal": True}, {"mask": "pad"}])
def test_sdpa_bf16_on_cpu_uses_the_math_path_and_agrees_with_eager(kw, monkeypatch):
    """bf16 on CPU: ``sdpa`` does not call PyTorch's (slow) CPU flash kernel and still computes attention."""
    q, k, v = (t.detach().bfloat16() for t in _qkv(Nq=6, Nk=6))
    if kw.get("mask") == "pad":
        kw = {"mask": torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]], dtype=torch.bool)[:, None, None, :]}
    ref = _out_and_grads("eager", q.float(), k.float(), v.float(), **kw)
    calls = []
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", lambda *a, **k: calls.append(1))
    got = _out_and_grads("sdpa", q, k, v, **kw)
    assert not calls
    for a, b in zip(ref, got):
        assert b.dtype == torch.bfloat16
        torch.testing.assert_close(b.float(), a, atol=3e-2, rtol=3e-2)


def test_bad_arguments_raise_clear_errors():
    q, k, v = _qkv(requires_grad=False)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attention(q, k, v, backend="flash9")
    with pytest.raises(TypeError, match="bool"):
        attention(q, k, v, mask=torch.ones(2, 1, 5, 7))
    with pytest.raises(ValueError, match="is_causal"):
        attention(q, k, v, is_causal=True)  # 5 queries, 7 keys
    with pytest.raises(ValueError, match=r"\(B, H, N, Dh\)"):
        attention(q[0], k[0], v[0])


@pytest.mark.skipif(torch.cuda.is_available() and xformers_available(), reason="xformers usable here")
def test_xformers_refused_with_a_clear_message_where_unusable():
    q, k, v = _qkv(requires_grad=False)
    with pytest.raises(ValueError, match="xformers"):
        attention(q, k, v, backend="xformers")
    assert "xformers" not in available_backends("cpu")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="xformers backend needs a CUDA device (none here)")
@pytest.mark.skipif(not xformers_available(), reason="xformers is not installed (pip install 'onemodel[xformers]')")
def test_xformers_matches_sdpa_on_cuda():
    q, k, v = (t.detach().cuda() for t in _qkv(B=2, H=2, Nq=9, Nk=9, Dh=16))
    keep = torch.ones(2, 9, dtype=torch.bool, device="cuda")
    keep[0, 6:] = False
    for kw in ({}, {"is_causal": True}, {"mask": keep[:, None, None, :]}, {"mask": keep[:, None, None, :], "is_causal": True}):
        ref = _out_and_grads("sdpa", q, k, v, **kw)
        got = _out_and_grads("xformers", q, k, v, **kw)
        for a, b in zip(ref, got):
            torch.testing.assert_close(b, a, atol=1e-4, rtol=1e-4)
