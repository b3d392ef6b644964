"""A table of bad inputs against the Python API and the CLI (docs/errors.md).

Every case must end in the expected exception type (API) or exit code 2 (CLI) with a one-line message naming the
problem and the fix, and must leave nothing new behind in the output locations.
"""

from __future__ import annotations

import json
import logging
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

from onemodel.cli import main
from onemodel.modalities import Modality
from onemodel.model import OneModel, OneModelConfig
from onemodel.pipeline import OneModelPipeline
from training.data.shapes import generate_sample

pytestmark = pytest.mark.usefixtures("one_torch_thread")

LONG_TEXT = "a red circle left of a blue square " * 300  # ~2000 tokens, far above any max_length
SURROGATE = "a red \udcff circle"  # what Python makes of a non-UTF-8 byte in argv


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """A tiny saved model + tokenizer bundle (untrained: errors, not quality, are under test)."""
    from test_pipeline import _bundle

    samples = [generate_sample(i, resolution=32) for i in range(20)]
    bundle = _bundle(samples)
    mods = tuple(Modality(**s) for s in bundle.modalities({"caption": 24, "question": 12, "answer": 4, "det": 16}))
    torch.manual_seed(0)
    model = OneModel(OneModelConfig(modalities=mods, dim=32, encoder_depth=1, decoder_depth=1, num_heads=2))
    run = tmp_path_factory.mktemp("run")
    model.save_pretrained(run / "model")
    bundle.save_pretrained(run / "model" / "tokenizers")
    Image.fromarray(samples[0]["rgb"]).save(run / "scene.png")
    (run / "not_an_image.png").write_text("hello")
    return run


@pytest.fixture(scope="module")
def pipe(run_dir) -> OneModelPipeline:
    return OneModelPipeline.from_pretrained(run_dir)


def _img() -> np.ndarray:
    return generate_sample(1, resolution=32)["rgb"]


def _listing(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def _check_message(msg: str, words: str) -> None:
    import re

    assert re.search(words, msg), f"{words!r} not in {msg!r}"
    assert "\n" not in msg.strip(), f"not one line: {msg!r}"
    assert len(msg) < 500, f"too long ({len(msg)} chars): {msg[:200]}..."
    assert "array(" not in msg and "tensor(" not in msg and "[[" not in msg, f"dumps data: {msg[:200]}"


# ------------------------------------------------------------------------------------------------ the API table


@dataclass
class ApiCase:
    id: str
    call: Callable[[OneModelPipeline, Path], Any]
    exc: type
    words: str


API_CASES = [
    # images
    ApiCase("pil-0x0", lambda p, t: p.caption(Image.new("RGB", (0, 0))), ValueError, "is empty; pass an image"),
    ApiCase("array-0-rows", lambda p, t: p.caption(np.zeros((0, 5, 3), np.uint8)), ValueError, "empty"),
    ApiCase("tensor-0-cols", lambda p, t: p.depth(torch.zeros(3, 8, 0)), ValueError, "empty"),
    ApiCase("float-nan", lambda p, t: p.caption(np.full((8, 8, 3), np.nan, np.float32)), ValueError,
            "NaN or inf; replace them"),
    ApiCase("float-inf", lambda p, t: p.segment(np.full((8, 8, 3), np.inf, np.float32)), ValueError, "NaN or inf"),
    ApiCase("float-out-of-range", lambda p, t: p.caption(np.full((8, 8, 3), 3.0, np.float32)), ValueError,
            r"\[0, 1\].*divide by 255"),
    ApiCase("int-dtype", lambda p, t: p.caption(np.zeros((8, 8, 3), np.int64)), TypeError, "pass uint8"),
    ApiCase("bad-shape", lambda p, t: p.caption(np.zeros((8, 8, 5), np.uint8)), ValueError, r"expected an \(H, W, 3\)"),
    ApiCase("not-an-image", lambda p, t: p.caption(12), TypeError, "expected an image"),
    ApiCase("missing-file", lambda p, t: p.caption(t / "nope.png"), FileNotFoundError, "does not exist"),
    ApiCase("text-file-as-image", lambda p, t: p.caption(t / "not_an_image.png"), ValueError, "could not read"),
    ApiCase("empty-list", lambda p, t: p.caption([]), ValueError, "empty image list"),
    ApiCase("depth-nan", lambda p, t: p.generate({"rgb": _img(), "depth": np.full((8, 8), np.nan, np.float32)},
                                                 ["semseg"]), ValueError, "finite metres.*nan_to_num"),
    ApiCase("semseg-class-range", lambda p, t: p.generate({"semseg": np.full((8, 8), 999)}, ["rgb"]), ValueError,
            r"class ids must be in \[0"),
    # text
    ApiCase("question-too-long", lambda p, t: p.answer(_img(), LONG_TEXT), ValueError,
            "tokens long, more than this model's question max_length of 12; .*truncate=True"),
    ApiCase("caption-too-long", lambda p, t: p.text_to_image(LONG_TEXT), ValueError, "caption max_length of 24"),
    ApiCase("too-many-boxes", lambda p, t: p.generate(
        {"rgb": _img(), "det": [{"box": [0, 0, 4, 4], "label": "circle"}] * 20}, ["caption"]), ValueError,
        "det max_length of 16; shorten the boxes"),
    ApiCase("surrogate-caption", lambda p, t: p.generate({"caption": SURROGATE}, ["rgb"], steps=1), ValueError,
            "not valid Unicode.*pass UTF-8"),
    ApiCase("surrogate-question", lambda p, t: p.answer(_img(), "what \ud800?"), ValueError, "not valid Unicode"),
    ApiCase("empty-question", lambda p, t: p.answer(_img(), "   "), ValueError, "is empty; ask something"),
    ApiCase("empty-prompt", lambda p, t: p.text_to_image(""), ValueError, "empty"),
    ApiCase("question-not-str", lambda p, t: p.generate({"question": 5}, ["answer"]), TypeError, "expected a string"),
    ApiCase("det-not-list", lambda p, t: p.generate({"rgb": _img(), "det": "box"}, ["caption"]), TypeError,
            "expected a list of"),
    # generate() arguments
    ApiCase("inputs-list", lambda p, t: p.generate([_img()], ["caption"]), TypeError,
            r"inputs must be a dict .*got list of 1 item"),
    ApiCase("inputs-array", lambda p, t: p.generate(_img(), ["caption"]), TypeError, r"of shape \(32, 32, 3\)"),
    ApiCase("targets-int", lambda p, t: p.generate({"rgb": _img()}, 5), TypeError, "targets must be"),
    ApiCase("targets-empty", lambda p, t: p.generate({"rgb": _img()}, []), ValueError, "targets is empty"),
    ApiCase("unknown-input", lambda p, t: p.generate({"rgbb": _img()}, ["caption"]), ValueError,
            "unknown input modality 'rgbb'"),
    ApiCase("unknown-target", lambda p, t: p.generate({"rgb": _img()}, ["dept"]), ValueError, "unknown target"),
    ApiCase("input-and-target", lambda p, t: p.generate({"rgb": _img()}, ["rgb"]), ValueError, "both as input"),
    ApiCase("steps-0", lambda p, t: p.depth(_img(), steps=0), ValueError, "steps must be >= 1"),
    ApiCase("steps-too-many", lambda p, t: p.depth(_img(), steps=99), ValueError, "exceeds the 16 tokens"),
    ApiCase("batch-size-0", lambda p, t: p.caption(_img(), batch_size=0), ValueError, "batch_size must be"),
    ApiCase("unknown-option", lambda p, t: p.caption(_img(), temprature=1.0), TypeError, "unknown sampling option"),
    ApiCase("list-lengths", lambda p, t: p.answer([_img(), _img()], ["a?", "b?", "c?"]), ValueError,
            "different lengths"),
]


@pytest.mark.parametrize("case", API_CASES, ids=[c.id for c in API_CASES])
def test_api_bad_input(case, pipe, run_dir):
    with pytest.raises(case.exc) as info:
        case.call(pipe, run_dir)
    assert type(info.value) is case.exc or isinstance(info.value, case.exc)
    _check_message(str(info.value), case.words)


def test_truncate_is_explicit_and_warns(pipe, caplog):
    with caplog.at_level(logging.WARNING, logger="onemodel.pipeline"):
        out = pipe.answer(_img(), LONG_TEXT, truncate=True)
    assert isinstance(out, str)
    assert any("cut to the model's max_length 12" in r.getMessage() for r in caplog.records)
    ids = pipe.tokenize({"question": LONG_TEXT}, truncate=True)["question"][0]
    assert len(ids) == 12


# ------------------------------------------------------------------------------------------------ broken model dirs


def _copy_run(run_dir: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "run"
    shutil.copytree(run_dir / "model", dst / "model")
    return dst


def _pickle_over(path: Path) -> None:
    import pickle

    path.write_bytes(pickle.dumps({"weights": [1, 2, 3]}))


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


def _config_dim(path: Path) -> None:
    config = json.loads(path.read_text())
    config["dim"] = 64
    path.write_text(json.dumps(config))


LOAD_CASES = [
    ("weights-pickle", lambda m: _pickle_over(m / "model.safetensors"), ValueError,
     "model.safetensors' is not a valid safetensors file .truncated, or not produced by onemodel.; re-export"),
    ("weights-truncated", lambda m: _truncate(m / "model.safetensors"), ValueError, "not a valid safetensors file"),
    ("tokenizer-weights-pickle", lambda m: _pickle_over(m / "tokenizers" / "rgb" / "model.safetensors"), ValueError,
     "rgb/model.safetensors' is not a valid safetensors file .*retrain the tokenizer"),
    ("text-tokenizer-garbage", lambda m: (m / "tokenizers" / "text" / "tokenizer.json").write_text("{garbage"),
     ValueError, "not a valid tokenizer file"),
    ("bundle-without-text", lambda m: shutil.rmtree(m / "tokenizers" / "text"), ValueError,
     "no 'text' tokenizer, needed by modality 'caption'; copy the text/ tokenizer"),
    ("no-tokenizers", lambda m: shutil.rmtree(m / "tokenizers"), ValueError, "has no tokenizers/ directory"),
    ("config-dim-mismatch", lambda m: _config_dim(m / "config.json"), ValueError,
     "does not match the config in config.json.*restore"),
    ("config-not-json", lambda m: (m / "config.json").write_text("{"), ValueError, "config.json is not valid JSON"),
    ("no-weights", lambda m: (m / "model.safetensors").unlink(), ValueError, "neither a trained run directory"),
]


@pytest.mark.parametrize("case", LOAD_CASES, ids=[c[0] for c in LOAD_CASES])
def test_load_broken_model_dir(case, run_dir, tmp_path):
    _, breakit, exc, words = case
    run = _copy_run(run_dir, tmp_path)
    breakit(run / "model")
    with pytest.raises(exc) as info:
        OneModelPipeline.from_pretrained(run)
    _check_message(str(info.value), words)
    rc, err = _cli(["caption", "--model", str(run), str(run_dir / "scene.png")])
    assert rc == 2
    _check_message(err, words)


def test_missing_model_dir(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        OneModelPipeline.from_pretrained(tmp_path / "nope")


# ------------------------------------------------------------------------------------------------ the CLI table


def _cli(argv: list[str]) -> tuple[int, str]:
    import contextlib
    import io

    err = io.StringIO()
    with contextlib.redirect_stderr(err):
        rc = main(argv)
    lines = [line for line in err.getvalue().splitlines() if line.startswith("onemodel ")]
    return rc, (lines[-1] if lines else err.getvalue())


@dataclass
class CliCase:
    id: str
    argv: Callable[[Path, Path], list[str]]  # (run_dir, out_root) -> argv; out_root is watched for leftovers
    words: str


def _gen(run: Path, out: Any, *extra: str) -> list[str]:
    return ["generate", "--model", str(run), "--input", f"rgb={run / 'scene.png'}", "--target", "depth",
            "--steps", "1", "--out", str(out), *extra]


def _file(path: Path) -> Path:
    path.write_text("I am a file")
    return path


CLI_CASES = [
    CliCase("generate-out-is-file", lambda r, o: _gen(r, _file(o / "f")), "exists and is a file.*choose another"),
    CliCase("generate-out-under-file", lambda r, o: _gen(r, _file(o / "f") / "sub"), "is a file, not a directory"),
    CliCase("generate-no-target", lambda r, o: ["generate", "--model", str(r), "--out", str(o / "x")],
            "at least one --target"),
    CliCase("generate-bad-input-pair", lambda r, o: ["generate", "--model", str(r), "--input", "rgb",
                                                     "--target", "depth", "--out", str(o / "x")], "MODALITY=VALUE"),
    CliCase("generate-missing-image", lambda r, o: ["generate", "--model", str(r), "--input", f"rgb={o / 'no.png'}",
                                                    "--target", "depth", "--out", str(o / "x")], "does not exist"),
    CliCase("generate-steps-0", lambda r, o: _gen(r, o / "x") + ["--steps", "0"], "--steps must be >= 1"),
    CliCase("generate-long-caption", lambda r, o: ["generate", "--model", str(r), "--input", f"caption={LONG_TEXT}",
                                                   "--target", "rgb", "--steps", "1", "--out", str(o / "x")],
            "max_length of 24.*--truncate"),
    CliCase("generate-surrogate", lambda r, o: ["generate", "--model", str(r), "--input", f"caption={SURROGATE}",
                                                "--target", "rgb", "--steps", "1", "--out", str(o / "x")],
            "not valid Unicode"),
    CliCase("caption-batch-size-0", lambda r, o: ["caption", "--model", str(r), "--batch-size", "0",
                                                  str(r / "scene.png")], "--batch-size must be >= 1"),
    CliCase("caption-empty-image-file", lambda r, o: ["caption", "--model", str(r), str(r / "not_an_image.png")],
            "could not read"),
    CliCase("answer-long-question", lambda r, o: ["answer", "--model", str(r), str(r / "scene.png"),
                                                  "--question", LONG_TEXT], "question max_length of 12"),
    CliCase("shapes-num-0", lambda r, o: ["data", "shapes", "--out", str(o / "d"), "--num", "0"],
            "--num must be >= 1, got 0"),
    CliCase("shapes-samples-per-shard-0", lambda r, o: ["data", "shapes", "--out", str(o / "d"), "--num", "2",
                                                        "--samples-per-shard", "0"], "--samples-per-shard must be"),
    CliCase("shapes-num-val-negative", lambda r, o: ["data", "shapes", "--out", str(o / "d"), "--num", "2",
                                                     "--num-val", "-1"], "--num-val must be >= 0"),
    CliCase("shapes-out-is-file", lambda r, o: ["data", "shapes", "--out", str(_file(o / "f")), "--num", "2",
                                                "--resolution", "16", "--no-progress"], "exists and is a file"),
    CliCase("convert-missing-folder", lambda r, o: ["data", "convert", "--images", str(o / "none"), "--out",
                                                    str(o / "c"), "--no-progress"], "does not exist"),
    CliCase("convert-all-rows-bad", lambda r, o: ["data", "convert", "--images", str(_bad_folder(o)), "--out",
                                                  str(o / "c"), "--no-progress"], "no valid sample"),
    CliCase("eval-out-is-file", lambda r, o: ["eval", "--model", str(r), "--data", str(o), "--out",
                                              str(_file(o / "f")), "--no-progress"], "exists and is a file"),
    CliCase("tokenize-out-is-file", lambda r, o: ["tokenize", "--tokenizers", str(r / "model" / "tokenizers"),
                                                  "--data", str(_shapes(o)), "--out", str(_file(o / "f")),
                                                  "--no-progress"], "exists and is a file"),
]


def _bad_folder(root: Path) -> Path:
    folder = root / "imgs"
    folder.mkdir()
    (folder / "metadata.jsonl").write_text('{"file_name": "missing.png", "caption": "x"}\n{oops\n')
    return folder


def _shapes(root: Path) -> Path:
    from training.data.shapes import make_shapes_dataset

    make_shapes_dataset(root / "shapes", num_train=2, num_val=0, num_test=0, resolution=16, progress=False)
    return root / "shapes"


@pytest.mark.parametrize("case", CLI_CASES, ids=[c.id for c in CLI_CASES])
def test_cli_bad_input(case, run_dir, tmp_path):
    argv = case.argv(run_dir, tmp_path)
    before = _listing(tmp_path)
    rc, err = _cli(argv)
    assert rc == 2, err
    _check_message(err, case.words)
    assert _listing(tmp_path) == before  # nothing new: no partial file, no empty directory


def test_cli_truncate_flag(run_dir, tmp_path, capsys):
    rc = main(["answer", "--model", str(run_dir), str(run_dir / "scene.png"), "--question", LONG_TEXT, "--truncate"])
    assert rc == 0 and capsys.readouterr().out.strip() != ""


# ------------------------------------------------------------------------------------------------ output faults


def test_generate_on_full_disk_leaves_nothing(run_dir, full_dir):
    before = _listing(full_dir)
    for out in (full_dir / "out", full_dir):  # a new directory, and an existing one
        rc, err = _cli(_gen(run_dir, out, "--target", "semseg", "--target", "caption"))
        assert rc == 2
        _check_message(err, "no space left on device; free some space or choose another directory")
        assert _listing(full_dir) == before


def test_generate_into_read_only_dir(run_dir, readonly_dir):
    rc, err = _cli(_gen(run_dir, readonly_dir / "out"))
    assert rc == 2
    _check_message(err, f"cannot write '{readonly_dir / 'out'}': (the filesystem is read-only|permission denied)")
    assert _listing(readonly_dir) == []


def test_data_commands_on_full_disk_leave_nothing(run_dir, full_dir, tmp_path):
    before = _listing(full_dir)
    rc, err = _cli(["data", "shapes", "--out", str(full_dir / "shapes"), "--num", "64", "--resolution", "32",
                    "--no-progress"])
    assert rc == 2
    _check_message(err, "no space left on device")
    assert _listing(full_dir) == before
    folder = tmp_path / "imgs"
    folder.mkdir()
    rows = []
    for i in range(12):
        Image.fromarray(generate_sample(i, resolution=64)["rgb"]).save(folder / f"{i}.png")
        rows.append(json.dumps({"file_name": f"{i}.png", "caption": "shapes"}))
    (folder / "metadata.jsonl").write_text("\n".join(rows) + "\n")
    rc, err = _cli(["data", "convert", "--images", str(folder), "--out", str(full_dir / "conv"), "--no-progress"])
    assert rc == 2
    _check_message(err, "no space left on device")
    assert _listing(full_dir) == before


def test_data_shapes_into_read_only_dir(readonly_dir):
    rc, err = _cli(["data", "shapes", "--out", str(readonly_dir / "d"), "--num", "2", "--no-progress"])
    assert rc == 2
    _check_message(err, "(read-only|permission denied)")


def test_save_pretrained_on_full_disk_keeps_the_old_model(run_dir, full_dir):
    """A model directory is replaced whole or not at all."""
    model = OneModel.from_pretrained(run_dir / "model")
    from tokenizers_mm.io_atomic import OutputPathError

    with pytest.raises(OutputPathError, match="no space left"):
        model.save_pretrained(full_dir / "m")
    assert not (full_dir / "m").exists()
