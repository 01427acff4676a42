"""Article figures 3–4: the top input neurons of ``mixed3b:342`` with variable names and weight slices.

Figure 3 ("the key trick"): the strongest input neuron's feature visualization, its
``[kh, kw]`` weight slice, and the output neuron's feature visualization. Figure 4: small
multiples of the ``top_n`` strongest inputs (ranked by the L2 of their weight slice).
The weights come from ``from_layer`` (default ``mixed3a``); across the ``mixed3b``
bottlenecks they are expanded weights (:func:`circuits.expanded.connection_weights`).

Claim (why looking at the top inputs is worth it): the ``top_n`` strongest inputs carry a
larger share of the neuron's squared weights than they do for the same neuron of random-init
models, or for the trained weights shuffled within the neuron's support.

Config: ``target`` (``mixed3b:342``, or ``story:family`` = the seed of the story file's
family), ``from_layer``, ``top_n``.

Outputs: ``fig03_top_input.*`` and ``fig04_small_multiples.*`` (figures),
``fig04_small_multiples.npz`` (``weights [in, kh, kw]``, ``norms [in]``, ``order``,
``slices [top_n, kh, kw]``), ``.json`` (target, ranking, kind of weights, claim).
"""

from __future__ import annotations

from _common import add_caption, connection_panel, on_support, options, resolve_target, sparse_images, start, weights_between
from _measures import Claim, shuffle_entries, top_share
from circuits.figures import rank_inputs, small_multiples

OPTIONS = options(target="layer:index or story:NAME", from_layer="upstream layer", top_n="inputs shown")


def run(config: dict) -> dict:
    r = start(config, OPTIONS)
    src = config.get("from_layer", "mixed3a")
    layer, ch = resolve_target(config.get("target", "mixed3b:342"), r.model, config)
    top_n = int(config.get("top_n", 8))
    W, kind = weights_between(r.model, src, layer, [ch])
    w = W[0]
    claim = Claim(f"share of {layer}:{ch}'s squared {kind} weights in its top {top_n} {src} inputs", top_share(w.numpy(), top_n),
                  [top_share(weights_between(m, src, layer, [ch])[0][0].numpy(), top_n) for m in r.random_models()],
                  [top_share(shuffle_entries(W, s)[0].numpy(), top_n) for s in r.shuffle_seeds()],
                  control="the same neuron of random-init models", shuffle="weights permuted within the neuron's support")
    n_in = w.shape[0]
    order = rank_inputs(w, top_n)[0].tolist()
    images, (out_img,) = sparse_images(r, src, order, n_in, extra=[f"{layer}:{ch}"])
    labels = [f"{src}:{c}" for c in range(n_in)]
    top = order[0]
    shown = on_support(w)  # the kernel, not the window's zero padding
    f3 = connection_panel(images[top], shown[top].numpy(), out_img, f"{src}:{top}", f"{layer}:{ch}",
                          f"{src}:{top} → {layer}:{ch} ({kind} weights)")
    r.save_figure(f3, "fig03_top_input")
    f4 = small_multiples(shown, images, top_n=top_n, labels=labels, title=f"Top {top_n} {src} inputs of {layer}:{ch} ({kind} weights)", cols=min(top_n, 8))
    add_caption(f4, [claim.caption()])
    data = dict(f4.data)
    r.save_figure(f4, "fig04_small_multiples")
    summary = {"target": f"{layer}:{ch}", "from_layer": src, "kind": kind, "top_n": top_n,
               "order": data["order"], "top_norms": data["norms"][data["order"]], "kernel": list(w.shape[1:]), "claim": claim.as_dict()}
    r.save_numbers("fig04_small_multiples", {"weights": w, "norms": data["norms"], "order": data["order"], "slices": data["slices"]}, summary)
    return r.result(summary)
