"""Task metrics: captioning, VQA, depth, segmentation, detection and tokenizer reconstruction.

Every function takes plain Python / numpy inputs in raw-sample units (docs/internals.md section 1) and returns
a ``dict`` of JSON-serialisable numbers. Standard tools are used where they exist offline:

- captions: the ``pycocoevalcap`` scorers (BLEU-1..4, CIDEr, ROUGE-L; METEOR on request), fed with the
  Stanford PTB tokenizer that ships with ``pycocoevalcap`` when Java is on ``PATH``, else the documented
  fallback :func:`simple_tokenize`;
- detection: ``pycocotools`` ``COCOeval`` (mAP@0.5 and mAP@[.5:.95]);
- VQA: the answer normalisation of the official VQA evaluation (punctuation, number words -> digits,
  articles, contractions) and its accuracy formula;
- depth (AbsRel, RMSE, delta1) and segmentation (confusion matrix -> mIoU, pixel accuracy) in numpy;
- tokenizer reconstruction (PSNR, codebook usage / perplexity): re-exported from ``tokenizers_mm.metrics``.

Streaming accumulators (:class:`DepthAccumulator`, :class:`SegmentationAccumulator`) score a dataset one
batch at a time.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import re
import shutil
import string
import subprocess
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np

# Tokenizer reconstruction metrics live with the tokenizers; re-exported here so evaluation has one namespace.
from tokenizers_mm.metrics import codebook_usage, psnr, reconstruction_metrics

__all__ = [
    "caption_scores",
    "simple_tokenize",
    "ptb_tokenize",
    "parse_shapes_caption",
    "caption_attribute_f1",
    "normalize_answer",
    "vqa_accuracy",
    "depth_metrics",
    "DepthAccumulator",
    "segmentation_metrics",
    "SegmentationAccumulator",
    "detection_map",
    "psnr",
    "codebook_usage",
    "reconstruction_metrics",
]

logger = logging.getLogger(__name__)

# --------------------------------------------------------------------------------------------------------
# Captioning


_FALLBACK_PUNCT = re.compile("[" + re.escape(string.punctuation) + "]")


def simple_tokenize(text: str) -> str:
    """Fallback caption tokenizer (used when Java is absent): lowercase, delete ASCII punctuation, split on
    whitespace, join with single spaces. Differs from PTB only on contractions/possessives ("it's" -> "its"
    here, "it 's" with PTB) and hyphenated words ("x-ray" -> "xray" here, "x-ray" with PTB)."""
    return " ".join(_FALLBACK_PUNCT.sub("", text.lower()).split())


def ptb_tokenize(texts: Sequence[str]) -> list[str]:
    """Tokenize with the Stanford PTB tokenizer jar shipped in ``pycocoevalcap`` (the official COCO caption
    preprocessing: lowercase, PTB tokens, punctuation tokens removed). Needs ``java`` on ``PATH``.

    Same jar, flags and punctuation list as ``pycocoevalcap.tokenizer.ptbtokenizer.PTBTokenizer``, but fed
    through stdin (no temporary file inside site-packages) and with Java's stderr chatter silenced.
    """
    from pycocoevalcap.tokenizer import ptbtokenizer

    java = shutil.which("java")
    if java is None:
        raise RuntimeError("java is not on PATH: the PTB tokenizer needs it (use simple_tokenize instead)")
    jar = os.path.join(os.path.dirname(os.path.abspath(ptbtokenizer.__file__)), ptbtokenizer.STANFORD_CORENLP_3_4_1_JAR)
    cmd = [java, "-cp", jar, "edu.stanford.nlp.process.PTBTokenizer", "-preserveLines", "-lowerCase"]
    text = "\n".join(t.replace("\n", " ").replace("\r", " ") for t in texts) + "\n"
    proc = subprocess.run(cmd, input=text.encode(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, check=True)
    lines = proc.stdout.decode().split("\n")
    if len(lines) < len(texts):
        raise RuntimeError(f"PTB tokenizer returned {len(lines)} lines for {len(texts)} captions")
    punct = set(ptbtokenizer.PUNCTUATIONS)
    return [" ".join(w for w in line.rstrip().split(" ") if w and w not in punct) for line in lines[: len(texts)]]


def _check_caption_inputs(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> list[list[str]]:
    if isinstance(predictions, str) or not isinstance(predictions, Sequence):
        raise TypeError("predictions must be a list of strings (one caption per image)")
    if len(predictions) != len(references):
        raise ValueError(f"got {len(predictions)} predictions but {len(references)} reference lists: one each")
    if len(predictions) == 0:
        raise ValueError("no captions to score")
    refs = []
    for i, r in enumerate(references):
        r = [r] if isinstance(r, str) else list(r)
        if not r:
            raise ValueError(f"image {i} has no reference caption")
        refs.append([str(x) for x in r])
    return refs


def caption_scores(
    predictions: Sequence[str],
    references: Sequence[Sequence[str]],
    tokenizer: str = "auto",
    meteor: bool = False,
) -> dict[str, Any]:
    """Corpus-level COCO caption metrics with the ``pycocoevalcap`` scorers.

    predictions: one generated caption per image. references: per image, a list of reference captions (a
    bare string counts as one reference). tokenizer: ``"ptb"`` (Java PTB tokenizer), ``"simple"``
    (:func:`simple_tokenize`) or ``"auto"`` (PTB when ``java`` is on PATH). meteor: also run METEOR (Java,
    ~7 s start-up for its paraphrase table; off by default).

    Returns ``{"bleu_1".."bleu_4", "rouge_l", "cider"[, "meteor"], "tokenizer": "ptb"|"simple",
    "num_samples"}``. BLEU, ROUGE-L and METEOR lie in [0, 1]; CIDEr(-D) is in [0, 10] (x10 scaling of the
    original paper; a perfect caption scores 10 when its n-grams are unique to its image, less when other
    images' references share them, because of the IDF weighting over the reference corpus).
    """
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    refs = _check_caption_inputs(predictions, references)
    if tokenizer not in ("auto", "ptb", "simple"):
        raise ValueError(f"tokenizer must be 'auto', 'ptb' or 'simple', got {tokenizer!r}")
    if tokenizer == "auto":
        tokenizer = "ptb" if shutil.which("java") else "simple"
    flat = [str(p) for p in predictions] + [r for rs in refs for r in rs]
    if tokenizer == "ptb":
        tokens = ptb_tokenize(flat)
    else:
        tokens = [simple_tokenize(t) for t in flat]
    logger.info("caption metrics: %s tokenizer, %d captions", tokenizer, len(predictions))
    n = len(predictions)
    res = {i: [tokens[i]] for i in range(n)}
    gts: dict[int, list[str]] = {}
    k = n
    for i, rs in enumerate(refs):
        gts[i] = tokens[k : k + len(rs)]
        k += len(rs)
    out: dict[str, Any] = {}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    for j, b in enumerate(bleu):
        out[f"bleu_{j + 1}"] = float(b)
    out["rouge_l"] = float(Rouge().compute_score(gts, res)[0])
    out["cider"] = float(Cider().compute_score(gts, res)[0])
    if meteor:
        from pycocoevalcap.meteor.meteor import Meteor

        scorer = Meteor()
        try:
            out["meteor"] = float(scorer.compute_score(gts, res)[0])
        finally:
            del scorer
    out["tokenizer"] = tokenizer
    out["num_samples"] = n
    return out


# --------------------------------------------------------------------------------------------------------
# Caption attributes on shapes

_NUMBER_WORDS = {
    "no": 0, "zero": 0, "one": 1, "two": 2, "three": 3, "four": 4, "five": 5,
    "six": 6, "seven": 7, "eight": 8, "nine": 9, "ten": 10,
}  # fmt: skip


def _shapes_vocab() -> tuple[tuple[str, ...], tuple[str, ...], tuple[str, ...]]:
    from training.data.shapes import COLORS, SHAPES, SIZES

    return tuple(COLORS), tuple(SHAPES), tuple(SIZES)


def _mention_regex() -> re.Pattern[str]:
    colors, shapes, sizes = _shapes_vocab()
    return re.compile(
        r"\b(?:(" + "|".join(sizes) + r")\s+)?(" + "|".join(colors) + r")\s+(" + "|".join(shapes) + r")(?:e?s)?\b"
    )


def parse_shapes_caption(text: str) -> dict[str, Any]:
    """Objects and stated count of a shapes caption, with the vocabulary of ``training.data.shapes``.

    Every "[size] colour shape[s]" phrase is a mention. Mentions with a size are objects (duplicates
    count, so "a small red circle and a small red circle" names two). A mention without a size ("the red
    circle is left of ...") refers back to an object already named with that colour and shape; if there is
    none it is an object of unknown size (``None``). A number word or digit before "shape(s)"/"object(s)"
    ("three shapes: ...") is the stated count.

    Returns ``{"objects": [(color, size | None, shape), ...], "count": int | None}``.
    """
    text = text.lower()
    sized: list[tuple[str, str | None, str]] = []
    unsized: list[tuple[str, None, str]] = []
    for m in _mention_regex().finditer(text):
        size, color, shape = m.group(1), m.group(2), m.group(3)
        if size is None:
            unsized.append((color, None, shape))
        else:
            sized.append((color, size, shape))
    named = {(c, s) for c, _, s in sized}
    extra: list[tuple[str, str | None, str]] = []
    for c, _, s in unsized:
        if (c, s) not in named:
            named.add((c, s))
            extra.append((c, None, s))
    count = None
    m = re.search(r"\b(" + "|".join(_NUMBER_WORDS) + r"|\d+)\s+(?:shapes?|objects?)\b", text)
    if m:
        word = m.group(1)
        count = int(word) if word.isdigit() else _NUMBER_WORDS[word]
    return {"objects": sized + extra, "count": count}


def _f1(tp: int, n_pred: int, n_true: int) -> tuple[float, float, float]:
    p = tp / n_pred if n_pred else 0.0
    r = tp / n_true if n_true else 0.0
    f = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return p, r, f


def caption_attribute_f1(predictions: Sequence[str], scenes: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """How well captions name the objects of shapes scenes (micro-averaged over the dataset).

    Each caption is parsed with :func:`parse_shapes_caption` into a multiset of (colour, size, shape)
    objects and compared with the scene graph's ``scene["shapes"]`` (true positives = multiset
    intersection).

    Returns ``{"precision", "recall", "f1"}`` on full (colour, size, shape) triples, ``"color_shape_f1"``
    ignoring size, ``"count_accuracy"`` (fraction of captions whose number of named objects equals the
    number of shapes), ``"stated_count_accuracy"`` (over the captions that state a count, fraction stating
    the right one; ``None`` when no caption states one), ``"num_samples"``.
    """
    if len(predictions) != len(scenes):
        raise ValueError(f"got {len(predictions)} captions but {len(scenes)} scenes: one scene per caption")
    if len(predictions) == 0:
        raise ValueError("no captions to score")
    tp = n_pred = n_true = 0
    tp_cs = 0
    count_ok = 0
    stated = stated_ok = 0
    for text, scene in zip(predictions, scenes):
        if not isinstance(scene, dict) or "shapes" not in scene:
            raise TypeError("scenes must be shapes scene graphs (dicts with a 'shapes' list), see training.data.shapes")
        parsed = parse_shapes_caption(str(text))
        pred = Counter(parsed["objects"])
        true = Counter((s["color"], s["size"], s["shape"]) for s in scene["shapes"])
        tp += sum((pred & true).values())
        n_pred += sum(pred.values())
        n_true += sum(true.values())
        pred_cs = Counter((c, s) for c, _, s in parsed["objects"])
        true_cs = Counter((c, s) for c, _, s in true.elements())
        tp_cs += sum((pred_cs & true_cs).values())
        count_ok += int(sum(pred.values()) == len(scene["shapes"]))
        if parsed["count"] is not None:
            stated += 1
            stated_ok += int(parsed["count"] == len(scene["shapes"]))
    p, r, f = _f1(tp, n_pred, n_true)
    return {
        "precision": p,
        "recall": r,
        "f1": f,
        "color_shape_f1": _f1(tp_cs, n_pred, n_true)[2],
        "count_accuracy": count_ok / len(predictions),
        "stated_count_accuracy": stated_ok / stated if stated else None,
        "num_samples": len(predictions),
    }


# --------------------------------------------------------------------------------------------------------
# VQA (normalisation and accuracy of the official VQA evaluation, github.com/GT-Vision-Lab/VQA vqaEval.py)

_CONTRACTIONS = {
    "aint": "ain't", "arent": "aren't", "cant": "can't", "couldve": "could've", "couldnt": "couldn't",
    "couldn'tve": "couldn't've", "couldnt've": "couldn't've", "didnt": "didn't", "doesnt": "doesn't",
    "dont": "don't", "hadnt": "hadn't", "hadnt've": "hadn't've", "hadn'tve": "hadn't've", "hasnt": "hasn't",
    "havent": "haven't", "hed": "he'd", "hed've": "he'd've", "he'dve": "he'd've", "hes": "he's", "howd": "how'd",
    "howll": "how'll", "hows": "how's", "id've": "i'd've", "i'dve": "i'd've", "im": "i'm", "ive": "i've",
    "isnt": "isn't", "itd": "it'd", "itd've": "it'd've", "it'dve": "it'd've", "itll": "it'll", "let's": "let's",
    "maam": "ma'am", "mightnt": "mightn't", "mightnt've": "mightn't've", "mightn'tve": "mightn't've",
    "mightve": "might've", "mustnt": "mustn't", "mustve": "must've", "neednt": "needn't", "notve": "not've",
    "oclock": "o'clock", "oughtnt": "oughtn't", "ow's'at": "'ow's'at", "'ows'at": "'ow's'at",
    "'ow'sat": "'ow's'at", "shant": "shan't", "shed've": "she'd've", "she'dve": "she'd've", "she's": "she's",
    "shouldve": "should've", "shouldnt": "shouldn't", "shouldnt've": "shouldn't've",
    "shouldn'tve": "shouldn't've", "somebody'd": "somebodyd", "somebodyd've": "somebody'd've",
    "somebody'dve": "somebody'd've", "somebodyll": "somebody'll", "somebodys": "somebody's",
    "someoned": "someone'd", "someoned've": "someone'd've", "someone'dve": "someone'd've",
    "someonell": "someone'll", "someones": "someone's", "somethingd": "something'd",
    "somethingd've": "something'd've", "something'dve": "something'd've", "somethingll": "something'll",
    "thats": "that's", "thered": "there'd", "thered've": "there'd've", "there'dve": "there'd've",
    "therere": "there're", "theres": "there's", "theyd": "they'd", "theyd've": "they'd've",
    "they'dve": "they'd've", "theyll": "they'll", "theyre": "they're", "theyve": "they've", "twas": "'twas",
    "wasnt": "wasn't", "wed've": "we'd've", "we'dve": "we'd've", "weve": "we've", "werent": "weren't",
    "whatll": "what'll", "whatre": "what're", "whats": "what's", "whatve": "what've", "whens": "when's",
    "whered": "where'd", "wheres": "where's", "whereve": "where've", "whod": "who'd", "whod've": "who'd've",
    "who'dve": "who'd've", "wholl": "who'll", "whos": "who's", "whove": "who've", "whyll": "why'll",
    "whyre": "why're", "whys": "why's", "wont": "won't", "wouldve": "would've", "wouldnt": "wouldn't",
    "wouldnt've": "wouldn't've", "wouldn'tve": "wouldn't've", "yall": "y'all", "yall'll": "y'all'll",
    "y'allll": "y'all'll", "yall'd've": "y'all'd've", "y'alld've": "y'all'd've", "y'all'dve": "y'all'd've",
    "youd": "you'd", "youd've": "you'd've", "you'dve": "you'd've", "youll": "you'll", "youre": "you're",
    "youve": "you've",
}  # fmt: skip
_VQA_NUMBERS = {
    "none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5",
    "six": "6", "seven": "7", "eight": "8", "nine": "9", "ten": "10",
}  # fmt: skip
_VQA_ARTICLES = {"a", "an", "the"}
_VQA_PUNCT = [";", r"/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
# The official regex is "(?!<=\d)(\.)(?!\d)" (a typo for a look-behind); its effect is "a period not followed
# by a digit", which is what this reproduces.
_PERIOD_STRIP = re.compile(r"\.(?!\d)")
_COMMA_STRIP = re.compile(r"(\d)(,)(\d)")


def normalize_answer(answer: str) -> str:
    """The official VQA answer normalisation: punctuation (dropped next to a space or in "1,000"-style
    numbers, else replaced by a space; periods removed unless before a digit), lowercase, number words up to
    ten -> digits ("none" -> "0"), articles removed, missing apostrophes restored ("dont" -> "don't")."""
    text = str(answer).replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _VQA_PUNCT:
        if (p + " " in text or " " + p in text) or _COMMA_STRIP.search(text) is not None:
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD_STRIP.sub("", out)
    words = []
    for word in out.lower().split():
        word = _VQA_NUMBERS.get(word, word)
        if word not in _VQA_ARTICLES:
            words.append(_CONTRACTIONS.get(word, word))
    return " ".join(words)


# the question kinds of the shapes data (training.data.shapes._questions), by the question's opening words
QUESTION_KINDS = [("^how many", "count"), ("^is there", "yes/no"), ("^what colou?r", "color"), ("^what shape", "shape"),
                  ("^what size", "size"), ("^what is (left|right|above|below|in front|behind)", "relation")]


def question_kind(question: str) -> str:
    """The kind of a shapes question (``QUESTION_KINDS``): count, yes/no, color, shape, size, relation or other."""
    q = question.strip().lower()
    for pattern, name in QUESTION_KINDS:
        if re.search(pattern, q):
            return name
    return "other"


def vqa_accuracy_by_kind(predictions: Sequence[str], answers: Sequence[str], questions: Sequence[str]) -> dict[str, float]:
    """Exact-match VQA accuracy per question kind (:func:`question_kind`): ``{"acc_<kind>": accuracy}`` for each kind
    present (``acc_yes/no`` is written ``acc_yes_no``)."""
    if not len(predictions) == len(answers) == len(questions):
        raise ValueError("predictions, answers and questions must be equally long")
    hits: dict[str, list[float]] = {}
    for pred, ans, q in zip(predictions, answers, questions):
        hits.setdefault(question_kind(q), []).append(float(normalize_answer(pred) == normalize_answer(ans)))
    return {f"acc_{kind.replace('/', '_')}": sum(v) / len(v) for kind, v in sorted(hits.items())}


def vqa_accuracy(predictions: Sequence[str], answers: Sequence[str] | Sequence[Sequence[str]]) -> dict[str, Any]:
    """VQA accuracy in [0, 1] after :func:`normalize_answer` on both sides.

    answers: per question either one answer string (exact match after normalisation: 1 or 0) or a list of
    human answers (official VQA formula: for each of the k answers, ``min(1, #matches among the other
    k - 1 / 3)``, averaged over the k leave-one-out subsets; with 10 answers this is ~``min(1, #matches / 3)``).
    Returns ``{"accuracy", "num_questions"}``.
    """
    if isinstance(predictions, str) or len(predictions) != len(answers):
        raise ValueError(f"got {len(predictions)} predictions but {len(answers)} answers: one per question")
    if len(predictions) == 0:
        raise ValueError("no questions to score")
    total = 0.0
    for pred, ans in zip(predictions, answers):
        p = normalize_answer(pred)
        if isinstance(ans, str) or len(ans) == 1:
            total += float(p == normalize_answer(ans if isinstance(ans, str) else ans[0]))
            continue
        gts = [normalize_answer(a) for a in ans]
        accs = []
        for i in range(len(gts)):
            matches = sum(1 for j, g in enumerate(gts) if j != i and g == p)
            accs.append(min(1.0, matches / 3.0))
        total += sum(accs) / len(accs)
    return {"accuracy": total / len(predictions), "num_questions": len(predictions)}


# --------------------------------------------------------------------------------------------------------
# Depth


def _as_depth(x: Any, name: str) -> np.ndarray:
    a = np.asarray(x, dtype=np.float64)
    if a.ndim not in (2, 3):
        raise ValueError(f"{name} must be a depth map (H, W) or a batch (B, H, W), got shape {a.shape}")
    return a


def _depth_errors(pred: np.ndarray, gt: np.ndarray, valid: np.ndarray) -> tuple[float, float, float, int]:
    p, g = pred[valid], gt[valid]
    n = int(p.size)
    abs_rel = float(np.mean(np.abs(p - g) / g))
    rmse = float(np.sqrt(np.mean((p - g) ** 2)))
    p_safe = np.maximum(p, 1e-6)
    delta1 = float(np.mean(np.maximum(p_safe / g, g / p_safe) < 1.25))
    return abs_rel, rmse, delta1, n


def _depth_valid(pred: np.ndarray, gt: np.ndarray, valid_mask: Any) -> np.ndarray:
    if pred.shape != gt.shape:
        raise ValueError(f"prediction shape {pred.shape} != ground-truth shape {gt.shape}")
    valid = np.isfinite(gt) & (gt > 0) & np.isfinite(pred)
    if valid_mask is not None:
        vm = np.asarray(valid_mask, dtype=bool)
        if vm.shape != gt.shape:
            raise ValueError(f"valid_mask shape {vm.shape} != depth shape {gt.shape}")
        valid &= vm
    return valid


def depth_metrics(pred: Any, gt: Any, valid_mask: Any = None) -> dict[str, Any]:
    """Depth errors over the valid pixels of one map (or a batch, pixels pooled), depths in metres.

    Valid = ``valid_mask`` (True = score this pixel) and ground truth finite and > 0 and prediction finite.
    Returns ``{"abs_rel": mean |p - g| / g, "rmse": sqrt(mean (p - g)^2) in metres, "delta1": fraction of
    pixels with max(p / g, g / p) < 1.25, "num_pixels"}``. Predictions <= 0 count as infinitely far off
    for delta1.
    """
    p, g = _as_depth(pred, "pred"), _as_depth(gt, "gt")
    valid = _depth_valid(p, g, valid_mask)
    if not valid.any():
        raise ValueError("no valid depth pixels to score (ground truth must be finite and > 0)")
    abs_rel, rmse, delta1, n = _depth_errors(p, g, valid)
    return {"abs_rel": abs_rel, "rmse": rmse, "delta1": delta1, "num_pixels": n}


class DepthAccumulator:
    """Dataset depth metrics, streamed: each image is scored on its own valid pixels, then the per-image
    values are averaged (the usual protocol of monocular depth benchmarks; RMSE is the mean per-image RMSE)."""

    def __init__(self) -> None:
        self._sums = np.zeros(3)
        self.num_images = 0

    def update(self, pred: Any, gt: Any, valid_mask: Any = None) -> None:
        """Add one depth map ``(H, W)`` or a batch ``(B, H, W)``; images without valid pixels are skipped."""
        p, g = _as_depth(pred, "pred"), _as_depth(gt, "gt")
        valid = _depth_valid(p, g, valid_mask)
        if p.ndim == 2:
            p, g, valid = p[None], g[None], valid[None]
        for i in range(p.shape[0]):
            if valid[i].any():
                abs_rel, rmse, delta1, _ = _depth_errors(p[i], g[i], valid[i])
                self._sums += (abs_rel, rmse, delta1)
                self.num_images += 1

    def compute(self) -> dict[str, Any]:
        """``{"abs_rel", "rmse", "delta1", "num_images"}`` averaged over the images seen."""
        if self.num_images == 0:
            raise ValueError("no depth maps with valid pixels were added")
        m = self._sums / self.num_images
        return {"abs_rel": float(m[0]), "rmse": float(m[1]), "delta1": float(m[2]), "num_images": self.num_images}


# --------------------------------------------------------------------------------------------------------
# Segmentation


class SegmentationAccumulator:
    """Streaming confusion matrix for semantic segmentation.

    ``confusion[t, p]`` counts pixels of true class ``t`` predicted as ``p`` (``p == num_classes`` collects
    predictions outside ``[0, num_classes)``: wrong for every class, a false positive for none).
    Pixels whose ground truth is ``ignore_index`` are not counted.
    """

    def __init__(self, num_classes: int, ignore_index: int | None = None, class_names: Sequence[str] | None = None):
        if not isinstance(num_classes, (int, np.integer)) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if class_names is not None and len(class_names) != num_classes:
            raise ValueError(f"{len(class_names)} class names for {num_classes} classes")
        self.num_classes = int(num_classes)
        self.ignore_index = ignore_index
        self.class_names = list(class_names) if class_names is not None else None
        self.confusion = np.zeros((self.num_classes, self.num_classes + 1), dtype=np.int64)

    def update(self, pred: Any, gt: Any) -> None:
        """Add one label map ``(H, W)`` or a batch ``(B, H, W)`` of integer class ids."""
        p = np.asarray(pred)
        g = np.asarray(gt)
        if p.shape != g.shape:
            raise ValueError(f"prediction shape {p.shape} != ground-truth shape {g.shape}")
        if not (np.issubdtype(p.dtype, np.integer) and np.issubdtype(g.dtype, np.integer)):
            raise TypeError(f"segmentation maps must hold integer class ids, got {p.dtype} and {g.dtype}")
        p = p.astype(np.int64).ravel()
        g = g.astype(np.int64).ravel()
        keep = np.ones_like(g, dtype=bool) if self.ignore_index is None else g != self.ignore_index
        p, g = p[keep], g[keep]
        if g.size and (g.min() < 0 or g.max() >= self.num_classes):
            raise ValueError(
                f"ground-truth class ids must be in [0, {self.num_classes}) (or ignore_index), "
                f"got range [{g.min()}, {g.max()}]"
            )
        k = self.num_classes
        p = np.where((p < 0) | (p >= k), k, p)
        self.confusion += np.bincount(g * (k + 1) + p, minlength=k * (k + 1)).reshape(k, k + 1)

    def compute(self) -> dict[str, Any]:
        """``{"miou", "pixel_accuracy", "per_class_iou", "num_pixels"}``.

        IoU of class c = TP / (TP + FP + FN). mIoU averages over the classes that occur in the ground truth
        or the prediction; a class absent from both has IoU ``None`` in ``per_class_iou`` (a list by class
        id, or a dict by class name when ``class_names`` was given).
        """
        cm = self.confusion
        total = int(cm.sum())
        if total == 0:
            raise ValueError("no pixels were added to the segmentation accumulator")
        k = self.num_classes
        tp = np.diag(cm[:, :k]).astype(np.float64)
        union = cm.sum(axis=1) + cm[:, :k].sum(axis=0) - tp
        ious: list[float | None] = [float(tp[c] / union[c]) if union[c] > 0 else None for c in range(k)]
        present = [v for v in ious if v is not None]
        per_class: Any = ious if self.class_names is None else dict(zip(self.class_names, ious))
        return {
            "miou": float(np.mean(present)),
            "pixel_accuracy": float(tp.sum() / total),
            "per_class_iou": per_class,
            "num_pixels": total,
        }


def segmentation_metrics(
    pred: Any,
    gt: Any,
    num_classes: int,
    ignore_index: int | None = None,
    class_names: Sequence[str] | None = None,
) -> dict[str, Any]:
    """mIoU and pixel accuracy of one label map or a batch (see :class:`SegmentationAccumulator`)."""
    acc = SegmentationAccumulator(num_classes, ignore_index, class_names)
    acc.update(pred, gt)
    return acc.compute()


# --------------------------------------------------------------------------------------------------------
# Detection


def _check_boxes(items: Any, what: str, i: int, need_score: bool) -> None:
    if not isinstance(items, (list, tuple)):
        raise TypeError(f"{what}[{i}] must be a list of box dicts, got {type(items).__name__}")
    for d in items:
        if not isinstance(d, dict) or "box" not in d or "label" not in d or (need_score and "score" not in d):
            keys = "box, label, score" if need_score else "box, label"
            raise TypeError(f"{what}[{i}] entries must be dicts with keys {keys}; got {d!r}")
        if len(d["box"]) != 4:
            raise ValueError(f"{what}[{i}]: a box is [x0, y0, x1, y1], got {d['box']!r}")


def detection_map(
    predictions: Sequence[Sequence[dict[str, Any]]],
    ground_truth: Sequence[Sequence[dict[str, Any]]],
    classes: Sequence[str],
) -> dict[str, Any]:
    """COCO box mAP with ``pycocotools.cocoeval.COCOeval`` (all areas, up to 100 detections per image).

    predictions: per image a list of ``{"box": [x0, y0, x1, y1], "label": str, "score": float}``;
    ground_truth: per image a list of ``{"box", "label"}`` (raw-sample format; x1/y1 exclusive, pixels).
    Predicted labels not in ``classes`` are dropped (counted in ``"num_unknown_labels"``).

    Returns ``{"map_50": AP at IoU 0.5, "map_50_95": AP averaged over IoU 0.50:0.05:0.95,
    "per_class_ap_50": {class: AP@0.5 or None when the class has no ground truth}, "num_images"}``, all APs
    averaged over the classes that have ground-truth boxes.
    """
    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    if len(predictions) != len(ground_truth):
        raise ValueError(f"got {len(predictions)} prediction lists but {len(ground_truth)} ground-truth lists")
    classes = list(classes)
    cat_id = {c: k + 1 for k, c in enumerate(classes)}
    images, anns, dets = [], [], []
    unknown = 0
    for i, (preds, gts) in enumerate(zip(predictions, ground_truth)):
        _check_boxes(gts, "ground_truth", i, need_score=False)
        _check_boxes(preds, "predictions", i, need_score=True)
        images.append({"id": i + 1})
        for g in gts:
            if g["label"] not in cat_id:
                raise ValueError(f"ground-truth label {g['label']!r} of image {i} is not in classes {classes}")
            x0, y0, x1, y1 = (float(v) for v in g["box"])
            w, h = max(x1 - x0, 0.0), max(y1 - y0, 0.0)
            anns.append(
                {"id": len(anns) + 1, "image_id": i + 1, "category_id": cat_id[g["label"]],
                 "bbox": [x0, y0, w, h], "area": w * h, "iscrowd": 0}
            )  # fmt: skip
        for d in preds:
            if d["label"] not in cat_id:
                unknown += 1
                continue
            x0, y0, x1, y1 = (float(v) for v in d["box"])
            dets.append(
                {"image_id": i + 1, "category_id": cat_id[d["label"]],
                 "bbox": [x0, y0, max(x1 - x0, 0.0), max(y1 - y0, 0.0)], "score": float(d["score"])}
            )  # fmt: skip
    if not anns:
        raise ValueError("no ground-truth boxes: detection mAP is undefined")
    if unknown:
        logger.warning("detection: dropped %d predicted boxes with labels outside %s", unknown, classes)
    out: dict[str, Any] = {"num_images": len(images), "num_unknown_labels": unknown}
    if not dets:
        out.update(map_50=0.0, map_50_95=0.0)
        has_gt = {a["category_id"] for a in anns}
        out["per_class_ap_50"] = {c: (0.0 if cat_id[c] in has_gt else None) for c in classes}
        return out
    with contextlib.redirect_stdout(io.StringIO()):
        coco_gt = COCO()
        categories = [{"id": v, "name": k} for k, v in cat_id.items()]
        coco_gt.dataset = {"images": images, "annotations": anns, "categories": categories}
        coco_gt.createIndex()
        coco_dt = coco_gt.loadRes(dets)
        ev = COCOeval(coco_gt, coco_dt, iouType="bbox")
        ev.evaluate()
        ev.accumulate()
        ev.summarize()
    out["map_50_95"] = max(float(ev.stats[0]), 0.0)
    out["map_50"] = max(float(ev.stats[1]), 0.0)
    # precision: (T IoUs, R recall points, K classes, A areas, M maxDets); -1 where a class has no ground truth.
    prec = ev.eval["precision"][0, :, :, 0, -1]
    per_class = {}
    for k, c in enumerate(classes):
        col = prec[:, k]
        per_class[c] = None if np.all(col < 0) else float(np.mean(col))
    out["per_class_ap_50"] = per_class
    return out
