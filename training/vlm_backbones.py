"""The demo's own "pretrained" backbones for the VLM family (nothing can be downloaded here).

- :func:`pretrain_lm`: the project's text tokenizer trained on the corpus and wrapped as a
  ``transformers.PreTrainedTokenizerFast``, and a small Llama-architecture causal LM (``LlamaForCausalLM`` from a
  ``LlamaConfig``) trained on the same text; both saved with ``save_pretrained`` into one directory, which then
  loads with ``AutoModelForCausalLM`` / ``AutoTokenizer`` like any Hugging Face checkpoint.
- :func:`pretrain_vision`: a small CLIP (``onemodel.contrastive.ImageTextEncoder``) trained contrastively on the
  image-caption pairs, with CLIP's linear patch embedding (its directory loads as ``transformers.CLIPVisionModel``
  too) or a small ConvNet stem (``stem="convnet"``; then it loads with ``ImageTextEncoder.from_pretrained``), and
  optionally with hard-negative captions (``training.hard_negatives``).

Both write to ``DIR.tmp`` and rename when complete; an existing complete directory is reused (cached).
"""

from __future__ import annotations

import logging
import math
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

__all__ = ["pretrain_lm", "pretrain_vision", "lm_corpus"]

logger = logging.getLogger(__name__)


def _cosine_lr(step: int, total: int, lr: float, warmup: int = 20) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup)))))


def lm_corpus(samples: list[dict[str, Any]], caption_prompt: str, question_prompt: str,
              image_token: str = "<image>") -> list[str]:
    """The LM's pre-training text, from the dataset's captions, questions and answers, in the VLM's prompt formats
    with the scene's caption standing where the image will be::

        "<caption> caption: <caption>"            "<caption> question: <q> answer: <a>"

    So the LM learns the words, the formats, and to read what is in front of the prompt (copy a description,
    answer from it) before it ever sees an image; the mapper then learns to put a "description" there. Measured on
    the shapes demo: an LM pre-trained on the bare texts ("caption: <caption>", "question: <q> answer: <a>") has no
    way to use its context for answers, and a prefix mapper (summary, K=4) never left the text-only loss."""
    out = []
    for s in samples:
        cap = s["caption"].strip()
        out.append(caption_prompt.replace(image_token, cap).strip() + " " + cap)
        for qa in s.get("qa", []):
            prompt = question_prompt.replace(image_token, cap).format(question=qa["question"]).strip()
            out.append(f"{prompt} {qa['answer']}")
    return out


def pretrain_lm(texts: list[str], out_dir: str | Path, dim: int = 192, layers: int = 4, heads: int = 4,
                vocab_size: int = 512, steps: int = 600, batch_size: int = 32, lr: float = 3e-3,
                seed: int = 0) -> dict[str, Any]:
    """Train tokenizer + small Llama on ``texts``; save both to ``out_dir``. Returns ``{"seconds", "loss",
    "num_params", "cached"}``."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tokenizers_mm.text import TextTokenizer

    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file() and (out_dir / "tokenizer.json").is_file():
        logger.info("LM in %s exists: reused", out_dir)
        return {"seconds": 0.0, "cached": True}
    start = time.perf_counter()
    torch.manual_seed(seed)
    text_tok = TextTokenizer.train(texts, vocab_size=vocab_size, num_sentinels=1, num_loc_bins=2)
    tok = text_tok.to_transformers()
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=dim, intermediate_size=4 * dim, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=512,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    rows = [[tok.bos_token_id] + tok.encode(t, add_special_tokens=False) + [tok.eos_token_id] for t in texts]
    rng = np.random.default_rng(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    model.train()
    loss_val = float("nan")
    from tqdm.auto import tqdm

    for step in tqdm(range(steps), desc="pretrain LM", unit="step", mininterval=2):
        idx = rng.integers(0, len(rows), size=batch_size)
        batch = [rows[i] for i in idx]
        length = max(map(len, batch))
        ids = torch.full((batch_size, length), tok.pad_token_id, dtype=torch.long)
        mask = torch.zeros(batch_size, length, dtype=torch.long)
        for i, r in enumerate(batch):
            ids[i, : len(r)] = torch.tensor(r)
            mask[i, : len(r)] = 1
        labels = ids.masked_fill(mask == 0, -100)
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, steps, lr)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        loss_val = loss.item()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    model.eval()
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    seconds = time.perf_counter() - start
    n = sum(p.numel() for p in model.parameters())
    logger.info("pre-trained LM (%.2fM parameters) in %.1f s, final loss %.3f -> %s", n / 1e6, seconds, loss_val,
                out_dir)
    return {"seconds": seconds, "loss": loss_val, "num_params": n, "cached": False}


def pretrain_vision(images: np.ndarray, captions: list[str], out_dir: str | Path, width: int = 128, layers: int = 4,
                    patch_size: int = 8, steps: int = 800, batch_size: int = 64, lr: float = 2e-3,
                    seed: int = 0, stem: str = "patch", stem_width: int = 16,
                    negatives: Any = None) -> dict[str, Any]:
    """Train a small CLIP (InfoNCE) on ``images`` (N, S, S, 3) uint8 + ``captions``; save to ``out_dir``.

    ``stem``: ``convnet`` (a small ConvNet of ``stem_width`` channels in place of the linear patch embedding,
    ``ContrastiveConfig.vision_stem``) or ``patch``. ``negatives``: a ``training.hard_negatives.HardNegativeConfig``
    (each caption also gets copies with one group word swapped, extra wrong texts for its image) or None."""
    from onemodel.contrastive import ContrastiveConfig, ImageTextEncoder
    from tokenizers_mm.text import TextTokenizer
    from training.hard_negatives import tokenized_negatives

    if stem not in ("patch", "convnet"):
        raise ValueError(f"vision stem must be 'patch' or 'convnet', got {stem!r}")

    out_dir = Path(out_dir)
    if (out_dir / "contrastive.json").is_file():
        import json

        saved = json.loads((out_dir / "contrastive.json").read_text()).get("config", {})
        if saved.get("vision_stem", "patch") != stem:
            logger.warning("vision encoder in %s has the %r stem, the config asks for %r: reused as it is (delete "
                           "the directory to retrain)", out_dir, saved.get("vision_stem", "patch"), stem)
        logger.info("vision encoder in %s exists: reused", out_dir)
        return {"seconds": 0.0, "cached": True}
    start = time.perf_counter()
    torch.manual_seed(seed)
    text_tok = TextTokenizer.train(captions, vocab_size=512, num_sentinels=1, num_loc_bins=2)
    size = int(images.shape[1])
    config = ContrastiveConfig(image_size=size, patch_size=patch_size, vision_width=width, vision_layers=layers,
                               vision_heads=4, text_width=128, text_layers=2, text_heads=4, embed_dim=128,
                               vision_stem=stem, vision_stem_width=stem_width)
    enc = ImageTextEncoder.from_config(config, text_tok)
    use_negatives = negatives is not None and negatives.enabled
    opt = torch.optim.AdamW([p for p in enc.parameters() if p.requires_grad], lr=lr, weight_decay=0.05)
    rng = np.random.default_rng(seed)
    pixels_all = torch.from_numpy(images)
    enc.train()
    from tqdm.auto import tqdm

    loss_val = float("nan")
    for step in tqdm(range(steps), desc="pretrain vision (CLIP)", unit="step", mininterval=2):
        idx = rng.choice(len(captions), size=batch_size, replace=False)
        pixels = enc.normalize(pixels_all[idx])
        texts = [captions[i] for i in idx]
        ids, mask = enc.tokenize(texts)
        extra = {}
        if use_negatives:
            neg = tokenized_negatives(enc, texts, range(step * batch_size, (step + 1) * batch_size), negatives, seed)
            extra = dict(zip(("negative_ids", "negative_mask", "negative_valid"), neg))
        for g in opt.param_groups:
            g["lr"] = _cosine_lr(step, steps, lr)
        loss = enc(pixels, ids, mask, **extra).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(enc.parameters(), 1.0)
        opt.step()
        loss_val = loss.item()
    enc.eval()
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    enc.save_pretrained(tmp)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    tmp.rename(out_dir)
    seconds = time.perf_counter() - start
    logger.info("pre-trained vision encoder in %.1f s, final loss %.3f -> %s", seconds, loss_val, out_dir)
    return {"seconds": seconds, "loss": loss_val, "cached": False}
