"""CPU cost of a training step with rgb read as pixel patches ("pixels") vs through a contrastive encoder's frozen
vision tower ("pixels_clip"), the demo model's size, interleaved in one process so both see the same machine load.

    python scripts/bench_clip_features.py --tokenizers runs/demo/tokenizers --encoder runs/clip_shapes/model

A batch of ``--batch`` samples, each rgb (whole grid, as pixels) + question in, depth + answer out; bf16 autocast,
AdamW; reports CPU seconds (``time.process_time``) per step, median over ``--steps`` steps after 2 warm-up steps.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokenizers", required=True)
    parser.add_argument("--encoder", required=True, help="an ImageTextEncoder directory (onemodel train-clip OUT/model)")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    from onemodel.batch import collate
    from onemodel.contrastive import ImageTextEncoder
    from onemodel.input_embeddings import feature_encoder_spec
    from onemodel.masking import build_sample
    from onemodel.modalities import Modality
    from onemodel.model import OneModel, OneModelConfig
    from onemodel.pixel_inputs import patch_dim
    from tokenizers_mm.bundle import TokenizerBundle
    from training.train import param_groups

    bundle = TokenizerBundle.from_pretrained(args.tokenizers)
    mods = tuple(Modality(**s) for s in bundle.modalities())
    by_name = {m.name: m for m in mods}
    grid, size = by_name["rgb"].grid_size, int(bundle["rgb"].image_size)
    encoder = ImageTextEncoder.from_pretrained(args.encoder)
    common = dict(modalities=mods, dim=192, encoder_depth=3, decoder_depth=3, num_heads=3,
                  value_dims={"rgb": patch_dim(size, grid)})
    models = {
        "pixels": OneModel(OneModelConfig(**common, input_embeddings={"rgb": "pixels"})),
        "pixels_clip": OneModel(OneModelConfig(**common, input_embeddings={"rgb": "pixels_clip"},
                                               feature_encoders={"rgb": feature_encoder_spec(encoder)})),
    }
    models["pixels_clip"].input_patches["rgb"].load_encoder(encoder)
    g = torch.Generator().manual_seed(0)
    samples = []
    for _ in range(args.batch):
        n = grid * grid
        rand = lambda name, k: torch.randint(0, by_name[name].vocab_size, (k,), generator=g)  # noqa: E731
        s = build_sample({"rgb": rand("rgb", n), "question": rand("question", 12)},
                         {"depth": (rand("depth", n), torch.arange(n)), "answer": (rand("answer", 4), torch.arange(4))},
                         mods)
        s.values = {"rgb": torch.rand(n, patch_dim(size, grid), generator=g) * 2 - 1}
        samples.append(s)
    batch = collate(samples)
    opts = {k: torch.optim.AdamW(param_groups(m, 0.05), lr=1e-4) for k, m in models.items()}
    times: dict[str, list[float]] = {k: [] for k in models}
    for step in range(args.steps + 2):
        for name, model in models.items():  # interleaved
            model.train()
            t = time.process_time()
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = model(batch).loss
            opts[name].zero_grad()
            loss.backward()
            opts[name].step()
            if step >= 2:
                times[name].append(time.process_time() - t)
    base = statistics.median(times["pixels"])
    for name, ts in times.items():
        m = statistics.median(ts)
        print(f"{name:12s} {m:.3f} CPU s/step (x{m / base:.3f})  trainable {sum(p.numel() for p in models[name].parameters() if p.requires_grad) / 1e6:.2f}M")


if __name__ == "__main__":
    main()
