"""Article figure 9: ``mixed3b:208`` with the five ``mixed3a`` neurons that give it the strongest weights.

``mixed3b:208`` is a black-and-white centre detector built from black-and-white-vs-colour
detectors. The figure shows the target's feature visualization and small multiples of its
``top_n`` (5) strongest ``mixed3a`` inputs (expanded weights across the bottlenecks).

Config: ``target`` (default ``mixed3b:208``; ``mixed3b:auto`` for fashion-inception),
``from_layer`` (``mixed3a``), ``top_n`` (5).

Outputs: ``fig09_top5_inputs.*`` (small multiples), ``fig09_target.png`` (the target's
feature visualization), ``.npz`` (``weights``, ``norms``, ``order``, ``slices``), ``.json``.
Meaningful with ``weights: inception5h.pth`` only; random init is a smoke test.
"""

from __future__ import annotations

from _common import resolve_target, sparse_images, start, weights_between
from circuits.figures import rank_inputs, save_image_png, small_multiples


def run(config: dict) -> dict:
    r = start(config)
    src = config.get("from_layer", "mixed3a")
    layer, ch = resolve_target(config.get("target", "mixed3b:208"), r.model, src)
    top_n = int(config.get("top_n", 5))
    W, kind = weights_between(r.model, src, layer, [ch])
    w = W[0]
    order = rank_inputs(w, top_n)[0].tolist()
    images, (target_img,) = sparse_images(r, src, order, w.shape[0], extra=[f"{layer}:{ch}"])
    fig = small_multiples(w, images, top_n=top_n, labels=[f"{src}:{c}" for c in range(w.shape[0])],
                          title=f"{layer}:{ch} and its {top_n} strongest {src} inputs ({kind} weights)", cols=top_n)
    data = dict(fig.data)
    r.save_figure(fig, "fig09_top5_inputs")
    p = save_image_png(target_img, r.out / "fig09_target.png", scale=max(1, 128 // max(target_img.shape[:2])))
    r.files.append(str(p))
    summary = {"target": f"{layer}:{ch}", "from_layer": src, "kind": kind, "order": data["order"], "top_norms": data["norms"][data["order"]]}
    r.save_numbers("fig09_top5_inputs", {"weights": w, "norms": data["norms"], "order": data["order"], "slices": data["slices"]}, summary)
    return r.result(summary)
