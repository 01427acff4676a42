"""Neuron pages in a real browser: headless system Chromium loads the site from disk and
follows links, with no console errors, no failed requests and no broken images."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest
import torch

from circuits.figures import pages as pages_module
from circuits.figures.pages import PageData, build_pages, compute_pages, write_pages
from circuits.figures.sections import connections_to, layer_sections
from circuits.wiring import concat_branches, default_upstream, select_neurons
from circuits.models import FASHION_WEIGHTS, FashionInception, load_model

from chromium import ARGS, CHROMIUM, LABELS_OVERLAP, watched_page


@pytest.fixture(scope="module")
def model():
    if FASHION_WEIGHTS.is_file():
        return load_model()
    torch.manual_seed(0)  # only while the trained checkpoint is being produced
    return FashionInception().eval()


@pytest.fixture(scope="module")
def site(model, tmp_path_factory) -> Path:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny convolutions: threads only cost time on a shared CPU
    try:
        out = tmp_path_factory.mktemp("site")
        index = build_pages(
            model, ["mixed3a", "mixed3b", "mixed4a"], out,
            neurons={"mixed3a": [40, 100], "mixed3b": [60, 120], "mixed4a": [0, 100]},
            top_k=6, render_kwargs={"steps": 4}, cache=tmp_path_factory.mktemp("fv"), dataset_size=64,
            n_examples=4, n_outgoing=6, progress=False,
        )
    finally:
        torch.set_num_threads(threads)
    assert index == out / "index.html"
    return out


def test_default_choices(model):
    assert default_upstream(model, "mixed3b") == ["mixed3a", "mixed3b_3x3_bottleneck", "mixed3b_5x5_bottleneck"]
    assert [b[0] for b in concat_branches(model, "mixed3a")] == ["mixed3a_1x1", "mixed3a_3x3", "mixed3a_5x5", "mixed3a_pool_reduce"]
    assert select_neurons(model, ["mixed3b"], 4) == {"mixed3b": [20, 60, 100, 140]}
    with pytest.raises(ValueError, match="0..159"):
        select_neurons(model, ["mixed3b"], ["mixed3b:160"])


def test_connections_direct_and_expanded(model):
    from circuits.expanded import connection_weights

    found = connections_to(model, "mixed3b_3x3_bottleneck", "mixed3b", [5, 60])
    assert list(found) == [60]  # the 1x1-branch neuron 5 is not reached from this bottleneck
    w, kind = found[60]
    assert kind == "direct"
    conv = dict(model.named_modules())["mixed3b_3x3_pre_relu_conv"]
    np.testing.assert_array_equal(w, conv.weight.detach().numpy()[60 - 48].astype(np.float64))
    found = connections_to(model, "mixed3a", "mixed3b", [5, 60, 120])
    assert found[5][1] == "direct" and found[5][0].shape == (112, 1, 1)
    assert found[60][1] == "expanded" and found[60][0].shape == (112, 3, 3)
    ref = connection_weights(model, "mixed3a", "mixed3b_3x3", channels=[12]).weights[0].numpy()
    np.testing.assert_allclose(found[60][0], ref, rtol=1e-6, atol=1e-9)
    assert found[120][0].shape == (112, 5, 5)


def test_precomputed_sections_are_used_as_given(model, tmp_path, monkeypatch):
    """``build_pages(precomputed=...)`` (deprecated alias of ``compute_pages(sections=...)``)
    takes a layer's sections from the argument (the same site as computing them), and
    computes only layers the argument does not cover."""
    kw = dict(neurons={"mixed3a": [40]}, top_k=3, render_kwargs={"steps": 1}, cache=tmp_path / "fv",
              dataset=False, progress=False)
    secs = layer_sections(model, "mixed3a", [40], default_upstream(model, "mixed3a"), top_k=3)
    assert list(secs) == [40] and secs[40]
    assert {s.upstream for s in secs[40]} <= set(default_upstream(model, "mixed3a"))
    assert all(len(s.channels) == len(s.slices) == len(s.norms) <= 3 for s in secs[40])
    computed = build_pages(model, ["mixed3a"], tmp_path / "a", **kw).parent

    def no_compute(*args, **kwargs):
        raise AssertionError("layer_sections called although the sections were given")

    monkeypatch.setattr(pages_module, "layer_connections", no_compute)
    with pytest.warns(DeprecationWarning, match="compute_pages"):
        given = build_pages(model, ["mixed3a"], tmp_path / "b", precomputed={"mixed3a": secs}, **kw).parent
    files = sorted(str(p.relative_to(computed)) for p in computed.rglob("*") if p.is_file())
    assert files == sorted(str(p.relative_to(given)) for p in given.rglob("*") if p.is_file())
    for rel in files:
        assert (computed / rel).read_bytes() == (given / rel).read_bytes(), rel
    # a layer whose chosen channels are not all given is computed
    with pytest.raises(AssertionError, match="layer_sections called"), pytest.warns(DeprecationWarning):
        build_pages(model, ["mixed3a"], tmp_path / "c", precomputed={"mixed3a": {41: secs[40]}}, **kw)
    # compute then write is build: and the parts joined by PageData.build write the same site
    data = compute_pages(model, ["mixed3a"], neurons={"mixed3a": [40]}, top_k=3, steps=1, cache=tmp_path / "fv",
                         dataset=None, sections={"mixed3a": secs}, progress=False)
    assert data.settings.render == {"steps": 1} and data.settings.top_k == 3
    joined = PageData.build(model, data.full, data.upstream, {("mixed3a", 40): secs[40]}, data.settings,
                            images=data.images, vis_values=data.vis_values)
    for part, out in ((data, tmp_path / "d"), (joined, tmp_path / "e")):
        write_pages(part, out, progress=False)
        assert sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()) == files
        for rel in files:
            assert (computed / rel).read_bytes() == (out / rel).read_bytes(), rel


def test_site_structure(site):
    index = (site / "index.html").read_text()
    assert "http://" not in index and "https://" not in index and "<script src" not in index
    page = (site / "layers/mixed3b/60.html").read_text()
    # the 3x3-branch neuron: expanded weights from mixed3a, direct from its own bottleneck
    assert "mixed3a → mixed3b:60" in page and "expanded weights, 3×3" in page
    assert "mixed3b_3x3_bottleneck → mixed3b:60" in page and "direct weights, 3×3" in page
    assert "mixed3b_5x5_bottleneck → mixed3b:60" not in page
    # outgoing: mixed3b is the last paged layer before mixed4a, which shows it
    assert "Outgoing → mixed4a" in page and "Incoming" in page
    # mixed4a feeds the logits: its outgoing connections are the classes
    assert "Outgoing → logits" in (site / "layers/mixed4a/100.html").read_text()
    assert "Sandal" in (site / "layers/mixed4a/100.html").read_text() or "Sneaker" in (site / "layers/mixed4a/100.html").read_text()
    # 1x1 and pool-blocked weights are bars, not heatmaps, and are not factored
    pool = (site / "layers/mixed4a/0.html").read_text()
    assert "class=\"bars\"" in pool and "NMF factors explain" not in pool.split("Incoming")[1]
    for html_file in site.rglob("*.html"):
        text = html_file.read_text()
        for s in re.findall(r'(?:src|href)="([^"#]+)"', text):
            if s.startswith("data:"):
                continue
            assert not s.startswith(("/", "http", "file:")), (html_file, s)
            assert (html_file.parent / s).resolve().is_file(), (html_file, s)


def test_pages_in_chromium(site, tmp_path):
    if not CHROMIUM.exists():
        pytest.skip(f"{CHROMIUM} is not installed (Debian packages chromium, chromium-driver)")
    sync_api = pytest.importorskip("playwright.sync_api", reason="the playwright Python package is not installed")
    problems: list[str] = []

    def check_images(page) -> int:
        broken = page.eval_on_selector_all("img", "imgs => imgs.filter(i => !(i.complete && i.naturalWidth > 0)).map(i => i.src.slice(0, 80))")
        problems.extend(f"broken image {b} on {page.url}" for b in broken)
        return page.eval_on_selector_all("img", "imgs => imgs.length")

    def check_labels(page) -> None:
        n, bad = page.evaluate(LABELS_OVERLAP)
        assert n >= 5, page.url
        problems.extend(f"labels overlap on {page.url}: {b}" for b in bad)

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=str(CHROMIUM), args=ARGS)
        try:
            page = watched_page(browser, problems)
            page.goto((site / "index.html").as_uri(), wait_until="load")
            assert "neuron pages" in page.title()
            assert check_images(page) >= 4
            check_labels(page)

            # the search box finds a neuron by a short name; Enter opens it
            page.fill("#search", "3b:60")
            results = page.locator("#results a")
            assert results.count() >= 1 and results.first.inner_text().startswith("mixed3b:60")
            page.press("#search", "Enter")
            page.wait_for_load_state("load")
            assert page.url.endswith("/layers/mixed3b/60.html")
            assert page.locator("h1").inner_text() == "mixed3b:60"
            n = check_images(page)
            assert n >= 1 + 4 + 4 + 2 * 6  # visualization, top and negative crops, cells (image + weights) of a section
            check_labels(page)
            page.screenshot(path=str(tmp_path / "neuron_page.png"), full_page=True)

            # ... and by a substring of the layer name, from a neuron page (relative links two levels down)
            page.fill("#search", "mixed4a:10")
            assert page.locator("#results a").first.inner_text().startswith("mixed4a:100")
            page.locator("#results a").first.click()
            page.wait_for_load_state("load")
            assert page.url.endswith("/layers/mixed4a/100.html")
            check_images(page)
            check_labels(page)

            # previous/next (every page of the layer in channel order): the link, then the arrow key back
            pages_3b = sorted(int(f.stem) for f in (site / "layers/mixed3b").glob("*.html") if f.stem.isdigit())
            following = pages_3b[pages_3b.index(60) + 1]
            page.goto((site / "layers/mixed3b/60.html").as_uri(), wait_until="load")
            page.click('nav.pn a[rel="next"]')
            page.wait_for_load_state("load")
            assert page.url.endswith(f"/layers/mixed3b/{following}.html")
            with page.expect_navigation():
                page.keyboard.press("ArrowLeft")
            assert page.url.endswith("/layers/mixed3b/60.html")

            # neuron page → an upstream neuron (the first cell of the mixed3a section)
            link = page.locator('.cell a[href^="../../layers/mixed3a/"]').first
            href = link.get_attribute("href")
            link.click()
            page.wait_for_load_state("load")
            assert page.url.endswith(href.replace("../../", "/"))
            assert page.locator("h1").inner_text().startswith("mixed3a:")
            check_images(page)
            check_labels(page)
            assert page.locator("h2", has_text="Outgoing → mixed3b").count() == 1
            page.screenshot(path=str(tmp_path / "upstream_page.png"))

            # bars (pool-blocked weights) and the logits
            page.goto((site / "layers/mixed4a/0.html").as_uri(), wait_until="load")
            assert page.locator(".bars .barrow").count() >= 6
            check_images(page)
            check_labels(page)

            # a layer page: every neuron's variable name in a grid, by branch
            page.goto((site / "layers/mixed3b/index.html").as_uri(), wait_until="load")
            assert page.locator(".grid .thumb").count() == len(pages_3b) and page.locator(".grid .thumb.full").count() == 2
            assert page.locator("h2", has_text="mixed3b_3x3 ").count() == 1
            check_images(page)
            check_labels(page)
            page.goto((site / "layers/mixed3a/index.html").as_uri(), wait_until="load")
            assert page.locator(".grid .thumb").count() >= 2 + 6
            check_images(page)
            check_labels(page)
        finally:
            browser.close()
    assert not problems, problems
    shot = (tmp_path / "neuron_page.png").read_bytes()
    assert shot.startswith(b"\x89PNG") and len(shot) > 10_000
