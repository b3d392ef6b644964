"""Metric functions against hand-computed cases: perfect predictions score 1.0 (or their known maximum) and
known-wrong ones score exactly what they should."""

import math
import shutil

import numpy as np
import pytest

from training.data.shapes import generate_split
from training.evaluation.metrics import (
    DepthAccumulator,
    SegmentationAccumulator,
    caption_attribute_f1,
    caption_scores,
    codebook_usage,
    depth_metrics,
    detection_map,
    normalize_answer,
    parse_shapes_caption,
    psnr,
    ptb_tokenize,
    segmentation_metrics,
    simple_tokenize,
    vqa_accuracy,
)

HAS_JAVA = shutil.which("java") is not None
TOKENIZERS = ["simple"] + (["ptb"] if HAS_JAVA else [])

# ----------------------------------------------------------------------------------------------- captions


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_caption_scores_perfect(tokenizer):
    refs = [["a small red circle on the left"], ["two blue squares near one green triangle"]]
    out = caption_scores([r[0] for r in refs], refs, tokenizer=tokenizer)
    assert out["tokenizer"] == tokenizer
    for n in range(1, 5):
        assert out[f"bleu_{n}"] == pytest.approx(1.0, abs=1e-6)
    assert out["rouge_l"] == pytest.approx(1.0)
    # The two references share no n-gram: every IDF is log(2), each cosine is 1 -> CIDEr-D = 10 (x10 scale).
    assert out["cider"] == pytest.approx(10.0)


@pytest.mark.parametrize("tokenizer", TOKENIZERS)
def test_caption_scores_known_wrong(tokenizer):
    # Image 1: "a b c d" vs "a b c e" -> 1..4-gram matches 3/4, 2/3, 1/2, 0/1; image 2 perfect (4/4 ... 1/1).
    out = caption_scores(["a b c d", "x y z w"], [["a b c e"], ["x y z w"]], tokenizer=tokenizer)
    p1, p2, p3, p4 = 7 / 8, 5 / 6, 3 / 4, 1 / 2  # corpus-level clipped precisions; lengths equal -> no brevity penalty
    assert out["bleu_1"] == pytest.approx(p1, rel=1e-6)
    assert out["bleu_2"] == pytest.approx((p1 * p2) ** (1 / 2), rel=1e-6)
    assert out["bleu_3"] == pytest.approx((p1 * p2 * p3) ** (1 / 3), rel=1e-6)
    assert out["bleu_4"] == pytest.approx((p1 * p2 * p3 * p4) ** (1 / 4), rel=1e-6)
    # ROUGE-L: LCS 3 of 4 words (P = R = 0.75 -> F = 0.75) and 1.0, averaged.
    assert out["rouge_l"] == pytest.approx((0.75 + 1.0) / 2)
    # CIDEr-D: image 1 cosines per n = 3/4, 2/3, 1/2, 0 (all IDFs equal), image 2 = 1; x10, averaged.
    assert out["cider"] == pytest.approx((10 * (3 / 4 + 2 / 3 + 1 / 2 + 0) / 4 + 10) / 2)


def test_caption_scores_disjoint_is_zero():
    out = caption_scores(["p q r s t"], [["a b c d e"]], tokenizer="simple")
    assert out["bleu_1"] < 1e-6 and out["rouge_l"] == 0.0 and out["cider"] == 0.0


def test_caption_scores_validation():
    with pytest.raises(ValueError, match="one each"):
        caption_scores(["a"], [["a"], ["b"]])
    with pytest.raises(ValueError, match="tokenizer"):
        caption_scores(["a"], [["a"]], tokenizer="spacy")
    with pytest.raises(ValueError, match="no reference"):
        caption_scores(["a"], [[]])


def test_simple_tokenize():
    assert simple_tokenize("A Red-Circle,  isn't it?\n") == "a redcircle isnt it"


@pytest.mark.skipif(not HAS_JAVA, reason="the PTB tokenizer needs java")
def test_ptb_tokenize_matches_coco_preprocessing():
    out = ptb_tokenize(["A red Circle, and two blue squares.", "", "Hello world!"])
    assert out == ["a red circle and two blue squares", "", "hello world"]


@pytest.mark.slow
@pytest.mark.skipif(not HAS_JAVA, reason="METEOR needs java")
def test_meteor_optional():
    refs = [["a small red circle on the left"], ["two blue squares near one green triangle"]]
    good = caption_scores([r[0] for r in refs], refs, meteor=True)["meteor"]
    bad = caption_scores(["a large white square", "nothing here at all"], refs, meteor=True)["meteor"]
    assert good > 0.95 and bad < 0.3


# ------------------------------------------------------------------------------------ shapes attributes


def _scene(*objects):
    return {"shapes": [{"color": c, "size": z, "shape": s} for c, z, s in objects]}


def test_caption_attribute_f1_perfect_on_real_captions():
    samples = list(generate_split("test", 30))
    out = caption_attribute_f1([s["caption"] for s in samples], [s["scene"] for s in samples])
    assert out["precision"] == out["recall"] == out["f1"] == 1.0
    assert out["color_shape_f1"] == 1.0 and out["count_accuracy"] == 1.0
    assert out["stated_count_accuracy"] in (1.0, None)


def test_caption_attribute_f1_hand_case():
    scene = _scene(("red", "small", "circle"), ("blue", "large", "square"))
    caption = "a small red circle, a small blue square and a large green triangle."
    out = caption_attribute_f1([caption], [scene])
    # triples: 1 right of 3 predicted, 1 of 2 true -> P 1/3, R 1/2, F1 = 2 * (1/6) / (5/6) = 0.4
    assert out["precision"] == pytest.approx(1 / 3)
    assert out["recall"] == pytest.approx(1 / 2)
    assert out["f1"] == pytest.approx(0.4)
    # ignoring size: 2 of 3 predicted are right, both true found -> F1 = 2 * (2/3) / (5/3) = 0.8
    assert out["color_shape_f1"] == pytest.approx(0.8)
    assert out["count_accuracy"] == 0.0
    assert out["stated_count_accuracy"] is None


def test_caption_relation_mentions_and_counts():
    scene = _scene(("red", "small", "circle"), ("blue", "large", "square"))
    text = "two shapes: a small red circle and a large blue square. the red circle is left of the blue square."
    parsed = parse_shapes_caption(text)
    assert sorted(parsed["objects"]) == [("blue", "large", "square"), ("red", "small", "circle")]
    assert parsed["count"] == 2
    out = caption_attribute_f1([text], [scene])
    assert out["f1"] == 1.0 and out["stated_count_accuracy"] == 1.0
    # a wrong stated count, and a mention without size that names nothing else: counted with unknown size
    out = caption_attribute_f1(["three shapes: the red circle."], [scene])
    assert out["stated_count_accuracy"] == 0.0
    assert out["precision"] == 0.0 and out["color_shape_f1"] == pytest.approx(2 * 1 * 0.5 / 1.5)


# ------------------------------------------------------------------------------------------------- VQA


@pytest.mark.parametrize(
    "raw, norm",
    [
        ("Two.", "2"),
        ("the white circle", "white circle"),
        ("Yes!", "yes"),
        ("none", "0"),
        ("dont", "don't"),
        ("1,000", "1000"),
        ("3.5", "3.5"),
        ("  a  Red  square ", "red square"),
        ("left/right", "left right"),
        ("it's a dog", "it's dog"),
    ],
)
def test_normalize_answer(raw, norm):
    assert normalize_answer(raw) == norm


def test_vqa_accuracy_single_answers():
    assert vqa_accuracy(["2", "red", "yes"], ["two", "Red.", "no"])["accuracy"] == pytest.approx(2 / 3)
    samples = list(generate_split("test", 10))
    answers = [qa["answer"] for s in samples for qa in s["qa"]]
    assert vqa_accuracy(answers, answers)["accuracy"] == 1.0


def test_vqa_accuracy_by_question_kind():
    from training.evaluation.metrics import question_kind, vqa_accuracy_by_kind

    questions = ["how many circles are there?", "is there a red square?", "is there a blue circle?",
                 "what color is the triangle?", "what is left of the red circle?", "What shape is the blue object?"]
    preds, answers = ["2", "yes", "yes", "red", "nothing", "circle"], ["two", "yes", "no", "Red", "the square", "circle"]
    assert vqa_accuracy_by_kind(preds, answers, questions) == {
        "acc_count": 1.0, "acc_yes_no": 0.5, "acc_color": 1.0, "acc_relation": 0.0, "acc_shape": 1.0}
    kinds = {question_kind(qa["question"]) for s in generate_split("test", 30) for qa in s["qa"]}
    assert kinds == {"count", "yes/no", "color", "shape", "size", "relation"}  # every generated question has a kind
    with pytest.raises(ValueError, match="equally long"):
        vqa_accuracy_by_kind(["a"], ["a", "b"], ["q"])


def test_vqa_accuracy_ten_human_answers():
    # official formula, averaged over the 10 leave-one-out subsets of 9 answers
    three = ["red"] * 3 + ["blue"] * 7  # red answers see 2 matches (2/3), blue ones see 3 (1)
    one = ["red"] + ["blue"] * 9  # the red answer sees 0, the others 1 (1/3)
    four = ["red"] * 4 + ["blue"] * 6
    out = vqa_accuracy(["red", "Red", "the red"], [three, one, four])
    assert out["accuracy"] == pytest.approx(((3 * 2 / 3 + 7) / 10 + (9 / 3) / 10 + 1.0) / 3)
    assert out["num_questions"] == 3


# ----------------------------------------------------------------------------------------------- depth


def test_depth_metrics_perfect_and_hand_case():
    gt = np.array([[1.0, 2.0], [4.0, 8.0]], dtype=np.float32)
    perfect = depth_metrics(gt, gt)
    assert perfect["abs_rel"] == 0 and perfect["rmse"] == 0 and perfect["delta1"] == 1.0
    pred = np.array([[1.1, 2.0], [2.0, 8.0]])
    out = depth_metrics(pred, gt)
    assert out["abs_rel"] == pytest.approx((0.1 + 0 + 0.5 + 0) / 4)
    assert out["rmse"] == pytest.approx(math.sqrt((0.01 + 4.0) / 4))
    assert out["delta1"] == pytest.approx(3 / 4)  # ratios 1.1, 1, 2, 1
    masked = depth_metrics(pred, gt, valid_mask=np.array([[True, True], [False, True]]))
    assert masked["delta1"] == 1.0 and masked["abs_rel"] == pytest.approx(0.1 / 3) and masked["num_pixels"] == 3


def test_depth_invalid_ground_truth_is_ignored():
    gt = np.array([[0.0, 2.0], [np.nan, 4.0]])
    out = depth_metrics(np.array([[5.0, 2.0], [1.0, 4.0]]), gt)
    assert out["num_pixels"] == 2 and out["abs_rel"] == 0.0
    with pytest.raises(ValueError, match="no valid depth"):
        depth_metrics(np.ones((2, 2)), np.zeros((2, 2)))
    with pytest.raises(ValueError, match="shape"):
        depth_metrics(np.ones((2, 2)), np.ones((3, 3)))


def test_depth_accumulator_averages_per_image():
    gt = np.array([[1.0, 2.0], [4.0, 8.0]])
    acc = DepthAccumulator()
    acc.update(gt, gt)
    acc.update(np.array([[[1.1, 2.0], [2.0, 8.0]]]), gt[None])
    out = acc.compute()
    assert out["num_images"] == 2
    assert out["delta1"] == pytest.approx((1.0 + 0.75) / 2)
    assert out["abs_rel"] == pytest.approx(0.15 / 2)


# ---------------------------------------------------------------------------------------- segmentation


def test_segmentation_perfect_and_hand_case():
    gt = np.array([[0, 0], [1, 1]])
    assert segmentation_metrics(gt, gt, 2)["miou"] == 1.0
    pred = np.array([[0, 1], [1, 1]])
    out = segmentation_metrics(pred, gt, 3)
    # class 0: TP 1, FN 1 -> 1/2; class 1: TP 2, FP 1 -> 2/3; class 2 absent from both -> None, not averaged
    assert out["per_class_iou"] == [pytest.approx(0.5), pytest.approx(2 / 3), None]
    assert out["miou"] == pytest.approx(7 / 12)
    assert out["pixel_accuracy"] == pytest.approx(3 / 4)


def test_segmentation_ignore_out_of_range_and_names():
    gt = np.array([[0, 255], [1, 1]])
    pred = np.array([[7, 0], [1, 1]])  # 7 is no class: a miss for class 0, a false positive for nobody
    out = segmentation_metrics(pred, gt, 2, ignore_index=255, class_names=["bg", "circle"])
    assert out["per_class_iou"] == {"bg": 0.0, "circle": 1.0}
    assert out["num_pixels"] == 3 and out["pixel_accuracy"] == pytest.approx(2 / 3)
    with pytest.raises(ValueError, match="ground-truth class ids"):
        segmentation_metrics(np.zeros((2, 2), int), np.full((2, 2), 5), 2)
    with pytest.raises(TypeError, match="integer"):
        segmentation_metrics(np.zeros((2, 2)), np.zeros((2, 2), int), 2)


def test_segmentation_streaming_equals_batch():
    rng = np.random.default_rng(0)
    gt = rng.integers(0, 4, size=(6, 16, 16))
    pred = np.where(rng.random(gt.shape) < 0.8, gt, rng.integers(0, 4, size=gt.shape))
    acc = SegmentationAccumulator(4)
    for i in range(6):
        acc.update(pred[i], gt[i])
    assert acc.compute() == segmentation_metrics(pred, gt, 4)


# ------------------------------------------------------------------------------------------- detection


def _box(x0, y0, x1, y1, label, score=None):
    d = {"box": [x0, y0, x1, y1], "label": label}
    if score is not None:
        d["score"] = score
    return d


CLASSES = ["circle", "square", "triangle"]


def test_detection_map_perfect():
    gts = [[_box(0, 0, 10, 10, "circle"), _box(20, 20, 40, 30, "square")], [_box(5, 5, 25, 25, "triangle")]]
    preds = [[dict(b, score=0.9) for b in g] for g in gts]
    out = detection_map(preds, gts, CLASSES)
    assert out["map_50"] == pytest.approx(1.0) and out["map_50_95"] == pytest.approx(1.0)
    assert out["per_class_ap_50"]["square"] == pytest.approx(1.0)


def test_detection_map_shifted_box():
    # IoU of [2, 0, 12, 10] with [0, 0, 10, 10] = 80 / 120 = 2/3: a hit at IoU 0.50, 0.55, 0.60, 0.65 -> 4 of 10
    out = detection_map([[_box(2, 0, 12, 10, "circle", 0.9)]], [[_box(0, 0, 10, 10, "circle")]], CLASSES)
    assert out["map_50"] == pytest.approx(1.0)
    assert out["map_50_95"] == pytest.approx(0.4)
    assert out["per_class_ap_50"]["square"] is None  # no ground truth: not averaged


def test_detection_map_wrong_label_false_positive_and_empty():
    gt = [[_box(0, 0, 10, 10, "circle")]]
    assert detection_map([[_box(0, 0, 10, 10, "square", 0.9)]], gt, CLASSES)["map_50"] == 0.0
    # a higher-scored false positive before the hit: precision 1/2 at every recall level -> AP 0.5
    preds = [[_box(30, 30, 40, 40, "circle", 0.95), _box(0, 0, 10, 10, "circle", 0.5)]]
    assert detection_map(preds, gt, CLASSES)["map_50"] == pytest.approx(0.5)
    # ranked after the hit it costs nothing
    preds = [[_box(30, 30, 40, 40, "circle", 0.1), _box(0, 0, 10, 10, "circle", 0.5)]]
    assert detection_map(preds, gt, CLASSES)["map_50"] == pytest.approx(1.0)
    assert detection_map([[]], gt, CLASSES)["map_50"] == 0.0
    out = detection_map([[_box(0, 0, 10, 10, "hexagon", 0.9)]], gt, CLASSES)
    assert out["num_unknown_labels"] == 1 and out["map_50"] == 0.0
    with pytest.raises(ValueError, match="no ground-truth"):
        detection_map([[]], [[]], CLASSES)
    with pytest.raises(TypeError, match="score"):
        detection_map([[_box(0, 0, 1, 1, "circle")]], gt, CLASSES)


# ------------------------------------------------------------------------------------------ tokenizers


def test_reexported_reconstruction_metrics():
    a = np.zeros((4, 4, 3), dtype=np.uint8)
    assert psnr(a + 1, a) == pytest.approx(10 * math.log10(255**2))
    out = codebook_usage(np.array([0, 0, 1, 1]), 4)
    assert out["usage"] == 0.5 and out["perplexity"] == pytest.approx(2.0)
