"""The README's main command on a user's own model: ``circuits explore --model NAME`` for a
ResNet-50 and a vision transformer (random init, offline) builds a site whose every link and
image resolves, loaded page by page in headless system Chromium (issue 14).

The budgets are cut (``--steps 1 --size 32``, two neurons per layer, three connections) so the
test runs in about a minute per model on two cores; they change the pictures, not the site's
structure: layers, upstream layers, pages and links are the command's defaults.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from chromium import ARGS, CHROMIUM, LABELS_OVERLAP, watched_page

from circuits.cli import main

CUT_BUDGETS = ["--per-layer", "2", "--top-k", "3", "--outgoing", "3", "--steps", "1", "--size", "32",
               "--dataset-size", "8", "--examples", "2"]

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module", params=["resnet50", "timm:vit_tiny_patch16_224"])
def own_site(request, tmp_path_factory) -> tuple[str, Path]:
    name = request.param
    if name.startswith("timm:"):
        pytest.importorskip("timm", reason="timm is an optional extra (pip install 'torch-circuits[timm]')")
    out = tmp_path_factory.mktemp("site")
    cache = tmp_path_factory.mktemp("fv")
    assert main(["explore", "--model", name, *CUT_BUDGETS, "--cache", str(cache), "--out", str(out), "--quiet"]) == 0
    return name, out


def _local_refs(html_file: Path) -> list[str]:
    text = html_file.read_text()
    return [s for s in re.findall(r'(?:src|href)="([^"#]+)"', text) if not s.startswith("data:")]


def test_own_model_site_structure(own_site):
    name, site = own_site
    pages = sorted(site.rglob("*.html"))
    layers = sorted(p.parent.name for p in site.glob("layers/*/index.html"))
    assert len(layers) >= 3, layers  # the paged layers and their upstream layers
    neuron_pages = [p for p in pages if p.stem.isdigit()]
    assert len(neuron_pages) >= 6  # two full pages in each of three paged layers, plus upstream pages
    for html_file in pages:
        for ref in _local_refs(html_file):
            assert not ref.startswith(("/", "http", "file:")), (html_file, ref)
            assert (html_file.parent / ref).resolve().is_file(), (html_file, ref)
    full = [p for p in neuron_pages if "Incoming" in p.read_text()]
    assert len(full) >= 6, name
    if name.startswith("timm:vit"):  # feature d of the patch tokens, named by the model's own modules
        assert all(p.parent.name.startswith(("blocks.", "patch_embed")) for p in neuron_pages)


def test_own_model_site_in_chromium(own_site):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (Debian packages chromium, chromium-driver)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    name, site = own_site
    problems: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = watched_page(browser, problems)
            images = 0
            for html_file in sorted(site.rglob("*.html")):  # every page of the site
                page.goto(html_file.as_uri(), wait_until="load")
                broken = page.eval_on_selector_all(
                    "img", "imgs => imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src.slice(0, 80))")
                problems.extend(f"broken image {b} on {html_file.relative_to(site)}" for b in broken)
                images += page.eval_on_selector_all("img", "imgs => imgs.length")
                n, bad = page.evaluate(LABELS_OVERLAP)
                problems.extend(f"labels overlap on {html_file.relative_to(site)}: {b}" for b in bad)
            assert images >= 20
            # the search box finds a paged neuron and opens it
            page.goto((site / "index.html").as_uri(), wait_until="load")
            first = next(p for p in sorted(site.glob("layers/*/*.html")) if p.stem.isdigit() and "Incoming" in p.read_text())
            page.fill("#search", f"{first.parent.name}:{first.stem}")
            results = page.locator("#results a")
            assert results.count() >= 1
            page.press("#search", "Enter")
            page.wait_for_load_state("load")
            assert page.url.endswith(f"/layers/{first.parent.name}/{first.stem}.html"), (name, page.url)
        finally:
            browser.close()
    assert not problems, (name, problems[:10])
