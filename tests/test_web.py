"""``onemodel serve``: the Gradio app driven in a real headless Chromium, plus its example discovery and errors.

The browser tests start ``onemodel serve`` on a free localhost port with a tiny random model and drive the page
through Playwright with the system Chromium (``/usr/bin/chromium``; ``.ci/run`` installs it). They are skipped,
saying why, only when no browser or no Playwright is available.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from onemodel.cli import main
from onemodel.modalities import Modality
from onemodel.model import OneModel, OneModelConfig
from onemodel.pipeline import OneModelPipeline
from training.data.shapes import generate_sample, make_shapes_dataset

pytestmark = pytest.mark.usefixtures("one_torch_thread")
gradio = pytest.importorskip("gradio", reason='the web demo needs gradio: pip install -e ".[web]"')

REPO = Path(__file__).resolve().parent.parent
WAIT_MS = 60_000


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny random model saved like a training run, whose train_config.json leads to raw held-out shards."""
    from test_pipeline import _bundle

    root = tmp_path_factory.mktemp("web")
    make_shapes_dataset(root / "data", num_train=4, num_val=2, num_test=3, resolution=32, progress=False)
    tokens = root / "tokens"
    tokens.mkdir()
    (tokens / "meta.json").write_text(json.dumps({"source": str(root / "data")}))
    samples = [generate_sample(i, resolution=32) for i in range(20)]
    bundle = _bundle(samples)
    mods = tuple(Modality(**s) for s in bundle.modalities({"caption": 24, "question": 12, "answer": 4, "det": 16}))
    torch.manual_seed(0)
    model = OneModel(OneModelConfig(modalities=mods, dim=32, encoder_depth=1, decoder_depth=1, num_heads=2,
                                    init_std=0.2, init="trunc_normal"))
    run = root / "run"
    model.save_pretrained(run / "model")
    bundle.save_pretrained(run / "model" / "tokenizers")
    (run / "model" / "train_config.json").write_text(json.dumps({"data": {"sources": [{"path": str(tokens)}]}}))
    Image.fromarray(generate_sample(20_000_001, resolution=32)["rgb"]).save(root / "scene.png")
    return run


# ------------------------------------------------------------------------------------------------ no browser


def test_examples_come_from_the_held_out_split(run_dir, tmp_path):
    from onemodel.web import find_examples, load_examples

    source = find_examples(run_dir)
    assert source == run_dir.parent / "data" / "test"
    examples = load_examples(source, tmp_path, limit=2)
    assert len(examples) == 2
    test_captions = [generate_sample(20_000_000 + i, resolution=32)["caption"] for i in range(3)]
    for ex in examples:
        assert Image.open(ex.image).size == (32, 32)
        assert ex.caption in test_captions and ex.questions
    folder = tmp_path / "imgs"
    folder.mkdir()
    Image.new("RGB", (8, 8)).save(folder / "a.png")
    assert [Path(e.image).name for e in load_examples(folder, tmp_path / "out")] == ["a.png"]
    with pytest.raises(ValueError, match="no examples"):
        load_examples(tmp_path / "out" / "a.png", tmp_path / "out2")


def test_tabs_follow_the_pipeline_methods():
    from onemodel.web import build_app

    def tabs(pipe):
        return [b.label for b in build_app(pipe).blocks.values() if type(b).__name__ == "Tab"]

    class CaptionOnly:
        def caption(self, image):
            return "a red circle"

    class VLMLike:  # what onemodel's VLM pipeline offers: names of its modalities, caption and answer
        modalities = ("rgb", "caption", "question", "answer")

        def caption(self, image):
            return "a red circle"

        def answer(self, image, question):
            return "red"

        def depth(self, image):  # a method without its modality: no Depth tab
            raise AssertionError

    assert tabs(CaptionOnly()) == ["Caption"]
    assert tabs(VLMLike()) == ["Caption", "Ask"]


def test_bad_input_is_one_line_in_the_page():
    from onemodel.web import _timed

    def boom(x):
        raise ValueError("question 0 is empty; ask something")

    out = _timed(boom, 1)("x")
    assert out == (None, "**error:** question 0 is empty; ask something")
    ok = _timed(lambda x: (x * 2,), 1)(3)
    assert ok[0] == 6 and ok[1].startswith("done in ")


def test_serve_bad_model_dir_is_one_line(tmp_path, capsys):
    assert main(["serve", "--model", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "does not exist" in err


def test_serve_port_in_use_is_one_line(run_dir, capsys):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        assert main(["serve", "--model", str(run_dir), "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"127.0.0.1:{port}" in err and "pass another --port" in err


# ------------------------------------------------------------------------------------------------ browser


def _browser() -> str | None:
    for cand in (os.environ.get("CHROMIUM"), "/usr/bin/chromium", shutil.which("chromium"),
                 shutil.which("chromium-browser"), shutil.which("google-chrome")):
        if cand and Path(cand).is_file():
            return cand
    return None


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(run_dir):
    """The URL of a running ``onemodel serve`` on a free port (started and stopped here)."""
    port = _free_port()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
           "GRADIO_ANALYTICS_ENABLED": "False"}
    log_path = run_dir.parent / "serve.log"
    with open(log_path, "w") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "onemodel.cli", "serve", "--model", str(run_dir), "--port", str(port),
             "--threads", "1"],
            stdout=log, stderr=subprocess.STDOUT, env=env, cwd=run_dir.parent,
        )
        url = f"http://127.0.0.1:{port}/"
        try:
            deadline = time.monotonic() + 120
            while True:
                try:
                    urllib.request.urlopen(url, timeout=2).close()
                    break
                except OSError:
                    if proc.poll() is not None or time.monotonic() > deadline:
                        raise RuntimeError("onemodel serve did not start:\n" + log_path.read_text())
                    time.sleep(0.5)
            yield url
        finally:
            proc.terminate()
            proc.wait(timeout=30)


@pytest.fixture(scope="module")
def page(server):
    """A headless Chromium page on the app."""
    sync_api = pytest.importorskip("playwright.sync_api", reason="no Playwright: pip install -e '.[dev]'")
    exe = _browser()
    if exe is None:
        pytest.skip("no Chromium browser found (apt-get install chromium, or set CHROMIUM=path): browser tests skipped")
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=exe, args=["--no-sandbox"])
        pg = browser.new_page(viewport={"width": 1200, "height": 900})
        pg.goto(server)
        yield pg
        browser.close()


@pytest.fixture(scope="module")
def pipe(run_dir):
    return OneModelPipeline.from_pretrained(run_dir, device="cpu")


def _wait_status(page, name: str, text: str) -> str:
    from playwright.sync_api import expect

    status = page.locator(f"#status-{name}")
    expect(status).to_contain_text(text, timeout=WAIT_MS)
    return status.inner_text()


def _fetch_image(page, selector: str) -> Image.Image:
    src = page.locator(selector).get_attribute("src")
    return Image.open(io.BytesIO(page.request.get(src).body()))


def test_caption_and_ask_in_the_browser(page, pipe, run_dir, tmp_path):
    from onemodel.web import EMPTY_TEXT

    scene = str(run_dir.parent / "scene.png")
    page.get_by_role("tab", name="Caption").click()
    page.locator("#caption-image input[type=file]").set_input_files(scene)
    page.click("#caption-button")
    assert _wait_status(page, "caption", "done in").endswith(" s")
    caption = page.locator("#caption-output textarea").input_value()
    assert caption and caption == (pipe.caption(scene) or EMPTY_TEXT)  # the page shows the model's greedy caption

    page.get_by_role("tab", name="Ask").click()
    page.locator("#ask-image input[type=file]").set_input_files(scene)
    page.fill("#ask-question textarea", "what color is the circle?")
    page.click("#ask-button")
    _wait_status(page, "ask", "done in")
    answer = pipe.answer(scene, "what color is the circle?") or EMPTY_TEXT
    assert page.locator("#ask-output textarea").input_value() == answer

    page.fill("#ask-question textarea", "   ")  # a bad input: the pipeline's one-line error, no traceback
    page.click("#ask-button")
    shown = _wait_status(page, "ask", "error")
    assert "question 0 is empty" in shown and "Traceback" not in page.content()
    page.screenshot(path=str(tmp_path / "ask.png"))


def test_example_click_then_detection(page, pipe):
    from playwright.sync_api import expect

    page.get_by_role("tab", name="Detection").click()
    panel = page.locator("#detect-image").locator("xpath=ancestor::div[contains(@class, 'tabitem')]")
    panel.locator(".gallery-item, tr.tr-body").first.click()  # the first held-out example
    expect(page.locator("#detect-image img")).to_be_visible(timeout=WAIT_MS)  # ... is in the input box
    page.click("#detect-button")
    _wait_status(page, "detect", "done in")
    boxes_img = _fetch_image(page, "#detect-output img")
    assert boxes_img.size == (256, 256)  # the 32 px input, enlarged, with its boxes drawn


def test_text_to_image_in_the_browser(page, pipe, tmp_path):
    from onemodel.web import _enlarge

    page.get_by_role("tab", name="Text to image").click()
    page.fill("#t2i-prompt textarea", "a large red circle")
    page.click("#t2i-button")
    _wait_status(page, "t2i", "done in")
    got = np.asarray(_fetch_image(page, "#t2i-output img").convert("RGB"))
    want = np.asarray(_enlarge(pipe.text_to_image("a large red circle", steps=8, guidance_scale=3.0, seed=0)))
    assert got.shape == want.shape == (256, 256, 3)
    assert np.array_equal(got, want)  # the image in the page is the pipeline's image for that seed
    page.screenshot(path=str(tmp_path / "t2i.png"))


def test_any_to_any_through_the_api(server, pipe, run_dir):
    """The Any to any handler (what its Run button calls), through Gradio's client: every target comes back."""
    from gradio_client import Client, handle_file

    from onemodel.web import EMPTY_TEXT

    client = Client(server, verbose=False)
    scene = str(run_dir.parent / "scene.png")
    names = list(pipe.modalities)
    values = {name: None for name in names}
    values["rgb"] = handle_file(scene)
    gallery, texts, status = client.predict(["rgb"], ["caption", "depth", "det"], 2, 0.0, 0,
                                            *values.values(), api_name="/generate")
    assert status.startswith("done in ")
    assert [g["caption"] for g in gallery] == ["depth", "det"]  # image outputs, in target order
    want = pipe.generate({"rgb": scene}, ["caption", "depth", "det"], steps=2, seed=0,
                         per_target={"caption": {"temperature": 0.0}, "depth": {"temperature": 0.0},
                                     "det": {"temperature": 0.0}})
    assert texts["caption"] == want["caption"] and texts["det"] == want["det"]
    caption, status = client.predict(handle_file(scene), api_name="/caption")  # as docs/web.md shows
    assert caption == (pipe.caption(scene) or EMPTY_TEXT) and status.startswith("done in ")
    *_, status = client.predict(["rgb"], ["rgb"], 2, 0.0, 0, *values.values(), api_name="/generate")
    assert status == "**error:** ['rgb'] given both as input and as target; a modality is either given or " \
        "generated: remove it from inputs or from targets"
