"""The synthetic shapes dataset: ground truth is consistent across modalities and with the scene graph."""

from __future__ import annotations

import re

import numpy as np
import pytest

from training.data import shapes as S
from training.data.shapes import (
    COLORS,
    SEMSEG_CLASSES,
    SHAPES,
    generate_sample,
    generate_split,
    mentioned_attributes,
    relation,
    scene_attributes,
    split_seed,
)

SEEDS = list(range(60))


@pytest.fixture(scope="module")
def samples() -> list[dict]:
    return [generate_sample(seed) for seed in SEEDS]


def _full_mask(s: dict, resolution: int) -> np.ndarray:
    coords = np.arange(resolution, dtype=np.float32) + 0.5
    X, Y = np.meshgrid(coords, coords)
    return S._shape_mask(s["shape"], s["center"][0], s["center"][1], s["extent"], X, Y)


def _visible_masks(sample: dict) -> list[np.ndarray]:
    """Visible pixels per shape, recomputed independently from geometry and depth (nearest covering shape)."""
    scene = sample["scene"]
    r = scene["resolution"]
    full = [_full_mask(s, r) for s in scene["shapes"]]
    depths = np.array([s["depth"] for s in scene["shapes"]])
    stack = np.where(np.stack(full), depths[:, None, None], np.inf)  # (K, H, W)
    nearest = np.argmin(stack, axis=0)
    covered = np.isfinite(stack).any(axis=0)
    return [covered & (nearest == k) for k in range(len(full))]


def test_modalities_types_and_shapes(samples):
    for sample in samples:
        assert sample["rgb"].dtype == np.uint8 and sample["rgb"].shape == (64, 64, 3)
        assert sample["depth"].dtype == np.float32 and sample["depth"].shape == (64, 64)
        assert sample["semseg"].dtype == np.uint8 and sample["semseg"].shape == (64, 64)
        assert 1 <= len(sample["scene"]["shapes"]) <= 4
        assert isinstance(sample["caption"], str) and sample["caption"]
        assert len(sample["qa"]) >= 4
        assert sample["__key__"] and "." not in sample["__key__"]


def test_semseg_and_rgb_agree(samples):
    for sample in samples:
        scene = sample["scene"]
        bg = np.array(scene["background"]["color"], dtype=np.uint8)
        semseg, rgb = sample["semseg"], sample["rgb"]
        assert (rgb[semseg == 0] == bg).all()
        for k, name in enumerate(SEMSEG_CLASSES[1:], start=1):
            allowed = {COLORS[s["color"]] for s in scene["shapes"] if s["shape"] == name}
            pixels = {tuple(int(v) for v in p) for p in rgb[semseg == k]}
            assert pixels <= allowed, (name, pixels, allowed)
            if allowed:
                assert (semseg == k).any()
        # background colour is dark and distinct from every shape colour
        assert all(np.abs(np.array(c) - bg).max() > 100 for c in COLORS.values())


def test_depth_and_visibility_follow_occlusion(samples):
    for sample in samples:
        scene, depth, semseg, rgb = sample["scene"], sample["depth"], sample["semseg"], sample["rgb"]
        visible = _visible_masks(sample)
        covered = np.zeros_like(semseg, dtype=bool)
        for s, vis in zip(scene["shapes"], visible, strict=True):
            # where a shape is visible: its depth (the minimum over covering shapes), its colour and class
            assert np.all(depth[vis] == np.float32(s["depth"]))
            assert (rgb[vis] == COLORS[s["color"]]).all()
            assert (semseg[vis] == SEMSEG_CLASSES.index(s["shape"])).all()
            assert int(vis.sum()) == s["visible_pixels"]
            assert s["visible_pixels"] >= S.MIN_VISIBLE_PIXELS
            assert s["visible_pixels"] >= S.MIN_VISIBLE_FRACTION * s["area"]
            covered |= vis
        assert np.all(depth[~covered] == S.BACKGROUND_DEPTH)
        assert np.all(semseg[~covered] == 0)
        assert depth.max() <= S.BACKGROUND_DEPTH and depth.min() >= S.SHAPE_DEPTH_RANGE[0]


def test_boxes_are_tight_around_visible_pixels(samples):
    for sample in samples:
        shapes = sample["scene"]["shapes"]
        assert len(sample["boxes"]) == len(shapes)
        for b, s, vis in zip(sample["boxes"], shapes, _visible_masks(sample), strict=True):
            assert b["label"] == s["shape"] and b["box"] == s["box"]
            x0, y0, x1, y1 = (int(v) for v in b["box"])
            inside = np.zeros_like(vis)
            inside[y0:y1, x0:x1] = True
            assert not (vis & ~inside).any(), "a visible pixel lies outside the box"
            # tight: every border row/column of the box holds a visible pixel
            assert vis[y0, x0:x1].any() and vis[y1 - 1, x0:x1].any()
            assert vis[y0:y1, x0].any() and vis[y0:y1, x1 - 1].any()


def test_captions_mention_exactly_the_shapes_present(samples):
    for sample in samples:
        present = set(scene_attributes(sample["scene"]))
        mentioned = mentioned_attributes(sample["caption"])
        with_size = {(c, z, s) for z, c, s in mentioned if z is not None}
        assert with_size == present, sample["caption"]
        assert {(c, s) for _, c, s in mentioned} == {(c, s) for c, _, s in present}
        # a relation sentence, if any, is true
        m = re.search(r"the (\w+) (\w+) is (left of|right of|above|below) the (\w+) (\w+)\.", sample["caption"])
        if m:
            by_name = {(s["color"], s["shape"]): s for s in sample["scene"]["shapes"]}
            a, b = by_name[(m.group(1), m.group(2))], by_name[(m.group(4), m.group(5))]
            assert m.group(3) in relation(a, b, 64)
    assert len({re.sub(r"\W.*", "", s["caption"]) for s in samples}) >= 4, "captions should use several templates"


def _answer(question: str, shapes: list[dict], resolution: int) -> str | None:
    """Independent re-implementation of the answers from the scene graph."""
    words = question.rstrip("?").split()
    if m := re.fullmatch(r"what color is the (?:(small|large) )?(\w+)\?", question):
        hits = [s for s in shapes if s["shape"] == m.group(2) and m.group(1) in (None, s["size"])]
        assert len(hits) == 1, question
        return hits[0]["color"]
    if m := re.fullmatch(r"what size is the (\w+) (\w+)\?", question):
        (hit,) = [s for s in shapes if (s["color"], s["shape"]) == m.groups()]
        return hit["size"]
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        (hit,) = [s for s in shapes if s["color"] == m.group(1)]
        return hit["shape"]
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        kind = m.group(1)
        return str(len(shapes) if kind == "shape" else sum(s["shape"] == kind for s in shapes))
    if m := re.fullmatch(r"is there an? (\w+) (\w+)\?", question):
        return "yes" if any((s["color"], s["shape"]) == m.groups() for s in shapes) else "no"
    if m := re.fullmatch(r"what is (left of|right of|above|below) the (\w+) (\w+)\?", question):
        (ref,) = [s for s in shapes if (s["color"], s["shape"]) == (m.group(2), m.group(3))]
        hits = [s for s in shapes if s is not ref and m.group(1) in relation(s, ref, resolution)]
        assert len(hits) <= 1, question
        return f"the {hits[0]['color']} {hits[0]['shape']}" if hits else "nothing"
    raise AssertionError(f"unexpected question {question!r} ({words})")


def test_qa_answers_agree_with_scene_graph(samples):
    kinds = set()
    answers = set()
    for sample in samples:
        shapes = sample["scene"]["shapes"]
        questions = [p["question"] for p in sample["qa"]]
        assert len(set(questions)) == len(questions)
        for pair in sample["qa"]:
            assert pair["answer"] == _answer(pair["question"], shapes, 64), pair
            assert len(pair["answer"].split()) <= 4
            kinds.add(" ".join(pair["question"].split()[:2]))
            answers.add(pair["answer"])
    assert {"what color", "how many", "is there", "what is"} <= kinds
    assert {"yes", "no", "nothing"} <= answers and any(a.startswith("the ") for a in answers)


def test_relation_questions_ignore_ambiguous_layouts():
    a = {"center": [10.0, 30.0]}
    b = {"center": [12.0, 10.0]}
    assert relation(a, b, 64) == ["below"]  # |dx| = 2 px is within the margin: neither left nor right
    assert relation(b, a, 64) == ["above"]
    assert relation({"center": [50.0, 30.0]}, b, 64) == ["right of", "below"]


def test_same_seed_same_sample_and_different_seeds_differ():
    a, b, c = generate_sample(123), generate_sample(123), generate_sample(124)
    for k in ("rgb", "depth", "semseg"):
        assert np.array_equal(a[k], b[k])
    assert a["scene"] == b["scene"] and a["caption"] == b["caption"] and a["qa"] == b["qa"]
    assert not np.array_equal(a["rgb"], c["rgb"]) or a["scene"] != c["scene"]
    assert len({generate_sample(s)["rgb"].tobytes() for s in range(20)}) == 20


@pytest.mark.parametrize("resolution", [32, 128])
def test_other_resolutions(resolution):
    for seed in range(8):
        sample = generate_sample(seed, resolution)
        assert sample["rgb"].shape == (resolution, resolution, 3)
        assert sample["semseg"].shape == sample["depth"].shape == (resolution, resolution)
        assert sample["scene"]["resolution"] == resolution
        for b, vis in zip(sample["boxes"], _visible_masks(sample), strict=True):
            assert vis.any() and b["box"][2] <= resolution and b["box"][3] <= resolution


def test_splits_are_disjoint_and_deterministic():
    seeds = {split: {split_seed(split, i) for i in (0, 1, 9_999_999)} for split in S.SPLITS}
    assert not (seeds["train"] & seeds["val"]) and not (seeds["val"] & seeds["test"])
    assert not (seeds["train"] & seeds["test"])
    val = [s["__key__"] for s in generate_split("val", 3)]
    assert val == [generate_sample(split_seed("val", i))["__key__"] for i in range(3)]
    assert not set(val) & {s["__key__"] for s in generate_split("train", 3)}
    with pytest.raises(ValueError, match="split"):
        split_seed("dev", 0)
    with pytest.raises(ValueError):
        split_seed("train", 10_000_000)


def test_user_errors():
    with pytest.raises(ValueError, match="resolution"):
        generate_sample(0, 8)
    with pytest.raises(TypeError):
        generate_sample(0, 64.0)
    with pytest.raises(ValueError, match="seed"):
        generate_sample(-1)


def test_attribute_coverage():
    seen = {a for seed in range(300) for a in scene_attributes(generate_sample(seed, 32)["scene"])}
    assert {c for c, _, _ in seen} == set(COLORS)
    assert {s for _, _, s in seen} == set(SHAPES)
    assert {z for _, z, _ in seen} == set(S.SIZES)


def test_make_shapes_dataset_is_cached(tmp_path):
    out = tmp_path / "shapes"
    meta = S.make_shapes_dataset(out, 5, 2, 2, resolution=32, samples_per_shard=3, progress=False)
    assert not meta["cached"] and meta["splits"] == {"train": 5, "val": 2, "test": 2}
    assert sorted(p.name for p in (out / "train").iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    mtime = (out / "train" / "shard-000000.tar").stat().st_mtime_ns
    again = S.make_shapes_dataset(out, 5, 2, 2, resolution=32, samples_per_shard=3, progress=False)
    assert again["cached"] and (out / "train" / "shard-000000.tar").stat().st_mtime_ns == mtime
    other = S.make_shapes_dataset(out, 4, 2, 2, resolution=32, samples_per_shard=3, progress=False)
    assert not other["cached"] and other["splits"]["train"] == 4
    (out / "val" / "shard-000000.tar").unlink()  # damaged dataset -> regenerated
    assert not S.make_shapes_dataset(out, 4, 2, 2, resolution=32, samples_per_shard=3, progress=False)["cached"]


def test_depth_follows_the_ground_plane():
    """Depth is readable from the image: each shape's depth is that of its base line (lower = nearer)."""
    from training.data.shapes import SHAPE_DEPTH_RANGE, generate_split, shape_depth

    for sample in generate_split("val", 40):
        shapes = sample["scene"]["shapes"]
        for s in shapes:
            expected = shape_depth(s["center"][1] + s["extent"], 64)
            assert s["depth"] == expected and SHAPE_DEPTH_RANGE[0] <= expected <= SHAPE_DEPTH_RANGE[1]
        bases = [s["center"][1] + s["extent"] for s in shapes]
        order_by_base = sorted(range(len(shapes)), key=lambda i: -bases[i])
        order_by_depth = sorted(range(len(shapes)), key=lambda i: shapes[i]["depth"])
        assert order_by_base == order_by_depth
    assert shape_depth(64, 64) == SHAPE_DEPTH_RANGE[0] and shape_depth(0, 64) == SHAPE_DEPTH_RANGE[1]
