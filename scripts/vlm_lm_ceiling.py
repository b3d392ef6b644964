"""Ceiling of a VLM's frozen LM: its VQA accuracy (and captions) when the TRUE caption stands in the image place.

The demo LM is pre-trained on ``training.vlm_backbones.lm_corpus``: "<caption> question: <q> answer: <a>", the
scene's caption where the visual tokens go later. Fed the held-out scene's true caption there, the frozen LM shows
how much a perfect "image description" could give; fed nothing (the image place empty) or another scene's caption,
it shows the text prior a vision-blind VLM falls back to. Same scoring as ``onemodel eval`` (``vqa_accuracy``,
``caption_scores``, ``caption_attribute_f1``), per question kind too.

    python scripts/vlm_lm_ceiling.py --lm runs/vlm_shapes/lm --data runs/vlm_shapes_data [--limit 200]
    python scripts/vlm_lm_ceiling.py --vlm runs/vlm_shapes --data runs/vlm_shapes_data   # a trained VLM, per kind
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from training.evaluation import metrics  # noqa: E402

question_kind = metrics.question_kind  # count, yes/no, color, shape, size, relation


@torch.no_grad()
def generate(lm, tok, prompts: list[str], max_new_tokens: int, batch_size: int = 64) -> list[str]:
    """Greedy continuations of ``prompts`` (bos first, as in pre-training), left-padded batches."""
    out: list[str] = []
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    for i in range(0, len(prompts), batch_size):
        rows = [[tok.bos_token_id] + tok.encode(p, add_special_tokens=False) for p in prompts[i:i + batch_size]]
        length = max(map(len, rows))
        ids = torch.full((len(rows), length), pad, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for j, r in enumerate(rows):
            ids[j, length - len(r):] = torch.tensor(r)
            mask[j, length - len(r):] = 1
        gen = lm.generate(input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens, do_sample=False,
                          eos_token_id=tok.eos_token_id, pad_token_id=pad)
        out += [t.strip() for t in tok.batch_decode(gen[:, length:], skip_special_tokens=True)]
    return out


def score(lm, tok, samples: list[dict], context: list[str], caption_prompt: str, question_prompt: str,
          image_token: str = "<image>") -> dict:
    """VQA accuracy (overall and per kind) and caption scores with ``context[i]`` in scene i's image place."""
    qs, answers, kinds, prompts = [], [], [], []
    for s, ctx in zip(samples, context):
        for qa in s["qa"]:
            qs.append(qa["question"])
            answers.append(qa["answer"])
            kinds.append(question_kind(qa["question"]))
            prompts.append(question_prompt.replace(image_token, ctx).format(question=qa["question"]).strip())
    preds = generate(lm, tok, prompts, max_new_tokens=8)
    per_kind: dict[str, list[float]] = defaultdict(list)
    for p, a, k in zip(preds, answers, kinds):
        per_kind[k].append(float(metrics.normalize_answer(p) == metrics.normalize_answer(a)))
    caps = generate(lm, tok, [caption_prompt.replace(image_token, c).strip() for c in context], max_new_tokens=60)
    return {
        "vqa": metrics.vqa_accuracy(preds, answers)["accuracy"],
        "vqa_per_kind": {k: round(sum(v) / len(v), 3) for k, v in sorted(per_kind.items())},
        "vqa_kind_counts": {k: len(v) for k, v in sorted(per_kind.items())},
        "caption_cider": metrics.caption_scores(caps, [[s["caption"]] for s in samples])["cider"],
        "caption_attribute_f1": metrics.caption_attribute_f1(caps, [s["scene"] for s in samples])["f1"],
        "examples": [{"q": q, "answer": a, "pred": p} for q, a, p in list(zip(qs, answers, preds))[:8]],
    }


def vlm_per_kind(run: str, data: str, limit: int) -> int:
    from onemodel.vlm_pipeline import VLMPipeline
    from training.data.reader import load_samples

    pipe = VLMPipeline.from_pretrained(Path(run))
    samples = load_samples(Path(data) / "test", limit=limit, modalities=("rgb", "qa"))
    pairs = [(s["rgb"], qa["question"], qa["answer"]) for s in samples for qa in s["qa"]]
    preds: list[str] = []
    for i in range(0, len(pairs), 64):
        chunk = pairs[i:i + 64]
        preds += pipe.answer([p[0] for p in chunk], [p[1] for p in chunk])
    per_kind: dict[str, list[float]] = defaultdict(list)
    for (_, q, a), p in zip(pairs, preds):
        per_kind[question_kind(q)].append(float(metrics.normalize_answer(p) == metrics.normalize_answer(a)))
    acc = metrics.vqa_accuracy(preds, [a for _, _, a in pairs])["accuracy"]
    print(f"{run}: VQA {acc:.3f}  per kind "
          f"{json.dumps({k: round(sum(v) / len(v), 3) for k, v in sorted(per_kind.items())})}")
    return 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--lm", help="the LM directory (save_pretrained, with its tokenizer)")
    ap.add_argument("--vlm", help="instead: a trained VLM run (its VQA per question kind, for comparison)")
    ap.add_argument("--data", required=True, help="dataset directory with a test/ split")
    ap.add_argument("--limit", type=int, default=200, help="held-out scenes (default 200, as train-vlm's eval)")
    ap.add_argument("--caption-prompt", default="<image> caption:")
    ap.add_argument("--question-prompt", default="<image> question: {question} answer:")
    ap.add_argument("--out", default=None, help="write the results as JSON here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from training.data.reader import load_samples

    if bool(args.lm) == bool(args.vlm):
        ap.error("give --lm or --vlm")
    if args.vlm:
        return vlm_per_kind(args.vlm, args.data, args.limit)
    tok = AutoTokenizer.from_pretrained(args.lm)
    lm = AutoModelForCausalLM.from_pretrained(args.lm).eval()
    samples = load_samples(Path(args.data) / "test", limit=args.limit, modalities=("caption", "qa", "scene"))
    true = [s["caption"].strip() for s in samples]
    shuffled = [true[i] for i in np.random.default_rng(0).permutation(len(true))]
    results = {}
    contexts = (("true caption", true), ("another scene's caption", shuffled), ("empty image place", [""] * len(true)))
    for name, ctx in contexts:
        r = score(lm, tok, samples, ctx, args.caption_prompt, args.question_prompt)
        results[name] = r
        print(f"{name:24s} VQA {r['vqa']:.3f}  caption CIDEr {r['caption_cider']:.3f}  attr F1 "
              f"{r['caption_attribute_f1']:.3f}  per kind {json.dumps(r['vqa_per_kind'])}")
    print("kinds:", json.dumps(results["true caption"]["vqa_kind_counts"]))
    for e in results["true caption"]["examples"]:
        print(f"  {e['q']!r:48s} true {e['answer']!r:24s} LM {e['pred']!r}")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
