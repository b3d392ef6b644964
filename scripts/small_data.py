"""Measure the small-data remedies of ``onemodel fit`` (docs/own-data.md, "Small datasets").

A small captions + QA dataset (shapes scenes without depth, segmentation and boxes), the same tokenizers for
every variant, then one ``fit`` training per variant; every run keeps its best-validation model, so each row
is scored twice: the last model and the best-validation one (VQA and captions on the test split)::

    python scripts/small_data.py --out runs/small_data --num-train 500 --steps 400
    python scripts/small_data.py --out runs/small_data --variants baseline augment   # a subset (cached stages reused)
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import shutil
import tarfile
from pathlib import Path

VARIANTS: dict[str, dict] = {
    "baseline": {"augment_copies": 0, "overrides": []},
    "dropout+wd": {"augment_copies": 0, "overrides": ["model.dropout=0.1", "optim.weight_decay=0.1"]},
    "augment": {"augment_copies": 4, "overrides": []},
    "all": {"augment_copies": 4, "overrides": ["model.dropout=0.1", "optim.weight_decay=0.1"]},
}


def strip_to_captions_and_qa(src: Path, dst: Path) -> None:
    """Copy raw shards without depth, semseg and boxes (rgb, caption, qa and the scene graph stay)."""
    drop = (".depth.npy", ".semseg.png", ".boxes.json")
    for split in ("train", "val", "test"):
        (dst / split).mkdir(parents=True, exist_ok=True)
        for shard in sorted((src / split).glob("*.tar")):
            with tarfile.open(shard) as tin, tarfile.open(dst / split / shard.name, "w") as tout:
                for member in tin:
                    if member.isfile() and not member.name.endswith(drop):
                        tout.addfile(member, tin.extractfile(member))
    shutil.copy2(src / "meta.json", dst / "meta.json")


def score(model_dir: Path, data: Path, limit: int) -> dict[str, float]:
    from onemodel.pipeline import OneModelPipeline
    from training.evaluation.evaluate import evaluate

    pipeline = OneModelPipeline.from_pretrained(model_dir)
    results = evaluate(pipeline, data, tasks=["caption", "vqa"], limit=limit, batch_size=50, progress=False).results
    attr = results.get("caption_attributes", {})
    return {"vqa": results["vqa"]["accuracy"], "cider": results["caption"]["cider"], "attr_f1": attr.get("f1", float("nan"))}


def main() -> None:
    import logging

    from training.data.shapes import make_shapes_dataset
    from training.fit import PRESETS, run_fit

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", default="runs/small_data")
    parser.add_argument("--num-train", type=int, default=500)
    parser.add_argument("--steps", type=int, default=400)
    parser.add_argument("--eval-limit", type=int, default=200)
    parser.add_argument("--variants", nargs="*", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--dim", type=int, default=None, help="model width (default: configs/demo.yaml's 192)")
    parser.add_argument("--layers", type=int, default=None, help="encoder and decoder depth (default: 3 + 3)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--smoke", action="store_true", help="toy tokenizers and model (checks the script runs)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")

    out = Path(args.out)
    data = out / "data"
    if not (data / "meta.json").is_file():
        make_shapes_dataset(out / "shapes", args.num_train, 100, 200, resolution=64, progress=False)
        strip_to_captions_and_qa(out / "shapes", data)
    train = [f"optim.max_steps={args.steps}", "optim.warmup_steps=25", "checkpoint.every=100",
             "checkpoint.keep_best=true", "logging.eval_every=25", "logging.eval_batches=4",
             f"optim.batch_size={args.batch_size}"]
    if args.dim:
        train += [f"model.dim={args.dim}", f"model.num_heads={max(1, args.dim // 64)}"]
    if args.layers:
        train += [f"model.encoder_depth={args.layers}", f"model.decoder_depth={args.layers}"]
    if args.smoke:
        train += ["model.dim=32", "model.num_heads=2", "model.encoder_depth=1", "model.decoder_depth=1"]
    base = dataclasses.replace(PRESETS["quick" if args.smoke else "default"], small_data=False, augment_copies=0,
                               train_overrides=train)
    run_fit(data, out / "base", base, progress=False, stop_after="tokenizers")  # shared by every variant
    rows = json.loads((out / "results.json").read_text()) if (out / "results.json").is_file() else {}
    for name in args.variants:
        spec = VARIANTS[name]
        run_dir = out / name
        if not (run_dir / "fit_state.json").is_file():
            run_dir.mkdir(parents=True, exist_ok=True)
            for item in ("data", "tokenizers"):
                shutil.copytree(out / "base" / item, run_dir / item, dirs_exist_ok=True)
            shutil.copy2(out / "base" / "fit_state.json", run_dir / "fit_state.json")
        settings = dataclasses.replace(base, augment_copies=spec["augment_copies"],
                                       train_overrides=[*train, *spec["overrides"]])
        summary = run_fit(data, run_dir, settings, progress=False, stop_after="train")
        info = summary["state"]["train"]["info"]
        best_step = json.loads((run_dir / "run" / "best_model" / "train_config.json").read_text())["step"]
        rows[name] = {
            "last": score(run_dir / "run" / "model", data, args.eval_limit),
            "best": score(run_dir / "run" / "best_model", data, args.eval_limit),
            "final_val_loss": info["val"].get("val/loss"), "best_val_loss": info["best_val_loss"],
            "best_step": best_step, "train_loss": info["train_loss"],
        }
        (out / "results.json").write_text(json.dumps(rows, indent=2) + "\n")
    print(f"\n{args.num_train} training images, {args.steps} steps of {args.batch_size}, model dim {args.dim or 192}, "
          f"{args.layers or 3}+{args.layers or 3} layers; test: {args.eval_limit} images\n")
    print("| variant | model | VQA | CIDEr | caption attr. F1 | val loss | train loss |")
    print("| --- | --- | ---: | ---: | ---: | ---: | ---: |")
    for name, r in rows.items():
        for which in ("last", "best"):
            s = r[which]
            loss = r["final_val_loss"] if which == "last" else r["best_val_loss"]
            label = "last" if which == "last" else f"best val (step {r['best_step']})"
            print(f"| {name} | {label} | {s['vqa']:.3f} | {s['cider']:.2f} | {s['attr_f1']:.2f} | {loss:.3f} | "
                  f"{r['train_loss']:.3f} |")


if __name__ == "__main__":
    main()
