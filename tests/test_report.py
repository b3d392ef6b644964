"""The evaluation report: HTML page, PNG grids, metric tables and training curves."""

import json

import numpy as np
import pytest
from PIL import Image

from training.data.shapes import generate_split
from training.evaluation.report import (
    _chart_groups,
    colorize_depth,
    colorize_semseg,
    example_grid,
    line_chart,
    metrics_html_table,
    metrics_markdown_table,
    training_curves,
    write_report,
)

RESULTS = {
    "caption": {"bleu_4": 0.51234, "cider": 3.2, "tokenizer": "ptb"},
    "semseg": {"miou": 0.9, "per_class_iou": {"background": 0.99, "circle": None}},
    "depth": {"delta1": 1.0, "num_images": 12},
}


def _examples(samples):
    return {
        "caption": [
            {"inputs": {"rgb": s["rgb"]}, "prediction": "a red circle", "target": s["caption"]} for s in samples
        ],
        "vqa": [
            {"inputs": {"rgb": s["rgb"], "question": s["qa"][0]["question"]}, "prediction": "2",
             "target": s["qa"][0]["answer"]}
            for s in samples
        ],
        "depth": [{"inputs": {"rgb": s["rgb"]}, "prediction": s["depth"] * 1.1, "target": s["depth"]} for s in samples],
        "semseg": [{"inputs": {"rgb": s["rgb"]}, "prediction": s["semseg"], "target": s["semseg"]} for s in samples],
        "detection": [
            {"inputs": {"rgb": s["rgb"]}, "prediction": [dict(b, score=0.8) for b in s["boxes"]], "target": s["boxes"]}
            for s in samples
        ],
        "text_to_image": [
            {"inputs": {"caption": s["caption"]}, "prediction": Image.fromarray(s["rgb"]), "target": None,
             "note": "judge: ok"}
            for s in samples
        ],
    }


def _write_log(path, steps=50):
    with open(path, "w") as f:
        for step in range(0, steps * 10, 10):
            rec = {"step": step, "time": step * 0.1, "lr": 1e-3, "train/loss": 5.0 / (1 + step / 100)}
            rec["train/loss/rgb"] = 6.0
            if step % 100 == 0:
                rec["val/loss"] = 5.5 / (1 + step / 100)
            f.write(json.dumps(rec) + "\n")
        f.write('{"step": 999, "train/lo')  # torn last line of a killed run


def test_write_report_sections_and_files(tmp_path):
    samples = list(generate_split("test", 3))
    log = tmp_path / "metrics.jsonl"
    _write_log(log)
    page = write_report(tmp_path / "report", RESULTS, _examples(samples), log)
    assert page == tmp_path / "report" / "report.html"
    html = page.read_text()
    assert "<h2 id='metrics'>Metrics</h2>" in html and "<h2 id='curves'>Training curves</h2>" in html
    for task in ("caption", "vqa", "depth", "semseg", "detection", "text_to_image"):
        assert f"<h2 id='task-{task}'>{task}</h2>" in html
        png = tmp_path / "report" / f"examples_{task}.png"
        assert f"src='examples_{task}.png'" in html and png.is_file()
        with Image.open(png) as im:
            assert im.width == 3 * (192 + 12) + (192 + 12) * (task == "vqa")  # inputs + prediction + truth columns
            assert im.height > 3 * 192
    assert "<img src='curves.png'" in html and (tmp_path / "report" / "curves.png").is_file()
    assert "<td>semseg</td><td>per_class_iou/circle</td><td class='num'>n/a</td>" in html
    assert json.loads((tmp_path / "report" / "results.json").read_text()) == RESULTS
    assert "| caption | bleu_4 | 0.5123 |" in (tmp_path / "report" / "metrics.md").read_text()


def test_write_report_without_log_or_examples(tmp_path):
    html = write_report(tmp_path, {"vqa": {"accuracy": 1.0}}, None, None).read_text()
    assert "No metrics log given." in html and "examples_" not in html


def test_metrics_markdown_table_exact():
    results = {"vqa": {"accuracy": 0.96875, "num_questions": 320}, "semseg": {"per_class_iou": [1.0, None]}}
    table = metrics_markdown_table(results)
    assert table == (
        "| task | metric | value |\n| --- | --- | --- |\n"
        "| vqa | accuracy | 0.9688 |\n| vqa | num_questions | 320 |\n"
        "| semseg | per_class_iou[0] | 1 |\n| semseg | per_class_iou[1] | n/a |\n"
    )
    html = metrics_html_table({"x": {"a<b": 1.0}})
    assert html.count("<tr>") == 2 and "a&lt;b" in html


def test_colorize_depth_and_semseg():
    d = np.array([[1.0, 5.0], [10.0, 0.0]])
    rgb = colorize_depth(d)
    assert rgb.shape == (2, 2, 3) and rgb.dtype == np.uint8
    assert rgb[0, 0].astype(int).sum() > rgb[0, 1].astype(int).sum() > rgb[1, 0].astype(int).sum()  # near = bright
    assert rgb[1, 1].tolist() == [0, 0, 0]  # invalid depth is black
    seg = colorize_semseg(np.array([[0, 1], [2, 3]]))
    assert seg[0, 0].tolist() == [0, 0, 0]
    assert len({tuple(seg[i, j]) for i in range(2) for j in range(2)}) == 4


def test_line_chart_draws_each_series():
    im = line_chart({"a": ([0, 1, 2], [3.0, 2.0, 1.0]), "b": ([0, 2], [1.0, None])}, title="loss")
    px = np.asarray(im)
    assert im.size == (520, 300 + 15)
    assert (np.all(px == (31, 119, 180), axis=-1)).sum() > 50  # series "a" line in its colour
    assert (np.all(px == (255, 127, 14), axis=-1)).sum() > 5  # series "b": one point + legend swatch


def test_training_curves_groups():
    recs = [{"step": 1, "time": 0.1, "lr": 1e-3, "train/loss": 2.0, "val/loss": 2.1}]
    recs[0].update({"train/loss/rgb": 3.0, "val/loss/rgb": 3.1})
    groups = _chart_groups(recs)
    assert groups == {
        "lr": ["lr"],
        "loss": ["train/loss", "val/loss"],
        "train/loss per modality": ["train/loss/rgb"],
        "val/loss per modality": ["val/loss/rgb"],
    }
    assert training_curves(recs).size == (2 * 520, 2 * (300 + 15))
    with pytest.raises(ValueError, match="no numeric series"):
        training_curves([{"step": 1, "time": 2.0}])


def test_example_grid_validation():
    with pytest.raises(ValueError, match="no examples"):
        example_grid([])
    with pytest.raises(TypeError, match="inputs"):
        example_grid([{"inputs": {}}])
