"""Article figure 6: spatial position weights of a neuron.

At each position ``(dy, dx)`` of the neuron's weights from ``from_layer`` the vector
``W[:, dy, dx]`` over input channels is a direction in ``from_layer``; each direction is
feature-visualized (a direction objective, averaged over positions) and the images are tiled
in the kernel's layout, faded by the vector's norm (:func:`circuits.figures.spatial_position_grid`).
The grid is cropped to the kernel's support: positions outside it (the zero padding of a 3x3
kernel inside a 5x5 window of expanded weights) are not weights and are not drawn.

Claim: a few directions describe what the weights look for at all positions — the share of
the ``[positions, in]`` weight matrix's energy in its 2 largest singular values is higher than
for the same neuron of random-init models and than for the weights shuffled within the support.

Config: ``target`` (default ``mixed3b:342``; ``story:family`` = the story family's first
neuron), ``from_layer`` (default ``mixed3a``), ``min_norm`` (positions whose norm is below this
fraction of the largest are not rendered; default 0.05).

Outputs: ``fig06_spatial_positions.*`` (figure), ``.npz`` (``directions [kh*kw, in]``,
``norms [kh, kw]``, ``rendered`` mask, ``box`` = the support's rows/columns in the full
window), ``.json`` (with the claim).
"""

from __future__ import annotations

import numpy as np

from _common import add_caption, feature_vis, options, resolve_target, start, support_box, weights_between
from _measures import Claim, position_rank_share, shuffle_entries
from circuits.featurevis import objectives
from circuits.figures import spatial_directions, spatial_position_grid

OPTIONS = options(target="layer:index or story:NAME", from_layer="upstream layer", min_norm="render positions above this fraction of the largest norm")


def run(config: dict) -> dict:
    r = start(config, OPTIONS)
    src = config.get("from_layer", "mixed3a")
    layer, ch = resolve_target(config.get("target", "mixed3b:342"), r.model, config)
    W, kind = weights_between(r.model, src, layer, [ch])
    full = W[0].numpy()
    y0, y1, x0, x1 = support_box(full)
    w = full[:, y0:y1, x0:x1]
    claim = Claim(f"share of {layer}:{ch}'s [positions × channels] weights in 2 directions", position_rank_share(w),
                  [position_rank_share(weights_between(m, src, layer, [ch])[0][0].numpy()) for m in r.random_models()],
                  [position_rank_share(shuffle_entries(W, s)[0].numpy()) for s in r.shuffle_seeds()],
                  control="the same neuron of random-init models", shuffle="weights permuted within the support")
    directions, norms = spatial_directions(w)
    flat = norms.reshape(-1)
    rendered = flat >= float(config.get("min_norm", 0.05)) * flat.max() if flat.max() > 0 else np.zeros_like(flat, bool)
    idx = np.flatnonzero(rendered).tolist()
    imgs = feature_vis(r, [objectives.direction(src, directions[i]) for i in idx])
    images = [None] * len(flat)
    for i, im in zip(idx, imgs):
        images[i] = im
    fig = spatial_position_grid(w, images, title=f"Spatial position weights of {layer}:{ch}\nfrom {src} ({kind}, {w.shape[1]}×{w.shape[2]} support)",
                                cell_size=1.1)
    fig.figure.subplots_adjust(bottom=0.02)
    add_caption(fig, [claim.caption(), "Each tile: the direction W[:, y, x] feature-visualized, faded by its norm (printed above)."])
    r.save_figure(fig, "fig06_spatial_positions")
    summary = {"target": f"{layer}:{ch}", "from_layer": src, "kind": kind, "kernel": list(w.shape[1:]), "window": list(full.shape[1:]),
               "n_rendered": len(idx), "norms": norms, "claim": claim.as_dict()}
    r.save_numbers("fig06_spatial_positions", {"directions": directions, "norms": norms, "rendered": rendered.reshape(norms.shape),
                                               "box": [y0, y1, x0, x1]}, summary)
    return r.result(summary)
