"""Regenerate docs/images/neuron_page.png: one neuron page of the trained FashionInception.

    .venv/bin/python docs/images/make_neuron_page.py [--neuron mixed3b:60] [--steps 128]

Builds the pages for one neuron (top 24 inputs per upstream layer), opens the page in the
system's headless Chromium (/usr/bin/chromium, driven by Playwright) and writes the top of
the page, 1200x1100 px, to docs/images/neuron_page.png.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch

from circuits.figures.pages import build_pages
from circuits.layers import parse_target
from circuits.models import load_model

HERE = Path(__file__).resolve().parent
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--neuron", default="mixed3b:60")
    ap.add_argument("--steps", type=int, default=128)
    ap.add_argument("--top-k", type=int, default=24)
    ap.add_argument("--out", default=str(HERE / "neuron_page.png"))
    ap.add_argument("--weights", default=None, help="a FashionInception checkpoint (default: the bundled trained one)")
    args = ap.parse_args()
    torch.set_num_threads(1)
    t = parse_target(args.neuron)
    model = load_model("fashion-inception", weights=args.weights)
    with tempfile.TemporaryDirectory() as tmp:
        build_pages(model, [t.layer], tmp, neurons=[args.neuron], top_k=args.top_k,
                    render_kwargs={"steps": args.steps}, dataset_size=2000)
        from playwright.sync_api import sync_playwright

        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", args=ARGS)
            page = browser.new_page(viewport={"width": 1200, "height": 1100})
            page.goto((Path(tmp) / "layers" / t.layer / f"{t.channel}.html").as_uri(), wait_until="load")
            page.screenshot(path=args.out)
            browser.close()
    print(args.out)


if __name__ == "__main__":
    main()
