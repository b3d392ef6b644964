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


def table(out: Path) -> str:
    rows = []
    for f in sorted(out.glob("*/summary.json")):
        s = json.loads(f.read_text())
        ev = s.get("eval", {})
        rows.append((f.parent.name, s, ev))
    order = list(VARIANTS)
    rows.sort(key=lambda r: order.index(r[0]) if r[0] in order else 99)
    lines = ["| variant | injection | trainable params | visual tokens | stage-2 samples/s | stages wall s | VQA acc | "
             "CIDEr | attr F1 |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for name, s, ev in rows:
        wall = s["stage1"].get("wall_seconds", 0.0) + s["stage2"].get("wall_seconds", 0.0)
        lines.append(
            f"| {name} | {s['injection']}{' + LoRA' if s.get('lora') else ''} | {s['trainable_params']:,} | "
            f"{s['visual_tokens']} | {s['stage2']['samples_per_s']:.1f} | {wall:.0f} | "
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
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="extra config override for every variant (repeatable), e.g. --set stage2.steps=600")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        datefmt="%H:%M:%S")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()
    base, out = Path(args.base), Path(args.out)
    for name in args.variants:
        s = run_variant(name, base, out, args.config, args.overrides)
        print(f"{name}: samples/s {s['stage2']['samples_per_s']:.1f}, eval {json.dumps(s['eval'].get('vqa', {}))}",
              flush=True)
    if args.table or not args.variants:
        print(table(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
