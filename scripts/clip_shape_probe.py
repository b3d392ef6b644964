"""Why zero-shot *shape* lags on shapes: does the vision tower hold shape at all, and how fast can it learn it?

    python scripts/clip_shape_probe.py probe --model runs/clip_shapes/model --data data/shapes
    python scripts/clip_shape_probe.py supervised --data data/shapes [--steps 400 --lr 1e-3 --patch-size 8 --width 96]

``probe``: a linear classifier (L-BFGS logistic regression on standardised features) of the shape of the
single-object scenes, trained on the ``val`` split and scored on ``test``, from three frozen features of a
trained encoder: the image embedding, the mean patch feature and the pooled class token. Low accuracy means the
image tower did not learn shape (the text side is not to blame).

``supervised``: the vision tower alone (a fresh ``CLIPVisionModel`` of the given size) trained with a linear head
to classify the shape of single-object scenes (batch 64, AdamW), test accuracy every 100 steps: the upper bound
of how fast this architecture can pick shape up with direct labels.
1 thread; the numbers in docs/contrastive.md come from these commands.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


def _singles(samples, shapes):
    import torch

    idx = [i for i, sc in enumerate(samples.scenes) if sc is not None and len(sc["shapes"]) == 1]
    y = torch.tensor([shapes.index(samples.scenes[i]["shapes"][0]["shape"]) for i in idx])
    return idx, y


def probe(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F

    from onemodel.contrastive import ImageTextEncoder
    from training.data.shapes import SHAPES
    from training.train_clip import load_clip_samples

    enc = ImageTextEncoder.from_pretrained(args.model)
    size = enc.config.image_size
    train = load_clip_samples(args.data, "val", size, "caption", 1000)
    test = load_clip_samples(args.data, "test", size, "caption", 1000)

    def features(samples):
        idx, y = _singles(samples, SHAPES)
        rgb = [samples.rgb[i] for i in idx]
        with torch.no_grad():
            pixels = enc.preprocess(rgb)
            return {"image embedding": enc.encode_image(rgb), "mean patch feature": enc.patch_features(pixels).mean(1),
                    "class token": enc.hf.vision_model(pixel_values=pixels).pooler_output}, y

    ftr, ytr = features(train)
    fte, yte = features(test)
    print(f"{args.model}: shape of {len(ytr)} val single-object scenes -> {len(yte)} test ones")
    for name in ftr:
        a, b = ftr[name], fte[name]
        mu, sd = a.mean(0), a.std(0) + 1e-6
        a, b = (a - mu) / sd, (b - mu) / sd
        w = torch.zeros(a.shape[1], len(SHAPES), requires_grad=True)
        c = torch.zeros(len(SHAPES), requires_grad=True)
        opt = torch.optim.LBFGS([w, c], max_iter=500)

        def closure():
            opt.zero_grad()
            loss = F.cross_entropy(a @ w + c, ytr) + 1e-3 * w.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        acc = float(((b @ w + c).argmax(1) == yte).float().mean())
        print(f"  linear probe, {name:18s}: test shape accuracy {acc:.3f}")


def supervised(args: argparse.Namespace) -> None:
    import torch
    import torch.nn.functional as F
    from transformers import CLIPVisionConfig, CLIPVisionModel

    from training.data.shapes import SHAPES
    from training.train_clip import load_clip_samples

    train = load_clip_samples(args.data, "train", 64, "caption", args.train_samples)
    test = load_clip_samples(args.data, "test", 64, "caption", 1000)

    def tensors(samples):
        idx, y = _singles(samples, SHAPES)
        x = torch.from_numpy(samples.rgb[idx]).permute(0, 3, 1, 2).float() / 255 - 0.45
        return x / 0.27, y

    xtr, ytr = tensors(train)
    xte, yte = tensors(test)
    cfg = dict(hidden_size=args.width, intermediate_size=4 * args.width, num_hidden_layers=args.layers,
               num_attention_heads=4, image_size=64, patch_size=args.patch_size)
    print(f"supervised shape classification: {len(ytr)} train / {len(yte)} test single-object scenes, {cfg}, "
          f"lr {args.lr}")
    torch.manual_seed(0)
    model = CLIPVisionModel(CLIPVisionConfig(**cfg))
    head = torch.nn.Linear(args.width, len(SHAPES))
    opt = torch.optim.AdamW(list(model.parameters()) + list(head.parameters()), lr=args.lr, weight_decay=0.1)
    gen = torch.Generator().manual_seed(0)
    cpu0 = time.process_time()
    for step in range(args.steps):
        idx = torch.randint(0, len(ytr), (64,), generator=gen)
        loss = F.cross_entropy(head(model(pixel_values=xtr[idx]).pooler_output), ytr[idx])
        loss.backward()
        opt.step()
        opt.zero_grad()
        if (step + 1) % 100 == 0:
            with torch.no_grad():
                acc = float((head(model(pixel_values=xte).pooler_output).argmax(1) == yte).float().mean())
            print(f"  step {step + 1}: train loss {loss.item():.3f}, test shape accuracy {acc:.3f}, "
                  f"{time.process_time() - cpu0:.0f} CPU s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="mode", required=True)
    p = sub.add_parser("probe", help="linear probe of shape from a trained encoder's frozen features")
    p.add_argument("--model", required=True, help="an ImageTextEncoder directory (RUN/model)")
    p.add_argument("--data", required=True, help="a shapes dataset with val/ and test/")
    s = sub.add_parser("supervised", help="how fast the vision tower learns shape with direct labels")
    s.add_argument("--data", required=True)
    s.add_argument("--steps", type=int, default=400)
    s.add_argument("--lr", type=float, default=1e-3)
    s.add_argument("--patch-size", type=int, default=8)
    s.add_argument("--width", type=int, default=96)
    s.add_argument("--layers", type=int, default=3)
    s.add_argument("--train-samples", type=int, default=8000, help="training scenes read (a quarter are single-object)")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    probe(args) if args.mode == "probe" else supervised(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
