"""Headless system Chromium for the page tests: where it is, how it is started, a page that
records every console error, page error and failed request, and the label-overlap check."""

from __future__ import annotations

from pathlib import Path

CHROMIUM = Path("/usr/bin/chromium")
ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def watched_page(browser, problems: list[str]):
    """A 1200x1000 page that appends its console errors, page errors and failed requests to ``problems``."""
    page = browser.new_page(viewport={"width": 1200, "height": 1000})
    page.on("console", lambda m: problems.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(f"page error: {e}"))
    page.on("requestfailed", lambda r: problems.append(f"request failed: {r.url} {r.failure}"))
    return page


LABELS_OVERLAP = """() => {
  const els = [...document.querySelectorAll('.label, h1, h2, h3, figcaption, .crumbs, nav.pn a, .exhead, .sectionhead span')];
  const boxes = els.map(e => [e, e.getBoundingClientRect()]).filter(([e, r]) => r.width > 0 && r.height > 0);
  const bad = [];
  for (let i = 0; i < boxes.length; i++) {
    const [a, ra] = boxes[i];
    if (a.classList.contains('label') && a.scrollWidth > a.clientWidth + 1) bad.push('truncated: ' + a.textContent);
    for (let j = i + 1; j < boxes.length; j++) {
      const [b, rb] = boxes[j];
      if (a.contains(b) || b.contains(a)) continue;
      const w = Math.min(ra.right, rb.right) - Math.max(ra.left, rb.left);
      const h = Math.min(ra.bottom, rb.bottom) - Math.max(ra.top, rb.top);
      if (w > 0.5 && h > 0.5) bad.push(a.textContent.trim().slice(0, 30) + ' / ' + b.textContent.trim().slice(0, 30));
    }
  }
  return [boxes.length, bad.slice(0, 10)];
}"""
