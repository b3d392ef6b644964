"""Screenshot of the web demo: serve a model, click a held-out example in one tab, run it, save the page.

    python scripts/web_screenshot.py --model runs/demo/run --out docs/images/web_demo.png
    python scripts/web_screenshot.py --model runs/demo/run --tab depth --out /tmp/depth_tab.png

Needs the web extra and Playwright (``pip install -e ".[dev]"``) and a Chromium (``/usr/bin/chromium`` by default).
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
TABS = {  # tab -> (tab label, input element id, button id, status id)
    "caption": ("Caption", "caption-image", "caption-button", "status-caption"),
    "ask": ("Ask", "ask-image", "ask-button", "status-ask"),
    "depth": ("Depth", "depth-image", "depth-button", "status-depth"),
    "segment": ("Segmentation", "segment-image", "segment-button", "status-segment"),
    "detect": ("Detection", "detect-image", "detect-button", "status-detect"),
}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="trained run directory")
    p.add_argument("--out", required=True, help="PNG to write")
    p.add_argument("--tab", choices=sorted(TABS), default="ask")
    p.add_argument("--example", type=int, default=0, help="which held-out example to click (0 = first)")
    p.add_argument("--examples", default=None, help="passed on to onemodel serve (default: the run's held-out split)")
    p.add_argument("--chromium", default="/usr/bin/chromium", help="Chromium executable")
    args = p.parse_args()

    from playwright.sync_api import expect, sync_playwright

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
    server = subprocess.Popen([sys.executable, "-m", "onemodel.cli", "serve", "--model", args.model,
                               "--port", str(port), "--threads", "1",
                               *(["--examples", args.examples] if args.examples else [])], env=env)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + 180
        while True:
            try:
                urllib.request.urlopen(url, timeout=2).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    print("onemodel serve did not start", file=sys.stderr)
                    return 1
                time.sleep(0.5)
        label, image_id, button, status = TABS[args.tab]
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=args.chromium, args=["--no-sandbox"])
            page = browser.new_page(viewport={"width": 1100, "height": 720})
            page.goto(url)
            page.get_by_role("tab", name=label, exact=True).click()
            panel = page.locator(f"#{image_id}").locator("xpath=ancestor::div[contains(@class, 'tabitem')]")
            panel.locator(".gallery-item, tr.tr-body").nth(args.example).click()  # one-input examples: a gallery; several: a table
            expect(page.locator(f"#{image_id} img")).to_be_visible(timeout=30_000)  # the example is loaded
            page.click(f"#{button}")
            expect(page.locator(f"#{status}")).to_contain_text("done in", timeout=120_000)
            page.wait_for_timeout(500)  # let the output image finish loading
            Path(args.out).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.out)  # the viewport: the tab and its first examples
            browser.close()
        print(f"wrote {args.out}")
        return 0
    finally:
        server.terminate()
        server.wait(timeout=30)


if __name__ == "__main__":
    sys.exit(main())
