"""tokenizers_mm.io_atomic: atomic writes leave nothing half-written and failures are one clear line."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from PIL import Image

from tokenizers_mm import io_atomic as io
from tokenizers_mm.io_atomic import OutputPathError


def _listing(root):
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_file_writers_round_trip(tmp_path):
    io.write_json(tmp_path / "a" / "b.json", {"x": 1})
    io.save_npy(tmp_path / "d.npy", np.arange(6, dtype=np.float32).reshape(2, 3))
    io.save_image(tmp_path / "i.png", Image.new("RGB", (3, 2), (1, 2, 3)))
    io.save_safetensors(tmp_path / "m.safetensors", {"w": torch.arange(4.0)}, {"format": "pt"})
    assert (tmp_path / "a" / "b.json").read_text() == '{\n  "x": 1\n}\n'
    assert np.load(tmp_path / "d.npy").tolist() == [[0, 1, 2], [3, 4, 5]]
    assert np.asarray(Image.open(tmp_path / "i.png"))[1, 2].tolist() == [1, 2, 3]
    tensors, meta = io.read_safetensors(tmp_path / "m.safetensors")
    assert torch.equal(tensors["w"], torch.arange(4.0)) and meta == {"format": "pt"}
    assert not [p for p in _listing(tmp_path) if io.PARTIAL_MARK in p]


def test_failed_write_keeps_old_file_and_leaves_no_temp(tmp_path):
    target = tmp_path / "new" / "deeper" / "x.bin"
    with pytest.raises(RuntimeError, match="boom"):
        with io.atomic_file(target) as tmp:
            tmp.write_bytes(b"half")
            raise RuntimeError("boom")
    assert _listing(tmp_path) == []  # neither the temp file nor the parents it created
    io.write_text(tmp_path / "y.txt", "old")
    with pytest.raises(RuntimeError):
        with io.atomic_file(tmp_path / "y.txt") as tmp:
            tmp.write_text("new, half")
            raise RuntimeError("boom")
    assert (tmp_path / "y.txt").read_text() == "old" and _listing(tmp_path) == ["y.txt"]


def test_atomic_directory_merge_replace_and_failure(tmp_path):
    out = tmp_path / "runs" / "out"
    with pytest.raises(KeyError):
        with io.atomic_directory(out) as d:
            io.save_npy(d / "a.npy", np.zeros(3))
            raise KeyError("x")
    assert _listing(tmp_path) == []  # no empty runs/ or runs/out left behind
    with io.atomic_directory(out) as d:
        io.write_text(d / "a.txt", "1")
        (d / "sub").mkdir()
        io.write_text(d / "sub" / "s.txt", "s")
    with io.atomic_directory(out) as d:  # merge: replaces a.txt and sub/, keeps the rest
        io.write_text(d / "a.txt", "2")
        io.write_text(d / "b.txt", "b")
    assert (out / "a.txt").read_text() == "2" and _listing(out) == ["a.txt", "b.txt", "sub", "sub/s.txt"]
    with io.atomic_directory(out, mode="replace") as d:
        io.write_text(d / "c.txt", "c")
    assert _listing(tmp_path / "runs") == ["out", "out/c.txt"]


def test_stale_partials_of_dead_processes_are_removed(tmp_path):
    stale = tmp_path / f".x.json{io.PARTIAL_MARK}999999999"
    stale.write_text("left by kill -9")
    io.write_json(tmp_path / "x.json", [])
    assert _listing(tmp_path) == ["x.json"]


def test_output_path_errors_are_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    cases = [
        (lambda: io.check_output_dir(tmp_path / "file"), "exists and is a file"),
        (lambda: io.atomic_directory(tmp_path / "file").__enter__(), "exists and is a file"),
        (lambda: io.write_text(tmp_path / "file" / "x.txt", ""), "is a file, not a directory"),
        (lambda: io.write_text(tmp_path, ""), "is a directory"),
    ]
    for fn, words in cases:
        with pytest.raises(OutputPathError) as info:
            fn()
        msg = str(info.value)
        assert words in msg and "\n" not in msg and str(tmp_path) in msg
        assert isinstance(info.value, ValueError) and isinstance(info.value, OSError)
    assert _listing(tmp_path) == ["file"]


def test_full_disk(full_dir):
    before = _listing(full_dir)
    for fn in (
        lambda: io.save_npy(full_dir / "depth.npy", np.zeros(100_000)),
        lambda: io.save_safetensors(full_dir / "m.safetensors", {"w": torch.zeros(100_000)}),
        lambda: io.save_image(full_dir / "x.png", Image.fromarray(np.random.default_rng(0).integers(
            0, 255, (256, 256, 3), dtype=np.uint8))),
    ):
        with pytest.raises(OutputPathError, match="no space left on device; free some space") as info:
            fn()
        assert "\n" not in str(info.value)
    with pytest.raises(OutputPathError, match="no space left"):
        with io.atomic_directory(full_dir / "out") as d:
            io.write_text(d / "small.txt", "x")
            np.save(d / "big.npy", np.zeros(100_000))  # a plain write inside the staging directory
    assert _listing(full_dir) == before


def test_read_only_dir(readonly_dir):
    for fn in (lambda: io.write_json(readonly_dir / "sub" / "x.json", {}),
               lambda: io.check_output_dir(readonly_dir / "out")):
        with pytest.raises(OutputPathError, match="(read-only|permission denied)") as info:
            fn()
        assert str(readonly_dir) in str(info.value)
    assert os.listdir(readonly_dir) == []


@pytest.mark.parametrize("content", [b"", b"\x80\x04\x95garbage pickle", b"\x10\x00\x00\x00\x00\x00\x00\x00{\"a\":"])
def test_read_safetensors_refuses_bad_files(tmp_path, content):
    path = tmp_path / "model.safetensors"
    path.write_bytes(content)
    with pytest.raises(ValueError, match="is not a valid safetensors file .truncated, or not produced by onemodel.; "
                                         "re-export it"):
        io.read_safetensors(path)
    with pytest.raises(FileNotFoundError):
        io.read_safetensors(tmp_path / "missing.safetensors")
