"""The capability coverage table (experiments/model_coverage.py, issue 14 item 6).

* A fast subset runs every capability through the script's own ``run_model`` on one model of
  each activation layout: a CNN with BatchNorm (resnet18), one with squeeze-excitation gates and
  hardswish (mobilenet_v3_small), a ViT (tokens ``[batch, tokens, dim]``) and a Swin
  (channels-last ``[batch, h, w, c]``). Small inputs (64 px) and, for the fast run, torchvision's
  own ViT and Swin classes at toy sizes; the real ``vit_b_32`` and ``swin_t`` are ``slow``.
* The committed ``docs/coverage.json`` and ``docs/coverage.md`` agree (same models, same cells),
  and the Markdown is exactly what the script writes from the JSON.
* The whole table (every torchvision classifier + timm families; hours on a 2-core machine) is
  marked ``full_table`` and deselected unless asked for: ``pytest -m full_table tests/test_coverage.py``.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

import pytest
import torch
import torchvision
from torch import nn

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from experiments.model_coverage import (  # noqa: E402
    CAPABILITIES,
    all_models,
    build_table,
    family,
    first_per_family,
    per_capability,
    run_model,
    summary,
    to_markdown,
)

pytestmark = pytest.mark.usefixtures("one_thread")

DOC_MD = REPO / "docs" / "coverage.md"
DOC_JSON = REPO / "docs" / "coverage.json"


def _tv(name: str, size: int, **kw) -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.get_model(name, weights=None, **kw).eval()
    model.input_shape = (3, size, size)
    return model


def _tiny_vit() -> nn.Module:
    torch.manual_seed(0)
    from torchvision.models.vision_transformer import VisionTransformer

    return VisionTransformer(image_size=32, patch_size=8, num_layers=4, num_heads=2, hidden_dim=16, mlp_dim=32).eval()


def _tiny_swin() -> nn.Module:
    torch.manual_seed(0)
    from torchvision.models.swin_transformer import SwinTransformer

    model = SwinTransformer(patch_size=[4, 4], embed_dim=16, depths=[2, 2, 2], num_heads=[2, 2, 2],
                            window_size=[4, 4]).eval()
    model.input_shape = (3, 32, 32)
    return model


def _assert_every_capability_ok(row: dict) -> None:
    assert list(row["cells"]) == list(CAPABILITIES)
    bad = {cap: f"{c['status']}: {c['detail']}" for cap, c in row["cells"].items() if c["status"] != "ok"}
    assert not bad, f"{row['model']}: {bad}"


@pytest.mark.filterwarnings("ignore:the receptive field")  # 64-px inputs clip the expanded weights' border
@pytest.mark.parametrize("name, build, layout", [
    ("resnet18", lambda: _tv("resnet18", 64), "[b, c, h, w] with BatchNorm"),
    ("mobilenet_v3_small", lambda: _tv("mobilenet_v3_small", 64), "[b, c, h, w] with SE gates, hardswish"),
    ("vit (toy)", _tiny_vit, "[b, tokens, dim]"),
    ("swin (toy)", _tiny_swin, "[b, h, w, c]"),
    pytest.param("swin_t", lambda: _tv("swin_t", 64), "[b, h, w, c]", marks=pytest.mark.slow),
    pytest.param("vit_b_32", lambda: _tv("vit_b_32", 64, image_size=64), "[b, tokens, dim]", marks=pytest.mark.slow),
])
def test_every_capability_on_each_layout(name, build, layout, tmp_path):
    row = run_model(name, tmp_path, model=build())
    _assert_every_capability_ok(row)
    cells = row["cells"]
    assert "→" in cells["expanded weights"]["detail"]
    assert re.fullmatch(r"\d+ pages", cells["explore pages"]["detail"]) and int(cells["explore pages"]["detail"].split()[0]) >= 2
    assert len(list((tmp_path / "pages").rglob("*.html"))) == int(cells["explore pages"]["detail"].split()[0])
    if layout.startswith("[b, tokens") or "SE" in layout:
        assert "ops frozen" in cells["expanded weights"]["detail"]  # softmax / LayerNorm / gates frozen, said so


def test_family_order_covers_every_family_first():
    names = ["resnet50", "vit_b_16", "resnet18", "timm:resnet18", "vit_b_32", "swin_t"]
    sizes = {"resnet50": 25, "vit_b_16": 86, "resnet18": 11, "timm:resnet18": 11, "vit_b_32": 88, "swin_t": 28}
    order = first_per_family(names, size=sizes.__getitem__)
    assert order == ["resnet18", "timm:resnet18", "swin_t", "vit_b_16", "resnet50", "vit_b_32"]
    assert family("efficientnet_v2_s") == "efficientnet" and family("timm:vit_tiny_patch16_224") == "timm:vit"


def test_force_reruns_only_the_named_models(tmp_path, monkeypatch):
    import experiments.model_coverage as cov

    store = tmp_path / "t.json"
    store.write_text(json.dumps({"rows": {"a": {"model": "a", "old": True}, "b": {"model": "b", "old": True}},
                                 "skipped": {}}))
    monkeypatch.setattr(cov, "_params", lambda name: 1)
    monkeypatch.setattr(cov, "_run_isolated", lambda name, timeout: {"model": name, "cells": {}})
    doc = build_table(["b"], store, force=True, progress=False)
    assert doc["rows"]["a"] == {"model": "a", "old": True}  # kept
    assert "old" not in doc["rows"]["b"] and "date" in doc["rows"]["b"]
    assert json.loads(store.read_text())["rows"].keys() == {"a", "b"}


# ----------------------------------------------------------------------------- the committed table


def _md_rows(text: str) -> dict[str, list[str]]:
    """``{model: [mark per capability]}`` from the main table of the Markdown."""
    rows = {}
    for line in text.splitlines():
        m = re.match(r"\| `([^`]+)` \| ([^|]*) \| (.*) \|$", line)
        if m and len(m.group(3).split(" | ")) == len(CAPABILITIES):
            rows[m.group(1)] = [c.strip() for c in m.group(3).split(" | ")]
    return rows


def test_committed_json_and_markdown_agree():
    doc = json.loads(DOC_JSON.read_text())
    text = DOC_MD.read_text()
    mark = {"ok": "✓", "n/a": "n/a", "FAIL": "✗"}
    expected = {name: (["✗"] * len(CAPABILITIES) if "error" in r else [mark[r["cells"][c]["status"]] for c in CAPABILITIES])
                for name, r in doc["rows"].items()}
    assert _md_rows(text) == expected
    for name, r in doc["rows"].items():  # every cell that is not ok says why, in the Markdown too
        for cap, c in r.get("cells", {}).items():
            if c["status"] != "ok":
                assert c["detail"] and f"`{name}` · {cap}: {c['status']} — {c['detail']}" in text
    s = summary(doc)
    assert f"**{s['ok']} of {s['cells']} cells work" in text
    for cap, (ok, n) in per_capability(doc).items():
        assert f"| {cap} | {ok} / {n} |" in text
    # exactly what the script writes from the JSON (nothing edited by hand); the models of the full
    # list without a row are listed as not run, never hidden
    pending = sorted(set(all_models()) - set(doc["rows"]) - set(doc.get("skipped", {})))
    assert text == to_markdown(doc, pending=pending)


@pytest.mark.full_table
def test_full_table(tmp_path):
    """Every torchvision classifier + the timm families (hours): at least 95% of cells work, every
    other cell says why."""
    doc = build_table(first_per_family(all_models()), tmp_path / "coverage.json")
    s = summary(doc)
    assert s["ok_fraction"] >= 0.95, s
    for r in doc["rows"].values():
        assert "error" not in r, r
        assert all(c["detail"] for c in r["cells"].values() if c["status"] != "ok")


# ----------------------------------------------------------------------------- explore on a transformer


def _local_links(site: Path) -> tuple[int, list[tuple[str, str]]]:
    """Every local ``href``/``src`` of the site's pages, and those whose file is missing."""
    from urllib.parse import unquote

    n, broken = 0, []
    for page in site.rglob("*.html"):
        for ref in re.findall(r'(?:href|src)="([^"#?]+)', page.read_text()):
            if ref.startswith(("http:", "https:", "data:", "mailto:", "javascript:")):
                continue
            n += 1
            if not (page.parent / unquote(ref)).exists():
                broken.append((str(page.relative_to(site)), ref))
    return n, broken


@pytest.mark.parametrize("build, blocks", [
    (_tiny_vit, [f"encoder.layers.encoder_layer_{i}" for i in range(4)]),
    (_tiny_swin, None),
])
def test_explore_cli_on_a_transformer_with_defaults(build, blocks, tmp_path, capsys, monkeypatch):
    """``circuits explore --model NAME`` with no layer option on a ViT and a Swin (torchvision's
    classes at toy sizes; ``vit_b_32`` itself takes minutes here): default layers and upstream
    layers, pages written, every local link and image resolves."""
    import circuits.cli.commands as commands
    from circuits.cli import main
    from circuits.wiring import interesting_layers

    model = build()
    real = commands.resolve_model
    monkeypatch.setattr(commands, "resolve_model",
                        lambda spec, *a, **kw: model if spec == "toy-transformer" else real(spec, *a, **kw))
    out = tmp_path / "site"
    code = main(["explore", "--model", "toy-transformer", "--per-layer", "2", "--steps", "2", "--dataset-size", "8",
                 "--top-k", "3", "--out", str(out), "--cache", str(tmp_path / "fv"), "--quiet"])
    _, err = capsys.readouterr()
    assert code == 0, err
    layers = interesting_layers(model)
    if blocks is not None:
        assert all(layer in blocks for layer in layers)
    index = (out / "index.html").read_text()
    for layer in layers:  # two pages per paged layer at least (upstream neurons shown get pages too)
        assert len(list((out / "layers" / layer).glob("[0-9]*.html"))) >= 2 and f"layers/{layer}/" in index
    n, broken = _local_links(out)
    assert n > 10 and not broken, broken
