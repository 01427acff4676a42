"""Article figure 6: spatial position weights of a neuron.

At each position ``(dy, dx)`` of the neuron's weights from ``from_layer`` the vector
``W[:, dy, dx]`` over input channels is a direction in ``from_layer``; each direction is
feature-visualized (a direction objective, averaged over positions) and the images are tiled
in the kernel's layout, faded by the vector's norm (:func:`circuits.figures.spatial_position_grid`).

Config: ``target`` (default ``mixed3b:342``; ``layer:auto`` = the neuron with the strongest
weights), ``from_layer`` (default ``mixed3a``), ``min_norm`` (positions whose norm is below
this fraction of the largest are not rendered; default 0.05).

Outputs: ``fig06_spatial_positions.*`` (figure), ``.npz`` (``directions [kh*kw, in]``,
``norms [kh, kw]``, ``rendered`` mask), ``.json``. The images need trained weights
(``weights: inception5h.pth``); on random init this is a smoke test.
"""

from __future__ import annotations

import numpy as np

from _common import feature_vis, resolve_target, start, weights_between
from circuits.featurevis import objectives
from circuits.figures import spatial_directions, spatial_position_grid


def run(config: dict) -> dict:
    r = start(config)
    src = config.get("from_layer", "mixed3a")
    layer, ch = resolve_target(config.get("target", "mixed3b:342"), r.model, src)
    W, kind = weights_between(r.model, src, layer, [ch])
    w = W[0].numpy()
    directions, norms = spatial_directions(w)
    flat = norms.reshape(-1)
    rendered = flat >= float(config.get("min_norm", 0.05)) * flat.max() if flat.max() > 0 else np.zeros_like(flat, bool)
    idx = np.flatnonzero(rendered).tolist()
    imgs = feature_vis(r, [objectives.direction(src, directions[i]) for i in idx])
    images = [None] * len(flat)
    for i, im in zip(idx, imgs):
        images[i] = im
    fig = spatial_position_grid(w, images, title=f"Spatial position weights of {layer}:{ch} from {src} ({kind})")
    r.save_figure(fig, "fig06_spatial_positions")
    summary = {"target": f"{layer}:{ch}", "from_layer": src, "kind": kind, "kernel": list(w.shape[1:]),
               "n_rendered": len(idx), "norms": norms}
    r.save_numbers("fig06_spatial_positions", {"directions": directions, "norms": norms, "rendered": rendered.reshape(norms.shape)}, summary)
    return r.result(summary)
