"""The text -> image judge: right on real shapes images, robust to noise, and scoring requests correctly."""

import numpy as np
import pytest

from training.data.shapes import COLORS, generate_split
from training.evaluation.judge import (
    JudgeConfig,
    attribute_accuracy,
    judge_accuracy_on_real,
    judge_image,
    requested_objects,
)
from training.evaluation.judge import _components  # the numpy connected components


@pytest.fixture(scope="module")
def real():
    return list(generate_split("test", 50, resolution=64))


def test_judge_is_right_on_real_images(real):
    out = judge_accuracy_on_real(real)
    print(f"judge on 50 real test images: scene accuracy {out['scene_accuracy']:.3f}, "
          f"object precision {out['object_precision']:.3f}, recall {out['object_recall']:.3f}")  # fmt: skip
    assert out["num_images"] == 50
    assert out["scene_accuracy"] >= 0.95, out["errors"]
    assert out["object_precision"] >= 0.97 and out["object_recall"] >= 0.97


def test_judge_tolerates_noise(real):
    rng = np.random.default_rng(0)
    noisy = []
    for s in real[:20]:
        rgb = np.clip(s["rgb"].astype(float) + rng.normal(0, 15, s["rgb"].shape), 0, 255).astype(np.uint8)
        noisy.append({**s, "rgb": rgb})
    assert judge_accuracy_on_real(noisy)["scene_accuracy"] >= 0.9


def _canvas(size=64, bg=(30, 30, 30)):
    img = np.empty((size, size, 3), dtype=np.uint8)
    img[:] = bg
    return img


def test_judge_hand_drawn_shapes():
    assert judge_image(_canvas()) == []
    img = _canvas()
    img[10:24, 10:24] = COLORS["red"]  # 14 px square: half-size 7 / 64 = 0.11 -> small
    yy, xx = np.mgrid[0:64, 0:64]
    img[(xx + 0.5 - 44) ** 2 + (yy + 0.5 - 40) ** 2 <= 12**2] = COLORS["blue"]  # radius 12 / 64 = 0.19 -> large
    objs = judge_image(img)
    got = sorted((o["color"], o["size"], o["shape"]) for o in objs)
    assert got == [("blue", "large", "circle"), ("red", "small", "square")]
    blue = next(o for o in objs if o["color"] == "blue")
    assert blue["center"] == [pytest.approx(44, abs=0.6), pytest.approx(40, abs=0.6)]
    assert blue["extent"] == pytest.approx(12, abs=0.6)


def test_judge_sees_a_square_behind_a_circle():
    img = _canvas()
    img[14:42, 14:42] = COLORS["yellow"]  # large square, its lower-right corner hidden by a nearer circle
    yy, xx = np.mgrid[0:64, 0:64]
    img[(xx + 0.5 - 42) ** 2 + (yy + 0.5 - 42) ** 2 <= 9**2] = COLORS["green"]
    got = sorted((o["color"], o["shape"]) for o in judge_image(img))
    assert got == [("green", "circle"), ("yellow", "square")]


def test_judge_ignores_specks_and_thin_strips():
    img = _canvas()
    img[5:7, 5:7] = COLORS["red"]  # 4 px speck
    img[40, 10:50] = COLORS["purple"]  # 1 px wide strip
    assert judge_image(img) == []


def test_components():
    m = np.zeros((10, 10), dtype=bool)
    m[1:3, 1:3] = True
    m[5:9, 5:9] = True
    m[0, 9] = True
    comps = _components(m)
    assert [int(c.sum()) for c in comps] == [16, 4, 1]
    assert not (comps[0] & comps[1]).any()


def test_attribute_accuracy_real_vs_wrong(real):
    imgs = [s["rgb"] for s in real[:20]]
    scenes = [s["scene"] for s in real[:20]]
    right = attribute_accuracy(imgs, scenes)
    assert right["accuracy"] == 1.0 and right["exact_accuracy"] == 1.0 and right["object_accuracy"] == 1.0
    captions = attribute_accuracy(imgs, [s["caption"] for s in real[:20]])  # prompts parsed like captions
    assert captions["accuracy"] == 1.0 and captions["size_accuracy"] == 1.0
    shifted = attribute_accuracy(imgs, scenes[1:] + scenes[:1])  # every image judged against another scene
    assert shifted["accuracy"] <= 0.2
    blank = attribute_accuracy([_canvas()] * 3, scenes[:3])
    assert blank["accuracy"] == 0.0 and blank["object_accuracy"] == 0.0 and blank["count_accuracy"] == 0.0


def test_attribute_accuracy_hand_case():
    img = _canvas()
    yy, xx = np.mgrid[0:64, 0:64]
    img[(xx + 0.5 - 20) ** 2 + (yy + 0.5 - 20) ** 2 <= 6.5**2] = COLORS["red"]  # a small red circle only
    out = attribute_accuracy([img], ["a small red circle and a large blue square."])
    assert out["accuracy"] == 0.0 and out["exact_accuracy"] == 0.0
    assert out["object_accuracy"] == 0.5 and out["color_accuracy"] == 0.5 and out["shape_accuracy"] == 0.5
    assert out["size_accuracy"] == 1.0 and out["count_accuracy"] == 0.0
    out = attribute_accuracy([img], ["a large red circle."])  # right object, wrong size
    assert out["accuracy"] == 1.0 and out["exact_accuracy"] == 0.0 and out["size_accuracy"] == 0.0


def test_validation():
    with pytest.raises(ValueError, match="size_threshold"):
        JudgeConfig(size_threshold=0)
    with pytest.raises(ValueError, match="rgb image"):
        judge_image(np.zeros((64, 64)))
    with pytest.raises(ValueError, match="one each"):
        attribute_accuracy([_canvas()], [])
    with pytest.raises(TypeError, match="prompt string or a shapes scene"):
        requested_objects(42)
