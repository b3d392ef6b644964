"""``onemodel generate | caption | answer`` on a tiny saved run directory."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from onemodel.cli import main
from onemodel.generate_commands import parse_input_pairs
from onemodel.modalities import Modality
from onemodel.model import OneModel, OneModelConfig
from training.data.shapes import generate_sample


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    from test_pipeline import _bundle

    samples = [generate_sample(i, resolution=32) for i in range(20)]
    bundle = _bundle(samples)
    mods = tuple(Modality(**s) for s in bundle.modalities({"caption": 24, "question": 12, "answer": 4, "det": 16}))
    torch.manual_seed(0)
    model = OneModel(OneModelConfig(modalities=mods, dim=32, encoder_depth=1, decoder_depth=1, num_heads=2, init_std=0.2, init="trunc_normal"))
    run = tmp_path_factory.mktemp("run")
    model.save_pretrained(run / "model")
    bundle.save_pretrained(run / "model" / "tokenizers")
    img = run / "scene.png"
    Image.fromarray(samples[0]["rgb"]).save(img)
    Image.fromarray(samples[1]["rgb"]).save(run / "scene2.png")
    return run


def test_parse_input_pairs():
    assert parse_input_pairs(["rgb=a.png", "caption=a red = circle"]) == {"rgb": "a.png", "caption": "a red = circle"}
    with pytest.raises(ValueError, match="MODALITY=VALUE"):
        parse_input_pairs(["rgb"])
    with pytest.raises(ValueError, match="twice"):
        parse_input_pairs(["rgb=a.png", "rgb=b.png"])


def test_generate_writes_files(run_dir, tmp_path, capsys):
    out = tmp_path / "out"
    rc = main([
        "generate", "--model", str(run_dir), "--input", f"rgb={run_dir / 'scene.png'}", "--input", "question=what is it?",
        "--target", "depth", "--target", "semseg", "--target", "answer", "--target", "det",
        "--out", str(out), "--steps", "2", "--seed", "1",
    ])
    assert rc == 0
    names = sorted(p.name for p in out.iterdir())
    assert names == ["depth.npy", "depth.png", "det.png", "outputs.json", "semseg.npy", "semseg.png"]
    depth = np.load(out / "depth.npy")
    assert depth.shape == (32, 32) and depth.dtype == np.float32
    assert np.load(out / "semseg.npy").shape == (32, 32)
    outputs = json.loads((out / "outputs.json").read_text())
    assert isinstance(outputs["answer"], str) and isinstance(outputs["det"], list)
    assert "answer:" in capsys.readouterr().out


def test_generate_text_to_image(run_dir, tmp_path):
    out = tmp_path / "t2i"
    rc = main(["generate", "--model", str(run_dir), "--input", "caption=a red circle", "--target", "rgb",
               "--out", str(out), "--steps", "2", "--guidance-scale", "2.0", "--temperature", "1.0", "--top-k", "5"])
    assert rc == 0
    assert Image.open(out / "rgb.png").size == (16, 16)


def test_caption_and_answer_print(run_dir, capsys):
    img, img2 = str(run_dir / "scene.png"), str(run_dir / "scene2.png")
    assert main(["caption", "--model", str(run_dir), img]) == 0
    single = capsys.readouterr().out.strip()
    assert single and "\t" not in single
    assert main(["caption", "--model", str(run_dir), img, img2, "--batch-size", "1"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 2 and lines[0] == f"{img}\t{single}"
    assert main(["answer", "--model", str(run_dir), img, "--question", "what color is the circle?"]) == 0
    assert capsys.readouterr().out.strip() != ""


@pytest.mark.parametrize(
    "argv,match",
    [
        (["generate", "--input", "rgb", "--target", "depth"], "MODALITY=VALUE"),
        (["generate", "--input", "caption=a red circle"], "--target"),
        (["generate", "--input", "caption=a red circle", "--target", "caption"], "both as input and as target"),
        (["generate", "--input", "sketch=x.png", "--target", "depth"], "unknown input modality"),
        (["generate", "--input", "rgb=/no/such.png", "--target", "depth"], "does not exist"),
        (["generate", "--input", "caption=a red circle", "--target", "rgb", "--top-p", "0"], "top_p"),
        (["answer", "IMG", "--question", " "], "question 0 is empty"),
    ],
)
def test_cli_errors_are_one_line(run_dir, tmp_path, capsys, argv, match):
    argv = [a.replace("IMG", str(run_dir / "scene.png")) for a in argv]
    argv = argv[:1] + ["--model", str(run_dir)] + argv[1:]
    if argv[0] == "generate":
        argv += ["--out", str(tmp_path / "o")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert match in err and "Traceback" not in err


def test_model_dir_without_tokenizers(tmp_path, capsys):
    mods = (Modality("rgb", "grid", 32, "rgb", grid_size=4),)
    OneModel(OneModelConfig(modalities=mods, dim=16, encoder_depth=1, decoder_depth=1, num_heads=2)).save_pretrained(tmp_path / "m")
    assert main(["caption", "--model", str(tmp_path / "m"), "x.png"]) == 2
    assert "no tokenizers/ directory" in capsys.readouterr().err
