"""How fast does a vision front-end learn what every recognition task on the shapes scenes needs: each object's
shape bound to its colour and size? One supervised task, 48-way multi-label (which (size, colour, shape) objects
are in the scene), trained for a fixed CPU budget; prints held-out exact-set accuracy and F1 every 200 steps.

    python scripts/vision_stem_probe.py --arch vit8 --cpu 240     # ViT over linear 8x8 patch embeddings
    python scripts/vision_stem_probe.py --arch cnn --cpu 240      # ConvNet (convnet_stem) + attention pooling

Architectures (width 128, the 8x8 token grid of a 64-pixel image, attention pooling + linear head on top):
vit8 (linear 8x8 patches + 3 transformer layers), k16 (overlapping 16x16 patches, stride 8), vit4 (4x4 patches,
16x16 grid), stem3 (three stride-2 convs, onemodel's "pixels_conv"), hier2 (three 2x2 stride-2 convs),
stem5 (a conv stem + 3 transformer layers), cnn (onemodel.input_embeddings.convnet_stem, no transformer).
Measured numbers: docs/recipe.md ("Why the model does not see"). Scenes are generated in memory (seeded).
"""
import argparse
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from training.data.shapes import generate_sample, split_seed, SHAPES, COLORS, SIZES
p = argparse.ArgumentParser()
p.add_argument("--arch", default="vit8"); p.add_argument("--width", type=int, default=128)
p.add_argument("--layers", type=int, default=3); p.add_argument("--steps", type=int, default=1000)
p.add_argument("--lr", type=float, default=1e-3); p.add_argument("--bs", type=int, default=32)
p.add_argument("--ntrain", type=int, default=8000); p.add_argument("--cpu", type=float, default=1e9)
p.add_argument("--threads", type=int, default=1)
p.add_argument("--cache", default="", help="directory to cache the generated scenes in (npz)")
a = p.parse_args()
torch.set_num_threads(a.threads)
C = list(COLORS)
def triple(s): return (SIZES.index(s["size"]) * len(C) + C.index(s["color"])) * 3 + SHAPES.index(s["shape"])
def load(split, n):
    cache = Path(a.cache) / f"{split}_{n}.npz" if a.cache else None
    if cache is not None and cache.is_file():
        d = np.load(cache); return d["x"], d["y"]
    xs, ys = [], []
    for i in range(n):
        s = generate_sample(split_seed(split, i)); xs.append(s["rgb"]); y = np.zeros(48, np.float32)
        for sh in s["scene"]["shapes"]: y[triple(sh)] = 1
        ys.append(y)
    x, y = np.stack(xs), np.stack(ys)
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True); np.savez(cache, x=x, y=y)
    return x, y
xtr, ytr = load("train", a.ntrain); xte, yte = load("test", 1000)
def prep(x): return (torch.from_numpy(x).permute(0, 3, 1, 2).float() / 255 - 0.45) / 0.27
xtr, xte, ytr, yte = prep(xtr), prep(xte), torch.from_numpy(ytr), torch.from_numpy(yte)
D = a.width
class Block(nn.Module):
    def __init__(s):
        super().__init__(); s.n1 = nn.LayerNorm(D); s.att = nn.MultiheadAttention(D, 4, batch_first=True); s.n2 = nn.LayerNorm(D)
        s.mlp = nn.Sequential(nn.Linear(D, 4 * D), nn.GELU(), nn.Linear(4 * D, D))
    def forward(s, x):
        h = s.n1(x); x = x + s.att(h, h, h, need_weights=False)[0]; return x + s.mlp(s.n2(x))
def conv(i, o, st):
    return [nn.Conv2d(i, o, 3, st, 1), nn.GroupNorm(1, o), nn.GELU()]
class Net(nn.Module):
    def __init__(s, arch):
        super().__init__(); s.arch = arch
        if arch == "vit8": s.stem = nn.Conv2d(3, D, 8, 8)
        elif arch == "vit4": s.stem = nn.Conv2d(3, D, 4, 4)
        elif arch == "k16": s.stem = nn.Conv2d(3, D, 16, 8, 4)
        elif arch == "hier": s.stem = nn.Sequential(nn.Conv2d(3, D // 2, 4, 4), nn.GroupNorm(1, D // 2), nn.GELU(), nn.Conv2d(D // 2, D, 2, 2))
        elif arch == "hier2": s.stem = nn.Sequential(nn.Conv2d(3, 32, 2, 2), nn.GroupNorm(1, 32), nn.GELU(), nn.Conv2d(32, 64, 2, 2), nn.GroupNorm(1, 64), nn.GELU(), nn.Conv2d(64, D, 2, 2))
        elif arch == "stem3":  # the repo's pixels_conv: 3 stride-2
            s.stem = nn.Sequential(*conv(3, 32, 2), *conv(32, 64, 2), *conv(64, 128, 2), nn.Conv2d(128, D, 1))
        elif arch == "stem5":  # deeper stem: full-res convs first
            s.stem = nn.Sequential(*conv(3, 32, 1), *conv(32, 32, 1), *conv(32, 64, 2), *conv(64, 64, 1), *conv(64, 128, 2), *conv(128, 128, 1), *conv(128, D, 2))
        elif arch == "cnn":  # onemodel's convnet_stem (its final 1x1 convolution included)
            from onemodel.input_embeddings import convnet_stem
            s.stem = convnet_stem(8, D)
        g = 16 if arch == "vit4" else 8
        s.pos = nn.Parameter(torch.randn(1, g * g, D) * 0.02)
        s.blocks = nn.ModuleList([Block() for _ in range(a.layers if arch != "cnn" else 0)])
        s.q = nn.Parameter(torch.randn(1, 1, D) * 0.02); s.pool = nn.MultiheadAttention(D, 4, batch_first=True)
        s.head = nn.Sequential(nn.LayerNorm(D), nn.Linear(D, 48))
    def forward(s, x):
        f = s.stem(x).flatten(2).transpose(1, 2) + s.pos
        for b in s.blocks: f = b(f)
        q = s.q.expand(len(f), -1, -1)
        return s.head(s.pool(q, f, f, need_weights=False)[0][:, 0])
torch.manual_seed(0)
m = Net(a.arch); n = sum(p.numel() for p in m.parameters())
opt = torch.optim.AdamW(m.parameters(), lr=a.lr, weight_decay=0.05, betas=(0.9, 0.95))
sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda t: min(1, (t + 1) / 50))
g = torch.Generator().manual_seed(0); t0 = time.process_time()
def evaluate():
    m.eval()
    with torch.no_grad(), torch.autocast("cpu", torch.bfloat16):
        pr = torch.cat([m(xte[i:i + 250]).float() for i in range(0, 1000, 250)]) > 0
    m.train()
    exact = (pr == (yte > 0)).all(1).float().mean().item()
    tp = (pr & (yte > 0)).sum().item(); f1 = 2 * tp / (pr.sum().item() + (yte > 0).sum().item())
    return exact, f1
print(f"{a.arch} width {D} params {n/1e6:.2f}M", flush=True)
for step in range(1, a.steps + 1):
    idx = torch.randint(0, len(xtr), (a.bs,), generator=g)
    with torch.autocast("cpu", torch.bfloat16):
        loss = F.binary_cross_entropy_with_logits(m(xtr[idx]).float(), ytr[idx])
    loss.backward(); torch.nn.utils.clip_grad_norm_(m.parameters(), 1.0); opt.step(); opt.zero_grad(); sched.step()
    cpu = time.process_time() - t0
    if step % 200 == 0 or cpu > a.cpu:
        ex, f1 = evaluate()
        print(f"{a.arch} step {step} loss {loss.item():.4f} exact {ex:.3f} f1 {f1:.3f} cpu {cpu:.0f}s", flush=True)
    if cpu > a.cpu: break
