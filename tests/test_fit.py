"""`onemodel fit` on user-style folders: Hugging Face split folders (rgb + captions + QA; with depth maps), a
folder without a validation split, webdataset shards; stages cached and resumable; `data convert` on split
folders; the layout rules; augmentation keeps labels true."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from onemodel.cli import main
from training.data.shapes import generate_sample

TINY = ["optim.max_steps=6", "optim.warmup_steps=1", "optim.batch_size=8", "checkpoint.every=3",
        "logging.eval_every=3", "logging.eval_batches=1", "logging.log_every=3",
        "model.dim=32", "model.num_heads=2", "model.encoder_depth=1", "model.decoder_depth=1"]


def _imagefolder(folder: Path, num: int, start: int = 0, depth: bool = False, csv: bool = False) -> None:
    """A Hugging Face imagefolder of shapes scenes (48x48 pngs: fit resizes them to 32) with captions and QA."""
    folder.mkdir(parents=True)
    rows = []
    for i in range(start, start + num):
        s = generate_sample(1000 + i, resolution=48)
        Image.fromarray(s["rgb"]).save(folder / f"img{i}.png")
        row = {"file_name": f"img{i}.png", "caption": s["caption"], "qa": s["qa"][:2]}
        if depth:
            np.save(folder / f"img{i}_depth.npy", s["depth"])
            row["depth_file"] = f"img{i}_depth.npy"
        rows.append(row)
    if csv:
        import csv as csv_module

        with (folder / "metadata.csv").open("w", newline="") as f:
            w = csv_module.writer(f)
            w.writerow(["file_name", "text", "question", "answer"])
            for r in rows:
                w.writerow([r["file_name"], r["caption"], r["qa"][0]["question"], r["qa"][0]["answer"]])
    else:
        (folder / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def _fit(data: Path, out: Path, *extra: str) -> int:
    return main(["fit", str(data), "--out", str(out), "--preset", "quick", "--no-progress", *extra, *TINY])


@pytest.fixture(scope="module")
def split_folder_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("fit")
    data = root / "mydata"
    _imagefolder(data / "train", 24)
    _imagefolder(data / "validation", 6, start=100)
    _imagefolder(data / "test", 6, start=200)
    out = root / "out"
    assert _fit(data, out) == 0
    return data, out


def test_fit_on_split_folders_runs_every_stage(split_folder_run, capsys):
    data, out = split_folder_run
    state = json.loads((out / "fit_state.json").read_text())
    assert all(state[s]["done"] for s in ("data", "tokenizers", "tokenize", "train", "eval"))
    plan = json.loads((out / "plan.json").read_text())
    assert set(plan["modalities"]) == {"rgb", "caption", "qa"}
    assert plan["tokenizers"] == ["rgb", "text"]
    assert [t["targets"] for t in plan["tasks"]] == [["caption"], ["answer"], ["rgb"]]
    assert plan["resolution"] == 32  # 48-pixel images -> the 32 rule
    assert (plan["num_train"], plan["num_val"], plan["num_test"]) == (24, 6, 6)  # given splits, never merged
    assert sorted(p.name for p in (out / "tokenizers").iterdir()) == ["rgb", "text"]
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {"caption", "vqa"} <= set(results) and "depth" not in results
    model_config = json.loads((out / "run" / "model" / "config.json").read_text())
    assert sorted(m["name"] for m in model_config["modalities"]) == ["answer", "caption", "question", "rgb"]  # no det
    assert state["eval"]["info"]["split"] == "test"
    assert (out / "report" / "report.html").is_file()
    # small data: augmented copies in the training tokens, the best-validation model handed over
    assert plan["small_data"] and plan["augment_copies"] > 0
    tokens_meta = json.loads((out / "tokens" / "meta.json").read_text())
    assert tokens_meta["splits"]["train"] == 24 * (1 + plan["augment_copies"])
    assert tokens_meta["splits"]["val"] == 6
    assert (out / "run" / "best_model" / "model.safetensors").is_file()
    # best_model is the model of the lowest validation loss logged during training
    logged = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    val = {r["step"]: r["val/loss"] for r in logged if "val/loss" in r and r["step"] > 0}
    best = json.loads((out / "run" / "best_model" / "train_config.json").read_text())
    assert best["val_loss"] == pytest.approx(min(val.values())) and val[best["step"]] == pytest.approx(best["val_loss"])
    assert state["eval"]["info"]["model"].endswith("best_model")


def test_fit_rerun_is_cached_and_prints_next_commands(split_folder_run, capsys):
    data, out = split_folder_run
    before = json.loads((out / "fit_state.json").read_text())
    assert _fit(data, out) == 0
    assert json.loads((out / "fit_state.json").read_text()) == before  # nothing re-ran
    printed = capsys.readouterr().out
    assert printed.count("(cached)") == 5 - 1 and "clip             0.0  (skipped: no clip config)" in printed
    assert "tasks: rgb -> caption; rgb+question -> answer; caption -> rgb" in printed
    assert f"onemodel caption --model {out / 'run' / 'best_model'}" in printed
    assert "onemodel answer --model" in printed and "onemodel serve --model" in printed
    # a changed training setting re-runs train and eval only
    assert _fit(data, out, "optim.lr=2e-3") == 0
    after = json.loads((out / "fit_state.json").read_text())
    for stage in ("data", "tokenizers", "tokenize"):
        assert after[stage] == before[stage]
    assert after["train"]["key"] != before["train"]["key"]


def test_fit_clip_stage_at_the_data_resolution(split_folder_run, tmp_path):
    """--clip on a user's folder (32x32 after resizing): the encoder is trained at that resolution, so its patch grid
    is the model's 4x4 token grid, and the model reads rgb through it; data without captions skips the stage."""
    import shutil

    from training.fit import FitSettings, uses_clip

    data, out = split_folder_run
    clipped = tmp_path / "out"
    shutil.copytree(out, clipped)
    assert _fit(data, clipped, "--clip") == 0
    encoder = json.loads((clipped / "clip" / "model" / "contrastive.json").read_text())["config"]
    assert (encoder["image_size"], encoder["patch_size"]) == (32, 8)
    model = json.loads((clipped / "run" / "best_model" / "config.json").read_text())
    assert model["input_embeddings"] == {"rgb": "pixels_and_clip"}
    assert 0.0 <= json.loads((clipped / "eval" / "results.json").read_text())["vqa"]["accuracy"] <= 1.0
    with_clip = FitSettings(clip_config="configs/clip_shapes.yaml")
    assert uses_clip(with_clip, {"modalities": {"rgb": 5, "caption": 5}})
    assert not uses_clip(with_clip, {"modalities": {"rgb": 5, "qa": 5}})


def test_fit_on_qa_only_data_without_captions(tmp_path, caplog):
    """Questions and answers but no captions: the caption tasks and held-out caption curves are left out (a warning),
    the run finishes and scores VQA; --clip has no captions to train on and is skipped."""
    data = tmp_path / "qa_only"
    _imagefolder(data / "train", 24)
    _imagefolder(data / "validation", 6, start=100)
    for split in ("train", "validation"):
        meta = data / split / "metadata.jsonl"
        rows = [json.loads(line) for line in meta.read_text().splitlines()]
        meta.write_text("".join(json.dumps({k: v for k, v in r.items() if k != "caption"}) + "\n" for r in rows))
    with caplog.at_level("WARNING"):
        assert _fit(data, tmp_path / "out", "--clip", "logging.heldout_every=3") == 0
    assert "['caption'] left out" in caplog.text
    state = json.loads((tmp_path / "out" / "fit_state.json").read_text())
    assert state["clip"]["info"] == {"skipped": "the data has no captions"}
    results = json.loads((tmp_path / "out" / "eval" / "results.json").read_text())
    assert "vqa" in results and "caption" not in results


def test_fit_resumes_interrupted_training(split_folder_run, tmp_path, monkeypatch):
    import shutil

    import training.train
    from training.fit import run_fit

    data, out = split_folder_run
    copy = tmp_path / "out"
    shutil.copytree(out, copy)
    overrides = ["optim.max_steps=9"]
    real_train = training.train.train

    def killed_after_step_6(config, resume=False):
        real_train(config, resume=resume, stop_at_step=6)  # checkpoint at step 6, then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(training.train, "train", killed_after_step_6)
    with pytest.raises(KeyboardInterrupt):
        run_fit(data, copy, preset="quick", progress=False, extra_overrides=[*TINY, *overrides])
    monkeypatch.setattr(training.train, "train", real_train)
    summary = run_fit(data, copy, preset="quick", progress=False, extra_overrides=[*TINY, *overrides])
    info = summary["state"]["train"]["info"]
    assert info["start_step"] == 6 and info["final_step"] == 9, info  # resumed, not restarted
    assert summary["stages"]["tokenizers"] == 0.0 and summary["stages"]["tokenize"] == 0.0


def test_fit_makes_a_validation_split_with_depth(tmp_path, capsys):
    data = tmp_path / "depthdata"
    _imagefolder(data, 20, depth=True)  # one folder, no splits
    out = tmp_path / "out"
    assert _fit(data, out) == 0
    printed = capsys.readouterr().out
    plan = json.loads((out / "plan.json").read_text())
    assert set(plan["modalities"]) == {"rgb", "caption", "qa", "depth"}
    assert (plan["num_train"], plan["num_val"], plan["num_test"]) == (18, 2, 0)
    assert "validation split made: 2 of 20 training samples (fraction 0.1, seed 0)" in printed
    assert "no test split: the eval scores the validation split" in printed
    lo, hi = plan["depth_range"]
    assert 0 < lo < hi
    assert sorted(p.name for p in (out / "tokenizers").iterdir()) == ["depth", "rgb", "text"]
    results = json.loads((out / "eval" / "results.json").read_text())
    assert {"caption", "vqa", "depth"} <= set(results)
    # the split is seeded: the same folder gives the same validation keys
    from training.data.layout import split_off_validation

    again = split_off_validation(out / "data" / "train", tmp_path / "t2", tmp_path / "v2", 0.1, 0)
    val_keys = sorted(p.name.split(".")[0] for p in (out / "data" / "val").glob("*.tar"))
    assert again["train"] == 16  # (18 train samples split again)
    assert val_keys  # shards exist


def test_fit_on_webdataset_shards_without_val(tmp_path):
    from training.data.shapes import make_shapes_dataset

    make_shapes_dataset(tmp_path / "shapes", 20, 2, 4, resolution=32, progress=False)
    data = tmp_path / "shards"
    data.mkdir()
    import shutil

    shutil.copytree(tmp_path / "shapes" / "train", data / "train")
    shutil.copytree(tmp_path / "shapes" / "test", data / "test")
    shutil.copy2(tmp_path / "shapes" / "meta.json", data / "meta.json")
    out = tmp_path / "out"
    from training.fit import run_fit

    summary = run_fit(data, out, preset="quick", progress=False, stop_after="data")
    plan = summary["plan"]
    assert set(plan["modalities"]) == {"rgb", "caption", "qa", "depth", "semseg", "boxes"}
    assert (plan["num_train"], plan["num_val"], plan["num_test"]) == (18, 2, 4)
    assert [t["targets"][0] for t in plan["tasks"]] == ["caption", "answer", "depth", "semseg", "det", "rgb"]


def test_fit_rejects_unknown_layout(tmp_path, capsys):
    (tmp_path / "empty" / "notes").mkdir(parents=True)
    (tmp_path / "empty" / "notes" / "a.txt").write_text("hi")
    assert main(["fit", str(tmp_path / "empty"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "not a dataset folder" in err and "metadata.jsonl" in err and "DATA/train/" in err
    assert not (tmp_path / "o").exists()
    # test is never trained on: a folder with only a test split fails clearly
    _imagefolder(tmp_path / "only_test" / "test", 3)
    assert main(["fit", str(tmp_path / "only_test"), "--out", str(tmp_path / "o2"), "--no-progress"]) == 2
    assert "no train split" in capsys.readouterr().err
    for bad, message in ((["--val-fraction", "1.5"], "--val-fraction"), (["--resolution", "30"], "multiple of 8")):
        assert main(["fit", str(tmp_path / "only_test"), "--out", str(tmp_path / "o3"), *bad]) == 2
        assert message in capsys.readouterr().err


# ------------------------------------------------------------------------------------------------ data convert


def test_data_convert_writes_each_split(tmp_path, capsys):
    data = tmp_path / "hf"
    _imagefolder(data / "train", 5)
    _imagefolder(data / "validation", 2, start=50, csv=True)
    _imagefolder(data / "test", 3, start=80)
    out = tmp_path / "out"
    assert main(["data", "convert", "--images", str(data), "--out", str(out), "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert "split train:" in printed and "split val:" in printed and "split test:" in printed
    from training.data.reader import load_samples
    from training.data.shards import read_meta

    meta = read_meta(out)
    assert meta["splits"] == {"test": 3, "train": 5, "val": 2}
    train = load_samples(out / "train")
    assert len(train) == 5 and all("caption" in s and "qa" in s for s in train)  # captions and QA kept
    val = load_samples(out / "val")  # from metadata.csv: text column + one question/answer pair
    assert len(val) == 2 and all(len(s["qa"]) == 1 and s["caption"] for s in val)


def test_data_convert_rejects_unknown_layout(tmp_path, capsys):
    (tmp_path / "x" / "docs").mkdir(parents=True)
    assert main(["data", "convert", "--images", str(tmp_path / "x"), "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "Expected one of" in err and "metadata.jsonl" in err


def test_convert_image_folder_refuses_split_folders(tmp_path):
    from training.data.convert import convert_image_folder

    _imagefolder(tmp_path / "hf" / "train", 2)
    _imagefolder(tmp_path / "hf" / "test", 2, start=10)
    with pytest.raises(ValueError, match="OUT/<split>"):
        convert_image_folder(tmp_path / "hf", tmp_path / "out")


def test_layout_detection(tmp_path):
    from training.data.layout import detect_layout, validation_size

    _imagefolder(tmp_path / "a" / "training", 2)
    _imagefolder(tmp_path / "a" / "valid", 2, start=5)
    layout = detect_layout(tmp_path / "a")
    assert layout.kind == "imagefolder_splits" and sorted(layout.splits) == ["train", "val"]
    _imagefolder(tmp_path / "b", 2)
    assert detect_layout(tmp_path / "b").kind == "imagefolder"
    (tmp_path / "c" / "val").mkdir(parents=True)
    (tmp_path / "c" / "validation").mkdir()
    Image.new("RGB", (4, 4)).save(tmp_path / "c" / "val" / "x.png")
    with pytest.raises(ValueError, match="two folders for the 'val' split"):
        detect_layout(tmp_path / "c")
    assert validation_size(20, 0.1) == 2 and validation_size(3, 0.1) == 1 and validation_size(50000, 0.1) == 1000
    with pytest.raises(ValueError, match="at least 2 samples"):
        validation_size(1, 0.1)


# ------------------------------------------------------------------------------------------------ augmentation


def test_augment_keeps_labels_true():
    from training.data.augment import AugmentConfig, augment_sample

    s = generate_sample(7, resolution=64)
    rng = np.random.default_rng(0)
    a = augment_sample(s, rng, AugmentConfig(min_scale=0.5))
    assert a["rgb"].shape == s["rgb"].shape and a["rgb"].dtype == np.uint8
    assert a["depth"].shape == s["depth"].shape and a["semseg"].shape == s["semseg"].shape
    assert a["caption"] == s["caption"] and a["qa"] == s["qa"]
    assert "scene" not in a
    assert set(np.unique(a["semseg"])) <= set(np.unique(s["semseg"]))  # nearest: no new class ids
    assert set(np.unique(a["depth"])) <= set(np.unique(s["depth"]))  # nearest: no blended depths
    assert not np.array_equal(a["rgb"], s["rgb"])
    for b in a["boxes"]:
        x0, y0, x1, y1 = b["box"]
        assert 0 <= x0 < x1 <= 64 and 0 <= y0 < y1 <= 64
    # each box still frames its object: the crop moved it with the semseg map (no flips: left stays left)
    labels = {b["label"] for b in s["boxes"]}
    assert {b["label"] for b in a["boxes"]} <= labels
    # full-size crop and no jitter = identity
    ident = augment_sample(s, rng, AugmentConfig(min_scale=1.0, max_aspect=1.0, brightness=0, contrast=0,
                                                 saturation=0))
    assert np.array_equal(ident["rgb"], s["rgb"]) and np.array_equal(ident["semseg"], s["semseg"])
