"""The capability coverage table: every capability of circuits on every torchvision classifier
(and timm families), random init, offline. Written to ``docs/coverage.md`` (and ``.json``).

Rows are models; columns are capabilities, each exercised as a user would call it:

========================= ====================================================================
``layers``                ``list_layers`` at the model's input size (every call of every module)
``default layers``        ``interesting_layers``: the blocks worth paging, found from the module tree
``expanded weights``      ``connection_weights`` from the default upstream block to the middle paged
                          layer (two output channels), finite
``NMF``                   ``neuron_factors`` (3 factors) of the first spatial convolution's weights
``feature vis (cached)``  ``render`` of one channel of the middle paged layer (2 steps), then the
                          same request again answered from the cache
``dataset examples``      ``dataset_examples`` on crops of scikit-learn's sample photographs
``explore pages``         ``build_pages`` for two neurons of the middle paged layer
``atlas dry run``         ``make_plan`` + ``estimate`` (one calibration step) for two neurons
``weight statistics``     ``weight_stats`` of every parameter, finite
========================= ====================================================================

A cell is ``ok`` (with a short measurement), ``n/a`` with the reason when the capability cannot
apply to the model (e.g. NMF of a model whose convolutions are all 1×1), or ``FAIL`` with the
error. Each model runs in its own process (a crash or a memory blow-up costs one row), results
are kept in the JSON file so a rerun only does what is missing (``--force`` redoes).

    python experiments/model_coverage.py                       # every torchvision classifier + timm families
    python experiments/model_coverage.py --models resnet18 vit_b_16 --out /tmp/cov.md
    python experiments/model_coverage.py --first-per-family     # one model of each family first, then the rest
    python experiments/model_coverage.py --markdown-only        # rewrite the Markdown from the JSON, run nothing
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional

ROOT = Path(__file__).resolve().parents[1]
CAPABILITIES = ("layers", "default layers", "expanded weights", "NMF", "feature vis (cached)", "dataset examples",
                "explore pages", "atlas dry run", "weight statistics")
TIMM_MODELS = ("timm:resnet18", "timm:convnext_atto", "timm:efficientnet_b0", "timm:vit_tiny_patch16_224",
               "timm:swin_tiny_patch4_window7_224")
#: Models bigger than this many parameters are listed with their size instead of run (24 GiB, 2 cores).
MAX_PARAMS = 700_000_000


def all_models() -> list[str]:
    import torchvision

    names = sorted(torchvision.models.list_models(module=torchvision.models))
    try:
        import timm  # noqa: F401

        names += list(TIMM_MODELS)
    except ImportError:
        pass
    return names


def family(name: str) -> str:
    """The model family a name belongs to: ``resnet50`` -> ``resnet``, ``timm:vit_tiny_patch16_224`` -> ``timm:vit``."""
    import re

    prefix, _, base = name.rpartition(":")
    head = re.split(r"[_\d]", base, maxsplit=1)[0] or base
    return f"{prefix}:{head}" if prefix else head


def first_per_family(names: list[str], size: Optional[Callable[[str], int]] = None) -> list[str]:
    """``names`` reordered so that a partial run covers every family: the smallest model of each
    family first, then the rest, each part smallest first (``size``: parameters, default
    counted on the meta device; ties and unknown sizes keep the given order)."""
    size = size or _params
    sizes = {n: size(n) for n in names}
    by_size = sorted(names, key=lambda n: (sizes[n] if sizes[n] >= 0 else float("inf")))
    first: dict[str, str] = {}
    for n in by_size:
        first.setdefault(family(n), n)
    firsts = [n for n in by_size if n in first.values()]
    return firsts + [n for n in by_size if n not in firsts]


# ----------------------------------------------------------------------------- one model


def _photos(shape: tuple[int, ...], n: int = 8):
    """``n`` crops of scikit-learn's two sample photographs, resized to ``shape`` (C, H, W), in [0, 1]."""
    import torch
    import torch.nn.functional as F
    from sklearn.datasets import load_sample_images

    imgs = [torch.from_numpy(i).permute(2, 0, 1).float() / 255 for i in load_sample_images().images]
    crops = []
    for k in range(n):
        img = imgs[k % len(imgs)]
        h, w = img.shape[1:]
        s = min(h, w) // (1 + k // len(imgs) % 2)
        y, x = (h - s) * (k % 3) // 2, (w - s) * ((k // 3) % 3) // 2
        crops.append(F.interpolate(img[None, :, y:y + s, x:x + s], size=tuple(shape[1:]), mode="bilinear",
                                   align_corners=False)[0])
    out = torch.stack(crops)
    return out.mean(1, keepdim=True) if shape[0] == 1 else out


def _finite(t: Any) -> bool:
    import torch

    return bool(torch.isfinite(torch.as_tensor(t)).all())


def _cell(fn: Callable[[], str]) -> dict[str, str]:
    t0 = time.perf_counter()
    try:
        detail = fn()
    except NotApplicable as exc:
        return {"status": "n/a", "detail": str(exc), "seconds": round(time.perf_counter() - t0, 2)}
    except Exception as exc:  # noqa: BLE001 - the table reports every failure
        msg = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        return {"status": "FAIL", "detail": f"{type(exc).__name__}: {msg}"[:300], "seconds": round(time.perf_counter() - t0, 2)}
    return {"status": "ok", "detail": detail, "seconds": round(time.perf_counter() - t0, 2)}


class NotApplicable(Exception):
    """The capability does not apply to this model; the message says why."""


def run_model(name: str, work: Path, model: Optional[Any] = None) -> dict[str, Any]:
    """Every capability on one model: ``{"model", "params", "input", "cells": {capability: cell}}``.

    ``model``: an already built ``nn.Module`` for ``name`` (the tests pass small variants, e.g. a
    ViT built for 64-pixel images, or a model with ``input_shape`` set); default: resolved from ``name``.
    """
    import torch

    import circuits
    from circuits.atlas import estimate, make_plan
    from circuits.expanded import connection_weights
    from circuits.featurevis import FeatureVisCache, dataset_examples, render
    from circuits.figures import build_pages
    from circuits.inspect import weight_stats
    from circuits.models import input_shape
    from circuits.nmf import neuron_factors
    from circuits.wiring import default_upstream, interesting_layers

    torch.manual_seed(0)
    torch.set_num_threads(1)
    model = circuits.resolve_model(name if model is None else model)
    shape = input_shape(model)
    n_params = sum(p.numel() for p in model.parameters())
    row: dict[str, Any] = {"model": name, "params": n_params, "input": list(shape), "cells": {}}
    cells = row["cells"]
    state: dict[str, Any] = {}

    def layers() -> str:
        rows = circuits.list_layers(model, shape)
        return f"{len(rows)} rows"

    def defaults() -> str:
        state["layers"] = interesting_layers(model)
        state["layer"] = state["layers"][len(state["layers"]) // 2]
        state["upstream"] = default_upstream(model, state["layer"])[0]
        return ", ".join(state["layers"])

    def need_layer() -> str:
        if "layer" not in state:
            raise RuntimeError("no default layer (see 'default layers')")
        return state["layer"]

    def expanded() -> str:
        layer = need_layer()
        conn = connection_weights(model, state["upstream"], layer, channels=[0, 1])
        if not _finite(conn.weights):
            raise FloatingPointError("non-finite expanded weights")
        frozen = f", {len(conn.frozen)} ops frozen" if getattr(conn, "frozen", None) else ""
        return f"{state['upstream']} → {layer}: {conn.kind} {tuple(conn.weights.shape)}{frozen}"

    def nmf() -> str:
        convs = [(n, m) for n, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)]
        spatial = [(n, m) for n, m in convs if m.kernel_size[0] * m.kernel_size[1] >= 3 and m.groups == 1]
        if not spatial:
            kinds = "depthwise" if any(m.groups > 1 for _, m in convs) else "1×1"
            raise NotApplicable(f"no full spatial convolution to factor (only {kinds} or no convolutions)"
                                if convs else "the model has no convolution")
        n, m = spatial[0]
        f = neuron_factors(m.weight.detach()[:8], 3)
        if not _finite(f.explained):
            raise FloatingPointError("non-finite NMF")
        return f"{n} {tuple(m.weight.shape[-2:])}: explained {float(f.explained.mean()):.2f}"

    def featurevis() -> str:
        layer = need_layer()
        cache = FeatureVisCache(work / "fv")
        first = render(model, [f"{layer}:0"], steps=2, cache=cache, progress=False)
        again = render(model, [f"{layer}:0"], steps=2, cache=cache, progress=False)
        if not again.from_cache[0] or not _finite(first.objective_values):
            raise RuntimeError("the second render was not answered from the cache")
        return f"{layer}:0 objective {float(first.objective_values[0]):.3g}"

    def examples() -> str:
        layer = need_layer()
        found = dataset_examples(model, [f"{layer}:0", f"{layer}:1"], state.setdefault("photos", _photos(shape)), k=2,
                                 progress=False)
        vals = found[f"{layer}:0"].values
        if not _finite(vals):
            raise FloatingPointError("non-finite activations")
        return f"top-2 of {len(state['photos'])} photo crops"

    def pages() -> str:
        layer = need_layer()
        index = build_pages(model, [layer], work / "pages", neurons=2, top_k=3, steps=1, dataset=False,
                            cache=work / "fv", progress=False)
        n = len(list(index.parent.rglob("*.html")))
        return f"{n} pages"

    def atlas() -> str:
        layer = need_layer()
        plan = make_plan(model, [layer], neurons=2, steps=1, dataset=None, upstream_renders="none", top_k=3)
        est = estimate(plan, model, calibration_steps=1, max_calibration_batch=2)
        return f"{len(plan.tasks)} tasks, ~{est.render_seconds:.0f} s"

    def stats() -> str:
        table = weight_stats(model)
        bad = [r.name for r in table if not all(math.isfinite(v) for v in (r.mean, r.std))]
        if bad:
            raise FloatingPointError(f"non-finite statistics for {bad[:3]}")
        return f"{len(table)} tensors"

    for cap, fn in zip(CAPABILITIES, (layers, defaults, expanded, nmf, featurevis, examples, pages, atlas, stats)):
        cells[cap] = _cell(fn)
    return row


# ----------------------------------------------------------------------------- the table


def _run_isolated(name: str, timeout: float) -> dict[str, Any]:
    with tempfile.TemporaryDirectory(prefix="circuits-cov-") as tmp:
        out = Path(tmp) / "row.json"
        code = (f"import json, sys; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path\n"
                f"from experiments.model_coverage import run_model\n"
                f"row = run_model({name!r}, Path({tmp!r}))\n"
                f"Path({str(out)!r}).write_text(json.dumps(row))\n")
        env = dict(os.environ, CIRCUITS_CACHE=str(Path(tmp) / "cache"), PYTHONWARNINGS="ignore")
        t0 = time.perf_counter()
        try:
            proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired:
            return {"model": name, "error": f"timed out after {timeout:.0f} s"}
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr.strip().splitlines() or ["(no output)"])[-1]
            return {"model": name, "error": f"process failed (exit {proc.returncode}): {tail[:300]}"}
        row = json.loads(out.read_text())
        row["seconds"] = round(time.perf_counter() - t0, 1)
        return row


def _params(name: str) -> int:
    """Parameters of a named model, counted without allocating them (meta device); -1 when unknown."""
    import warnings

    import torch

    def build() -> Any:
        if name.startswith("timm:"):
            import timm

            return timm.create_model(name[len("timm:"):], pretrained=False)
        import torchvision

        return torchvision.models.get_model(name, weights=None)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            with torch.device("meta"):
                model = build()
        except Exception:  # noqa: BLE001 - some initialisers do not run on meta tensors (regnet): build for real
            try:
                model = build()
            except Exception:  # noqa: BLE001 - unknown name: its row says why
                return -1
    return sum(p.numel() for p in model.parameters())


def build_table(models: list[str], store: Path, force: bool = False, timeout: float = 1800,
                progress: bool = True) -> dict[str, Any]:
    """Run (or reuse from ``store``) every model's row; returns ``{"rows": [...], "skipped": [...]}``."""
    from circuits._io import atomic_write_text

    doc = json.loads(store.read_text()) if store.is_file() else {"rows": {}, "skipped": {}}
    for name in models:
        if name in doc["rows"] and "error" not in doc["rows"][name] and not force:
            continue
        n = _params(name)
        if n > MAX_PARAMS:
            doc["skipped"][name] = f"{n / 1e6:.0f} M parameters: more than this 2-core, 24 GiB machine runs in the table's time"
            continue
        if progress:
            print(f"coverage: {name} ...", file=sys.stderr, flush=True)
        doc["rows"][name] = _run_isolated(name, timeout)
        doc["rows"][name]["date"] = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())
        doc["machine"] = machine()
        atomic_write_text(store, json.dumps(doc, indent=1, sort_keys=True))
    return doc


def machine() -> str:
    """The machine a row ran on, in words (the table's figures depend on it)."""
    import platform

    import torch

    return (f"{platform.machine()} {platform.system()}, {os.cpu_count()} CPU cores (shared), no GPU used; "
            f"Python {platform.python_version()}, torch {torch.__version__}")


def per_capability(doc: dict[str, Any], models: Optional[list[str]] = None) -> dict[str, tuple[int, int]]:
    """``{capability: (ok, rows)}`` over the rows of ``models`` (a row whose process failed counts as failed)."""
    rows = [doc["rows"][m] for m in (models or sorted(doc["rows"])) if m in doc["rows"]]
    return {cap: (sum(r.get("cells", {}).get(cap, {}).get("status") == "ok" for r in rows), len(rows))
            for cap in CAPABILITIES}


def summary(doc: dict[str, Any], models: Optional[list[str]] = None) -> dict[str, Any]:
    rows = [doc["rows"][m] for m in (models or sorted(doc["rows"])) if m in doc["rows"]]
    cells = [c for r in rows for c in r.get("cells", {}).values()]
    failed_rows = [r["model"] for r in rows if "error" in r]
    ok = sum(c["status"] == "ok" for c in cells)
    na = sum(c["status"] == "n/a" for c in cells)
    total = len(cells) + len(failed_rows) * len(CAPABILITIES)
    return {"models": len(rows), "cells": total, "ok": ok, "n/a": na, "failed": total - ok - na,
            "ok_fraction": ok / total if total else 0.0, "failed_rows": failed_rows}


def to_markdown(doc: dict[str, Any], models: Optional[list[str]] = None, pending: Optional[list[str]] = None) -> str:
    """The table as Markdown; ``pending``: models of the full list that have no row yet (listed, never hidden)."""
    s = summary(doc, models)
    dates = sorted(r["date"] for r in doc["rows"].values() if "date" in r)
    when = f"Rows run {dates[0]} – {dates[-1]}" if dates else "Run dates not recorded"
    undated = len(doc["rows"]) - len(dates)
    if dates and undated:
        when += f" ({undated} rows without a recorded date, run the same session by the same script)"
    caps = per_capability(doc, models)
    lines = [
        "# Capability coverage",
        "",
        "Every capability of `circuits` on every torchvision classifier and on timm families, random init,",
        "offline, as a user would call it. Generated by `python experiments/model_coverage.py` (do not edit by hand;",
        "`tests/test_coverage.py` checks that this page is exactly what the script writes from `coverage.json`",
        "beside it); see that script's docstring for what each column runs.",
        "",
        "How it was produced: `python experiments/model_coverage.py --first-per-family` (the smallest model of",
        "each family first, then the rest smallest first, so that a partial run covers every family). Each model",
        "runs in its own process; results are kept per model in `docs/coverage.json`, so a rerun only does",
        "what is missing (`--force --models NAME...` redoes some, `--markdown-only` rewrites this page).",
        "",
        f"**{s['ok']} of {s['cells']} cells work ({100 * s['ok_fraction']:.1f}%)**; {s['n/a']} cannot apply (the cell says why); "
        f"{s['failed']} fail.",
        "",
        f"{when} on {doc.get('machine', 'an unrecorded machine')}; each model at its own input size "
        "(224 × 224 unless the model states another), in its own process.",
        "",
        "| capability | ok / models |",
        "| --- | ---: |",
        *[f"| {cap} | {ok} / {n} |" for cap, (ok, n) in caps.items()],
        "",
        "| model | params | " + " | ".join(CAPABILITIES) + " |",
        "| --- | ---: | " + " | ".join("---" for _ in CAPABILITIES) + " |",
    ]
    mark = {"ok": "✓", "n/a": "n/a", "FAIL": "✗"}
    notes = []
    for name in models or sorted(doc["rows"]):
        r = doc["rows"].get(name)
        if r is None:
            continue
        if "error" in r:
            lines.append(f"| `{name}` | | " + " | ".join(["✗"] * len(CAPABILITIES)) + " |")
            notes.append(f"- `{name}`: {r['error']}")
            continue
        row = []
        for cap in CAPABILITIES:
            c = r["cells"][cap]
            row.append(mark[c["status"]])
            if c["status"] != "ok":
                notes.append(f"- `{name}` · {cap}: {c['status']} — {c['detail']}")
        lines.append(f"| `{name}` | {r['params'] / 1e6:.1f} M | " + " | ".join(row) + " |")
    if pending:
        lines += ["", "## Not run yet (the table's run ran out of time; rerun the script to add them)", "",
                  ", ".join(f"`{m}`" for m in pending)]
    if doc.get("skipped"):
        lines += ["", "## Not run (too large for this machine)", ""]
        lines += [f"- `{m}`: {why}" for m, why in sorted(doc["skipped"].items())]
    if notes:
        lines += ["", "## Cells that are not ✓", ""] + notes
    lines += ["", "## What each ✓ measured", "", "| model | " + " | ".join(CAPABILITIES[2:5]) + " |",
              "| --- | " + " | ".join("---" for _ in CAPABILITIES[2:5]) + " |"]
    for name in models or sorted(doc["rows"]):
        r = doc["rows"].get(name)
        if r and "cells" in r:
            lines.append(f"| `{name}` | " + " | ".join(r["cells"][c]["detail"].replace("|", "/") for c in CAPABILITIES[2:5]) + " |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", nargs="+", default=None, help="models (default: every torchvision classifier + timm families)")
    ap.add_argument("--out", default=str(ROOT / "docs" / "coverage.md"), help="the Markdown table")
    ap.add_argument("--json", default=None, help="the results file (default: next to --out, .json)")
    ap.add_argument("--force", action="store_true", help="rerun models already in the results file")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per model")
    ap.add_argument("--first-per-family", action="store_true",
                    help="run one model of each family first, then the rest (a partial run covers every family)")
    ap.add_argument("--markdown-only", action="store_true", help="rewrite the Markdown from the results file; run nothing")
    args = ap.parse_args(argv)
    from circuits._io import atomic_write_text

    models = args.models or all_models()
    if args.first_per_family:
        models = first_per_family(models)
    store = Path(args.json) if args.json else Path(args.out).with_suffix(".json")
    if args.markdown_only:
        if not store.is_file():
            ap.error(f"--markdown-only needs the results file {store}, which does not exist")
        doc = json.loads(store.read_text())
    else:
        doc = build_table(models, store, force=args.force, timeout=args.timeout)
    pending = sorted(m for m in models if m not in doc["rows"] and m not in doc.get("skipped", {}))
    atomic_write_text(args.out, to_markdown(doc, None if args.models is None else models, pending=pending))
    s = summary(doc, None if args.models is None else models)
    print(f"{s['ok']}/{s['cells']} cells ok ({100 * s['ok_fraction']:.1f}%), {s['n/a']} n/a, {s['failed']} failed -> {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
