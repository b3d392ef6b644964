"""Compare VLM mappers (and prefix vs gated cross-attention) at the same frozen LM and vision encoder.

    # backbones + data from a finished demo run (onemodel train-vlm --config configs/vlm_shapes.yaml)
    python scripts/bench_vlm.py --base runs/vlm_shapes --out runs/vlm_bench --variants mlp summary4
    python scripts/bench_vlm.py --base runs/vlm_shapes --out runs/vlm_bench --table     # collect -> markdown

Each variant is one ``training.train_vlm.train_vlm`` run (same stages, steps, batch, seed, test samples) with
``lm.path`` and ``vision.path`` taken from ``--base`` (its ``lm/`` and ``vision/``), written to ``OUT/<variant>``.
Reported per variant: trainable parameters, visual tokens per image, stage-2 train samples/s (the training loop
only; vision features are cached), wall time of both stages, VQA accuracy, caption CIDEr and attribute F1 on the
test split. Run two variants at a time in separate processes to compare their speed under the same load.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

VARIANTS: dict[str, list[str]] = {
    "mlp": ["model.mapper.kind=mlp"],
    "summary1": ["model.mapper.kind=summary", "model.mapper.num_tokens=1"],
    "summary4": ["model.mapper.kind=summary", "model.mapper.num_tokens=4"],
    "summary8": ["model.mapper.kind=summary", "model.mapper.num_tokens=8"],
    "perceiver": ["model.mapper.kind=perceiver", "model.mapper.num_tokens=8"],
    "qformer": ["model.mapper.kind=qformer", "model.mapper.num_tokens=8"],
    "patches": ["model.mapper.kind=patches", "vision.kind=none"],
    "summary4_xattn": ["model.mapper.kind=summary", "model.mapper.num_tokens=4", "model.injection=xattn",
                       "model.xattn_every=1"],
    "mlp_xattn": ["model.mapper.kind=mlp", "model.injection=xattn"],
    "summary4_lora": ["model.mapper.kind=summary", "model.mapper.num_tokens=4", "model.lora={r: 8, alpha: 16}"],
}


def run_variant(name: str, base: Path, out: Path, config_path: str | None, extra: list[str]) -> dict:
    from training.train_vlm import train_vlm
    from training.vlm_config import load_vlm_train_config

    base_cfg = json.loads((base / "train_config.json").read_text())
    overrides = [f"out_dir={out / name}", f"lm.path={(base / 'lm').resolve()}", f"data.path={base_cfg['data']['path']}",
                 *VARIANTS[name], *extra]
    if "vision.kind=none" not in VARIANTS[name]:
        overrides.append(f"vision.path={(base / 'vision').resolve()}")
    config = load_vlm_train_config(config_path, overrides)
    summary = train_vlm(config, resume=(out / name / "stage1").exists())
    summary["variant"] = name
    return summary


def speed(base: Path, names: list[str], blocks: int = 6, steps_per_block: int = 5, batch_size: int = 32,
          seed: int = 0) -> dict[str, dict[str, float]]:
    """Training throughput of each variant measured interleaved in one process (blocks of ``steps_per_block``
    stage-2 steps, variants in turn, ``blocks`` rounds), so a busy machine slows all of them alike. Vision
    features are precomputed (as in ``train_vlm`` with ``cache_features``). Returns ``{variant: {"samples_per_s"
    (median over blocks), "trainable_params", "visual_tokens"}}``."""
    import statistics
    import time

    import numpy as np
    import torch

    from onemodel.mappers import MapperConfig
    from onemodel.vision_backbones import VisionSpec
    from onemodel.vlm import VLM, LoraSpec, VLMConfig
    from training.train_vlm import _features, load_vlm_train_config, load_vlm_data
    from training.train import param_groups

    torch.set_num_threads(1)
    cfg = load_vlm_train_config(base / "train_config.json",
                                [f"data.limit_train={batch_size * 8}", "eval.limit=1"])
    train, _ = load_vlm_data(cfg)
    images = np.stack([s["rgb"] for s in train])
    items = [(i, cfg.model.question_prompt.format(question=qa["question"]), qa["answer"])
             for i, s in enumerate(train) for qa in s["qa"]]
    runs = {}
    for name in names:
        o = dict(x.split("=", 1) for x in VARIANTS[name])
        vision = VisionSpec("none", None, image_size=cfg.data.resolution) if o.get("vision.kind") == "none" else \
            VisionSpec("contrastive", str((base / "vision").resolve()))
        torch.manual_seed(seed)
        model = VLM(VLMConfig(
            lm_path=str((base / "lm").resolve()), vision=vision,
            mapper=MapperConfig(o["model.mapper.kind"], num_tokens=int(o.get("model.mapper.num_tokens", 4))),
            injection=o.get("model.injection", "prefix"),
            lora=LoraSpec(8, 16) if "model.lora" in o else None))
        feats = _features(model, images)
        opt = torch.optim.AdamW(param_groups(model, 0.0), lr=1e-3)
        runs[name] = (model, feats, opt, [])
    rng = np.random.default_rng(seed)
    for _ in range(blocks):
        for name, (model, feats, opt, rates) in runs.items():
            model.train()
            t = time.perf_counter()
            for _ in range(steps_per_block):
                batch = [items[i] for i in rng.integers(0, len(items), batch_size)]
                loss = model(None, [b[1] for b in batch], [b[2] for b in batch], features=feats[[b[0] for b in batch]]).loss
                opt.zero_grad(set_to_none=True)
                loss.backward()
                opt.step()
            rates.append(steps_per_block * batch_size / (time.perf_counter() - t))
    return {n: {"samples_per_s": statistics.median(r), "trainable_params": sum(p.numel() for p in
                m.trained_parameters().values()), "visual_tokens": m.num_visual_tokens()}
            for n, (m, _, _, r) in runs.items()}


def table(out: Path) -> str:
    rows = []
    for f in sorted(out.glob("*/summary.json")):
        s = json.loads(f.read_text())
        ev = s.get("eval", {})
        rows.append((f.parent.name, s, ev))
    order = list(VARIANTS)
    rows.sort(key=lambda r: order.index(r[0]) if r[0] in order else 99)
    fast = json.loads((out / "speed.json").read_text()) if (out / "speed.json").is_file() else {}
    ref = fast.get("mlp", {}).get("samples_per_s")

    def interleaved(name: str) -> str:
        r = fast.get(name, {}).get("samples_per_s")
        return "" if r is None else f"{r:.1f}" + (f" ({r / ref:.2f}x)" if ref else "")

    lines = ["| variant | injection | trainable params | visual tokens | samples/s interleaved (vs mlp) | "
             "stage-2 samples/s in run | stages wall s | VQA acc | CIDEr | attr F1 |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s, ev in rows:
        wall = s["stage1"].get("wall_seconds", 0.0) + s["stage2"].get("wall_seconds", 0.0)
        lines.append(
            f"| {name} | {s['injection']}{' + LoRA' if s.get('lora') else ''} | {s['trainable_params']:,} | "
            f"{s['visual_tokens']} | {interleaved(name)} | {s['stage2']['samples_per_s']:.1f} | {wall:.0f} | "
            f"{ev.get('vqa', {}).get('accuracy', float('nan')):.3f} | {ev.get('caption', {}).get('cider', float('nan')):.3f} | "
            f"{ev.get('caption_attributes', {}).get('f1', float('nan')):.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--base", required=True, help="a finished train-vlm run whose lm/ and vision/ are reused")
    p.add_argument("--out", required=True, help="directory for the variant runs")
    p.add_argument("--config", default="configs/vlm_shapes.yaml", help="stage settings (default: the demo's)")
    p.add_argument("--variants", nargs="*", default=[], choices=list(VARIANTS), help="variants to run")
    p.add_argument("--table", action="store_true", help="print the markdown table of all finished variants")
    p.add_argument("--speed", nargs="*", default=None, choices=list(VARIANTS), metavar="VARIANT",
                   help="measure training samples/s of these variants interleaved in one process (fair on a busy "
                        "machine); writes OUT/speed.json")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every variant (repeatable), e.g. --set stage2.steps=600")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    base, out = Path(args.base), Path(args.out)
    if args.speed:
        result = speed(base, args.speed)
        out.mkdir(parents=True, exist_ok=True)
        (out / "speed.json").write_text(json.dumps(result, indent=2) + "\n")
        ref = result.get("mlp", {}).get("samples_per_s")
        for name, r in result.items():
            ratio = f", {r['samples_per_s'] / ref:.2f}x mlp" if ref else ""
            print(f"{name}: {r['samples_per_s']:.1f} samples/s{ratio} ({r['visual_tokens']} visual tokens, "
                  f"{r['trainable_params']:,} trained parameters)")
        return 0
    for name in args.variants:
        s = run_variant(name, base, out, args.config, args.overrides)
        print(f"{name}: samples/s {s['stage2']['samples_per_s']:.1f}, eval {json.dumps(s['eval'].get('vqa', {}))}",
              flush=True)
    if args.table or not args.variants:
        print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
