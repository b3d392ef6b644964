"""Bring-your-own-data converter and the ``onemodel data`` CLI."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tarfile
import textwrap
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from PIL import Image

from onemodel.cli import main
from training.data import convert as convert_module
from training.data.convert import convert_image_folder
from training.data.reader import load_samples, resolve_shards
from training.data.shards import read_meta

REPO = Path(__file__).resolve().parents[1]


def _image(path: Path, size=(12, 8), value=(200, 10, 10)) -> np.ndarray:
    arr = np.zeros((size[1], size[0], 3), np.uint8)
    arr[:] = value
    arr[0, 0] = (0, 0, 0)
    Image.fromarray(arr).save(path)
    return arr


def _write_rows(folder: Path, rows: list) -> None:
    lines = [r if isinstance(r, str) else json.dumps(r) for r in rows]
    (folder / "metadata.jsonl").write_text("\n".join(lines) + "\n")


@pytest.fixture
def folder(tmp_path) -> SimpleNamespace:
    """A folder with 4 good rows (varied modality subsets) and 9 bad ones."""
    d = tmp_path / "images"
    d.mkdir()
    full = _image(d / "full.png")
    depth = np.linspace(0.5, 4.0, 96, dtype=np.float32).reshape(8, 12)
    np.save(d / "full_depth.npy", depth)
    seg = np.zeros((8, 12), np.uint8)
    seg[2:6, 3:9] = 2
    Image.fromarray(seg).save(d / "full_seg.png")
    _image(d / "text.jpg", value=(10, 200, 10))
    _image(d / "plain.png", value=(10, 10, 200))
    _image(d / "mm.png", value=(100, 100, 100))
    Image.fromarray((depth * 1000).astype(np.uint16)).save(d / "mm_depth.png")
    (d / "sub").mkdir()
    _image(d / "sub" / "nested.png")
    (d / "garbage.png").write_bytes(b"this is not an image")
    np.save(d / "small_depth.npy", np.ones((4, 4), np.float32))
    Image.fromarray(np.zeros((8, 12, 3), np.uint8)).save(d / "rgb_seg.png")
    _write_rows(
        d,
        [
            {"file_name": "full.png", "caption": "a red image", "qa": [{"question": "color?", "answer": "red"}],
             "depth_file": "full_depth.npy", "semseg_file": "full_seg.png",
             "boxes": [{"box": [3, 2, 9, 6], "label": "thing"}], "extra_column": 1},
            {"file_name": "text.jpg", "text": "a green image"},  # 2
            {"file_name": "plain.png"},  # 3
            {"file_name": "missing.png", "caption": "gone"},  # 4
            {"file_name": "garbage.png"},  # 5
            {"file_name": "plain.png", "caption": 5},  # 6
            {"file_name": "plain.png", "qa": "what?"},  # 7
            {"file_name": "plain.png", "depth_file": "small_depth.npy"},  # 8
            '{"file_name": "plain.png", "caption": ',  # 9 malformed JSON
            {"caption": "no file name"},  # 10
            {"file_name": "plain.png", "boxes": [{"box": [0, 0, 50, 5], "label": "x"}]},  # 11
            {"file_name": "plain.png", "semseg_file": "rgb_seg.png"},  # 12
            {"file_name": "mm.png", "depth_file": "mm_depth.png"},  # 13 good: 16-bit png in millimetres
            {"file_name": "sub/nested.png", "caption": "nested"},  # 14 good
        ],
    )
    return SimpleNamespace(path=d, rgb=full, depth=depth, seg=seg)


def test_convert_keeps_good_rows_and_reports_bad_ones(folder, tmp_path):
    out = tmp_path / "out"
    report = convert_image_folder(folder.path, out, samples_per_shard=2, progress=False)
    assert report.written == 5
    reasons = {line: (name, reason) for line, name, reason in report.skipped}
    assert sorted(reasons) == [4, 5, 6, 7, 8, 9, 10, 11, 12]
    assert "not found" in reasons[4][1] and reasons[4][0] == "missing.png"
    assert "unreadable image" in reasons[5][1]
    assert "caption must be a string" in reasons[6][1]
    assert "qa must be a list" in reasons[7][1]
    assert "4x4" in reasons[8][1] and "8x12" in reasons[8][1]
    assert "malformed JSON" in reasons[9][1]
    assert "file_name" in reasons[10][1]
    assert "outside" in reasons[11][1]
    assert "mode RGB" in reasons[12][1]
    summary = report.summary()
    assert "wrote 5 sample(s)" in summary and "line 8: plain.png" in summary

    assert [p.name for p in report.shards] == ["shard-000000.tar", "shard-000001.tar", "shard-000002.tar"]
    samples = {s["__key__"]: s for s in load_samples(out)}
    assert sorted(samples) == ["full", "mm", "plain", "sub_nested", "text"]
    full = samples["full"]
    assert np.array_equal(full["rgb"], folder.rgb)
    assert full["depth"].tobytes() == folder.depth.tobytes()
    assert np.array_equal(full["semseg"], folder.seg)
    assert full["caption"] == "a red image" and full["qa"] == [{"question": "color?", "answer": "red"}]
    assert full["boxes"] == [{"box": [3, 2, 9, 6], "label": "thing"}]
    assert set(samples["text"]) == {"__key__", "__url__", "rgb", "caption"} and samples["text"]["caption"] == "a green image"
    assert set(samples["plain"]) == {"__key__", "__url__", "rgb"}
    expected_mm = (folder.depth * 1000).astype(np.uint16).astype(np.float32) / 1000.0
    np.testing.assert_allclose(samples["mm"]["depth"], expected_mm, atol=1e-6)

    meta = read_meta(out)
    assert meta["num_samples"] == 5 and meta["skipped"] == 9 and meta["complete"]
    assert meta["modalities"] == {"rgb": 5, "caption": 3, "qa": 1, "depth": 2, "semseg": 1, "boxes": 1}
    assert meta["semseg_classes"] == ["0", "1", "2"] and meta["box_classes"] == ["thing"]


def test_convert_resizes(folder, tmp_path):
    report = convert_image_folder(folder.path, tmp_path / "out", resolution=6, progress=False)
    assert report.written == 5
    for s in load_samples(tmp_path / "out"):
        assert s["rgb"].shape == (6, 6, 3)
        for k in ("depth", "semseg"):
            if k in s:
                assert s[k].shape == (6, 6)
    assert read_meta(tmp_path / "out")["resolution"] == 6


def test_nothing_valid_raises(tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    (d / "x.png").write_bytes(b"nope")
    _write_rows(d, [{"file_name": "x.png"}, {"file_name": "y.png"}, "{"])
    with pytest.raises(ValueError, match="no valid sample"):
        convert_image_folder(d, tmp_path / "out", progress=False)
    assert not list((tmp_path / "out").glob("*.tar")) and not (tmp_path / "out" / "meta.json").exists()
    with pytest.raises(FileNotFoundError):
        convert_image_folder(tmp_path / "absent", tmp_path / "out2", progress=False)


def test_folder_without_metadata_is_rgb_only(tmp_path):
    d = tmp_path / "imgs"
    d.mkdir()
    for name in ("a.png", "b.jpg"):
        _image(d / name)
    (d / "notes.txt").write_text("ignored")
    report = convert_image_folder(d, tmp_path / "out", progress=False)
    assert report.written == 2 and not report.skipped
    assert sorted(s["__key__"] for s in load_samples(tmp_path / "out")) == ["a", "b"]


def test_interrupted_conversion_by_exception(folder, tmp_path, monkeypatch):
    real = convert_module._load_image
    calls = {"n": 0}

    def flaky(path):
        calls["n"] += 1
        if calls["n"] == 4:
            raise RuntimeError("disk on fire")
        return real(path)

    monkeypatch.setattr(convert_module, "_load_image", flaky)
    out = tmp_path / "out"
    with pytest.raises(RuntimeError, match="disk on fire"):
        convert_image_folder(folder.path, out, samples_per_shard=2, progress=False)
    # 3 images loaded (full, text, plain) -> one complete shard of 2, then the failure: all or nothing, so
    # neither that shard nor the output directory is left behind
    assert not out.exists()


def test_interrupted_conversion_by_sigkill(folder, tmp_path):
    """A process killed mid-conversion leaves no shard-*.tar at all (only ignored .incomplete files)."""
    out, flag = tmp_path / "out", tmp_path / "stalled"
    script = textwrap.dedent(
        f"""
        import time
        from pathlib import Path
        from training.data import convert
        real, n = convert._load_image, [0]
        def slow(path):
            n[0] += 1
            if n[0] == 4:  # the 3rd sample is in the 2nd shard: stall there
                Path({str(flag)!r}).write_text("x")
                time.sleep(120)
            return real(path)
        convert._load_image = slow
        convert.convert_image_folder({str(folder.path)!r}, {str(out)!r}, samples_per_shard=2, progress=False)
        """
    )
    env = dict(os.environ, PYTHONPATH=str(REPO))
    proc = subprocess.Popen([sys.executable, "-c", script], env=env, cwd=REPO)
    try:
        deadline = time.monotonic() + 60
        while not flag.exists():
            assert proc.poll() is None, "converter exited early"
            assert time.monotonic() < deadline, "converter never stalled"
            time.sleep(0.05)
        assert (out / "shard-000001.tar.incomplete").exists()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert sorted(p.name for p in out.iterdir()) == ["shard-000000.tar.incomplete", "shard-000001.tar.incomplete"]
    with tarfile.open(out / "shard-000000.tar.incomplete") as tar:  # the first shard was complete, not renamed
        assert len({m.name.split(".")[0] for m in tar.getmembers()}) == 2
    with pytest.raises(FileNotFoundError):  # readers see no shard
        resolve_shards(out)
    # a rerun removes the leftovers (no --overwrite needed: they are not shards)
    report = convert_image_folder(folder.path, out, samples_per_shard=2, progress=False)
    assert report.written == 5 and not list(out.glob("*.incomplete"))


def test_cli_shapes_and_convert(folder, tmp_path, capsys):
    out = tmp_path / "shapes"
    assert main(["data", "shapes", "--out", str(out), "--num", "6", "--num-val", "2", "--num-test", "0",
                 "--resolution", "32", "--samples-per-shard", "4", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "train 6, val 2, test 0" in printed and "32x32" in printed
    assert len(load_samples(out / "train")) == 6 and len(load_samples(out / "val")) == 2
    assert read_meta(out)["splits"] == {"train": 6, "val": 2, "test": 0}
    assert main(["data", "shapes", "--out", str(out), "--num", "6", "--num-val", "2", "--num-test", "0",
                 "--resolution", "32", "--samples-per-shard", "4", "--no-progress"]) == 0
    assert "nothing to do" in capsys.readouterr().out

    assert main(["data", "convert", "--images", str(folder.path), "--out", str(tmp_path / "conv"), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "wrote 5 sample(s)" in printed and "skipped 9 row(s)" in printed and "line 5: garbage.png" in printed

    assert main(["data", "shapes", "--out", str(tmp_path / "x"), "--num", "2", "--resolution", "8"]) == 2
    assert "resolution" in capsys.readouterr().err
