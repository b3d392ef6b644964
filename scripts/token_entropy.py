"""How hard are a token set's grid tokens to predict? Entropy of each grid modality's codes, and the conditional
entropy given the rgb code at the same position, over a pre-tokenized split.

A multimodal model must predict these codes; a tokenizer whose codes depend on the surroundings (a conv encoder
with a large receptive field) spreads even flat background patches over hundreds of codes, which a small model
cannot learn to predict in minutes. Prints a Markdown table.

    python scripts/token_entropy.py runs/demo/tokens [--split train] [--limit 4000]
"""

from __future__ import annotations

import argparse
import math
from collections import Counter

import numpy as np


def entropy(counts: Counter) -> float:
    total = sum(counts.values())
    return -sum(c / total * math.log(c / total) for c in counts.values())


def main() -> int:
    from training.pretokenize import iter_token_samples

    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tokens", help="token shard directory (onemodel tokenize --out)")
    parser.add_argument("--split", default="train")
    parser.add_argument("--limit", type=int, default=4000)
    args = parser.parse_args()
    grids: dict[str, list[np.ndarray]] = {}
    for i, sample in enumerate(iter_token_samples(args.tokens, args.split)):
        if i >= args.limit:
            break
        for name in ("rgb", "depth", "semseg"):
            if name in sample:
                grids.setdefault(name, []).append(np.asarray(sample[name]).ravel())
    if "rgb" not in grids:
        raise SystemExit(f"no rgb tokens in {args.tokens}/{args.split}")
    arrays = {k: np.stack(v) for k, v in grids.items()}
    rgb = arrays["rgb"].ravel().tolist()
    print(f"{len(arrays['rgb'])} samples of {args.tokens}/{args.split}\n")
    print("| modality | distinct codes | H(code) nats | H(code given rgb code at same position) nats |")
    print("| --- | --- | --- | --- |")
    for name, arr in arrays.items():
        codes = arr.ravel().tolist()
        cond = "-" if name == "rgb" else f"{entropy(Counter(zip(rgb, codes))) - entropy(Counter(rgb)):.2f}"
        print(f"| {name} | {len(set(codes))} | {entropy(Counter(codes)):.2f} | {cond} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
