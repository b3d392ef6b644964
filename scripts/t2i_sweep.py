"""Text->image sampling sweep: judged accuracy of each sampling setting on the first N test scenes of a shapes dataset.

    python scripts/t2i_sweep.py --model runs/demo/run --data runs/demo/data --limit 100
    python scripts/t2i_sweep.py --model runs/demo/run --data runs/demo/data \
        --settings '[{"schedule": "random"}, {"schedule": "maskgit", "guidance_scale": 5.0}]'

Each setting is a dict of ``OneModelPipeline.text_to_image`` keywords (``schedule``, ``steps``, ``guidance_scale``,
``temperature``, ``via``, ...). Prints one line per setting: the judge's scene accuracy (every requested object
found: recall, extra objects are not penalised), per-object accuracy, exact accuracy (the judged objects are
exactly the requested ones), count accuracy (as many objects as requested) and seconds.
The table in docs/recipe.md ("Text->image sampling") was made with the default settings list below.
"""

from __future__ import annotations

import argparse
import json
import time

DEFAULT_SETTINGS = [
    {"schedule": "maskgit"}, {"schedule": "maskgit", "guidance_scale": 1.0}, {"schedule": "maskgit", "guidance_scale": 5.0},
    {"schedule": "maskgit", "steps": 16}, {"schedule": "maskgit", "temperature": 0.5},
    {"schedule": "maskgit", "via": ["semseg"]}, {"schedule": "random"}, {"schedule": "random", "guidance_scale": 1.0},
    {"schedule": "random", "steps": 4}, {"schedule": "random", "steps": 16}, {"schedule": "random", "temperature": 0.5},
]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="training run directory (or its model/)")
    parser.add_argument("--data", required=True, help="shapes dataset directory (with test/)")
    parser.add_argument("--split", default="test")
    parser.add_argument("--limit", type=int, default=100, help="scenes to score")
    parser.add_argument("--settings", default=None, help="JSON list of text_to_image keyword dicts")
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()

    import numpy as np
    import torch

    from onemodel.pipeline import OneModelPipeline
    from training.data.reader import load_samples
    from training.evaluation import judge
    from training.evaluation.evaluate import _resolve_data

    torch.set_num_threads(args.threads)
    settings = json.loads(args.settings) if args.settings else DEFAULT_SETTINGS
    pipe = OneModelPipeline.from_pretrained(args.model)
    samples = load_samples(_resolve_data(args.data, args.split)[0], limit=args.limit)
    prompts, scenes = [s["caption"] for s in samples], [s["scene"] for s in samples]
    print(f"{'setting':60s} {'accuracy':>8s} {'object':>7s} {'exact':>6s} {'count':>6s} {'seconds':>8s}")
    for kw in settings:
        start = time.perf_counter()
        images = pipe.text_to_image(prompts, batch_size=50, **kw)
        r = judge.attribute_accuracy([np.asarray(i, dtype=np.uint8) for i in images], scenes)
        print(f"{json.dumps(kw):60s} {r['accuracy']:8.3f} {r['object_accuracy']:7.3f} {r['exact_accuracy']:6.3f} "
              f"{r['count_accuracy']:6.3f} {time.perf_counter() - start:8.1f}", flush=True)


if __name__ == "__main__":
    main()
