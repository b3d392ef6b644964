"""The evaluator, tested with stand-in pipelines: an oracle that returns the ground truth must score perfectly,
one that answers wrongly must score low. (These fakes live only here; the library evaluates real pipelines.)"""

import hashlib

import numpy as np
import pytest

from training.data.shapes import generate_split, make_shapes_dataset
from training.evaluation.evaluate import TASKS, available_tasks, evaluate, evaluate_samples


def _key(image):
    return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


class OraclePipeline:
    """Looks every image / prompt up in the dataset and returns its ground truth."""

    modalities = ("rgb", "depth", "semseg", "caption", "question", "answer", "det")

    def __init__(self, samples):
        self.by_image = {_key(s["rgb"]): s for s in samples}
        self.by_prompt = {s["caption"]: s for s in samples}
        self.calls = []

    def _get(self, images):
        return [self.by_image[_key(im)] for im in images]

    def caption(self, images, **kw):
        return [s["caption"] for s in self._get(images)]

    def answer(self, images, questions, **kw):
        out = []
        for s, q in zip(self._get(images), questions):
            out.append(next(qa["answer"] for qa in s["qa"] if qa["question"] == q))
        return out

    def depth(self, images, **kw):
        return [s["depth"].copy() for s in self._get(images)]

    def segment(self, images, **kw):
        return [s["semseg"].astype(np.int64) for s in self._get(images)]

    def detect(self, images, **kw):
        return [[dict(b, score=1.0) for b in s["boxes"]] for s in self._get(images)]

    def text_to_image(self, prompts, **kw):
        self.calls.append(kw)
        return [self.by_prompt[p]["rgb"] for p in prompts]


class WrongPipeline(OraclePipeline):
    """Same interface, systematically wrong answers."""

    def caption(self, images, **kw):
        return ["a picture of a large white square." for _ in images]

    def answer(self, images, questions, **kw):
        return ["purple" for _ in questions]

    def depth(self, images, **kw):
        return [np.full(im.shape[:2], 0.3, np.float32) for im in images]

    def segment(self, images, **kw):
        return [np.zeros(im.shape[:2], np.int64) for im in images]

    def detect(self, images, **kw):
        return [[{"box": [0, 0, 8, 8], "label": "triangle", "score": 0.9}] for _ in images]

    def text_to_image(self, prompts, **kw):
        return [np.full((64, 64, 3), 30, np.uint8) for _ in prompts]


class IdentityTokenizer:
    """A lossless "tokenizer" for semseg: one token per pixel, the class id."""

    vocab_size = 16

    def encode(self, x):
        x = np.asarray(x)
        return x.reshape(x.shape[0], -1).astype(np.int64)

    def decode(self, ids):
        ids = np.asarray(ids)
        side = int(np.sqrt(ids.shape[1]))
        return ids.reshape(-1, side, side).astype(np.uint8)


@pytest.fixture(scope="module")
def samples():
    return list(generate_split("test", 12))


def test_oracle_scores_perfect(samples):
    pipe = OraclePipeline(samples)
    ev = evaluate_samples(pipe, samples, batch_size=5, num_examples=2, progress=False)
    r = ev.results
    assert r["caption"]["bleu_4"] == pytest.approx(1.0, abs=1e-6) and r["caption"]["rouge_l"] == pytest.approx(1.0)
    assert r["caption_attributes"]["f1"] == 1.0
    assert r["vqa"]["accuracy"] == 1.0 and r["vqa"]["num_questions"] == sum(len(s["qa"]) for s in samples)
    assert r["depth"]["delta1"] == 1.0 and r["depth"]["abs_rel"] == 0.0
    assert r["semseg"]["miou"] == 1.0 and r["semseg"]["pixel_accuracy"] == 1.0
    assert r["detection"]["map_50"] == pytest.approx(1.0) and r["detection"]["map_50_95"] == pytest.approx(1.0)
    assert r["text_to_image"]["accuracy"] == 1.0 and r["judge_on_real"]["scene_accuracy"] == 1.0
    assert all("seconds" in v for v in r.values())
    assert set(ev.examples) == {"caption", "vqa", "depth", "semseg", "detection", "text_to_image"}
    assert all(len(v) == 2 for v in ev.examples.values())
    assert [c["seed"] for c in pipe.calls] == [0, 5, 10]  # text->image seeds continue across batches


def test_wrong_pipeline_scores_low(samples):
    r = evaluate_samples(WrongPipeline(samples), samples, progress=False).results
    assert r["caption"]["cider"] < 1.0 and r["caption_attributes"]["f1"] < 0.2
    assert r["vqa"]["accuracy"] < 0.1
    assert r["depth"]["delta1"] == 0.0
    assert r["semseg"]["miou"] < 0.3
    assert r["detection"]["map_50"] == 0.0
    assert r["text_to_image"]["accuracy"] == 0.0
    assert r["judge_on_real"]["scene_accuracy"] == 1.0  # the judge itself is still right on real images


def test_evaluate_reads_a_dataset_directory(tmp_path):
    make_shapes_dataset(tmp_path / "shapes", num_train=0, num_val=0, num_test=6, progress=False)
    samples = list(generate_split("test", 6))
    ev = evaluate(OraclePipeline(samples), tmp_path / "shapes", tasks=["semseg", "detection"], limit=4, progress=False)
    assert set(ev.results) == {"semseg", "detection"}
    assert set(ev.results["semseg"]["per_class_iou"]) == {"background", "circle", "square", "triangle"}
    assert ev.results["semseg"]["miou"] == 1.0 and ev.results["detection"]["num_images"] == 4


def test_task_selection_and_errors(samples):
    pipe = OraclePipeline(samples)
    assert available_tasks(pipe, samples) == [t for t in TASKS if t != "tokenizers"]
    no_depth = [{k: v for k, v in s.items() if k != "depth"} for s in samples]
    assert "depth" not in available_tasks(pipe, no_depth)
    with pytest.raises(ValueError, match="needs \\['depth'\\]"):
        evaluate_samples(pipe, no_depth, ["depth"], progress=False)
    with pytest.raises(ValueError, match="unknown task"):
        evaluate_samples(pipe, samples, ["colorize"], progress=False)
    with pytest.raises(ValueError, match="tokenizers"):
        evaluate_samples(pipe, samples, ["tokenizers"], progress=False)


def test_tokenizer_round_trip(samples):
    pipe = OraclePipeline(samples)
    pipe.tokenizers = {"semseg": IdentityTokenizer()}
    ev = evaluate_samples(pipe, samples, ["tokenizers"], progress=False)
    r = ev.results["tokenizer_semseg"]
    assert r["pixel_accuracy"] == 1.0 and r["miou"] == 1.0
    assert r["usage"] == pytest.approx(4 / 16)  # shapes uses class ids 0..3
    assert len(ev.examples["tokenizer_semseg"]) == 4


def test_eval_command_writes_results_and_report(tmp_path, monkeypatch, capsys):
    from onemodel import cli
    from onemodel.pipeline import OneModelPipeline

    make_shapes_dataset(tmp_path / "shapes", num_train=0, num_val=0, num_test=4, progress=False)
    oracle = OraclePipeline(list(generate_split("test", 4)))
    seen = {}

    def fake_from_pretrained(path, device=None):
        seen["path"], seen["device"] = path, device
        return oracle

    monkeypatch.setattr(OneModelPipeline, "from_pretrained", staticmethod(fake_from_pretrained))
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "metrics.jsonl").write_text('{"step": 1, "train/loss": 2.0}\n{"step": 2, "train/loss": 1.0}\n')
    argv = ["eval", "--model", str(run_dir), "--data", str(tmp_path / "shapes"), "--tasks", "vqa", "depth",
            "--no-progress", "--device", "cpu"]  # fmt: skip
    assert cli.main(argv) == 0
    assert seen == {"path": run_dir, "device": "cpu"}
    printed = capsys.readouterr().out
    assert "| vqa | accuracy | 1 |" in printed and "| depth | delta1 | 1 |" in printed
    out = run_dir / "eval"
    written = {p.name for p in out.iterdir()}
    assert {"results.json", "metrics.md", "report.html", "curves.png", "examples_vqa.png"} <= written
    assert cli.main(["eval", "--model", str(tmp_path / "missing"), "--data", str(tmp_path / "shapes")]) == 2
