"""The benchmark script runs end to end, and its 4M-style baseline does the same attention work as OneModel."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "scripts"))

import bench_model  # noqa: E402
from fourm_baseline import FourMBaseline, make_mod_dict  # noqa: E402

from onemodel.model import decoder_self_mask  # noqa: E402

TINY = ["--threads", "1", "--batch", "4", "--dim", "32", "--depth", "1", "--grid-size", "6", "--caption-length", "8",
        "--inputs", "10", "--targets", "10", "--grid-vocab", "40", "--text-vocab", "30"]


def _args(extra=()):
    p = bench_model.argparse.Namespace
    a = dict(device="cpu", threads=1, batch=4, dim=32, depth=1, heads=4, grid_size=6, grid_vocab=40, text_vocab=30,
             caption_length=8, inputs=10, targets=10, steps=1, warmup=1)
    return p(**a)


def test_bench_runs_and_writes_json(tmp_path):
    out = tmp_path / "bench.json"
    n = torch.get_num_threads()
    try:
        rc = bench_model.main([*TINY, "--steps", "1", "--warmup", "0", "--peak-size", "64", "--no-memory",
                               "--dtypes", "fp32", "--json", str(out)])
    finally:
        torch.set_num_threads(n)
    assert rc == 0
    rows = json.loads(out.read_text())["rows"]
    assert [(r["impl"], r["backend"]) for r in rows] == [
        ("fourm", "eager (4M-style)"), ("floor", "linear-layer products only"), ("onemodel", "sdpa, aligned_context=False"),
        ("onemodel", "sdpa"), ("onemodel", "eager")]
    for r in rows:
        assert r["ms_per_step"] > 0 and r["tokens_per_s"] > 0 and 0 < r["mfu"] and r["flops_per_token"] > 0
        if r["impl"] != "floor":  # the floor row times the linear layers' products alone: no loss
            assert abs(r["loss"] - 0.5 * (torch.log(torch.tensor(40.0)) + torch.log(torch.tensor(30.0)))) < 0.5
    assert rows[0]["max_speedup_same_products"] > 0  # 4M-style step / floor, per round


def test_spec_has_exact_token_budgets_and_both_sides_get_the_same_tokens():
    args = _args()
    spec = bench_model.make_spec(args)
    batch = bench_model.onemodel_batch(spec)
    assert batch.enc_mask.all() and batch.dec_mask.all()
    assert batch.enc_ids.shape == (4, 10) and batch.dec_ids.shape == (4, 10)
    mods = bench_model.modalities(args)
    md = make_mod_dict(spec, mods)
    for mi, m in enumerate(mods):
        assert int((~md[m.name]["input_mask"]).sum()) == int((batch.enc_mod == mi).sum())
        assert int((~md[m.name]["target_mask"]).sum()) == int((batch.dec_mod == mi).sum())


def test_baseline_decoder_mask_equals_onemodel_rule():
    """The 4M-style cumsum/repeat mask (True = masked) is exactly the negation of OneModel's decoder rule."""
    args = _args()
    spec = bench_model.make_spec(args)
    batch = bench_model.onemodel_batch(spec)
    mods = bench_model.modalities(args)
    model = FourMBaseline(mods, dim=32, encoder_depth=1, decoder_depth=1, num_heads=4)
    dec = {m: model.decoder_embeddings[m].forward_embed(d) for m, d in make_mod_dict(spec, mods).items()}
    _, _, _, target_ids, masked, mod_mask = model.forward_mask_decoder(dec, args.targets)
    assert torch.equal(target_ids, batch.dec_ids) and torch.equal(mod_mask.long(), batch.dec_mod)
    ours = decoder_self_mask(batch.dec_mod, batch.dec_pos, batch.dec_mod, batch.dec_pos, batch.dec_mask,
                             torch.tensor([m.is_grid for m in mods]))[:, 0]
    assert torch.equal(~masked, ours)
