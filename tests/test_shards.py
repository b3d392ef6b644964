"""Webdataset shards: round trip, crash-safe writing, reader order / resizing / corrupt data."""

from __future__ import annotations

import io
import logging
import tarfile

import numpy as np
import pytest
import webdataset as wds

from training.data.reader import iter_samples, load_samples, make_pipeline, resize_sample, resolve_shards
from training.data.shapes import generate_sample
from training.data.shards import (
    decode_sample,
    encode_sample,
    read_meta,
    validate_sample,
    write_meta,
    write_shards,
)

ARRAYS = ("rgb", "depth", "semseg")


def _samples(n: int, resolution: int = 32, start: int = 0) -> list[dict]:
    return [generate_sample(seed, resolution) for seed in range(start, start + n)]


def _assert_equal(a: dict, b: dict) -> None:
    assert a["__key__"] == b["__key__"]
    for k in ARRAYS:
        assert a[k].dtype == b[k].dtype and a[k].shape == b[k].shape
        assert a[k].tobytes() == b[k].tobytes()  # bit-equal
    for k in ("boxes", "caption", "qa", "scene"):
        assert a[k] == b[k], k


@pytest.fixture(scope="module")
def shard_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("shards")
    samples = _samples(10)
    paths = write_shards(samples, out, samples_per_shard=4, progress=False)
    return out, samples, paths


def test_encode_decode_round_trip():
    sample = generate_sample(7)
    files = encode_sample(sample)
    assert set(files) == {"__key__", "rgb.png", "depth.npy", "semseg.png", "boxes.json", "caption.txt", "qa.json",
                          "scene.json"}
    assert all(isinstance(v, bytes) for k, v in files.items() if k != "__key__")
    _assert_equal(decode_sample(files), sample)


def test_write_read_round_trip(shard_dir):
    out, samples, paths = shard_dir
    assert [p.name for p in paths] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    assert not list(out.glob("*.incomplete"))
    with tarfile.open(paths[0]) as tar:
        names = tar.getnames()
    assert len(names) == 4 * 7 and "shapes_000000000.rgb.png" in names
    got = load_samples(out)
    assert len(got) == len(samples)
    for a, b in zip(got, samples, strict=True):
        _assert_equal(a, b)


def test_shards_are_reproducible(tmp_path):
    a = write_shards(_samples(3), tmp_path / "a", progress=False)
    b = write_shards(_samples(3), tmp_path / "b", progress=False)
    assert a[0].read_bytes() == b[0].read_bytes()


def test_subset_of_modalities_round_trips(tmp_path):
    sample = {"__key__": "only_text", "caption": "a red circle", "qa": [{"question": "q?", "answer": "a"}]}
    write_shards([sample], tmp_path, progress=False)
    (got,) = load_samples(tmp_path)
    assert {k: v for k, v in got.items() if k != "__url__"} == sample
    assert load_samples(tmp_path, modalities=["rgb"]) == []  # none of the requested modalities


def test_reader_order_is_seeded(shard_dir):
    out, samples, _ = shard_dir
    file_order = [s["__key__"] for s in samples]
    assert [s["__key__"] for s in iter_samples(out)] == file_order
    a = [s["__key__"] for s in iter_samples(out, shuffle_seed=3, shuffle_buffer=5)]
    b = [s["__key__"] for s in iter_samples(out, shuffle_seed=3, shuffle_buffer=5)]
    c = [s["__key__"] for s in iter_samples(out, shuffle_seed=4, shuffle_buffer=5)]
    assert a == b and sorted(a) == sorted(file_order)
    assert a != file_order and a != c


def test_reader_resizes_and_selects_modalities(shard_dir):
    out, samples, _ = shard_dir
    got = load_samples(out, limit=3, resolution=16, modalities=["rgb", "semseg", "depth", "boxes"])
    assert len(got) == 3
    for g, s in zip(got, samples, strict=False):
        assert set(g) == {"__key__", "__url__", "rgb", "semseg", "depth", "boxes"}
        assert g["rgb"].shape == (16, 16, 3) and g["rgb"].dtype == np.uint8
        assert g["semseg"].shape == (16, 16) and set(np.unique(g["semseg"])) <= {0, 1, 2, 3}
        # nearest neighbour keeps exact depth values of the original
        assert set(np.unique(g["depth"])) <= set(np.unique(s["depth"]))
        for gb, sb in zip(g["boxes"], s["boxes"], strict=True):
            assert gb["label"] == sb["label"] and gb["box"] == [v / 2 for v in sb["box"]]
    up = load_samples(out, limit=1, resolution=64)[0]
    assert up["rgb"].shape == (64, 64, 3) and up["semseg"].shape == (64, 64)
    validate_sample(up)


def test_resize_non_square_crops_centre_and_clips_boxes():
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, 30:] = 255
    semseg = np.zeros((20, 40), np.uint8)
    semseg[:, 30:] = 5
    boxes = [{"box": [0.0, 0.0, 5.0, 5.0], "label": "gone"}, {"box": [25.0, 5.0, 40.0, 15.0], "label": "cut"}]
    out = resize_sample({"__key__": "k", "rgb": rgb, "semseg": semseg, "boxes": boxes}, 10)
    assert out["rgb"].shape == (10, 10, 3) and out["semseg"].shape == (10, 10)
    # scale 0.5 -> 20x10, centre crop x in [5, 15): original columns 10..30
    assert out["boxes"] == [{"box": [7.5, 2.5, 10.0, 7.5], "label": "cut"}]
    assert set(np.unique(out["semseg"])) <= {0, 5}


def _write_raw(path, entries):
    with open(path, "wb") as f:
        writer = wds.TarWriter(f, encoder=False)
        for e in entries:
            writer.write(e)
        writer.close()


def test_corrupt_samples_are_skipped_with_a_warning(tmp_path, caplog):
    good = [encode_sample(s) for s in _samples(3)]
    bad_png = dict(good[1], **{"rgb.png": b"not a png"})
    bad_json = {"__key__": "badjson", "qa.json": b"{oops"}
    bad_size = dict(encode_sample(generate_sample(5, 16)), **{"rgb.png": good[0]["rgb.png"]})  # 32 vs 16
    _write_raw(tmp_path / "shard-000000.tar", [good[0], bad_png, bad_json, bad_size, good[2]])
    with caplog.at_level(logging.WARNING):
        got = load_samples(tmp_path)
    assert [s["__key__"] for s in got] == [good[0]["__key__"], good[2]["__key__"]]
    text = caplog.text
    assert "skipping corrupt sample" in text and "badjson" in text and good[1]["__key__"] in text
    assert "disagree" in text


def test_truncated_shard_is_skipped_with_a_warning(tmp_path, caplog):
    (path,) = write_shards(_samples(4), tmp_path, progress=False)
    data = path.read_bytes()
    with tarfile.open(path) as tar:
        cut = tar.getmember("shapes_000000002.depth.npy").offset_data + 10  # inside sample 2's depth file
    path.write_bytes(data[:cut])
    everything = ["rgb", "depth", "semseg", "boxes", "caption", "qa", "scene"]
    with caplog.at_level(logging.WARNING):
        got = load_samples(tmp_path, require=everything)
    assert [s["__key__"] for s in got] == ["shapes_000000000", "shapes_000000001"]
    assert "skipping corrupt shard data" in caplog.text and "missing required modalities" in caplog.text
    partial = load_samples(tmp_path)  # without require, the cut sample keeps the files it has
    assert len(partial) == 3 and "rgb" not in partial[2]


def test_interrupted_write_leaves_nothing_new(tmp_path):
    def broken():
        yield from _samples(5)
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):  # all or nothing: no shard, not even the directory
        write_shards(broken(), tmp_path / "new" / "train", samples_per_shard=2, progress=False)
    assert list(tmp_path.iterdir()) == []
    write_shards(_samples(3), tmp_path, samples_per_shard=2, progress=False)
    with pytest.raises(RuntimeError, match="boom"):  # overwrite that fails keeps the old shards
        write_shards(broken(), tmp_path, samples_per_shard=2, progress=False, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["shard-000000.tar", "shard-000001.tar"]
    assert len(load_samples(tmp_path)) == 3


def test_write_shards_refuses_existing_shards_and_bad_samples(tmp_path):
    write_shards(_samples(1), tmp_path, progress=False)
    with pytest.raises(ValueError, match="already holds"):
        write_shards(_samples(1), tmp_path, progress=False)
    write_shards(_samples(2, start=5), tmp_path, progress=False, overwrite=True)
    assert [s["__key__"] for s in load_samples(tmp_path)] == ["shapes_000000005", "shapes_000000006"]
    with pytest.raises(ValueError, match="duplicate"):
        write_shards(_samples(1) * 2, tmp_path / "dup", progress=False)
    assert not (tmp_path / "dup").exists()
    bad = dict(generate_sample(0), depth=np.zeros((32, 32), np.float64))
    with pytest.raises(ValueError, match="float32"):
        encode_sample(bad)
    with pytest.raises(ValueError, match="unknown modality"):
        encode_sample({"__key__": "x", "rgbb": 1})


def test_resolve_shards(tmp_path, shard_dir):
    out, _, paths = shard_dir
    assert resolve_shards(out) == [str(p) for p in paths]
    assert resolve_shards(str(out / "shard-00000[01].tar")) == [str(p) for p in paths[:2]]
    assert resolve_shards(str(out / "shard-{000001..000002}.tar")) == [str(p) for p in paths[1:]]
    assert resolve_shards([paths[2], paths[0]]) == [str(paths[2]), str(paths[0])]
    (tmp_path / "root" / "train").mkdir(parents=True)
    (tmp_path / "root" / "train" / "shard-000000.tar").write_bytes(paths[0].read_bytes())
    with pytest.raises(ValueError, match="root/train"):
        resolve_shards(tmp_path / "root")
    with pytest.raises(FileNotFoundError):
        resolve_shards(tmp_path / "missing")
    with pytest.raises(FileNotFoundError):
        resolve_shards(str(tmp_path / "*.tar"))
    (tmp_path / "shard-000000.tar.incomplete").write_bytes(b"partial")
    with pytest.raises(FileNotFoundError):  # incomplete shards are never read
        resolve_shards(tmp_path)
    with pytest.raises(ValueError, match="unknown modalities"):
        make_pipeline(out, modalities=["pixels"])


def test_meta_round_trip(tmp_path):
    write_meta(tmp_path, {"name": "x", "splits": {"train": 3}, "n": np.int64(3)})
    assert read_meta(tmp_path) == {"name": "x", "splits": {"train": 3}, "n": 3}
    with pytest.raises(FileNotFoundError):
        read_meta(tmp_path / "nope")
    (tmp_path / "meta.json").write_text("[1, 2")
    with pytest.raises(ValueError):
        read_meta(tmp_path)


def test_dataloader_workers_split_shards(shard_dir):
    torch = pytest.importorskip("torch")
    out, samples, _ = shard_dir
    loader = torch.utils.data.DataLoader(make_pipeline(out, shuffle_seed=1), batch_size=None, num_workers=2)
    keys = [s["__key__"] for s in loader]
    assert sorted(keys) == sorted(s["__key__"] for s in samples)  # each sample exactly once


def test_depth_is_stored_exactly():
    # depth stays float32 exactly through .npy (no quantisation)
    depth = np.random.default_rng(0).uniform(0, 10, size=(8, 8)).astype(np.float32)
    files = encode_sample({"__key__": "d", "depth": depth})
    assert np.load(io.BytesIO(files["depth.npy"])).tobytes() == depth.tobytes()
