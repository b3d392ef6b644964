"""OneModel's default init and the aligned context: what they are, and that they make position-aligned grid
tasks learnable in tens of steps (the former init plateaued; see OneModelConfig.aligned_context / init)."""

from __future__ import annotations

import math

import pytest
import torch

from onemodel.batch import MultimodalBatch
from onemodel.modalities import Modality
from onemodel.model import OneModel, OneModelConfig

pytestmark = pytest.mark.usefixtures("one_torch_thread")

MODS = (Modality("rgb", "grid", 16, "rgb", grid_size=8), Modality("semseg", "grid", 16, "semseg", grid_size=8),
        Modality("caption", "sequence", 16, "text", max_length=4))


def copy_batch(gen: torch.Generator, batch: int = 32, n_tgt: int = 16) -> MultimodalBatch:
    """rgb tokens in, semseg targets = the rgb token at the same position (a pure position-alignment task)."""
    rgb = torch.randint(0, 16, (batch, 64), generator=gen)
    tpos = torch.stack([torch.randperm(64, generator=gen)[:n_tgt] for _ in range(batch)])
    ones = torch.ones(batch, 64, dtype=torch.bool)
    return MultimodalBatch(enc_ids=rgb, enc_mod=torch.zeros(batch, 64, dtype=torch.long),
                           enc_pos=torch.arange(64).expand(batch, 64).clone(), enc_mask=ones,
                           dec_ids=torch.gather(rgb, 1, tpos), dec_mod=torch.ones(batch, n_tgt, dtype=torch.long),
                           dec_pos=tpos, dec_mask=torch.ones(batch, n_tgt, dtype=torch.bool))


def test_default_init():
    torch.manual_seed(0)
    model = OneModel(OneModelConfig(modalities=MODS, dim=32, encoder_depth=1, decoder_depth=1, num_heads=2))
    for name, p in model.named_parameters():
        if name.endswith((".proj.weight", ".fc2.weight")) or name.startswith("aligned_proj"):
            assert torch.count_nonzero(p) == 0, name  # residual branches and the aligned context start at zero
    qkv = model.encoder[0].attn.qkv.weight  # fused (3D, D): each D x D part is xavier-uniform
    assert qkv.abs().max() <= math.sqrt(6 / 64) and qkv.abs().max() > 0.8 * math.sqrt(6 / 64)
    assert 0.9 < model.tok_emb.weight.std() < 1.1 and model.mask_token.std() < 0.05
    with pytest.raises(ValueError, match="init must be"):
        OneModelConfig(modalities=MODS, init="kaiming")


def test_aligned_context_reads_the_same_position_only():
    """Default init = identity blocks; with the aligned projection switched on, decoder slot p of a grid target
    depends on the input token at p of a same-size grid and on nothing else; without it, on nothing."""
    torch.manual_seed(0)
    for aligned in (True, False):
        model = OneModel(OneModelConfig(modalities=MODS, dim=32, encoder_depth=1, decoder_depth=1, num_heads=2,
                                        aligned_context=aligned)).eval()
        if aligned:
            torch.nn.init.normal_(model.aligned_proj.weight, std=0.2)
        batch = copy_batch(torch.Generator().manual_seed(0), batch=1, n_tgt=4)
        p = int(batch.dec_pos[0, 0])
        others = [q for q in range(64) if q not in batch.dec_pos[0].tolist()]

        def hidden(ids):
            enc = model.encode(ids, batch.enc_mod, batch.enc_pos, batch.enc_mask)
            return model.decode(enc, torch.zeros_like(batch.dec_ids), batch.dec_mod, batch.dec_pos, batch.dec_mask)

        ref = hidden(batch.enc_ids)
        at_p, elsewhere = batch.enc_ids.clone(), batch.enc_ids.clone()
        at_p[0, p] = (at_p[0, p] + 1) % 16
        elsewhere[0, others[0]] = (elsewhere[0, others[0]] + 1) % 16
        torch.testing.assert_close(hidden(elsewhere), ref)
        moved = (hidden(at_p) - ref).abs().amax(-1)[0]  # per target slot
        assert (moved[0] > 1e-3) == aligned and bool((moved[1:] < 1e-6).all())


@pytest.mark.parametrize("init,aligned,learns", [("xavier", True, True), ("trunc_normal", False, False)])
def test_position_copy_is_learned_quickly(init, aligned, learns):
    """100 steps on the copy task: the default model learns it; the former init without the aligned context
    stays at the marginal loss (ln 16 = 2.77)."""
    torch.manual_seed(0)
    model = OneModel(OneModelConfig(modalities=MODS, dim=64, encoder_depth=1, decoder_depth=1, num_heads=1,
                                    init=init, aligned_context=aligned))
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    gen = torch.Generator().manual_seed(0)
    for _ in range(100):
        loss = model(copy_batch(gen)).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    final = model(copy_batch(gen)).loss.item()
    assert (final < 0.5) if learns else (final > 2.5), final
