"""Bottleneck-skipping study: where does each Inception block's connection strength go, and are
its bottleneck neurons polysemantic?

**Question.** The article jumps over bottleneck layers because "so much information is
compressed, these layers are often polysemantic". Two measurable questions follow for a
trained network: (1) does training route the connection from a block's input through the
bottlenecked branches (1x1 → 3x3, 1x1 → 5x5) more, or less, than the architecture alone
does? (2) do bottleneck neurons respond to more different things than the neurons beside
them?

**Measurements**, for every Inception block ``B`` with input layer ``P`` (found by tracing:
``conv2d2`` → ``mixed3a``, ``mixed3a`` → ``mixed3b``, ``maxpool4`` → ``mixed4a`` in the
bundled model):

1. *Branch shares.* The expanded weights ``E [out_B, in_P, kh, kw]`` skip the bottlenecks and
   linearise the pool branch (max → average pool). ``B``'s channels are the concatenation of
   its four branches, so ``||E||²`` splits exactly by branch: ``share_b = ||E[rows_b]||² / ||E||²``
   (they sum to 1; ``sum_check`` records it).
2. *Bottleneck-only upstream neurons.* For each neuron ``i`` of ``P``, the share of its
   connection strength ``Σ_b ||E[rows_b, i]||²`` that goes through the two bottlenecked
   branches. The threshold is the control's: the 99th percentile of that share over the
   random-init draws' upstream neurons; a neuron above it whose strength is above the block's
   median is listed.
3. *Polysemanticity from activations.* For every neuron of the branch layers (``1x1``,
   ``3x3_bottleneck``, ``5x5_bottleneck``, ``3x3``, ``5x5``, ``pool_reduce``): its maximum over
   positions on each of ``n_images`` labelled images (Fashion-MNIST test); the number of
   classes among its ``top_k`` most activating images, as ``exp(entropy)`` of their class
   histogram (1 = one class; 10 = all). A proxy: a neuron can respond to several classes
   because it detects something generic (an edge) rather than several unrelated things.

**Controls.** Every number is also computed on ``controls.random_init`` random-init copies of
the model (same architecture, PyTorch's default initialisation, seeded).

Outputs (``out``): ``branch_shares.csv``, ``upstream_neurons.csv``, ``polysemanticity.csv``
(per neuron and model: trained or random draw), ``bottleneck_study.json`` (per-block summary,
claims with controls), ``bottleneck_study.npz``, ``bottleneck_study.md`` (the result table the
written study cites), figures ``bottleneck_shares.*`` and ``bottleneck_polysemanticity.*``.
"""

from __future__ import annotations

import csv
import re

import numpy as np
import torch
from matplotlib.figure import Figure

from _common import add_caption, n_channels, options, start
from _measures import Claim, effective_classes
from circuits._io import atomic_path, atomic_write_text
from circuits.expanded import expanded_weights
from circuits.layers import capture, get_layer, run_until
from circuits.models import input_shape, preprocess_input

BRANCHES = ("1x1", "3x3", "5x5", "pool")
ENTRY = {"1x1": "1x1", "3x3": "3x3_bottleneck", "5x5": "5x5_bottleneck", "pool": "pool_reduce"}
GROUPS = ("1x1", "3x3_bottleneck", "5x5_bottleneck", "3x3", "5x5", "pool_reduce")
POLY_KEYS = ("dataset", "n_images", "top_k")

OPTIONS = options(blocks="Inception blocks to study (all)", percentile="control percentile for bottleneck-only neurons",
                  polysemanticity=POLY_KEYS)


def mixed_blocks(model) -> list[str]:
    """Names of the Inception blocks (modules ``mixedNx`` that have a ``_1x1_pre_relu_conv``)."""
    names = dict(model.named_modules())
    return [n for n in names if re.fullmatch(r"mixed\d+[a-z]", n) and f"{n}_1x1_pre_relu_conv" in names]


def block_input(model, block: str) -> str:
    """The named layer whose output is the block's input (traced with forward hooks)."""
    entry = get_layer(model, f"{block}_1x1_pre_relu_conv")
    seen = {}

    def hook(_m, inputs, _out) -> None:  # must return None: a value would replace the output
        seen.setdefault("x", inputs[0])

    h = entry.register_forward_hook(hook)
    names = [n for n, _ in model.named_modules() if n and not n.startswith(block)]
    p = next(model.parameters())
    try:
        with torch.no_grad(), capture(model, names, detach=False) as acts:
            model(torch.zeros((1, *input_shape(model)), dtype=p.dtype, device=p.device))
    finally:
        h.remove()
    hits = [n for n in names if n in acts and acts[n] is seen.get("x")]
    if not hits:
        raise ValueError(f"could not find the named layer that feeds {block}")
    return hits[-1]


def branch_sizes(model, block: str) -> dict[str, int]:
    sizes = {
        "1x1": get_layer(model, f"{block}_1x1_pre_relu_conv").out_channels,
        "3x3": get_layer(model, f"{block}_3x3_pre_relu_conv").out_channels,
        "5x5": get_layer(model, f"{block}_5x5_pre_relu_conv").out_channels,
        "pool": get_layer(model, f"{block}_pool_reduce_pre_relu_conv").out_channels,
    }
    total = n_channels(model, block)
    if sum(sizes.values()) != total:
        raise ValueError(f"{block}: branch sizes {sizes} do not add up to its {total} channels")
    return sizes


def block_shares(model, block: str) -> dict:
    """Branch shares of the block's expanded weights and each upstream neuron's per-branch strength."""
    src = block_input(model, block)
    sizes = branch_sizes(model, block)
    E = expanded_weights(model, src, block).double().cpu()  # [out, in, kh, kw]
    per_out_in = E.square().sum(dim=(2, 3))  # [out, in]
    total = float(per_out_in.sum())
    rows, start_row, per_branch_in = [], 0, {}
    for b in BRANCHES:
        sl = slice(start_row, start_row + sizes[b])
        start_row += sizes[b]
        sq = float(per_out_in[sl].sum())
        per_branch_in[b] = per_out_in[sl].sum(0).numpy()
        direct = get_layer(model, f"{block}_{ENTRY[b]}_pre_relu_conv").weight.detach().double()
        rows.append({"branch": b, "channels": sizes[b], "expanded_sq_l2": sq, "share": sq / total if total > 0 else 0.0,
                     "direct_entry_sq_l2": float(direct.square().sum())})
    strength = sum(per_branch_in.values())
    with np.errstate(invalid="ignore", divide="ignore"):
        bshare = np.where(strength > 0, (per_branch_in["3x3"] + per_branch_in["5x5"]) / strength, 0.0)
    return {"block": block, "input_layer": src, "sizes": sizes, "rows": rows, "total_sq_l2": total,
            "sum_check": sum(r["expanded_sq_l2"] for r in rows) - total, "strength": strength, "bottleneck_share": bshare,
            "branch_in": per_branch_in, "kernel": list(E.shape[2:])}


def branch_activations(model, blocks: list[str], images: torch.Tensor, batch: int = 500) -> dict[str, torch.Tensor]:
    """``{layer: [images, channels]}``: each branch layer's maximum over positions."""
    layers = [f"{b}_{g}" for b in blocks for g in GROUPS]
    out = {l: [] for l in layers}
    with torch.no_grad():
        for i in range(0, len(images), batch):
            acts = run_until(model, preprocess_input(model, images[i: i + batch]), layers)
            for l in layers:
                a = acts[l]
                out[l].append(a.amax(dim=(2, 3)) if a.ndim == 4 else a)
    return {l: torch.cat(v).cpu() for l, v in out.items()}


def polysemanticity(model, blocks, images, labels, top_k: int) -> dict[str, np.ndarray]:
    return {l: effective_classes(a, labels, top_k) for l, a in branch_activations(model, blocks, images).items()}


def _write_csv(path, header: list[str], rows: list[list]) -> str:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    return str(path)


COLORS = {"1x1": "#4c72b0", "3x3": "#dd8452", "5x5": "#55a868", "pool": "#8172b3"}
LABELS = {"1x1": "1x1 (direct)", "3x3": "3x3 via bottleneck", "5x5": "5x5 via bottleneck", "pool": "pool (linearised)"}


def shares_figure(blocks: list[str], trained: np.ndarray, random: np.ndarray):
    """Stacked bars per block: trained (left) and the random-init mean (right, hatched)."""
    from circuits.figures import FigureResult

    fig = Figure(figsize=(1.6 + 1.3 * len(blocks), 3.4))
    ax = fig.subplots()
    x = np.arange(len(blocks)) * 1.3
    for j, (vals, off, hatch) in enumerate(((trained, -0.28, None), (random.mean(0) if len(random) else None, 0.28, "///"))):
        if vals is None:
            continue
        bottom = np.zeros(len(blocks))
        for bi, b in enumerate(BRANCHES):
            ax.bar(x + off, vals[:, bi], width=0.5, bottom=bottom, color=COLORS[b], hatch=hatch, edgecolor="white",
                   label=LABELS[b] if j == 0 else None)
            for k, (v, y) in enumerate(zip(vals[:, bi], bottom)):
                if v > 0.06:
                    ax.text(x[k] + off, y + v / 2, f"{v:.2f}", ha="center", va="center", fontsize=6, color="white")
            bottom += vals[:, bi]
    ax.set_xticks(x, [f"{b}\ntrained | random" for b in blocks], fontsize=7)
    ax.set_ylabel("share of ||expanded weights||²", fontsize=8)
    ax.set_ylim(0, 1)
    ax.tick_params(labelsize=7)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Connection strength from each block's input, by branch\n(left: trained; right, hatched: random init, mean)", fontsize=8)
    return FigureResult(fig, {"trained": trained, "random": random})


def poly_figure(blocks: list[str], trained: dict, random: list[dict], top_k: int):
    """Per block and branch layer: median classes among the top images, trained vs random init."""
    from circuits.figures import FigureResult

    fig = Figure(figsize=(1.6 + 2.2 * len(blocks), 3.3))
    axes = fig.subplots(1, len(blocks), squeeze=False, sharey=True)[0]
    for ax, b in zip(axes, blocks):
        for gi, g in enumerate(GROUPS):
            t = trained[f"{b}_{g}"]
            t = t[np.isfinite(t)]
            ax.scatter(np.full(len(t), gi - 0.15) + np.random.default_rng(gi).uniform(-0.06, 0.06, len(t)), t, s=3,
                       color="#c44e52", alpha=0.5, lw=0)
            ax.plot([gi - 0.3, gi], [np.median(t)] * 2, color="#c44e52", lw=2)
            rr = np.concatenate([x[f"{b}_{g}"][np.isfinite(x[f"{b}_{g}"])] for x in random]) if random else np.zeros(0)
            if len(rr):
                ax.scatter(np.full(len(rr), gi + 0.15) + np.random.default_rng(gi + 9).uniform(-0.06, 0.06, len(rr)), rr, s=3,
                           color="#777777", alpha=0.4, lw=0)
                ax.plot([gi, gi + 0.3], [np.median(rr)] * 2, color="#444444", lw=2)
        ax.set_xticks(range(len(GROUPS)), [g.replace("_bottleneck", " bneck").replace("_reduce", "") for g in GROUPS],
                      fontsize=6, rotation=40, ha="right")
        ax.set_title(b, fontsize=8)
        ax.tick_params(labelsize=6)
    axes[0].set_ylabel(f"classes among the top {top_k} images\n(exp entropy; red trained, grey random init)", fontsize=7)
    fig.suptitle("How many classes does a neuron respond to? (bars: medians)", fontsize=9)
    return FigureResult(fig, {})


def _median(v: np.ndarray) -> float:
    v = v[np.isfinite(v)]
    return float(np.median(v)) if len(v) else float("nan")


def run(config: dict) -> dict:
    r = start(config, OPTIONS)
    available = mixed_blocks(r.model)
    blocks = config.get("blocks", "all")
    if blocks in (None, "all"):
        blocks = available
    bad = [b for b in blocks if b not in available]
    if bad:
        raise ValueError(f"unknown blocks {bad}; this model's Inception blocks are {available}")
    pct = float(config.get("percentile", 99.0))
    from tqdm.auto import tqdm

    progress = not config.get("progress", True)
    randoms = r.random_models()
    trained = [block_shares(r.model, b) for b in tqdm(blocks, desc="branch shares (trained)", disable=progress)]
    rand = [[block_shares(m, b) for b in blocks] for m in tqdm(randoms, desc="branch shares (random init)", disable=progress)]
    T = np.array([[x["share"] for x in res["rows"]] for res in trained])  # [blocks, 4]
    R = np.array([[[x["share"] for x in res["rows"]] for res in draw] for draw in rand]).reshape(len(rand), len(blocks), 4)

    claims: dict[str, Claim] = {}
    per_block, up_rows = {}, []
    for bi, res in enumerate(trained):
        b = res["block"]
        for j, br in enumerate(BRANCHES):
            claims[f"{b}_share_{br}"] = Claim(f"{b}: share of the connection strength through the {br} branch", float(T[bi, j]),
                                              [float(v) for v in R[:, bi, j]], higher=bool(T[bi, j] >= (R[:, bi, j].mean() if len(R) else 0)))
        rshare = np.concatenate([draw[bi]["bottleneck_share"] for draw in rand]) if rand else np.zeros(0)
        threshold = float(np.percentile(rshare, pct)) if len(rshare) else float("nan")
        strength = res["strength"]
        only = (res["bottleneck_share"] > threshold) & (strength >= np.median(strength)) & (strength > 0)
        for i in range(len(strength)):
            up_rows.append([b, res["input_layer"], i, float(strength[i])] + [float(res["branch_in"][br][i] / strength[i]) if strength[i] > 0 else 0.0
                                                                              for br in BRANCHES]
                           + [float(res["bottleneck_share"][i]), threshold, bool(only[i])])
        claims[f"{b}_upstream_bottleneck_share"] = Claim(f"{b}: median share of an upstream neuron's strength through the bottlenecks",
                                                         float(np.median(res["bottleneck_share"])),
                                                         [float(np.median(draw[bi]["bottleneck_share"])) for draw in rand])
        per_block[b] = {"input_layer": res["input_layer"], "kernel": res["kernel"], "total_sq_l2": res["total_sq_l2"],
                        "sum_check": res["sum_check"], "shares": {x["branch"]: x["share"] for x in res["rows"]},
                        "random_init_shares": {br: R[:, bi, j].tolist() for j, br in enumerate(BRANCHES)},
                        "bottleneck_only_threshold": threshold,
                        "bottleneck_only_neurons": np.flatnonzero(only).tolist(),
                        "bottleneck_only_shares": res["bottleneck_share"][only].tolist()}

    # polysemanticity from activations
    poly_cfg = {"dataset": "fashion-mnist-test", "n_images": 3000, "top_k": 100}
    poly_cfg.update(config.get("polysemanticity") or {})
    poly_t, poly_r = {}, []
    if poly_cfg["dataset"] and tuple(input_shape(r.model)) == (1, 28, 28):
        from circuits.datasets import load_fashion_mnist

        images, labels = load_fashion_mnist(str(poly_cfg["dataset"]).rsplit("-", 1)[-1])
        images, labels = images[: int(poly_cfg["n_images"])], labels[: int(poly_cfg["n_images"])]
        k = int(poly_cfg["top_k"])
        poly_t = polysemanticity(r.model, blocks, images, labels, k)
        poly_r = [polysemanticity(m, blocks, images, labels, k) for m in randoms]
        for b in blocks:
            med = {g: _median(poly_t[f"{b}_{g}"]) for g in GROUPS}
            med_r = {g: [_median(x[f"{b}_{g}"]) for x in poly_r] for g in GROUPS}
            bott = [f"{b}_3x3_bottleneck", f"{b}_5x5_bottleneck"]
            outs = [f"{b}_3x3", f"{b}_5x5"]

            def gap(d):
                return _median(np.concatenate([d[x] for x in bott])) - _median(np.concatenate([d[x] for x in outs]))

            claims[f"{b}_poly_gap"] = Claim(f"{b}: median classes of bottleneck neurons minus 3x3/5x5 output neurons", gap(poly_t),
                                            [gap(x) for x in poly_r])
            claims[f"{b}_poly_bottleneck"] = Claim(f"{b}: median classes among the top {k} images, bottleneck neurons",
                                                   _median(np.concatenate([poly_t[x] for x in bott])),
                                                   [_median(np.concatenate([x[y] for y in bott])) for x in poly_r], higher=False)
            per_block[b]["polysemanticity_median"] = med
            per_block[b]["polysemanticity_median_random_init"] = med_r
            per_block[b]["dead_random_init"] = {g: [int(np.isnan(x[f"{b}_{g}"]).sum()) for x in poly_r] for g in GROUPS}

    # ------------------------------------------------------------------ files
    share_rows = [[res["block"], res["input_layer"], x["branch"], x["channels"], "x".join(map(str, res["kernel"])), x["expanded_sq_l2"], x["share"],
                   float(np.mean(R[:, bi, j])) if len(R) else "", float(np.std(R[:, bi, j])) if len(R) else "", x["direct_entry_sq_l2"]]
                  for bi, res in enumerate(trained) for j, x in enumerate(res["rows"])]
    r.files.append(_write_csv(r.out / "branch_shares.csv", ["block", "input_layer", "branch", "channels", "kernel", "expanded_sq_l2", "share",
                                                            "random_init_share_mean", "random_init_share_std", "direct_entry_sq_l2"], share_rows))
    r.files.append(_write_csv(r.out / "upstream_neurons.csv", ["block", "input_layer", "neuron", "sq_l2", "share_1x1", "share_3x3", "share_5x5",
                                                               "share_pool", "bottleneck_share", "random_init_threshold", "bottleneck_only"], up_rows))
    if poly_t:
        rows = [[l.split("_", 1)[0], l, n, "trained", float(v)] for l, vals in poly_t.items() for n, v in enumerate(vals)]
        rows += [[l.split("_", 1)[0], l, n, f"random_init_{d}", float(v)] for d, x in enumerate(poly_r) for l, vals in x.items() for n, v in enumerate(vals)]
        r.files.append(_write_csv(r.out / "polysemanticity.csv", ["block", "layer", "neuron", "model", "classes_among_top_k"], rows))
    fs = shares_figure(blocks, T, R)
    add_caption(fs, [f"{b}: 1x1 {T[bi, 0]:.2f} (random init {_r(R[:, bi, 0])}), 3x3 {T[bi, 1]:.2f} ({_r(R[:, bi, 1])}), "
                     f"5x5 {T[bi, 2]:.2f} ({_r(R[:, bi, 2])}) — "
                     + ("differs from random init in every branch" if all(claims[f"{b}_share_{br}"].beats for br in BRANCHES)
                        else "not every branch differs from random init") for bi, b in enumerate(blocks)])
    r.save_figure(fs, "bottleneck_shares")
    if poly_t:
        fp = poly_figure(blocks, poly_t, poly_r, int(poly_cfg["top_k"]))
        add_caption(fp, [claims[f"{b}_poly_gap"].caption() for b in blocks])
        r.save_figure(fp, "bottleneck_polysemanticity")
    md = result_table(blocks, per_block, claims, bool(poly_t))
    atomic_write_text(r.out / "bottleneck_study.md", md)
    r.files.append(str(r.out / "bottleneck_study.md"))
    print(md)
    summary = {"blocks": blocks, "percentile": pct, "polysemanticity": poly_cfg if poly_t else None, "per_block": per_block,
               "claims": {k: c.as_dict() for k, c in claims.items()}}
    arrays = {}
    for res in trained:
        arrays[f"{res['block']}_strength"] = res["strength"]
        arrays[f"{res['block']}_bottleneck_share"] = res["bottleneck_share"]
    for l, v in poly_t.items():
        arrays[f"{l}_classes"] = v
    r.save_numbers("bottleneck_study", arrays, summary)
    return r.result(summary)


def _r(values) -> str:
    v = [float(x) for x in values]
    return "–" if not v else (f"{np.mean(v):.2f}" if len(v) == 1 else f"{np.mean(v):.2f} ± {np.std(v):.2f}")


def result_table(blocks, per_block, claims, poly: bool) -> str:
    """The study's numbers as Markdown: what ``experiments/RESULTS.md`` cites."""
    lines = ["| block | input | 1x1 share (random) | 3x3 share (random) | 5x5 share (random) | pool share (random) | bottleneck-only upstream neurons |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for b in blocks:
        p = per_block[b]
        cells = [f"{p['shares'][br]:.2f} ({_r(p['random_init_shares'][br])})" for br in BRANCHES]
        lines.append(f"| {b} | {p['input_layer']} | " + " | ".join(cells) + f" | {len(p['bottleneck_only_neurons'])} |")
    if poly:
        lines += ["", "| block | " + " | ".join(GROUPS) + " | bottleneck − output (random) |", "| --- |" + " --- |" * (len(GROUPS) + 1)]
        for b in blocks:
            p = per_block[b]
            cells = [f"{p['polysemanticity_median'][g]:.2f} ({_r(p['polysemanticity_median_random_init'][g])})" for g in GROUPS]
            c = claims[f"{b}_poly_gap"]
            lines.append(f"| {b} | " + " | ".join(cells) + f" | {c.value:+.2f} ({_r(c.random_init)}) |")
    lines += ["", *[f"- {c.caption()}" for c in claims.values()]]
    return "\n".join(lines) + "\n"
