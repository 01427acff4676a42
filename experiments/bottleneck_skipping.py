"""Bottleneck-skipping study: how the connection strength into each ``mixed`` block splits by branch.

For every Inception block ``B`` with input layer ``P`` (the layer feeding its four branches,
found by tracing: ``maxpool1`` → ``mixed3a``, ``mixed3a`` → ``mixed3b``, ``maxpool4`` →
``mixed4a``... in InceptionV1):

1. **Branch shares.** The expanded weights ``E [out_B, in_P, kh, kw]`` from ``P`` to ``B``
   skip the bottlenecks (1x1 → 3x3 and 1x1 → 5x5) and linearise the pool branch (max →
   average pool). ``B``'s output channels are the concatenation of the four branches, so the
   rows of ``E`` split by branch and the squared L2 of the block is exactly the sum over
   branches: ``share_b = ||E[rows_b]||² / ||E||²`` (the shares sum to 1; checked and
   recorded as ``sum_check``). Beside it, the squared L2 of each branch's *direct* weights
   from ``P`` (the 1x1 conv, the two bottleneck convs, the pool-reduce conv).
2. **Bottleneck-only upstream neurons.** For each neuron ``i`` of ``P``, the share of its
   connection strength (``Σ ||E[rows_b, i]||²``) that goes through the two bottlenecked
   branches (3x3 + 5x5). Neurons with ``bottleneck_share >= threshold`` (0.9) and total
   strength above the block's median connect strongly *only* through a bottleneck.
3. **Polysemanticity of the bottleneck layers** (a proxy). The direct 1x1 weights from ``P``
   of all four branch entry convs are factored together with one-sided NMF over input
   channels (``components`` shared non-negative directions in ``P``,
   :func:`circuits.nmf.family_factors`). For each neuron, the distribution of its absolute
   loadings over the factors has a normalised entropy in ``[0, 1]``: 0 = reads one factor,
   1 = spreads evenly over all. Bottleneck neurons (``3x3_bottleneck``, ``5x5_bottleneck``)
   are compared with the same block's ``1x1`` neurons, which see the same factors.

Outputs (``out``): ``branch_shares.csv`` (block, input layer, branch, channels, squared L2 of
expanded and direct weights, share), ``upstream_neurons.csv`` (per upstream neuron: strength,
per-branch shares, bottleneck share, flag), ``polysemanticity.csv`` (per branch-entry neuron:
normalised entropy), ``bottleneck_study.json`` (per-block summary), ``bottleneck_study.npz``,
figures ``bottleneck_shares.*`` and ``bottleneck_entropy.*``.

Meaning: the sum check holds for any weights; the shares, the bottleneck-only neurons and the
entropies describe a network only with trained weights (``weights: inception5h.pth`` for
InceptionV1; the bundled checkpoint for fashion-inception). Random init is a smoke test.
"""

from __future__ import annotations

import csv
import math
import re

import numpy as np
import torch
from matplotlib.figure import Figure

from _common import n_channels, start
from circuits._io import atomic_path
from circuits.expanded import expanded_weights
from circuits.layers import capture, get_layer
from circuits.models import input_shape
from circuits.nmf import family_factors

BRANCHES = ("1x1", "3x3", "5x5", "pool")
ENTRY = {"1x1": "1x1", "3x3": "3x3_bottleneck", "5x5": "5x5_bottleneck", "pool": "pool_reduce"}


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


def norm_entropy(loadings: np.ndarray) -> np.ndarray:
    """Normalised entropy ``[n]`` of each row's absolute loadings ``[n, k]`` (0 for an all-zero row)."""
    a = np.abs(loadings)
    s = a.sum(1, keepdims=True)
    p = np.divide(a, s, out=np.zeros_like(a), where=s > 0)
    with np.errstate(divide="ignore", invalid="ignore"):
        h = -np.where(p > 0, p * np.log(p), 0.0).sum(1)
    return h / math.log(loadings.shape[1]) if loadings.shape[1] > 1 else np.zeros(len(a))


def study_block(model, block: str, components: int, threshold: float, nmf_kwargs: dict) -> dict:
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
        direct = get_layer(model, f"{block}_{ENTRY[b]}_pre_relu_conv").weight.detach().double()
        per_branch_in[b] = per_out_in[sl].sum(0).numpy()
        rows.append({"block": block, "input_layer": src, "branch": b, "channels": sizes[b],
                     "via": {"1x1": "direct", "3x3": "3x3_bottleneck", "5x5": "5x5_bottleneck", "pool": "linearised pool"}[b],
                     "expanded_sq_l2": sq, "share": sq / total if total > 0 else 0.0,
                     "direct_entry_sq_l2": float(direct.square().sum()), "kernel": "x".join(map(str, E.shape[2:]))})
    sum_check = sum(r["expanded_sq_l2"] for r in rows) - total
    strength = sum(per_branch_in.values())  # [in]
    with np.errstate(invalid="ignore", divide="ignore"):
        shares = {b: np.where(strength > 0, v / strength, 0.0) for b, v in per_branch_in.items()}
    bshare = shares["3x3"] + shares["5x5"]
    only = (bshare >= threshold) & (strength >= np.median(strength)) & (strength > 0)
    # polysemanticity: shared NMF directions over the four entry convs' weights from src
    entries = [get_layer(model, f"{block}_{ENTRY[b]}_pre_relu_conv").weight.detach().float().cpu() for b in BRANCHES]
    W = torch.cat([w.flatten(1) for w in entries], 0)  # [sum entries, in]
    k = min(components, W.shape[1], 2 * W.shape[0])
    fam = family_factors(W, k, **nmf_kwargs)
    ent = norm_entropy(fam.loadings.numpy())
    groups, o = {}, 0
    for b, w in zip(BRANCHES, entries):
        groups[ENTRY[b]] = ent[o: o + w.shape[0]]
        o += w.shape[0]
    return {"block": block, "input_layer": src, "sizes": sizes, "rows": rows, "total_sq_l2": total, "sum_check": sum_check,
            "strength": strength, "branch_shares_in": shares, "bottleneck_share": bshare, "bottleneck_only": only,
            "entropy": groups, "nmf_explained": fam.explained, "components": k, "kernel": list(E.shape[2:])}


def _write_csv(path, header: list[str], rows: list[list]) -> str:
    with atomic_path(path) as tmp:
        with open(tmp, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(header)
            w.writerows(rows)
    return str(path)


def shares_figure(results: list[dict]):
    from circuits.figures import FigureResult

    fig = Figure(figsize=(1.0 + 0.7 * len(results), 3.2))
    ax = fig.subplots()
    bottom = np.zeros(len(results))
    colors = {"1x1": "#4c72b0", "3x3": "#dd8452", "5x5": "#55a868", "pool": "#8172b3"}
    for b in BRANCHES:
        v = np.array([next(r["share"] for r in res["rows"] if r["branch"] == b) for res in results])
        ax.bar(range(len(results)), v, bottom=bottom, color=colors[b], label={"1x1": "1x1 (direct)", "3x3": "3x3 via bottleneck", "5x5": "5x5 via bottleneck", "pool": "pool (linearised)"}[b])
        bottom += v
    ax.set_xticks(range(len(results)), [res["block"] for res in results], rotation=45, fontsize=7)
    ax.set_ylabel("share of ||expanded weights||²", fontsize=8)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Connection strength from the block input, by branch", fontsize=9)
    return FigureResult(fig, {"shares": np.array([[next(r["share"] for r in res["rows"] if r["branch"] == b) for b in BRANCHES] for res in results])})


def entropy_figure(results: list[dict]):
    from circuits.figures import FigureResult

    fig = Figure(figsize=(1.0 + 0.9 * len(results), 3.2))
    ax = fig.subplots()
    groups = ("1x1", "3x3_bottleneck", "5x5_bottleneck")
    colors = ("#4c72b0", "#dd8452", "#55a868")
    for j, g in enumerate(groups):
        data = [res["entropy"][g] for res in results]
        pos = np.arange(len(results)) + (j - 1) * 0.25
        bp = ax.boxplot(data, positions=pos, widths=0.2, patch_artist=True, showfliers=False)
        for patch in bp["boxes"]:
            patch.set_facecolor(colors[j])
        ax.plot([], [], color=colors[j], lw=6, label=g)
    ax.set_xticks(range(len(results)), [res["block"] for res in results], rotation=45, fontsize=7)
    ax.set_ylabel("normalised entropy of NMF loadings", fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    ax.set_title("Spread over shared NMF factors (higher = more polysemantic)", fontsize=9)
    return FigureResult(fig, {})


def run(config: dict) -> dict:
    r = start(config)
    blocks = config.get("blocks", "all")
    available = mixed_blocks(r.model)
    if blocks in (None, "all"):
        blocks = available
    bad = [b for b in blocks if b not in available]
    if bad:
        raise ValueError(f"unknown blocks {bad}; this model's Inception blocks are {available}")
    threshold = float(config.get("threshold", 0.9))
    components = int(config.get("components", 6))
    nmf = r.nmf_settings()
    from tqdm.auto import tqdm

    results = [study_block(r.model, b, components, threshold, nmf) for b in tqdm(blocks, desc="bottleneck study", disable=not config.get("progress", True))]
    share_rows = [[x["block"], x["input_layer"], x["branch"], x["via"], x["channels"], x["kernel"], x["expanded_sq_l2"], x["share"], x["direct_entry_sq_l2"]]
                  for res in results for x in res["rows"]]
    r.files.append(_write_csv(r.out / "branch_shares.csv", ["block", "input_layer", "branch", "via", "channels", "kernel",
                                                            "expanded_sq_l2", "share", "direct_entry_sq_l2"], share_rows))
    up_rows = []
    for res in results:
        for i in range(len(res["strength"])):
            up_rows.append([res["block"], res["input_layer"], i, float(res["strength"][i])]
                           + [float(res["branch_shares_in"][b][i]) for b in BRANCHES]
                           + [float(res["bottleneck_share"][i]), bool(res["bottleneck_only"][i])])
    r.files.append(_write_csv(r.out / "upstream_neurons.csv", ["block", "input_layer", "neuron", "sq_l2", "share_1x1", "share_3x3",
                                                               "share_5x5", "share_pool", "bottleneck_share", "bottleneck_only"], up_rows))
    poly_rows = [[res["block"], f"{res['block']}_{g}", n, float(v)] for res in results for g, vals in res["entropy"].items() for n, v in enumerate(vals)]
    r.files.append(_write_csv(r.out / "polysemanticity.csv", ["block", "layer", "neuron", "normalised_entropy"], poly_rows))
    r.save_figure(shares_figure(results), "bottleneck_shares")
    r.save_figure(entropy_figure(results), "bottleneck_entropy")
    per_block = {}
    for res in results:
        per_block[res["block"]] = {
            "input_layer": res["input_layer"], "kernel": res["kernel"], "total_sq_l2": res["total_sq_l2"], "sum_check": res["sum_check"],
            "shares": {x["branch"]: x["share"] for x in res["rows"]},
            "bottleneck_only_neurons": np.flatnonzero(res["bottleneck_only"]).tolist(),
            "mean_entropy": {g: float(np.mean(v)) for g, v in res["entropy"].items()},
            "nmf_explained": res["nmf_explained"], "components": res["components"],
        }
    summary = {"blocks": blocks, "threshold": threshold, "per_block": per_block}
    arrays = {}
    for res in results:
        arrays[f"{res['block']}_strength"] = res["strength"]
        arrays[f"{res['block']}_bottleneck_share"] = res["bottleneck_share"]
        for g, v in res["entropy"].items():
            arrays[f"{res['block']}_{g}_entropy"] = v
    r.save_numbers("bottleneck_study", arrays, summary)
    return r.result(summary)
